"""Measured attention times per shape, and the rule ``attention_impl="auto"`` derives from them.

The data live beside this module in ``dispatch_table.json``: a list of measurement groups,
one per (GPU device kind, dtype), each naming the JAX version and command that produced it,
with entries ``{op, queries, keys, head_dim, heads, rows, ms: {impl: ms}}``:

- ``op = "cache_attention"`` (sampling): ``queries`` of one scale against ``keys`` visible
  cache entries (the stage's ``valid_len``);
- ``op = "level_attention"`` (training, forward+backward): ``queries = keys = L``, the
  sequence under the level mask.

**Rule** (``choose``): for a call ``(op, device kind, dtype, queries Q, visible keys K, head
dim D)`` take the entries of the same op, device kind, dtype and head dim; the nearest one is
the entry whose query-key pairs ``Q'*K'`` are closest to ``Q*K`` on a log scale (ties go to
the smaller measured shape); pick the implementation measured fastest there. cuDNN is never
picked for inputs other than bfloat16/float16 (it cannot run them). No entry for the call
(unknown device kind, unmeasured dtype or head dim, an op without data) -> ``None``, and the
caller falls back to its backend default. A pure function of static values: it runs at trace
time. The JAX version is recorded, not matched.

Regenerate the table on a GPU (replaces the group of that device kind and dtype)::

    python -m bench.attention_bench --write-table hart_jax/kernels/dispatch_table.json
    # only some sampling stages, no training pass measured:
    python -m bench.attention_bench --stages 0,9,11,12,13 --write-table hart_jax/kernels/dispatch_table.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
ABOUT = (
    "Attention times (ms) per shape, read by hart_jax/kernels/dispatch_table.py for attention_impl='auto'. "
    "Regenerate on a GPU: python -m bench.attention_bench --write-table hart_jax/kernels/dispatch_table.json"
)
OPS = ("cache_attention", "level_attention")
# dtypes cuDNN's fused attention accepts (``hart_jax.attention._cudnn_check``)
CUDNN_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured shape: the time (ms) of each implementation that ran."""

    op: str
    queries: int
    keys: int
    head_dim: int
    ms: tuple[tuple[str, float], ...]
    heads: int | None = None
    rows: int | None = None

    @property
    def pairs(self) -> int:
        """Query-key pairs per row and head (``queries * keys``)."""
        return self.queries * self.keys

    def fastest(self, dtype: str) -> str | None:
        """The implementation measured fastest here, cuDNN excluded unless ``dtype`` allows it."""
        usable = [(t, impl) for impl, t in self.ms if impl != "cudnn" or dtype in CUDNN_DTYPES]
        return min(usable)[1] if usable else None


@dataclasses.dataclass(frozen=True)
class Group:
    """The measurements of one device kind and dtype."""

    device_kind: str
    dtype: str
    jax: str
    entries: tuple[Entry, ...]
    command: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Choice:
    """``choose``'s answer: the implementation, the entry it came from, and its group."""

    impl: str
    entry: Entry
    group: Group


def _entry(d: Mapping[str, Any]) -> Entry:
    if d["op"] not in OPS:
        raise ValueError(f"dispatch table: op must be one of {OPS}, got {d['op']!r}")
    return Entry(
        op=d["op"], queries=int(d["queries"]), keys=int(d["keys"]), head_dim=int(d["head_dim"]),
        ms=tuple(sorted((str(k), float(v)) for k, v in d["ms"].items())),
        heads=d.get("heads"), rows=d.get("rows"),
    )


def parse_table(data: Mapping[str, Any]) -> tuple[Group, ...]:
    """Groups of a table's JSON object; one group per (device kind, dtype)."""
    groups = tuple(
        Group(device_kind=g["device_kind"], dtype=g["dtype"], jax=g["jax"],
              entries=tuple(_entry(e) for e in g["entries"]),
              command=g.get("command", ""), note=g.get("note", ""))
        for g in data["measurements"]
    )
    keys = [(g.device_kind, g.dtype) for g in groups]
    if len(set(keys)) != len(keys):
        raise ValueError(f"dispatch table: more than one group for a (device kind, dtype): {keys}")
    return groups


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE_PATH) -> tuple[Group, ...]:
    """The table at ``path`` (default: the one shipped beside this module), parsed once."""
    return parse_table(json.loads(Path(path).read_text()))


def find_group(groups: Sequence[Group], device_kind: str, dtype: str) -> Group | None:
    """The group measured on ``device_kind`` in ``dtype``, or None."""
    return next((g for g in groups if g.device_kind == device_kind and g.dtype == dtype), None)


def _candidates(group: Group, op: str, head_dim: int) -> list[Entry]:
    """Entries of ``op`` at ``head_dim`` with a usable time, smallest shape first."""
    out = [e for e in group.entries if e.op == op and e.head_dim == head_dim and e.fastest(group.dtype)]
    return sorted(out, key=lambda e: (e.pairs, e.queries))


def choose(
    op: str, device_kind: str, dtype: str, queries: int, keys: int, head_dim: int,
    groups: Sequence[Group] | None = None,
) -> Choice | None:
    """The implementation measured fastest at the nearest measured shape (module docstring),
    or None when nothing was measured for this op, device kind, dtype and head dim."""
    group = find_group(load_table() if groups is None else groups, device_kind, dtype)
    cands = [] if group is None else _candidates(group, op, head_dim)
    if not cands:
        return None
    target = math.log(max(1, queries) * max(1, keys))
    entry = min(cands, key=lambda e: (abs(math.log(e.pairs) - target), e.pairs))
    return Choice(impl=entry.fastest(dtype), entry=entry, group=group)


def describe_rule(
    op: str, device_kind: str, dtype: str, head_dim: int, groups: Sequence[Group] | None = None
) -> str | None:
    """The rule ``choose`` applies for one op, device kind, dtype and head dim, in words
    (e.g. ``pallas up to 7.5e+06 query-key pairs, cudnn above``), or None without data."""
    group = find_group(load_table() if groups is None else groups, device_kind, dtype)
    cands = [] if group is None else _candidates(group, op, head_dim)
    if not cands:
        return None
    parts: list[str] = []
    for i, e in enumerate(cands):
        impl = e.fastest(dtype)
        nxt = cands[i + 1] if i + 1 < len(cands) else None
        if nxt is not None and nxt.fastest(dtype) == impl:
            continue
        lead = "" if not parts else "then "
        if nxt is None:
            parts.append(f"{lead}{impl} above" if parts else f"{impl} at every shape")
        else:
            parts.append(f"{lead}{impl} up to {math.sqrt(e.pairs * nxt.pairs):.2g} query-key pairs")
    shapes = ", ".join(f"{e.queries}x{e.keys}" for e in cands)
    return f"{', '.join(parts)} (nearest of the measured Q x K {shapes}, D={head_dim})"


# ----------------------------------------------------------------------------- writing


def group_from_bench(result: Mapping[str, Any]) -> dict[str, Any]:
    """A table group (JSON object) from ``bench/attention_bench.py``'s result: sampling
    stages as ``cache_attention`` entries, the training forward+backward as ``level_attention``;
    implementations that failed are left out of an entry's times."""
    shape = result["shape"]
    entries: list[dict[str, Any]] = []

    def add(op: str, q: int, k: int, rows: int, r: Mapping[str, Any]) -> None:
        if "ms" not in r:
            return
        for e in entries:
            if (e["op"], e["queries"], e["keys"], e["rows"]) == (op, q, k, rows):
                e["ms"][r["impl"]] = round(r["ms"], 4)
                return
        entries.append({"op": op, "queries": q, "keys": k, "head_dim": shape["head_dim"],
                        "heads": shape["heads"], "rows": rows, "ms": {r["impl"]: round(r["ms"], 4)}})

    for r in result.get("sampling", []):
        add("cache_attention", r["queries"], r["valid"], r["B"], r)
    for r in result.get("training", []):
        if r["pass"] == "fwd+bwd":
            add("level_attention", r["L"], r["L"], r["B"], r)
    return {
        "device_kind": result["device"], "jax": result["jax"], "dtype": result["dtype"],
        "command": result.get("command", "python -m bench.attention_bench"),
        "note": f"{result.get('cache_layout', 'stacked')} caches; shape {json.dumps(shape)}",
        "entries": entries,
    }


def merge_group(data: Mapping[str, Any] | None, group: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a table's JSON object, or None for a new table) with ``group`` replacing any
    group of the same device kind and dtype; groups ordered by device kind, then dtype."""
    about = (data or {}).get("about", ABOUT)
    kept = [g for g in (data or {}).get("measurements", [])
            if (g["device_kind"], g["dtype"]) != (group["device_kind"], group["dtype"])]
    merged = sorted(kept + [dict(group)], key=lambda g: (g["device_kind"], g["dtype"]))
    out = {"about": about, "measurements": merged}
    parse_table(out)  # refuse to write what the reader would not take
    return out


def dumps(data: Mapping[str, Any]) -> str:
    """The table's JSON text: one line per entry."""
    lines = ["{", f' "about": {json.dumps(data["about"])},', ' "measurements": [']
    for gi, g in enumerate(data["measurements"]):
        lines.append("  {")
        for key in ("device_kind", "jax", "dtype", "command", "note"):
            if key in g:
                lines.append(f"   {json.dumps(key)}: {json.dumps(g[key])},")
        lines.append('   "entries": [')
        lines += [f"    {json.dumps(e)}" + ("," if i + 1 < len(g["entries"]) else "")
                  for i, e in enumerate(g["entries"])]
        lines.append("   ]")
        lines.append("  }" + ("," if gi + 1 < len(data["measurements"]) else ""))
    lines += [" ]", "}", ""]
    return "\n".join(lines)


def write_table(path: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a bench result's group into the table at ``path`` (created if missing); returns it."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else None
    out = merge_group(data, group_from_bench(result))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(out))
    load_table.cache_clear()
    return out
