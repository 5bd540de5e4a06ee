"""Launch settings of several-process runs (``hart_jax.train.distributed.resolve``): config
section and flags over ``JAX_*`` variables, SLURM / Open MPI left to JAX's detection, one-line
errors for incomplete settings. In-process, nothing initialized."""

from __future__ import annotations

import pytest

from configs.train import distributed_section
from hart_jax.errors import HartError
from hart_jax.train.distributed import DistributedSetupError, resolve, wait_for_coordinator

SLURM = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[1-2]"}


def section(**kw):
    d = distributed_section()
    d.update(kw)
    return d


def test_single_process_and_off():
    assert resolve(section(), {}) is None
    assert resolve(section(mode="off"), {"JAX_COORDINATOR_ADDRESS": "h:1", **SLURM}) is None
    assert resolve("auto", {}) is None  # a bare mode string (older configs) still works


def test_environment_and_flags():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    s = resolve(section(), env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("10.0.0.1:1234", 4, 3, (0, 1))
    assert s.launcher == "" and s.kwargs()["local_device_ids"] == [0, 1] and s.kwargs()["initialization_timeout"] == 300
    # a config value (flag) wins over its variable
    s = resolve(section(coordinator_address="h:9", process_id=0, initialization_timeout=30), env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.initialization_timeout) == ("h:9", 4, 0, 30)
    s = resolve(section(coordinator_address="h:9", num_processes=2, process_id=1), {})
    assert (s.num_processes, s.process_id, s.local_device_ids) == (2, 1, None)
    from configs.train import get_config  # the whole config, as train() passes it

    c = get_config("tiny_t2i")
    c.distributed.num_processes = 8
    assert resolve(c, env).num_processes == 8 and resolve(get_config("tokenizer_tiny"), env).process_id == 3


def test_launchers_left_to_jax():
    s = resolve(section(), SLURM)
    assert s.launcher == "slurm" and s.kwargs()["coordinator_address"] is None and s.num_processes is None
    s = resolve(section(num_processes=2), {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert s.launcher == "openmpi" and s.num_processes == 2 and s.process_id is None
    assert resolve(section(), {**SLURM, "SLURM_NTASKS": "1"}) is None  # one task: one process
    assert resolve(section(mode="on"), {**SLURM, "SLURM_NTASKS": "1"}).launcher == "slurm"  # unless asked
    assert resolve(section(mode="on"), {**SLURM, "SLURM_NTASKS": "1", "JAX_COORDINATOR_ADDRESS": "h:1",
                                        "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).num_processes == 1


@pytest.mark.parametrize(
    "sec, env, words",
    [
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_COORDINATOR_ADDRESS", "number of processes",
                                                  "--config.distributed.num_processes=N", "JAX_NUM_PROCESSES=N"]),
        ({"coordinator_address": "h:1", "num_processes": 2}, {}, ["process's id", "--config.distributed.process_id=I",
                                                                   "JAX_PROCESS_ID=I"]),
        ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["coordinator address", "JAX_COORDINATOR_ADDRESS=HOST:PORT"]),
        ({"mode": "on"}, {}, ["mode='on'", "SLURM"]),
        ({"mode": "sometimes"}, {}, ["distributed.mode='sometimes'", "auto, on, off"]),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         ["JAX_NUM_PROCESSES='two' is not an integer"]),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, ["distributed.process_id=2", "[0, 2)"]),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, [">= 1"]),
        ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, {}, ["not HOST:PORT"]),
    ],
)
def test_errors_name_the_setting(sec, env, words):
    with pytest.raises(DistributedSetupError) as e:
        resolve(section(**sec), env)
    msg = str(e.value)
    assert isinstance(e.value, HartError) and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_unreachable_coordinator_is_one_line():
    """A process other than 0 whose coordinator never answers gets one line (JAX itself would
    abort the process), after the configured timeout; a listening port passes at once."""
    import socket

    with socket.socket() as srv:  # a port that is free, then closed: nothing listens there
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
    sec = {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": 1,
           "initialization_timeout": 1}
    settings = resolve({"distributed": sec}, {})
    with pytest.raises(DistributedSetupError) as e:
        wait_for_coordinator(settings, poll_s=0.1)
    msg = str(e.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "within 1 s" in msg and "process 1 of 2" in msg
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        ok = resolve({"distributed": dict(sec, coordinator_address=f"127.0.0.1:{srv.getsockname()[1]}")}, {})
        wait_for_coordinator(ok)  # returns
