"""Exceptions with messages that name the problem (file, key, expected value)."""

from __future__ import annotations

from typing import Sequence


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
