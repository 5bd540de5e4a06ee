"""One dimension alphabet: docs/design.md's glossary, each module's legend, every shape suffix.

Pure text / AST checks (no JAX). The rules are the ones stated in the glossary section
("Dimension names") of docs/design.md:
  * the glossary is a table of ``| `X` | name | meaning |`` rows, one character per letter;
  * a module's legend is the paragraph that starts with ``Dimensions:`` in its docstring:
    ``;``-separated entries ``<letter> <name ...>``, each letter in the glossary and each
    entry starting with that letter's glossary name;
  * an identifier ``<stem>_<suffix>`` (variable, argument, attribute, call keyword) whose stem
    holds a lowercase letter and whose last ``_``-part is letters/digits with at least one
    uppercase letter is a shape suffix; each of its letters must be in the module's legend
    (digits are literal sizes).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hart_jax"
DESIGN = ROOT / "docs" / "design.md"

# The modules whose arrays carry shape suffixes.
COVERED = sorted(
    [*PKG.glob("models/*.py"), *PKG.glob("layers/*.py"), *PKG.glob("kernels/*.py"), *PKG.glob("train/*.py")]
    + [PKG / n for n in ("attention.py", "diffusion.py", "sampling.py", "tokenizer.py", "pipeline.py")]
)

# Suffixed names that must keep their spelling, with the reason (each must still exist).
KEPT = {
    ("models/transformer.py", "scale_mul_1H11"): "Flax parameter name (a checkpoint key): 1 x heads x 1 x 1",
}

_ROW = re.compile(r"^\|\s*`(?P<letter>[^`]+)`\s*\|\s*(?P<name>[^|]+?)\s*\|\s*(?P<meaning>[^|]*?)\s*\|\s*$")
_SUFFIX_PART = re.compile(r"^[A-Za-z0-9]+$")


def glossary(text: str | None = None) -> dict[str, str]:
    """letter -> name, from the table of the "## Dimension names" section."""
    text = DESIGN.read_text() if text is None else text
    section = text.split("## Dimension names", 1)[1].split("\n## ", 1)[0]
    out: dict[str, str] = {}
    for line in section.splitlines():
        m = _ROW.match(line.strip())
        if m:
            letter = m["letter"]
            assert len(letter) == 1 and letter.isalpha(), f"glossary letter {letter!r} is not one letter"
            assert letter not in out, f"glossary letter {letter!r} defined twice"
            out[letter] = m["name"]
    return out


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the ``;`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return parts + ["".join(cur)]


def legend(source: str) -> dict[str, str] | None:
    """letter -> meaning from the module docstring's ``Dimensions:`` paragraph (None: none)."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s*Dimensions(?: \([^)]*\))?:\s*(.*)$", line)
        if m is None:
            continue
        para = [m[1]]
        for nxt in lines[i + 1 :]:
            if not nxt.strip():
                break
            para.append(nxt.strip())
        out: dict[str, str] = {}
        for entry in _split_top_level(" ".join(para)):
            entry = entry.strip().rstrip(".").strip()
            if not entry:
                continue
            letter, _, meaning = entry.partition(" ")
            if len(letter) != 1 or letter in out:
                raise ValueError(f"legend entry {entry!r}: one new letter, a space, its meaning")
            out[letter] = meaning.strip()
        return out
    return None


def shape_suffix(identifier: str) -> str | None:
    """The shape suffix of ``identifier`` under the glossary's rule, else None."""
    stem, sep, last = identifier.rpartition("_")
    if not sep or not re.search(r"[a-z]", stem) or not _SUFFIX_PART.match(last):
        return None
    return last if re.search(r"[A-Z]", last) else None


def identifiers(source: str) -> set[str]:
    """Names the module binds or reads: variables, arguments, attributes, call keywords."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
    return out


def problems(rel: str, source: str, gloss: dict[str, str]) -> list[str]:
    """Every violation of the rules in one module's source."""
    errs: list[str] = []
    try:
        leg = legend(source)
    except ValueError as e:
        return [f"{rel}: {e}"]
    for letter, meaning in (leg or {}).items():
        if letter not in gloss:
            errs.append(f"{rel}: legend letter {letter!r} is not in the glossary")
        elif not meaning.lower().startswith(gloss[letter].lower()):
            errs.append(f"{rel}: legend {letter!r} {meaning!r} does not start with its name {gloss[letter]!r}")
    for ident in sorted(identifiers(source)):
        suffix = shape_suffix(ident)
        if suffix is None or (rel, ident) in KEPT:
            continue
        if leg is None:
            errs.append(f"{rel}: {ident} has a shape suffix but the module has no Dimensions legend")
            continue
        bad = sorted({c for c in suffix if not c.isdigit() and c not in leg})
        if bad:
            errs.append(f"{rel}: {ident}: {''.join(bad)} not in the module's legend")
    return errs


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def test_glossary_parses_one_letter_one_name():
    gloss = glossary()
    assert len(gloss) >= 20
    assert {"B", "L", "C", "D", "A", "H", "W"} <= set(gloss)
    assert gloss["D"] == "head dim" and gloss["A"] == "heads"


@pytest.mark.parametrize("path", COVERED, ids=_rel)
def test_module_legend_and_suffixes_follow_the_glossary(path: Path):
    assert problems(_rel(path), path.read_text(), glossary()) == []


def test_kept_names_still_exist():
    for (rel, ident), why in KEPT.items():
        assert ident in identifiers((PKG / rel).read_text()), f"{rel}: {ident} ({why}) is gone: drop it from KEPT"


def test_rule_catches_bad_suffixes_and_ignores_words():
    gloss = glossary()
    src = '"""Doc.\n\nDimensions: B batch; L tokens; C channels.\n"""\n'
    ok = src + "def f(x_BLC, use_bias, n_B, MAX_LEN, _Static, attn_l2_norm):\n    y_B1C = x_BLC\n"
    assert problems("m.py", ok, gloss) == []
    assert problems("m.py", src + "x_BSD = 1\n", gloss) == ["m.py: x_BSD: DS not in the module's legend"]
    assert problems("m.py", src + "f(q_BLHD=1)\n", gloss) == ["m.py: q_BLHD: DH not in the module's legend"]
    assert problems("m.py", src + "self.h_BLq = 1\n", gloss) == ["m.py: h_BLq: q not in the module's legend"]
    assert problems("m.py", '"""Dimensions: B batch; Hi, Wi image side."""', gloss) == [
        "m.py: legend entry 'Hi, Wi image side': one new letter, a space, its meaning"
    ]
    assert problems("m.py", "x_BL = 1\n", gloss) == ["m.py: x_BL has a shape suffix but the module has no Dimensions legend"]
    bad_legend = '"""Doc.\n\nDimensions: B batch; D hidden size; Y foo.\n"""\n'
    errs = problems("m.py", bad_legend, gloss)
    assert any("'D'" in e and "head dim" in e for e in errs) and any("'Y' is not in the glossary" in e for e in errs)
