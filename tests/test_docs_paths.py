"""The docs name only modules that exist, so they cannot silently drift from the code.

Every `herbens/...py` path (and `herbens/.../` folder) and every dotted `herbens.x.y` name in
README.md and docs/*.md must exist in the tree: a dotted name resolves to its longest module
prefix (a .py file or a package), and what is left must be a name bound at the top level of that
module (a def, class, assignment or import), then, for a class, an attribute defined in its body.
Checked from the source with `ast`, so nothing is imported.

docs/ARCHITECTURE.md's layout drawing lists every module of the package exactly once, under the
layer `.importlinter` puts it in, with the layers in `.importlinter`'s order.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PATH = re.compile(r"(?<![\w./-])herbens/(?:[A-Za-z0-9_]+/)*(?:[A-Za-z0-9_]+\.py\b)?")
DOTTED = re.compile(r"(?<![\w./-])herbens(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(document, mention) pairs, one per distinct mention in each document."""
    found = []
    for doc in DOCS:
        for name in sorted(set(pattern.findall(doc.read_text(encoding="utf-8")))):
            found.append((doc.relative_to(ROOT).as_posix(), name))
    return found


def module_file(parts: list[str]) -> Path | None:
    """The source file of the module `parts` names, or None when there is no such module."""
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@lru_cache(maxsize=None)
def top_level(source: Path) -> dict[str, ast.AST]:
    """Every name bound at the top level of a module, with the node that binds it."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        for name in bound_names(node):
            names[name] = node
    return names


def bound_names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    if isinstance(node, ast.Assign):
        return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, (ast.If, ast.Try)):
        inner = [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
        return [name for child in inner for name in bound_names(child)]
    return []


def class_attributes(node: ast.ClassDef) -> set[str]:
    """Names a class body binds, plus `self.x` attributes its methods assign."""
    names = {name for child in node.body for name in bound_names(child)}
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Store):
            if isinstance(child.value, ast.Name) and child.value.id == "self":
                names.add(child.attr)
    return names


def missing_part(dotted: str) -> str | None:
    """Why `dotted` names nothing in the tree, or None when it resolves."""
    parts = dotted.split(".")
    cut = max(i for i in range(1, len(parts) + 1) if module_file(parts[:i]) is not None)
    rest = parts[cut:]
    if not rest:
        return None
    module = ".".join(parts[:cut])
    node = top_level(module_file(parts[:cut])).get(rest[0])
    if node is None:
        return f"{module} has no module or top-level name {rest[0]!r}"
    if len(rest) > 1 and isinstance(node, ast.ClassDef) and rest[1] not in class_attributes(node):
        return f"{module}.{rest[0]} has no attribute {rest[1]!r}"
    return None


def test_the_docs_mention_modules():
    # A pattern that stopped matching would make the tests below pass vacuously.
    assert len(mentions(PATH)) > 20 and len(mentions(DOTTED)) > 10


@pytest.mark.parametrize("doc, path", mentions(PATH))
def test_every_herbens_path_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} mentions {path}, which is not in the tree"


@pytest.mark.parametrize("doc, dotted", mentions(DOTTED))
def test_every_dotted_herbens_name_exists(doc, dotted):
    problem = missing_part(dotted)
    assert problem is None, f"{doc} mentions {dotted}: {problem}"


def test_the_checks_catch_stale_names():
    assert missing_part("herbens.predict") is not None
    assert missing_part("herbens.ensemble.combine.ensemble_runs") is not None
    assert missing_part("herbens.bundle.load.Bundle.names_rows") is not None
    assert missing_part("herbens.ensemble.combine.Params.from_json") is None
    assert missing_part("herbens.data.taxonomy.LEVELS") is None
    assert not (ROOT / "herbens/engine.py").exists()


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
LAYOUT_HEADING = "## Layout"


def layout_drawing() -> list[str]:
    """The lines of the first fenced block after the layout heading."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = text[text.index(LAYOUT_HEADING):].split("```")[1]
    return block.strip("\n").splitlines()


def drawn_modules(lines: list[str]) -> list[tuple[str, str]]:
    """(layer, module path under herbens/) for each module the drawing lists.

    `== layer ==` lines open a layer; a `name/` line opens a folder at its indentation (two
    spaces a level); the `.py` names a line starts with are modules of the innermost folder.
    """
    layer, folders, found = "", [], []
    for line in lines:
        if line.startswith("=="):
            layer = line.strip("= ")
            folders = []
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        words = line.split()
        if not words:
            continue
        folders = folders[:depth]
        if words[0].endswith("/"):
            folders.append(words[0].rstrip("/"))
            continue
        for word in words:
            if not re.fullmatch(r"\w+\.py", word):
                break
            found.append((layer, "/".join([*folders, word])))
    return found


def importlinter_layers() -> list[str]:
    text = (ROOT / ".importlinter").read_text(encoding="utf-8")
    block = text.split("layers =", 1)[1].split("\n")
    layers = []
    for line in block[1:]:
        if not line.startswith((" ", "\t")) or not line.strip():
            break
        layers.append(" ".join(line.split()))
    return layers


def layer_members(layer: str) -> set[str]:
    return {name.strip() for name in re.split(r"[|:]", layer)}


def test_the_layout_drawing_has_the_importlinter_layers_in_order():
    drawn = [line.strip("= ") for line in layout_drawing() if line.startswith("==")]
    assert drawn == importlinter_layers()


def test_the_layout_drawing_lists_every_module_once_in_its_layer():
    drawn = drawn_modules(layout_drawing())
    paths = [path for _, path in drawn]
    assert len(paths) == len(set(paths)), "a module is drawn twice"
    tree = {p.relative_to(ROOT / "herbens").as_posix() for p in (ROOT / "herbens").rglob("*.py")}
    # A package's __init__.py may be drawn (when it does a job of its own) but need not be.
    required = {p for p in tree if not p.endswith("__init__.py")}
    assert sorted(set(paths) - tree) == [], "drawn in docs/ARCHITECTURE.md but not in herbens/"
    assert sorted(required - set(paths)) == [], "in herbens/ but not drawn: add one line for it to the layout in docs/ARCHITECTURE.md"
    for layer, path in drawn:
        top = path.split("/")[0].removesuffix(".py")
        assert top in layer_members(layer), f"{path} is drawn under {layer!r}"


def test_drawn_modules_reads_folders_and_several_names_a_line():
    lines = ["== a | b ==", "a.py   job", "b/", "  c.py  d.py", "  e/", "    f.py  job g.py", "  h.py  job"]
    assert drawn_modules(lines) == [("a | b", "a.py"), ("a | b", "b/c.py"), ("a | b", "b/d.py"),
                                    ("a | b", "b/e/f.py"), ("a | b", "b/h.py")]
