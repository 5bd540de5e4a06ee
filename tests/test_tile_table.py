"""The Pallas kernels' tile table (``hart_jax.kernels.tile_table``): device kind -> row, the
dispatcher's choice (explicit config first, logged once), the writer, the bench's sweep.

The target GPU is named the way a cross-lowering names it (an abstract mesh with an abstract
device), so every check runs on a CPU; tables other than the shipped one are patched in or
written to temporary files.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hart_jax import attention as attn
from hart_jax.kernels import tile_table as tt
from hart_jax.kernels.cache_attention import CacheAttentionConfig
from hart_jax.kernels.level_attention import LevelAttentionConfig
from test_kernels import TARGETS, _lower_cuda, _target_gpu, triton_launches

A100, H100 = TARGETS["A100"][0], TARGETS["H100"][0]

# Distinct tiles per class, so a test can tell which row reached the kernels; sm80 leaves out
# cache_long (the long sampling stages then take its cache tiles).
PATCHED = {
    "devices": [
        {"class": "sm80", "device_kinds": ["NVIDIA A100"], "kernels": {
            "level_fwd": {"block_q": 64, "block_k": 128, "num_warps": 8, "num_stages": 3},
            "level_dkv": {"block_q": 32, "block_k": 128, "num_warps": 8, "num_stages": 4},
            "level_dq": {"block_q": 128, "block_k": 32, "num_warps": 4, "num_stages": 5},
            "cache": {"block_q": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}}},
        {"class": "sm90", "device_kinds": ["NVIDIA H100", "NVIDIA H200"], "kernels": {
            "level_fwd": {"block_q": 256, "block_k": 64, "num_warps": 8, "num_stages": 2},
            "level_dkv": {"block_q": 64, "block_k": 256, "num_warps": 8, "num_stages": 2},
            "level_dq": {"block_q": 256, "block_k": 64, "num_warps": 8, "num_stages": 2},
            "cache": {"block_q": 64, "block_k": 32, "num_warps": 4, "num_stages": 4},
            "cache_long": {"block_q": 256, "block_k": 128, "num_warps": 8, "num_stages": 3}}},
    ]
}
for _row in PATCHED["devices"]:
    for _k in _row["kernels"].values():
        _k["measured"] = tt.NOT_MEASURED


@pytest.fixture(autouse=True)
def fresh_log():
    """Every test sees its own first log lines (choices are logged once per process)."""
    attn._logged.clear()
    yield
    attn._logged.clear()


@pytest.fixture
def patched_table(monkeypatch: pytest.MonkeyPatch) -> tuple[tt.Row, ...]:
    rows = tt.parse_table(PATCHED)
    monkeypatch.setattr(tt, "load_table", lambda path=tt.TABLE_PATH: rows)
    return rows


def test_shipped_table_covers_a100_h100_h200_with_valid_rows():
    rows = tt.load_table()
    assert {r.device_class for r in rows} >= {"sm80", "sm90"}
    for r in rows:
        for name in tt.KERNELS:
            m = dict(r.measured)[name]
            assert m == tt.NOT_MEASURED or {"command", "gpu", "jax", "date"} <= set(json.loads(m)), (r, name)


@pytest.mark.parametrize("kind, device_class", [
    ("NVIDIA A100-SXM4-80GB", "sm80"), ("NVIDIA A100 80GB PCIe", "sm80"), ("NVIDIA A100-SXM4-40GB", "sm80"),
    ("NVIDIA H100 80GB HBM3", "sm90"), ("NVIDIA H100 PCIe", "sm90"), ("NVIDIA H200", "sm90"),
    ("NVIDIA Imaginary X1", None), ("NVIDIA GH200 480GB", None), ("cpu", None),
])
def test_device_kind_to_row(kind, device_class, patched_table):
    row = tt.find_row(kind)
    assert (row and row.device_class) == device_class
    level, cache, used = tt.configs_for(kind, "gpu")
    if device_class is None:  # unknown device: the dataclass defaults
        assert (level, cache, used) == (LevelAttentionConfig(), CacheAttentionConfig(), None)
    else:
        want = next(d for d in PATCHED["devices"] if d["class"] == device_class)["kernels"]
        assert tt.level_tiles(level) == {n: {k: want[n][k] for k in tt.TILE_KEYS} for n in tt.LEVEL_FIELDS}
        tiles = lambda n: {k: want[n][k] for k in tt.TILE_KEYS}  # noqa: E731
        assert tt.cache_tiles(cache) == {"cache": tiles("cache"),
                                         "cache_long": tiles("cache_long" if "cache_long" in want else "cache")}
        assert cache.tiles_for(cache.long_queries) == tuple(tt.cache_tiles(cache)["cache_long"].values())
        assert cache.tiles_for(cache.long_queries - 1) == tuple(tiles("cache").values())
    # a CPU (or the interpreter) gets the defaults whatever the device kind
    assert tt.configs_for(kind, "cpu") == (LevelAttentionConfig(), CacheAttentionConfig(), None)


def test_dispatcher_takes_the_target_gpus_row_and_logs_it_once(patched_table, caplog):
    with caplog.at_level(logging.INFO, logger="hart_jax.attention"):
        assert attn.target_device() == ("cpu", "cpu")  # no target named: this machine
        assert attn.pallas_config("level_attention", False) == LevelAttentionConfig()
        for target in ("A100", "H100"):
            level, cache, _ = tt.configs_for(TARGETS[target][0], "gpu")
            with _target_gpu(target):
                assert attn.target_device() == ("gpu", TARGETS[target][0])
                for _ in range(2):
                    assert attn.pallas_config("level_attention", False) == level
                    assert attn.pallas_config("cache_attention", False) == cache
                # interpreted kernels keep the defaults
                assert attn.pallas_config("level_attention", True) == LevelAttentionConfig()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 + 2 * 3, msgs  # one line per distinct choice
    assert msgs[0] == "pallas level_attention tiles: defaults (cpu, cpu, no tile table row)"
    assert msgs[1].startswith(f"pallas level_attention tiles for {A100} (tile table row sm80): level_fwd ")
    assert "(not yet measured)" in msgs[1] and "level_dq" in msgs[1]
    assert msgs[2].startswith(f"pallas cache_attention tiles for {A100} (tile table row sm80): cache ")
    assert msgs[3] == f"pallas level_attention tiles: defaults ({A100}, gpu, interpreted)"
    assert msgs[4].startswith(f"pallas level_attention tiles for {H100} (tile table row sm90)")


def _grad_launches(target: str, config: LevelAttentionConfig | None) -> list[dict]:
    L = 300
    lev = np.repeat(np.arange(3, dtype=np.int32), 100)
    x = jax.ShapeDtypeStruct((1, L, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        o = attn.attention(q, k, v, q_levels=lev, k_levels=lev, scale=0.1, impl="pallas", interpret=False,
                           config=config)
        return o.astype(jnp.float32).sum()

    return triton_launches(_lower_cuda(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, target=target))


def test_lowered_kernels_take_the_row_and_an_explicit_config_wins(patched_table):
    """Small shape (blocks up to 256 are not shrunk): with no config each kernel launches with
    the target's row (A100 and H100 differ here); an explicit config wins over the table."""
    for target in ("A100", "H100"):
        want = next(d for d in PATCHED["devices"] if TARGETS[target][0].startswith(tuple(d["device_kinds"])))
        got = _grad_launches(target, None)
        assert [c["name"] for c in got] == ["hart_level_attention_fwd", "hart_level_attention_dkv",
                                            "hart_level_attention_dq"]
        for call, name in zip(got, ("level_fwd", "level_dkv", "level_dq")):
            tiles = {k: want["kernels"][name][k] for k in tt.TILE_KEYS}
            assert call["tiles"] == tiles and (call["num_warps"], call["num_stages"]) == (
                tiles["num_warps"], tiles["num_stages"]), (target, call)
    explicit = LevelAttentionConfig(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=32, num_warps=2)
    got = _grad_launches("A100", explicit)
    assert [c["tiles"] for c in got] == [
        {"block_q": 32, "block_k": 32, "num_warps": 2, "num_stages": 2},
        {"block_q": 16, "block_k": 32, "num_warps": 4, "num_stages": 2},
        {"block_q": 16, "block_k": 32, "num_warps": 4, "num_stages": 2},  # dq: the *_bwd values
    ]
    q = jax.ShapeDtypeStruct((2, 64, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    for config, want in ((None, {"block_q": 64, "block_k": 128, "num_warps": 8, "num_stages": 3}),
                         (CacheAttentionConfig(block_q=16, block_k=32), {"block_q": 16, "block_k": 32,
                                                                         "num_warps": 4, "num_stages": 2})):
        f = lambda q, k, v, config=config: attn.cache_attention(  # noqa: E731
            q, k, v, valid_len=100, scale=0.1, impl="pallas", interpret=False, config=config)
        # block_q 128 of the A100 row is shrunk to the 64 queries
        assert [c["tiles"] for c in triton_launches(_lower_cuda(f, q, kv, kv, target="A100"))] == [want]


def _sweep_result(device: str) -> dict:
    rows = lambda best, other: [{**best, "ms": 1.0}, {**other, "ms": 2.0}, {**other, "error": "boom"}]  # noqa: E731
    t = lambda bq, bk, w, st: {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": st}  # noqa: E731
    return {
        "device": device, "jax": "0.11.2", "command": "python -m bench.attention_bench --sweep",
        "sweep": {
            "level_fwd": rows(t(128, 128, 8, 3), t(64, 64, 4, 2)),
            "level_dkv": rows(t(64, 128, 8, 4), t(64, 64, 4, 2)),
            "level_dq": [{**t(128, 64, 4, 2), "error": "boom"}],  # nothing timed: the row keeps its own
            "cache": rows(t(128, 64, 4, 5), t(64, 64, 4, 2)),
        },
    }


def test_write_tiles_round_trips(tmp_path):
    path = tmp_path / "tiles.json"
    path.write_text(tt.TABLE_PATH.read_text())
    before = tt.load_table(path)
    out = tt.write_tiles(path, _sweep_result("NVIDIA H200"), date="2026-12-03")
    rows = tt.load_table(path)
    assert tt.parse_table(out) == rows
    sm90 = tt.find_row("NVIDIA H100 80GB HBM3", rows)  # the H200's class
    assert sm90.kernel("level_fwd") == {"block_q": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
    assert sm90.kernel("level_dkv") == {"block_q": 64, "block_k": 128, "num_warps": 8, "num_stages": 4}
    assert sm90.kernel("cache") == {"block_q": 128, "block_k": 64, "num_warps": 4, "num_stages": 5}
    old90 = tt.find_row("NVIDIA H200", before)
    assert sm90.kernel("level_dq") == old90.kernel("level_dq")
    assert dict(sm90.measured)["level_dq"] == dict(old90.measured)["level_dq"]
    assert json.loads(dict(sm90.measured)["cache"]) == {
        "command": "python -m bench.attention_bench --sweep", "gpu": "NVIDIA H200", "jax": "0.11.2",
        "date": "2026-12-03"}
    assert tt.find_row(A100, rows) == tt.find_row(A100, before)  # other classes untouched
    level, _, _ = tt.configs_for("NVIDIA H200", "gpu", rows)
    assert (level.block_q, level.block_k, level.num_warps, level.num_stages) == (128, 128, 8, 3)


def test_write_tiles_new_device_and_new_file(tmp_path):
    path = tmp_path / "sub" / "tiles.json"
    tt.write_tiles(path, _sweep_result("NVIDIA L40S"), date="2026-12-03")
    (row,) = tt.load_table(path)
    assert (row.device_class, row.device_kinds) == ("NVIDIA L40S", ("NVIDIA L40S",))
    assert row.kernel("level_dq") == tt.default_tiles()["level_dq"]
    assert dict(row.measured)["level_dq"] == tt.NOT_MEASURED
    assert row.kernel("level_fwd")["block_k"] == 128
    bad = _sweep_result("NVIDIA L40S")
    bad["sweep"]["cache"][0]["block_k"] = 256  # the cache's block_k must divide CACHE_ALIGN
    with pytest.raises(ValueError, match="block_k must divide"):
        tt.write_tiles(path, bad)


def test_parse_rejects_bad_tables():
    good = json.loads(json.dumps(PATCHED))
    missing = json.loads(json.dumps(good))
    del missing["devices"][0]["kernels"]["level_dq"]
    with pytest.raises(ValueError, match="must list the kernels"):
        tt.parse_table(missing)
    twice = json.loads(json.dumps(good))
    twice["devices"][1]["device_kinds"].append("NVIDIA A100")
    with pytest.raises(ValueError, match="listed twice"):
        tt.parse_table(twice)
    odd = json.loads(json.dumps(good))
    odd["devices"][0]["kernels"]["level_fwd"]["block_q"] = 96
    with pytest.raises(ValueError, match="power of two"):
        tt.parse_table(odd)
    unmeasured = json.loads(json.dumps(good))
    unmeasured["devices"][0]["kernels"]["cache"]["measured"] = {"gpu": "x"}
    with pytest.raises(ValueError, match="measured"):
        tt.parse_table(unmeasured)


def test_sweep_smoke_writes_the_tile_table(tmp_path):
    """``--sweep --smoke --write-tiles``: on CPU (interpreted) every kernel's smoke points are
    timed, the tiles in use first (the cache kernel's short tiles on stage 2, 9 queries, its
    long ones on stage 4, 36 queries), and the winners land in a new row for this device kind."""
    from bench import attention_bench

    tiles = tmp_path / "tiles.json"
    argv = ["--smoke", "--impls", "pallas", "--no-sampling", "--stages", "2,4", "--sweep", "--sweep-budget-s", "1e9",
            "--out", str(tmp_path / "bench.json"), "--write-tiles", str(tiles)]
    result = attention_bench.main(argv)
    defaults = tt.default_tiles()
    for name in tt.KERNELS:
        rows = result["sweep"][name]
        want, invalid = attention_bench.sweep_points(name, True, defaults[name])
        assert sorted(repr({k: r[k] for k in tt.TILE_KEYS}) for r in rows) == sorted(map(repr, want)), name
        times = [r["ms"] for r in rows]
        assert times == sorted(times) and times[0] > 0, (name, rows)
        assert result["sweep_skipped"][name] == {"invalid": invalid, "budget": 0}
    (row,) = tt.load_table(tiles)
    assert row.device_kinds == (jax.devices()[0].device_kind,)
    for name, best in tt.winners(result["sweep"]).items():
        assert row.kernel(name) == best
        m = json.loads(dict(row.measured)[name])
        assert m["jax"] == jax.__version__ and "--write-tiles" in m["command"] and "smoke" in m["note"]


def test_sweep_points_skip_invalid_combinations():
    from bench import attention_bench

    grid = attention_bench.sweep_grid(smoke=False)
    assert len(grid) == 3 * 3 * 2 * 4
    base = tt.default_tiles()
    points, invalid = attention_bench.sweep_points("cache", False, base["cache"])
    assert points[0] == base["cache"] and all(p["block_k"] <= 128 for p in points)
    assert invalid == 3 * 2 * 4  # cache block_k 256 does not divide CACHE_ALIGN
    points, invalid = attention_bench.sweep_points("level_fwd", False, base["level_fwd"])
    assert invalid == 0 and points[0] == base["level_fwd"] and len(points) == len(grid)
