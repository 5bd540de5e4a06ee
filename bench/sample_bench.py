"""Sampling latency / throughput of the whole compiled program (text encoder -> image).

    python bench/sample_bench.py --preset tiny --json out.json            # CPU, a minute
    python bench/sample_bench.py --preset full --batch-sizes 1 8 16       # GPU, 0.7B + Qwen2-1.5B
    HART_SRC=/path/to/hart python bench/sample_bench.py --preset full --compare-original

Random weights (speed does not depend on their values; ``hart_jax.random_init``: set up
in seconds, ``setup_s``). One program per (resolution, batch): compile time is measured
apart (lower + compile), then ``--repeats`` timed calls after one warm-up; the median is
reported. Latency = batch 1, throughput = images/s at the larger batches; a batch that
does not fit in memory is reported as such and the next one is tried.

FLOPs: ``hart_jax.flops`` counts the program's matrix products part by part (text
encoder, transformer linear layers and attention over the visible query-key pairs, head,
sampling ops, diffusion head steps, decoder convolutions); the run reports each part's
share, the achieved TFLOP/s and its fraction of the matmul peak measured here in the
compute dtype (``--peak-tflops`` overrides) and of the vendor's dense peak where known.
XLA's own count (``cost_analysis``) is printed beside it: it counts a loop's body once
(the stacked blocks and the diffusion steps run in loops), so it is not the total.

``--compare-original`` also times the original PyTorch release (``bench/original_hart.py``,
source from ``$HART_SRC``) on the same shapes and inputs, in a child process that runs
first (before this process takes device memory), and prints the speed-up per batch size.

Peak memory: the compiled program's memory analysis, and the device's
``peak_bytes_in_use`` where the backend reports it (cumulative over the process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.peaks import known_peak, matmul_peak  # noqa: E402
from hart_jax import flops as flop_count  # noqa: E402
from hart_jax.attention import describe_impl  # noqa: E402
from hart_jax.compile_cache import CacheEvents  # noqa: E402
from hart_jax.pipeline import HARTPipeline  # noqa: E402
from hart_jax.random_init import PATCH_NUMS, preset_configs, random_pipeline, token_inputs  # noqa: E402
from hart_jax.sampling import SamplingConfig  # noqa: E402

PREFIX_LEN = 64  # HART's prompt prefix, in tokens, ahead of the context tokens
ROOT = Path(__file__).resolve().parents[1]


def build(
    preset: str, resolution: int, dtype: Any, abstract: bool = False, attention_impl: str = "auto",
    compile_cache: Any = False,
) -> HARTPipeline:
    """A random-weight pipeline of ``preset`` at ``resolution`` (shapes only if ``abstract``)."""
    tok, t2i, q = preset_configs(preset, resolution, attention_impl)
    return random_pipeline(tok, t2i, q, dtype, abstract=abstract, compile_cache=compile_cache)


def inputs(pipe: HARTPipeline, batch: int) -> tuple:
    """Random prompt encodings (``hart_jax.random_init.token_inputs``, numpy seed 0)."""
    return token_inputs(pipe, batch, PREFIX_LEN)


def program_flops(pipe: HARTPipeline, batch: int) -> dict[str, float]:
    """The analytic FLOPs of ``pipe.program(batch)`` by part."""
    return flop_count.sampling_flops(
        pipe.t2i_cfg, pipe.tok_cfg, batch, text_cfg=pipe.text_encoder.config,
        text_tokens=PREFIX_LEN + pipe.t2i_cfg.context_token,
    )


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(pipe: HARTPipeline, batch: int, repeats: int, compile_only: bool) -> dict:
    """Compile time, median latency over ``repeats``, FLOPs and memory of one program."""
    fn = pipe.program(batch, SamplingConfig())
    args = (pipe.t2i_vars, pipe.tok_vars, pipe.text_params, *inputs(pipe, batch), jnp.float32(4.5))
    out: dict[str, Any] = {"batch": batch}
    parts = program_flops(pipe, batch)
    total = sum(parts.values())
    out["tflop"] = float(f"{total / 1e12:.6g}")
    out["tflop_by_part"] = {k: float(f"{v / 1e12:.4g}") for k, v in parts.items()}
    out["share_by_part"] = {k: round(v / total, 4) for k, v in parts.items()}
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - report an out-of-memory batch and go on
        if _is_oom(e):
            return {**out, "error": "out of memory at compile"}
        raise
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        out["xla_tflop_loop_bodies_once"] = float(f"{float(cost['flops']) / 1e12:.4g}")
    mem = compiled.memory_analysis()
    if mem is not None:
        out["program_bytes"] = {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
        }
    if compile_only:
        return out
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))  # warm-up
        out["first_call_s"] = round(time.perf_counter() - t0, 3)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            return {**out, "error": "out of memory at run"}
        raise
    med = statistics.median(times)
    out.update(median_s=round(med, 4), images_per_s=round(batch / med, 3), repeats=repeats,
               all_s=[round(t, 4) for t in times], tflops_per_s=float(f"{total / med / 1e12:.4g}"))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = round(int(stats["peak_bytes_in_use"]) / 2**30, 2)
    return out


def run_original(resolution: int, batches: list[int], repeats: int, preset: str) -> dict:
    """Time the original release in a child process (``bench/original_hart.py``)."""
    if not os.environ.get("HART_SRC"):
        return {"error": "HART_SRC is not set: the path of a local copy of the original hart source"}
    out_json = Path(os.environ.get("TMPDIR", "/tmp")) / f"original_hart_{os.getpid()}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "original_hart.py"), "--preset", preset,
           "--resolution", str(resolution), "--batch-sizes", *map(str, batches), "--repeats", str(repeats),
           "--json", str(out_json)]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    if proc.returncode != 0 or not out_json.is_file():
        return {"error": f"original_hart.py exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(out_json.read_text())


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print JSON lines and the summary; write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024], choices=sorted(PATCH_NUMS),
                   help="full preset only (the tiny preset has the golden fixture's shape)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--attention-impl", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                   help="the transformer's attention_impl (auto: per shape from the measured table, logged)")
    p.add_argument("--compile-only", action="store_true", help="only lower + compile (memory and compile time)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak to report against (default: measured)")
    p.add_argument("--compare-original", action="store_true",
                   help="also time the original PyTorch release from $HART_SRC (bench/original_hart.py)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="use JAX's persistent compilation cache in DIR (default: off, so compile_s is XLA "
                   "compiling); run twice for time to first image cold, then warm")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    resolutions = [None] if args.preset == "tiny" else args.resolutions
    results: dict[str, Any] = {"runs": []}
    if args.compare_original:  # first, before this process holds any device memory
        for res in resolutions:
            results.setdefault("original", []).append(
                run_original(res or 1024, args.batch_sizes, args.repeats, args.preset))
            print(json.dumps({"original": results["original"][-1]}), flush=True)
    dtype = dtype or (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    kind = str(jax.devices()[0].device_kind)
    results.update({
        "device": kind, "backend": jax.default_backend(), "jax": jax.__version__,
        "python": platform.python_version(), "preset": args.preset, "dtype": str(jnp.dtype(dtype)),
        "command": " ".join(["python", "bench/sample_bench.py", *(argv if argv is not None else sys.argv[1:])]),
    })
    peak = vendor = 0.0
    if not args.compile_only:
        n = 8192 if jax.default_backend() != "cpu" else 1024
        measured = matmul_peak(n, dtype)
        results["matmul_peak_tflops"] = round(measured / 1e12, 1)
        results["matmul_peak_source"] = f"measured {n}^3 {jnp.dtype(dtype)} matmul"
        peak = args.peak_tflops * 1e12 or measured
        vendor = known_peak(kind)
        if vendor:
            results["vendor_peak_tflops"] = vendor / 1e12
    for res in resolutions:
        t0 = time.perf_counter()
        pipe = build(args.preset, res or 1024, dtype, abstract=args.compile_only, attention_impl=args.attention_impl,
                     compile_cache=args.compile_cache or False)
        if not args.compile_only:
            jax.block_until_ready((pipe.t2i_vars, pipe.tok_vars, pipe.text_params))
        setup_s = round(time.perf_counter() - t0, 2)
        results["attention_impl"] = describe_impl(args.attention_impl, dtype, pipe.t2i_cfg.head_dim)
        for b in args.batch_sizes:
            with CacheEvents() as events:
                r = {"resolution": pipe.resolution, "setup_s": setup_s,
                     **measure(pipe, b, args.repeats, args.compile_only)}
            if args.compile_cache:
                r["compile_cache"] = {"dir": args.compile_cache, "hits": events.hits, "misses": events.misses}
            if "first_call_s" in r:  # weights set up + compiled (or read from the cache) + first batch
                r["time_to_first_image_s"] = round(setup_s + r["compile_s"] + r["first_call_s"], 2)
            if "tflops_per_s" in r:
                achieved = r["tflop"] * 1e12 / r["median_s"]
                r["fraction_of_matmul_peak"] = float(f"{achieved / peak:.4g}")
                if vendor:
                    r["fraction_of_vendor_peak"] = float(f"{achieved / vendor:.4g}")
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
        del pipe
    for orig in results.get("original", []):
        ours = {r["batch"]: r for r in results["runs"] if r["resolution"] == (orig.get("resolution") or r["resolution"])}
        for row in orig.get("runs", []):
            mine = ours.get(row["batch"], {})
            if "median_s" in mine and "median_s" in row:
                row["speedup"] = round(row["median_s"] / mine["median_s"], 3)
                print(json.dumps({"batch": row["batch"], "original_s": row["median_s"], "ours_s": mine["median_s"],
                                  "speedup": row["speedup"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
