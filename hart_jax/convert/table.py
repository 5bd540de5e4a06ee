"""Table-driven conversion of PyTorch state dicts to Flax parameter trees.

A converter is a list of ``Rule``s: a PyTorch key pattern (``{name}`` placeholders
match integers), a Flax path template (``/``-separated, same placeholders) and a
named transform. ``apply_table`` runs the table over a state dict, checks the
result against the model's expected parameter shapes (from ``jax.eval_shape`` of
its ``init``) and reports every unexpected, missing and mis-shaped key at once.

Transforms are written with array methods only (``.T``, ``.transpose``,
``.reshape``) so they run on numpy arrays and, for shape-only checks of full-size
manifests, under ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from hart_jax.errors import ConversionError

Transform = Callable[[Any], Any]


# ----------------------------------------------------------------- transforms
def identity(x):
    """Unchanged (biases, norm scales, embedding tables)."""
    return x


def linear(x):
    """torch Linear ``[out, in]`` -> Flax Dense kernel ``[in, out]``."""
    return x.T


def conv2d(x):
    """torch Conv2d OIHW -> Flax Conv HWIO."""
    return x.transpose(2, 3, 1, 0)


TRANSFORMS: dict[str, Transform] = {"identity": identity, "linear": linear, "conv2d": conv2d}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``torch`` key pattern -> ``flax`` path template through ``transform``."""

    torch: str
    flax: str
    transform: Transform = identity

    def regex(self) -> re.Pattern[str]:
        pat = re.escape(self.torch)
        pat = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pat)
        return re.compile(pat + r"\Z")


def conv_rules(torch_prefix: str, flax_prefix: str) -> list[Rule]:
    """weight/bias rules of one Conv2d."""
    return [
        Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", conv2d),
        Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"),
    ]


def dense_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """weight(/bias) rules of one Linear."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", linear)]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


def norm_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[Rule]:
    """weight(/bias) rules of a LayerNorm/GroupNorm/RMSNorm (``weight`` -> ``scale``)."""
    rules = [Rule(f"{torch_prefix}.weight", f"{flax_prefix}/scale")]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{flax_prefix}/bias"))
    return rules


# ----------------------------------------------------------------- tree utils
def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, path))
        else:
            out[path] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


# --------------------------------------------------------------------- apply
def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def apply_table(
    state: Mapping[str, Any],
    rules: Sequence[Rule],
    expected: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    shapes_only: bool = False,
    strip_prefixes: Sequence[str] = (),
) -> dict[str, Any]:
    """Convert ``state`` (torch key -> array) into a nested Flax param dict.

    ``expected`` is the model's parameter tree (arrays or ``ShapeDtypeStruct``),
    without the ``"params"`` collection level. ``ignore`` holds regexes of keys to
    drop (buffers, discriminator); both rules and ``ignore`` see keys with the first
    matching ``strip_prefixes`` entry removed, while reports name the original key.
    With ``shapes_only`` the values of ``state`` are
    ``ShapeDtypeStruct``s and the result holds shapes. Raises ``ConversionError``
    listing every unexpected, missing and mis-shaped key.
    """
    compiled = [(r, r.regex()) for r in rules]
    ignore_re = [re.compile(p) for p in ignore]
    exp_flat = {k: _shape_of(v) for k, v in flatten_params(expected).items()}

    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    bad_shape_paths: set[str] = set()
    duplicate: list[str] = []
    for key, value in state.items():
        bare = next((key[len(p):] for p in strip_prefixes if key.startswith(p)), key)
        if any(p.match(bare) for p in ignore_re):
            continue
        for rule, rx in compiled:
            m = rx.match(bare)
            if m:
                break
        else:
            unexpected.append(f"{key} {list(_shape_of(value))}")
            continue
        path = rule.flax.format(**m.groupdict())
        if path not in exp_flat:
            unexpected.append(f"{key} {list(_shape_of(value))} (maps to {path}, which the model does not have)")
            continue
        if shapes_only:
            new = jax.eval_shape(rule.transform, value)
        else:
            new = np.asarray(rule.transform(np.asarray(value)))
        if _shape_of(new) != exp_flat[path]:
            bad_shape.append(
                f"{key}: {list(_shape_of(value))} -> {path} {list(_shape_of(new))}, "
                f"model expects {list(exp_flat[path])}"
            )
            bad_shape_paths.add(path)
            continue
        if path in out:
            duplicate.append(f"{key} and {origin[path]} both map to {path}")
            continue
        out[path] = new
        origin[path] = key

    missing = [
        f"{p} {list(s)}" for p, s in exp_flat.items() if p not in out and p not in bad_shape_paths
    ]
    problems = []
    if missing:
        problems.append(("missing (model parameter with no source key)", missing))
    if unexpected:
        problems.append(("unexpected (source key with no model parameter)", unexpected))
    if bad_shape:
        problems.append(("wrong shape", bad_shape))
    if duplicate:
        problems.append(("duplicate", duplicate))
    if problems:
        raise ConversionError.from_report(source, problems)
    return unflatten_params(out)


def expected_params(init_fn: Callable[[], Any]) -> dict[str, Any]:
    """The ``"params"`` collection of ``init_fn()`` as ShapeDtypeStructs (no FLOPs)."""
    variables = jax.eval_shape(init_fn)
    return dict(variables["params"])
