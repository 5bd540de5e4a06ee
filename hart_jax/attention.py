"""The attention implementations HART's transformer can use, behind one switch.

``attention_impl`` (a model config field) picks one of:

- ``"xla"``: the dense jnp path of ``hart_jax.kernels.reference`` (fp32 logits and
  softmax, matmul operands in the input dtype); runs everywhere.
- ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` with a
  boolean mask built from the level ids (training) or ``key_value_seq_lengths``
  (sampling); GPU only, bf16/fp16 only.
- ``"pallas"``: the fused Pallas Triton kernels of ``hart_jax.kernels``; GPU, or
  any backend with ``interpret=True`` (tests).
- ``"auto"`` (or None): per call shape, the implementation measured fastest at the
  nearest measured shape on this GPU kind (``auto_impl``, the table and its rule in
  ``hart_jax.kernels.dispatch_table``); without measurements for the device kind, dtype,
  head dim or op, the backend default (``DEFAULT_IMPL_BY_BACKEND``; CPU: ``xla``).
  Each distinct choice is logged once; ``describe_impl`` states the rule in words.

Two entry points: ``attention`` (training / teacher forcing, level mask) and
``cache_attention`` (sampling, queries of one scale against the KV cache).

The Pallas kernels' tiles, unless the caller passes a config, come from the tile table's row
for the target GPU (``pallas_config``, ``hart_jax.kernels.tile_table``; logged once); other
devices and the interpreter get the config dataclasses' defaults.

Under a multi-device context mesh the Pallas kernels run inside ``shard_map``, each
device on its own rows (and heads): see ``kernel_mesh_axes``.

Dimensions (docs/design.md): B batch; Q query tokens; K key tokens (a cache's entries);
A heads; D head dim; X depth (stacked per-block caches).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from hart_jax.kernels import dispatch_table, tile_table
from hart_jax.kernels import reference as _ref
from hart_jax.kernels.cache_attention import CacheAttentionConfig, check_cache_inputs
from hart_jax.kernels.cache_attention import cache_attention as pallas_cache_attention
from hart_jax.kernels.level_attention import LevelAttentionConfig, check_qkv
from hart_jax.kernels.level_attention import level_attention as pallas_level_attention
from hart_jax.mesh_axes import axes_tuple, dividing_axes, spec_entry
from hart_jax.train.sharding import DEFAULT_RULES

logger = logging.getLogger(__name__)

IMPLS = ("xla", "cudnn", "pallas")

# The implementation "auto" picks on a GPU for a shape with no measurement that applies
# (hart_jax/kernels/dispatch_table.json holds those): the fused Pallas kernel, the only
# one that skips fully masked blocks.
FASTEST_MEASURED_GPU_IMPL = "pallas"

DEFAULT_IMPL_BY_BACKEND = {
    "cpu": "xla",
    "gpu": FASTEST_MEASURED_GPU_IMPL,
    "cuda": FASTEST_MEASURED_GPU_IMPL,
    "rocm": "xla",
    "tpu": "xla",
}

_logged: set[tuple] = set()
_interpret: bool = os.environ.get("HART_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


def set_pallas_interpret(flag: bool) -> None:
    """Global default of ``interpret`` for the Pallas kernels (env ``HART_PALLAS_INTERPRET``)."""
    global _interpret
    _interpret = bool(flag)


def pallas_interpret() -> bool:
    """Current global default of ``interpret``."""
    return _interpret


def resolve_impl(impl: str | None = "auto", backend: str | None = None) -> str:
    """One name for ``impl``: ``"auto"``/None -> the default for ``backend`` (default: JAX's);
    logs the choice once. That default is what ``auto`` falls back to where no measurement
    applies; ``attention``/``cache_attention`` choose per call shape (``auto_impl``), and
    ``describe_impl`` reports that rule."""
    backend = backend or jax.default_backend()
    requested = "auto" if impl is None else impl
    if requested == "auto":
        chosen = DEFAULT_IMPL_BY_BACKEND.get(backend, "xla")
    elif requested in IMPLS:
        chosen = requested
    else:
        raise ValueError(f"attention_impl must be one of {('auto',) + IMPLS}, got {impl!r}")
    key = (requested, backend, chosen)
    if key not in _logged:
        _logged.add(key)
        logger.info("attention_impl=%s (requested %s, backend %s)", chosen, requested, backend)
    return chosen


def _log_once(key: tuple, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(msg, *args)


def current_device() -> tuple[str, str]:
    """``(backend, device kind)`` of JAX's default device, e.g. ``("gpu", "NVIDIA H200")``."""
    return jax.default_backend(), str(jax.devices()[0].device_kind)


def _device(backend: str | None, device_kind: str | None) -> tuple[str, str]:
    if backend is None or device_kind is None:
        b, kind = current_device()
        return backend or b, device_kind or kind
    return backend, device_kind


def auto_impl(
    op: str, dtype: Any, queries: int, keys: int, head_dim: int,
    *, backend: str | None = None, device_kind: str | None = None,
) -> str:
    """``"auto"``'s implementation for one call: ``op`` (``"cache_attention"`` or
    ``"level_attention"``), input ``dtype``, ``queries`` x visible ``keys``, ``head_dim``.

    CPU: ``xla``. Elsewhere: ``dispatch_table.choose`` for the device kind (fastest at the
    nearest measured shape, by log query-key pairs; never cuDNN for fp32); with nothing
    measured for it, the backend default, saying so in the log. A pure function of static
    values (it runs at trace time); each distinct choice is logged once.
    """
    backend, kind = _device(backend, device_kind)
    if backend == "cpu":
        return resolve_impl("auto", backend)
    default = DEFAULT_IMPL_BY_BACKEND.get(backend, "xla")
    dname = jnp.dtype(dtype).name
    choice = dispatch_table.choose(op, kind, dname, queries, keys, head_dim)
    if choice is None:
        _log_once(
            ("auto", op, backend, kind, dname, head_dim, default),
            "attention_impl=auto: no %s measurements for %s (%s, head dim %d); using the %s default %s",
            op, kind, dname, head_dim, backend, default,
        )
        return default
    e, g = choice.entry, choice.group
    _log_once(
        ("auto", op, backend, kind, dname, head_dim, queries, keys, choice.impl),
        "attention_impl=auto: %s Q=%d K=%d D=%d %s -> %s (nearest measured Q=%d K=%d on %s, JAX %s: %s)",
        op, queries, keys, head_dim, dname, choice.impl, e.queries, e.keys, kind, g.jax,
        ", ".join(f"{i} {t:g} ms" for i, t in e.ms),
    )
    return choice.impl


def describe_impl(
    impl: str | None, dtype: Any, head_dim: int,
    *, backend: str | None = None, device_kind: str | None = None,
) -> str:
    """What ``impl`` runs on this device, in words: the name for an explicit one and for
    ``auto`` on a CPU; for ``auto`` elsewhere the per-shape rule of each op, e.g. ``auto:
    sampling: pallas up to 7.5e+06 query-key pairs, then cudnn above (...); training: pallas
    (no measurements); measured on NVIDIA H200, JAX 0.11.2, bfloat16, head dim 64``."""
    if impl not in (None, "auto"):
        return resolve_impl(impl, backend)
    backend, kind = _device(backend, device_kind)
    if backend == "cpu":
        return resolve_impl("auto", backend)
    default = DEFAULT_IMPL_BY_BACKEND.get(backend, "xla")
    dname = jnp.dtype(dtype).name
    parts = []
    for op, what in (("cache_attention", "sampling"), ("level_attention", "training")):
        rule = dispatch_table.describe_rule(op, kind, dname, head_dim)
        parts.append(f"{what}: {rule or default + ' (no measurements)'}")
    group = dispatch_table.find_group(dispatch_table.load_table(), kind, dname)
    source = f"measured on {kind}, JAX {group.jax}" if group else f"no measurements for {kind}"
    return f"auto: {'; '.join(parts)}; {source}, {dname}, head dim {head_dim}"


def target_device() -> tuple[str, str]:
    """``(platform, device kind)`` the kernels are traced for: the abstract device of the
    context mesh where it names one (lowering for a GPU from any machine), else
    ``current_device()``."""
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if dev is not None and getattr(dev, "device_kind", None):
        return str(dev.platform), str(dev.device_kind)
    return current_device()


def pallas_config(op: str, interpret: bool) -> LevelAttentionConfig | CacheAttentionConfig:
    """The config of the Pallas kernel ``op`` (``"level_attention"`` or ``"cache_attention"``)
    when the caller names none: the tile table's row for ``target_device()``; the dataclass
    defaults under ``interpret``, off a GPU, or for a device kind no row covers. Runs at
    trace time; each distinct choice is logged once."""
    platform, kind = target_device()
    level, cache, row = tile_table.configs_for(kind, "cpu" if interpret else platform)
    cfg = level if op == "level_attention" else cache
    if row is None:
        _log_once(("tiles", op, platform, kind, bool(interpret)),
                  "pallas %s tiles: defaults (%s, %s%s)", op, kind, platform,
                  ", interpreted" if interpret else ", no tile table row")
    else:
        names = (("level_fwd", "level_dkv", "level_dq") if op == "level_attention"
                 else tuple(n for n in ("cache", "cache_long") if n in dict(row.tiles)))
        _log_once(("tiles", op, platform, kind, row.device_class),
                  "pallas %s tiles for %s (tile table row %s): %s", op, kind, row.device_class,
                  "; ".join(f"{n} {row.kernel(n)} ({dict(row.measured)[n]})" for n in names))
    return cfg


def _kernel_precision(precision: lax.PrecisionLike) -> lax.Precision:
    """Matmul precision for the Pallas kernels, following the XLA precision rules.

    An explicit ``precision`` wins; otherwise ``jax_default_matmul_precision``
    decides (``highest``/``float32`` -> IEEE fp32; anything else lets Triton use TF32
    for fp32 inputs). bf16 inputs are unaffected.
    """
    if precision is not None:
        p = precision[0] if isinstance(precision, tuple) else precision
        return lax.Precision(p) if not isinstance(p, lax.Precision) else p
    cfg = jax.config.jax_default_matmul_precision
    if cfg in ("highest", "float32", "fastest_float32"):
        return lax.Precision.HIGHEST
    return lax.Precision.DEFAULT


def _pallas_kwargs(
    op: str, scale: float, config: Any, precision: lax.PrecisionLike, interpret: bool | None
) -> dict:
    """Keyword arguments of the Pallas kernel ``op`` (precision, interpret and config defaults
    resolved; no config: ``pallas_config``)."""
    interpret = pallas_interpret() if interpret is None else bool(interpret)
    return dict(
        scale=scale,
        config=pallas_config(op, interpret) if config is None else config,
        precision=_kernel_precision(precision),
        interpret=interpret,
    )


# ----------------------------------------------------------------------------- sharding


def kernel_mesh_axes(batch: int, heads: int) -> tuple[Any, tuple[str, ...], tuple[str, ...]] | None:
    """``(mesh, batch axes, head axes)`` the Pallas kernels are split over, or None.

    XLA cannot partition a Triton custom call: given sharded operands it gathers them
    and runs the kernel on the whole batch on every device. So inside a context mesh
    (``jax.set_mesh``) with more than one device the kernels run under ``shard_map``,
    each device on its own rows and heads. The axes come from the Flax logical rules
    in context (``batch``, ``heads``), else training's ``DEFAULT_RULES`` (the one
    sharding vocabulary, ``hart_jax.train.sharding``). An axis that does not divide its
    dimension is left out (``hart_jax.mesh_axes.dividing_axes``).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    rules = dict(nn.get_logical_axis_rules() or DEFAULT_RULES)
    b_axes = dividing_axes(axes_tuple(rules.get("batch")), batch, mesh.shape)
    h_axes = dividing_axes(axes_tuple(rules.get("heads")), heads, mesh.shape, used=b_axes)
    if not b_axes and not h_axes:
        return None
    return mesh, b_axes, h_axes


def _spec(split: tuple[Any, tuple[str, ...], tuple[str, ...]], layout: str) -> P:
    _, b, h = split
    return P(*[spec_entry(b) if c == "B" else spec_entry(h) if c == "H" else None for c in layout])


def kernel_spec(layout: str, batch: int, heads: int) -> P | None:
    """PartitionSpec the Pallas kernels use for an array laid out as ``layout`` (letters
    ``B`` batch, ``H`` heads, anything else unsplit, e.g. ``"BLHD"``, ``"NBLHD"``), or
    None outside a multi-device context mesh."""
    split = kernel_mesh_axes(batch, heads)
    return None if split is None else _spec(split, layout)


def constrain_for_kernels(x: jax.Array, layout: str, batch: int, heads: int) -> jax.Array:
    """Pin ``x`` (e.g. a KV cache) to the kernels' sharding so no call reshards it."""
    spec = kernel_spec(layout, batch, heads)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def _split_over_mesh(
    fn: Callable[..., jax.Array], args: tuple, layouts: tuple[str, ...], batch: int, heads: int
) -> jax.Array:
    """``fn(*args)``, under ``shard_map`` when a multi-device mesh is in context; the
    output is laid out ``BLHD``."""
    split = kernel_mesh_axes(batch, heads)
    if split is None:
        return fn(*args)
    specs = tuple(_spec(split, layout) for layout in layouts)
    if any(t == jax.sharding.AxisType.Explicit for t in split[0].axis_types):
        # Explicit mesh axes (JAX >= 0.12's default for make_mesh / AbstractMesh): an input's
        # type carries its sharding, and shard_map takes only inputs already split as in_specs
        # (the level ids, built here from static levels, are not).
        args = tuple(jax.reshard(a, s) for a, s in zip(args, specs))
    return jax.shard_map(
        fn, mesh=split[0], in_specs=specs, out_specs=_spec(split, "BLHD"), check_vma=False
    )(*args)


# Largest fp32 logits block the dense ``xla`` sampling path materialises at once.
XLA_LOGITS_BUDGET_BYTES = 1 << 30


def _query_chunk(q_shape: tuple[int, ...], lk: int) -> int:
    """Largest divisor of Q whose ``[B, A, chunk, K]`` fp32 logits fit the budget."""
    b, lq, h, _ = q_shape
    limit = max(1, XLA_LOGITS_BUDGET_BYTES // max(1, b * h * lk * 4))
    if lq <= limit:
        return lq
    return max(d for d in range(1, limit + 1) if lq % d == 0)


def _cudnn_check(q: jax.Array) -> None:
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")


def attention(
    q_BQAD: jax.Array,
    k_BKAD: jax.Array,
    v_BKAD: jax.Array,
    *,
    q_levels: jax.Array,
    k_levels: jax.Array,
    scale: float,
    impl: str | None = "auto",
    precision: lax.PrecisionLike = None,
    interpret: bool | None = None,
    config: LevelAttentionConfig | None = None,
) -> jax.Array:
    """HART's training attention: key visible iff ``level(k) <= level(q)``.

    ``q_levels``/``k_levels``: int ``[L]`` or ``[B, L]``. ``impl``: see the module
    docstring. ``interpret`` (Pallas only) defaults to ``pallas_interpret()``; ``config``
    (Pallas only) to ``pallas_config``. Returns ``[B, Q, A, D]`` in the input dtype.
    """
    check_qkv(q_BQAD, k_BKAD, v_BKAD)
    B, Q, A, D = q_BQAD.shape
    K = k_BKAD.shape[1]
    if impl in (None, "auto"):
        chosen = auto_impl("level_attention", q_BQAD.dtype, Q, K, D)
    else:
        chosen = resolve_impl(impl)
    q_lev = _ref.levels_2d(q_levels, B, Q, "q_levels")
    k_lev = _ref.levels_2d(k_levels, B, K, "k_levels")
    if chosen == "xla":
        return _ref.level_attention_reference(
            q_BQAD, k_BKAD, v_BKAD, q_lev, k_lev, scale,
            matmul_dtype=q_BQAD.dtype, precision=precision,
        )
    if chosen == "cudnn":
        _cudnn_check(q_BQAD)
        mask = _ref.level_mask(q_lev, k_lev)
        return jax.nn.dot_product_attention(
            q_BQAD, k_BKAD, v_BKAD, mask=mask[:, None], scale=scale, implementation="cudnn"
        )
    kw = _pallas_kwargs("level_attention", scale, config, precision, interpret)
    return _split_over_mesh(
        lambda q, k, v, ql, kl: pallas_level_attention(q, k, v, ql, kl, **kw),
        (q_BQAD, k_BKAD, v_BKAD, q_lev, k_lev), ("BLHD", "BLHD", "BLHD", "BL", "BL"), B, A,
    )


def _layer_caches(
    k_cache: jax.Array, v_cache: jax.Array, layer_1: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` entries of block ``layer_1[0]``'s caches, from the stacked ``[X, B, K, A, D]``."""
    _, b, _, h, d = k_cache.shape
    start = (layer_1[0], 0, 0, 0, 0)
    return tuple(jax.lax.dynamic_slice(c, start, (1, b, n, h, d))[0] for c in (k_cache, v_cache))


def cache_attention(
    q_BQAD: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    valid_len: jax.Array | int,
    scale: float,
    layer: jax.Array | int | None = None,
    impl: str | None = "auto",
    precision: lax.PrecisionLike = None,
    interpret: bool | None = None,
    config: CacheAttentionConfig | None = None,
) -> jax.Array:
    """Sampling attention: one scale's queries see cache entries ``[0, valid_len)``.

    ``k_cache``/``v_cache``: ``[B, K, A, D]``, or with ``layer`` (int, may be traced)
    the stacked caches of every block ``[X, B, K, A, D]``, of which block ``layer``
    is read (``pallas`` reads it in place; ``xla``/``cudnn`` slice it out).
    ``valid_len``: int scalar or ``[B]``; a Python int lets ``xla`` read just that
    prefix of the cache (and is the visible key count ``auto`` chooses by; otherwise
    the cache length). Forward only for ``pallas``. Returns ``[B, Q, A, D]`` in the
    input dtype.
    """
    layer_1 = check_cache_inputs(q_BQAD, k_cache, v_cache, layer)
    B, Q, A, D = q_BQAD.shape
    lm_axis = 1 if layer is None else 2
    if impl in (None, "auto"):
        visible = k_cache.shape[lm_axis]
        if isinstance(valid_len, int):
            visible = max(0, min(valid_len, visible))
        chosen = auto_impl("cache_attention", q_BQAD.dtype, Q, visible, D)
    else:
        chosen = resolve_impl(impl)
    if chosen == "pallas":
        kw = _pallas_kwargs("cache_attention", scale, config, precision, interpret)
        n_B = _ref.valid_len_1d(valid_len, B)
        cache_layout = "BLHD" if layer is None else "NBLHD"
        args = (q_BQAD, k_cache, v_cache, n_B)
        layouts = ("BLHD", cache_layout, cache_layout, "B")
        if layer is None:
            run = lambda q, kc, vc, n: pallas_cache_attention(q, kc, vc, n, **kw)  # noqa: E731
        else:
            args, layouts = args + (layer_1[0],), layouts + ("",)
            run = lambda q, kc, vc, n, li: pallas_cache_attention(q, kc, vc, n, layer=li, **kw)  # noqa: E731
        return _split_over_mesh(run, args, layouts, B, A)
    static_len = isinstance(valid_len, int) and 0 < valid_len < k_cache.shape[lm_axis]
    if layer is not None:
        n = valid_len if chosen == "xla" and static_len else k_cache.shape[lm_axis]
        k_cache, v_cache = _layer_caches(k_cache, v_cache, layer_1, n)
    elif chosen == "xla" and static_len:
        k_cache, v_cache = k_cache[:, :valid_len], v_cache[:, :valid_len]
    if chosen == "xla":
        run = lambda q: _ref.cache_attention_reference(
            q, k_cache, v_cache, valid_len, scale,
            matmul_dtype=q_BQAD.dtype, precision=precision,
        )
        chunk = _query_chunk(q_BQAD.shape, k_cache.shape[1])
        if chunk == Q:
            return run(q_BQAD)
        # bound the [B, A, Q, K] logits: queries in chunks (rows are independent)
        q_chunks = q_BQAD.reshape(B, Q // chunk, chunk, A, D).transpose(1, 0, 2, 3, 4)
        out = jax.lax.map(run, q_chunks)
        return out.transpose(1, 0, 2, 3, 4).reshape(B, Q, A, D)
    _cudnn_check(q_BQAD)
    n_B = jnp.clip(_ref.valid_len_1d(valid_len, B), 0, k_cache.shape[1])
    return jax.nn.dot_product_attention(
        q_BQAD, k_cache, v_cache, scale=scale,
        key_value_seq_lengths=n_B, implementation="cudnn",
    )
