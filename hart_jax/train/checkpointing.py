"""Orbax ``CheckpointManager`` for training: state (params, optimizer, EMA, step, RNG),
the grain iterator state, and a JSON record of the config.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``. Saving is asynchronous for the
arrays (``async_save``); a step is only visible to ``latest_step`` once finalised, so a
process killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import grain.python as grain
import jax
import orbax.checkpoint as ocp

from hart_jax.errors import CheckpointError


def make_manager(workdir: str | os.PathLike, *, every_steps: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's manager (creates ``WORKDIR/checkpoints``)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every_steps), 1),
        max_to_keep=max(int(keep), 1),
        enable_async_checkpointing=bool(async_save),
        create=True,
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.PyGrainCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def save(
    mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any], *, force: bool = False
) -> bool:
    """Save at ``step`` if the interval (or ``force``) says so; returns whether it saved."""
    return mngr.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.PyGrainCheckpointSave(data_iter),
            meta=ocp.args.JsonSave(dict(meta)),
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any, data_iter: Any) -> Any:
    """Restore the state (placed in ``shardings``) and, in place, the data iterator."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    try:
        out = mngr.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.PyGrainCheckpointRestore(data_iter),
            ),
        )
    except Exception as e:  # orbax raises several types for incompatible trees / missing files
        raise CheckpointError(f"{mngr.directory}/{step}: cannot restore the training state: {e}") from None
    return out["state"]


def load_ema_params(workdir: str | os.PathLike, step: int | None = None, *, ema: bool = True) -> tuple[int, Any]:
    """``(step, params)`` of a training run for sampling: the EMA params by default,
    the raw params with ``ema=False`` (host arrays, no optimizer state read); transformer
    blocks saved per block (``blocks_<i>``) come back stacked."""
    d = Path(workdir).absolute() / "checkpoints"
    if not d.is_dir():
        raise CheckpointError(f"{workdir}: no checkpoints/ directory (not a training workdir?)")
    mngr = ocp.CheckpointManager(d, item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{d}: no complete checkpoint")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    from hart_jax.models.transformer import stack_blocks  # runs saved with per-block params load stacked

    return step, stack_blocks(restored["ema_params" if ema else "params"])
