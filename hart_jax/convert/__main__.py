"""Command line: convert PyTorch HART checkpoints into hart-jax directories.

    python -m hart_jax.convert tokenizer SRC_DIR OUT_DIR [--weights FILE] [--force] [--keep-discriminator]
    python -m hart_jax.convert llm SRC_DIR OUT_DIR [--weights FILE] [--no-ema] [--force]
    python -m hart_jax.convert qwen2 SRC_DIR OUT_DIR --prefix-from constants.py [--tokenizer-dir DIR] [--force]
    python -m hart_jax.convert release RELEASE_DIR QWEN_DIR OUT_DIR --prefix-from constants.py [--force]

``python -m hart_jax.convert.qwen2 ...`` is the same as the ``qwen2`` subcommand. Every
input is checked before anything is converted; errors print one line naming the
problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from hart_jax.errors import OneLineArgumentParser, run_command


def _tokenizer(args: argparse.Namespace) -> str:
    from hart_jax.convert.tokenizer import save_tokenizer

    out = save_tokenizer(
        args.src, args.out, weights=args.weights, force=args.force, keep_discriminator=args.keep_discriminator
    )
    return f"wrote {out}"


def _llm(args: argparse.Namespace) -> str:
    from hart_jax.convert.llm import save_llm

    out = save_llm(args.src, args.out, weights=args.weights, use_ema=args.ema, force=args.force)
    return f"wrote {out}"


def _qwen2(args: argparse.Namespace) -> str:
    from hart_jax.convert.qwen2 import run

    return f"wrote {run(args)}"


def _release(args: argparse.Namespace) -> str:
    from hart_jax.convert.release import convert_release

    out = convert_release(
        args.src, args.text_encoder, args.out, prefix_source=args.prefix_from,
        allow_prefix_mismatch=args.allow_prefix_mismatch, use_ema=args.ema, force=args.force,
    )
    return f"wrote {out}"


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], str]]] = {
    "tokenizer": ("a release tokenizer/ directory (HARTAutoEncoderWithDisc)", _tokenizer),
    "llm": ("a release llm/ directory (HARTForT2I; EMA weights by default)", _llm),
    "qwen2": ("a Qwen2 / Qwen2-VL text encoder directory, with HART's prompt prefix", _qwen2),
    "release": ("a whole release (llm/ + tokenizer/) plus the Qwen2 text encoder, for the pipeline", _release),
}


def _add_release_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("src", help="release directory holding llm/ and tokenizer/ (hart-0.7b-1024px)")
    s.add_argument("text_encoder", help="Qwen2 / Qwen2-VL directory (config, weights, tokenizer files)")
    s.add_argument("out", help="pipeline directory to create")
    s.add_argument(
        "--prefix-from", default=None,
        help="the original hart/utils/constants.py (or a text file) holding the instruction prefix",
    )
    s.add_argument(
        "--allow-prefix-mismatch", action="store_true",
        help="accept a prefix whose SHA-256 differs from the release's",
    )


def _add_arguments(name: str, s: argparse.ArgumentParser) -> None:
    """The arguments of subcommand ``name``."""
    if name == "qwen2":
        from hart_jax.convert.qwen2 import add_arguments

        add_arguments(s)
        return
    if name == "release":
        _add_release_arguments(s)
    else:
        s.add_argument("src", help="source directory (config.json + weights)")
        s.add_argument("out", help="output directory to create")
        s.add_argument("--weights", default=None, help="weight file to read instead of the default search")
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    if name == "tokenizer":
        s.add_argument(
            "--keep-discriminator", action="store_true",
            help="also convert the PatchGAN discriminator (disc.*) for tokenizer fine-tuning",
        )
    if name in ("llm", "release"):
        s.add_argument(
            "--ema", action=argparse.BooleanOptionalAction, default=True,
            help="convert ema_model.bin (default, as the release's scripts load it) or the raw weights",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m hart_jax.convert``."""
    p = OneLineArgumentParser(
        prog="python -m hart_jax.convert",
        description="Convert PyTorch HART checkpoints to hart-jax (Orbax params + config), "
        "written atomically; an existing output is replaced only with --force. "
        "python -m hart_jax.convert.qwen2 is the same as the qwen2 subcommand.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        _add_arguments(name, sub.add_parser(name, help=f"convert {help_text}"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: COMMANDS[args.command][1](args))


if __name__ == "__main__":
    sys.exit(main())
