"""Transformer and sampler behaviour on tiny random models: class-conditional variant
(shapes, level masking, label dependence), sampling keys, top-k / top-p semantics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tokenizer import get_config as tok_config
from configs.transformer import get_config as t2i_config
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.transformer import HARTTransformer, T2IConfig, init_inputs
from hart_jax.sampling import SamplingConfig, sample_images, top_k_top_p_mask

TOK = TokenizerConfig(**tok_config("tiny"))
C2I = T2IConfig(**{**t2i_config("tiny"), "context_token": 0, "num_classes": 10, "disable_aln": False,
                   "use_timestep_embed": False})
T2I = T2IConfig(**t2i_config("tiny"))


@pytest.fixture(scope="module")
def tok_vars():
    return HARTAutoEncoder(TOK).init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))


def _init(cfg):
    return HARTTransformer(cfg).init(jax.random.PRNGKey(1), *init_inputs(cfg, 2))


@pytest.fixture(scope="module")
def c2i():
    model = HARTTransformer(C2I)
    return model, _init(C2I)


def _tf(model, variables, labels, x):
    return model.apply(variables, labels, x, None, None, method=HARTTransformer.teacher_forced)


def test_class_conditional_shapes(c2i):
    model, variables = c2i
    _, x, _, _ = init_inputs(C2I, 2)
    x = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    logits, h, cond = _tf(model, variables, jnp.array([1, 2]), x)
    n = sum(p * p for p in C2I.patch_nums)
    assert C2I.first_l == 1 and C2I.seq_len == n
    assert logits.shape == (2, n, C2I.vocab_size)
    assert h.shape == (2, 36, C2I.embed_dim) and cond.shape == (2, C2I.embed_dim)
    assert "class_emb" in variables["params"] and "context_embed" not in variables["params"]


def test_class_label_changes_the_output(c2i):
    model, variables = c2i
    x = jax.random.normal(jax.random.PRNGKey(3), init_inputs(C2I, 2)[1].shape)
    a, _, _ = _tf(model, variables, jnp.array([1, 1]), x)
    b, _, _ = _tf(model, variables, jnp.array([1, 7]), x)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert float(jnp.abs(a[1] - b[1]).max()) > 1e-3


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i", "t2i"])
def test_level_causal_masking(cfg):
    """Changing scale s's inputs leaves every earlier scale's outputs unchanged and
    changes scale s's own outputs (block-causal, bidirectional inside a scale)."""
    model = HARTTransformer(cfg)
    variables = _init(cfg)
    ctx, x, pos, mask = init_inputs(cfg, 2)
    if not cfg.is_c2i:
        ctx = jax.random.normal(jax.random.PRNGKey(4), ctx.shape)
        pos = jnp.broadcast_to(jnp.arange(cfg.context_token), pos.shape)
    else:
        ctx = jnp.array([3, 4])
    x = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    run = lambda x: model.apply(variables, ctx, x, pos, mask, method=HARTTransformer.teacher_forced)[0]
    base = run(x)
    s = 2  # perturb scale 2's inputs
    begin = sum(p * p for p in cfg.patch_nums[1:s])
    end = begin + cfg.patch_nums[s] ** 2
    pert = run(x.at[:, begin + 1].add(1.0))
    off = 1  # logits row 0 is the last level-0 position
    np.testing.assert_allclose(pert[:, : off + begin], base[:, : off + begin], atol=1e-6)
    assert float(jnp.abs(pert[:, off + begin : off + end] - base[:, off + begin : off + end]).max()) > 1e-4


def test_text_padding_is_attended_as_the_release_does():
    """Pad positions are not masked: changing a pad's features changes the logits."""
    model, variables = HARTTransformer(T2I), _init(T2I)
    ctx, x, pos, mask = init_inputs(T2I, 1)
    ctx = jax.random.normal(jax.random.PRNGKey(6), ctx.shape)
    mask = mask.at[:, 4:].set(False)
    run = lambda c: model.apply(variables, c, x, pos, mask, method=HARTTransformer.teacher_forced)[0]
    assert float(jnp.abs(run(ctx.at[:, 5].add(1.0)) - run(ctx)).max()) > 1e-4


def test_sampling_is_deterministic_per_key_and_c2i_samples(tok_vars):
    tok = HARTAutoEncoder(TOK)
    for cfg in (T2I, C2I):
        model, variables = HARTTransformer(cfg), _init(cfg)
        if cfg.is_c2i:
            args = (jnp.array([1, 2]), None, None)
        else:
            args = (jax.random.normal(jax.random.PRNGKey(7), (2, 6, 24)), jnp.ones((2, 6), bool),
                    jnp.broadcast_to(jnp.arange(6), (2, 6)))
        run = jax.jit(sample_images, static_argnums=(0, 2, 9))
        scfg = SamplingConfig(top_k=50, top_p=0.9)
        a = run(model, variables, tok, tok_vars, *args, jax.random.PRNGKey(0), 2.0, scfg)
        b = run(model, variables, tok, tok_vars, *args, jax.random.PRNGKey(0), 2.0, scfg)
        c = run(model, variables, tok, tok_vars, *args, jax.random.PRNGKey(1), 2.0, scfg)
        assert a.shape == (2, 24, 24, 3) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        np.testing.assert_array_equal(a, b)
        assert float(jnp.abs(a - c).max()) > 1e-4


def test_top_k_keeps_ties_and_top_p_keeps_the_nucleus():
    logits = jnp.array([[[3.0, 1.0, 3.0, 0.0, 2.0]]])
    k2 = top_k_top_p_mask(logits, 2, 0.0)
    assert np.isfinite(np.asarray(k2)).tolist() == [[[True, False, True, False, False]]]
    k3 = top_k_top_p_mask(logits, 3, 0.0)
    assert np.isfinite(np.asarray(k3)).tolist() == [[[True, False, True, False, True]]]
    p = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
    # ascending cumulative 0.05, 0.2, 0.5, 1.0: drop those <= 1 - 0.75 = 0.25
    kept = np.isfinite(np.asarray(top_k_top_p_mask(p, 0, 0.75))).tolist()
    assert kept == [[[True, True, False, False]]]
    assert np.isfinite(np.asarray(top_k_top_p_mask(p, 0, 0.01))).tolist() == [[[True, False, False, False]]]


def test_release_stage_rule_and_stale_last_ratio():
    s = SamplingConfig()
    assert [s.stage_top_k(i, 4096) for i in range(14)] == [600] * 7 + [300] * 7
    assert s.stage_top_k(0, 100) == 100
    assert s.ratio(13, 14) == s.ratio(12, 14) == pytest.approx(12 / 13)
    assert dataclasses.replace(s, stale_last_ratio=False).ratio(13, 14) == 1.0


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="attn_type/mlp_type must be 'llama'"):
        T2IConfig(attn_type="gpt2")
    with pytest.raises(ValueError, match="class-conditional variant needs num_classes"):
        T2IConfig(context_token=0)
    with pytest.raises(ValueError, match="sep_aln_pooling_mode"):
        T2IConfig(sep_aln_pooling_mode="sum")
    with pytest.raises(ValueError, match="rope_2d must be one of"):
        T2IConfig(rope_2d="sideways")


def _rope_scores(layout: str, shift: float, hd: int = 16) -> np.ndarray:
    """q.k after 2-D RoPE between every pair of a 3x3 grid, all positions shifted by ``shift``."""
    from hart_jax.layers.rope import apply_rope, grid_positions, rope_2d

    pos = jnp.asarray(grid_positions([3], 8))[None] + shift
    cos, sin = rope_2d(pos, hd, 100.0, layout)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 1, hd))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 9, 1, hd))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return np.asarray(jnp.einsum("bqhd,bkhd->qk", q, k))


def test_rope_2d_rotation_is_relative_and_the_release_layout_is_reproduced():
    """"rotation": scores depend on relative positions only (a common shift changes nothing) and
    norms are kept; "hart" (the release's) is not a rotation: the same shift changes scores."""
    from hart_jax.layers.rope import apply_rope, rope_2d

    np.testing.assert_allclose(_rope_scores("rotation", 0.0), _rope_scores("rotation", 5.0), atol=1e-4)
    assert np.abs(_rope_scores("hart", 0.0) - _rope_scores("hart", 5.0)).max() > 1e-2
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 2, 16))
    pos = jax.random.uniform(jax.random.PRNGKey(3), (1, 4, 2), maxval=8.0)
    y = apply_rope(x, *rope_2d(pos, 16, 10000.0, "rotation"))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # the release's angle layout, element by element: [r f, r f, c f, c f]
    cos, _ = rope_2d(pos, 16, 10000.0, "hart")
    f = 1.0 / 10000.0 ** (np.arange(0, 16, 4) / 16)
    r, c = np.asarray(pos[0, :, 0:1]) * f, np.asarray(pos[0, :, 1:2]) * f
    np.testing.assert_allclose(cos[0], np.cos(np.concatenate([r, r, c, c], -1)), atol=1e-6)
    with pytest.raises(ValueError, match="layout must be one of"):
        rope_2d(pos, 16, 10000.0, "diagonal")


def test_rope_fields_in_config_dicts():
    """A dict without ``rope_2d`` (the release's, or written before the field) reads as the
    release's layout; a model trained here round-trips its layout and base."""
    d = T2IConfig(**t2i_config("tiny")).to_hf_dict()
    del d["rope_2d"], d["rope_theta"]
    cfg = T2IConfig.from_hf_dict(d, vocab_size=640, z_channels=8)
    assert cfg.rope_2d == "hart" and cfg.rope_theta == 10000.0
    assert T2IConfig().rope_2d == "rotation"  # the default for new models
    mine = T2IConfig(**t2i_config("shapes_32"))
    back = T2IConfig.from_hf_dict(mine.to_hf_dict(), vocab_size=mine.vocab_size, z_channels=mine.z_channels)
    assert back == mine and back.rope_2d == "rotation" and back.rope_theta == 100.0
    for name in ("hart_0p7b_1024", "hart_c2i_d20", "tiny"):
        assert t2i_config(name).rope_2d == "hart", name  # presets that mirror the release
