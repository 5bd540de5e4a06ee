"""Memory of a training configuration, per device: the state's bytes under the mesh (shapes
only) and the compiled step's ``memory_analysis()`` (lowered on abstract state, nothing run).

    python -m hart_jax.train.memory --config configs/train.py:hart_0p7b_1024 --batch 16 --remat full \
        [--devices 8 --mesh 1,8,1] [--gpu-gib 141] [--n-keep N] [--attention pallas|xla] [--images]

The step is compiled for JAX's default backend: on the host CPU ``--devices N`` fakes N CPU
devices (the mesh's FSDP/tensor split then holds for them as for N GPUs). Attention is the
fused Pallas kernel by default (on CPU run by the interpreter; the GPU training path, whose
memory grows with the sequence, not its square); ``--attention xla`` compiles the dense path instead. Tokens: the preset's
largest kept last-scale count under token dropping (``--n-keep`` overrides); the batch holds
precomputed tokenizer codes unless ``--images`` (then the frozen tokenizer encodes images in
the step). ``peak`` = arguments + outputs - aliased (donated) + temporaries, compared with
``--gpu-gib``. CPU and GPU compilers schedule differently, so this is an estimate of the
GPU's need, not a measurement of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from hart_jax.errors import HartError, OneLineArgumentParser

GIB = 1024**3


def load_config(spec: str) -> Any:
    """``path/to/config.py[:preset]`` -> ``get_config(preset)`` of that file."""
    path, _, preset = spec.partition(":")
    if not Path(path).is_file():
        raise HartError(f"--config {spec}: {path} is not a file")
    mod_spec = importlib.util.spec_from_file_location(f"_hart_cfg_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    try:
        return mod.get_config(preset) if preset else mod.get_config()
    except ValueError as e:
        raise HartError(f"--config {spec}: {e}") from None


def memory_report(config: Any, devices: Any = None) -> dict[str, Any]:
    """Per-device bytes of params + optimizer state + EMA under the config's mesh and rules
    (shapes only: nothing is allocated or compiled)."""
    import jax
    import numpy as np

    from hart_jax.models.transformer import HARTTransformer
    from hart_jax.train.loop import _model_config
    from hart_jax.train.sharding import make_mesh, per_device_bytes, total_bytes, tree_shardings
    from hart_jax.train.state import abstract_state, make_optimizer, make_schedule

    tcfg = _model_config(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = [tuple(r) if not isinstance(r[1], (list, tuple)) else (r[0], tuple(r[1])) for r in config.mesh.rules]
    tx = make_optimizer(config.optim, make_schedule(config.optim, int(config.train.num_steps)))
    st = abstract_state(HARTTransformer(tcfg), tx)
    sh = tree_shardings(st, mesh, rules)
    out: dict[str, Any] = {
        "mesh": dict(mesh.shape),
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(st.params))),
    }
    for name in ("params", "opt_state", "ema_params"):
        out[f"{name}_total_bytes"] = total_bytes(getattr(st, name))
        out[f"{name}_per_device_bytes"] = per_device_bytes(getattr(st, name), getattr(sh, name))
    out["total_bytes"] = total_bytes(st)
    out["per_device_bytes"] = per_device_bytes(st, sh)
    return out


def max_keep(config: Any, n_last: int) -> int:
    """The largest kept last-scale count the config's token dropping draws (all when off)."""
    from hart_jax.train.objective import MIN_KEEP

    o = config.objective
    if not bool(o.token_drop):
        return n_last
    k = n_last - max(min(math.ceil(n_last * 0.5), n_last - MIN_KEEP), 0)  # drop ratio 0.5 drops the fewest
    q = max(int(o.keep_quantum), 1)
    return int(min(n_last, -(-k // q) * q))


def step_memory(
    config: Any, *, n_keep: int | None = None, devices: Any = None, unrolled: bool = False
) -> dict[str, Any]:
    """Compile the config's training step on abstract state and batch; return the per-device
    bytes of ``memory_analysis()`` plus the state's and the compile seconds (see the module
    docstring). ``unrolled``: the blocks as a Python loop (the reference form, no remat)."""
    import dataclasses
    import time

    import jax
    import numpy as np

    from hart_jax.train.loop import build
    from hart_jax.train.sharding import per_device_bytes, tree_shardings

    comp = build(config, devices)
    if unrolled:
        comp = dataclasses.replace(comp, model=comp.model.clone(unroll_blocks=True, remat="none"))
    n_keep = int(n_keep or max_keep(config, comp.n_last))
    abstract = comp.abstract_state()
    shardings = tree_shardings(abstract, comp.mesh, comp.rules)
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
             for (k, v), sh in ((kv, _batch_sharding(comp)) for kv in _batch_shapes(comp).items())}
    step = comp.make_step(shardings)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, comp.frozen_params, n_keep).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    out = {
        "remat": comp.model.remat, "unrolled": bool(unrolled), "compile_s": round(compile_s, 1), "batch": int(config.train.batch_size), "n_keep": n_keep,
        "attention_impl": comp.tcfg.attention_impl, "compute_dtype": str(config.compute_dtype),
        "codes": bool(config.data.codes), "mesh": dict(comp.mesh.shape), "devices": int(comp.mesh.size),
        "state_bytes": per_device_bytes(abstract, shardings),
        "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract.params)))
    return out


def _batch_shapes(comp: Any) -> dict[str, Any]:
    import jax
    import numpy as np

    cfg, b = comp.tcfg, int(comp.config.train.batch_size)
    s = lambda shape, dt: jax.ShapeDtypeStruct(shape, np.dtype(dt))  # noqa: E731
    out = {}
    if comp.config.data.codes:
        out["codes"] = s((b, sum(p * p for p in cfg.patch_nums)), np.int32)
        out["last_layer_gt"] = s((b, cfg.patch_nums[-1] ** 2, cfg.z_channels), np.float32)
    else:
        out["image"] = s((b, comp.resolution, comp.resolution, 3), np.uint8)
    if cfg.is_c2i:
        out["label"] = s((b,), np.int32)
    else:
        t = cfg.context_token
        out.update(context=s((b, t, cfg.context_dim), np.float32), context_mask=s((b, t), bool),
                   context_position_ids=s((b, t), np.int32))
    return {k: out[k] for k in comp.batch_keys()}


def _batch_sharding(comp: Any) -> Any:
    from hart_jax.train.sharding import batch_sharding

    return batch_sharding(comp.mesh, comp.rules)


def format_report(r: dict[str, Any], gpu_gib: float) -> str:
    """Human-readable lines of a ``step_memory`` result."""
    g = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"  # noqa: E731
    fits = r["peak_bytes"] <= gpu_gib * GIB
    return "\n".join([
        f"remat={r['remat']}{' (blocks unrolled)' if r.get('unrolled') else ''} batch={r['batch']} n_keep={r['n_keep']} mesh={r['mesh']} "
        f"attention={r['attention_impl']} dtype={r['compute_dtype']} codes={r['codes']} params={r['num_params']:,}",
        f"per device: temporaries {g(r['temp_bytes'])}, arguments {g(r['argument_bytes'])}, "
        f"outputs {g(r['output_bytes'])} (aliased {g(r['alias_bytes'])}), state {g(r['state_bytes'])}",
        f"peak {g(r['peak_bytes'])} {'fits' if fits else 'does NOT fit'} in {gpu_gib:g} GiB "
        f"(compiled in {r.get('compile_s', 0):.0f} s)",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m hart_jax.train.memory", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file[:preset], e.g. configs/train.py:hart_0p7b_1024")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--remat", choices=["none", "dots", "full"], default=None, help="default: the config's train.remat")
    p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices (default: the host's)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes (default: the config's)")
    p.add_argument("--n-keep", type=int, default=0, help="kept last-scale tokens (default: the largest drawn)")
    p.add_argument("--attention", choices=["pallas", "xla"], default="pallas")
    p.add_argument("--images", action="store_true", help="images through the frozen tokenizer in the step")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to compare the peak with")
    p.add_argument("--unrolled", action="store_true", help="the blocks as a Python loop (reference; no remat)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = build_parser().parse_args(argv)
    import jax

    if args.devices:
        try:
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError as e:
            print(f"error: --devices {args.devices}: {e}", file=sys.stderr)
            return 2
    try:
        c = load_config(args.config)
        if c.get("task", "transformer") != "transformer":
            raise HartError(f"--config {args.config}: a {c.task} config; the report covers transformer training")
        if args.batch:
            c.train.batch_size = args.batch
        if args.remat:
            c.train.remat = args.remat
        if args.mesh:
            try:
                c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in args.mesh.split(","))
            except ValueError:
                raise HartError(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor") from None
        c.data.codes = not args.images
        c.model.attention_impl = args.attention
        if args.attention == "pallas" and jax.default_backend() == "cpu":
            from hart_jax.attention import set_pallas_interpret

            set_pallas_interpret(True)
        try:
            r = step_memory(c, n_keep=args.n_keep or None, unrolled=args.unrolled)
        except ValueError as e:
            raise HartError(str(e)) from None
    except HartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r["gpu_gib"], r["fits"] = args.gpu_gib, r["peak_bytes"] <= args.gpu_gib * GIB
    print(json.dumps(r, indent=2) if args.json else format_report(r, args.gpu_gib), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
