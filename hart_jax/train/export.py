"""Export a training run's weights as a converted directory (what ``python -m hart_jax.convert`` writes).

    python -m hart_jax.train.export tokenizer WORKDIR OUT_DIR [--raw] [--force] [--keep-discriminator] [--step N]
    python -m hart_jax.train.export transformer WORKDIR OUT_DIR [--raw] [--force] [--step N]

The EMA params of the latest checkpoint by default (``--raw``: the optimizer's params).
A tokenizer export loads with ``HybridTokenizer.from_converted`` (and, with
``--keep-discriminator``, ``hart_jax.loading.load_discriminator``); a
transformer export with ``load_converted(dir, kind="transformer")`` and, inside a
pipeline directory, ``HARTPipeline.from_converted``. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from hart_jax.errors import CheckpointError, HartError


def restore_run(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, state dict as host arrays, meta)`` of a training run's checkpoint (latest by default)."""
    import orbax.checkpoint as ocp

    d = Path(workdir).absolute() / "checkpoints"
    if not d.is_dir():
        raise CheckpointError(f"{workdir}: no checkpoints/ directory (not a training workdir?)")
    mngr = ocp.CheckpointManager(
        d, item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    )
    step = mngr.latest_step() if step is None else int(step)
    if step is None:
        raise CheckpointError(f"{d}: no complete checkpoint")
    if step not in mngr.all_steps():
        raise CheckpointError(f"{d}: no checkpoint at step {step} (have {sorted(mngr.all_steps())})")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"{d}/{step}: cannot restore: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    state = jax.tree_util.tree_map(np.asarray, dict(out["state"]))
    return step, state, dict(out["meta"] or {})


def _task(meta: dict[str, Any]) -> str:
    return str(meta.get("task") or meta.get("config", {}).get("task") or "transformer")


def _check_finite(tree: Any, what: str) -> None:
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)):
        raise CheckpointError(f"{what}: holds non-finite values; refusing to export")


def export_tokenizer(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ema: bool = True,
    force: bool = False,
    keep_discriminator: bool = False,
    step: int | None = None,
) -> Path:
    """Write a tokenizer run's (EMA) params as a converted tokenizer directory."""
    from hart_jax.checkpoint import save_converted
    from hart_jax.loading import discriminator_extras
    from hart_jax.models.autoencoder import TokenizerConfig
    from hart_jax.models.discriminator import DiscriminatorConfig

    if Path(out_dir).exists() and not force:
        raise CheckpointError(f"{Path(out_dir).absolute()}: already exists; pass --force to replace it")
    step, state, meta = restore_run(workdir, step)
    if _task(meta) != "tokenizer":
        raise CheckpointError(f"{workdir}: a {_task(meta)} run, not a tokenizer run (use 'export {_task(meta)}')")
    cfg_d = meta["config"]
    tk = dict(cfg_d["tokenizer"])
    for k in ("ch_mult", "v_patch_nums"):
        tk[k] = tuple(int(x) for x in tk[k])
    tok_cfg = TokenizerConfig(**tk)
    params = state["ema_params" if ema else "params"]
    _check_finite(params, f"{workdir} step {step}")
    extras: dict[str, Any] = {}
    if keep_discriminator:
        dsec = cfg_d["discriminator"]
        dcfg = DiscriminatorConfig(
            ndf=int(dsec["ndf"]), n_layers=int(dsec["n_layers"]), norm=str(dsec["norm"]), in_channels=tok_cfg.in_channels
        )
        extras = discriminator_extras(dcfg, {"params": state["disc_params"], "batch_stats": state["disc_batch_stats"]})
    source = f"{Path(workdir).absolute()} step {step} ({'ema' if ema else 'raw'} params)"
    return save_converted(out_dir, {"params": params}, tok_cfg.to_hf_dict(), kind="tokenizer", source=source,
                          force=force, **extras)


def export_transformer(
    workdir: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = True, force: bool = False,
    step: int | None = None,
) -> Path:
    """Write a transformer run's (EMA) params as a converted transformer directory
    (``config.json`` = ``T2IConfig.to_hf_dict()``, as ``python -m hart_jax.convert llm``)."""
    from hart_jax.checkpoint import save_converted
    from hart_jax.models.transformer import T2IConfig, abstract_params, stack_blocks
    from hart_jax.train.state import check_params_like

    if Path(out_dir).exists() and not force:
        raise CheckpointError(f"{Path(out_dir).absolute()}: already exists; pass --force to replace it")
    step, state, meta = restore_run(workdir, step)
    if _task(meta) != "transformer":
        raise CheckpointError(f"{workdir}: a {_task(meta)} run, not a transformer run (use 'export {_task(meta)}')")
    md = dict(meta["config"]["model"])
    md["patch_nums"] = tuple(int(p) for p in md["patch_nums"])
    try:
        tcfg = T2IConfig(**md)
        params = stack_blocks(state["ema_params" if ema else "params"], tcfg.depth)  # runs saved per-block too
        check_params_like(params, abstract_params(tcfg))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{workdir} step {step}: {e}") from None
    _check_finite(params, f"{workdir} step {step}")
    source = f"{Path(workdir).absolute()} step {step} ({'ema' if ema else 'raw'} params)"
    return save_converted(out_dir, {"params": params}, tcfg.to_hf_dict(), kind="transformer", source=source, force=force)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m hart_jax.train.export``."""
    p = argparse.ArgumentParser(
        prog="python -m hart_jax.train.export",
        description="Export a training run (EMA params by default) as a converted hart-jax directory.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("tokenizer", "transformer"):
        s = sub.add_parser(name, help=f"a {name} training run -> a converted {name} directory")
        s.add_argument("workdir", help="the run's --workdir")
        s.add_argument("out", help="output directory to create")
        s.add_argument("--raw", action="store_true", help="export the optimizer's params instead of the EMA")
        s.add_argument("--force", action="store_true", help="replace an existing output directory")
        s.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
        if name == "tokenizer":
            s.add_argument("--keep-discriminator", action="store_true", help="also store the PatchGAN discriminator")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tokenizer":
            out = export_tokenizer(args.workdir, args.out, ema=not args.raw, force=args.force,
                                   keep_discriminator=args.keep_discriminator, step=args.step)
        else:
            out = export_transformer(args.workdir, args.out, ema=not args.raw, force=args.force, step=args.step)
    except HartError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
