"""The text-to-image pipeline and sample.py on the tiny golden model.

A pipeline directory is built with the one-command converter from the golden
release layout (llm/ + tokenizer/) and a tiny random Qwen2 as wide as the golden
transformer's context (``context_dim``), with a byte-level BPE tokenizer and a test
prefix. Every size (context width and length, image side) comes from the fixtures.
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

from conftest import CHAINED_GUMBEL_ATOL, REPO, assert_close, nchw, pallas_interpret_mode
from hart_jax.convert.__main__ import main as convert_main
from hart_jax.errors import CheckpointError
from hart_jax.pipeline import HARTPipeline
from hart_jax.sample_cli import RELEASE_SAMPLING
from hart_jax.sampling import InjectedNoise, SamplingConfig
from hart_jax.train.sharding import make_mesh
from test_prompts import build_tokenizer

PROMPTS = ["a cat sleeping", "a city street", "a bus passing"]


@pytest.fixture(scope="module")
def llm_cfg(golden_dir) -> dict:
    """The fixture transformer's config.json."""
    return json.loads((golden_dir / "llm" / "config.json").read_text())


@pytest.fixture(scope="module")
def side(golden_dir) -> int:
    """Side in pixels of the images the fixture's reference sampler generated."""
    with np.load(golden_dir / "t2i_golden.npz") as g:
        h, w = g["ar_img"].shape[-2:]
    assert h == w
    return int(h)


def qwen_heads(width: int) -> int:
    """Attention heads of the test's Qwen2: at most 4, dividing ``width`` into even head dims (RoPE)."""
    return next(h for h in (4, 2, 1) if width % h == 0 and width // h % 2 == 0)


@pytest.fixture(scope="module")
def qwen_dir(llm_cfg, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2Model

    width, heads = llm_cfg["context_dim"], qwen_heads(llm_cfg["context_dim"])
    cfg = Qwen2Config(vocab_size=400, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=llm_cfg["context_token"] + 128)
    with torch.random.fork_rng():  # seeded weights; the global torch RNG is left as it was
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
    assert not args["more_smooth"]  # the ar_* run: hard tokens, no Gumbel noise to inject
    img = pipe.generate_from_context(
        g["context"], g["context_mask"], g["context_position_ids"],
        guidance_scale=float(args["cfg"]),
        sampling=SamplingConfig(top_p=float(args["top_p"]), more_smooth=False, greedy=True),
        injected=InjectedNoise(diff_init=g["ar_diff_init_noise"], diff_steps=g["ar_diff_step_noise"]),
    )
    assert_close(nchw(img), g["ar_img"], "ar_img")


def traced_call(p: HARTPipeline, prompts: list[str], **kw) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """``p(prompts, **kw)`` run through its tracing programs (same computation, more outputs):
    the images and one trace dict per batch (``hart_jax.sampling.sample_images``)."""
    traces: list[dict[str, np.ndarray]] = []
    program = p.program

    def with_trace(batch: int, scfg: SamplingConfig, **k):
        fn = program(batch, scfg, trace=True, **k)

        def run(*args):
            img, tr = fn(*args)
            traces.append({name: np.asarray(v) for name, v in tr.items()})
            return img

        return run

    p.program = with_trace  # this call only: the instance attribute shadows the method
    try:
        return p(prompts, **kw), traces
    finally:
        del p.program


def tokens(traces: list[dict[str, np.ndarray]], n: int) -> list[np.ndarray]:
    """Every scale's token indices ``[n, pn**2]`` of the first ``n`` images of a traced call."""
    scales = sorted(int(k[len("idx_s"):]) for k in traces[0] if k.startswith("idx_s"))
    assert scales == list(range(len(scales))) and scales, sorted(traces[0])
    return [np.concatenate([t[f"idx_s{s}"] for t in traces])[:n] for s in scales]


def assert_same_tokens(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]], n: int) -> None:
    """Both traced calls chose the same token at every scale of their first ``n`` images."""
    for s, (a, b) in enumerate(zip(tokens(got, n), tokens(want, n), strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"tokens of scale {s}")


def test_same_seed_same_images_and_batch_equals_single_calls(pipe, side):
    """Hard tokens (``more_smooth=False``): a batch equals single calls within 1e-4 (programs of
    other batch sizes reorder fp32 sums). The release's Gumbel smoothing amplifies that noise:
    see test_sharded_release_sampling_same_tokens."""
    kw = dict(more_smooth=False, output="float")
    a = pipe(PROMPTS, seed=5, **kw)
    b = pipe(PROMPTS, seed=5, **kw)
    np.testing.assert_array_equal(a, b)
    for i, p in enumerate(PROMPTS):
        assert_close(pipe([p], seed=5 + i, **kw), a[i : i + 1], f"image {i}")
    c = pipe(PROMPTS, seed=6, **kw)
    assert np.abs(c - a).max() > 1e-2
    u = pipe(PROMPTS, seed=5, more_smooth=False)
    assert u.shape == (3, side, side, 3) and u.dtype == np.uint8
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


def test_images_per_prompt_and_guidance_one(pipe, side):
    kw = dict(guidance_scale=1.0, more_smooth=False, output="float")  # hard tokens: 1e-4 across batch sizes
    out = pipe(PROMPTS[:2], num_images_per_prompt=2, seed=3, **kw)
    assert out.shape == (4, side, side, 3)
    assert_close(out[1:2], pipe([PROMPTS[0]], seed=4, **kw), "image 1")


def sharded_pipeline(pipe_dir, sizes: tuple[int, int, int], shard_params: bool, impl: str) -> HARTPipeline:
    """The pipeline on 8 CPU devices with training's ``(data, fsdp, tensor)`` mesh of ``sizes``
    and rules: rows over data x fsdp; with ``shard_params`` every weight by its logical axes
    (checked on the transformer's output head and the text encoder's query projection: input
    width over fsdp, output over tensor, where they divide), else replicated."""
    mesh = make_mesh(*sizes)
    p = HARTPipeline.from_converted(pipe_dir, mesh=mesh, shard_params=shard_params, attention_impl=impl)
    if shard_params:
        fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
        for kernel in (p.t2i_vars["params"]["head"]["kernel"], p.text_params["layers_0"]["self_attn"]["q_proj"]["kernel"]):
            n_in, n_out = kernel.shape  # [embed, vocab] / [embed, heads]
            split = (fsdp if fsdp > 1 and n_in % fsdp == 0 else 1, tensor if tensor > 1 and n_out % tensor == 0 else 1)
            assert split != (1, 1), kernel.shape
            spec = tuple(kernel.sharding.spec) + (None,) * (2 - len(kernel.sharding.spec))  # trailing Nones dropped
            assert spec == ("fsdp" if split[0] > 1 else None, "tensor" if split[1] > 1 else None), (kernel.shape, spec)
            assert kernel.addressable_shards[0].data.shape == (n_in // split[0], n_out // split[1])
    return p


@pytest.mark.parametrize(
    "sizes,shard_params,impl", [((8, 1, 1), False, "auto"), ((2, 4, 1), True, "auto"), ((2, 1, 4), True, "pallas")],
    ids=["data-replicated-params", "fsdp-sharded-params", "tensor-sharded-params-pallas"],
)
def test_sharded_batch_matches_one_device(pipe_dir, pipe, sizes, shard_params, impl, monkeypatch):
    """8 devices (9 images: two batches of 8, the second padded): a data-only mesh, weights
    split over fsdp, or over tensor where the cache kernel (pallas, interpreted) runs under
    shard_map on each device's rows (data) and heads (tensor) of the stacked caches, as in
    training. Sampled with hard tokens (``more_smooth=False``): the same tokens at every
    scale and the images within 1e-4 (sharded sums are reordered; measured <= 7e-6)."""
    import hart_jax.attention as A

    sharded = sharded_pipeline(pipe_dir, sizes, shard_params, impl)
    prompts = PROMPTS * 3
    kw = dict(seed=2, batch_size=8, more_smooth=False, output="float")
    splits = []
    real = A.kernel_mesh_axes
    with monkeypatch.context() as m, pallas_interpret_mode(impl == "pallas"):
        # spies on the sharded call only: the one-device reference below may trace here too
        m.setattr(A, "kernel_mesh_axes", lambda b, h: splits.append(real(b, h)) or splits[-1])
        got, got_tr = traced_call(sharded, prompts, **kw)
    want, want_tr = traced_call(pipe, prompts, **kw)
    assert_same_tokens(got_tr, want_tr, len(prompts))
    assert_close(got, want, "sharded")
    if impl == "pallas":  # traced inside the pipeline's mesh and rules: rows over data, heads over tensor
        assert pipe.t2i_cfg.num_heads % sizes[2] == 0
        assert splits and all(s is not None and s[1:] == (("data",), ("tensor",)) for s in splits), splits[:3]


def test_mesh_requests_that_cannot_be_honoured(pipe):
    """Weights cannot be split on a data-only mesh, nor without a mesh; sharded weights on a
    mesh splitting data, fsdp and tensor at once are refused (XLA samples wrong tokens there,
    see HARTPipeline); a mesh axis the rules do not name is refused: each a one-line
    ValueError before anything is placed."""
    args = (pipe.tok_cfg, pipe.tok_vars, pipe.t2i_cfg, pipe.t2i_vars)
    with pytest.raises(ValueError, match="shard_params needs a mesh axis of size > 1 .*the mesh is data=8, fsdp=1, tensor=1"):
        HARTPipeline(*args, mesh=make_mesh(8), shard_params=True)
    with pytest.raises(ValueError, match="shard_params=True needs a mesh"):
        HARTPipeline(*args, shard_params=True)
    with pytest.raises(ValueError, match="shard_params on a mesh that splits all of data, fsdp, tensor is refused"):
        HARTPipeline(*args, mesh=make_mesh(2, 2, 2), shard_params=True)
    model_mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not named by the sharding rules"):
        HARTPipeline(*args, mesh=model_mesh)


def test_sharded_release_sampling_same_tokens(pipe_dir, pipe):
    """The release's sampling (Gumbel-smoothed code vectors, ``more_smooth=True``) on sharded
    weights: the same tokens at every scale, images within CHAINED_GUMBEL_ATOL (conftest: each
    scale's softmax at temperature ~0.03-0.27 amplifies reordered-sum noise about 10x; measured
    here 1e-4 on the image, 5e-4 on the final f_hat)."""
    sharded = sharded_pipeline(pipe_dir, (2, 4, 1), True, "auto")
    prompts = PROMPTS * 3
    kw = dict(seed=2, batch_size=8, output="float")
    assert SamplingConfig().more_smooth  # the default, as in the release
    got, got_tr = traced_call(sharded, prompts, **kw)
    want, want_tr = traced_call(pipe, prompts, **kw)
    assert_same_tokens(got_tr, want_tr, len(prompts))
    assert_close(got, want, "sharded, more_smooth", atol=CHAINED_GUMBEL_ATOL)


def test_pipeline_bad_inputs(pipe, pipe_dir, llm_cfg, tmp_path):
    with pytest.raises(ValueError, match="no prompts given"):
        pipe([])
    with pytest.raises(ValueError, match="got 2 seeds for 3 images"):
        pipe(PROMPTS, seed=[1, 2])
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(CheckpointError, match="missing part text_encoder/"):
        HARTPipeline.from_converted(broken)
    long_prompt = "a very long prompt " * (llm_cfg["context_token"] + 1)  # >= 3 tokens per repeat
    with pytest.warns(UserWarning, match=f"truncated to {llm_cfg['context_token']} "):
        pipe([long_prompt], seed=0)


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


def test_sample_py_end_to_end(pipe_dir, side, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue bird\n")
    r = _sample("--ckpt", str(pipe_dir), "--prompt", "a cat", "--prompt-file", "prompts.txt", "--out-dir", "out",
                "--batch-size", "2", "--seed", "7", "--no-more-smooth", "--top-k", "50", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert s["prompts"] == ["a cat", "a red fox", "a blue bird"] and s["seeds"] == [7, 8, 9]
    # no sampling.json in a release conversion: the guidance is the release's sample.py default
    assert s["more_smooth"] is False and s["top_k"] == 50 and s["cfg"] == RELEASE_SAMPLING["cfg"]
    assert s["resolution"] == side
    assert s["attention_impl"] == "xla"  # auto on a CPU
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == s["files"] and len(files) == 3
    from PIL import Image

    assert Image.open(tmp_path / "out" / files[0]).size == (side, side)
    r = _sample("--ckpt", str(pipe_dir), "--prompt", "a", "--prompt", "b", "--grid", "--out-dir", "g",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "g").glob("*.png")] == ["grid.png"]


@pytest.mark.parametrize("case", ["empty prompt file", "other resolution", "missing checkpoint"])
def test_sample_py_bad_input_is_one_line(pipe_dir, side, tmp_path, case):
    args, message = {
        "empty prompt file": (["--prompt-file", "empty.txt"], "empty.txt: prompt file holds no prompt"),
        "other resolution": (["--prompt", "a", "--resolution", str(2 * side)],
                             f"unsupported resolution {2 * side}: this checkpoint generates {side}x{side}"),
        "missing checkpoint": (["--prompt", "a", "--ckpt", "nowhere"], "nowhere: checkpoint directory not found"),
    }[case]
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
