"""Training step throughput: step time, tokens/s and MFU.

Measures one jitted optimizer step (``hart_jax.train``) on synthetic batches of the
preset's shapes, on all local devices of the default backend (FSDP over them):
compile time (lower + compile) separately, then ``--steps`` steps per repeat, the
median of ``--repeats`` repeats. Tokens are transformer sequence tokens (level-0
block + scales 1..N-2 + the kept last-scale tokens) per step.

MFU = model FLOPs per step / step time / peak. Model FLOPs are counted analytically
for the transformer, its head and the diffusion head (forward x3 for training;
attention over the full ``L x L`` as the XLA path computes it; the frozen tokenizer
and text encoder are not counted), and XLA's own count of the whole compiled step is
reported next to it. Peak: ``--peak-tflops``, else a known GPU's dense bf16 peak,
else (CPU) the measured throughput of a large fp32 matmul on this machine.

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
from hart_jax.models.transformer import T2IConfig  # noqa: E402
from hart_jax.train.loop import build  # noqa: E402
from bench.peaks import KNOWN_PEAKS, matmul_peak  # noqa: E402

def model_flops(cfg: T2IConfig, batch: int, n_keep: int, batch_mul: int) -> float:
    """Training FLOPs of one step (3x forward) for the transformer + head + diffusion head."""
    c, hm, v = cfg.embed_dim, cfg.mlp_hidden, cfg.vocab_size
    mid = sum(p * p for p in cfg.patch_nums[1:-1])
    seq = cfg.first_l + mid + n_keep
    per_tok_block = 2 * (3 * c * c + c * c + 3 * c * hm) + (2 * 6 * c * c if not cfg.disable_aln else 0) / seq
    attn = 2 * 2 * seq * seq * c  # QK^T and AV, full L x L
    head_rows = 1 + mid + n_keep
    w, d = cfg.diff_width, cfg.diff_depth
    diff_row = 2 * (cfg.z_channels * w + 256 * w + w * w + c * w + d * (w * w * 2 + 3 * w * w) + 2 * w * w + 2 * w * cfg.z_channels)
    fwd = (
        batch * cfg.depth * (seq * per_tok_block + attn)
        + batch * head_rows * 2 * c * v  # head
        + batch * (mid + n_keep) * 2 * cfg.z_channels * c  # word_embed of the inputs
        + batch * n_keep * 2 * cfg.z_channels * c  # word_embed(E[idx]) of the diffusion condition
        + batch * n_keep * batch_mul * diff_row  # diffusion head on the tiled rows
    )
    return 3.0 * fwd


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
    ap.add_argument("--peak-tflops", type=float, default=0.0)
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
    peak = args.peak_tflops * 1e12
    peak_src = "--peak-tflops"
    if not peak:
        for name, tf in KNOWN_PEAKS.items():
            if name in kind:
                peak, peak_src = tf * 1e12 * len(jax.devices()), f"{name} dense bf16 x{len(jax.devices())}"
                break
    if not peak:
        peak = matmul_peak() * len(jax.devices())
        peak_src = "measured fp32 2048^3 matmul"
    flops = model_flops(comp.tcfg, args.batch, n_keep, comp.ocfg.diffusion_batch_mul)
    tokens = comp.tokens_per_step(n_keep)
    res = {
        "preset": args.preset, "device": f"{kind} x{len(jax.devices())}", "platform": platform.processor() or platform.machine(),
        "jax": jax.__version__, "batch": args.batch, "remat": comp.model.remat, "n_keep": n_keep, "codes": bool(args.codes),
        "compute_dtype": c.compute_dtype, "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 2),
        "step_ms_repeats": [round(x * 1e3, 2) for x in per_step], "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / step_s, 1), "images_per_s": round(args.batch / step_s, 2),
        "model_tflop_per_step": round(flops / 1e12, 4), "xla_tflop_per_step": round(xla_flops / 1e12, 4),
        "peak_tflops": round(peak / 1e12, 3), "peak_source": peak_src,
        "mfu": round(flops / step_s / peak, 4), "xla_flops_utilization": round(xla_flops / step_s / peak, 4),
        "loss": float(m["loss"]),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem is not None else None,
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
