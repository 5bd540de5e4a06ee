"""Attention throughput of the ``xla``, ``cudnn`` and ``pallas`` implementations on HART's shapes.

Measures, on the current default device:
- the bf16 matmul peak (a large square ``jnp.dot``), the ceiling for everything else;
- training attention (level mask) at the 0.7B model's shapes (24 heads x 64, sequence
  9750 = 300 text + 13 scales of the 1024 px model), forward and forward+backward;
- sampling attention for every stage of the 1024 px model: the stage's queries against
  the KV cache (``padded_cache_length(9750)`` entries) filled up to the end of the stage.
  By default the caches are laid out as the sampler keeps them, every block's stacked
  ``[depth, B, Lm, H, D]`` with the block index traced, so the time includes whatever
  an implementation pays to get at one block's cache (``--cache-layout single``: one
  ``[B, Lm, H, D]`` cache).

Throughput counts useful FLOPs only (visible query-key pairs: 4·D per pair forward,
2.5x that again backward), so an implementation that computes masked entries gets no
credit for them. Results are written as JSON (``--out``) and printed as a Markdown
table for ``docs/benchmarks.md``. ``--write-table PATH`` merges the times into the
dispatch table ``attention_impl="auto"`` reads (``hart_jax/kernels/dispatch_table.json``:
the group of this device kind and dtype is replaced; ``-`` prints the group instead).

The Pallas kernels run with the tile table's row for this GPU
(``hart_jax/kernels/tile_table.json``) unless tile flags are given. ``--sweep`` times each
Pallas kernel over a grid of block sizes (64-256), warps (4, 8) and pipeline stages (2-5):
the forward, then the dk/dv and the dq backward kernels (forward+backward timed, the other
kernels held at the best so far), then the cache kernel (summed over ``--stages``), its
short stages (``cache``) and its long ones (``cache_long``, from ``--long-queries``) apart; invalid
points are skipped, and ``--sweep-budget-s`` bounds the time. ``--write-tiles PATH`` writes
each kernel's winner into that tile table's row for this device kind (``-``: print them).

Usage (GPU):   python -m bench.attention_bench --out bench_results.json
Tile sweep:    python -m bench.attention_bench --impls pallas --sweep --stages 0,8,13 --sweep-budget-s 900 \
                   --write-tiles hart_jax/kernels/tile_table.json
Auto's table: python -m bench.attention_bench --write-table hart_jax/kernels/dispatch_table.json
Smoke (CPU):   python -m bench.attention_bench --smoke   (tiny shapes, Pallas interpreted; --sweep: 2 points a kernel)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hart_jax import attention as attn  # noqa: E402
from hart_jax.kernels import dispatch_table, tile_table  # noqa: E402
from hart_jax.kernels.cache_attention import CacheAttentionConfig, padded_cache_length  # noqa: E402
from hart_jax.kernels.level_attention import LevelAttentionConfig  # noqa: E402
from hart_jax.models.transformer import T2IConfig  # noqa: E402

# hart-0.7b-1024px (T2IConfig's defaults): 300 text tokens, 14 scales, 24 blocks of 24 heads x 64;
# SMOKE: the fixture model's layout with 2 heads of 16
FULL = T2IConfig()
SMOKE = T2IConfig(context_token=6, patch_nums=(1, 2, 3, 4, 6), depth=2, embed_dim=32, num_heads=2)


def stage_shapes(cfg: T2IConfig) -> list[tuple[int, int, int]]:
    """Sampling stages as ``(stage, queries, cache entries visible)``; stage 0 feeds the text."""
    return [(s, end - begin, end) for s, (begin, end) in enumerate(cfg.stage_slices())]


def selected_stages(shape: T2IConfig, args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """``stage_shapes`` of the stages named by ``--stages`` (all when none are)."""
    wanted = {int(s) for s in args.stages.split(",") if s}
    return [st for st in stage_shapes(shape) if not wanted or st[0] in wanted]


def in_class(kernel: str, queries: int, cfg: CacheAttentionConfig) -> bool:
    """Whether a stage of ``queries`` queries runs with the tiles of ``kernel`` (``"cache"`` or
    ``"cache_long"``) under ``cfg``."""
    return (queries >= cfg.long_queries) == (kernel == "cache_long")


def time_fn(fn: Callable, args: Sequence[Any], warmup: int, iters: int) -> float:
    """Median wall time (seconds) of ``fn(*args)`` after compilation and warmup."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(n: int, warmup: int, iters: int) -> dict:
    """bf16 ``[n, n] @ [n, n]`` throughput."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    t = time_fn(jax.jit(jnp.dot), (a, b), warmup, iters)
    return {"n": n, "ms": t * 1e3, "tflops": 2 * n**3 / t / 1e12}


def _run(name: str, fn: Callable, args: Sequence[Any], flops: float, peak: float, warmup: int, iters: int) -> dict:
    try:
        t = time_fn(fn, args, warmup, iters)
    except Exception as e:  # an implementation that cannot run here (no cuDNN, OOM): recorded, not fatal
        return {"impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    tflops = flops / t / 1e12
    return {"impl": name, "ms": t * 1e3, "tflops": tflops, "fraction_of_peak": tflops / peak}


LEVEL_TILE_FLAGS = {  # flag (argparse dest) -> the LevelAttentionConfig fields it sets
    "block_q": ("block_q",), "block_k": ("block_k",),
    "block_q_bwd": ("block_q_bwd", "block_q_dq"), "block_k_bwd": ("block_k_bwd", "block_k_dq"),
    "num_warps": ("num_warps", "num_warps_bwd", "num_warps_dq"),
    "num_stages": ("num_stages", "num_stages_bwd", "num_stages_dq"),
}
CACHE_TILE_FLAGS = {  # flag -> the CacheAttentionConfig fields it sets (short and long stages)
    "cache_block_q": ("block_q", "block_q_long"), "cache_block_k": ("block_k", "block_k_long"),
    "num_warps": ("num_warps", "num_warps_long"), "num_stages": ("num_stages", "num_stages_long"),
}


def level_config(args: argparse.Namespace, interpret: bool) -> LevelAttentionConfig:
    """The training kernel's tiles: the tile table's for this device, with the flags given."""
    base = attn.pallas_config("level_attention", interpret)
    given = {f: getattr(args, flag) for flag, fields in LEVEL_TILE_FLAGS.items()
             if getattr(args, flag) is not None for f in fields}
    return dataclasses.replace(base, **given)


def cache_config(args: argparse.Namespace, interpret: bool) -> CacheAttentionConfig:
    """The sampling kernel's tiles: the tile table's for this device, with the flags given."""
    base = attn.pallas_config("cache_attention", interpret)
    given = {f: getattr(args, flag) for flag, fields in CACHE_TILE_FLAGS.items()
             if getattr(args, flag) is not None for f in fields}
    if args.long_queries is not None:
        given["long_queries"] = args.long_queries
    return dataclasses.replace(base, **given)


def bench_training(
    shape: T2IConfig,
    impls: Sequence[str],
    args: argparse.Namespace,
    peak: float,
    interpret: bool,
    cfg: LevelAttentionConfig | None = None,
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
) -> list:
    """Level-mask attention, forward and/or forward+backward, for each implementation."""
    lev = shape.level_ids()
    L, H, D, B = len(lev), shape.num_heads, shape.head_dim, args.batch
    dtype = jnp.dtype(args.dtype)
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v, do = (jax.random.normal(kk, (B, L, H, D), dtype) for kk in ks)
    pairs = int(np.sum(lev[None, :] <= lev[:, None]))
    fwd_flops = 4.0 * D * pairs * B * H
    scale = 0.25 / np.sqrt(D)
    lev_j = jnp.asarray(lev)
    cfg = cfg or level_config(args, interpret)
    rows = []
    for impl in impls:
        def f(q, k, v, impl=impl):
            return attn.attention(q, k, v, q_levels=lev_j, k_levels=lev_j, scale=scale, impl=impl,
                                  interpret=interpret, config=cfg)

        def fb(q, k, v, do, f=f):
            return jax.vjp(f, q, k, v)[1](do)

        if "fwd" in passes:
            r = _run(impl, jax.jit(f), (q, k, v), fwd_flops, peak, args.warmup, args.iters)
            rows.append({"pass": "fwd", "L": L, "B": B, "H": H, "D": D, **r})
        if "fwd+bwd" in passes:
            r = _run(impl, jax.jit(fb), (q, k, v, do), 3.5 * fwd_flops, peak, args.warmup, args.iters)
            rows.append({"pass": "fwd+bwd", "L": L, "B": B, "H": H, "D": D, **r})
    return rows


def bench_sampling(
    shape: T2IConfig,
    impls: Sequence[str],
    args: argparse.Namespace,
    peak: float,
    interpret: bool,
    cfg: CacheAttentionConfig | None = None,
    stage_class: str | None = None,
) -> list:
    """Cache attention of every sampling stage, for each implementation; ``stage_class``
    ``"cache"`` / ``"cache_long"``: only the stages below / from ``cfg.long_queries`` queries."""
    Lm = padded_cache_length(stage_shapes(shape)[-1][2])
    cfg = cfg or cache_config(args, interpret)
    stages = [st for st in selected_stages(shape, args) if stage_class is None or in_class(stage_class, st[1], cfg)]
    H, D, B = shape.num_heads, shape.head_dim, args.sample_batch
    dtype = jnp.dtype(args.dtype)
    kk, kv = jax.random.split(jax.random.PRNGKey(2))
    stacked = args.cache_layout == "stacked"
    cache_shape = ((shape.depth,) if stacked else ()) + (B, Lm, H, D)
    k_cache = jax.random.normal(kk, cache_shape, dtype)
    v_cache = jax.random.normal(kv, cache_shape, dtype)
    layer = jnp.int32(shape.depth // 2) if stacked else None  # traced, as in the sampler's loop
    scale = 0.25 / np.sqrt(D)
    rows = []
    for s, n, end in stages:
        q = jax.random.normal(jax.random.PRNGKey(100 + s), (B, n, H, D), dtype)
        flops = 4.0 * D * n * end * B * H
        for impl in impls:
            def f(q, kc, vc, layer, impl=impl, end=end):
                return attn.cache_attention(q, kc, vc, valid_len=end, scale=scale, layer=layer, impl=impl,
                                            interpret=interpret, config=cfg)

            r = _run(impl, jax.jit(f), (q, k_cache, v_cache, layer), flops, peak, args.warmup, args.iters)
            rows.append({"stage": s, "queries": n, "valid": end, "cache": Lm, "B": B,
                         "layout": args.cache_layout, **r})
    return rows


SWEEP_BLOCKS, SWEEP_WARPS, SWEEP_STAGES = (64, 128, 256), (4, 8), (2, 3, 4, 5)
# under --smoke: two points a kernel (CPU, interpreted; the times mean nothing)
SMOKE_POINTS = ({"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 2},
                {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 3})


def sweep_grid(smoke: bool) -> list[dict[str, int]]:
    """Grid points ``{block_q, block_k, num_warps, num_stages}`` tried for every kernel."""
    if smoke:
        return [dict(p) for p in SMOKE_POINTS]
    return [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
            for bq in SWEEP_BLOCKS for bk in SWEEP_BLOCKS for w in SWEEP_WARPS for st in SWEEP_STAGES]


def valid_point(kernel: str, point: dict[str, int]) -> bool:
    """Whether the kernel's config takes ``point`` (powers of two; the cache's ``block_k``
    divides ``CACHE_ALIGN``)."""
    try:
        if kernel.startswith("cache"):
            tile_table.cache_config(point)
        else:
            tile_table.level_config({kernel: point})
    except ValueError:
        return False
    return True


def sweep_points(kernel: str, smoke: bool, baseline: dict[str, int]) -> tuple[list[dict[str, int]], int]:
    """The points swept for ``kernel``, ``baseline`` (the tiles in use) first, and the number
    of grid points skipped as invalid."""
    grid = sweep_grid(smoke)
    points = [dict(baseline)] + [p for p in grid if p != baseline]
    valid = [p for p in points if valid_point(kernel, p)]
    return valid, len(points) - len(valid)


def sweep(shape: T2IConfig, args: argparse.Namespace, peak: float, interpret: bool) -> tuple[dict, dict]:
    """Time the Pallas kernels over ``sweep_points``; per kernel, rows fastest first (failures
    last), and what was skipped.

    In turn: the forward kernel (forward pass timed); the dk/dv kernel, then the dq kernel
    (forward+backward timed, the kernels before held at their winners); the cache kernel (the
    sum over the sampling stages of ``--stages``), ``cache`` over those with fewer than
    ``long_queries`` queries, then ``cache_long`` over the others (a class with no stage
    selected is not swept). The first point of each (the tiles in use)
    always runs; the others while the kernel's share of ``--sweep-budget-s`` lasts (the
    budget left, split over the kernels left).
    """
    fastest = lambda rows: sorted(rows, key=lambda r: r.get("ms", float("inf")))  # noqa: E731
    level = level_config(args, interpret)
    level = tile_table.level_config(tile_table.level_tiles(level), level)  # dq's own tiles, not the dk/dv ones
    t_start, budget = time.perf_counter(), args.sweep_budget_s
    out: dict[str, list] = {}
    skipped: dict[str, dict[str, int]] = {}
    cache = cache_config(args, interpret)

    def cache_with(kernel: str, point: dict[str, int]) -> CacheAttentionConfig:
        tiles = {**tile_table.cache_tiles(cache), kernel: point}
        cfg = tile_table.cache_config(tiles["cache"], tiles["cache_long"])
        return dataclasses.replace(cfg, long_queries=cache.long_queries)

    for i, kernel in enumerate(tile_table.KERNELS):
        is_cache = kernel.startswith("cache")
        if is_cache and not any(in_class(kernel, n, cache) for _, n, _ in selected_stages(shape, args)):
            out[kernel], skipped[kernel] = [], {"invalid": 0, "budget": 0, "no_stages": 1}
            continue
        baseline = tile_table.cache_tiles(cache)[kernel] if is_cache else tile_table.level_tiles(level)[kernel]
        points, invalid = sweep_points(kernel, args.smoke, baseline)
        share = (budget - (time.perf_counter() - t_start)) / (len(tile_table.KERNELS) - i)
        t_kernel, rows = time.perf_counter(), []
        for j, point in enumerate(points):
            if j and time.perf_counter() - t_kernel > share:
                break
            if is_cache:
                timed = bench_sampling(shape, ["pallas"], args, peak, interpret, cache_with(kernel, point), kernel)
                errors = [r["error"] for r in timed if "error" in r]
                rows.append({**point, "error": errors[0]} if errors else {**point, "ms": sum(r["ms"] for r in timed)})
            else:
                cfg = tile_table.level_config({kernel: point}, level)
                passes = ("fwd",) if kernel == "level_fwd" else ("fwd+bwd",)
                rows += [{**point, **r} for r in bench_training(shape, ["pallas"], args, peak, interpret, cfg, passes)]
        out[kernel] = fastest(rows)
        skipped[kernel] = {"invalid": invalid, "budget": len(points) - len(rows)}
        if not out[kernel] or "ms" not in out[kernel][0]:
            continue
        if is_cache:
            cache = cache_with(kernel, {k: out[kernel][0][k] for k in tile_table.TILE_KEYS})
        else:
            level = tile_table.level_config({kernel: out[kernel][0]}, level)
    return out, skipped


def markdown(result: dict) -> str:
    """The result as Markdown tables (for docs/benchmarks.md)."""
    lines = [
        f"device: {result['device']}, jax {result['jax']}, dtype {result['dtype']}",
        f"bf16 matmul peak: {result['matmul_peak']['tflops']:.4g} TFLOP/s (n={result['matmul_peak']['n']})",
        "",
        "| pass | impl | ms | TFLOP/s | of peak |",
        "|---|---|---|---|---|",
    ]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['pass']} | {r['impl']} | - | - | {r['error']} |")
        else:
            cells = (r["pass"], r["impl"], f"{r['ms']:.3f}", f"{r['tflops']:.3g}", f"{r['fraction_of_peak']:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| stage | queries | valid | impl | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['queries']} | {r['valid']} | {r['impl']} | - | {r['error']} |")
        else:
            cells = (r["stage"], r["queries"], r["valid"], r["impl"], f"{r['ms']:.3f}", f"{r['tflops']:.3g}")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    totals = result["sampling_total_ms"]
    lines += ["", f"sampling ({result.get('cache_layout', 'single')} caches), all stages: " + ", ".join(f"{k} {v:.3f} ms" for k, v in totals.items())]
    for name, rows in result.get("sweep", {}).items():
        skipped = result.get("sweep_skipped", {}).get(name, {})
        lines += ["", f"pallas sweep, {name} (fastest first; skipped: {skipped}):"]
        for r in rows[:5] + [r for r in rows[5:] if "error" in r][:3]:
            params = ", ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("block", "num")))
            lines.append(f"- {params}: " + (f"{r['ms']:.3f} ms" if "ms" in r else r["error"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Pallas interpreted)")
    p.add_argument("--impls", default="xla,cudnn,pallas", help="comma-separated subset of xla,cudnn,pallas")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=1, help="training batch")
    p.add_argument("--sample-batch", type=int, default=8, help="sampling rows (CFG doubles prompts)")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    tiles = "default: the tile table's row for this device (hart_jax/kernels/tile_table.json)"
    for flag in ("--block-q", "--block-k", "--block-q-bwd", "--block-k-bwd", "--cache-block-q",
                 "--cache-block-k", "--num-warps", "--num-stages"):
        p.add_argument(flag, type=int, default=None, help=tiles)
    p.add_argument("--long-queries", type=int, default=None,
                   help="sampling stages with at least this many queries take the cache kernel's long tiles "
                        "(default: CacheAttentionConfig's, 1024; --smoke: 16)")
    p.add_argument("--cache-layout", default="stacked", choices=["stacked", "single"],
                   help="sampling caches: every block's stacked (the sampler's layout) or one block's")
    p.add_argument("--stages", default="", help="comma-separated sampling stages to run (default: all)")
    p.add_argument("--no-sampling", dest="sampling", action="store_false", help="skip the sampling stages")
    p.add_argument("--sweep", action="store_true",
                   help="also time each Pallas kernel over a grid of tiles / warps / stages")
    p.add_argument("--sweep-budget-s", type=float, default=1800.0,
                   help="time budget of --sweep (seconds; the first point of each kernel always runs)")
    p.add_argument("--write-tiles", default=None, metavar="PATH",
                   help="with --sweep: write each kernel's winner into this tile table for this device kind "
                        "(hart_jax/kernels/tile_table.json is the one hart_jax.attention reads); '-' prints them")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--write-table", default=None, metavar="PATH",
                   help="merge the times into this dispatch table (hart_jax/kernels/dispatch_table.json "
                        "is the one attention_impl=auto reads); '-' prints the table group instead")
    args = p.parse_args(argv)
    if args.write_tiles and not args.sweep:
        p.error("--write-tiles needs --sweep")
    if args.smoke:
        args.batch, args.sample_batch, args.matmul_n = 1, 2, 128
        args.warmup, args.iters = 1, 1
        if args.long_queries is None:
            args.long_queries = 16  # the smoke shape's stages 3 and 4 take the long tiles
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns (and optionally writes) the JSON-able result."""
    args = parse_args(argv)
    impls = [s for s in args.impls.split(",") if s]
    for impl in impls:
        if impl not in attn.IMPLS:
            raise ValueError(f"--impls: unknown implementation {impl!r}; choose from {attn.IMPLS}")
    shape = SMOKE if args.smoke else FULL
    backend = jax.default_backend()
    interpret = backend != "gpu"  # Pallas Triton kernels run natively only on GPU
    dev = jax.devices()[0]
    peak = matmul_peak(args.matmul_n, args.warmup, args.iters)
    result = {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": backend,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "command": " ".join(["python -m bench.attention_bench", *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
        "pallas_interpret": interpret,
        "cache_layout": args.cache_layout,
        "shape": dict(context_tokens=shape.context_token, patch_nums=list(shape.patch_nums),
                      heads=shape.num_heads, head_dim=shape.head_dim, depth=shape.depth),
        "matmul_peak": peak,
        "training": bench_training(shape, impls, args, peak["tflops"], interpret),
        "sampling": bench_sampling(shape, impls, args, peak["tflops"], interpret) if args.sampling else [],
    }
    if args.sweep:
        result["sweep"], result["sweep_skipped"] = sweep(shape, args, peak["tflops"], interpret)
    totals: dict[str, float] = {}
    for impl in impls:
        rows = [r for r in result["sampling"] if r["impl"] == impl]
        if rows and all("ms" in r for r in rows):
            totals[impl] = sum(r["ms"] for r in rows)
    result["sampling_total_ms"] = totals
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    if args.write_table == "-":
        print(json.dumps(dispatch_table.group_from_bench(result), indent=1))
    elif args.write_table:
        dispatch_table.write_table(Path(args.write_table), result)
        print(f"dispatch table: {args.write_table} ({result['device']}, {args.dtype})")
    if args.write_tiles == "-":
        print(json.dumps(tile_table.winners(result["sweep"]), indent=1))
    elif args.write_tiles:
        tile_table.write_tiles(Path(args.write_tiles), result)
        print(f"tile table: {args.write_tiles} ({result['device']})")
    return result


if __name__ == "__main__":
    main()
