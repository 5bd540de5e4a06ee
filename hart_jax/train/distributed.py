"""Several processes, one run: the launch settings of ``jax.distributed.initialize``.

The config section ``distributed`` (``configs/train.py``; flags such as
``--config.distributed.num_processes=2``) and the environment give the coordinator
address, the process count and this process's id:

* ``coordinator_address`` / ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0;
  JAX reads this variable itself);
* ``num_processes`` / ``JAX_NUM_PROCESSES`` and ``process_id`` / ``JAX_PROCESS_ID``
  (the names orbax's multi-process launchers use; JAX 0.10-0.12 does not read them, so
  they are read here and passed on);
* ``local_device_ids`` / ``JAX_LOCAL_DEVICE_IDS`` (comma-separated; JAX reads it too).

A config value wins over its variable. Under SLURM (``SLURM_JOB_ID`` with
``SLURM_NTASKS`` > 1) or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) whatever is not given
is left to JAX's own cluster detection. Outside them, the three settings go together:
a coordinator without a process count (or the other way round) is a
``DistributedSetupError`` naming the missing setting and how to give it.

``mode``: ``auto`` initializes when any setting or a multi-task launcher is present,
``on`` always (also for a one-task SLURM / Open MPI job; it is an error when nothing says
how), ``off`` never.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from hart_jax.errors import HartError

log = logging.getLogger("hart_jax.train")

MODES = ("auto", "on", "off")

# (config field, environment variable, flag spelling) of each setting.
COORDINATOR = ("coordinator_address", "JAX_COORDINATOR_ADDRESS", "--config.distributed.coordinator_address=HOST:PORT")
NUM_PROCESSES = ("num_processes", "JAX_NUM_PROCESSES", "--config.distributed.num_processes=N")
PROCESS_ID = ("process_id", "JAX_PROCESS_ID", "--config.distributed.process_id=I")
LOCAL_DEVICE_IDS = ("local_device_ids", "JAX_LOCAL_DEVICE_IDS", "--config.distributed.local_device_ids=0,1")


class DistributedSetupError(HartError):
    """The multi-process launch settings are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Arguments of ``jax.distributed.initialize`` (``None``: JAX's cluster detection fills it)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300
    launcher: str = ""  # "slurm" | "openmpi" | "" (explicit settings only)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``jax.distributed.initialize``."""
        return dict(
            coordinator_address=self.coordinator_address, num_processes=self.num_processes,
            process_id=self.process_id,
            local_device_ids=list(self.local_device_ids) if self.local_device_ids is not None else None,
            initialization_timeout=int(self.initialization_timeout),
        )


def _section(config: Any) -> dict[str, Any]:
    """The ``distributed`` section (of a whole config, or the section itself) as a dict; a
    bare mode string, as older configs had, too."""
    d = config
    if hasattr(config, "get") and "mode" not in config:
        d = config.get("distributed", "auto")
    if d is None or isinstance(d, str):
        return {"mode": d or "auto"}
    return dict(d)


def _get(section: Mapping[str, Any], environ: Mapping[str, str], spec: tuple[str, str, str]) -> tuple[Any, str]:
    """(value, where it came from) of one setting; config first, then the environment."""
    field, var, _ = spec
    v = section.get(field)
    if v is not None and v != "" and not (isinstance(v, int) and v < 0):
        return v, f"distributed.{field}"
    if environ.get(var, "") != "":
        return environ[var], var
    return None, ""


def _as_int(value: Any, where: str, spec: tuple[str, str, str]) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedSetupError(f"distributed: {where}={value!r} is not an integer ({spec[2]} or {spec[1]}=N)") from None


def _launcher(environ: Mapping[str, str], min_tasks: int = 2) -> str:
    """The launcher JAX's own detection would use when it runs at least ``min_tasks`` tasks:
    ``slurm``, ``openmpi`` or ``""``."""
    def n(var: str) -> int:
        try:
            return int(environ.get(var, "1"))
        except ValueError:
            return 1

    if "SLURM_JOB_ID" in environ and "SLURM_NTASKS" in environ and n("SLURM_NTASKS") >= min_tasks:
        return "slurm"
    if "OMPI_COMM_WORLD_SIZE" in environ and n("OMPI_COMM_WORLD_SIZE") >= min_tasks:
        return "openmpi"
    return ""


def _missing(what: str, spec: tuple[str, str, str], given: str) -> DistributedSetupError:
    return DistributedSetupError(
        f"distributed: {given} is set but not {what}, and no SLURM / Open MPI launcher is present to supply it: "
        f"give {spec[2]} or {spec[1]}={spec[2].rsplit('=', 1)[1]}"
    )


def resolve(config: Any, environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The settings for ``jax.distributed.initialize`` from ``config.distributed`` and
    ``environ`` (default ``os.environ``), or ``None`` for a single-process run."""
    env = os.environ if environ is None else environ
    sec = _section(config)
    mode = str(sec.get("mode", "auto"))
    if mode not in MODES:
        raise DistributedSetupError(f"distributed.mode={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    coord, coord_src = _get(sec, env, COORDINATOR)
    nproc, nproc_src = _get(sec, env, NUM_PROCESSES)
    pid, pid_src = _get(sec, env, PROCESS_ID)
    ldev, ldev_src = _get(sec, env, LOCAL_DEVICE_IDS)
    nproc = _as_int(nproc, nproc_src, NUM_PROCESSES) if nproc is not None else None
    pid = _as_int(pid, pid_src, PROCESS_ID) if pid is not None else None
    if ldev is not None:
        items = ldev if isinstance(ldev, (list, tuple)) else str(ldev).split(",")
        ldev = tuple(_as_int(x, ldev_src, LOCAL_DEVICE_IDS) for x in items if str(x).strip() != "")
    launcher = _launcher(env, 1 if mode == "on" else 2)
    explicit = any(v is not None for v in (coord, nproc, pid))
    if not explicit and not launcher:
        if mode == "on":
            raise DistributedSetupError(
                "distributed.mode='on' but nothing says how to connect: give the coordinator, process count and id "
                f"({COORDINATOR[2]} {NUM_PROCESSES[2]} {PROCESS_ID[2]}, or {COORDINATOR[1]} / {NUM_PROCESSES[1]} / "
                f"{PROCESS_ID[1]}), or launch under SLURM / Open MPI"
            )
        return None
    if not launcher:
        given = coord_src or nproc_src or pid_src
        if coord is None:
            raise _missing("the coordinator address", COORDINATOR, given)
        if nproc is None:
            raise _missing("the number of processes", NUM_PROCESSES, given)
        if pid is None:
            raise _missing("this process's id", PROCESS_ID, given)
    if nproc is not None and nproc < 1:
        raise DistributedSetupError(f"distributed: {nproc_src}={nproc}: the number of processes must be >= 1")
    if pid is not None and nproc is not None and not 0 <= pid < nproc:
        raise DistributedSetupError(f"distributed: {pid_src}={pid} is not in [0, {nproc}) ({nproc_src}={nproc})")
    if coord is not None and ":" not in str(coord):
        raise DistributedSetupError(f"distributed: {coord_src}={coord!r} is not HOST:PORT")
    timeout = int(sec.get("initialization_timeout", 300) or 300)
    return DistributedSettings(
        coordinator_address=str(coord) if coord is not None else None, num_processes=nproc, process_id=pid,
        local_device_ids=ldev, initialization_timeout=timeout, launcher=launcher,
    )


def wait_for_coordinator(settings: DistributedSettings, poll_s: float = 0.5) -> None:
    """Wait (up to ``initialization_timeout``) until the coordinator's port accepts a TCP
    connection. JAX's own client aborts the whole process (a C++ fatal error, no Python
    exception) when it cannot reach the coordinator; this says so in one line instead."""
    host, _, port = str(settings.coordinator_address).rpartition(":")
    host = host.strip("[]")
    try:
        port_n = int(port)
    except ValueError:
        raise DistributedSetupError(f"distributed: coordinator {settings.coordinator_address!r} is not HOST:PORT") from None
    deadline = time.monotonic() + settings.initialization_timeout
    while True:
        try:
            with socket.create_connection((host, port_n), timeout=min(2.0, settings.initialization_timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"distributed: process {settings.process_id} of {settings.num_processes} could not reach the "
                    f"coordinator {settings.coordinator_address} within {settings.initialization_timeout} s "
                    f"({e.strerror or e}); start process 0 first (it serves that address) or fix the address"
                ) from None
            time.sleep(poll_s)


def maybe_initialize_distributed(config: Any = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` with the resolved settings (see ``resolve``);
    returns whether this run has several processes. Logs the process index / count and
    the local / global devices. Must run before anything touches a JAX backend."""
    if not jax.distributed.is_initialized():
        settings = resolve(config, environ)
        if settings is None:
            return False
        log.info("jax.distributed.initialize(%s) [%s]", settings.kwargs(), settings.launcher or "explicit settings")
        if settings.coordinator_address is not None and settings.process_id not in (None, 0):
            wait_for_coordinator(settings)
        jax.distributed.initialize(**settings.kwargs())
    msg = (
        f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local device(s) "
        f"{[d.id for d in jax.local_devices()]} of {jax.device_count()} global"
    )
    if jax.process_count() > 1:
        print(msg, flush=True)
    else:
        log.info(msg)
    return jax.process_count() > 1


def example_ids_path(workdir: str | os.PathLike) -> Path:
    """Where this process logs the example ids it reads (``log.example_ids``):
    ``example_ids.jsonl``, or ``example_ids.process<I>.jsonl`` with several processes."""
    name = "example_ids.jsonl" if jax.process_count() == 1 else f"example_ids.process{jax.process_index()}.jsonl"
    return Path(workdir) / name
