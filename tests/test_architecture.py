"""The layers of ``docs/architecture.md``, read from the source: who may import whom, and the size of functions.

Static checks (the ``ast`` of every module under ``src/stemst``), so they run in a second and see lazy imports
inside functions as well as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stemst"
#: private top-level modules: helpers every layer may use; they import only each other
BASE = "base"
#: the layer of each package and what it may import (besides itself); the command line and the package root may
#: import everything
ALLOWED = {
    BASE: {BASE},
    "metrics": {BASE},
    "model": {BASE, "metrics"},
    "io": {BASE},
    "datasets": {BASE, "io"},
    "pp": {BASE, "io"},
    "tl": {BASE, "io", "pp", "model", "metrics"},
    "pl": {BASE, "io", "pp", "tl", "metrics"},
}
TOP = {"_cli", "__init__", "__main__"}
#: data containers the engine (and the shared helpers it uses) never touch
CONTAINERS = {"anndata", "spatialdata", "scanpy", "squidpy"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """``stemst.tl._fit`` -> ``tl``; ``stemst._schema`` -> ``base``; the root, CLI and ``__main__`` -> ``top``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if (SRC / parts[1]).is_dir():
        return parts[1]
    return "top" if parts[1] in TOP else BASE


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names, relative ones resolved), anywhere in the file, with its line."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names if name.startswith("stemst")]
    return out


def _files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for path in _files():
        own = _layer(_module_name(path))
        if own == "top":
            continue
        for name, line in _imports(path):
            if name.startswith("stemst.") and (SRC / name.split(".")[1]).exists() or name.startswith("stemst._"):
                target = _layer(name)
                if target not in ALLOWED[own] | {own} and not (target == "top" and name == "stemst"):
                    wrong.append(f"{path.relative_to(SRC)}:{line} ({own}) imports {name} ({target})")
            elif name == "stemst":
                wrong.append(f"{path.relative_to(SRC)}:{line} imports the package root")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_the_engine_and_the_shared_helpers_it_uses_have_no_data_containers():
    """``stemst.model`` is arrays and torch: it never imports AnnData, SpatialData, scanpy or squidpy, and nor do
    the shared modules it imports, except under ``TYPE_CHECKING`` or inside a function it does not call."""
    wrong = []
    for path in [*sorted((SRC / "model").glob("*.py")), SRC / "_spatial.py", SRC / "_early_stopping.py"]:
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        scope = ast.walk(tree) if path.parent.name == "model" else iter(top)
        for node in scope:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                wrong += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in CONTAINERS]
    assert not wrong


def test_nothing_reaches_into_the_private_modules_of_pp_or_tl_from_below():
    """The private modules of ``pp`` and ``tl`` are theirs: only the layers above (and the CLI) may use them."""
    wrong = []
    for path in _files():
        own = _layer(_module_name(path))
        for name, line in _imports(path):
            parts = name.split(".")
            if (
                len(parts) > 2
                and parts[1] in ("pp", "tl")
                and parts[2].startswith("_")
                and own not in (parts[1], "top")
            ):
                if not (own == "pl" and parts[1] == "tl") and not (own == "tl" and parts[1] == "pp"):
                    wrong.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not wrong


def test_the_architecture_layer_table_names_every_package():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED)
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    for package in packages:
        assert f"`stemst.{package}`" in doc, package


#: the size limits of the code (issue 21): function bodies without their docstring
MAX_BODY_LINES = 100
MAX_COMPLEXITY = 20


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_is_longer_than_100_lines():
    long = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_BODY_LINES:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert not long, long


def test_no_function_is_above_mccabe_20():
    radon = pytest.importorskip("radon.complexity", reason="radon is not installed (a development tool)")
    complex_ = []
    for path in _files():
        for block in radon.cc_visit(path.read_text()):
            if block.complexity > MAX_COMPLEXITY:
                complex_.append(f"{path.relative_to(SRC)}:{block.lineno} {block.name} ({block.complexity})")
    assert not complex_, complex_


def test_fit_has_at_most_15_parameters():
    import inspect

    import stemst

    params = inspect.signature(stemst.tl.fit).parameters.values()
    assert len([p for p in params if p.kind is not p.VAR_KEYWORD]) <= 15
