"""Residual diffusion head: network, schedule, sampler and training loss vs the golden fixtures.

Every config, weight and array comes from the golden directory: the ``diffloss.net.*``
weights of ``llm/`` (``t2i_golden.npz``) and ``llm_aln/`` (``t2i_aln_golden.npz``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from hart_jax.convert.diffusion_head import diffusion_head_rules, expected_diffloss_params
from hart_jax.convert.table import apply_table, flatten_params
from hart_jax.convert.torch_io import load_manifest, load_state_dict, read_json
from hart_jax.diffusion import create_schedule, space_timesteps
from hart_jax.layers.embeddings import timestep_embedding
from hart_jax.models.diffusion_head import DiffLoss

SETS = [("t2i_golden.npz", "llm"), ("t2i_aln_golden.npz", "llm_aln")]


@functools.lru_cache(maxsize=None)
def _load_head(golden: str, npz_name: str, llm_dir: str):
    from pathlib import Path

    gdir = Path(golden)
    cfg = read_json(gdir / llm_dir / "config.json")
    cvae = int(read_json(gdir / "tokenizer" / "config.json")["z_channels"])
    state = load_state_dict(gdir / llm_dir / "model.safetensors")
    head_state = {k: v for k, v in state.items() if k.startswith("diffloss.net.")}
    assert head_state["diffloss.net.input_proj.weight"].shape[1] == cvae
    model = DiffLoss.from_config(cfg, target_channels=cvae)
    params = apply_table(
        head_state,
        diffusion_head_rules(),
        {"diffloss": expected_diffloss_params(model)},
        source=str(gdir / llm_dir / "model.safetensors"),
    )["diffloss"]
    g = dict(np.load(gdir / npz_name))
    return model, {"params": jax.tree_util.tree_map(jnp.asarray, params)}, g, cfg


@pytest.fixture(scope="module", params=SETS, ids=[s[1] for s in SETS])
def head(request, golden_dir):
    npz_name, llm_dir = request.param
    return _load_head(str(golden_dir), npz_name, llm_dir)


@pytest.fixture(scope="module")
def head_one(golden_dir):
    """The first set only, for behavioural (not parity) checks."""
    return _load_head(str(golden_dir), *SETS[0])


@functools.lru_cache(maxsize=None)
def _jitted_sample(model: DiffLoss, cfg: float):
    def run(variables, z, init_noise, step_noise):
        return model.apply(
            variables, z, cfg, init_noise=init_noise, step_noise=step_noise, method=DiffLoss.sample
        )

    return jax.jit(run)


# ------------------------------------------------------------------ network
@pytest.mark.parity
def test_timestep_embedding(head):
    _, _, g, _ = head
    assert_close(timestep_embedding(jnp.asarray(g["dh_t"]), 256), g["dh_t_freq"], "dh_t_freq")


@pytest.mark.parity
def test_net_forward_and_cfg(head):
    model, variables, g, _ = head
    x, t, c = (jnp.asarray(g[k]) for k in ("dh_x", "dh_t", "dh_c"))
    out = model.apply(variables, x, t, c, method=lambda m, *a: m.net(*a))
    assert_close(out, g["dh_out"], "dh_out")
    scale = float(g["dh_cfg_scale"])
    out_cfg = model.apply(variables, x, t, c, scale, method=lambda m, *a: m.net.forward_with_cfg(*a))
    assert_close(out_cfg, g["dh_out_cfg"], "dh_out_cfg")


# ----------------------------------------------------------------- schedule
@pytest.mark.parity
def test_gen_schedule(head):
    model, _, g, _ = head
    sched = model.gen_schedule
    names = [k for k in g if k.startswith("gen_")]
    assert len(names) == 10
    for name in names:
        ours = getattr(sched, name[len("gen_"):])
        assert ours.dtype == g[name].dtype, name
        if name == "gen_timestep_map":
            np.testing.assert_array_equal(ours, g[name], err_msg=name)
        else:  # float64, computed as the reference does
            np.testing.assert_allclose(ours, g[name], rtol=1e-14, atol=0, err_msg=name)


def test_space_timesteps_specs():
    assert space_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s = space_timesteps(300, "10,15,20")  # sections of 100 steps strided to 10 / 15 / 20
    assert len(s) == 45 and s[:3] == [0, 11, 22] and s[9] == 99 and s[10] == 100 and s[-1] == 299
    assert space_timesteps(10, "") == list(range(10))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(1000, "ddimx")
    sched = create_schedule("ddim25")
    assert sched.num_timesteps == 25 and sched.timestep_map[1] == 40
    # respacing "" keeps the process: betas recomputed from abar equal the originals
    full = create_schedule("")
    assert full.num_timesteps == 1000 and abs(full.betas[-1] - 0.999) < 1e-12


# ------------------------------------------------------------------ sampler
@pytest.mark.parity
@pytest.mark.parametrize("prefix", ["dhs_cfg", "dhs_nocfg", "ar_diff", "ars_diff"])
def test_sample_with_injected_noise(head, prefix):
    model, variables, g, _ = head
    if f"{prefix}_z" not in g:
        assert prefix == "ars_diff" and not any(k.startswith("ars_") for k in g)
        return  # the aln set has no more_smooth run (README)
    cfg_key = f"{prefix}_cfg"
    cfg = float(g[cfg_key])
    z, init, steps = (g[f"{prefix}_{k}"] for k in ("z", "init_noise", "step_noise"))
    assert (cfg == 1.0) == (init.shape[0] == z.shape[0])
    out = _jitted_sample(model, cfg)(variables, z, init, steps)
    assert_close(out, g[f"{prefix}_out"], f"{prefix}_out")
    assert float(jnp.max(jnp.abs(out))) <= model.vae_scale + 1e-6  # x0 clipped to [-1, 1]


@pytest.mark.parity
def test_sample_with_key_deterministic_and_jittable(head_one):
    model, variables, g, _ = head_one
    z = jnp.asarray(g["dhs_cfg_z"])

    @functools.partial(jax.jit, static_argnums=1)
    def run(key, cfg):
        return model.apply(variables, z, cfg, key, method=DiffLoss.sample_with_key)

    a = np.asarray(run(jax.random.PRNGKey(0), 2.0))
    b = np.asarray(run(jax.random.PRNGKey(0), 2.0))
    c = np.asarray(run(jax.random.PRNGKey(1), 2.0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (z.shape[0], model.target_channels) and np.isfinite(a).all()
    assert np.abs(a - c).max() > 1e-3
    assert np.abs(a).max() <= model.vae_scale + 1e-6
    unguided = np.asarray(run(jax.random.PRNGKey(0), 1.0))  # cfg == 1.0: plain network, no duplication
    assert unguided.shape == a.shape and np.abs(unguided - a).max() > 1e-3


# --------------------------------------------------------------------- loss
@pytest.mark.parity
def test_teacher_forced_diff_loss(head):
    model, variables, g, cfg = head
    mul = int(cfg["diffusion_batch_mul"])
    assert g["tf_diff_t"].shape[0] == mul * g["tf_diff_target"].shape[0] * g["tf_diff_target"].shape[1]

    @jax.jit
    def run(target, z, t, noise):
        return model.apply(variables, target, z, mul, t=t, noise=noise, method=DiffLoss.tiled_loss)

    loss = run(g["tf_diff_target"], g["tf_diff_z"], g["tf_diff_t"], g["tf_diff_noise"])
    assert_close(loss, g["tf_diff_loss"], "tf_diff_loss")


@pytest.mark.parity
def test_loss_gradient(head_one):
    model, variables, g, cfg = head_one
    target, z = jnp.asarray(g["tf_diff_target"]), jnp.asarray(g["tf_diff_z"])
    mul = int(cfg["diffusion_batch_mul"])

    def f(p, key):
        return model.apply({"params": p}, target, z, mul, key=key, method=DiffLoss.tiled_loss)

    f = jax.jit(f)
    loss, grads = jax.jit(jax.value_and_grad(f))(variables["params"], jax.random.PRNGKey(3))
    flat = flatten_params(grads)
    assert np.isfinite(float(loss))
    assert set(flat) == set(flatten_params(variables["params"]))
    for path, gr in flat.items():
        gr = np.asarray(gr)
        assert np.isfinite(gr).all(), path
        assert np.abs(gr).max() > 0, path
    # the key drives t and noise: same key, same loss; another key, another loss
    assert float(f(variables["params"], jax.random.PRNGKey(3))) == pytest.approx(float(loss), rel=1e-5)
    assert abs(float(f(variables["params"], jax.random.PRNGKey(4))) - float(loss)) > 1e-6


@pytest.mark.parity
def test_vb_term_sees_detached_mean(head_one):
    """The ε outputs get gradient from the MSE only; the VB term trains v alone."""
    model, variables, g, cfg = head_one
    mul, c = int(cfg["diffusion_batch_mul"]), model.target_channels
    t, noise = jnp.asarray(g["tf_diff_t"]), jnp.asarray(g["tf_diff_noise"])

    def full(p):
        return model.apply({"params": p}, g["tf_diff_target"], g["tf_diff_z"], mul, t=t, noise=noise,
                           method=DiffLoss.tiled_loss)

    def mse_only(p):
        sched = model.train_schedule
        x0 = jnp.tile(jnp.asarray(g["tf_diff_target"]).reshape(-1, c), (mul, 1)) / model.vae_scale
        zz = jnp.tile(jnp.asarray(g["tf_diff_z"]).reshape(-1, model.z_channels), (mul, 1))
        x_t = (sched.f32("sqrt_alphas_cumprod")[t][:, None] * x0
               + sched.f32("sqrt_one_minus_alphas_cumprod")[t][:, None] * noise)
        eps = model.apply({"params": p}, x_t, t, zz, method=lambda m, *a: m.net(*a))[:, :c]
        return jnp.mean((noise - eps) ** 2)

    g_full = jax.jit(jax.grad(full))(variables["params"])["net"]["final_layer"]["linear"]
    g_mse = jax.jit(jax.grad(mse_only))(variables["params"])["net"]["final_layer"]["linear"]
    assert_close(g_full["kernel"][:, :c], g_mse["kernel"][:, :c], "eps kernel grad")
    assert_close(g_full["bias"][:c], g_mse["bias"][:c], "eps bias grad")
    assert float(jnp.abs(g_mse["kernel"][:, c:]).max()) == 0.0
    assert float(jnp.abs(g_full["kernel"][:, c:]).max()) > 0.0


def test_decoder_nll_matches_gaussian_bin_mass():
    """t == 0 uses the discretized-Gaussian NLL (no fixture row has t == 0)."""
    from math import erf, log, sqrt

    from hart_jax.models.diffusion_head import _discretized_gaussian_log_likelihood

    def cdf(v):
        return 0.5 * (1 + erf(v / sqrt(2)))

    x = np.array([-1.0, -0.3, 0.0, 0.42, 1.0], np.float32)
    mu = np.array([-0.9, -0.25, 0.05, 0.4, 0.97], np.float32)
    log_s = np.array([-2.0, -3.0, -2.5, -4.0, -2.0], np.float32)
    ours = np.asarray(_discretized_gaussian_log_likelihood(x, mu, log_s))
    for i in range(len(x)):
        s = np.exp(float(log_s[i]))
        hi, lo = (float(x[i]) + 1 / 255 - mu[i]) / s, (float(x[i]) - 1 / 255 - mu[i]) / s
        if x[i] < -0.999:  # the lowest bin extends to -inf
            want = log(cdf(hi))
        elif x[i] > 0.999:  # the highest bin extends to +inf
            want = log(1 - cdf(lo))
        else:
            want = log(cdf(hi) - cdf(lo))
        assert abs(ours[i] - want) < 2e-3 * max(1.0, abs(want)), (i, ours[i], want)


@pytest.mark.parity
def test_bad_inputs_raise(head_one):
    model, variables, g, cfg = head_one
    mul = int(cfg["diffusion_batch_mul"])
    x, t, c = (jnp.asarray(g[k]) for k in ("dh_x", "dh_t", "dh_c"))
    net = lambda m, *a: m.net(*a)  # noqa: E731
    with pytest.raises(ValueError, match="x must be"):
        model.apply(variables, x[:, :-1], t, c, method=net)
    with pytest.raises(ValueError, match="c must be"):
        model.apply(variables, x, t, c[:-1], method=net)
    with pytest.raises(ValueError, match="t must be"):
        model.apply(variables, x, t[:-1], c, method=net)
    z, init, steps = g["dhs_cfg_z"], g["dhs_cfg_init_noise"], g["dhs_cfg_step_noise"]
    smp = DiffLoss.sample
    with pytest.raises(ValueError, match="init_noise must be"):
        model.apply(variables, z, 2.0, init_noise=steps[0], step_noise=steps, method=smp)
    with pytest.raises(ValueError, match="step_noise must be"):
        model.apply(variables, z, 2.0, init_noise=init, step_noise=steps[:-1], method=smp)
    assert z.shape[0] % 2 == 0  # a guided run: cond rows then uncond rows
    with pytest.raises(ValueError, match="even N"):  # one row less: odd
        model.apply(variables, z[:-1], 2.0, init_noise=init, step_noise=steps[:, :-1], method=smp)
    with pytest.raises(ValueError, match="cfg must be a concrete number"):
        jax.jit(lambda s: model.apply(variables, z, s, init_noise=init, step_noise=steps, method=smp))(2.0)
    tgt, zz = g["tf_diff_target"], g["tf_diff_z"]
    with pytest.raises(ValueError, match="z must be"):
        model.apply(variables, tgt, zz[:, :-1], mul, t=g["tf_diff_t"], noise=g["tf_diff_noise"],
                    method=DiffLoss.tiled_loss)
    with pytest.raises(ValueError, match="t must be"):
        model.apply(variables, tgt, zz, mul, t=g["tf_diff_t"][:-1], noise=g["tf_diff_noise"],
                    method=DiffLoss.tiled_loss)
    with pytest.raises(ValueError, match="needs a key"):
        model.apply(variables, tgt, zz, mul, method=DiffLoss.tiled_loss)


# ---------------------------------------------------------------- full size
def test_full_size_params_and_manifest_coverage(golden_dir):
    """The release-size head (config and parameter count from the fixture's summary.json)."""
    summary = read_json(golden_dir / "hart-0.7b-1024px.summary.json")
    cvae = int(summary["tokenizer"]["config"]["z_channels"])
    model = DiffLoss.from_config(summary["transformer"]["config"], target_channels=cvae)
    expected = expected_diffloss_params(model)
    total = sum(int(np.prod(v.shape)) for v in flatten_params(expected).values())
    assert total == summary["transformer"]["diffloss_params"]
    manifest = load_manifest(golden_dir / "hart-0.7b-1024px.transformer.keys.json")
    head_keys = {k: v for k, v in manifest.items() if k.startswith("diffloss.")}
    assert head_keys and all(k.startswith("diffloss.net.") for k in head_keys)
    converted = apply_table(
        head_keys, diffusion_head_rules(), {"diffloss": expected}, source="manifest", shapes_only=True
    )
    assert len(flatten_params(converted)) == len(head_keys) == len(flatten_params(expected))
