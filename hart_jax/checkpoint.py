"""Converted-checkpoint directories: Orbax params + config, written atomically.

Layout of a directory written by ``save_converted``::

    <dir>/config.json     model config (release field names)
    <dir>/params/         Orbax PyTree checkpoint of the Flax params
    <dir>/hart_jax.json   marker: format, kind, parameter count, source; written last
    <dir>/<extra files>   e.g. the text encoder's prompt prefix
    <dir>/<extra trees>/  further Orbax PyTrees beside the params (e.g. a tokenizer's
                          discriminator); ``load_converted`` does not read them

What each part keeps in its extra files and trees, and how it is read back, is
``hart_jax.loading``.

Everything is first written to a temporary sibling directory and renamed into
place, so an interrupted conversion never leaves a directory that looks complete;
an existing directory is replaced only with ``force=True`` (and is kept until the
new one is complete). The temporary directory is named ``.<name>.tmp-<pid>-<host>-<random>``:
a later write of the same output removes those its host's dead processes left behind
(a writer killed mid-way), never one of a live process or of another host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from hart_jax.errors import CheckpointError

FORMAT = "hart-jax-converted"
FORMAT_VERSION = 1
MARKER = "hart_jax.json"


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def _pytree_checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


def check_output(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Refuse an existing ``out_dir`` unless ``force`` (checked before any work starts)."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; pass --force (force=True) to replace it")


def _host_tag() -> str:
    """This machine's name as it appears in temporary directory names."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temp_prefix(out: Path) -> str:
    """Name prefix of this process's temporary directories for ``out``."""
    return f".{out.name}.tmp-{os.getpid()}-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories of ``out_dir`` left by dead writers on this host;
    return them. Names without a pid (older versions) or of another host are kept."""
    out = Path(out_dir).absolute()
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)-{re.escape(_host_tag())}-[^-]+")
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; on success it replaces
    ``out_dir`` (the old one is kept until then), on any error it is removed.
    Stale temporaries of ``out_dir`` (``remove_stale_temporaries``) are removed first."""
    out = Path(out_dir).absolute()
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_converted(
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    kind: str,
    source: str | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    extra_trees: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``params`` + ``config`` (+ extra files and Orbax trees) to ``out_dir``
    atomically; return its path."""
    with atomic_directory(out_dir, force) as tmp:
        _pytree_checkpointer().save(str(tmp / "params"), dict(params))
        for name, tree in (extra_trees or {}).items():
            _pytree_checkpointer().save(str(tmp / name), tree)
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        marker = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "num_params": count_params(params),
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "extra_files": sorted(extra_files or {}),
        }
        if extra_trees:
            marker["extra_trees"] = sorted(extra_trees)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(out_dir).absolute()


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a JSON object file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def read_marker(ckpt_dir: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The marker of a converted directory; checks format and (optionally) kind."""
    d = Path(ckpt_dir)
    m = d / MARKER
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    if not m.is_file():
        raise CheckpointError(f"{d}: not a hart-jax checkpoint (no {MARKER}; incomplete or not converted?)")
    try:
        marker = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{m}: corrupt marker ({e})") from None
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{m}: format {marker.get('format')!r}, expected {FORMAT!r}")
    if kind is not None and marker.get("kind") != kind:
        raise CheckpointError(f"{d}: holds a {marker.get('kind')!r} checkpoint, expected {kind!r}")
    return marker


def load_converted(
    ckpt_dir: str | os.PathLike, kind: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(config dict, params)`` of a directory written by ``save_converted``."""
    d = Path(ckpt_dir).absolute()
    marker = read_marker(d, kind)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: missing config.json")
    config = json.loads(cfg_path.read_text())
    if not (d / "params").is_dir():
        raise CheckpointError(f"{d}: missing params/ (Orbax checkpoint)")
    try:
        params = _pytree_checkpointer().restore(str(d / "params"))
    except Exception as e:
        raise CheckpointError(f"{d / 'params'}: cannot restore Orbax checkpoint: {e}") from None
    n = count_params(params)
    if n != marker.get("num_params"):
        raise CheckpointError(f"{d}: params hold {n} values but {MARKER} says {marker.get('num_params')}")
    return config, params
