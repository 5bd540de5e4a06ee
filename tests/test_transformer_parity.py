"""Transformer + sampling parity against t2i_golden.npz / t2i_aln_golden.npz.

Config, weights (``<golden>/llm``, ``<golden>/llm_aln``, ``<golden>/tokenizer``) and
arrays all come from the fixture directory. Floats within 1e-4 (atol and rtol,
fp32), indices exactly. The diffusion-head arrays (``dh_*``, ``gen_*``, ``dhs_*``,
``*_diff_out`` from given conditions, ``tf_diff_loss``) are checked by
test_diffusion_head.py; here the transformer produces the conditions and the loss is
re-checked end to end.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHAINED_GUMBEL_ATOL, GOLDEN_DIR, assert_close, nchw, pallas_interpret_mode
from hart_jax.convert.llm import convert_llm
from hart_jax.convert.tokenizer import convert_tokenizer
from hart_jax.models.autoencoder import HARTAutoEncoder
from hart_jax.models.transformer import Block, HARTTransformer
from hart_jax.sampling import InjectedNoise, SamplingConfig, cfg_mix, choose_tokens, sample_images

pytestmark = pytest.mark.parity

VARIANTS = [("llm", "t2i_golden.npz"), ("llm_aln", "t2i_aln_golden.npz")]
DIFFUSION_TEST_PREFIXES = ("dh_", "gen_", "dhs_")


def _has_more_smooth_run(npz: str) -> bool:
    with np.load(GOLDEN_DIR / npz) as z:
        return "ars_args" in z.files


# Variants whose fixture file holds a more_smooth (Gumbel) run; at least one must.
SMOOTH_VARIANTS = [v for v in VARIANTS if (GOLDEN_DIR / v[1]).is_file() and _has_more_smooth_run(v[1])]


def _load(golden_dir, name, npz):
    cfg, tv = convert_llm(golden_dir / name)
    tcfg, kv = convert_tokenizer(golden_dir / "tokenizer")
    g = dict(np.load(golden_dir / npz))
    return dict(cfg=cfg, tv=tv, tcfg=tcfg, kv=kv, g=g, t2i=HARTTransformer(cfg), tok=HARTAutoEncoder(tcfg))


@pytest.fixture(scope="module", params=VARIANTS, ids=[v[0] for v in VARIANTS])
def fx(request, golden_dir):
    return _load(golden_dir, *request.param)


@pytest.fixture(scope="module", params=SMOOTH_VARIANTS, ids=[v[0] for v in SMOOTH_VARIANTS])
def fx_smooth(request, golden_dir):
    return _load(golden_dir, *request.param)


def test_a_more_smooth_run_exists():
    assert SMOOTH_VARIANTS, "no fixture file holds a more_smooth (ars_*) run"


def _kept_indices(kept_BL: np.ndarray) -> np.ndarray:
    return np.stack([np.nonzero(r)[0] for r in kept_BL]).astype(np.int32)


@pytest.fixture(scope="module")
def teacher(fx):
    """Teacher-forced forward with the recorded token-dropping mask; block outputs captured."""
    g, t2i = fx["g"], fx["t2i"]
    kept = _kept_indices(g["tf_last_kept"])

    def fwd(variables):
        return t2i.apply(
            variables, g["context"], g["x_BLCv_wo_first_l"], g["context_position_ids"], g["context_mask"],
            jnp.asarray(kept), method=HARTTransformer.teacher_forced,
            capture_intermediates=lambda mdl, name: isinstance(mdl, Block) and name == "__call__",
        )

    (logits, h_last, cond), inter = fwd(fx["tv"])
    stacked = inter["intermediates"]["blocks"]["__call__"][0][0]  # the scanned blocks' outputs [X, B, L, C]
    blocks = [stacked[i] for i in range(fx["cfg"].depth)]
    return dict(logits=logits, h_last=h_last, blocks=blocks, kept=kept)


def _ar_keys(g, pre, n):
    keys = {f"{pre}_args", f"{pre}_diff_z", f"{pre}_diff_cfg", f"{pre}_diff_init_noise", f"{pre}_diff_step_noise",
            f"{pre}_diff_out", f"{pre}_fhat_final", f"{pre}_img"}
    for k in range(n):
        keys |= {f"{pre}_idx_s{k}", f"{pre}_logit_margin_s{k}", f"{pre}_hidden_s{k}", f"{pre}_topk_s{k}"}
        keys |= {f"{pre}_logits_cfg_s{k}"} if pre == "ar" else {f"{pre}_gumbel_s{k}", f"{pre}_tau_s{k}"}
        if k < n - 1:
            keys.add(f"{pre}_fhat_s{k}")
        if k >= 1:
            keys.add(f"{pre}_next_in_s{k}")
    return keys


def test_every_fixture_array_is_covered(fx):
    g, cfg = fx["g"], fx["cfg"]
    n = len(cfg.patch_nums)
    covered = {"context", "context_mask", "context_position_ids", "x_BLCv_wo_first_l", "last_layer_gt",
               "last_layer_gt_discrete", "tf_cond_drop_randn", "tf_diff_t", "tf_diff_noise", "tf_last_kept",
               "tf_logits", "tf_diff_loss", "tf_diff_z", "tf_diff_target", "tf_last_idx_greedy",
               "tf_last_logit_margin"} | {f"tf_block{i}_out" for i in range(cfg.depth)}
    covered |= _ar_keys(g, "ar", n)
    if "ars_args" in g:
        covered |= _ar_keys(g, "ars", n)
    rest = {k for k in g if not k.startswith(DIFFUSION_TEST_PREFIXES)}
    assert rest == covered


# ---------------------------------------------------------------- teacher forcing
def test_teacher_forced_logits_and_blocks(fx, teacher):
    g = fx["g"]
    assert_close(teacher["logits"], g["tf_logits"], "tf_logits")
    for i, out in enumerate(teacher["blocks"]):
        assert_close(out, g[f"tf_block{i}_out"], f"tf_block{i}_out")
    # no CFG dropout happened in the reference run (randn < rate for none of the rows)
    assert not (g["tf_cond_drop_randn"] < fx["cfg"].cond_drop_rate).any()


def test_teacher_forced_diffusion_condition_target_and_loss(fx, teacher):
    g, cfg, t2i = fx["g"], fx["cfg"], fx["t2i"]
    codebook = fx["kv"]["params"]["quantize"]["embedding"]["embedding"]
    k = teacher["kept"].shape[1]
    last_logits = np.asarray(teacher["logits"][:, -k:])
    idx = last_logits.argmax(-1)  # greedy stand-in of the reference's top-k/top-p draw
    np.testing.assert_array_equal(idx, g["tf_last_idx_greedy"])
    top2 = np.sort(last_logits, -1)[..., -2:]
    assert_close((top2[..., 1] - top2[..., 0]).min(), g["tf_last_logit_margin"], "tf_last_logit_margin")
    code = jnp.take(codebook, idx, axis=0)
    z = t2i.apply(fx["tv"], teacher["h_last"], code, method=HARTTransformer.diffusion_condition)
    assert_close(z, g["tf_diff_z"], "tf_diff_z")
    gt = np.take_along_axis(g["last_layer_gt"], teacher["kept"][..., None], axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(g["last_layer_gt_discrete"], teacher["kept"], axis=1).shape, idx.shape
    )
    target = gt - np.asarray(code)
    assert_close(target, g["tf_diff_target"], "tf_diff_target")
    loss = t2i.apply(
        fx["tv"], target, z, cfg.diffusion_batch_mul,
        method=lambda m, *a: m.diffloss.tiled_loss(*a, t=g["tf_diff_t"], noise=g["tf_diff_noise"]),
    )
    assert_close(loss, g["tf_diff_loss"], "tf_diff_loss")


def test_teacher_forced_keeps_every_token_without_a_mask(fx):
    """With all last-scale tokens kept, the kept subset's rows equal the full run's rows."""
    g, t2i = fx["g"], fx["t2i"]
    args = (g["context"], g["x_BLCv_wo_first_l"], g["context_position_ids"], g["context_mask"])
    full, _, _ = t2i.apply(fx["tv"], *args, method=HARTTransformer.teacher_forced)
    kept = _kept_indices(g["tf_last_kept"])
    sub, _, _ = t2i.apply(fx["tv"], *args, jnp.asarray(kept), method=HARTTransformer.teacher_forced)
    k = kept.shape[1]
    n_last = fx["cfg"].patch_nums[-1] ** 2
    assert full.shape[1] == sub.shape[1] - k + n_last
    # earlier scales never see last-scale tokens, so their logits do not depend on dropping
    assert_close(full[:, : full.shape[1] - n_last], sub[:, : sub.shape[1] - k], "non-last logits")


# ------------------------------------------------------------- greedy AR sampling
def _run_sampler(fx, pre, scan_layers=True, **overrides):
    g, cfg = fx["g"], fx["cfg"]
    args = json.loads(str(g[f"{pre}_args"]))
    n = len(cfg.patch_nums)
    inj = InjectedNoise(
        gumbel=[g[f"{pre}_gumbel_s{k}"] for k in range(n)] if args["more_smooth"] else None,
        diff_init=g[f"{pre}_diff_init_noise"],
        diff_steps=g[f"{pre}_diff_step_noise"],
    )
    scfg = SamplingConfig(top_p=float(args["top_p"]), more_smooth=bool(args["more_smooth"]),
                          greedy=True, diffusion=args["final_stage"] == 0, scan_layers=scan_layers)
    t2i = HARTTransformer(cfg.__class__(**{**cfg.__dict__, **overrides})) if overrides else fx["t2i"]
    run = jax.jit(sample_images, static_argnums=(0, 2, 9, 11))
    guidance = jnp.float32(args["cfg"])  # a runtime input, as in the pipeline
    img, tr = run(t2i, fx["tv"], fx["tok"], fx["kv"], g["context"], g["context_mask"], g["context_position_ids"],
                  jax.random.PRNGKey(0), guidance, scfg, inj, True)
    return float(args["cfg"]), scfg, img, tr


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned-blocks", "unrolled-blocks"])
def test_greedy_autoregressive_run_every_stage(fx, scan_layers):
    g, cfg = fx["g"], fx["cfg"]
    n = len(cfg.patch_nums)
    guidance, scfg, img, tr = _run_sampler(fx, "ar", scan_layers=scan_layers)
    for k in range(n):
        np.testing.assert_array_equal(np.asarray(tr[f"idx_s{k}"]), g[f"ar_idx_s{k}"], err_msg=f"ar_idx_s{k}")
        assert_close(tr[f"logits_cfg_s{k}"], g[f"ar_logits_cfg_s{k}"], f"ar_logits_cfg_s{k}")
        assert_close(tr[f"hidden_s{k}"], g[f"ar_hidden_s{k}"], f"ar_hidden_s{k}")
        assert scfg.stage_top_k(k, cfg.vocab_size) == int(g[f"ar_topk_s{k}"])
        top2 = np.sort(np.asarray(tr[f"logits_cfg_s{k}"]), -1)[..., -2:]
        assert_close((top2[..., 1] - top2[..., 0]).min(), g[f"ar_logit_margin_s{k}"], f"ar_logit_margin_s{k}")
        if k < n - 1:
            assert_close(nchw(tr[f"fhat_s{k}"]), g[f"ar_fhat_s{k}"], f"ar_fhat_s{k}")
        if k >= 1:
            assert_close(nchw(tr[f"next_in_s{k}"]), g[f"ar_next_in_s{k}"], f"ar_next_in_s{k}")
    assert guidance * scfg.ratio(n - 1, n) == pytest.approx(float(g["ar_diff_cfg"]), abs=1e-12)
    assert_close(tr["diff_z"], g["ar_diff_z"], "ar_diff_z")
    assert_close(tr["diff_out"], g["ar_diff_out"], "ar_diff_out")
    assert_close(nchw(tr["fhat_final"]), g["ar_fhat_final"], "ar_fhat_final")
    assert_close(nchw(img), g["ar_img"], "ar_img")


def test_greedy_run_with_pallas_attention_in_interpret_mode(fx):
    """The same greedy run with the fused Pallas kernels (interpret mode on CPU)."""
    g = fx["g"]
    with pallas_interpret_mode(True):
        _, _, img, tr = _run_sampler(fx, "ar", attention_impl="pallas")
    for k in range(len(fx["cfg"].patch_nums)):
        np.testing.assert_array_equal(np.asarray(tr[f"idx_s{k}"]), g[f"ar_idx_s{k}"], err_msg=f"ar_idx_s{k}")
    assert_close(nchw(img), g["ar_img"], "ar_img (pallas)")


def test_teacher_forced_with_pallas_attention_in_interpret_mode(fx):
    g, cfg = fx["g"], fx["cfg"]
    t2i = HARTTransformer(cfg.__class__(**{**cfg.__dict__, "attention_impl": "pallas"}))
    with pallas_interpret_mode(True):
        logits, _, _ = t2i.apply(
            fx["tv"], g["context"], g["x_BLCv_wo_first_l"], g["context_position_ids"], g["context_mask"],
            jnp.asarray(_kept_indices(g["tf_last_kept"])), method=HARTTransformer.teacher_forced,
        )
    assert_close(logits, g["tf_logits"], "tf_logits (pallas)")


# --------------------------------------------------------- more_smooth (Gumbel) run
def test_more_smooth_every_stage_from_reference_inputs(fx_smooth):
    """Each stage of the Gumbel-smoothed run, computed from the reference's own inputs
    to that stage (its hidden states and f_hat), within 1e-4."""
    fx = fx_smooth
    g, cfg, t2i, tok = fx["g"], fx["cfg"], fx["t2i"], fx["tok"]
    args = json.loads(str(g["ars_args"]))
    pn = cfg.patch_nums
    n = len(pn)
    b = g["context"].shape[0]
    guidance = float(args["cfg"])
    scfg = SamplingConfig(more_smooth=True, greedy=True)
    codebook = fx["kv"]["params"]["quantize"]["embedding"]["embedding"]
    cond, _ = t2i.apply(fx["tv"], np.concatenate([g["context"], 0 * g["context"]]), method=HARTTransformer.condition)
    f_prev = jnp.zeros((b, pn[-1], pn[-1], cfg.z_channels))
    keys = jax.random.split(jax.random.PRNGKey(0), b)
    for k in range(n):
        ratio = scfg.ratio(k, n)
        assert max(0.27 * (1 - 0.95 * ratio), 0.005) == pytest.approx(float(g[f"ars_tau_s{k}"]), abs=1e-12)
        assert scfg.stage_top_k(k, cfg.vocab_size) == int(g[f"ars_topk_s{k}"])
        h = g[f"ars_hidden_s{k}"][:, -1:] if k == 0 else g[f"ars_hidden_s{k}"]
        logits = cfg_mix(t2i.apply(fx["tv"], h, cond, method=HARTTransformer.logits), guidance * ratio)
        top2 = np.sort(np.asarray(logits), -1)[..., -2:]
        assert_close((top2[..., 1] - top2[..., 0]).min(), g[f"ars_logit_margin_s{k}"], f"ars_logit_margin_s{k}")
        idx, emb = choose_tokens(logits, k, ratio, scfg, codebook, keys, g[f"ars_gumbel_s{k}"])
        np.testing.assert_array_equal(np.asarray(idx), g[f"ars_idx_s{k}"], err_msg=f"ars_idx_s{k}")
        if k < n - 1:
            if k > 0:
                f_prev = jnp.asarray(g[f"ars_fhat_s{k - 1}"].transpose(0, 2, 3, 1))
            f_hat, nxt = tok.apply(
                fx["kv"], f_prev, emb.reshape(b, pn[k], pn[k], -1),
                method=lambda m, f, e: m.quantize.next_autoregressive_input(k, pn, f, e),
            )
            assert_close(nchw(f_hat), g[f"ars_fhat_s{k}"], f"ars_fhat_s{k}")
            assert_close(nchw(nxt), g[f"ars_next_in_s{k + 1}"], f"ars_next_in_s{k + 1}")
    hard = jnp.take(codebook, idx, axis=0)
    z = t2i.apply(fx["tv"], g[f"ars_hidden_s{n - 1}"], jnp.concatenate([hard, hard]),
                  method=HARTTransformer.diffusion_condition)
    assert_close(z.reshape(-1, z.shape[-1]), g["ars_diff_z"], "ars_diff_z")
    assert guidance * scfg.ratio(n - 1, n) == pytest.approx(float(g["ars_diff_cfg"]), abs=1e-12)
    l = pn[-1] ** 2
    final = g[f"ars_fhat_s{n - 2}"].transpose(0, 2, 3, 1) + np.asarray(
        emb + g["ars_diff_out"][: b * l].reshape(b, l, -1)).reshape(b, pn[-1], pn[-1], -1)
    assert_close(nchw(final), g["ars_fhat_final"], "ars_fhat_final")
    img = (tok.apply(fx["kv"], jnp.asarray(g["ars_fhat_final"].transpose(0, 2, 3, 1)), method=HARTAutoEncoder.decode) + 1) / 2
    assert_close(nchw(img), g["ars_img"], "ars_img")


def test_more_smooth_full_chain(fx_smooth):
    fx = fx_smooth
    g, cfg = fx["g"], fx["cfg"]
    _, _, img, tr = _run_sampler(fx, "ars")
    for k in range(len(cfg.patch_nums)):
        np.testing.assert_array_equal(np.asarray(tr[f"idx_s{k}"]), g[f"ars_idx_s{k}"], err_msg=f"ars_idx_s{k}")
    assert_close(nchw(tr["fhat_final"]), g["ars_fhat_final"], "ars_fhat_final", atol=CHAINED_GUMBEL_ATOL, rtol=1e-2)
    assert_close(nchw(img), g["ars_img"], "ars_img", atol=CHAINED_GUMBEL_ATOL, rtol=1e-2)
