"""The supported JAX / flax range in pyproject.toml is exactly the span CI's two pin sets prove."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIN_FILES = ("requirements.txt", "requirements-py312.txt")  # CI leg 1, leg 2


def pins(name: str) -> dict[str, str]:
    """``{package: version}`` of a requirements file's ``pkg==version`` lines."""
    out = {}
    for line in (REPO / name).read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*(#.*)?", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@pytest.mark.parametrize("package", ["jax", "jaxlib", "flax"])
def test_pyproject_range_is_what_ci_pins(package):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{package}\b(?![-_])", d))
    lo, hi = re.fullmatch(rf"{package}>=([\d.]+),<=([\d.]+)", spec).groups()
    pinned = sorted((pins(f)[package] for f in PIN_FILES), key=version_key)
    assert [lo, hi] == [pinned[0], pinned[-1]], (spec, pinned)


def test_both_legs_pin_the_same_packages():
    assert pins(PIN_FILES[0]).keys() == pins(PIN_FILES[1]).keys()
