"""The analytic FLOP counter (``hart_jax.flops``) against XLA's own count of the program.

XLA's cost analysis counts every multiply-add of a dot or convolution as 2 FLOPs (a
convolution only over the taps inside the map) plus the elementwise work, and a loop's body
once. So the dense (``xla``) sampling program is compiled with its loops unrolled (blocks
unrolled, no diffusion head) and must count at least the analytic matrix products and at
most ELEMENTWISE_SHARE more; the diffusion head's loop body is one step of the denoiser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hart_jax import flops
from hart_jax.models.diffusion_head import DiffLoss
from hart_jax.random_init import preset_configs, random_pipeline, token_inputs
from hart_jax.sampling import SamplingConfig

# Elementwise work (norms, softmax, RNG, top-k masking) XLA adds to the products at the tiny
# preset's widths; measured 4.4% (blocks + text encoder + decoder) and ~1-2% (diffusion step).
ELEMENTWISE_SHARE = 0.10
PREFIX = 64


def xla_flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn`` (a jitted program, or a function to jit) compiled for ``args``."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.fixture(scope="module")
def tiny_pipe():
    tok, t2i, q = preset_configs("tiny", attention_impl="xla")
    return random_pipeline(tok, t2i, q, jnp.float32, abstract=True)


@pytest.mark.parametrize("batch,more_smooth", [(1, True), (3, False)])
def test_program_matches_xla_cost_analysis(tiny_pipe, batch, more_smooth):
    pipe = tiny_pipe
    fn = pipe.program(batch, SamplingConfig(scan_layers=False, diffusion=False, more_smooth=more_smooth))
    args = (pipe.t2i_vars, pipe.tok_vars, pipe.text_params, *token_inputs(pipe, batch, PREFIX), jnp.float32(4.5))
    counted = xla_flops(fn, *args)
    parts = flops.sampling_flops(
        pipe.t2i_cfg, pipe.tok_cfg, batch, text_cfg=pipe.text_encoder.config,
        text_tokens=PREFIX + pipe.t2i_cfg.context_token, more_smooth=more_smooth, diffusion_steps=0, in_bounds=True,
    )
    analytic = sum(parts.values())
    assert parts["diffusion_head"] == 0.0
    assert analytic <= counted <= analytic * (1 + ELEMENTWISE_SHARE), (counted / analytic, parts)


def test_diffusion_step_matches_xla_cost_analysis(tiny_pipe):
    """One guided denoiser step over the last scale's 2B rows (the loop body XLA counts)."""
    cfg, batch = tiny_pipe.t2i_cfg, 2
    head = DiffLoss(target_channels=cfg.z_channels, z_channels=cfg.embed_dim, width=cfg.diff_width,
                    depth=cfg.diff_depth, num_sampling_steps=cfg.num_sampling_steps)
    rows = 2 * batch * cfg.patch_nums[-1] ** 2
    z = jnp.zeros((rows, cfg.embed_dim))
    x, t = jnp.zeros((rows, cfg.z_channels)), jnp.zeros((rows,), jnp.int32)
    params = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), x, t, z, method=lambda m, *a: m.net(*a)))
    step = lambda p, x, t, z: head.apply(p, x, t, z, 4.5, method=lambda m, *a: m.net.forward_with_cfg(*a))  # noqa: E731
    counted = xla_flops(step, params, x, t, z)
    word_embed = 2.0 * rows * cfg.z_channels * cfg.embed_dim  # counted by the part, outside the loop
    analytic = flops.diffusion_head_flops(cfg, batch, steps=1) - word_embed
    assert analytic <= counted <= analytic * (1 + ELEMENTWISE_SHARE), counted / analytic


def test_full_size_split():
    """HART 0.7B at 1024 px, batch 8: the linear layers, visible attention pairs and head
    steps by the count of issue 13 (212 / 141 / 38 TFLOP), each stage's rows doubled."""
    tok, t2i, q = preset_configs("full", 1024)
    parts = flops.sampling_flops(t2i, tok, 8, text_cfg=q, text_tokens=PREFIX + t2i.context_token)
    tflop = {k: v / 1e12 for k, v in parts.items()}
    assert tflop["transformer_linear"] == pytest.approx(212.0, rel=0.01)
    assert tflop["transformer_attention"] == pytest.approx(141.25, rel=0.01)
    assert tflop["diffusion_head"] == pytest.approx(38.3, rel=0.01)
    # every part but the sampling ops (level embeddings: once per call) is linear in the batch
    half = flops.sampling_flops(t2i, tok, 4, text_cfg=q, text_tokens=PREFIX + t2i.context_token)
    for part, value in parts.items():
        if part != "sampling":
            assert half[part] * 2 == pytest.approx(value, rel=1e-12), part


def test_stage_tokens_cover_the_sequence():
    _, t2i, _ = preset_configs("full", 1024)
    stages = flops.stage_tokens(t2i)
    assert len(stages) == len(t2i.patch_nums)
    assert stages[0] == (t2i.context_token, t2i.context_token)
    assert stages[-1][1] == t2i.seq_len
    assert sum(q for q, _ in stages) == t2i.seq_len


# ------------------------------------------------------------------- training
def mask_pairs(cfg, n_keep) -> int:
    """Visible (query, key) pairs of the training mask as the model builds it: the sequence's
    level ids (``T2IConfig.level_ids``, what ``teacher_forced`` uses) through the attention's
    own mask (``hart_jax.kernels.reference.level_mask``, the cudnn path's mask)."""
    from hart_jax.kernels.reference import level_mask, levels_2d

    levels = jnp.asarray(cfg.level_ids(n_keep))
    lev = levels_2d(levels, 1, levels.shape[0], "levels")
    return int(jnp.sum(level_mask(lev, lev)))


@pytest.mark.parametrize("drop", [False, True])
def test_train_useful_attention_pairs_match_the_mask(drop):
    """The useful count is exactly the mask's visible pairs (all last-scale tokens, or a dropped
    subset), fewer than the dense L x L; only the attention part differs between the two."""
    _, cfg, _ = preset_configs("tiny")
    n_last = cfg.patch_nums[-1] ** 2
    n_keep = n_last - 5 if drop else None
    seq = len(cfg.level_ids(n_keep))
    assert seq == cfg.seq_len - (5 if drop else 0)
    pairs = flops.visible_attention_pairs(cfg, n_keep)
    assert pairs == mask_pairs(cfg, n_keep)
    assert pairs < seq * seq
    batch, mul = 3, 4
    useful = flops.train_forward_flops(cfg, batch, n_keep, mul)
    dense = flops.train_forward_flops(cfg, batch, n_keep, mul, dense_attention=True)
    assert {k for k in useful if useful[k] != dense[k]} == {"transformer_attention"}
    assert dense["transformer_attention"] * pairs == useful["transformer_attention"] * seq * seq
    assert useful["transformer_attention"] == batch * cfg.depth * 4 * cfg.embed_dim * pairs  # two products
    assert flops.train_flops(cfg, batch, n_keep, mul) < flops.train_flops(cfg, batch, n_keep, mul, dense_attention=True)


def test_train_flops_are_three_forwards():
    """The stated convention: a training step is TRAIN_PASSES = 3 forwards (backward = 2)."""
    _, cfg, _ = preset_configs("full", 1024)
    assert flops.TRAIN_PASSES == 3.0
    for dense in (False, True):
        fwd = flops.train_forward_flops(cfg, 4, 1024, 4, dense_attention=dense)
        assert flops.train_flops(cfg, 4, 1024, 4, dense_attention=dense) == 3.0 * sum(fwd.values())
    # token dropping shrinks the sequence: fewer FLOPs, and the last-scale-only parts scale with it
    full = flops.train_forward_flops(cfg, 4, None, 4)
    kept = flops.train_forward_flops(cfg, 4, cfg.patch_nums[-1] ** 2 // 4, 4)
    assert kept["diffusion_head"] * 4 == pytest.approx(full["diffusion_head"], rel=1e-12)
    assert all(kept[k] < full[k] for k in full)
