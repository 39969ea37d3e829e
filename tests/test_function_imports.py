"""No import statement inside a function, except of an optional third-party dependency.

Function-level imports of herbens modules hid import cycles (issue 21); the layers are now
checked by import-linter (tests/test_import_graph.py), which only sees what the graph shows, so
every herbens import must be at a module's top. Optional dependencies (extras a user may not
have installed) stay lazy so the rest of herbens imports without them; each such import carries
a comment on its line or the line above saying why.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "herbens"

# Extras in setup.cfg (onnx, clip, faiss) and heavy packages used by one optional path only.
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "open_clip", "faiss", "pyarrow", "tensorboard"}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement inside a function of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                found += [(inner.lineno, alias.name) for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom):
                found.append((inner.lineno, "." * inner.level + (inner.module or "")))
    return sorted(set(found))


def has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line or the line above it."""
    return "#" in lines[lineno - 1] or lines[lineno - 2].strip().startswith("#")


def offending_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, module in function_level_imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{lineno} {module}"
            if top not in OPTIONAL:
                bad.append(where + " (import it at the module's top)")
            elif not has_reason(lines, lineno):
                bad.append(where + " (say why it is lazy in a comment)")
    return bad


def test_function_level_imports_are_optional_dependencies_only():
    bad = offending_imports()
    assert not bad, f"{len(bad)} function-level imports:\n" + "\n".join(bad)


def test_the_walker_finds_nested_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    def g():\n        from . import x\n"
                      "    import herbens.core.errors\n")
    assert function_level_imports(source) == [(5, "."), (6, "herbens.core.errors")]
