"""Data movement in the compiled sampling program, stage by stage.

    python bench/hlo_stats.py --preset tiny                     # CPU, a minute
    python bench/hlo_stats.py --preset full --batch 8 --json hlo.json   # GPU (or CPU, slowly)

Compiles ``HARTPipeline.program`` (random weights as shapes only) and reads XLA's
optimized HLO (``compiled.as_text()``). Every instruction is attributed to the named
scope it came from (``stage_<s>``, ``diffusion_head``, ``decoder``, ``text_encoder``:
``jax.named_scope`` in ``hart_jax.sampling`` / ``pipeline``; anything else ``other``)
and counted by opcode. ``copy``, ``transpose`` and ``convert`` outside a fusion are whole
passes over memory (a layout change, a dtype round trip): their count and bytes per scope
are the list of what to remove; inside a fusion they cost no extra pass and are counted
apart. Loop bodies (the stacked blocks, the diffusion steps) are counted once.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hart_jax.random_init import preset_configs, random_pipeline, token_inputs  # noqa: E402
from hart_jax.sampling import SamplingConfig  # noqa: E402

MOVES = ("copy", "transpose", "convert")
SCOPES = re.compile(r"(stage_\d+|diffusion_head|decoder|text_encoder)/")
INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
SHAPE = re.compile(r"(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO result type (a tuple's elements summed)."""
    total = 0
    for dtype, dims in SHAPE.findall(type_text):
        total += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def hlo_stats(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Per scope: ``ops`` (opcode -> count outside fusions), ``fused`` (opcode -> count
    inside fusion bodies) and ``move_bytes`` (bytes written by standalone copy / transpose /
    convert)."""
    out: dict[str, dict[str, Any]] = collections.defaultdict(
        lambda: {"ops": collections.Counter(), "fused": collections.Counter(), "move_bytes": collections.Counter()}
    )
    fusion_bodies = set(re.findall(r"\bfusion\(.*?calls=(%[\w.\-]+)", hlo_text))
    fused = False
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s*\(.*\{\s*$", line)
        if header:  # a computation starts (instructions are indented, headers are not)
            fused = header.group(1) in fusion_bodies
            continue
        m = INSTR.match(line)
        if not m:
            continue
        type_text, opcode = m.groups()
        scope_m = SCOPES.search(line[line.find("op_name="):] if "op_name=" in line else "")
        scope = scope_m.group(1) if scope_m else "other"
        entry = out[scope]
        if fused:
            entry["fused"][opcode] += 1
        else:
            entry["ops"][opcode] += 1
            if opcode in MOVES:
                entry["move_bytes"][opcode] += shape_bytes(type_text)
    return {k: {kk: dict(vv) for kk, vv in v.items()} for k, v in out.items()}


def _order(scope: str) -> tuple:
    m = re.match(r"stage_(\d+)", scope)
    return (0, "") if scope == "text_encoder" else (1, int(m.group(1))) if m else (2, scope)


def main(argv: list[str] | None = None) -> dict:
    """Compile, count, print a table; write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--attention-impl", choices=["auto", "xla", "cudnn", "pallas"], default="auto")
    p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    dtype = dtype or (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    pipe = random_pipeline(*preset_configs(args.preset, args.resolution, args.attention_impl), dtype, abstract=True)
    fn = pipe.program(args.batch, SamplingConfig())
    call = (pipe.t2i_vars, pipe.tok_vars, pipe.text_params, *token_inputs(pipe, args.batch), jnp.float32(4.5))
    text = fn.lower(*call).compile().as_text()
    if args.hlo:
        Path(args.hlo).write_text(text)
    stats = hlo_stats(text)
    print(f"{'scope':<16}" + "".join(f"{m:>12}" for m in MOVES) + f"{'MiB moved':>12}" + "".join(
        f"{'fused ' + m:>16}" for m in MOVES))
    for scope in sorted(stats, key=_order):
        s = stats[scope]
        mib = sum(s["move_bytes"].values()) / 2**20
        print(f"{scope:<16}" + "".join(f"{s['ops'].get(m, 0):>12}" for m in MOVES) + f"{mib:>12.2f}"
              + "".join(f"{s['fused'].get(m, 0):>16}" for m in MOVES))
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "preset": args.preset,
              "batch": args.batch, "dtype": str(jnp.dtype(dtype)), "attention_impl": args.attention_impl,
              "scopes": stats}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
