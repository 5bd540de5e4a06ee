"""Gradient accumulation and fine-tuning from a converted release checkpoint (1 device)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs.train import get_config
from hart_jax.checkpoint import save_converted
from hart_jax.train import loop
from tests.test_train_step import tiny_batch


def codes_batch(comp, seed=0):
    """Tokenizer outputs for the tiny batch (the cached-codes path of the step)."""
    from hart_jax.train.objective import tokenize_images

    b = tiny_batch(seed)
    idx, frest, _ = tokenize_images(comp.frozen.tokenizer, comp.frozen_params["tokenizer"], b.pop("image"),
                                    tuple(comp.tcfg.patch_nums))
    b["codes"] = np.concatenate([np.asarray(i) for i in idx], axis=1).astype(np.int32)
    b["last_layer_gt"] = np.asarray(frest)
    return b


def config(accum: int):
    c = get_config("tiny_t2i")
    c.model.depth = 1
    c.optim.warmup_steps = 0
    c.train.grad_accum = accum
    c.data.codes = True
    # deterministic gradients: no condition dropout, no token dropping, CE only
    c.objective.cond_drop_rate = 0.0
    c.objective.diff_weight = 0.0
    return c


def test_grad_accumulation_matches_full_batch():
    comp = loop.build(config(1), devices=jax.devices()[:1])
    state, sh = comp.create_state()
    host = jax.device_get(state)
    batch = codes_batch(comp)
    out = {}
    for accum in (1, 4):
        comp.config.train.grad_accum = accum
        state = jax.device_put(host, sh)
        state, m = comp.make_step(sh)(state, comp.global_batch(batch), comp.frozen_params, comp.n_last)
        out[accum] = (jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(m).items()})
    (p1, m1), (p4, m4) = out[1], out[4]
    assert m1["ce"] == pytest.approx(m4["ce"], rel=1e-5, abs=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_finetune_from_converted(tmp_path):
    c = config(1)
    comp = loop.build(c, devices=jax.devices()[:1])
    fresh, _ = comp.create_state()
    release = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.5, jax.device_get(fresh.params))  # "pretrained"
    d = save_converted(tmp_path / "llm", {"params": release}, comp.tcfg.to_hf_dict(), kind="transformer")
    loaded = loop._init_params_from(str(d))
    state, _ = comp.create_state(loaded)
    got = jax.device_get(state)
    for a, b, e in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(release),
                       jax.tree_util.tree_leaves(got.ema_params)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(e, b)  # the EMA starts from the loaded weights
    assert int(got.step) == 0
    # a checkpoint of another model is refused with the names of the mismatches
    c2 = config(1)
    c2.model.depth = 2
    comp2 = loop.build(c2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"blocks/attn/proj/kernel: shape \(\d+, .* != \(2, "):
        comp2.create_state(loaded)
