"""Tile sizes and Triton launch parameters of the Pallas kernels, per GPU generation.

The data live beside this module in ``tile_table.json``: one row per device class (``sm80``:
A100; ``sm90``: H100, H200), naming the device kinds it covers (prefixes of
``jax.Device.device_kind``, e.g. ``"NVIDIA H100"`` matches ``"NVIDIA H100 80GB HBM3"``) and,
for each kernel, ``{block_q, block_k, num_warps, num_stages, measured}``:

- ``level_fwd``: the training forward kernel;
- ``level_dkv``: the backward kernel that accumulates dk and dv (one program per key block);
- ``level_dq``: the backward kernel that accumulates dq (one program per query block);
- ``cache``: the sampling kernel over the KV cache, stages with fewer than ``LONG_QUERIES``
  queries;
- ``cache_long``: the same kernel at the long stages (optional in a row: absent, ``cache``'s).

``measured`` is ``"not yet measured"`` or ``{command, gpu, jax, date}`` (where the sweep of
``bench/attention_bench.py`` produced the values). ``hart_jax.attention`` reads the row of the
target GPU when the caller names no config; a device kind no row covers, a CPU, and the
interpreter get the dataclass defaults. Regenerate a row on a GPU::

    python -m bench.attention_bench --impls pallas --sweep --sweep-budget-s 900 \\
        --write-tiles hart_jax/kernels/tile_table.json
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from hart_jax.kernels.cache_attention import CacheAttentionConfig
from hart_jax.kernels.level_attention import LevelAttentionConfig

TABLE_PATH = Path(__file__).with_name("tile_table.json")
ABOUT = (
    "Pallas kernel tiles per GPU class, read by hart_jax/kernels/tile_table.py. Regenerate a row on a GPU: "
    "python -m bench.attention_bench --impls pallas --sweep --write-tiles hart_jax/kernels/tile_table.json"
)
NOT_MEASURED = "not yet measured"
KERNELS = ("level_fwd", "level_dkv", "level_dq", "cache", "cache_long")
REQUIRED_KERNELS = KERNELS[:4]  # a row may leave out cache_long
TILE_KEYS = ("block_q", "block_k", "num_warps", "num_stages")
# LevelAttentionConfig's fields of each training kernel, in TILE_KEYS order
LEVEL_FIELDS = {
    "level_fwd": ("block_q", "block_k", "num_warps", "num_stages"),
    "level_dkv": ("block_q_bwd", "block_k_bwd", "num_warps_bwd", "num_stages_bwd"),
    "level_dq": ("block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq"),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One device class: the device kinds it covers and each kernel's tiles."""

    device_class: str
    device_kinds: tuple[str, ...]
    tiles: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    measured: tuple[tuple[str, str], ...]

    def kernel(self, name: str) -> dict[str, int]:
        """``{block_q, block_k, num_warps, num_stages}`` of kernel ``name``."""
        return dict(dict(self.tiles)[name])

    def cache_config(self) -> CacheAttentionConfig:
        """The sampling kernel's config of this row (``cache_long`` absent: ``cache``'s tiles)."""
        tiles = dict(self.tiles)
        return cache_config(dict(tiles["cache"]), dict(tiles["cache_long"]) if "cache_long" in tiles else None)

    def covers(self, device_kind: str) -> bool:
        """Whether ``device_kind`` starts with one of this row's device kinds."""
        return any(device_kind.startswith(k) for k in self.device_kinds)


def level_config(
    tiles: Mapping[str, Mapping[str, int]], base: LevelAttentionConfig | None = None
) -> LevelAttentionConfig:
    """``base`` (default: the dataclass defaults) with the training kernels of ``tiles`` set
    (``{"level_fwd": {block_q, ...}, "level_dkv": ..., "level_dq": ...}``; absent ones kept)."""
    changes = {field: int(tiles[name][key])
               for name, fields in LEVEL_FIELDS.items() if name in tiles
               for key, field in zip(TILE_KEYS, fields)}
    return dataclasses.replace(base or LevelAttentionConfig(), **changes)


def cache_config(tiles: Mapping[str, int], long: Mapping[str, int] | None = None) -> CacheAttentionConfig:
    """The sampling kernel's config from ``{block_q, block_k, num_warps, num_stages}`` (its
    short stages) and ``long`` (its long stages; None: the same as the short ones)."""
    short = {key: int(tiles[key]) for key in TILE_KEYS}
    if long is None:
        return CacheAttentionConfig(**short, **{f"{key}_long": None for key in TILE_KEYS})
    return CacheAttentionConfig(**short, **{f"{key}_long": int(long[key]) for key in TILE_KEYS})


def cache_tiles(cfg: CacheAttentionConfig) -> dict[str, dict[str, int]]:
    """``{"cache": ..., "cache_long": ...}`` tiles of a sampling-kernel config (long resolved)."""
    return {"cache": {key: getattr(cfg, key) for key in TILE_KEYS},
            "cache_long": dict(zip(TILE_KEYS, cfg.long_tiles()))}


def level_tiles(cfg: LevelAttentionConfig) -> dict[str, dict[str, int]]:
    """The training kernels' ``{block_q, block_k, num_warps, num_stages}`` in ``cfg`` (dq resolved)."""
    out = {name: {key: getattr(cfg, field) for key, field in zip(TILE_KEYS, fields)}
           for name, fields in LEVEL_FIELDS.items() if name != "level_dq"}
    out["level_dq"] = dict(zip(TILE_KEYS, cfg.dq_tiles()))
    return out


def default_tiles() -> dict[str, dict[str, int]]:
    """Each kernel's tiles under the config dataclasses' defaults."""
    return {**level_tiles(LevelAttentionConfig()), **cache_tiles(CacheAttentionConfig())}


def _row(d: Mapping[str, Any]) -> Row:
    kernels = d["kernels"]
    if not set(REQUIRED_KERNELS) <= set(kernels) <= set(KERNELS):
        raise ValueError(f"tile table: row {d['class']!r} must list the kernels {REQUIRED_KERNELS} "
                         f"(and may list cache_long), got {sorted(kernels)}")
    tiles, measured = [], []
    for name in (n for n in KERNELS if n in kernels):
        k = kernels[name]
        if set(k) != set(TILE_KEYS) | {"measured"}:
            raise ValueError(f"tile table: {d['class']}/{name} must have {TILE_KEYS} and 'measured', got {sorted(k)}")
        tiles.append((name, tuple((key, int(k[key])) for key in TILE_KEYS)))
        m = k["measured"]
        if m != NOT_MEASURED and not (isinstance(m, dict) and {"command", "gpu", "jax", "date"} <= set(m)):
            raise ValueError(f"tile table: {d['class']}/{name}.measured must be {NOT_MEASURED!r} or "
                             f"{{command, gpu, jax, date}}, got {m!r}")
        measured.append((name, m if isinstance(m, str) else json.dumps(m, sort_keys=True)))
    row = Row(str(d["class"]), tuple(d["device_kinds"]), tuple(tiles), tuple(measured))
    level_config(dict((n, dict(t)) for n, t in row.tiles))  # refuse tiles the kernels refuse
    row.cache_config()
    return row


def parse_table(data: Mapping[str, Any]) -> tuple[Row, ...]:
    """The rows of a table's JSON object; no device kind prefix may be in two rows."""
    rows = tuple(_row(d) for d in data["devices"])
    kinds = [k for r in rows for k in r.device_kinds]
    if len(set(kinds)) != len(kinds) or len({r.device_class for r in rows}) != len(rows):
        raise ValueError(f"tile table: a device class or device kind is listed twice: {kinds}")
    return rows


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE_PATH) -> tuple[Row, ...]:
    """The table at ``path`` (default: the one shipped beside this module), parsed once."""
    return parse_table(json.loads(Path(path).read_text()))


def find_row(device_kind: str, rows: Sequence[Row] | None = None) -> Row | None:
    """The row covering ``device_kind`` (the longest matching prefix wins), or None."""
    hits = [(max(len(k) for k in r.device_kinds if device_kind.startswith(k)), r)
            for r in (load_table() if rows is None else rows) if r.covers(device_kind)]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def configs_for(
    device_kind: str, platform: str, rows: Sequence[Row] | None = None
) -> tuple[LevelAttentionConfig, CacheAttentionConfig, Row | None]:
    """The kernels' configs for a device: its row's on a GPU, else (no row, not a GPU) the
    dataclass defaults; and the row used (None: defaults)."""
    row = find_row(device_kind, rows) if platform in ("gpu", "cuda") else None
    if row is None:
        return LevelAttentionConfig(), CacheAttentionConfig(), None
    return level_config({n: dict(t) for n, t in row.tiles}), row.cache_config(), row


# ----------------------------------------------------------------------------- writing


def winners(sweep: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, int]]:
    """The fastest timed point of each kernel in a sweep result (``bench/attention_bench.py``:
    rows fastest first); kernels with no timed point are left out."""
    out = {}
    for name in KERNELS:
        timed = [r for r in sweep.get(name, []) if "ms" in r]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            out[name] = {key: int(best[key]) for key in TILE_KEYS}
    return out


def merge_tiles(
    data: Mapping[str, Any] | None, device_kind: str, tiles: Mapping[str, Mapping[str, int]],
    measured: Mapping[str, str],
) -> dict[str, Any]:
    """``data`` (a table's JSON object, or None for a new table) with the kernels in ``tiles``
    replaced in the row covering ``device_kind`` (a new row named after it when none does;
    its other kernels get the defaults, not measured), each recording ``measured``."""
    rows = [json.loads(json.dumps(r)) for r in (data or {}).get("devices", [])]
    row = next((r for r in rows if any(device_kind.startswith(k) for k in r["device_kinds"])), None)
    if row is None:
        row = {"class": device_kind, "device_kinds": [device_kind],
               "kernels": {n: {**t, "measured": NOT_MEASURED} for n, t in default_tiles().items()}}
        rows.append(row)
    for name, t in tiles.items():
        row["kernels"][name] = {**{key: int(t[key]) for key in TILE_KEYS}, "measured": dict(measured)}
    out = {"about": (data or {}).get("about", ABOUT), "devices": rows}
    parse_table(out)  # refuse to write what the reader would not take
    return out


def dumps(data: Mapping[str, Any]) -> str:
    """The table's JSON text: one line per kernel."""
    lines = ["{", f' "about": {json.dumps(data["about"])},', ' "devices": [']
    for ri, r in enumerate(data["devices"]):
        lines += ["  {", f'   "class": {json.dumps(r["class"])},',
                  f'   "device_kinds": {json.dumps(r["device_kinds"])},', '   "kernels": {']
        names = [n for n in KERNELS if n in r["kernels"]]
        lines += [f"    {json.dumps(n)}: {json.dumps(r['kernels'][n])}" + ("," if i + 1 < len(names) else "")
                  for i, n in enumerate(names)]
        lines += ["   }", "  }" + ("," if ri + 1 < len(data["devices"]) else "")]
    lines += [" ]", "}", ""]
    return "\n".join(lines)


def write_tiles(path: Path, result: Mapping[str, Any], date: str | None = None) -> dict[str, Any]:
    """Merge a bench result's sweep winners into the tile table at ``path`` (created if missing)
    for the result's device kind, recording its command, GPU, JAX version and ``date`` (default:
    today, UTC); returns the table."""
    path = Path(path)
    measured = {"command": result.get("command", "python -m bench.attention_bench --sweep"),
                "gpu": result["device"], "jax": result["jax"],
                "date": date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    if result.get("smoke"):
        measured["note"] = "smoke run (tiny shapes, Pallas interpreted): not a measurement"
    data = json.loads(path.read_text()) if path.exists() else None
    out = merge_tiles(data, result["device"], winners(result.get("sweep", {})), measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(out))
    load_table.cache_clear()
    return out
