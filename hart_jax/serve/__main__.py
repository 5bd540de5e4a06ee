"""``python -m hart_jax.serve [--ckpt DIR] [--port N]``: the web demo and the JSON endpoint.

Bad flags print one ``error: ...`` line and exit with status 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hart_jax.errors import HartError, OneLineArgumentParser
from hart_jax.sample_cli import check_compile_cache
from hart_jax.serve.batcher import DEFAULT_BATCH_SIZES
from hart_jax.serve.schema import Limits

DESCRIPTION = """Serve HART text-to-image: a web page at http://HOST:PORT/ and a JSON endpoint at
POST /api/generate (schema: docs/serving.md), with /api/stats. Concurrent requests with the same
sampling settings are gathered for up to --max-wait-ms into one call of the smallest compiled
batch size that holds them; every batch size is compiled at start-up (or loaded from JAX's
compilation cache)."""


class _Parser(OneLineArgumentParser):
    hint = " (see --help)"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sorted(set(sizes))


def build_parser() -> argparse.ArgumentParser:
    """The flags (``--help`` states every default)."""
    p = _Parser(prog="python -m hart_jax.serve", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="converted pipeline directory (default: the built-in shapes model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port, 0..65535; 0 picks a free one (default: 7860)")
    p.add_argument("--batch-sizes", type=_sizes, default=list(DEFAULT_BATCH_SIZES),
                   help="compiled batch sizes, comma-separated (default: %s; one size keeps every image "
                        "bit-identical to its seed's image alone, more sizes cut a lone request's latency)"
                        % ",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long the oldest waiting image waits for others to share its batch, >= 0 (default: 50)")
    p.add_argument("--max-queued-images", type=int, default=64,
                   help="images that may wait; a request past it is answered 503 (default: 64)")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help=f"images one request may ask for, >= 1 (default: {Limits.max_images})")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR", default=None,
                       help="JAX's persistent compilation cache directory (default: as sample.py)")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=False,
                       help="no persistent compilation cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load and compile, then serve until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise HartError(f"--port must be in 0..65535, got {args.port}")
        if not args.max_wait_ms >= 0:
            raise HartError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
        for flag, v in (("--max-queued-images", args.max_queued_images), ("--max-images", args.max_images)):
            if v < 1:
                raise HartError(f"{flag} must be >= 1, got {v}")
        if args.max_queued_images < args.max_images:
            raise HartError(f"--max-queued-images ({args.max_queued_images}) must be >= --max-images "
                            f"({args.max_images}): a request that may never fit would always be refused")
        check_compile_cache(args.compile_cache)
        from hart_jax.serve.app import Server, load_service

        service = load_service(args.ckpt, args.batch_sizes, args.max_wait_ms / 1000, args.max_queued_images,
                               Limits(max_images=args.max_images), args.compile_cache, log=print)
        try:
            server = Server(service, args.host, args.port)
        except OSError as e:
            raise HartError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    except (HartError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving on {server.url}/ (JSON: POST {server.url}/api/generate)", flush=True)
    try:
        server.serve_forever()
    finally:
        service.batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
