"""Loading is not converting: runtime modules never import the converters.

Every module of ``hart_jax`` outside ``hart_jax/convert/`` (pipeline, prompts, sampling,
training, data, builtin model, ...) reads converted directories through
``hart_jax.checkpoint`` and ``hart_jax.loading``. The only imports of ``hart_jax.convert``
allowed there are the documented convert-on-load entry points in ``EXCEPTIONS``; and the
converters never import the pipeline (they take what they write from ``hart_jax.loading``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hart_jax"

# (module, enclosing function or None for module level) -> hart_jax.convert modules it may import.
EXCEPTIONS = {
    # Explicit conversion of a release tokenizer directory on load.
    ("hart_jax/tokenizer.py", "from_release"): {"hart_jax.convert.tokenizer"},
    # LPIPS weights exist only as torch files (lpips' vgg.pth + torchvision's VGG16): reading them converts.
    ("hart_jax/models/lpips.py", None): {"hart_jax.convert.table", "hart_jax.convert.torch_io"},
}


def _imports(path: Path) -> list[tuple[str | None, str]]:
    """``(enclosing function or None, imported name)`` for every import in ``path``
    (``from a.b import c`` gives ``a.b.c``)."""
    found: list[tuple[str | None, str]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((func, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.extend((func, f"{child.module}.{a.name}") for a in child.names)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), None)
    return found


def _modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_runtime_modules_do_not_import_the_converters():
    runtime = [p for p in _modules(PACKAGE) if p.relative_to(PACKAGE).parts[0] != "convert"]
    named = {_rel(p) for p in runtime}
    assert {"hart_jax/pipeline.py", "hart_jax/prompts.py", "hart_jax/sampling.py", "hart_jax/train/loop.py"} <= named
    bad = []
    for path in runtime:
        for func, module in _imports(path):
            if not _is_within(module, "hart_jax.convert"):
                continue
            allowed = EXCEPTIONS.get((_rel(path), func), set())
            if not any(_is_within(module, a) for a in allowed):
                bad.append(f"{_rel(path)} ({func or 'module level'}): {module}")
    assert not bad, "runtime code imports the converters:\n" + "\n".join(bad)


def test_exceptions_are_still_needed():
    """Every documented exception names an import that exists (no stale allowances)."""
    for (rel, func), allowed in EXCEPTIONS.items():
        imported = [m for f, m in _imports(PACKAGE.parent / rel) if f == func]
        for a in allowed:
            assert any(_is_within(m, a) for m in imported), f"{rel} ({func or 'module level'}) no longer imports {a}"


def test_converters_do_not_import_the_pipeline():
    bad = [
        f"{_rel(p)}: {m}"
        for p in _modules(PACKAGE / "convert")
        for _, m in _imports(p)
        if _is_within(m, "hart_jax.pipeline")
    ]
    assert not bad, "converters import the pipeline:\n" + "\n".join(bad)
