"""Tokenizer parity against tokenizer_golden.npz (made by the original PyTorch code).

Every array of the fixture file is checked: floats within 1e-4 (atol and rtol,
fp32), indices exactly. Config and weights come from ``<golden>/tokenizer``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, nchw, nhwc
from hart_jax.convert.tokenizer import convert_tokenizer
from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.layers.resample import area_resize, bicubic_resize
from hart_jax.models.quantizer import nearest_code
from hart_jax.tokenizer import HybridTokenizer

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def setup(golden_dir):
    cfg, variables = convert_tokenizer(golden_dir / "tokenizer")
    g = dict(np.load(golden_dir / "tokenizer_golden.npz"))
    return cfg, variables, g, HybridTokenizer(cfg, variables)


def _checked_keys(g, n):
    keys = {"img", "enc_out", "f", "frest_wo_last", "fhat_discrete", "residual", "next_scale_inputs",
            "next_scale_inputs_ar", "check_frest_minus_last_vs_residual", "dec_in_hybrid",
            "img_hybrid_unclamped", "img_hybrid", "img_discrete", "img_var_discrete",
            "forward_out_hybrid", "forward_vq_loss_hybrid", "forward_out_discrete", "forward_vq_loss_discrete"}
    for k in range(n):
        keys |= {f"idx_s{k}", f"idx_margin_s{k}", f"fhat_after_s{k}"}
    return keys


def test_every_fixture_array_is_covered(setup):
    cfg, _, g, _ = setup
    assert set(g) == _checked_keys(g, len(cfg.v_patch_nums)), "fixture arrays not covered by this file"


def test_encoder_and_quant_conv(setup):
    cfg, variables, g, tok = setup
    m = HARTAutoEncoder(cfg)
    enc = m.apply(variables, nhwc(g["img"]), method=lambda mod, x: mod.encoder(x))
    assert_close(nchw(enc), g["enc_out"], "enc_out")
    assert_close(nchw(tok.encode_latent(nhwc(g["img"]))), g["f"], "f")


def test_hybrid_tokenization_indices_and_residual(setup):
    cfg, variables, g, tok = setup
    pn = cfg.v_patch_nums
    tokens = tok.encode(nhwc(g["img"]), pn)
    for k in range(len(pn)):
        np.testing.assert_array_equal(np.asarray(tokens.indices[k]), g[f"idx_s{k}"], err_msg=f"idx_s{k}")
    assert_close(tokens.last_layer_gt, g["frest_wo_last"], "frest_wo_last")
    b, c = g["residual"].shape[:2]
    assert_close(tokens.residual, nhwc(g["residual"]).reshape(b, -1, c), "residual")


def test_decision_margins(setup):
    """Our smallest best-vs-second distance gap per scale matches the recorded one."""
    cfg, variables, g, tok = setup
    pn = cfg.v_patch_nums
    m = HARTAutoEncoder(cfg)
    f = tok.encode_latent(nhwc(g["img"]))
    def margins(mod, f):
        e = mod.quantize.codebook
        f_rest, out = f, []
        for si, p in enumerate(pn):
            last = si == len(pn) - 1
            z = (f_rest if last else area_resize(f_rest, p)).reshape(-1, f.shape[-1])
            d = jnp.sum(z * z, 1, keepdims=True) + jnp.sum(e * e, 1) - 2 * z @ e.T
            top2 = jnp.sort(d, axis=1)[:, :2]
            out.append(jnp.min(top2[:, 1] - top2[:, 0]))
            idx = nearest_code(z, e).reshape(f.shape[0], -1)
            h = bicubic_resize(mod.quantize.lookup(idx, p), pn[-1])
            f_rest = f_rest - (h if last else mod.quantize.phi(h, si, len(pn)))
        return out

    ours = m.apply(variables, f, method=margins)
    for k in range(len(pn)):
        assert_close(ours[k], g[f"idx_margin_s{k}"], f"idx_margin_s{k}", atol=1e-4, rtol=1e-3)


def test_fhat_per_scale_and_teacher_forcing(setup):
    cfg, variables, g, tok = setup
    pn = cfg.v_patch_nums
    idx = [g[f"idx_s{k}"] for k in range(len(pn))]
    fh = tok.fhat_per_scale(idx, pn)
    for k in range(len(pn)):
        assert_close(nchw(fh[k]), g[f"fhat_after_s{k}"], f"fhat_after_s{k}")
    assert_close(nchw(fh[-1]), g["fhat_discrete"], "fhat_discrete")
    tf = tok.teacher_forcing_inputs(idx, pn)
    assert_close(tf, g["next_scale_inputs"], "next_scale_inputs")
    assert_close(tf, g["next_scale_inputs_ar"], "next_scale_inputs_ar")


def test_autoregressive_input_matches_teacher_forcing(setup):
    """The sampler's incremental f_hat update gives the teacher-forcing inputs."""
    cfg, variables, g, _ = setup
    pn = cfg.v_patch_nums
    m = HARTAutoEncoder(cfg)

    def run(mod):
        b = g["img"].shape[0]
        f_hat = jnp.zeros((b, pn[-1], pn[-1], cfg.z_channels))
        ins = []
        for si in range(len(pn)):
            h = mod.quantize.lookup(jnp.asarray(g[f"idx_s{si}"]), pn[si])
            f_hat, nxt = mod.quantize.next_autoregressive_input(si, pn, f_hat, h)
            if si < len(pn) - 1:
                ins.append(nxt.reshape(b, -1, cfg.z_channels))
        return f_hat, jnp.concatenate(ins, 1)

    f_hat, ins = m.apply(variables, method=run)
    assert_close(ins, g["next_scale_inputs_ar"], "next_scale_inputs_ar")
    assert_close(nchw(f_hat), g["fhat_discrete"], "fhat_discrete")


def test_residual_identity(setup):
    """frest_wo_last - E[idx_last] == f - f_hat_discrete (the fixture's own check, ~1e-7)."""
    cfg, variables, g, tok = setup
    tokens = tok.encode(nhwc(g["img"]), cfg.v_patch_nums)
    b, c = g["residual"].shape[:2]
    f_hat = tok.fhat_per_scale(tokens.indices, cfg.v_patch_nums)[-1]
    ours = np.abs(np.asarray(tokens.residual) - (np.asarray(tok.encode_latent(nhwc(g["img"]))) - np.asarray(f_hat)).reshape(b, -1, c)).max()
    assert ours < 1e-5 and float(g["check_frest_minus_last_vs_residual"]) < 1e-5


def test_decoding_conventions(setup):
    cfg, variables, g, tok = setup
    pn = cfg.v_patch_nums
    m = HARTAutoEncoder(cfg)
    idx = [g[f"idx_s{k}"] for k in range(len(pn))]
    b, c = g["residual"].shape[:2]
    res = nhwc(g["residual"]).reshape(b, -1, c)
    f_full = nhwc(g["fhat_discrete"] + g["residual"])
    assert_close(nchw(m.apply(variables, f_full, method=lambda mod, x: mod.post_quant_conv(x))), g["dec_in_hybrid"], "dec_in_hybrid")
    assert_close(nchw(m.apply(variables, f_full, method=HARTAutoEncoder.decode_unclamped)), g["img_hybrid_unclamped"], "img_hybrid_unclamped")
    assert_close(nchw(tok.decode(idx, res, pn)), g["img_hybrid"], "img_hybrid")
    assert_close(nchw(tok.decode(idx, None, pn)), g["img_discrete"], "img_discrete")
    assert_close(nchw(tok.decode(idx, None, pn, convention="var")), g["img_var_discrete"], "img_var_discrete")


@pytest.mark.parametrize("mode,prob", [("hybrid", 0.0), ("discrete", 1.0)])
def test_training_forward(setup, mode, prob):
    cfg, variables, g, _ = setup
    m = HARTAutoEncoder(cfg)
    out = m.apply(variables, nhwc(g["img"]), cfg.v_patch_nums, prob)
    assert_close(nchw(out["out"]), g[f"forward_out_{mode}"], f"forward_out_{mode}")
    assert_close(out["vq_loss"], g[f"forward_vq_loss_{mode}"], f"forward_vq_loss_{mode}")
