"""``train.py``'s command line: absl flags (``--config FILE:PRESET``, ``--workdir``,
``--config.SECTION.KEY=VALUE`` overrides) with one-line errors (status 2, no traceback) for
an unknown preset, a misspelled override (with a suggestion), bad data or checkpoints, and
a ``--help`` that lists the presets.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from hart_jax.errors import HartError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train.py"
PROG = "train.py"


class UsageError(HartError):
    """A command-line mistake (unknown preset, misspelled override, missing flag)."""


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def config_value(argv: Sequence[str]) -> str | None:
    """The ``--config`` flag's value in ``argv`` (``None`` when absent)."""
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in ("--config=", "-config="):
            if a.startswith(prefix):
                return a[len(prefix):]
    return None


def presets_in(path: str | Path) -> tuple[str, ...]:
    """The ``PRESETS`` tuple of a config file, read without importing it (empty if it has none)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
            try:
                return tuple(ast.literal_eval(node.value))
            except ValueError:
                return ()
    return ()


def help_text(config_file: str | Path = DEFAULT_CONFIG) -> str:
    """Usage, the flags, and the presets of ``config_file`` with its description of them."""
    main_doc = (sys.modules["__main__"].__doc__ or "").strip() if "__main__" in sys.modules else ""
    cfg_doc = ""
    try:
        cfg_doc = ast.get_docstring(ast.parse(Path(config_file).read_text())) or ""
    except (OSError, SyntaxError):
        pass
    lines = [
        main_doc or f"python {PROG} --config configs/train.py:PRESET --workdir DIR [--config.SECTION.KEY=VALUE ...]",
        "",
        "Flags:",
        "  --config FILE:PRESET        training config file and preset (required)",
        "  --workdir DIR               run directory: checkpoints, TensorBoard, config.json (required)",
        "  --config.SECTION.KEY=VALUE  override one config value (e.g. --config.train.num_steps=100)",
        "",
        f"Presets in {config_file}: {', '.join(presets_in(config_file)) or '(none listed)'}",
    ]
    if cfg_doc:
        lines += ["", cfg_doc]
    return "\n".join(lines)


def _load_config(spec: str) -> Any:
    path, _, preset = spec.partition(":")
    if not Path(path).is_file():
        raise UsageError(f"--config: no such file {path}")
    presets = presets_in(path)
    if preset and presets and preset not in presets:
        close = difflib.get_close_matches(preset, presets, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"--config: unknown preset {preset!r} in {path} ({hint}presets: {', '.join(presets)})")
    mod_spec = importlib.util.spec_from_file_location("hart_jax_train_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
        return module.get_config(preset) if preset else module.get_config()
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--config {spec}: {str(e).splitlines()[0]}") from None


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for a in argv:
        for prefix in ("--config.", "--noconfig.", "-config.", "-noconfig."):
            if a.startswith(prefix):
                keys.append(a[len(prefix):].split("=", 1)[0])
    return keys


def check_args(argv: Sequence[str]) -> None:
    """``UsageError`` (one line) for a missing ``--config`` / ``--workdir``, an unknown preset,
    or an override naming no config field (with the closest field as a suggestion)."""
    spec = config_value(argv)
    if spec is None:
        raise UsageError("--config FILE:PRESET is required (e.g. --config configs/train.py:tiny_t2i; see --help)")
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
        raise UsageError("--workdir DIR is required (see --help)")
    config = _load_config(spec)
    for key in _override_keys(argv):
        node, walked = config, []
        for part in key.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                close = difflib.get_close_matches(part, fields, n=1)
                where = ".".join(walked) or "the config"
                if close:
                    hint = f"; did you mean --config.{'.'.join(walked + close)}?"
                elif fields:
                    hint = f"; {where} has: {', '.join(fields)}"
                else:
                    hint = f"; {where} is a value, not a section"
                raise UsageError(f"--config.{key}: {where} has no field {part!r}{hint}")
            node, walked = node[part], walked + [part]


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "training config file[:preset]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, config)")


def _run(argv: Sequence[str]) -> None:
    del argv
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = flags.FLAGS.config
    task = str(config.get("task", "transformer"))
    if task == "tokenizer":
        from hart_jax.train.tokenizer_loop import train_tokenizer as train
    elif task == "transformer":
        from hart_jax.train.loop import train
    else:
        _fail(f"unknown task {task!r} (expected 'transformer' or 'tokenizer')")
    from hart_jax.train.run_control import TrainingDiverged

    try:
        last = train(config, flags.FLAGS.workdir)
    except TrainingDiverged as e:
        print(f"{PROG}: TrainingDiverged: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except (HartError, ValueError) as e:
        _fail(str(e))
    if last and not last.get("preempted"):
        print(f"done at step {last['step']}: loss {last['loss']:.4f}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``train.py``: checks, then absl's flag parsing, then training."""
    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in args):
        print(help_text((config_value(args) or str(DEFAULT_CONFIG)).partition(":")[0]))
        raise SystemExit(0)
    try:
        check_args(args)
    except UsageError as e:
        _fail(str(e))
    from absl import app, flags

    _define_flags()

    def parse(a: list[str]) -> list[str]:
        try:
            return flags.FLAGS(a)
        except flags.Error as e:
            _fail(str(e).splitlines()[0])
        except (ValueError, KeyError, AttributeError, OSError) as e:  # config loading / overrides
            _fail(str(e).strip("'\"").splitlines()[0])

    app.run(_run, argv=argv, flags_parser=parse)
