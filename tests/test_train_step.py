"""The training step: sharded == single-device (fp32), gradient accumulation, the
objective's pieces (token dropping, CFG dropout), the finite guard, release init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import pallas_interpret_mode
from configs.train import get_config
from hart_jax.train import loop
from hart_jax.train.objective import cond_dropout, keep_count, kept_indices
from hart_jax.train.sharding import path_str

B = 8


def tiny_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Structured 24 px images with cached text embeddings (tests/train_data.py)."""
    from tests.train_data import examples

    rows = examples(B, size=24, seed=seed)
    return {
        "image": np.stack([r["image"] for r in rows]),
        "context": np.stack([r["context"] for r in rows]),
        "context_mask": np.stack([r["context_mask"] for r in rows]),
        "context_position_ids": np.stack([r["context_position_ids"] for r in rows]).astype(np.int32),
    }


def run_steps(mesh_kw: dict, devices, n_keep: int = 32, steps: int = 2, **cfg_kw):
    """``steps`` optimizer steps on fixed batches; returns (components, state, metrics per step, shardings)."""
    c = get_config("tiny_t2i")
    c.optim.warmup_steps = 0  # a non-zero learning rate from the first step
    c.model.depth = 1  # compile time; the rules are the same for every block
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_kw["data"], mesh_kw["fsdp"], mesh_kw["tensor"]
    for k, v in cfg_kw.items():
        sec, key = k.split("__")
        c[sec][key] = v
    comp = loop.build(c, devices=devices)
    state, shardings = comp.create_state()
    comp.initial = jax.device_get(state)  # the step donates its input state
    step = comp.make_step(shardings)
    hist = []
    for i in range(steps):
        state, metrics = step(state, comp.global_batch(tiny_batch(i)), comp.frozen_params, n_keep)
        hist.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return comp, jax.device_get(state), hist, shardings


@pytest.fixture(scope="module")
def single():
    return run_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh_kw,impl",
    [(dict(data=2, fsdp=4, tensor=1), "auto"), (dict(data=2, fsdp=2, tensor=2), "auto"),
     (dict(data=2, fsdp=2, tensor=2), "pallas")],
    ids=["dp2xfsdp4", "dp2xfsdp2xtp2", "dp2xfsdp2xtp2-pallas"],
)
def test_sharded_step_matches_single_device(single, mesh_kw, impl):
    """Against the single-device run (xla attention on CPU); the pallas case runs the fused
    kernels (interpreted) under shard_map, each device on its rows and heads."""
    assert len(jax.devices()) == 8
    _, ref_state, ref_hist, _ = single
    with pallas_interpret_mode(impl == "pallas"):
        comp, state, hist, shardings = run_steps(mesh_kw, jax.devices(), model__attention_impl=impl)
    assert comp.tcfg.attention_impl == impl
    # the mesh really shards: FSDP splits the big kernels, TP the MLP
    spec = shardings.params["blocks"]["ffn"]["gate_proj"]["kernel"].spec  # [X, C, I]: the layer axis whole
    assert spec[0] is None and spec[1] == "fsdp" and (mesh_kw["tensor"] == 1 or spec[2] == "tensor"), spec
    for m, ref_m in zip(hist, ref_hist):  # step 2's loss depends on step 1's update
        for k in ("loss", "ce", "diff", "grad_norm", "update_norm"):
            assert abs(m[k] - ref_m[k]) <= 1e-5 * max(1.0, abs(ref_m[k])), (k, m[k], ref_m[k])
        assert m["finite"] == 1.0 and math.isfinite(m["loss"])
    worst = 0.0
    for (path, a), b, b0 in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0],
        jax.tree_util.tree_leaves(ref_state.params),
        jax.tree_util.tree_leaves(ref_state.ema_params),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=path_str(path))
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    for a, b in zip(jax.tree_util.tree_leaves(state.ema_params), jax.tree_util.tree_leaves(ref_state.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert int(state.step) == 2


def test_step_changes_params_and_counts(single):
    comp, state, hist, _ = single
    m = hist[0]
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(comp.initial.params))]
    assert max(diffs) > 0
    assert int(state.step) == 2
    assert m["lr"] == pytest.approx(comp.config.optim.lr)
    assert 0 < m["update_norm"] and 0 < m["grad_norm"]
    # CE starts near log(V) from the release init (head kernel x0.02)
    assert abs(m["ce"] - math.log(comp.tcfg.vocab_size)) < 0.1


def test_keep_count_distribution():
    rng = np.random.default_rng(0)
    ks = np.array([keep_count(rng, 4096, 1) for _ in range(3000)])
    assert ks.min() >= 32 and ks.max() <= 2048  # drop ratio in [0.5, 1], at least 32 kept
    # mean drop ratio of a N(1, .25) truncated to [.5, 1] is ~0.82
    assert abs(1 - ks.mean() / 4096 - 0.82) < 0.01
    kq = [keep_count(np.random.default_rng(s), 4096, 256) for s in range(200)]
    assert set(kq) <= set(range(256, 2049, 256))
    assert keep_count(rng, 36, 1) == 32 and keep_count(rng, 4096, 1, enabled=False) == 4096


def test_kept_indices_sorted_unique():
    idx = np.asarray(kept_indices(jax.random.PRNGKey(0), 4, 36, 10))
    assert idx.shape == (4, 10)
    for row in idx:
        assert list(row) == sorted(set(row.tolist())) and row.min() >= 0 and row.max() < 36
    assert len({tuple(r) for r in idx}) > 1


def test_cond_dropout_rates():
    keys = jax.random.PRNGKey(1)
    right = float(jnp.mean(cond_dropout(keys, 200_000, 0.1, bug=False)))
    bug = float(jnp.mean(cond_dropout(keys, 200_000, 0.1, bug=True)))
    assert abs(right - 0.1) < 0.005
    assert abs(bug - 0.5398) < 0.005  # P(N(0,1) < 0.1)


def test_release_init_rules(single):
    comp = single[0]
    p = comp.initial.params
    assert np.all(p["head"]["bias"] == 0) and np.std(p["head"]["kernel"]) < 0.02 * 0.02 * 1.2
    assert np.allclose(p["diffloss"]["net"]["final_layer"]["linear"]["kernel"], 0)
    assert np.all(p["blocks"]["ln_wo_grad"]["scale"] == 1)
    s = np.std(p["blocks"]["attn"]["proj"]["kernel"])
    assert abs(s - 0.02 / math.sqrt(2 * comp.tcfg.depth)) < 0.003
    np.testing.assert_array_equal(p["blocks"]["attn"]["q_bias"], 0)
