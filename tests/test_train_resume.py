"""``train.py`` end to end in subprocesses (tiny presets, 1 CPU device each, run in parallel):

* preemption: N steps straight vs. stopped by SIGTERM (the test hook
  ``train.sigterm_at_step``) after a step between checkpoints, which saves that step and
  exits 0, and started again with the same workdir -> identical params / EMA / optimizer
  state and the same data order. The preempted run goes first (beside the diverging one),
  so the straight and resumed runs read its compiled programs from the run's cache;
* the loss falls on a small structured dataset made here (coloured shapes);
* a non-finite loss stops the run with a clear message and keeps the last good checkpoint;
* TensorBoard scalars are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import train_data

REPO = Path(__file__).resolve().parents[1]
N = 20
EVERY = 5
STOP_AT = 12  # between checkpoints (every 5): SIGTERM saves 12 and the resumed run starts there


def launch(workdir: Path, preset: str, data_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'train.py'}:{preset}",
        f"--workdir={workdir}", f"--config.data.name={name}", f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={N}", f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=5",
        "--config.log.example_ids=True", "--config.model.depth=1", "--config.optim.lr=3e-3", *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def finish(p: subprocess.Popen) -> tuple[int, str]:
    out, _ = p.communicate(timeout=600)
    return p.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_runs")
    data = root / "data"
    train_data.write(data, 48, kind="t2i", name="shapes", size=32)
    train_data.write(data, 32, kind="c2i", name="shapes_c2i", size=32)
    preempted = launch(root / "resumed", "tiny_t2i", data, "shapes", f"--config.train.sigterm_at_step={STOP_AT}")
    # lr 1e30 after a 2-step warmup: step 2's update blows the weights up, step 3's loss is inf/nan
    diverge = launch(
        root / "diverge", "tiny_c2i", data, "shapes_c2i", "--config.optim.lr=1e30", "--config.optim.warmup_steps=2",
        "--config.checkpoint.every_steps=1", "--config.train.num_steps=6",
    )
    res = {"preempted": finish(preempted)}
    straight = launch(root / "straight", "tiny_t2i", data, "shapes")
    resumed = launch(root / "resumed", "tiny_t2i", data, "shapes")
    res.update(diverge=finish(diverge), straight=finish(straight), resumed=finish(resumed))
    return root, res


def restore(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()})
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"], mngr.all_steps()


def ids_by_step(workdir: Path) -> dict[int, list[int]]:
    out = {}
    for line in (workdir / "example_ids.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["ids"]
    return out


def test_sigterm_resume_is_exact(runs):
    root, res = runs
    rc, out = res["straight"]
    assert rc == 0, out[-3000:]
    rc, out = res["preempted"]
    assert rc == 0, f"expected exit 0 after SIGTERM, got {rc}: {out[-2000:]}"
    line = f"preempted (SIGTERM): saved {root / 'resumed'}/checkpoints/{STOP_AT} and stopped"
    assert line in out and "done at step" not in out, out[-2000:]
    rc, out = res["resumed"]
    assert rc == 0, out[-3000:]
    assert f"resumed from {root / 'resumed'}/checkpoints/{STOP_AT}" in out, out[-2000:]
    a, steps_a = restore(root / "straight", N)
    b, steps_b = restore(root / "resumed", N)
    assert N in steps_a and N in steps_b
    assert int(a["step"]) == int(b["step"]) == N
    for name in ("params", "ema_params", "opt_state"):
        la, lb = jax.tree_util.tree_leaves(a[name]), jax.tree_util.tree_leaves(b[name])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    # what sampling loads by default: the EMA params of the latest checkpoint
    from hart_jax.train.checkpointing import load_ema_params

    step, ema = load_ema_params(root / "resumed")
    assert step == N
    for x, y in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(b["ema_params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ids_a, ids_b = ids_by_step(root / "straight"), ids_by_step(root / "resumed")
    assert sorted(ids_a) == sorted(ids_b) == list(range(1, N + 1))
    assert ids_a == ids_b
    # the preempted run stopped at STOP_AT and the resumed one redid no step
    lines = (root / "resumed" / "example_ids.jsonl").read_text().splitlines()
    assert len(lines) == N


def test_loss_falls_and_tensorboard(runs):
    from hart_jax.train.metrics import read_scalars

    root, res = runs
    assert res["straight"][0] == 0
    files = sorted((root / "straight" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    rows = read_scalars(files[0])
    series: dict[str, dict[int, float]] = {}
    for step, tag, v in rows:
        series.setdefault(tag, {})[step] = v
    for tag in ("train/loss", "train/ce", "train/diff", "train/grad_norm", "train/param_norm", "train/update_norm",
                "train/lr", "train/step_time", "train/tokens_per_s"):
        assert sorted(series[tag]) == list(range(1, N + 1)), tag
    ce = [series["train/ce"][s] for s in range(1, N + 1)]
    loss = [series["train/loss"][s] for s in range(1, N + 1)]
    assert np.mean(ce[:3]) == pytest.approx(np.log(640), abs=0.1)
    assert np.mean(ce[-5:]) < np.mean(ce[:3]) - 1.0, ce
    assert np.mean(loss[-5:]) < np.mean(loss[:3]) - 1.0, loss


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(runs):
    root, res = runs
    rc, out = res["diverge"]
    assert rc not in (0, -9), out[-2000:]
    assert "TrainingDiverged" in out and "is not finite" in out, out[-2000:]
    assert "step 3:" in out and "last good checkpoint is" in out and "checkpoints/2" in out, out[-2000:]
    state, steps = restore(root / "diverge", 2)
    assert max(steps) == 2
    assert int(state["step"]) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state["params"]))
