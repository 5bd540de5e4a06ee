"""Exceptions with messages that name the problem (file, key, expected value), and the
command lines' helpers that report them (and usage errors) as one line with status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence


class HartError(Exception):
    """Base class of hart-jax errors that a user can act on."""


class CheckpointError(HartError):
    """A file or directory is missing, truncated, of the wrong format or would be clobbered."""


class ConversionError(HartError):
    """A state dict does not match the model: lists every offending key."""

    def __init__(self, message: str, problems: Sequence[tuple[str, Sequence[str]]] = ()):
        super().__init__(message)
        self.problems = {kind: list(items) for kind, items in problems}

    @classmethod
    def from_report(
        cls, source: str, problems: Sequence[tuple[str, Sequence[str]]], limit: int = 200
    ) -> "ConversionError":
        """One message with a section per kind of problem, every key by name."""
        n = sum(len(items) for _, items in problems)
        lines = [f"{source}: {n} key problem(s) converting to the Flax model:"]
        for kind, items in problems:
            lines.append(f"  {kind}: {len(items)}")
            lines.extend(f"    {it}" for it in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
        return cls("\n".join(lines), problems)


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose argument errors print one ``error: ...`` line and exit 2;
    a subclass may append ``hint`` (e.g. ``" (see --help)"``) to that line."""

    hint: str = ""

    def error(self, message: str) -> NoReturn:
        """Print ``error: <message><hint>`` (no usage block) and exit with status 2."""
        self.exit(2, f"error: {message}{self.hint}\n")


def run_command(action: Callable[[], str]) -> int:
    """Run ``action`` and print its result (status 0), or a ``HartError`` as one
    ``error: ...`` line on stderr (status 2)."""
    try:
        print(action())
    except HartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
