"""Generate images with HART from text prompts.

Examples:
    python sample.py                                   # the built-in shapes model, its demo prompts, one grid
    python sample.py --prompt "a red circle"           # the built-in model, one prompt
    python sample.py --ckpt converted/hart-0.7b-1024px --prompt "a red fox in the snow" --out-dir out/

Without ``--ckpt`` the built-in default model (``hart_jax.builtin``, trained by hart-jax on its
procedural shapes dataset) is used. A release checkpoint directory comes from
``python -m hart_jax.convert release hart-0.7b-1024px Qwen2-VL-1.5B-Instruct OUT --prefix-from constants.py``.
Writes one PNG per image (or one grid with --grid) and settings.json with every
prompt and setting used. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

DESCRIPTION = """Generate images with HART (Hybrid Autoregressive Transformer) from text prompts.
Each prompt is encoded by the converted Qwen2 text encoder, then the transformer generates the image
scale by scale (1x1 up to 64x64 tokens), a small diffusion head adds the fine detail, and the
tokenizer decodes the result. The defaults reproduce the original release's sample.py settings."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` is the reference for every flag)."""
    p = argparse.ArgumentParser(prog="python sample.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="converted pipeline directory (tokenizer/, transformer/, text_encoder/); "
                   "default: the built-in shapes model shipped in hart_jax/builtin")
    p.add_argument("--prompt", action="append", default=[],
                   help="a text prompt; repeat the flag for several (none: the checkpoint's demo prompts, as a grid)")
    p.add_argument("--prompt-file", default=None, help="a UTF-8 file with one prompt per line (blank lines ignored)")
    p.add_argument("--out-dir", default="samples", help="where the PNGs and settings.json are written (default: samples)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1.0 = no guidance; default: the checkpoint's sampling.json, "
                   "else the release's 4.5)")
    p.add_argument("--seed", type=int, default=1, help="seed of the first image; image i uses seed + i (default: 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens at every scale (default: the checkpoint's sampling.json, else "
                   "the release's rule, 600 then 300)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold (0 disables; default: the checkpoint's sampling.json, else 0)")
    p.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="Gumbel-softmax smoothing of the code vectors (default: the checkpoint's sampling.json, else "
                   "on, as the release)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images generated for each prompt (default: 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per compiled program call (default: all, at most 8); the last batch is padded")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=False,
                   help="write one grid image instead of one file per image (default: off; on without a prompt)")
    p.add_argument("--resolution", type=int, default=None,
                   help="expected image side in pixels; an error if the checkpoint generates another size (default: not checked)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--attention-impl", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                   help="attention implementation (default auto: the fastest measured for the backend; logged)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (default: on)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run ``hart_jax.sample_cli.run``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from hart_jax.errors import HartError
    from hart_jax.sample_cli import run

    try:
        for line in run(args):
            print(line)
    except (HartError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
