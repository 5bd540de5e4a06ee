"""Several processes, one run: ``train.py`` as two ``jax.distributed`` processes on this machine
(coordinator on localhost, 2 CPU devices each, gloo collectives) against one process with 4 CPU
devices, same config and global batch (tiny_t2i, depth 1, no token dropping so each process
compiles one program):

* one process: steps 1..N straight;
* two processes: steps 1..SPLIT (checkpoint), then both started again to resume to N;
* every global batch is the single run's: process p logged exactly rows [p*B/2, (p+1)*B/2) of it;
* losses are equal and params / EMA / optimizer state agree within ``STATE_ATOL``: the
  gradient all-reduce runs as gloo's ring over 4 ranks instead of XLA's in-process CPU
  all-reduce, which adds the per-device partial sums in another order (docs/training.md,
  "Several processes": measured, loss and grad norm bit-equal, params within 1.4e-7 after
  3 steps at lr 3e-3);
* a coordinator without a process count is one line on stderr, status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import train_data

REPO = Path(__file__).resolve().parents[1]
N = 3
SPLIT = 2
BATCH = 8  # tiny_t2i's global batch
# Adam turns a last-bit difference of a near-zero gradient element into an update difference of
# up to about lr * |delta g| / eps; measured 1.4e-7 after 3 steps (lr 3e-3; 4.4e-7 with token
# dropping on), so 1e-5 leaves >= 20x. A wrong batch or shard order moves params by ~lr per step.
STATE_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: Path, data: Path, devices: int, steps: int, env_extra: dict | None = None, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "SLURM_", "OMPI_"))}
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        **(env_extra or {}),
    )
    cmd = [
        sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'train.py'}:tiny_t2i",
        f"--workdir={workdir}", "--config.data.name=shapes", f"--config.data.data_dir={data}",
        f"--config.train.num_steps={steps}", f"--config.optim.decay_steps={N}", f"--config.checkpoint.every_steps={SPLIT}",
        "--config.checkpoint.keep=3", "--config.log.example_ids=True", "--config.model.depth=1", "--config.optim.lr=3e-3",
        "--config.objective.token_drop=False", "--config.distributed.initialization_timeout=120", *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def two_processes(workdir: Path, data: Path, steps: int) -> list[subprocess.Popen]:
    """Process 0 and 1 of one run: the coordinator and the count from the environment for
    process 0, from flags for process 1 (both spellings work)."""
    port = free_port()
    p0 = launch(workdir, data, 2, steps, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                                          "JAX_PROCESS_ID": "0"})
    p1 = launch(workdir, data, 2, steps, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}"},
                "--config.distributed.num_processes=2", "--config.distributed.process_id=1")
    return [p0, p1]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            out.append((p.communicate(timeout=400)[0], p.returncode)[::-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    data = root / "data"
    train_data.write(data, 16, kind="t2i", name="shapes", size=32)
    single = launch(root / "single", data, 4, N)
    first = two_processes(root / "multi", data, SPLIT)
    bad = launch(root / "bad", data, 2, N, {"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    res = {"single": finish([single]), "first": finish(first), "bad": finish([bad])}
    res["second"] = finish(two_processes(root / "multi", data, N))
    return root, res


def ids(path: Path) -> dict[int, list[int]]:
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["ids"]
    return out


def scalars(workdir: Path, tag: str) -> dict[int, float]:
    from hart_jax.train.metrics import read_scalars

    out = {}
    for f in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        out.update({s: v for s, t, v in read_scalars(f) if t == tag})
    return out


def restore(workdir: Path, step: int, like=None):
    import orbax.checkpoint as ocp

    target = None
    if like is not None:  # saved under another topology: restore onto one device
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), like)
    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()})
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def test_two_processes_match_one(runs):
    root, res = runs
    for name in ("single", "first", "second"):
        for rc, out in res[name]:
            assert rc == 0, f"{name}: {out[-3000:]}"
    for i, (_, out) in enumerate(res["first"]):
        assert f"process {i} of 2: 2 local device(s)" in out and "of 4 global" in out, out[-2000:]
    assert f"resumed from {root / 'multi'}/checkpoints/{SPLIT}" in res["second"][0][1]

    # each process read only its rows of the single run's global batches, before and after the restart
    one = ids(root / "single" / "example_ids.jsonl")
    per = [ids(root / "multi" / f"example_ids.process{p}.jsonl") for p in (0, 1)]
    assert sorted(one) == sorted(per[0]) == sorted(per[1]) == list(range(1, N + 1))
    half = BATCH // 2
    for s in one:
        assert len(one[s]) == BATCH
        assert per[0][s] == one[s][:half] and per[1][s] == one[s][half:], s
    assert not (root / "multi" / "example_ids.jsonl").exists()

    for tag in ("train/loss", "train/grad_norm"):
        a, b = scalars(root / "single", tag), scalars(root / "multi", tag)
        assert sorted(a) == sorted(b) == list(range(1, N + 1)), tag
        np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6, err_msg=tag)

    a = restore(root / "single", N)
    b = restore(root / "multi", N, like=a)
    assert int(a["step"]) == int(b["step"]) == N
    for name in ("params", "ema_params", "opt_state"):
        la, lb = jax.tree_util.tree_leaves(a[name]), jax.tree_util.tree_leaves(b[name])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=STATE_ATOL, err_msg=name)
    # the steps really moved the params (far beyond the tolerance)
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(restore(root / "single", SPLIT)["params"])))
    assert moved > 100 * STATE_ATOL


def test_coordinator_without_count_is_one_line(runs):
    root, res = runs
    (rc, out), = res["bad"]
    assert rc == 2, out[-2000:]
    lines = [l for l in out.splitlines() if l.strip() and "OpenCV" not in l]
    assert len(lines) == 1 and "Traceback" not in out, out[-2000:]
    assert "JAX_COORDINATOR_ADDRESS" in lines[0] and "--config.distributed.num_processes=N" in lines[0]
    assert "JAX_NUM_PROCESSES=N" in lines[0]
    assert not (root / "bad").exists()
