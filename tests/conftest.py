"""Test setup: 8 fake CPU devices, fp32 matmuls, one compilation cache per run (see below), and the
golden fixture directory.

``HART_GOLDEN_DIR`` (default ``../shared/golden`` next to the repository) holds the
fixtures made by the original PyTorch code; parity tests take every config,
weight and array from there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# XLA's CPU backend at LLVM optimisation level 0: the suite's programs are tiny, so compiling
# dominates (measured: 40% less CPU time on the in-process tests); results are the same since
# XLA's CPU fast-math stays off (no reassociation at any level). The subprocesses started by
# tests set it too.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# hart_jax's own compile-cache policy (HART_JAX_COMPILE_CACHE) is off for the suite and the
# subprocesses it starts: nothing is written to the user's cache directory.
# tests/test_compile_cache.py turns it on explicitly, in temporary directories.
os.environ.setdefault("HART_JAX_COMPILE_CACHE", "off")
# One JAX persistent compilation cache for this run only, shared by the xdist workers and every
# subprocess they start (train.py, sample.py, the retraining smoke run): a program is compiled
# once per run, and a process that needs the same program again (the resumed half of a killed
# run, another test file's identical pipeline) reads it. The directory is made by the first
# process (the xdist controller, or a plain pytest run), inherited by the others through the
# environment, and removed at the end. JAX's thresholds stay at its defaults (programs that took
# >= 1 s to compile). A size limit makes JAX lock the directory around every read and write, so
# concurrent processes never read a half-written entry. A cache configured by the caller
# (JAX_COMPILATION_CACHE_DIR already set) is used as it is.
RUN_CACHE_VAR = "HART_JAX_TEST_RUN_CACHE"
_made_run_cache = RUN_CACHE_VAR not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _made_run_cache:
    os.environ[RUN_CACHE_VAR] = tempfile.mkdtemp(prefix="hart_jax_test_jit_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[RUN_CACHE_VAR]
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(32 << 30))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("HART_GOLDEN_DIR", REPO.parent / "shared" / "golden")).resolve()

# fp32 on CPU: parity within 1e-4 absolute and relative.
ATOL = 1e-4
RTOL = 1e-4

# The release's ``more_smooth`` sampling feeds each scale a Gumbel softmax at temperature
# tau ~ 0.03-0.27 over logits scaled by (1 + r), multiplying logit differences by about 10x
# per scale, so fp32 reduction-order noise of ~1e-5 in the logits grows to ~1e-4..1e-3 by the
# last scale. Measured: vs PyTorch 5.3e-4 on the image and 1.1e-3 on f_hat (shared set);
# sharded vs one device 1e-4 / 5.4e-4 (shared set), 4e-4 on the image (a second fixture set).
# Token indices stay exact; images and f_hat after such a chain get this bound (>= 3x margin).
CHAINED_GUMBEL_ATOL = 3e-3


def assert_close(actual, expected, name: str = "", atol: float = ATOL, rtol: float = RTOL) -> None:
    """``np.testing.assert_allclose`` with the project's fp32 tolerance and a name."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol, err_msg=name)


def nhwc(a_NCHW: np.ndarray) -> np.ndarray:
    """Fixture layout NCHW -> JAX layout NHWC."""
    return np.ascontiguousarray(np.asarray(a_NCHW).transpose(0, 2, 3, 1))


def nchw(a_NHWC) -> np.ndarray:
    """JAX layout NHWC -> fixture layout NCHW."""
    return np.asarray(a_NHWC).transpose(0, 3, 1, 2)


@contextlib.contextmanager
def pallas_interpret_mode(flag: bool) -> Iterator[None]:
    """Run the Pallas kernels interpreted (or not) inside the block; the previous global
    setting (``HART_PALLAS_INTERPRET``) is restored after it, whatever happens."""
    from hart_jax.attention import pallas_interpret, set_pallas_interpret

    before = pallas_interpret()
    set_pallas_interpret(flag)
    try:
        yield
    finally:
        set_pallas_interpret(before)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The fixture directory; a missing one is an error, never a skip."""
    if not (GOLDEN_DIR / "README.md").is_file():
        raise FileNotFoundError(
            f"golden fixtures not found at {GOLDEN_DIR}; set HART_GOLDEN_DIR to the fixture directory"
        )
    return GOLDEN_DIR


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which tests could not run (skipped), or that every collected test ran: CI's legs
    print this so a leg missing an optional dependency (e.g. torch) says what it left out."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        terminalreporter.write_line("tests not run: none")
        return
    terminalreporter.write_line(f"tests not run: {len(skipped)}")
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"  {report.nodeid}: {reason}")


def pytest_unconfigure(config) -> None:
    """Remove the run's compilation cache (only in the process that made it)."""
    if _made_run_cache:
        shutil.rmtree(os.environ[RUN_CACHE_VAR], ignore_errors=True)


# The longest test files, longest first (CI seconds per file on 2 cores, leg 1). CI runs the
# suite on two xdist workers with ``--dist loadfile``, handing out whole files in collection
# order; a long file drawn last leaves one core idle while the other finishes it. So after
# pytest-randomly's shuffle, these files go first (in this order) and every other file follows
# in its shuffled order; the tests inside every file stay shuffled.
LONGEST_FILES_FIRST = (  # from CI's --durations of 2026-12-07 (leg 1 tests 732 s)
    "test_builtin_retrain.py",
    "test_train_multiprocess.py",
    "test_pipeline.py",
    "test_tokenizer_train.py",
    "test_train_resume.py",
    "test_builtin.py",
    "test_compile_cache.py",
    "test_tokenizer_train_step.py",
    "test_train_finetune.py",
    "test_train_robust.py",
    "test_serve.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    """Longest files first (``LONGEST_FILES_FIRST``), then the rest in their collected order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: shuffles kept
