"""Sampling latency / throughput of the whole compiled program (text encoder -> image).

    python bench/sample_bench.py --preset tiny --json out.json            # CPU, minutes
    python bench/sample_bench.py --preset full --resolutions 256 512 1024  # GPU, 0.7B + Qwen2-1.5B

Random weights (speed does not depend on their values). One program per (resolution,
batch): compile time is measured apart (lower + compile), then ``--repeats`` timed
calls after one warm-up; the median is reported. Latency = batch 1, throughput =
images/s at batch 8 by default. Peak memory from the compiled program's memory
analysis (and the device's ``peak_bytes_in_use`` where the backend reports it).

Resolutions use the scale lists: 256 -> VAR's (1..16), 512 -> VAR's 512 list (1..32),
1024 -> HART's 14 scales (1..64); the tiny preset uses the golden fixture's shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.tokenizer import get_config as tok_preset  # noqa: E402
from configs.transformer import get_config as t2i_preset  # noqa: E402
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig  # noqa: E402
from hart_jax.models.text_encoder import Qwen2Config, Qwen2Model  # noqa: E402
from hart_jax.models.transformer import HARTTransformer, T2IConfig, init_inputs  # noqa: E402
from hart_jax.attention import resolve_impl  # noqa: E402
from hart_jax.pipeline import HARTPipeline, seed_keys  # noqa: E402
from hart_jax.sampling import SamplingConfig  # noqa: E402

PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclasses.dataclass
class TextParts:
    """What the pipeline needs of a text encoder (no tokenizer: inputs are random ids)."""

    model: Qwen2Model
    params: dict
    config: Qwen2Config
    max_length: int


def build(
    preset: str, resolution: int, dtype, abstract: bool = False, attention_impl: str = "auto"
) -> HARTPipeline:
    """A pipeline with random weights for ``preset`` at ``resolution`` (shapes only if
    ``abstract``: enough to lower and compile without allocating the weights), its
    transformer using ``attention_impl``."""
    if preset == "tiny":
        tok_cfg = TokenizerConfig(**tok_preset("tiny"))
        t2i_cfg = T2IConfig(**t2i_preset("tiny"), attention_impl=attention_impl)
        q_cfg = Qwen2Config(vocab_size=400, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        tok_cfg = TokenizerConfig(**{**tok_preset("hart_0p7b_1024"), "v_patch_nums": PATCH_NUMS[resolution]})
        t2i_cfg = T2IConfig(**{**t2i_preset("hart_0p7b_1024"), "patch_nums": PATCH_NUMS[resolution]},
                            attention_impl=attention_impl)
        q_cfg = Qwen2Config()  # Qwen2-1.5B shapes
    key = jax.random.PRNGKey(0)
    side = tok_cfg.v_patch_nums[-1] * tok_cfg.downsample
    run = jax.eval_shape if abstract else (lambda f, *a: jax.jit(f)(*a))
    tok_vars = run(HARTAutoEncoder(tok_cfg).init, key, jnp.zeros((1, side, side, 3)))
    t2i_vars = run(HARTTransformer(t2i_cfg).init, key, *init_inputs(t2i_cfg))
    qm = Qwen2Model(q_cfg, dtype=dtype)
    q_params = run(qm.init, key, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool))["params"]
    if dtype != jnp.float32:  # store the big weights in the compute dtype, as inference does
        def cast(tree):
            def one(x):
                if x.dtype != jnp.float32:
                    return x
                return jax.ShapeDtypeStruct(x.shape, dtype) if abstract else x.astype(dtype)

            return jax.tree_util.tree_map(one, tree)

        t2i_vars, q_params = cast(t2i_vars), cast(q_params)
    text = TextParts(qm, q_params, q_cfg, t2i_cfg.context_token)
    # no persistent compilation cache: compile_s measures XLA compiling, not a cache read
    return HARTPipeline(tok_cfg, tok_vars, t2i_cfg, t2i_vars, text, dtype=dtype, compile_cache=False)


def inputs(pipe: HARTPipeline, batch: int, prefix_len: int = 64):
    """Random token ids / masks shaped like HART's prompt encoding."""
    t = pipe.t2i_cfg.context_token
    rng = np.random.default_rng(0)
    ids = rng.integers(0, pipe.text_encoder.config.vocab_size, (batch, prefix_len + t)).astype(np.int32)
    n_valid = rng.integers(4, t + 1, batch)
    mask = np.arange(t)[None] < n_valid[:, None]
    attn = np.concatenate([np.ones((batch, prefix_len), bool), mask], 1)
    pos = (np.cumsum(mask, 1) - 1).astype(np.int32)
    keys = seed_keys(range(batch))
    return ids, attn, mask, pos, keys


def measure(pipe: HARTPipeline, batch: int, repeats: int, compile_only: bool) -> dict:
    """Compile time, median latency over ``repeats`` and memory of one program."""
    fn = pipe.program(batch, SamplingConfig())
    args = (pipe.t2i_vars, pipe.tok_vars, pipe.text_params, *inputs(pipe, batch), jnp.float32(4.5))
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {"batch": batch, "compile_s": round(compile_s, 2)}
    if mem is not None:
        out["program_bytes"] = {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
        }
    if compile_only:
        return out
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out.update(median_s=round(med, 4), images_per_s=round(batch / med, 3), repeats=repeats,
               all_s=[round(t, 4) for t in times])
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def main(argv=None) -> None:
    """Run the benchmark and print / write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--attention-impl", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                   help="the transformer's attention_impl (auto: the backend's default, logged)")
    p.add_argument("--compile-only", action="store_true", help="only lower + compile (memory and compile time)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    dtype = dtype or (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    resolutions = [24] if args.preset == "tiny" else args.resolutions
    results = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "preset": args.preset,
        "dtype": str(jnp.dtype(dtype)), "attention_impl": resolve_impl(args.attention_impl), "command": " ".join(["python", "bench/sample_bench.py", *sys.argv[1:]]),
        "runs": [],
    }
    for res in resolutions:
        pipe = build(args.preset, res, dtype, abstract=args.compile_only, attention_impl=args.attention_impl)
        for b in args.batch_sizes:
            r = {"resolution": pipe.resolution, **measure(pipe, b, args.repeats, args.compile_only)}
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
