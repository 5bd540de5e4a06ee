"""A run's robustness, in process where possible (``tiny_c2i`` with one block, 1 CPU device):

* SIGTERM (the test hook ``train.sigterm_at_step``) saves at the next step boundary and
  returns; the next start resumes from that step and finishes;
* a damaged newest checkpoint (array file truncated or deleted, step folder emptied) is
  reported in one line, moved aside (its files kept) and the run resumes from the newest
  good one; none good: a one-line ``CheckpointError``; a changed model shape: one line
  naming the first mismatched path and both shapes, nothing moved;
* a wrong data dir / dataset name: one line naming both and the datasets there, nothing on
  disk; a run failing before its first step removes only what it created;
* ``train.py``: an unknown preset / misspelled override is one line with a suggestion and
  status 2, ``--help`` lists the presets;
* the loop (host-only fake steps, no compile) reads step t's metrics after dispatching step
  t+1, except on checkpoint / last steps, and a non-finite step read late stops the run
  before the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import train_data

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def config(data: Path, **over):
    from configs.train import get_config

    c = get_config("tiny_c2i")
    c.data.name, c.data.data_dir = "shapes_c2i", str(data)
    c.model.depth = 1
    c.train.num_steps = STEPS
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 5
    c.log.every_steps = 100  # metrics read one step late except on checkpoint steps
    c.log.progress = False
    c.log.tensorboard = False
    for k, v in over.items():
        node = c
        *sec, f = k.split(".")
        for s in sec:
            node = node[s]
        node[f] = v
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run preempted by SIGTERM after step 3 (of 4): checkpoints 1 (orbax's first), 2 and 3."""
    from hart_jax.train.loop import train

    root = tmp_path_factory.mktemp("robust")
    data = root / "data"
    train_data.write(data, 16, kind="c2i", name="shapes_c2i", size=32)
    work = root / "base"
    first = train(config(data, **{"train.sigterm_at_step": 3}), work)
    return root, data, work, first


def steps_in(work: Path) -> list[int]:
    return sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_saves_at_the_next_step_boundary(base):
    _, _, work, first = base
    assert first["preempted"] and first["step"] == 3 and np.isfinite(first["loss"])
    assert steps_in(work) == [1, 2, 3]  # 3 is not on the every-2-steps interval: saved for SIGTERM


def copy_run(base, name: str) -> Path:
    root, _, work, _ = base
    dst = root / name
    shutil.copytree(work, dst)
    return dst


def state_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: -p.stat().st_size)


@pytest.fixture(scope="module")
def comp(base):
    from hart_jax.train import loop

    c = config(base[1])
    return c, loop.build(c, devices=jax.devices()[:1])


def restore_newest(comp, work: Path, lines: list[str]):
    from hart_jax.data.pipeline import make_loader
    from hart_jax.train import checkpointing
    from hart_jax.train.sharding import tree_shardings

    c, comp = comp
    shardings = tree_shardings(comp.abstract_state(), comp.mesh, comp.rules)
    it = iter(make_loader(c.data, kind="c2i", resolution=comp.resolution, global_batch=int(c.train.batch_size), seed=0))
    mngr = checkpointing.make_manager(work, every_steps=2, keep=5)
    try:
        return checkpointing.restore_newest_good(mngr, comp.abstract_state(), shardings, it, log=lines.append)
    finally:
        mngr.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_array_falls_back(base, comp, damage):
    work = copy_run(base, f"damaged_{damage}")
    f = state_files(work / "checkpoints" / "3")[0]
    size = f.stat().st_size
    os.truncate(f, size // 2) if damage == "truncate" else f.unlink()
    lines: list[str] = []
    step, state = restore_newest(comp, work, lines)
    assert step == 2 and int(state.step) == 2
    aside = work / "checkpoints" / "3.damaged-0"
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("checkpoint step 3 is damaged (state: array ") and "unreadable" in lines[0], lines
    assert lines[0].endswith(f"moved to {aside}; resuming from step 2"), lines
    assert steps_in(work) == [1, 2]
    kept = aside / "state" / "ocdbt.process_0" / "d" / f.name  # moved, not deleted
    assert kept.exists() == (damage == "truncate") and (damage == "delete" or kept.stat().st_size == size // 2)


def test_emptied_step_folder_resumes_from_previous(base, capsys):
    """The whole ``train`` path after the preemption: the emptied newest step -> one line,
    moved aside, resumed from step 2 and run to the end."""
    from hart_jax.train.loop import train

    work = copy_run(base, "emptied")
    step3 = work / "checkpoints" / "3"
    shutil.rmtree(step3)
    step3.mkdir()
    capsys.readouterr()
    last = train(config(base[1]), work)
    out = capsys.readouterr().out
    line = f"checkpoint step 3 is damaged (item 'state' missing): moved to {step3}.damaged-0; resuming from step 2"
    assert line in out, out
    assert f"resumed from {work}/checkpoints/2" in out
    assert last["step"] == STEPS and not last.get("preempted") and np.isfinite(last["loss"])
    assert steps_in(work) == [1, 2, 4] and (work / "checkpoints" / "3.damaged-0").is_dir()


def test_no_good_checkpoint_is_one_line(base, comp):
    from hart_jax.errors import CheckpointError

    work = copy_run(base, "all_damaged")
    for s in (1, 2, 3):
        shutil.rmtree(work / "checkpoints" / str(s) / "data")
    lines: list[str] = []
    with pytest.raises(CheckpointError) as e:
        restore_newest(comp, work, lines)
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint restores" in msg and "3, 2, 1" in msg, msg
    assert [ln.split(" (")[0] for ln in lines] == [f"checkpoint step {s} is damaged" for s in (3, 2, 1)]
    assert "item 'data' missing" in lines[0] and lines[-1].endswith("no older checkpoint")
    assert steps_in(work) == []
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1.damaged-0", "2.damaged-0", "3.damaged-0"]


def test_changed_model_shape_is_one_line(base):
    from hart_jax.errors import CheckpointError
    from hart_jax.train import loop

    _, data, work, _ = base
    c = config(data, **{"model.diff_width": 48})
    comp2 = loop.build(c, devices=jax.devices()[:1])
    before = sorted(os.listdir(work / "checkpoints"))
    with pytest.raises(CheckpointError) as e:
        restore_newest((c, comp2), work, [])
    msg = str(e.value)
    assert "\n" not in msg and f"{work}/checkpoints/3: params/" in msg, msg
    assert "has shape (32," in msg and "in the checkpoint but (48," in msg and "in the config" in msg, msg
    assert sorted(os.listdir(work / "checkpoints")) == before  # a config mistake moves nothing aside


def test_bad_data_is_one_line_and_leaves_nothing(base, tmp_path):
    from hart_jax.train.loop import train

    data = base[1]
    work = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        train(config(data, **{"data.name": "shapes_c2j"}), work)
    assert str(e.value) == f"dataset 'shapes_c2j' not found in {data}; datasets there: shapes_c2i"
    with pytest.raises(ValueError, match=f"^data.data_dir {tmp_path}/nowhere does not exist"):
        train(config(tmp_path / "nowhere"), work)
    assert not work.exists()
    # a failure after the workdir was made (here: the batch does not split) removes what the run made ...
    with pytest.raises(ValueError, match="batch_size=6 must split into grad_accum=4"):
        train(config(data, **{"train.grad_accum": 4, "train.batch_size": 6}), work)
    assert not work.exists()
    # ... and only that
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        train(config(data, **{"train.grad_accum": 4, "train.batch_size": 6}), work)
    assert os.listdir(work) == ["notes.txt"]


def test_cli_checks_in_process():
    from hart_jax.train.cli import UsageError, check_args, help_text

    cfg = str(REPO / "configs" / "train.py")
    with pytest.raises(UsageError, match=r"unknown preset 'tiny_c2' in .*did you mean 'tiny_c2i'\? presets: hart_0p7b"):
        check_args([f"--config={cfg}:tiny_c2", "--workdir=/x"])
    lrr = r"^--config.optim.lrr: optim has no field 'lrr'; did you mean --config.optim.lr\?$"
    with pytest.raises(UsageError, match=lrr):
        check_args([f"--config={cfg}:tiny_c2i", "--workdir=/x", "--config.optim.lrr=1"])
    with pytest.raises(UsageError, match=r"config has no field 'trian'; did you mean --config.train\?$"):
        check_args([f"--config={cfg}:tiny_c2i", "--workdir=/x", "--config.trian.num_steps=1"])
    with pytest.raises(UsageError, match="--workdir DIR is required"):
        check_args([f"--config={cfg}:tiny_c2i"])
    check_args([f"--config={cfg}:tokenizer_tiny", "--workdir=/x", "--config.tokenizer_loss.disc_start=3"])
    from configs.train import PRESETS

    text = help_text(cfg)
    assert all(p in text for p in PRESETS) and "--config.SECTION.KEY=VALUE" in text


def test_train_py_errors_are_one_line(tmp_path):
    """The real command: status 2, one stderr line, no traceback, nothing on disk."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'train.py'}:tiny_c2i",
           f"--workdir={work}", "--config.train.num_stepz=3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == (
        "train.py: error: --config.train.num_stepz: train has no field 'num_stepz'; "
        "did you mean --config.train.num_steps?"
    )
    assert not work.exists()
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "tiny_t2i, tiny_c2i" in p.stdout and "Traceback" not in p.stderr, p.stderr[-2000:]


class FakeManager:
    """The orbax calls ``run_loop`` makes, recorded (saves every ``every`` steps)."""

    def __init__(self, events: list, every: int) -> None:
        self.events, self.every, self.saved = events, every, []

    def should_save(self, step):
        return step % self.every == 0

    def save(self, step, args=None, force=False):
        self.events.append(("save", step))
        self.saved.append(step)
        return True

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def fake_run(tmp_path, nonfinite_at: int = -1):
    """``run_loop`` over host-only steps: 7 steps, checkpoints every 3, logging every 100."""
    import types

    from hart_jax.train import run_control

    events: list = []
    c = config(tmp_path, **{"train.num_steps": 7, "log.example_ids": True})
    batches = iter([{"id": np.array([t])} for t in range(100)])

    def step(state, local, t):
        events.append(("dispatch", t + 1))
        return types.SimpleNamespace(step=t + 1), {"loss": 1.0, "finite": float(t + 1 != nonfinite_at)}, {}

    def derive(m, dt):
        events.append(("read", len([e for e in events if e[0] == "read"]) + 1))
        return m

    task = run_control.LoopTask(step=step, derive=derive, bar_keys=("loss",))
    guard = run_control.CleanFailedStart(tmp_path / "run").__enter__()
    run = lambda: run_control.run_loop(  # noqa: E731
        c, tmp_path / "run", FakeManager(events, 3), batches, types.SimpleNamespace(step=0), task, {}, guard
    )
    return events, run


def test_loop_reads_metrics_one_step_late(tmp_path):
    """No host round trip per step: step t's metrics are read after step t+1 was dispatched,
    except on checkpoint and last steps, which are read (and checked finite) before saving."""
    events, run = fake_run(tmp_path)
    last = run()
    assert last["step"] == 7
    assert events == [
        ("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2), ("read", 3), ("save", 3),
        ("dispatch", 4), ("dispatch", 5), ("read", 4), ("dispatch", 6), ("read", 5), ("read", 6), ("save", 6),
        ("dispatch", 7), ("read", 7), ("save", 7),
    ]
    ids = (tmp_path / "run" / "example_ids.jsonl").read_text().splitlines()
    assert [json.loads(s)["ids"] for s in ids] == [[t] for t in range(7)]  # each step's own batch, read late


def test_nonfinite_step_read_late_stops_before_the_next_save(tmp_path):
    from hart_jax.train.run_control import TrainingDiverged

    events, run = fake_run(tmp_path, nonfinite_at=5)
    with pytest.raises(TrainingDiverged, match=f"^step 5: loss=1.0 is not finite; .* {tmp_path}/run/checkpoints/3$"):
        run()
    assert [e for e in events if e[0] == "save"] == [("save", 3)]
    assert events[-1] == ("dispatch", 6)  # found one step late, before step 6 could be saved
