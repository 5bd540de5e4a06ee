"""JAX's persistent compilation cache in ``sample.py`` and ``HARTPipeline`` (policy in
``hart_jax/compile_cache.py``).

What is counted: JAX records a monitoring event per XLA compilation that consults the cache
(``/jax/compilation_cache/compile_requests_use_cache``), per executable read from the cache
(``.../cache_hits``) and per executable compiled and written to it (``.../cache_misses``).
``sample.py`` counts them while sampling (``hart_jax.compile_cache.CacheEvents``) and writes
them to settings.json under ``compile``; every miss also leaves a file in the cache directory,
so an unchanged directory means the process compiled nothing cacheable.

The suite runs with the cache off (``tests/conftest.py``); these tests turn it on in their own
temporary directories only, and restore JAX's process-wide cache settings after each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hart_jax import compile_cache as cc
from hart_jax.compile_cache import ENV_VAR, default_cache_dir, enable_compile_cache, requested_dir
from hart_jax.errors import HartError
from hart_jax.sample_cli import main


def _sample(*args: str, cwd: Path, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    """``python sample.py ARGS --no-progress`` in a fresh process; ``env`` overrides (None
    removes a variable). A cache directory configured through JAX itself is removed."""
    full = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"):  # the run-wide cache (conftest.py)
        full.pop(k, None)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args, "--no-progress"], capture_output=True,
                          text=True, cwd=cwd, timeout=900, env=full)


def _settings(out: Path) -> dict:
    return json.loads((out / "settings.json").read_text())


@pytest.fixture(autouse=True)
def jax_cache_state():
    """Every test here starts with no cache directory configured through JAX (the suite's
    run-wide cache, see conftest.py, is set aside) and ends with JAX's process-wide cache
    settings and this package's record of them restored."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    ours, logged = cc._ours, cc._logged
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    compilation_cache.reset_cache()
    for n, v in before.items():
        jax.config.update(n, v)
    cc._ours, cc._logged = ours, logged


def test_second_process_of_the_same_shape_compiles_nothing(tmp_path):
    """The issue's test: process 1 compiles and writes the cache; process 2 (same prompt
    shape, same cache directory) reads every program from it, writes nothing new, and draws
    the same image."""
    cache = tmp_path / "cache"
    r = _sample("--prompt", "a red circle", "--out-dir", "cold", "--compile-cache", str(cache), cwd=tmp_path,
                env={ENV_VAR: "off"})  # the flag wins over the variable
    assert r.returncode == 0, r.stderr
    cold = _settings(tmp_path / "cold")
    assert cold["compile_cache"] == str(cache)
    assert cold["compile"]["misses"] > 0 and cold["compile"]["hits"] == 0, cold["compile"]
    assert "(compiled)" in r.stdout and f"compile cache: {cache}" in r.stdout
    entries = sorted(p.name for p in cache.iterdir())
    assert entries

    r = _sample("--prompt", "a red circle", "--out-dir", "warm", cwd=tmp_path, env={ENV_VAR: str(cache)})
    assert r.returncode == 0, r.stderr
    warm = _settings(tmp_path / "warm")
    assert warm["compile_cache"] == str(cache)
    c = warm["compile"]
    assert c["misses"] == 0 and c["hits"] > 0 and c["hits"] == c["requests"], c
    assert "(from the compile cache)" in r.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anywhere in process 2
    for s in (cold, warm):
        assert set(s["seconds"]) == {"load", "first_batch", "sampling", "total"}
    png = cold["files"][0]
    assert (tmp_path / "cold" / png).read_bytes() == (tmp_path / "warm" / png).read_bytes()


def test_no_compile_cache_flag_leaves_every_cache_dir_untouched(tmp_path):
    """``--no-compile-cache`` wins over ``HART_JAX_COMPILE_CACHE`` and the default directory.
    The process stops after loading the model (a resolution it does not generate): loading
    compiles, so without the flag the same process writes the cache (the control)."""
    env_dir, xdg = tmp_path / "env-cache", tmp_path / "xdg"
    env = {ENV_VAR: str(env_dir), "XDG_CACHE_HOME": str(xdg)}
    argv = ["--prompt", "a red circle", "--out-dir", "o", "--resolution", "1"]
    r = _sample(*argv, "--no-compile-cache", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "unsupported resolution 1" in r.stderr
    assert not env_dir.exists() and not xdg.exists()
    r = _sample(*argv, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "unsupported resolution 1" in r.stderr
    assert list(env_dir.iterdir()) and not xdg.exists()


_JIT_ONCE = ("import jax, jax.numpy as jnp; from hart_jax.compile_cache import enable_compile_cache; "
             "print(enable_compile_cache()); jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()")


def test_env_off_leaves_the_default_dir_untouched(tmp_path):
    """``HART_JAX_COMPILE_CACHE=off``: a process that compiles writes nothing to the default
    directory; without the variable the same process fills it (the control)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path), **{ENV_VAR: "off"})
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", _JIT_ONCE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None"] and not list(tmp_path.iterdir())
    del env[ENV_VAR]
    r = subprocess.run([sys.executable, "-c", _JIT_ONCE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    default = tmp_path / "hart_jax" / "jax_cache"
    assert r.stdout.split() == [str(default)] and list(default.iterdir())


def _refused(argv: list[str], message: str, capsys: pytest.CaptureFixture, cwd: Path) -> None:
    """``main(argv)`` exits 2 with the one line ``error: <message>`` and writes nothing."""
    before = sorted(cwd.rglob("*"))
    try:
        rc = main([*argv, "--prompt", "a", "--out-dir", "o", "--no-progress"])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert sorted(cwd.rglob("*")) == before


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with a file ``taken`` and no cache variables set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / "taken").write_text("mine")
    return tmp_path


def test_bad_compile_cache_flag_is_one_line_exit_2(here, capsys, monkeypatch):
    _refused(["--compile-cache", "taken"], "--compile-cache taken: exists and is not a directory", capsys, here)
    _refused(["--compile-cache", "taken/sub"], "--compile-cache taken/sub: taken is not a directory", capsys, here)
    _refused(["--compile-cache", "c", "--no-compile-cache"],
             "argument --no-compile-cache: not allowed with argument --compile-cache (see --help)", capsys, here)
    monkeypatch.setenv(ENV_VAR, "taken")
    _refused([], f"{ENV_VAR} taken: exists and is not a directory", capsys, here)
    # read-only: os.access is asked (faked here, as root may write anywhere)
    ro = here / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).absolute() != ro and real(p, mode, **kw))
    _refused(["--compile-cache", "ro/c"], "--compile-cache ro/c: ro is not writable", capsys, here)
    assert (here / "taken").read_text() == "mine"


def test_default_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "hart_jax" / "jax_cache"
    assert requested_dir() == requested_dir(True) == tmp_path / "hart_jax" / "jax_cache"
    home = Path.home() / ".cache" / "hart_jax" / "jax_cache"
    for unset in ("", "relative/dir"):  # the XDG spec: ignore empty or relative values
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert default_cache_dir() == home
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == home


def test_requested_dir_reads_the_variable_and_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert requested_dir() == requested_dir(True) == tmp_path / "env"
    assert requested_dir(tmp_path / "arg") == tmp_path / "arg"
    assert requested_dir(False) is None and requested_dir("off") is None
    for off in ("off", "OFF", "0", "none", "None", "", " "):
        monkeypatch.setenv(ENV_VAR, off)
        assert requested_dir() is None, off
    assert requested_dir(True) == tmp_path / "xdg" / "hart_jax" / "jax_cache"  # True: on, whatever it says


def test_enable_switches_directories_and_keeps_a_jax_configured_one(tmp_path, monkeypatch, jax_cache_state):
    """In one process: a path switches JAX's cache to it (thresholds lowered so every program
    is written), the default keeps the earlier choice, False turns it off; a directory set
    through JAX itself is kept whatever is asked. Nothing is compiled here."""
    import jax

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    jax.config.update("jax_compilation_cache_dir", None)
    cc._ours = None
    assert enable_compile_cache(tmp_path / "a") == tmp_path / "a"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    assert enable_compile_cache() == tmp_path / "a"  # an earlier choice of this process is kept
    assert enable_compile_cache(str(tmp_path / "b")) == tmp_path / "b"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "b")
    assert enable_compile_cache(False) is None and jax.config.jax_compilation_cache_dir is None
    assert enable_compile_cache() == tmp_path / "env"
    with pytest.raises(HartError, match="exists and is not a directory"):
        (tmp_path / "file").write_text("x")
        enable_compile_cache(tmp_path / "file")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user"))  # as JAX_COMPILATION_CACHE_DIR would
    assert enable_compile_cache(tmp_path / "c") == tmp_path / "user"
    assert enable_compile_cache(False) == tmp_path / "user"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "user")
    assert not any(p.name in "abc" for p in tmp_path.iterdir())


def test_unusable_default_dir_means_no_cache_not_an_error(tmp_path, monkeypatch, jax_cache_state):
    import jax

    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / "hart_jax").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    jax.config.update("jax_compilation_cache_dir", None)
    cc._ours = None
    assert enable_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
