"""Retrain the built-in default model from nothing: dataset, text encoder, tokenizer, transformer.

    python -m hart_jax.builtin.retrain OUT_DIR [--install] [--docs [DIR]] [--smoke] [--force]

Stages (each prints its wall time; every training stage is ``train.py``'s own loop with the
presets of ``configs/shapes.py``):

1. ``data``: the procedural shapes dataset (``hart_jax.data.shapes``) as TFDS array_record;
2. ``text_encoder``: a BPE fitted to the dataset's captions + a random, frozen small Qwen2
   (``hart_jax.builtin.text_encoder``);
3. ``tokenizer``: the hybrid tokenizer trained from scratch (``task="tokenizer"``: reconstruction,
   VQ, alternating discrete/hybrid decoding, PatchGAN after a warm-up), exported (EMA);
4. ``codes``: the dataset again with the captions' context embeddings and the tokenizer's codes
   cached in the records;
5. ``transformer``: transformer + diffusion head trained on the cached records, exported (EMA);
6. ``pipeline``: the three parts in the converted-pipeline layout (``OUT_DIR/model``) with the
   sampling defaults in ``sampling.json``;
7. ``evaluate``: 64 samples of varied prompts and seeds judged by pixels
   (``hart_jax.builtin.evaluate``), written to ``OUT_DIR/retrain.json``.

``--docs [DIR]`` writes the reconstruction grid of each tokenizer checkpoint, the sample grid of
each transformer checkpoint and the demo grid to ``DIR`` (default ``docs/images/builtin/``),
replacing the per-checkpoint grids of an earlier run there;
``--install`` replaces the shipped model
(``hart_jax/builtin/shapes-32px``) with the new one, atomically; ``--smoke`` runs a few steps of
each stage on a few images (CI). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hart_jax.errors import HartError

REPO = Path(__file__).resolve().parents[2]
DOCS_IMAGES = REPO / "docs" / "images" / "builtin"
if str(REPO) not in sys.path and (REPO / "configs" / "shapes.py").is_file():
    sys.path.append(str(REPO))  # the recipe's presets live in the repository's configs/
GRID_PROMPTS_SEED = 3  # prompts of the per-checkpoint sample grids


def _stage(log: Callable[[str], None], times: dict[str, float], name: str):
    class _Timer:
        def __enter__(self):
            self.t = time.perf_counter()
            log(f"[{name}] ...")

        def __exit__(self, *exc):
            if exc[0] is None:
                times[name] = round(time.perf_counter() - self.t, 1)
                log(f"[{name}] done in {times[name]:.1f} s")

    return _Timer()


def _records(out: Path, name: str, num: int, seed: int, **kw: Any) -> Path:
    from configs.shapes import RESOLUTION
    from hart_jax.data import shapes
    from hart_jax.data.make_records import build_records

    return build_records(shapes.examples(num, RESOLUTION, seed), out, name=name, kind="t2i", **kw)


def tokenizer_grids(run_dir: Path, out_dir: Path, num: int = 16) -> list[Path]:
    """Per checkpoint of a tokenizer run: originals (top row) over their discrete-only and
    hybrid reconstructions (EMA params), one PNG each."""
    from PIL import Image

    from configs.shapes import RESOLUTION
    from hart_jax.builtin.evaluate import tile_images
    from hart_jax.data import shapes
    from hart_jax.models.autoencoder import TokenizerConfig
    from hart_jax.tokenizer import HybridTokenizer
    from hart_jax.train.export import restore_run

    import orbax.checkpoint as ocp

    imgs = np.stack([shapes.example(i, 10_000, RESOLUTION)["image"] for i in range(num)])
    x = imgs.astype(np.float32) / 127.5 - 1.0
    steps = sorted(ocp.CheckpointManager(run_dir / "checkpoints").all_steps())
    written = []
    for step in steps:
        _, state, meta = restore_run(run_dir, step)
        tk = dict(meta["config"]["tokenizer"])
        for k in ("ch_mult", "v_patch_nums"):
            tk[k] = tuple(int(v) for v in tk[k])
        tok = HybridTokenizer(TokenizerConfig(**tk), {"params": state["ema_params"]})
        codes = tok.encode(x)
        to8 = lambda a: np.clip(np.round((np.asarray(a) + 1) * 127.5), 0, 255).astype(np.uint8)  # noqa: E731
        rows = [imgs, to8(tok.decode(codes.indices)), to8(tok.decode(codes.indices, codes.residual))]
        path = out_dir / f"tokenizer_step{step:05d}.png"
        Image.fromarray(tile_images(np.concatenate(rows), num, scale=3)).save(path)
        written.append(path)
    return written


def sample_grids(pipe: Any, run_dir: Path, out_dir: Path, num: int = 18, **sampling: Any) -> list[Path]:
    """Per checkpoint of a transformer run: samples of ``num`` fixed prompts and seeds with that
    checkpoint's EMA weights (one compiled program: only the weights change), one PNG each."""
    from PIL import Image

    import orbax.checkpoint as ocp

    from hart_jax.builtin.evaluate import eval_prompts, tile_images
    from hart_jax.train.export import restore_run

    prompts = [p.text for p in eval_prompts(num, GRID_PROMPTS_SEED)]
    keep = pipe.t2i_vars
    written = []
    try:
        for step in sorted(ocp.CheckpointManager(run_dir / "checkpoints").all_steps()):
            _, state, _ = restore_run(run_dir, step)
            pipe.t2i_vars = pipe._place({"params": state["ema_params"]})
            imgs = pipe(prompts, seed=list(range(num)), batch_size=num, **sampling)
            path = out_dir / f"samples_step{step:05d}.png"
            Image.fromarray(tile_images(imgs, 6, scale=3)).save(path)
            written.append(path)
    finally:
        pipe.t2i_vars = keep
    return written


def demo_grid(pipe: Any, path: Path, seeds_per_prompt: int = 4, **sampling: Any) -> Path:
    """The demo prompts (rows) x ``seeds_per_prompt`` seeds (columns), as the README shows."""
    from PIL import Image

    from hart_jax.builtin.evaluate import tile_images
    from hart_jax.data import shapes

    prompts = [p for p in shapes.PROMPTS for _ in range(seeds_per_prompt)]
    imgs = pipe(prompts, seed=0, batch_size=len(prompts), **sampling)
    Image.fromarray(tile_images(imgs, len(shapes.PROMPTS) if seeds_per_prompt == 1 else seeds_per_prompt,
                                     scale=3)).save(path)
    return path


def retrain(
    out_dir: str | os.PathLike,
    *,
    smoke: bool = False,
    docs: str | os.PathLike | None = None,
    install: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage (module docstring) into ``out_dir``; returns the summary written to
    ``out_dir/retrain.json``."""
    import jax

    from configs import shapes as presets
    from hart_jax.builtin import DEFAULT_CKPT
    from hart_jax.builtin.evaluate import faithfulness
    from hart_jax.builtin.text_encoder import build_text_encoder
    from hart_jax.data import shapes
    from hart_jax.pipeline import HARTPipeline, assemble_pipeline
    from hart_jax.train.export import export_tokenizer, export_transformer
    from hart_jax.train.loop import train
    from hart_jax.train.tokenizer_loop import train_tokenizer

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise HartError(f"{out}: exists and is not empty; pass --force to start again there")
        import shutil

        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True)
    sfx = "_smoke" if smoke else ""
    num = presets.SMOKE_IMAGES if smoke else presets.NUM_IMAGES
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    with _stage(log, times, "data"):
        data = _records(work / "data", "shapes", num, presets.DATA_SEED)
    with _stage(log, times, "text_encoder"):
        captions = [shapes.example(i, presets.DATA_SEED, presets.RESOLUTION)["caption"] for i in range(num)]
        text_dir = build_text_encoder(work / "text_encoder", captions, **presets.TEXT_ENCODER)
    with _stage(log, times, "tokenizer"):
        tcfg = presets.get_config("tokenizer" + sfx)
        tcfg.data.path = str(data)
        train_tokenizer(tcfg, work / "tokenizer_run")
        tok_dir = export_tokenizer(work / "tokenizer_run", work / "tokenizer")
    with _stage(log, times, "codes"):
        codes = _records(work / "data", "shapes_codes", num, presets.DATA_SEED, text_encoder=str(text_dir),
                         tokenizer=str(tok_dir), batch_size=256)
    with _stage(log, times, "transformer"):
        mcfg = presets.get_config("transformer" + sfx)
        mcfg.data.path = str(codes)
        mcfg.tokenizer.checkpoint = str(tok_dir)
        train(mcfg, work / "transformer_run")
        tr_dir = export_transformer(work / "transformer_run", work / "transformer")
    with _stage(log, times, "pipeline"):
        model = assemble_pipeline(
            out / "model", {"tokenizer": tok_dir, "transformer": tr_dir, "text_encoder": text_dir},
            sampling=dict(presets.SAMPLING, prompts=list(shapes.PROMPTS)),
        )
    with _stage(log, times, "evaluate"):
        pipe = HARTPipeline.from_converted(model)
        sampling = {k: v for k, v in presets.SAMPLING.items() if k != "cfg"}
        result = faithfulness(pipe, 8 if smoke else 64, guidance_scale=presets.SAMPLING["cfg"], **sampling)
        log(f"[evaluate] {result.summary()}")
    times["total"] = round(time.perf_counter() - t_all, 1)
    summary = {
        "model": str(model),
        "smoke": smoke,
        "seconds": times,
        "faithfulness": {"accuracy": result.accuracy, "colour": result.colour_accuracy,
                         "shape": result.shape_accuracy, "samples": len(result.prompts)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version()},
    }
    (out / "retrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    if docs is not None:
        docs = Path(docs)
        docs.mkdir(parents=True, exist_ok=True)
        for stale in [*docs.glob("tokenizer_step*.png"), *docs.glob("samples_step*.png")]:
            stale.unlink()  # grids of an earlier run's checkpoints
        for p in tokenizer_grids(work / "tokenizer_run", docs):
            log(f"wrote {p}")
        for p in sample_grids(pipe, work / "transformer_run", docs, guidance_scale=presets.SAMPLING["cfg"], **sampling):
            log(f"wrote {p}")
        p = demo_grid(pipe, docs / "samples_final.png", guidance_scale=presets.SAMPLING["cfg"], **sampling)
        log(f"wrote {p}")
    if install:
        assemble_pipeline(DEFAULT_CKPT, {"tokenizer": tok_dir, "transformer": tr_dir, "text_encoder": text_dir},
                          sampling=dict(presets.SAMPLING, prompts=list(shapes.PROMPTS)), force=True)
        log(f"installed the new model as {DEFAULT_CKPT}")
    log(f"done in {times['total']:.0f} s; model in {model}; {result.summary()}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hart_jax.builtin.retrain``."""
    p = argparse.ArgumentParser(prog="python -m hart_jax.builtin.retrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="run directory (data, runs, exported parts, model/, retrain.json)")
    p.add_argument("--install", action="store_true", help="replace the shipped model with the new one")
    p.add_argument("--docs", nargs="?", const=str(DOCS_IMAGES), default=None, metavar="DIR",
                   help="write the per-checkpoint grids and the demo grid to DIR (default: docs/images/builtin/)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage on a few images (CI)")
    p.add_argument("--force", action="store_true", help="start again in a non-empty OUT_DIR (deletes it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        retrain(args.out_dir, smoke=args.smoke, docs=args.docs, install=args.install, force=args.force)
    except (HartError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
