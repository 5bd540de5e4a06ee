"""JAX's persistent compilation cache, on by default for ``sample.py`` and ``HARTPipeline``:
a second run of the same shape in a fresh process loads its compiled programs from disk
instead of compiling them again.

Policy (first that applies):

1. A cache directory configured through JAX itself (``JAX_COMPILATION_CACHE_DIR``,
   ``jax.config.update("jax_compilation_cache_dir", ...)``) or ``jax_enable_compilation_cache``
   set to false is the user's choice: it is kept as it is, whatever is asked here, and logged.
2. An explicit setting: ``enable_compile_cache(path)``, ``HARTPipeline(compile_cache=...)``,
   ``sample.py --compile-cache DIR`` / ``--no-compile-cache``.
3. The environment variable ``HART_JAX_COMPILE_CACHE``: a directory, or ``off`` / ``0`` /
   ``none`` / empty for no cache.
4. The default directory ``$XDG_CACHE_HOME/hart_jax/jax_cache`` (``~/.cache/hart_jax/jax_cache``
   when ``XDG_CACHE_HOME`` is unset or not absolute).

Every program is cached (the thresholds ``jax_persistent_cache_min_compile_time_secs`` and
``jax_persistent_cache_min_entry_size_bytes`` are lowered to "always" unless the user changed
them). The cache is process-global in JAX: a later request for another directory resets it
(``jax.experimental.compilation_cache.compilation_cache.reset_cache``), so programs compiled
from then on, whichever pipeline they belong to, use the new directory; programs already
compiled stay compiled in memory. The directory grows without bound; delete it to reclaim
the space (JAX's ``jax_compilation_cache_max_size`` caps it). As JAX warns, a cache is
trusted code: do not point it at a directory others can write to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Union

from hart_jax.errors import HartError

logger = logging.getLogger(__name__)

ENV_VAR = "HART_JAX_COMPILE_CACHE"
OFF_VALUES = frozenset({"", "off", "0", "none"})
# The events JAX records (jax._src.compiler / compilation_cache; the same names in 0.10.2 and
# in JAX's main branch at 0.11.1):
# one request per XLA compilation that consults the cache, a hit when the executable was
# read from disk, a miss when a freshly compiled executable was written to disk.
EVENT_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
EVENT_HIT = "/jax/compilation_cache/cache_hits"
EVENT_MISS = "/jax/compilation_cache/cache_misses"

CacheSetting = Union[str, os.PathLike, bool, None]

_ours: str | None = None  # the directory this module set in jax.config, if any
_logged: object = ()  # the last state logged (logging only changes)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hart_jax/jax_cache``, or ``~/.cache/hart_jax/jax_cache`` when
    ``XDG_CACHE_HOME`` is unset, empty or relative (as the XDG spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hart_jax" / "jax_cache"


def requested_dir(setting: CacheSetting = None) -> Path | None:
    """The directory ``setting`` asks for, before JAX's own configuration is considered:
    ``None`` -> ``$HART_JAX_COMPILE_CACHE`` if set, else :func:`default_cache_dir`; ``True``
    (on, whatever the variable says) -> the variable's directory, else the default one;
    ``False`` or an off word (``off``/``0``/``none``/empty) -> ``None``; a path -> that path."""
    if setting is None or setting is True:
        env = os.environ.get(ENV_VAR)
        if env is None or (setting is True and env.strip().lower() in OFF_VALUES):
            return default_cache_dir()
        setting = env
    if setting is False:
        return None
    text = os.fspath(setting)
    if text.strip().lower() in OFF_VALUES:
        return None
    return Path(text).expanduser()


def check_writable_dir(path: Path, name: str = "compile cache") -> None:
    """``path`` is a directory or can be made one: its nearest existing ancestor (or itself)
    is a writable directory; else a one-line ``HartError`` naming ``name`` (e.g. the flag).
    Creates nothing. (Also ``sample.py``'s check of ``--out-dir``.)"""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"{existing} is not a directory"
        raise HartError(f"{name} {path}: {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HartError(f"{name} {path}: {existing} is not writable")


def jax_configured_dir() -> str | None:
    """The cache directory JAX is configured with by the user (not by this module), or None."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    return current if current is not None and current != _ours else None


def active_cache_dir() -> Path | None:
    """The directory JAX's persistent cache uses now (None: no persistent cache)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    return Path(current) if current and jax.config.jax_enable_compilation_cache else None


def _cache_everything() -> None:
    """Lower JAX's thresholds so every program is written, unless the user changed them
    (JAX's defaults: 1 s of compile time, entry size 0 = JAX's own minimum)."""
    import jax

    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_persistent_cache_min_entry_size_bytes == 0:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit


def _switch(path: str | None) -> None:
    """Point JAX's cache at ``path`` (None: none); a cache already opened is reset first."""
    global _ours
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()  # harmless when not yet opened; otherwise the old directory stays in use
    jax.config.update("jax_compilation_cache_dir", path)
    _ours = path


def _log(state: tuple[str, ...], message: str, *args: object) -> None:
    """``logger.info`` once per state: repeated calls with the same outcome stay quiet."""
    global _logged
    if state != _logged:
        _logged = state
        logger.info(message, *args)


def enable_compile_cache(setting: CacheSetting = None, *, strict: bool | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on (or off) following the module's policy;
    returns the directory in use, or None. ``strict`` (default: when ``setting`` or
    ``$HART_JAX_COMPILE_CACHE`` names a directory) makes an unusable directory a
    ``HartError``; otherwise it is logged as a warning and the cache stays off. Call it
    before the first compilation whose result should be cached."""
    import jax

    user = jax_configured_dir()
    if user is not None:
        _log(("jax", user), "compile cache: %s (configured through JAX, kept)", user)
        return active_cache_dir()
    if not jax.config.jax_enable_compilation_cache:
        _log(("jax-off",), "compile cache: off (jax_enable_compilation_cache is false, kept)")
        return None
    if setting is None and _ours is not None:
        return active_cache_dir()  # the default keeps this process's earlier choice
    want = requested_dir(setting)
    if want is None:
        if _ours is not None:
            _switch(None)
        _log(("off",), "compile cache: off")
        return None
    if strict is None:
        strict = setting not in (None, True) or os.environ.get(ENV_VAR) is not None
    try:
        check_writable_dir(want)
    except HartError as e:
        if strict:
            raise
        logger.warning("%s; running without a compile cache", e)
        if _ours is not None:
            _switch(None)
        return None
    path = str(want.absolute())
    if path != _ours:
        _switch(path)
    _cache_everything()
    _log(("on", path), "compile cache: %s", path)
    return Path(path)


class CacheEvents:
    """Counts JAX's persistent-cache events while active (a context manager; ``start`` /
    ``stop`` for other scopes): ``requests`` compilations that consulted the cache,
    ``hits`` executables read from it, ``misses`` executables compiled and written to it.
    With no cache directory no hit or miss is counted."""

    def __init__(self) -> None:
        self.requests = self.hits = self.misses = 0
        self._active = False

    def _on_event(self, event: str, **_: object) -> None:
        if event == EVENT_REQUEST:
            self.requests += 1
        elif event == EVENT_HIT:
            self.hits += 1
        elif event == EVENT_MISS:
            self.misses += 1

    def start(self) -> "CacheEvents":
        """Begin counting."""
        if not self._active:
            import jax

            jax.monitoring.register_event_listener(self._on_event)
            self._active = True
        return self

    def stop(self) -> None:
        """Stop counting (the counts stay)."""
        if self._active:
            import jax

            jax.monitoring.unregister_event_listener(self._on_event)
            self._active = False

    def __enter__(self) -> "CacheEvents":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def summary(self) -> str:
        """``from the compile cache`` (every compilation a hit), ``compiled`` (none a hit),
        or ``compiled N, N from the compile cache``."""
        compiled = self.misses if self.requests == 0 else self.requests - self.hits
        if self.hits and not compiled:
            return "from the compile cache"
        if not self.hits:
            return "compiled"
        return f"compiled {compiled}, {self.hits} from the compile cache"

    def as_dict(self) -> dict[str, int]:
        """The counts, for JSON."""
        return {"requests": self.requests, "hits": self.hits, "misses": self.misses}
