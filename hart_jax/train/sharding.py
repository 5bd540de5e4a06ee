"""Device mesh, logical axis names of the parameters, and shardings: the one sharding
vocabulary of training and sampling (transformer, tokenizer, Qwen2 text encoder).

The model code stays free of sharding annotations: each parameter gets logical axis
names from its path (``PARAM_LOGICAL_AXES``, first matching pattern wins; the stacked
transformer blocks ``blocks/...`` get a leading ``layers`` axis before them), and the
``rules`` (``DEFAULT_RULES`` unless a config or ``HARTPipeline(rules=...)`` gives others)
map logical names to mesh axes (``data``, ``fsdp``, ``tensor``).
The same path rules cover the optimizer state and the EMA copy, whose leaves end in
the parameter's path. A mesh axis that does not divide a dimension is dropped for
that dimension (the dimension is replicated) rather than failing.

Activations use the logical names ``batch`` / ``length`` / ``act_embed`` through
``flax.linen.with_logical_constraint`` under ``nn.logical_axis_rules(rules)``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hart_jax.mesh_axes import axes_tuple, dividing_axes, spec_entry

MESH_AXES = ("data", "fsdp", "tensor")

# (regex on "a/b/c" parameter path, logical axes); first match wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/qkv_proj/kernel$", ("embed", "qkv")),
    (r"attn/proj/kernel$", ("heads", "embed")),
    (r"attn/(q_bias|v_bias)$", ("heads",)),
    (r"attn/scale_mul_1H11$", (None, None, None, None)),
    (r"ffn/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"ffn/down_proj/kernel$", ("mlp", "embed")),
    (r"ada_lin/kernel$", ("embed", "adaln")),
    (r"ada_lin/bias$", ("adaln",)),
    (r"scale_shift_table$", (None, "embed")),
    (r"(^|/)head/kernel$", ("embed", "vocab")),
    (r"(^|/)head/bias$", ("vocab",)),
    (r"class_emb/embedding$", ("classes", "embed")),
    (r"pos_start$", (None, None, "embed")),
    (r"lvl_embed/embedding$", (None, "embed")),
    (r"diffloss/.*kernel$", ("diff_in", "diff_out")),
    (r"diffloss/.*(bias|scale)$", ("diff_out",)),
    # Qwen2 text encoder (hart_jax/models/text_encoder.py); its RMSNorm scales match "scale$".
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"self_attn/q_proj/kernel$", ("embed", "heads")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"self_attn/(k_proj|v_proj)/bias$", ("kv_heads",)),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"kernel$", ("input", "embed")),
    # 2-D convs (tokenizer, discriminator): [kh, kw, in, out]; "conv_out" is only mapped by
    # TOKENIZER_RULES, so under DEFAULT_RULES conv kernels stay replicated as before.
    (r"kernel$", (None, None, "conv_in", "conv_out")),
    (r"scale$", ("norm",)),
    (r"bias$", ("embed",)),
)

# Parameters under this path segment carry a leading layer axis ``[X, ...]`` (the scanned blocks).
STACKED_PREFIX = re.compile(r"(^|/)blocks/")

# Logical name -> mesh axis (or axes, or None).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("diff_in", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "tensor"),
    ("vocab", "tensor"),
    ("diff_out", "tensor"),
    ("input", None),
    ("classes", None),
    ("norm", None),
)

# Tokenizer training: conv output channels over fsdp too (when divisible).
TOKENIZER_RULES: tuple[tuple[str, Any], ...] = DEFAULT_RULES + (("conv_in", None), ("conv_out", "fsdp"))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def check_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]], shard_params: bool = True) -> None:
    """ValueError (one line) for a mesh ``rules`` cannot use: an axis of size > 1 that no rule
    names, or ``shard_params`` on a mesh with no axis of size > 1 that parameters split over."""
    named = {a for _, r in rules for a in axes_tuple(r)}
    unknown = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in named]
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} are not named by the sharding rules (they use {sorted(named)}); "
            "build the mesh with hart_jax.train.sharding.make_mesh"
        )
    if shard_params and not param_mesh_axes(mesh, rules):
        table = dict(rules)
        axes = sorted({a for _, ax in PARAM_LOGICAL_AXES for n in ax if n for a in axes_tuple(table.get(n))})
        sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
        raise ValueError(
            f"shard_params needs a mesh axis of size > 1 that the rules split weights over ({', '.join(axes)}); "
            f"the mesh is {sizes}"
        )


def param_mesh_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    """Mesh axes of size > 1 that ``rules`` split some parameter's logical axis over."""
    table = dict(rules)
    names = {n for _, axes in PARAM_LOGICAL_AXES for n in axes if n is not None}
    axes = {a for n in names for a in axes_tuple(table.get(n))}
    return tuple(a for a in mesh.axis_names if a in axes and mesh.shape[a] > 1)


def path_str(path: Iterable[Any]) -> str:
    """``a/b/c`` from a pytree key path (dict keys and attribute names only)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or of a state leaf ending in its path); a stacked
    block parameter (``blocks/...``) gets ``layers`` before its per-block axes."""
    if ndim == 0:
        return ()
    if STACKED_PREFIX.search(path):
        return ("layers",) + logical_axes(STACKED_PREFIX.split(path)[-1], ndim - 1)
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> P:
    """PartitionSpec of one array: logical names through ``rules``; each mesh axis used
    once; a mesh axis that does not divide its dimension is dropped."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        names = axes_tuple(table.get(name)) if name is not None else ()
        keep = dividing_axes(names, dim, mesh.shape, used)
        used.update(keep)
        out.append(spec_entry(keep))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """``NamedSharding`` for every array leaf of ``tree`` (params, optimizer state, EMA)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(logical_axes(path_str(path), len(shape)), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over the ``batch`` rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in axes_tuple(dict(rules).get("batch")) if a in mesh.shape and mesh.shape[a] > 1)
    lead = spec_entry(axes)
    return NamedSharding(mesh, P(lead) if lead is not None else P())


def batch_divisor(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> int:
    """How many ways the batch axis is split on ``mesh``."""
    return math.prod(mesh.shape[a] for a in axes_tuple(dict(rules).get("batch")) if a in mesh.shape)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Largest per-device byte count of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``."""
    total = 0
    for leaf, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shape = sh.shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Unsharded byte count of ``tree``."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def with_logical(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``nn.with_logical_constraint`` (a no-op outside ``nn.logical_axis_rules`` / a mesh)."""
    return nn.with_logical_constraint(x, axes)
