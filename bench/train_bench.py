"""Training step throughput: step time, tokens/s and MFU.

Measures one jitted optimizer step (``hart_jax.train``) on synthetic batches of the
preset's shapes, on all local devices of the default backend (FSDP over them):
compile time (lower + compile) separately, then ``--steps`` steps per repeat, the
median of ``--repeats`` repeats. Tokens are transformer sequence tokens (level-0
block + scales 1..N-2 + the kept last-scale tokens) per step.

MFU = model FLOPs per step / step time / peak, in two conventions
(``hart_jax.flops.train_flops``: the transformer, its head and the diffusion head,
3x forward; the frozen tokenizer and text encoder are not counted): ``mfu_useful``
counts only the attention pairs HART's level mask lets through (key level <= query
level, with the kept last-scale tokens), ``mfu_dense`` all ``L x L`` pairs (what the
dense ``xla`` path computes; the usual dense-attention convention). XLA's own count of
the whole compiled step is reported next to them. Tokens/s is also given per device.
Peak: ``--peak-tflops`` (all devices together), else a known GPU's dense bf16 peak, else
(CPU) the measured throughput of a large fp32 matmul on this machine, times the devices.

    python -m bench.train_bench                                  # tiny_t2i on CPU
    python -m bench.train_bench --preset hart_0p7b_1024 --batch 8 --codes --n-keep 1024   # one GPU
    python -m bench.train_bench --preset hart_0p7b_1024 --batch 16 --codes --remat full   # remat policy

``--remat`` (none | dots | full) overrides the preset's ``train.remat`` (block
rematerialisation; docs/training.md has each policy's compiled memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.train import get_config  # noqa: E402
from hart_jax.flops import train_flops  # noqa: E402
from hart_jax.train.loop import build  # noqa: E402
from bench.peaks import KNOWN_PEAKS, matmul_peak  # noqa: E402

def synthetic_batch(comp: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = comp.tcfg
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    if comp.config.data.codes:
        n = sum(p * p for p in cfg.patch_nums)
        out["codes"] = rng.integers(0, cfg.vocab_size, (batch, n)).astype(np.int32)
        out["last_layer_gt"] = rng.normal(size=(batch, cfg.patch_nums[-1] ** 2, cfg.z_channels)).astype(np.float32)
    else:
        out["image"] = rng.integers(0, 256, (batch, comp.resolution, comp.resolution, 3), dtype=np.uint8)
    if cfg.is_c2i:
        out["label"] = rng.integers(0, cfg.num_classes, (batch,)).astype(np.int32)
    else:
        t = cfg.context_token
        out["context"] = rng.normal(size=(batch, t, cfg.context_dim)).astype(np.float32)
        out["context_mask"] = np.ones((batch, t), bool)
        out["context_position_ids"] = np.tile(np.arange(t, dtype=np.int32), (batch, 1))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_t2i")
    ap.add_argument("--batch", type=int, default=8, help="global batch per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-keep", type=int, default=0, help="kept last-scale tokens (0: the preset's keep_count for step 0)")
    ap.add_argument("--codes", action="store_true", help="precomputed tokenizer codes (no tokenizer in the step)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of all devices together")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--remat", choices=["none", "dots", "full"], default=None,
                    help="block rematerialisation (default: the preset's train.remat)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    c = get_config(args.preset)
    c.train.batch_size = args.batch
    c.train.grad_accum = args.grad_accum
    c.data.codes = bool(args.codes)
    if args.remat:
        c.train.remat = args.remat
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if args.dtype:
        c.compute_dtype = args.dtype
    comp = build(c)
    n_keep = args.n_keep or comp.keep_for_step(0)
    state, shardings = comp.create_state()
    step = comp.make_step(shardings)
    batch = comp.global_batch(synthetic_batch(comp, args.batch))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, comp.frozen_params, n_keep).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    state, m = step(state, batch, comp.frozen_params, n_keep)  # warm-up (runs the cached executable)
    jax.block_until_ready(m)
    per_step = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch, comp.frozen_params, n_keep)
        jax.block_until_ready((state, m))
        per_step.append((time.perf_counter() - t) / args.steps)
    step_s = statistics.median(per_step)

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    n_dev = len(jax.devices())
    peak = args.peak_tflops * 1e12
    peak_src = "--peak-tflops"
    if not peak:
        for name, tf in KNOWN_PEAKS.items():
            if name in kind:
                peak, peak_src = tf * 1e12 * n_dev, f"{name} dense bf16 x{n_dev}"
                break
    if not peak:
        peak = matmul_peak() * n_dev
        peak_src = "measured fp32 2048^3 matmul"
    mul = comp.ocfg.diffusion_batch_mul
    useful = train_flops(comp.tcfg, args.batch, n_keep, mul)
    dense = train_flops(comp.tcfg, args.batch, n_keep, mul, dense_attention=True)
    tokens = comp.tokens_per_step(n_keep)
    res = {
        "preset": args.preset, "device": f"{kind} x{n_dev}", "platform": platform.processor() or platform.machine(),
        "jax": jax.__version__, "batch": args.batch, "remat": comp.model.remat, "n_keep": n_keep, "codes": bool(args.codes),
        "compute_dtype": c.compute_dtype, "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 2),
        "step_ms_repeats": [round(x * 1e3, 2) for x in per_step], "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / step_s, 1), "tokens_per_s_per_device": round(tokens / step_s / n_dev, 1),
        "images_per_s": round(args.batch / step_s, 2),
        "model_tflop_per_step_useful": round(useful / 1e12, 4), "model_tflop_per_step_dense": round(dense / 1e12, 4),
        "xla_tflop_per_step": round(xla_flops / 1e12, 4), "peak_tflops": round(peak / 1e12, 3), "peak_source": peak_src,
        "mfu_useful": round(useful / step_s / peak, 4), "mfu_dense": round(dense / step_s / peak, 4),
        "xla_flops_utilization": round(xla_flops / step_s / peak, 4),
        "loss": float(m["loss"]),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem is not None else None,
    }
    print(json.dumps(res, indent=2))
    print(
        f"MFU {res['mfu_useful']:.1%} on useful FLOPs (visible attention pairs), {res['mfu_dense']:.1%} "
        f"dense-attention convention; {res['tokens_per_s']:,.0f} tokens/s, "
        f"{res['tokens_per_s_per_device']:,.0f} per device",
        file=sys.stderr,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
