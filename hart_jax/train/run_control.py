"""The run loop shared by transformer and tokenizer training, and what controls a run:

* ``run_loop``: dispatch step t+1 before reading step t's metrics (one step late), so the
  host never waits for the device between steps; metrics are read at once on logging,
  checkpoint and stopping steps. The finite guard stays in the jitted step (a non-finite
  step returns its input state); the loop raises ``TrainingDiverged`` when it reads such a
  step's metrics, before any later checkpoint is written (a checkpoint step reads its
  metrics before saving).
* ``Preemption``: SIGTERM (what schedulers send) sets a flag; at the next step boundary the
  loop saves a checkpoint, waits for it, prints one line and returns (``train.py`` exits 0).
  With several processes JAX's own preemption sync point (``jax.distributed``'s SIGTERM
  handler, read through orbax) decides, so every process stops at the same step.
* ``CleanFailedStart``: a run that fails before its first step leaves nothing on disk
  (only what it created is removed).

Test-only config keys: ``train.sigterm_at_step`` / ``train.sigkill_at_step`` send this
process SIGTERM / SIGKILL after that step (pending saves finished for SIGKILL).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hart_jax.errors import HartError
from hart_jax.train import checkpointing
from hart_jax.train.distributed import example_ids_path
from hart_jax.train.metrics import EventWriter, Progress
from hart_jax.train.sharding import tree_shardings


class TrainingDiverged(HartError):
    """The loss (or gradient norm) became NaN or infinite."""


class CleanFailedStart:
    """``with CleanFailedStart(workdir) as guard:`` creates ``workdir``; if the body raises
    before ``guard.started`` is set (the first step's metrics were read), it removes what it
    created: ``workdir`` itself if it was new, else only the entries that were not there."""

    def __init__(self, workdir: str | os.PathLike, primary: bool = True) -> None:
        self.workdir = Path(workdir).absolute()
        self.primary = primary
        self.existed = self.workdir.exists()
        self.before = set(os.listdir(self.workdir)) if self.existed else set()
        self.started = False

    def __enter__(self) -> "CleanFailedStart":
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self.started or not self.primary:
            return False
        if not self.existed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir.is_dir():
            for name in set(os.listdir(self.workdir)) - self.before:
                p = self.workdir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        return False


class Preemption:
    """SIGTERM -> stop at the next step boundary (see the module docstring)."""

    def __init__(self, mngr: Any) -> None:
        self.mngr = mngr
        self.requested = False
        self.multi = jax.process_count() > 1
        self._old: Any = None
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``."""
        if self.multi:
            return bool(self.mngr.reached_preemption(step))
        return self.requested

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


@dataclasses.dataclass
class LoopTask:
    """What differs between the transformer's and the tokenizer's loop.

    ``step(state, local_batch, step_index) -> (state, device_metrics, host_extras)``
    dispatches one jitted step; ``derive(metrics, step_time)`` adds the logged rates;
    ``bar_keys`` are shown on the progress bar; ``nonfinite_keys`` name the values printed
    when a step is not finite."""

    step: Callable[[Any, Mapping[str, np.ndarray], int], tuple[Any, Mapping[str, Any], dict[str, float]]]
    derive: Callable[[dict[str, float], float], dict[str, float]]
    bar_keys: tuple[str, ...]
    nonfinite_keys: tuple[str, ...] = ("loss", "grad_norm")


def resume_or_create(
    mngr: Any, comp: Any, data_iter: Any, workdir: Path, primary: bool, create: Callable[[], tuple[Any, Any]]
) -> tuple[int | None, Any, Any]:
    """``(step, state, shardings)``: the newest checkpoint that restores (shardings from the
    abstract state alone, so a resumed run compiles no initialisation; says so in one line), or
    ``create()``'s fresh ``(state, shardings)`` with ``step`` None."""
    abstract = comp.abstract_state()
    shardings = tree_shardings(abstract, comp.mesh, comp.rules)
    step0, state = checkpointing.restore_newest_good(mngr, abstract, shardings, data_iter)
    if step0 is None:
        state, shardings = create()
    elif primary:
        print(f"resumed from {workdir}/checkpoints/{step0}", flush=True)
    return step0, state, shardings


def hook_step(config: Any, name: str) -> int:
    """``config.train.<name>`` (a test-only step number), -1 when absent."""
    return int(config.train.get(name, -1))


def run_loop(
    config: Any,
    workdir: Path,
    mngr: Any,
    data_iter: Any,
    state: Any,
    task: LoopTask,
    meta: Mapping[str, Any],
    guard: CleanFailedStart,
) -> dict[str, Any]:
    """Steps ``state.step .. train.num_steps`` with logging, checkpoints, the finite guard and
    preemption (module docstring); closes ``mngr``; returns the last step's metrics
    (with ``preempted=True`` when SIGTERM stopped it)."""
    c = config
    primary = jax.process_index() == 0
    start = int(jax.device_get(state.step))
    num_steps = int(c.train.num_steps)
    log_every = max(int(c.log.every_steps), 1)
    sigterm_at, sigkill_at = hook_step(c, "sigterm_at_step"), hook_step(c, "sigkill_at_step")
    if primary:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    writer = EventWriter(workdir / "tensorboard") if (primary and c.log.tensorboard) else None
    bar = Progress(num_steps, start, bool(c.log.progress) and primary)
    ids_log = open(example_ids_path(workdir), "a") if c.log.example_ids else None
    preempt = Preemption(mngr)
    last: dict[str, Any] = {}
    t_prev = time.perf_counter()

    def read(pending: tuple[int, Any, dict[str, float], Any]) -> None:
        """Fetch one step's metrics (waits for that step), check them, log them."""
        nonlocal t_prev, last
        s, metrics, extra, ids = pending
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        if not m["finite"]:
            mngr.wait_until_finished()
            good = mngr.latest_step()
            values = " ".join(f"{k}={m[k]}" for k in task.nonfinite_keys if k in m)
            raise TrainingDiverged(
                f"step {s}: {values} is not finite; stopped without saving. The last good checkpoint is "
                + (f"{workdir}/checkpoints/{good}" if good is not None else "none (no checkpoint yet)")
            )
        m.update(extra)
        m = task.derive(m, dt)
        last = dict(m, step=s)
        guard.started = True
        if ids_log is not None:
            ids_log.write(json.dumps({"step": s, "ids": ids}) + "\n")
            ids_log.flush()
        if writer is not None and (s % log_every == 0 or s == num_steps):
            writer.scalars(s, {f"train/{k}": v for k, v in m.items()})
            writer.flush()
        bar.update(1, **{k: m[k] for k in task.bar_keys if k in m})

    pending = None
    try:
        for step in range(start, num_steps):
            s = step + 1
            local = next(data_iter)
            state, metrics, extra = task.step(state, local, step)
            ids = [int(i) for i in np.asarray(local["id"])] if ids_log is not None else None
            if pending is not None:
                read(pending)  # step s-1's metrics, while step s runs
            pending = (s, metrics, extra, ids)
            if sigterm_at == s:
                signal.raise_signal(signal.SIGTERM)
            stop = preempt.reached(s)
            save_now = stop or s == num_steps or mngr.should_save(s)
            if save_now or s % log_every == 0 or sigkill_at == s:
                read(pending)
                pending = None
            if save_now:
                checkpointing.save(mngr, s, state, data_iter, meta, force=True)
            if sigkill_at == s:
                mngr.wait_until_finished()
                if ids_log is not None:
                    ids_log.close()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                mngr.wait_until_finished()
                if primary:
                    print(
                        f"preempted (SIGTERM): saved {workdir}/checkpoints/{s} and stopped; start again with the "
                        "same workdir to resume",
                        flush=True,
                    )
                last = dict(last, preempted=True)
                break
        if pending is not None:
            read(pending)
    finally:
        preempt.close()
        mngr.wait_until_finished()
        mngr.close()
        bar.close()
        if writer is not None:
            writer.close()
        if ids_log is not None and not ids_log.closed:
            ids_log.close()
    return last
