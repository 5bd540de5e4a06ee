"""The work behind ``sample.py``: read prompts, run the pipeline, write PNGs + settings."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from hart_jax.errors import HartError


RELEASE_SAMPLING = {"cfg": 4.5, "top_k": None, "top_p": 0.0, "more_smooth": True}
SAMPLING_FILE = "sampling.json"


def sampling_defaults(ckpt: Path) -> dict:
    """The release's sampling settings, overridden by the checkpoint's ``sampling.json``
    (keys ``cfg``, ``top_k``, ``top_p``, ``more_smooth``, ``prompts``) when it has one."""
    out = dict(RELEASE_SAMPLING)
    f = ckpt / SAMPLING_FILE
    if f.is_file():
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HartError(f"{f}: not valid JSON ({e})") from None
        unknown = sorted(set(d) - set(out) - {"prompts"})
        if unknown:
            raise HartError(f"{f}: unknown setting(s) {', '.join(unknown)}")
        out.update(d)
    return out


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """``--prompt`` values then the non-blank lines of ``--prompt-file``; errors name the file
    (an empty list when neither is given)."""
    out = list(prompts)
    if prompt_file is not None:
        p = Path(prompt_file)
        if not p.is_file():
            raise HartError(f"{p}: prompt file not found")
        lines = [l.strip() for l in p.read_text(encoding="utf-8").splitlines()]
        lines = [l for l in lines if l]
        if not lines:
            raise HartError(f"{p}: prompt file holds no prompt")
        out.extend(lines)
    return out


def grid(images_NHWC: np.ndarray) -> np.ndarray:
    """Tile images into a near-square grid (row-major)."""
    n, h, w, c = images_NHWC.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), images_NHWC.dtype)
    for i, img in enumerate(images_NHWC):
        r, q = divmod(i, cols)
        canvas[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return canvas


def run(args: argparse.Namespace) -> Iterator[str]:
    """Generate and write the images; yields lines to print."""
    import jax.numpy as jnp
    from PIL import Image

    from hart_jax.attention import resolve_impl
    from hart_jax.builtin import DEFAULT_CKPT
    from hart_jax.pipeline import HARTPipeline, check_pipeline_dir

    builtin = args.ckpt is None
    ckpt = Path(DEFAULT_CKPT if builtin else args.ckpt)
    prompts = read_prompts(args.prompt, args.prompt_file)
    if args.images_per_prompt < 1:
        raise HartError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    if args.batch_size is not None and args.batch_size < 1:
        raise HartError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_pipeline_dir(ckpt)
    defaults = sampling_defaults(ckpt)
    cfg = defaults["cfg"] if args.cfg is None else args.cfg
    top_k = defaults["top_k"] if args.top_k is None else args.top_k
    more_smooth = defaults["more_smooth"] if args.more_smooth is None else args.more_smooth
    top_p = defaults["top_p"] if args.top_p is None else args.top_p
    if not 0.0 <= top_p < 1.0:
        raise HartError(f"--top-p must be in [0, 1), got {top_p}")
    grid_out = args.grid
    if not prompts:
        from hart_jax.data.shapes import PROMPTS

        prompts = list(defaults.get("prompts") or PROMPTS)
        grid_out = True
        yield (f"no prompt given: drawing the {len(prompts)} demo prompts of "
               f"{'the built-in model' if builtin else ckpt} into one grid ({'; '.join(prompts)})")
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    pipe = HARTPipeline.from_converted(ckpt, attention_impl=args.attention_impl, dtype=dtype)
    if args.resolution is not None and args.resolution != pipe.resolution:
        raise HartError(
            f"unsupported resolution {args.resolution}: this checkpoint generates {pipe.resolution}x{pipe.resolution}"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []

    def save(start: int, imgs: np.ndarray) -> None:
        if grid_out:
            return
        for j, img in enumerate(imgs):
            i = start + j
            name = f"{i:05d}_p{i // args.images_per_prompt:04d}_seed{args.seed + i}.png"
            Image.fromarray(img).save(out / name)
            names.append(name)

    t0 = time.perf_counter()
    images = pipe(
        prompts,
        guidance_scale=cfg,
        seed=args.seed,
        top_k=top_k,
        top_p=top_p,
        more_smooth=more_smooth,
        num_images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        progress=args.progress,
        callback=save,
    )
    seconds = time.perf_counter() - t0
    if grid_out:
        Image.fromarray(grid(images)).save(out / "grid.png")
        names = ["grid.png"]
    settings = {
        "ckpt": str(ckpt.absolute()),
        "prompts": prompts,
        "images_per_prompt": args.images_per_prompt,
        "cfg": cfg,
        "seeds": [args.seed + i for i in range(len(images))],
        "top_k": top_k if top_k is not None else "release rule (600 for scales 0-6, else 300)",
        "top_p": top_p,
        "more_smooth": more_smooth,
        "batch_size": args.batch_size,
        "dtype": str(jnp.dtype(pipe.dtype)),
        "attention_impl": resolve_impl(pipe.t2i_cfg.attention_impl),
        "resolution": pipe.resolution,
        "files": names,
        "images": [
            {"file": None if grid_out else names[i], "prompt": prompts[i // args.images_per_prompt],
             "seed": args.seed + i}
            for i in range(len(images))
        ],
        "seconds": round(seconds, 3),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    yield f"wrote {len(names)} file(s) and settings.json to {out} ({len(images)} image(s), {seconds:.1f} s)"
