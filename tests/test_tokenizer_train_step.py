"""The tokenizer step on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices equals
the single-device step (BatchNorm statistics over the global batch, conv kernels split
over fsdp by TOKENIZER_RULES), and the state lands in the rules' shardings."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.train import get_config
from hart_jax.train.tokenizer_loop import build_tokenizer
from tests.test_tokenizer_train import SMALL_TOKENIZER
from tests.train_data import examples

B = 8


def run(mesh: tuple[int, int, int], devices, steps: int = 2):
    c = get_config("tokenizer_tiny")
    c.tokenizer.update(SMALL_TOKENIZER)
    c.discriminator.n_layers = 1
    c.tokenizer_loss.disc_start = 1  # step 1 without, step 2 with the discriminator
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    comp = build_tokenizer(c, devices=devices)
    state, sh = comp.create_state()
    step = comp.make_step(sh)
    side = comp.resolution
    hist = []
    for i in range(steps):
        imgs = np.stack([r["image"] for r in examples(B, size=side, seed=i)])
        state, m = step(state, comp.global_batch({"image": imgs}), comp.frozen_params)
        hist.append({k: float(v) for k, v in jax.device_get(m).items()})
    return sh, jax.device_get(state), hist


def test_sharded_step_matches_single_device():
    _, a, ha = run((1, 1, 1), jax.devices()[:1])
    sh, b, hb = run((2, 2, 2), jax.devices()[:8])
    assert sh.params["decoder"]["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
    assert sh.params["decoder"]["conv_out"]["kernel"].spec == P()  # 3 output channels: replicated
    for step_a, step_b in zip(ha, hb):
        for k in ("loss", "rec", "vq", "g", "d", "adaptive_lambda", "grad_norm", "d_grad_norm", "logits_real",
                  "usage/mean", "perplexity/mean"):
            assert step_b[k] == pytest.approx(step_a[k], rel=1e-4, abs=1e-5), k
        assert step_a["finite"] == step_b["finite"] == 1
    assert ha[0]["disc_active"] == 0 and ha[1]["disc_active"] == 1
    for name in ("params", "ema_params", "disc_params", "disc_batch_stats"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(a, name)), jax.tree_util.tree_leaves(getattr(b, name))):
            np.testing.assert_allclose(x, y, atol=2e-3, rtol=0, err_msg=name)  # 2 Adam steps of lr 1e-3
