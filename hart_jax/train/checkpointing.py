"""Orbax ``CheckpointManager`` for training: state (params, optimizer, EMA, step, RNG),
the grain iterator state, and a JSON record of the config.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,meta}``. Saving is asynchronous for the
arrays (``async_save``); a step is only visible to ``latest_step`` once finalised, so a
process killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os
import re
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


def _target(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def _path_names(path: tuple) -> str:
    """A key path as ``a/b/0/c`` (dataclass fields, dict keys and sequence indices alike)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return "/".join(out)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_names(p): tuple(int(d) for d in getattr(v, "shape", ())) for p, v in leaves}


def check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raise a one-line ``CheckpointError`` naming the first parameter path whose shape differs
    between the checkpoint's metadata and the configured state (or that only one of them has).
    Unreadable metadata is left to ``restore`` (a damaged checkpoint)."""
    try:
        saved = _shapes(mngr.item_metadata(int(step))["state"])
    except Exception:
        return
    if not saved:
        return
    want = _shapes(abstract_state)
    where = f"{mngr.directory}/{step}"
    for path, shape in want.items():
        if path not in saved:
            raise CheckpointError(
                f"{where}: the configured model/optimizer has {path} {shape} but the checkpoint does not: "
                "the model or optimizer config changed since it was saved (restore the config, or use a new workdir)"
            )
        if saved[path] != shape:
            raise CheckpointError(
                f"{where}: {path} has shape {saved[path]} in the checkpoint but {shape} in the config: "
                "the model or optimizer config changed since it was saved (restore the config, or use a new workdir)"
            )
    extra = [p for p in saved if p not in want]
    if extra:
        raise CheckpointError(
            f"{where}: the checkpoint has {extra[0]} {saved[extra[0]]} that the configured model/optimizer lacks: "
            "the model or optimizer config changed since it was saved (restore the config, or use a new workdir)"
        )


_TS_PATH = re.compile(r"'path': '([^'/][^']*?)/?'")


def _try_restore(mngr: ocp.CheckpointManager, step: int, target: Any, data_iter: Any) -> tuple[str | None, Any]:
    """``(None, state)`` when every item of ``step`` restores (``data_iter`` in place), else
    ``(problem, None)`` with e.g. ``item 'data' missing`` or
    ``state: array params.blocks_0.attn.qkv.kernel unreadable``."""
    d = Path(mngr.directory) / str(step)
    for item in ("state", "data"):
        if not (d / item).is_dir():
            return f"item {item!r} missing", None
    try:
        state = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # tensorstore / orbax raise several types for missing or truncated files
        arrays = [p for p in _TS_PATH.findall(str(e)) if not p.startswith("/")]
        if arrays:
            return f"state: array {arrays[-1]} unreadable", None
        return f"state: {_first_line(e)}", None
    try:
        mngr.restore(int(step), args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(data_iter)))
    except Exception as e:
        return f"data: {_first_line(e)}", None
    return None, state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("'\"") or type(e).__name__
    return text.splitlines()[0][:200]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any, data_iter: Any) -> Any:
    """Restore the state (placed in ``shardings``) and, in place, the data iterator; a one-line
    ``CheckpointError`` on a changed shape or a damaged checkpoint."""
    check_shapes(mngr, step, abstract_state)
    problem, state = _try_restore(mngr, step, _target(abstract_state, shardings), data_iter)
    if problem is not None:
        raise CheckpointError(f"{mngr.directory}/{step}: cannot restore the training state ({problem})")
    return state


def restore_newest_good(
    mngr: ocp.CheckpointManager, abstract_state: Any, shardings: Any, data_iter: Any, log: Any = print
) -> tuple[int | None, Any]:
    """``(step, state)`` of the newest checkpoint that restores (``(None, None)`` when there is
    none). A damaged newer one is reported in one line, moved aside to ``<step>.damaged-<k>``
    (never deleted) and the next older one tried; none restoring -> ``CheckpointError``.
    A changed model / optimizer shape is a ``CheckpointError`` (``check_shapes``), not damage."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None, None
    target = _target(abstract_state, shardings)
    primary = jax.process_index() == 0
    moved = []
    for i, step in enumerate(steps):
        check_shapes(mngr, step, abstract_state)
        problem, state = _try_restore(mngr, step, target, data_iter)
        if problem is None:
            if moved:
                mngr.reload()
            return step, state
        aside = _aside(Path(mngr.directory), step)
        if primary:
            os.rename(Path(mngr.directory) / str(step), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"hart_jax checkpoint {step} moved aside")
        moved.append(step)
        nxt = f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
        if primary:
            log(f"checkpoint step {step} is damaged ({problem}): moved to {aside}; {nxt}")
    mngr.reload()
    raise CheckpointError(
        f"{mngr.directory}: no checkpoint restores (damaged steps {', '.join(map(str, moved))} were moved aside "
        "as <step>.damaged-<k>); use a new workdir, or remove checkpoints/ to start again"
    )


def _aside(directory: Path, step: int) -> Path:
    k = 0
    while (directory / f"{step}.damaged-{k}").exists():
        k += 1
    return directory / f"{step}.damaged-{k}"


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
