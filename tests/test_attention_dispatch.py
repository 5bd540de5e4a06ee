"""``attention_impl="auto"``: per-shape choice from the measured table (``hart_jax.kernels.dispatch_table``).

The device is faked (``hart_jax.attention.current_device`` monkeypatched), so every check runs
on a CPU; expected choices are derived here from the table's own numbers. Dispatch through
``cache_attention`` / ``attention`` is observed with ``jax.eval_shape`` and spies standing in
for the three implementations (full-size shapes, nothing allocated).
"""

from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import pallas_interpret_mode
from hart_jax import attention as attn
from hart_jax.kernels import dispatch_table as dt
from hart_jax.kernels.cache_attention import padded_cache_length
from hart_jax.kernels.reference import cache_attention_reference
from hart_jax.models.transformer import T2IConfig

HART_1024 = T2IConfig()  # the 0.7B 1024 px model: 300 text tokens, 14 scales, 24 heads x 64
UNKNOWN_GPU = "NVIDIA Imaginary X1"


def stage_shapes(cfg: T2IConfig = HART_1024) -> list[tuple[int, int, int]]:
    """``(stage, queries, visible keys)`` of every sampling stage (as ``bench/attention_bench.py``)."""
    return [(s, end - begin, end) for s, (begin, end) in enumerate(cfg.stage_slices())]


def expected_impl(group: dt.Group, op: str, queries: int, keys: int, head_dim: int) -> str | None:
    """The table's answer worked out here: nearest entry by |log(Q*K) - log(Q'*K')| (the smaller
    on a tie), then its fastest time; cuDNN only for bf16/fp16."""
    ok = lambda impl: impl != "cudnn" or group.dtype in ("bfloat16", "float16")  # noqa: E731
    cands = [e for e in group.entries if e.op == op and e.head_dim == head_dim and any(ok(i) for i, _ in e.ms)]
    if not cands:
        return None
    near = min(cands, key=lambda e: (abs(math.log(e.queries * e.keys) - math.log(queries * keys)), e.queries * e.keys))
    return min((t, i) for i, t in near.ms if ok(i))[1]


def fake_device(monkeypatch: pytest.MonkeyPatch, backend: str, kind: str) -> None:
    monkeypatch.setattr(attn, "current_device", lambda: (backend, kind))


@pytest.fixture(autouse=True)
def fresh_log():
    """Every test sees its own first log lines (choices are logged once per process)."""
    attn._logged.clear()
    yield
    attn._logged.clear()


def table_groups() -> list[dt.Group]:
    groups = list(dt.load_table())
    assert groups, "the shipped dispatch table is empty"
    return groups


# ----------------------------------------------------------------------------- the table


def test_shipped_table_parses_and_is_in_the_writers_format():
    text = dt.TABLE_PATH.read_text()
    assert dt.dumps(json.loads(text)) == text
    for g in table_groups():
        assert g.device_kind and g.jax and g.dtype and g.entries
        for e in g.entries:
            assert e.op in dt.OPS and e.queries > 0 and e.keys > 0 and e.ms, e


@pytest.mark.parametrize("group", table_groups(), ids=lambda g: f"{g.device_kind}-{g.dtype}")
def test_each_hart_stage_picks_what_the_table_says(monkeypatch, group):
    fake_device(monkeypatch, "gpu", group.device_kind)
    D = HART_1024.head_dim
    for stage, n_q, n_k in stage_shapes():
        want = expected_impl(group, "cache_attention", n_q, n_k, D) or attn.DEFAULT_IMPL_BY_BACKEND["gpu"]
        assert attn.auto_impl("cache_attention", group.dtype, n_q, n_k, D) == want, stage
        measured = [e for e in group.entries if (e.op, e.queries, e.keys, e.head_dim) == ("cache_attention", n_q, n_k, D)]
        if measured:  # a measured stage takes its own winner
            assert want == min((t, i) for i, t in measured[0].ms)[1], stage


def test_h200_uses_both_kernels_across_the_stages(monkeypatch):
    """The recorded H200 numbers: neither implementation wins every stage, and the choice
    switches once, from pallas on the small stages to cudnn on the large ones."""
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    picks = [attn.auto_impl("cache_attention", jnp.bfloat16, q, k, 64) for _, q, k in stage_shapes()]
    assert set(picks) == {"pallas", "cudnn"}
    switch = picks.index("cudnn")
    assert picks == ["pallas"] * switch + ["cudnn"] * (len(picks) - switch)


def test_float32_never_picks_cudnn(monkeypatch):
    for group in table_groups():
        fake_device(monkeypatch, "gpu", group.device_kind)
        for _, n_q, n_k in stage_shapes():
            assert attn.auto_impl("cache_attention", jnp.float32, n_q, n_k, 64) != "cudnn"
    # even where a (made-up) fp32 measurement says cuDNN was fastest
    fake = dt.parse_table({"measurements": [{
        "device_kind": "Fake GPU", "jax": "0", "dtype": "float32",
        "entries": [{"op": "cache_attention", "queries": 16, "keys": 64, "head_dim": 64,
                     "ms": {"cudnn": 0.1, "pallas": 0.5, "xla": 0.9}}],
    }]})
    monkeypatch.setattr(dt, "load_table", lambda path=dt.TABLE_PATH: fake)
    fake_device(monkeypatch, "gpu", "Fake GPU")
    assert attn.auto_impl("cache_attention", jnp.float32, 16, 64, 64) == "pallas"
    assert dt.choose("cache_attention", "Fake GPU", "float32", 16, 64, 64, fake).impl == "pallas"


def test_unknown_gpu_falls_back_to_the_backend_default_and_says_so(monkeypatch, caplog):
    fake_device(monkeypatch, "gpu", UNKNOWN_GPU)
    with caplog.at_level(logging.INFO, logger="hart_jax.attention"):
        for _ in range(2):
            for _, n_q, n_k in stage_shapes():
                assert attn.auto_impl("cache_attention", jnp.bfloat16, n_q, n_k, 64) == attn.DEFAULT_IMPL_BY_BACKEND["gpu"]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [  # once, however many shapes and calls
        f"attention_impl=auto: no cache_attention measurements for {UNKNOWN_GPU} (bfloat16, head dim 64); "
        f"using the gpu default {attn.DEFAULT_IMPL_BY_BACKEND['gpu']}"
    ]


def test_each_distinct_choice_is_logged_once(monkeypatch, caplog):
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    shapes = stage_shapes()
    with caplog.at_level(logging.INFO, logger="hart_jax.attention"):
        for _ in range(3):
            for _, n_q, n_k in shapes:
                attn.auto_impl("cache_attention", jnp.bfloat16, n_q, n_k, 64)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == len(shapes) == len(set(msgs))
    assert all("on NVIDIA H200, JAX " in m for m in msgs)


def test_cpu_is_xla(monkeypatch):
    fake_device(monkeypatch, "cpu", "cpu")
    for dtype in (jnp.float32, jnp.bfloat16):
        for _, n_q, n_k in stage_shapes():
            assert attn.auto_impl("cache_attention", dtype, n_q, n_k, 64) == "xla"
    assert attn.describe_impl("auto", jnp.bfloat16, 64) == "xla"


def test_describe_impl_states_the_rule(monkeypatch):
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    group = dt.find_group(dt.load_table(), "NVIDIA H200", "bfloat16")
    text = attn.describe_impl("auto", jnp.bfloat16, 64)
    assert text.startswith("auto: sampling: ") and f"measured on NVIDIA H200, JAX {group.jax}" in text
    winners = {e.fastest("bfloat16") for e in group.entries if e.op == "cache_attention"}
    assert all(w in text for w in winners)
    assert "training: pallas (no measurements)" in text or any(e.op == "level_attention" for e in group.entries)
    assert "sampling: pallas (no measurements)" in attn.describe_impl("auto", jnp.float32, 64)
    assert attn.describe_impl("cudnn", jnp.bfloat16, 64) == "cudnn"
    fake_device(monkeypatch, "gpu", UNKNOWN_GPU)
    assert f"no measurements for {UNKNOWN_GPU}" in attn.describe_impl(None, jnp.bfloat16, 64)


# ----------------------------------------------------------------------------- dispatch of the entry points


def _spy_impls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the three implementations with spies returning zeros; returns the call log."""
    calls: list[str] = []

    def spy(name):
        def fn(q, *a, **kw):
            calls.append(name if name != "sdpa" else kw.get("implementation"))
            return jnp.zeros(q.shape, q.dtype)
        return fn

    monkeypatch.setattr(attn, "pallas_cache_attention", spy("pallas"))
    monkeypatch.setattr(attn, "pallas_level_attention", spy("pallas"))
    monkeypatch.setattr(attn._ref, "cache_attention_reference", spy("xla"))
    monkeypatch.setattr(attn._ref, "level_attention_reference", spy("xla"))
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy("sdpa"))
    return calls


def test_cache_attention_auto_dispatches_each_stage(monkeypatch):
    """Full-size sampler calls (stacked caches, traced block index) reach the table's choice."""
    group = dt.find_group(dt.load_table(), "NVIDIA H200", "bfloat16")
    fake_device(monkeypatch, "gpu", group.device_kind)
    calls = _spy_impls(monkeypatch)
    cfg, rows = HART_1024, 8
    Lm = padded_cache_length(cfg.seq_len)
    cache = jax.ShapeDtypeStruct((cfg.depth, rows, Lm, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    for stage, n_q, n_k in stage_shapes():
        q = jax.ShapeDtypeStruct((rows, n_q, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
        f = lambda q, kc, vc, layer, n_k=n_k: attn.cache_attention(  # noqa: E731
            q, kc, vc, valid_len=n_k, scale=0.03, layer=layer, impl="auto")
        out = jax.eval_shape(f, q, cache, cache, jax.ShapeDtypeStruct((), jnp.int32))
        assert out.shape == q.shape
        assert calls[-1] == expected_impl(group, "cache_attention", n_q, n_k, cfg.head_dim), stage
    for impl in attn.IMPLS:  # explicit choices pass through, whatever the table says
        q = jax.ShapeDtypeStruct((rows, 4096, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
        jax.eval_shape(lambda q, kc, vc, impl=impl: attn.cache_attention(
            q, kc, vc, valid_len=cfg.seq_len, scale=0.03, layer=3, impl=impl), q, cache, cache)
        assert calls[-1] == impl


def test_training_attention_auto_without_level_measurements(monkeypatch, caplog):
    """``attention`` consults the table too; with no level_attention entries it keeps the default."""
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    calls = _spy_impls(monkeypatch)
    lev = np.asarray(T2IConfig(context_token=6, patch_nums=(1, 2, 3)).level_ids())
    q = jax.ShapeDtypeStruct((2, len(lev), 24, 64), jnp.bfloat16)
    measured = dt.choose("level_attention", "NVIDIA H200", "bfloat16", len(lev), len(lev), 64)
    with caplog.at_level(logging.INFO, logger="hart_jax.attention"):
        jax.eval_shape(lambda q: attn.attention(q, q, q, q_levels=lev, k_levels=lev, scale=0.1), q)
    want = measured.impl if measured else attn.DEFAULT_IMPL_BY_BACKEND["gpu"]
    assert calls == [want]
    if measured is None:
        assert any("no level_attention measurements for NVIDIA H200" in r.getMessage() for r in caplog.records)


def test_cache_attention_auto_matches_the_reference():
    """On this CPU (``auto`` -> xla), and on a faked H200 at a head dim it has no numbers for
    (-> the pallas default, interpreted): same numbers as the fp32 reference."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 9, 2, 16), (2, 32, 2, 16), (2, 32, 2, 16)))
    want = cache_attention_reference(q, k, v, 19, 0.25)
    got = attn.cache_attention(q, k, v, valid_len=19, scale=0.25, impl="auto")
    np.testing.assert_allclose(got, want, atol=1e-5)
    stacked = jax.jit(lambda q, ka, va, layer: attn.cache_attention(
        q, ka, va, valid_len=19, scale=0.25, layer=layer, impl=None))
    np.testing.assert_allclose(stacked(q, jnp.stack([v, k]), jnp.stack([k, v]), jnp.int32(1)), want, atol=1e-5)


def test_cache_attention_auto_fallback_runs_pallas(monkeypatch):
    fake_device(monkeypatch, "gpu", "NVIDIA H200")
    assert dt.choose("cache_attention", "NVIDIA H200", "float32", 9, 19, 16) is None
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 9, 2, 16), (2, 32, 2, 16), (2, 32, 2, 16)))
    want = cache_attention_reference(q, k, v, 19, 0.25)
    with pallas_interpret_mode(True):
        got = attn.cache_attention(q, k, v, valid_len=19, scale=0.25, impl="auto")
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- writing the table


def _bench_result(device: str, dtype: str, ms: dict[str, float]) -> dict:
    """A minimal ``bench/attention_bench.py`` result: one sampling stage, one training pass."""
    shape = {"context_tokens": 300, "patch_nums": [1, 2], "heads": 24, "head_dim": 64, "depth": 24}
    sampling = [{"stage": 13, "queries": 4096, "valid": 9750, "cache": 9856, "B": 8, "layout": "stacked",
                 "impl": i, "ms": t} for i, t in ms.items()]
    sampling.append({"stage": 13, "queries": 4096, "valid": 9750, "cache": 9856, "B": 8, "layout": "stacked",
                     "impl": "xla", "error": "out of memory"})
    training = [{"pass": p, "L": 9750, "B": 1, "H": 24, "D": 64, "impl": "pallas", "ms": 9.0}
                for p in ("fwd", "fwd+bwd")]
    return {"device": device, "jax": "9.9", "dtype": dtype, "shape": shape, "cache_layout": "stacked",
            "sampling": sampling, "training": training, "command": "python -m bench.attention_bench"}


def test_write_table_merges_by_device_kind_and_dtype(tmp_path):
    path = tmp_path / "table.json"
    dt.write_table(path, _bench_result("GPU A", "bfloat16", {"pallas": 2.0, "cudnn": 1.0}))
    dt.write_table(path, _bench_result("GPU B", "bfloat16", {"pallas": 1.0, "cudnn": 2.0}))
    dt.write_table(path, _bench_result("GPU A", "bfloat16", {"pallas": 1.0, "cudnn": 3.0}))  # replaces A
    groups = dt.load_table(path)
    assert [(g.device_kind, g.dtype) for g in groups] == [("GPU A", "bfloat16"), ("GPU B", "bfloat16")]
    a = groups[0]
    assert [(e.op, e.queries, e.keys, dict(e.ms)) for e in a.entries] == [
        ("cache_attention", 4096, 9750, {"pallas": 1.0, "cudnn": 3.0}),  # the failed xla is left out
        ("level_attention", 9750, 9750, {"pallas": 9.0}),  # forward+backward only
    ]
    assert dt.choose("cache_attention", "GPU A", "bfloat16", 4096, 9750, 64, groups).impl == "pallas"
    assert dt.choose("level_attention", "GPU A", "bfloat16", 9750, 9750, 64, groups).impl == "pallas"
    assert path.read_text() == dt.dumps(json.loads(path.read_text()))


def test_bench_writes_the_table(tmp_path):
    """``--write-table`` on the CPU smoke run: this device's group, the stage and training times."""
    from bench import attention_bench

    path = tmp_path / "table.json"
    result = attention_bench.main(["--smoke", "--stages", "4", "--impls", "xla,pallas", "--write-table", str(path)])
    (group,) = dt.load_table(path)
    assert (group.device_kind, group.dtype, group.jax) == (result["device"], "bfloat16", jax.__version__)
    assert "--write-table" in group.command
    ops = sorted((e.op, sorted(dict(e.ms))) for e in group.entries)
    assert ops == [("cache_attention", ["pallas", "xla"]), ("level_attention", ["pallas", "xla"])]
