"""Tokenizer training (``task="tokenizer"``): discriminator + converter, objective, runs, export.

``train.py`` runs in subprocesses (the ``tokenizer_tiny`` preset, 1 CPU device each),
started by the first test and collected by the later ones, so the in-process tests
overlap with them:
  * straight: N steps from scratch; killed: SIGKILL after KILL_AT (between checkpoints),
    then resumed -> bit-identical state and the same data order; diverge: a huge
    learning rate -> ``TrainingDiverged``. These use a smaller tokenizer (SMALL_FLAGS,
    8 px images) than the preset: compile time on a shared 2-core machine;
  * decoder: the preset with every tokenizer field of the golden config (its image size),
    ``trainable="decoder"`` fine-tuning from the
    converted golden tokenizer with a discriminator kept by ``--keep-discriminator``
    (t2i records through the image-only pipeline).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tests import train_data

REPO = Path(__file__).resolve().parents[1]
N = 20
EVERY = 5
KILL_AT = 12  # between checkpoints: resumes from 10 and redoes 11, 12
DISC_START = 10  # checkpoints 5 and 10 are before the discriminator starts, 15 and 20 after
DECODER_STEPS = 4
NDF = 8  # the tokenizer_tiny preset's discriminator width


# ------------------------------------------------------------ torch PatchGAN
def taming_discriminator(ndf: int = NDF, n_layers: int = 3, in_ch: int = 3) -> torch.nn.Sequential:
    # ndf: the tokenizer_tiny preset's, so the decoder run can start from this discriminator
    """taming's ``NLayerDiscriminator`` layout with BatchNorm, random norms and running stats."""
    nn = torch.nn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _taming(nn, ndf, n_layers, in_ch)


def _taming(nn, ndf, n_layers, in_ch):
    seq = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    model = nn.Sequential(*seq)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def disc_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """``disc.main.*`` numpy copies (copies: torch updates running stats in place)."""
    return {f"disc.main.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}


def golden_with_disc(golden_dir: Path, dst: Path, extra: dict | None = None) -> Path:
    """A copy of the golden tokenizer directory whose weights also hold a discriminator."""
    shutil.copytree(golden_dir / "tokenizer", dst)
    state = load_file(dst / "model.safetensors")
    state.update(disc_state(taming_discriminator()))
    state.update(extra or {})
    save_file(state, dst / "model.safetensors")
    return dst


# A smaller tokenizer than the tiny preset (8 px images) for the runs and tests that only
# exercise the loop / objective logic: less to compile.
SMALL_TOKENIZER = dict(ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=(1, 2, 4))
SMALL_FLAGS = ("--config.tokenizer.ch_mult=(1,2)", "--config.tokenizer.num_res_blocks=1",
               "--config.tokenizer.v_patch_nums=(1,2,4)", "--config.discriminator.n_layers=1")


# ----------------------------------------------------------------- runs
def launch(workdir: Path, data_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'train.py'}:tokenizer_tiny",
        f"--workdir={workdir}", f"--config.data.name={name}", f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={N}", f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=5",
        "--config.log.example_ids=True", f"--config.tokenizer_loss.disc_start={DISC_START}", *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def tokenizer_flags(config_json: Path) -> list[str]:
    """``--config.tokenizer.*`` flags setting every TokenizerConfig field from a fixture's config.json."""
    import dataclasses

    from hart_jax.models.autoencoder import TokenizerConfig

    cfg = TokenizerConfig.from_hf_dict(json.loads(config_json.read_text()))
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        v = "(" + ",".join(str(x) for x in v) + ")" if isinstance(v, tuple) else v
        out.append(f"--config.tokenizer.{f.name}={v}")
    return out


class Runs:
    """Subprocess runs started at once; ``get(name)`` waits for one (``resumed`` starts after ``killed``)."""

    def __init__(self, root: Path, converted: Path, golden_config: Path) -> None:
        self.root, self.converted = root, converted
        self.data = root / "data"
        train_data.write(self.data, 48, kind="c2i", name="shapes", size=32)
        train_data.write(self.data, 16, kind="t2i", name="shapes_t2i", size=32)
        self.procs = {
            "straight": launch(root / "straight", self.data, "shapes", *SMALL_FLAGS),
            "killed": launch(root / "resumed", self.data, "shapes", f"--config.train.sigkill_at_step={KILL_AT}",
                             *SMALL_FLAGS),
            "decoder": launch(
                root / "decoder", self.data, "shapes_t2i", "--config.tokenizer_train.trainable=decoder",
                f"--config.init_from={converted}", f"--config.train.num_steps={DECODER_STEPS}",
                *tokenizer_flags(golden_config),
            ),
            "diverge": launch(
                root / "diverge", self.data, "shapes", "--config.optim.lr=1e30", "--config.checkpoint.every_steps=1",
                "--config.train.num_steps=4", *SMALL_FLAGS,
            ),
        }
        self.results: dict[str, tuple[int, str]] = {}

    def get(self, name: str) -> tuple[int, str]:
        if name == "resumed" and name not in self.results:
            self.get("killed")
            self.procs["resumed"] = launch(self.root / "resumed", self.data, "shapes", *SMALL_FLAGS)
        if name not in self.results:
            out, _ = self.procs[name].communicate(timeout=900)
            self.results[name] = (self.procs[name].returncode, out)
        return self.results[name]

    def ok(self, name: str) -> Path:
        rc, out = self.get(name)
        assert rc == 0, out[-3000:]
        return self.root / ("resumed" if name == "killed" else name)


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    """The golden tokenizer + a discriminator, converted with ``--keep-discriminator``."""
    from hart_jax.convert.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("converted")
    src = golden_with_disc(golden_dir, root / "src")
    out = root / "tokenizer"
    assert convert_main(["tokenizer", str(src), str(out), "--keep-discriminator"]) == 0
    return src, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, converted, golden_dir):
    r = Runs(tmp_path_factory.mktemp("tok_runs"), converted[1], golden_dir / "tokenizer" / "config.json")
    yield r
    for p in r.procs.values():  # a failed or interrupted session leaves no training process behind
        if p.poll() is None:
            p.kill()
            p.wait()


def restore(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()})
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"], mngr.all_steps()


def series(workdir: Path) -> dict[str, dict[int, float]]:
    from hart_jax.train.metrics import read_scalars

    files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    out: dict[str, dict[int, float]] = {}
    for step, tag, v in read_scalars(files[0]):
        out.setdefault(tag, {})[step] = v
    return out


def flat(tree) -> dict[str, np.ndarray]:
    """``{"a/0/b": leaf}`` (dict keys, attributes and sequence indices)."""

    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    out = {"/".join(name(k) for k in p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert len(out) == len(jax.tree_util.tree_leaves(tree))
    return out


def test_runs_start(runs):
    """Starts the subprocess runs (the in-process tests overlap with them). In random order a
    test that needs the resumed run may come first and start it (after the killed one ends)."""
    first = {"straight", "killed", "decoder", "diverge"}
    assert first <= set(runs.procs) and set(runs.procs) - first <= {"resumed"}, set(runs.procs)


# ------------------------------------------------- discriminator + converter
def test_converted_discriminator_matches_torch(converted, golden_dir):
    from hart_jax.checkpoint import load_converted
    from hart_jax.convert.table import flatten_params
    from hart_jax.convert.tokenizer import convert_tokenizer
    from hart_jax.loading import load_discriminator
    from hart_jax.models.discriminator import NLayerDiscriminator

    src, out = converted
    # the autoencoder part is exactly what a plain conversion gives
    _, params = load_converted(out, kind="tokenizer")
    _, ref = convert_tokenizer(golden_dir / "tokenizer")
    a, b = flatten_params(params), flatten_params(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    cfg, variables = load_discriminator(out)
    assert (cfg.ndf, cfg.n_layers, cfg.norm) == (NDF, 3, "batch")
    disc = NLayerDiscriminator(cfg)
    tm = taming_discriminator()
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref_eval = tm.eval()(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        ref_train = tm.train()(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got_eval = disc.apply(variables, x.transpose(0, 2, 3, 1), train=False)
    got_train, upd = disc.apply(variables, x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"])
    assert got_eval.shape == ref_eval.shape == (4, 2, 2, 1)
    np.testing.assert_allclose(got_eval, ref_eval, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_train, ref_train, atol=1e-4, rtol=1e-4)
    # running statistics updated as torch does (momentum 0.1, unbiased variance)
    for i in cfg.norm_indices():
        np.testing.assert_allclose(upd["batch_stats"][f"main_{i}"]["mean"], tm[i].running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"][f"main_{i}"]["var"], tm[i].running_var.numpy(), atol=1e-5)


def test_keep_discriminator_errors_are_one_line(golden_dir, tmp_path, capsys):
    from hart_jax.convert.__main__ import main as convert_main

    bad = golden_with_disc(golden_dir, tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    del state["disc.main.11.bias"]
    state["disc.main.12.weight"] = np.zeros((3,), np.float32)
    state["disc.main.5.weight"] = np.zeros((7, 16, 4, 4), np.float32)
    save_file(state, bad / "model.safetensors")
    assert convert_main(["tokenizer", str(bad), str(tmp_path / "o1"), "--keep-discriminator"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "main_11/bias" in err and "disc.main.12.weight" in err and "disc.main.5.weight" in err, err
    assert not (tmp_path / "o1").exists()
    # a tokenizer without disc.* keys
    assert convert_main(["tokenizer", str(golden_dir / "tokenizer"), str(tmp_path / "o3"), "--keep-discriminator"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no disc." in err and len(err.splitlines()) == 1, err


def test_release_discriminator_manifest_is_covered(golden_dir):
    from hart_jax.convert.discriminator import convert_discriminator_state, expected_discriminator_variables
    from hart_jax.convert.table import flatten_params
    from hart_jax.convert.torch_io import load_manifest

    manifest = load_manifest(golden_dir / "hart-0.7b-1024px.tokenizer.keys.json")
    cfg, got = convert_discriminator_state(manifest, source="manifest", shapes_only=True)
    assert (cfg.ndf, cfg.n_layers, cfg.norm, cfg.in_channels) == (64, 3, "batch", 3)
    want = flatten_params(expected_discriminator_variables(cfg))
    got = flatten_params(got)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
    disc_keys = [k for k in manifest if k.startswith("disc.") and not k.endswith("num_batches_tracked")]
    assert len(disc_keys) == len(want)
    assert sum(int(np.prod(manifest[k].shape)) for k in disc_keys) == sum(int(np.prod(v.shape)) for v in want.values())


# ----------------------------------------------------------------- objective
def test_codebook_stats():
    from hart_jax.train.tokenizer_objective import codebook_stats

    idx = [jnp.zeros((2, 1), jnp.int32), jnp.asarray([[0, 1], [2, 3]], jnp.int32)]
    s = codebook_stats(idx, 8)
    assert float(s["usage/s0"]) == pytest.approx(1 / 8) and float(s["perplexity/s0"]) == pytest.approx(1.0)
    assert float(s["usage/s1"]) == pytest.approx(4 / 8) and float(s["perplexity/s1"]) == pytest.approx(4.0)
    assert float(s["perplexity/mean"]) == pytest.approx(2.5)


def test_codebook_init_choices():
    """Fresh codebooks: VAR's U(-1/V, 1/V) by default, N(0, 1/C) on request; others refused."""
    from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
    from hart_jax.train.tokenizer_state import init_autoencoder

    cfg = TokenizerConfig(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=(1, 2, 4))
    model = HARTAutoEncoder(cfg)
    key = jax.random.PRNGKey(0)
    uni = np.asarray(init_autoencoder(model, key, 8)["quantize"]["embedding"]["embedding"])
    nor = np.asarray(init_autoencoder(model, key, 8, "normal")["quantize"]["embedding"]["embedding"])
    assert uni.shape == nor.shape == (256, 16)
    assert np.abs(uni).max() <= 1 / 256 and np.abs(uni).max() > 0.9 / 256
    assert abs(nor.std() - 0.25) < 0.02  # sqrt(1 / C)
    with pytest.raises(ValueError, match="codebook_init"):
        init_autoencoder(model, key, 8, "zeros")


@pytest.fixture(scope="module")
def gen_setup():
    """Tiny autoencoder + discriminator (numpy-random weights, no init compile), a batch, a key."""
    from configs.train import get_config
    from hart_jax.models.autoencoder import HARTAutoEncoder
    from hart_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
    from hart_jax.train.loop import random_tokenizer_variables
    from hart_jax.train.tokenizer_loop import tokenizer_config_from
    from hart_jax.train.tokenizer_state import init_disc
    from tests.train_data import examples

    c = get_config("tokenizer_tiny")
    c.tokenizer.update(SMALL_TOKENIZER)
    tok_cfg = tokenizer_config_from(c)
    model = HARTAutoEncoder(tok_cfg)
    side = tok_cfg.v_patch_nums[-1] * tok_cfg.downsample
    params = random_tokenizer_variables(model, side, seed=3)["params"]
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=NDF, n_layers=1))
    dvars = jax.jit(lambda k: init_disc(disc, k))(jax.random.PRNGKey(1))
    x = np.stack([r["image"] for r in examples(4, size=side)]).astype(np.float32) / 127.5 - 1
    return c, model, disc, params, dvars, jnp.asarray(x)


def stand_in_lpips(p, x, y):
    """A differentiable stand-in for LPIPS (the real module is another worker's)."""
    return p["w"] * jnp.mean(jnp.abs(x - y) ** 1.5, axis=(1, 2, 3))


def _grads_fn(c, model, disc, **loss_kw):
    from hart_jax.train.tokenizer_objective import TokenizerLossConfig, generator_grads

    lcfg = TokenizerLossConfig.from_config(dict(c.tokenizer_loss, perceptual_weights="stand-in", **loss_kw))
    return lcfg, jax.jit(functools.partial(
        generator_grads, model=model, disc=disc, lcfg=lcfg, patch_nums=model.cfg.v_patch_nums,
        perceptual_fn=stand_in_lpips,
    ))


def test_warmup_gradient_and_adaptive_weight(gen_setup):
    from hart_jax.train.tokenizer_objective import generator_adv_loss, reconstruction_loss

    c, model, disc, params, dvars, x = gen_setup
    frozen = {"w": jnp.float32(0.7)}
    key = jax.random.PRNGKey(42)
    lcfg, fn = _grads_fn(c, model, disc, disc_weight=0.8, perceptual_weight=0.5)
    _, fn0 = _grads_fn(c, model, disc, disc_weight=0.0, perceptual_weight=0.5)
    g_before, _, m_before = fn(params, dvars, x, key, jnp.asarray(False), frozen)
    g_zero, _, _ = fn0(params, dvars, x, key, jnp.asarray(True), frozen)
    g_after, _, m_after = fn(params, dvars, x, key, jnp.asarray(True), frozen)
    fb, fz, fa = flat(g_before), flat(g_zero), flat(g_after)
    for k in fb:
        np.testing.assert_array_equal(fb[k], fz[k], err_msg=k)  # no adversarial gradient before the start
    assert any(not np.array_equal(fb[k], fa[k]) for k in fb if k.startswith("decoder"))
    assert m_before["loss"] == pytest.approx(float(m_before["nll"] + m_before["vq"]), rel=1e-6)
    assert float(m_before["disc_active"]) == 0 and float(m_after["disc_active"]) == 1

    # adaptive weight against a brute-force computation of each term's gradient
    def fwd(p):
        r = model.apply({"params": p}, x, model.cfg.v_patch_nums, lcfg.skip_continuous_prob, rngs={"quantize": key})
        return r["out"]

    def nll(p):
        out = fwd(p)
        return lcfg.recon_weight * reconstruction_loss(out, x) + lcfg.perceptual_weight * jnp.mean(stand_in_lpips(frozen, out, x))

    def g(p):
        logits, _ = disc.apply(dvars, fwd(p), train=True, mutable=["batch_stats"])
        return generator_adv_loss(logits)

    @jax.jit
    def brute(p):
        last = lambda t: t["decoder"]["conv_out"]["kernel"]  # noqa: E731
        gn, gg = last(jax.grad(nll)(p)), last(jax.grad(g)(p))
        return jnp.clip(jnp.linalg.norm(gn) / (jnp.linalg.norm(gg) + 1e-4), 0, 1e4) * lcfg.disc_weight

    want = float(brute(params))
    assert float(m_after["adaptive_lambda"]) == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert want > 0
    # before the start the discriminator is not run at all: its terms read 0
    assert float(m_before["adaptive_lambda"]) == 0 and float(m_before["g"]) == 0 and float(m_before["logits_fake"]) == 0


def test_build_rejects_bad_settings(tmp_path):
    from configs.train import get_config
    from hart_jax.train.tokenizer_loop import build_tokenizer

    def cfg(**kw):
        c = get_config("tokenizer_tiny")
        for k, v in kw.items():
            sec, field = k.split("__")
            c[sec][field] = v
        return c

    dev = jax.devices()[:1]
    with pytest.raises(ValueError, match="set init_from"):
        build_tokenizer(cfg(tokenizer_train__trainable="decoder"), dev)
    with pytest.raises(ValueError, match="grad_accum=1"):
        build_tokenizer(cfg(train__grad_accum=2), dev)
    with pytest.raises(ValueError, match="not found"):
        build_tokenizer(cfg(tokenizer_loss__perceptual_weights=str(tmp_path / "lpips.pth")), dev)
    with pytest.raises(ValueError, match="disc_loss"):
        build_tokenizer(cfg(tokenizer_loss__disc_loss="wgan"), dev)
    comp = build_tokenizer(cfg(tokenizer_loss__perceptual_weights="x"), dev, perceptual=(stand_in_lpips, {"w": 1.0}))
    assert comp.perceptual_fn is stand_in_lpips and float(comp.frozen_params["w"]) == 1.0


# ----------------------------------------------------------------- runs
def test_sigkill_resume_is_exact(runs):
    a_dir = runs.ok("straight")
    rc, out = runs.get("killed")
    assert rc == -9, f"expected SIGKILL, got {rc}: {out[-2000:]}"
    rc, out = runs.get("resumed")
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and f"checkpoints/{N // 2}" in out
    b_dir = runs.root / "resumed"
    a, _ = restore(a_dir, N)
    b, _ = restore(b_dir, N)
    assert int(a["step"]) == int(b["step"]) == N
    for name in ("params", "ema_params", "opt_state", "disc_params", "disc_batch_stats", "disc_opt_state", "rng"):
        fa, fb = flat(a[name]), flat(b[name])
        assert fa.keys() == fb.keys() and len(fa) > 0, name
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{name}/{k}")
    ids = []
    for d in (a_dir, b_dir):
        rows = {}
        for line in (d / "example_ids.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row["ids"]
        ids.append(rows)
    assert sorted(ids[0]) == list(range(1, N + 1)) and ids[0] == ids[1]
    assert len((b_dir / "example_ids.jsonl").read_text().splitlines()) == KILL_AT + (N - N // 2)


def test_reconstruction_falls_and_codebook_metrics(runs):
    s = series(runs.ok("straight"))
    for tag in ("train/loss", "train/rec", "train/vq", "train/g", "train/d", "train/adaptive_lambda",
                "train/logits_real", "train/logits_fake", "train/psnr", "train/grad_norm", "train/d_grad_norm",
                "train/lr", "train/usage/mean", "train/perplexity/mean"):
        assert sorted(s[tag]) == list(range(1, N + 1)), tag
    rec = [s["train/rec"][i] for i in range(1, N + 1)]
    assert np.mean(rec[-4:]) < 0.6 * np.mean(rec[:3]), rec
    from configs.train import get_config

    vocab = int(get_config("tokenizer_tiny").tokenizer.vocab_size)  # the run's preset (SMALL_FLAGS keep it)
    n_scales = len(SMALL_TOKENIZER["v_patch_nums"])
    for k in range(n_scales):
        for i in range(1, N + 1):
            assert 0 < s[f"train/usage/s{k}"][i] <= 1
            assert 1 - 1e-4 <= s[f"train/perplexity/s{k}"][i] <= vocab
    assert f"train/usage/s{n_scales}" not in s
    # each step logs the PSNR of the path it decoded
    hybrid, discrete = s.get("train/psnr_hybrid", {}), s.get("train/psnr_discrete", {})
    assert sorted(set(hybrid) | set(discrete)) == list(range(1, N + 1)) and hybrid and discrete


def test_discriminator_waits_for_disc_start(runs):
    from configs.train import get_config
    from hart_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
    from hart_jax.train.tokenizer_state import _keys, init_disc

    d = runs.ok("straight")
    seed = int(get_config("tokenizer_tiny").seed)
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=NDF, n_layers=1))  # SMALL_FLAGS
    init = jax.jit(lambda k: init_disc(disc, k))(_keys(seed)[1])
    s = series(d)
    early, start = restore(d, EVERY)[0], restore(d, DISC_START)[0]
    for name, ref in (("disc_params", init["params"]), ("disc_batch_stats", init["batch_stats"]),
                      ("disc_opt_state", None)):
        a, b = flat(early[name]), flat(start[name])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")  # no update in steps 6..10
        if ref is not None:  # and none in 1..5: still the init (the run's jit may round it 1 ulp apart)
            want = flat(ref)
            assert want.keys() == a.keys()
            for k in want:
                np.testing.assert_allclose(a[k], want[k], rtol=1e-6, atol=1e-9, err_msg=f"{name}/{k}")
    assert all(int(v) == 0 for k, v in flat(start["disc_opt_state"]).items() if k.endswith("count"))
    assert all(s["train/disc_active"][i] == 0 for i in range(1, DISC_START + 1))
    st, _ = restore(d, DISC_START + EVERY)
    assert not np.array_equal(flat(st["disc_params"])["main_0/kernel"], np.asarray(init["params"]["main_0"]["kernel"]))
    assert not np.array_equal(flat(st["disc_batch_stats"])["main_3/mean"], np.asarray(init["batch_stats"]["main_3"]["mean"]))
    assert s["train/disc_active"][DISC_START + 1] == 1


def test_decoder_finetune_keeps_frozen_parts(runs, converted):
    from hart_jax.checkpoint import load_converted
    from hart_jax.loading import load_discriminator

    d = runs.ok("decoder")
    st, _ = restore(d, DECODER_STEPS)
    _, src = load_converted(converted[1], kind="tokenizer")
    src = flat(src["params"])
    p, ema = flat(st["params"]), flat(st["ema_params"])
    frozen = [k for k in src if k.split("/")[0] in ("encoder", "quant_conv", "quantize")]
    assert any(k.startswith("quantize/quant_resi") for k in frozen) and "quantize/embedding/embedding" in frozen
    for k in frozen:
        np.testing.assert_array_equal(p[k], src[k], err_msg=k)
        np.testing.assert_array_equal(ema[k], src[k], err_msg=f"ema {k}")
    assert not np.array_equal(p["decoder/conv_out/kernel"], src["decoder/conv_out/kernel"])
    assert not np.array_equal(p["post_quant_conv/kernel"], src["post_quant_conv/kernel"])
    # the discriminator came from init_from (and has not started updating)
    _, dv = load_discriminator(converted[1])
    for name, ref in (("disc_params", dv["params"]), ("disc_batch_stats", dv["batch_stats"])):
        got, want = flat(st[name]), flat(ref)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}/{k}")


def test_nonfinite_loss_stops(runs):
    rc, out = runs.get("diverge")
    assert rc not in (0, -9), out[-2000:]
    assert "TrainingDiverged" in out and "is not finite" in out and "last good checkpoint is" in out, out[-2000:]
    st, steps = restore(runs.root / "diverge", max(restore_steps(runs.root / "diverge")))
    assert all(np.isfinite(x).all() for x in flat(st["params"]).values())


def restore_steps(workdir: Path) -> list[int]:
    import orbax.checkpoint as ocp

    return list(ocp.CheckpointManager(workdir / "checkpoints").all_steps())


# ----------------------------------------------------------------- export
def test_export_tokenizer_loads_and_runs(runs, tmp_path, capsys):
    from hart_jax.loading import load_discriminator
    from hart_jax.tokenizer import HybridTokenizer
    from hart_jax.train.export import main as export_main

    d = runs.ok("straight")
    out = tmp_path / "exported"
    assert export_main(["tokenizer", str(d), str(out), "--keep-discriminator"]) == 0
    st, _ = restore(d, N)
    tok = HybridTokenizer.from_converted(out)
    got, want = flat(tok.variables["params"]), flat(st["ema_params"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    side = tok.config.v_patch_nums[-1] * tok.config.downsample
    img = np.random.default_rng(0).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    tokens = tok.encode(img)
    rec = np.asarray(tok.decode(tokens.indices, tokens.residual))
    assert rec.shape == img.shape and np.isfinite(rec).all()
    dcfg, dv = load_discriminator(out)
    assert dcfg.ndf == NDF
    np.testing.assert_array_equal(dv["params"]["main_0"]["kernel"], flat(st["disc_params"])["main_0/kernel"])
    # the raw params, and one-line errors with exit status 2
    assert export_main(["tokenizer", str(d), str(tmp_path / "raw"), "--raw"]) == 0
    capsys.readouterr()
    assert export_main(["tokenizer", str(d), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert export_main(["tokenizer", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "no checkpoints/" in capsys.readouterr().err
    assert export_main(["transformer", str(d), str(tmp_path / "x")]) == 2
    assert "not a transformer run" in capsys.readouterr().err


def test_export_transformer(tmp_path):
    """A fabricated transformer run checkpoint (shapes from eval_shape, no compile) exports
    to a directory ``load_converted(kind="transformer")`` and ``T2IConfig`` read back."""
    import orbax.checkpoint as ocp

    from configs.train import get_config
    from hart_jax.checkpoint import load_converted
    from hart_jax.models.transformer import T2IConfig, abstract_params
    from hart_jax.train.export import main as export_main

    c = get_config("tiny_t2i")
    md = dict(c.model)
    md["patch_nums"] = tuple(md["patch_nums"])
    tcfg = T2IConfig(**md)
    rng = np.random.default_rng(0)
    ema = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(tcfg))
    state = {"step": np.int32(7), "params": jax.tree_util.tree_map(lambda x: x + 1, ema), "ema_params": ema}
    mngr = ocp.CheckpointManager(
        tmp_path / "run" / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    meta = {"config": json.loads(c.to_json_best_effort()), "resolution": 24}
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    mngr.close()
    out = tmp_path / "llm"
    assert export_main(["transformer", str(tmp_path / "run"), str(out)]) == 0
    cfg_d, params = load_converted(out, kind="transformer")
    assert T2IConfig.from_hf_dict(cfg_d, vocab_size=cfg_d["vocab_size"], z_channels=cfg_d["z_channels"]) == tcfg
    got, want = flat(params["params"]), flat(ema)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert export_main(["tokenizer", str(tmp_path / "run"), str(tmp_path / "t")]) == 2
