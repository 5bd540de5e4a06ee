"""The work behind ``sample.py``: the flags, their checks, reading prompts, running the
pipeline and writing PNGs + settings.

Every input is checked before the model is loaded and before anything is written: a bad
value is one ``error: ...`` line on stderr and exit status 2, and the output directory is
created only when the first image is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hart_jax.compile_cache import ENV_VAR, CacheEvents, check_writable_dir, requested_dir
from hart_jax.errors import HartError, OneLineArgumentParser

RELEASE_SAMPLING = {"cfg": 4.5, "top_k": None, "top_p": 0.0, "more_smooth": True}
SAMPLING_FILE = "sampling.json"
# ``pipeline.seed_keys`` turns a seed into ``jax.random.PRNGKey(seed)`` (threefry, 32-bit
# without ``jax_enable_x64``), which keeps only the seed's low 32 bits: -1 would give the
# images of 4294967295 and 2**32 those of 0, and a seed from 2**63 on raises OverflowError.
SEED_MAX = 2**32 - 1

DESCRIPTION = """Generate images with HART (Hybrid Autoregressive Transformer) from text prompts.
Each prompt is encoded by the converted Qwen2 text encoder, then the transformer generates the image
scale by scale (1x1 up to 64x64 tokens), a small diffusion head adds the fine detail, and the
tokenizer decodes the result. The defaults reproduce the original release's sample.py settings.

Every value is checked before the model is loaded: a bad one prints one "error: ..." line and
exits with status 2, and nothing is written (the output directory is created with the first image)."""


class _Parser(OneLineArgumentParser):
    hint = " (see --help)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` is the reference for every flag; each default stated once)."""
    p = _Parser(prog="python sample.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="converted pipeline directory (tokenizer/, transformer/, text_encoder/); "
                   "default: the built-in shapes model shipped in hart_jax/builtin")
    p.add_argument("--prompt", action="append", default=[],
                   help="a text prompt, used as given; repeat the flag for several; an empty or whitespace-only "
                   "prompt is an error (none: the checkpoint's demo prompts, as a grid)")
    p.add_argument("--prompt-file", default=None,
                   help="a UTF-8 file with one prompt per line, each stripped of surrounding whitespace (blank lines "
                   "and a leading byte-order mark ignored; a file without a prompt is an error)")
    p.add_argument("--out-dir", default="samples",
                   help="directory for the PNGs and settings.json, created with the first image; files of the same "
                   "name in it are replaced; an existing file of that name is an error (default: samples)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale, a finite number >= 0: scale s of N mixes the logits as "
                   "(1 + t) cond - t uncond with t = cfg * s / (N - 1), so 0 = no guidance (the prompt's logits "
                   "alone) and larger follows the prompt more closely (default: the checkpoint's sampling.json, "
                   "else the release's 4.5)")
    p.add_argument("--seed", type=int, default=1,
                   help=f"seed of the first image, 0 to {SEED_MAX} (2**32 - 1: a seed becomes a 32-bit "
                   "jax.random.PRNGKey); image i uses seed + i, which must stay in that range (default: 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens at every scale, k >= 0; 0 (or k at least the codebook size) "
                   "keeps every token (default: the checkpoint's sampling.json, else the release's rule, 600 for "
                   "the first 7 scales then 300)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold in [0, 1): keep the most likely tokens holding that share of the "
                   "probability; 0 disables (default: the checkpoint's sampling.json, else 0)")
    p.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="Gumbel-softmax smoothing of the code vectors (default: the checkpoint's sampling.json, else "
                   "on, as the release)")
    p.add_argument("--images-per-prompt", type=int, default=1,
                   help="images generated for each prompt, >= 1 (default: 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per compiled program call, >= 1; the last batch is padded (default: all, at most 8)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=False,
                   help="write one grid image instead of one file per image (default: off; on without a prompt)")
    p.add_argument("--resolution", type=int, default=None,
                   help="expected image side in pixels, >= 1; an error if the checkpoint generates another size "
                   "(default: not checked)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--attention-impl", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                   help="attention implementation (default auto: the fastest measured for the backend; logged)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default: on)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR", default=None,
                       help="directory of JAX's persistent compilation cache: a later run of the same shapes loads "
                       f"the compiled programs from it instead of compiling them (default: ${ENV_VAR} if set, "
                       "'off' meaning none; else $XDG_CACHE_HOME/hart_jax/jax_cache, ~/.cache/hart_jax/jax_cache "
                       "without XDG_CACHE_HOME). A cache directory configured through JAX itself "
                       "(JAX_COMPILATION_CACHE_DIR) is used instead of this flag's")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=False,
                       help="no persistent compilation cache (except one configured through JAX itself)")
    return p


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_cfg(cfg: Any, name: str) -> None:
    """A guidance scale is a finite number >= 0 that fits float32 (the sampler's runtime input)."""
    if not (_is_number(cfg) and 0 <= cfg <= float(np.finfo(np.float32).max)):  # NaN fails too
        raise HartError(f"{name} must be a finite number >= 0 (0: no guidance), got {cfg!r}")


def check_top_k(top_k: Any, name: str) -> None:
    """A top-k is an integer >= 0 (0 keeps every token)."""
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise HartError(f"{name} must be an integer >= 0 (0: keep every token), got {top_k!r}")


def check_top_p(top_p: Any, name: str) -> None:
    """A top-p is a number in [0, 1) (0 disables)."""
    if not (_is_number(top_p) and 0.0 <= top_p < 1.0):
        raise HartError(f"{name} must be in [0, 1) (0: disabled), got {top_p!r}")


def check_prompt(prompt: Any, name: str) -> None:
    """A prompt is a string with something besides whitespace."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise HartError(f"{name} holds no prompt (empty or only whitespace): {prompt!r}")


def check_seed(seed: int, images: int = 1, name: str = "--seed") -> None:
    """The seeds ``seed .. seed + images - 1`` all lie in ``0 .. SEED_MAX``."""
    if not 0 <= seed <= SEED_MAX:
        raise HartError(f"{name} must be in 0..{SEED_MAX} (2**32 - 1), got {seed}")
    last = seed + images - 1
    if last > SEED_MAX:
        raise HartError(f"{name} {seed} with {images} images: the last image's seed {last} is above {SEED_MAX} "
                        "(image i uses seed + i)")


def check_flags(args: argparse.Namespace) -> None:
    """The flag values that are wrong whatever the checkpoint and prompt file."""
    check_seed(args.seed)
    if args.cfg is not None:
        check_cfg(args.cfg, "--cfg")
    if args.top_k is not None:
        check_top_k(args.top_k, "--top-k")
    if args.top_p is not None:
        check_top_p(args.top_p, "--top-p")
    for flag, value in (("--images-per-prompt", args.images_per_prompt), ("--batch-size", args.batch_size),
                        ("--resolution", args.resolution)):
        if value is not None and value < 1:
            raise HartError(f"{flag} must be >= 1, got {value}")


def check_out_dir(out: Path) -> None:
    """``out`` is a directory or can be made one: its nearest existing ancestor (or itself) is
    a writable directory. Nothing is created."""
    check_writable_dir(out, "--out-dir")


def check_compile_cache(setting: str | bool | None) -> None:
    """A cache directory named by ``--compile-cache`` or ``$HART_JAX_COMPILE_CACHE`` is a
    directory or can be made one (the default directory, when unusable, only means no cache)."""
    if setting is False or (setting is None and os.environ.get(ENV_VAR) is None):
        return
    want = requested_dir(setting)
    if want is not None:
        check_writable_dir(want, "--compile-cache" if setting is not None else ENV_VAR)


def check_sampling(settings: dict, source: str) -> None:
    """The values of a ``sampling.json`` (``source`` names the file in errors)."""
    check_cfg(settings["cfg"], f"{source}: cfg")
    if settings["top_k"] is not None:
        check_top_k(settings["top_k"], f"{source}: top_k")
    check_top_p(settings["top_p"], f"{source}: top_p")
    if not isinstance(settings["more_smooth"], bool):
        raise HartError(f"{source}: more_smooth must be true or false, got {settings['more_smooth']!r}")
    prompts = settings.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list):
            raise HartError(f"{source}: prompts must be a list of strings, got {prompts!r}")
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, f"{source}: prompts[{i}]")


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
        if not isinstance(d, dict):
            raise HartError(f"{f}: not a JSON object")
        unknown = sorted(set(d) - set(out) - {"prompts"})
        if unknown:
            raise HartError(f"{f}: unknown setting(s) {', '.join(unknown)}")
        out.update(d)
        check_sampling(out, str(f))
    return out


def read_text_file(p: Path, what: str) -> str:
    """A UTF-8 file's text without a leading byte-order mark; errors name the file and,
    for bad UTF-8, the offending byte's offset and line."""
    if not os.path.lexists(p):
        raise HartError(f"{p}: {what} not found")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise HartError(f"{p}: cannot read {what} ({e.strerror})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise HartError(f"{p}: {what} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, "
                        f"line {line})") from None


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """``--prompt`` values then the non-blank lines of ``--prompt-file``; errors name the
    prompt or the file (an empty list when neither is given)."""
    out = list(prompts)
    for i, prompt in enumerate(prompts, 1):
        check_prompt(prompt, f"--prompt #{i}")
    if prompt_file is not None:
        p = Path(prompt_file)
        lines = [line.strip() for line in read_text_file(p, "prompt file").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise HartError(f"{p}: prompt file holds no prompt (empty or only whitespace lines)")
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


def write_png(out: Path, name: str, img: np.ndarray) -> None:
    """Write ``out/name``, creating ``out`` first if needed."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out / name)


def run(args: argparse.Namespace) -> Iterator[str]:
    """Check every input, then generate and write the images; yields lines to print."""
    t_start = time.perf_counter()
    check_flags(args)
    out = Path(args.out_dir)
    check_out_dir(out)
    check_compile_cache(args.compile_cache)
    prompts = read_prompts(args.prompt, args.prompt_file)

    from hart_jax.builtin import DEFAULT_CKPT
    from hart_jax.pipeline import check_pipeline_dir

    builtin = args.ckpt is None
    ckpt = Path(DEFAULT_CKPT if builtin else args.ckpt)
    check_pipeline_dir(ckpt)
    defaults = sampling_defaults(ckpt)
    cfg = defaults["cfg"] if args.cfg is None else args.cfg
    top_k = defaults["top_k"] if args.top_k is None else args.top_k
    more_smooth = defaults["more_smooth"] if args.more_smooth is None else args.more_smooth
    top_p = defaults["top_p"] if args.top_p is None else args.top_p
    grid_out = args.grid
    demo = not prompts
    if demo:
        from hart_jax.data.shapes import PROMPTS

        prompts = list(defaults.get("prompts") or PROMPTS)
        grid_out = True
    check_seed(args.seed, len(prompts) * args.images_per_prompt)
    if demo:
        yield (f"no prompt given: drawing the {len(prompts)} demo prompts of "
               f"{'the built-in model' if builtin else ckpt} into one grid ({'; '.join(prompts)})")

    import jax.numpy as jnp

    from hart_jax.attention import describe_impl
    from hart_jax.pipeline import HARTPipeline

    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    t_load = time.perf_counter()
    pipe = HARTPipeline.from_converted(ckpt, attention_impl=args.attention_impl, dtype=dtype,
                                       compile_cache=args.compile_cache)
    load_s = time.perf_counter() - t_load
    if args.resolution is not None and args.resolution != pipe.resolution:
        raise HartError(
            f"unsupported resolution {args.resolution}: this checkpoint generates {pipe.resolution}x{pipe.resolution}"
        )
    names: list[str] = []
    first_batch_s: float | None = None

    def save(start: int, imgs: np.ndarray) -> None:
        nonlocal first_batch_s
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - t0
        if grid_out:
            return
        for j, img in enumerate(imgs):
            i = start + j
            name = f"{i:05d}_p{i // args.images_per_prompt:04d}_seed{args.seed + i}.png"
            write_png(out, name, img)
            names.append(name)

    events = CacheEvents()
    t0 = time.perf_counter()
    with events:  # counts the compilation of the sampling program (a cache hit or not)
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
        write_png(out, "grid.png", grid(images))
        names = ["grid.png"]
    total_s = time.perf_counter() - t_start
    cache_dir = None if pipe.compile_cache_dir is None else str(pipe.compile_cache_dir)
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
        "attention_impl": describe_impl(pipe.t2i_cfg.attention_impl, pipe.dtype, pipe.t2i_cfg.head_dim),
        "resolution": pipe.resolution,
        "files": names,
        "images": [
            {"file": None if grid_out else names[i], "prompt": prompts[i // args.images_per_prompt],
             "seed": args.seed + i}
            for i in range(len(images))
        ],
        # load: reading the model; first_batch: compiling (or loading from the cache) and running
        # the first batch; sampling: every batch; total: from the flag checks to the last file
        "seconds": {"load": round(load_s, 3), "first_batch": round(first_batch_s or 0.0, 3),
                    "sampling": round(seconds, 3), "total": round(total_s, 3)},
        "compile_cache": cache_dir,
        # JAX's persistent-cache events while sampling: requests = compilations, hits = read
        # from the cache, misses = compiled and written to it (hits and misses stay 0 when off)
        "compile": dict(events.as_dict(), source=events.summary()),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    yield (f"wrote {len(names)} file(s) and settings.json to {out} ({len(images)} image(s); load {load_s:.1f} s, "
           f"first batch {first_batch_s or 0.0:.1f} s ({events.summary()}), total {total_s:.1f} s; "
           f"compile cache: {cache_dir or 'off'})")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run :func:`run`; returns the exit status (2 with one ``error:`` line on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        for line in run(args):
            print(line)
    except (HartError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
