"""HybridTokenizer: shapes, bad input messages, and the training forward (tiny random model)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tokenizer import get_config
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.quantizer import phi_index
from hart_jax.tokenizer import HybridTokenizer

CFG = TokenizerConfig(**get_config("tiny"))
PN = CFG.v_patch_nums


@pytest.fixture(scope="module")
def tok():
    model = HARTAutoEncoder(CFG)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))
    return HybridTokenizer(CFG, variables)


def test_shapes_of_every_operation(tok):
    img = jax.random.uniform(jax.random.PRNGKey(1), (2, 24, 24, 3), minval=-1, maxval=1)
    t = tok.encode(img)
    assert [i.shape for i in t.indices] == [(2, p * p) for p in PN]
    assert all(i.dtype == jnp.int32 for i in t.indices)
    assert t.residual.shape == t.last_layer_gt.shape == (2, 36, 8)
    assert [f.shape for f in tok.fhat_per_scale(t.indices)] == [(2, 6, 6, 8)] * len(PN)
    assert tok.teacher_forcing_inputs(t.indices).shape == (2, sum(p * p for p in PN[1:]), 8)
    for residual in (t.residual, None):
        out = tok.decode(t.indices, residual)
        assert out.shape == (2, 24, 24, 3) and float(jnp.abs(out).max()) <= 1.0
    # hybrid reconstruction is the continuous autoencoder: decode(f) == decode(f_hat + residual)
    f = tok.encode_latent(img)
    np.testing.assert_allclose(tok.decode(t.indices, t.residual), tok.decode_latent(f), atol=1e-5)


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((2, 24, 24), np.float32), r"4-D array \[B, H, W, 3\]"),
        (np.zeros((2, 24, 24, 4), np.float32), "3 channels in the last axis"),
        (np.zeros((2, 3, 24, 24), np.float32), "looks like NCHW"),
        (np.zeros((2, 24, 24, 3), np.uint8), "floating point in \\[-1, 1\\].*uint8"),
        (np.zeros((2, 32, 32, 3), np.float32), r"32x32 do not fit the patch grid.*needs 24x24"),
    ],
)
def test_bad_images_name_the_problem(tok, images, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(images)


def test_latent_encoding_needs_multiples_of_the_downsampling(tok):
    assert tok.encode_latent(np.zeros((1, 8, 16, 3), np.float32)).shape == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="10x16 is not a multiple of the downsampling factor 4"):
        tok.encode_latent(np.zeros((1, 10, 16, 3), np.float32))


def test_bad_indices_and_residual(tok):
    idx = [np.zeros((2, p * p), np.int32) for p in PN]
    with pytest.raises(ValueError, match="expected 5 index maps"):
        tok.decode(idx[:-1])
    with pytest.raises(ValueError, match=r"scale 2 must have shape \[2, 9\]"):
        tok.decode(idx[:2] + [np.zeros((2, 8), np.int32)] + idx[3:])
    with pytest.raises(ValueError, match="scale 0 must be integer"):
        tok.decode([idx[0].astype(np.float32)] + idx[1:])
    bad = [i.copy() for i in idx]
    bad[1][0, 0] = CFG.vocab_size
    with pytest.raises(ValueError, match=r"values outside \[0, 640\)"):
        tok.decode(bad)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 36, 8\]"):
        tok.decode(idx, np.zeros((2, 6, 6, 8), np.float32))
    with pytest.raises(ValueError, match="convention"):
        tok.decode(idx, convention="vq")


def test_phi_tick_rule_of_the_release():
    assert [phi_index(s, 14, 4) for s in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [phi_index(s, 10, 4) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(s, 5, 4) for s in range(5)] == [0, 1, 2, 2, 3]
    assert [phi_index(s, 8, 4) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_training_forward_skip_probability_and_gradients(tok):
    model = HARTAutoEncoder(CFG)
    img = jax.random.uniform(jax.random.PRNGKey(2), (2, 24, 24, 3), minval=-1, maxval=1)
    fwd = jax.jit(
        lambda v, x, p, key: model.apply(v, x, PN, p, rngs={"quantize": key})["out"], static_argnums=2
    )
    cont = fwd(tok.variables, img, 0.0, jax.random.PRNGKey(0))
    disc = fwd(tok.variables, img, 1.0, jax.random.PRNGKey(0))
    assert not np.allclose(cont, disc)
    outs = [fwd(tok.variables, img, 0.5, jax.random.PRNGKey(s)) for s in range(12)]
    n_cont = sum(bool(np.allclose(o, cont, atol=1e-6)) for o in outs)
    n_disc = sum(bool(np.allclose(o, disc, atol=1e-6)) for o in outs)
    assert n_cont + n_disc == 12 and n_cont > 0 and n_disc > 0

    def loss(params):
        out = model.apply({"params": params}, img, PN, 0.0)
        return jnp.mean((out["out"] - img) ** 2) + out["vq_loss"]

    grads = jax.jit(jax.grad(loss))(tok.variables["params"])
    assert float(jnp.abs(grads["decoder"]["conv_out"]["kernel"]).sum()) > 0
    # straight-through: the encoder receives the reconstruction gradient
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0


def test_norm_groups_reach_every_group_norm():
    """``norm_groups`` sets the groups of every GroupNorm (the release: 32); channel counts
    that it does not divide are named."""
    cfg = TokenizerConfig(**{**get_config("tiny"), "ch": 16, "ch_mult": (1, 2), "norm_groups": 8})
    model = HARTAutoEncoder(cfg)
    img = jnp.zeros((1, 12, 12, 3))  # latent 6x6 = the last scale
    variables = model.init(jax.random.PRNGKey(0), img)
    assert model.apply(variables, img, cfg.v_patch_nums, 0.0)["out"].shape == (1, 12, 12, 3)
    groups = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.GroupNorm):
            groups.append(context.module.num_groups)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        model.apply(variables, img, cfg.v_patch_nums, 0.0)
    assert groups and set(groups) == {8}
    assert TokenizerConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ValueError, match="must be multiples of norm_groups=32"):
        TokenizerConfig(**{**get_config("tiny"), "ch": 16})
