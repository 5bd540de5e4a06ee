"""The text-to-image pipeline and sample.py on the tiny golden model.

A pipeline directory is built with the one-command converter from the golden
release layout (llm/ + tokenizer/) and a tiny random Qwen2 whose width matches the
golden transformer's context (24), with a byte-level BPE tokenizer and a test prefix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from conftest import REPO, assert_close, nchw
from hart_jax.convert.__main__ import main as convert_main
from hart_jax.errors import CheckpointError
from hart_jax.pipeline import HARTPipeline
from hart_jax.sampling import InjectedNoise, SamplingConfig
from test_prompts import build_tokenizer

PROMPTS = ["a cat sleeping", "a city street", "a bus passing"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=400, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Qwen2Model(cfg).eval()
    d = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(d)
    build_tokenizer(d, "right")
    (d / "prefix.txt").write_text("User Prompt:\n")
    return d


@pytest.fixture(scope="module")
def pipe_dir(golden_dir, qwen_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "hart"
    rc = convert_main(["release", str(golden_dir), str(qwen_dir), str(out), "--prefix-from",
                       str(qwen_dir / "prefix.txt"), "--allow-prefix-mismatch"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return HARTPipeline.from_converted(pipe_dir)


@pytest.mark.parity
def test_pipeline_reproduces_the_golden_greedy_image(pipe, golden_dir):
    g = np.load(golden_dir / "t2i_golden.npz")
    args = json.loads(str(g["ar_args"]))
    img = pipe.generate_from_context(
        g["context"], g["context_mask"], g["context_position_ids"],
        guidance_scale=float(args["cfg"]),
        sampling=SamplingConfig(more_smooth=False, greedy=True),
        injected=InjectedNoise(diff_init=g["ar_diff_init_noise"], diff_steps=g["ar_diff_step_noise"]),
    )
    assert_close(nchw(img), g["ar_img"], "ar_img")


def test_same_seed_same_images_and_batch_equals_single_calls(pipe):
    a = pipe(PROMPTS, seed=5, output="float")
    b = pipe(PROMPTS, seed=5, output="float")
    np.testing.assert_array_equal(a, b)
    # programs of other batch sizes reorder fp32 reductions: equal within 1e-4, not bitwise
    for i, p in enumerate(PROMPTS):
        assert_close(pipe([p], seed=5 + i, output="float"), a[i : i + 1], f"image {i}")
    c = pipe(PROMPTS, seed=6, output="float")
    assert np.abs(c - a).max() > 1e-2
    u = pipe(PROMPTS, seed=5)
    assert u.shape == (3, 24, 24, 3) and u.dtype == np.uint8
    np.testing.assert_array_equal(u, np.round(a * 255).astype(np.uint8))


def test_attention_impl_override(pipe_dir):
    """``from_converted(attention_impl=...)`` replaces the config's choice; a bad name is refused
    before anything is loaded onto the device."""
    p = HARTPipeline.from_converted(pipe_dir, attention_impl="pallas")
    assert p.t2i_cfg.attention_impl == "pallas" and p.t2i.cfg.attention_impl == "pallas"
    assert HARTPipeline.from_converted(pipe_dir).t2i_cfg.attention_impl == "auto"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        HARTPipeline.from_converted(pipe_dir, attention_impl="flash")


def test_one_compile_per_shape(pipe_dir):
    p = HARTPipeline.from_converted(pipe_dir)
    p(PROMPTS, batch_size=4, seed=1)
    assert p.num_compiles == 1
    out = p(PROMPTS[:2], batch_size=4, seed=9, guidance_scale=2.0)  # padded, other guidance: no recompile
    assert out.shape[0] == 2 and p.num_compiles == 1
    p(PROMPTS, batch_size=2)  # 2 + 1 (padded): one new shape
    assert p.num_compiles == 2
    assert len(p._programs) == 2


def test_images_per_prompt_and_guidance_one(pipe):
    out = pipe(PROMPTS[:2], num_images_per_prompt=2, seed=3, guidance_scale=1.0, output="float")
    assert out.shape == (4, 24, 24, 3)
    assert_close(out[1:2], pipe([PROMPTS[0]], seed=4, guidance_scale=1.0, output="float"), "image 1")


@pytest.mark.parametrize(
    "shard_params,impl", [(False, "auto"), (True, "auto"), (True, "pallas")],
    ids=["replicated-params", "sharded-params", "sharded-params-pallas"],
)
def test_sharded_batch_matches_one_device(pipe_dir, pipe, shard_params, impl, monkeypatch):
    """8 devices, each on its rows; with pallas the cache kernel (interpreted) runs under
    shard_map on each device's rows of the stacked caches."""
    import hart_jax.attention as A
    from hart_jax.attention import set_pallas_interpret

    splits = []
    real = A.kernel_mesh_axes
    monkeypatch.setattr(A, "kernel_mesh_axes", lambda b, h: splits.append(real(b, h)) or splits[-1])

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = HARTPipeline.from_converted(pipe_dir, mesh=mesh, shard_params=shard_params, attention_impl=impl)
    if shard_params:
        kernel = sharded.t2i_vars["params"]["head"]["kernel"]  # [64, 640]: split over the 640 axis
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data")
        assert kernel.addressable_shards[0].data.shape == (64, 80)
    prompts = PROMPTS * 3  # 9 images -> batch padded to 16 over 8 devices
    set_pallas_interpret(impl == "pallas")
    try:
        got = sharded(prompts, seed=2, batch_size=8, output="float")
    finally:
        set_pallas_interpret(False)
    assert_close(got, pipe(prompts, seed=2, batch_size=8, output="float"), "sharded")
    if impl == "pallas":  # traced inside the pipeline's mesh: every kernel call split 8 ways by rows
        assert splits and all(s is not None and s[1:] == (("data",), ()) for s in splits), splits[:3]


def test_pipeline_bad_inputs(pipe, pipe_dir, tmp_path):
    with pytest.raises(ValueError, match="no prompts given"):
        pipe([])
    with pytest.raises(ValueError, match="got 2 seeds for 3 images"):
        pipe(PROMPTS, seed=[1, 2])
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(CheckpointError, match="missing part text_encoder/"):
        HARTPipeline.from_converted(broken)
    with pytest.warns(UserWarning, match="truncated to 6"):
        pipe(["a very long prompt " * 10], seed=0)


def test_release_conversion_refuses_overwrite_and_missing_parts(golden_dir, qwen_dir, pipe_dir, tmp_path, capsys):
    args = ["--prefix-from", str(qwen_dir / "prefix.txt"), "--allow-prefix-mismatch"]
    assert convert_main(["release", str(golden_dir), str(qwen_dir), str(pipe_dir)] + args) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["release", str(tmp_path), str(qwen_dir), str(tmp_path / "o")] + args) == 2
    assert "missing llm/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the release's own prefix is required unless explicitly overridden
    assert convert_main(["release", str(golden_dir), str(qwen_dir), str(tmp_path / "o2"), "--prefix-from",
                         str(qwen_dir / "prefix.txt")]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))


def _sample(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_sample_py_end_to_end(pipe_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue bird\n")
    r = _sample("--ckpt", str(pipe_dir), "--prompt", "a cat", "--prompt-file", "prompts.txt", "--out-dir", "out",
                "--batch-size", "2", "--seed", "7", "--no-more-smooth", "--top-k", "50", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert s["prompts"] == ["a cat", "a red fox", "a blue bird"] and s["seeds"] == [7, 8, 9]
    assert s["more_smooth"] is False and s["top_k"] == 50 and s["cfg"] == 4.5
    assert s["attention_impl"] == "xla"  # auto on a CPU
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == s["files"] and len(files) == 3
    from PIL import Image

    assert Image.open(tmp_path / "out" / files[0]).size == (24, 24)
    r = _sample("--ckpt", str(pipe_dir), "--prompt", "a", "--prompt", "b", "--grid", "--out-dir", "g",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "g").glob("*.png")] == ["grid.png"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-file", "empty.txt"], "empty.txt: prompt file holds no prompt"),
        (["--prompt", "a", "--resolution", "1024"], "unsupported resolution 1024: this checkpoint generates 24x24"),
        (["--prompt", "a", "--ckpt", "nowhere"], "nowhere: checkpoint directory not found"),
    ],
)
def test_sample_py_bad_input_is_one_line(pipe_dir, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = args if "--ckpt" in args else ["--ckpt", str(pipe_dir)] + args
    r = _sample(*argv, "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last


def test_sample_py_without_prompt_draws_demo_prompts_with_checkpoint_defaults(pipe_dir, tmp_path):
    """No prompt: the checkpoint's demo prompts (sampling.json) as one grid, with its sampling
    defaults; flags still override them; a broken sampling.json is a one-line error."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pipe_dir, ckpt)
    (ckpt / "sampling.json").write_text(json.dumps(
        {"cfg": 2.0, "top_k": 7, "top_p": 0.0, "more_smooth": False, "prompts": ["a red circle", "a blue square"]}))
    r = _sample("--ckpt", str(ckpt), "--out-dir", "o", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no prompt given: drawing the 2 demo prompts" in r.stdout
    s = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert s["prompts"] == ["a red circle", "a blue square"] and s["files"] == ["grid.png"]
    assert (s["cfg"], s["top_k"], s["more_smooth"]) == (2.0, 7, False)
    r = _sample("--ckpt", str(ckpt), "--prompt", "x", "--cfg", "3", "--top-k", "5", "--more-smooth", "--out-dir", "p",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "p" / "settings.json").read_text())
    assert (s["cfg"], s["top_k"], s["more_smooth"], s["prompts"]) == (3.0, 5, True, ["x"])
    (ckpt / "sampling.json").write_text("{not json")
    r = _sample("--ckpt", str(ckpt), "--prompt", "x", "--out-dir", "q", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "sampling.json: not valid JSON" in r.stderr.strip().splitlines()[-1]


def test_sample_py_help_names_every_flag():
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--help"], capture_output=True, text=True)
    for flag in ("--ckpt", "--prompt", "--prompt-file", "--cfg", "--seed", "--top-k", "--top-p", "--more-smooth",
                 "--no-more-smooth", "--batch-size", "--out-dir", "--grid", "--no-grid", "--attention-impl"):
        assert flag in r.stdout
    # each flag states its default once, in words (no formatter-appended "(default: None)")
    assert "default: None" not in r.stdout
    top_k = r.stdout.split("  --top-k TOP_K")[1].split("  --top-p")[0]
    assert top_k.count("default") == 1
