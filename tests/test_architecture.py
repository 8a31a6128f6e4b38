"""The package's imports go one way: down the layers of docs/architecture.md, with no cycle.

Every import of every module is read from its source (``ast``: at module level, inside functions and under
``if TYPE_CHECKING``; ``import x`` and ``from x import y``, relative ones resolved), and so is what Python
imports implicitly: importing ``slimtorch.quant.config`` runs ``slimtorch/quant/__init__.py`` first. The
layers are defined once, here, and docs/architecture.md must list the same ones.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "slimtorch"

#: bottom to top: a module imports only from its own layer or a lower one
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["slimtorch.errors", "slimtorch.progress", "slimtorch.atomic", "slimtorch.container",
                    "slimtorch.version"]),
    ("configuration", ["slimtorch.config", "slimtorch.select"]),
    ("graph", ["slimtorch.graph"]),
    ("contract", ["slimtorch.masks", "slimtorch.checks"]),
    ("prune", ["slimtorch.prune"]),
    ("compact", ["slimtorch.compact"]),
    ("io and integrations", ["slimtorch.io", "slimtorch.sparse", "slimtorch.integrations"]),
    ("tools", ["slimtorch.recover", "slimtorch.quant", "slimtorch.lowrank", "slimtorch.lora", "slimtorch.export",
               "slimtorch.report", "slimtorch.nn"]),
    ("models and data", ["slimtorch.models", "slimtorch.data"]),
    ("workflows", ["slimtorch.pipeline", "slimtorch.recipes", "slimtorch.compat"]),
    ("entry points", ["slimtorch.cli", "slimtorch.__main__", "slimtorch"]),
]

#: imports inside a function that are allowed: lazy subcommands of the command line (start-up time), and
#: integrations, which import their third-party library (optional) at module level
LAZY_IMPORTERS = ("slimtorch.cli",)
LAZY_TARGETS = ("slimtorch.integrations.",)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the package
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    in_function: bool
    line: int


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            targets = [(f"{base}.{a.name}", ()) if f"{base}.{a.name}" in known else (base, (a.name,))
                       for a in node.names]
        else:
            continue
        for target, names in targets:
            if target == "slimtorch" or target.startswith("slimtorch."):
                found.append(Import(module, target, names, id(node) in inside, node.lineno))
    return found


def all_imports(package: Path = PACKAGE) -> list[Import]:
    found = modules(package)
    return [i for name, path in found.items() for i in imports_of(name, path, set(found))]


Layers = list[tuple[str, list[str]]]


def layer_of(module: str, layers: Layers = LAYERS) -> int:
    """The index of ``module``'s layer: the layer listing the longest prefix of its name (the root package
    only itself: a module missing from the table must not fall into the top layer)."""
    best = None
    for index, (_, members) in enumerate(layers):
        for prefix in members:
            inside = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best[0]


def edges(imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the modules importing it runs: its targets and, before each, the packages above the target
    that are not the importer's own (their ``__init__`` runs first; the root package's runs before anything)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.importer, set()).add(i.target)
        parts = i.target.split(".")
        for n in range(2, len(parts)):
            package = ".".join(parts[:n])
            if not (i.importer == package or i.importer.startswith(package + ".")):
                graph[i.importer].add(package)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (and modules importing themselves)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def unplaced(package: Path = PACKAGE, layers: Layers = LAYERS) -> list[str]:
    found = []
    for module in modules(package):
        try:
            layer_of(module, layers)
        except KeyError:
            found.append(module)
    return found


def upward(imports: list[Import], layers: Layers = LAYERS) -> list[str]:
    return [f"{i.importer}:{i.line} ({layers[layer_of(i.importer, layers)][0]}) imports {i.target} "
            f"({layers[layer_of(i.target, layers)][0]})"
            for i in imports if layer_of(i.target, layers) > layer_of(i.importer, layers)]


def lazy(imports: list[Import]) -> list[str]:
    """Imports inside functions that are neither subcommands of the command line nor integrations."""
    return [f"{i.importer}:{i.line} imports {i.target}" for i in imports if i.in_function
            and not i.importer.startswith(LAZY_IMPORTERS) and not i.target.startswith(LAZY_TARGETS)]


def private(imports: list[Import]) -> list[str]:
    return [f"{i.importer}:{i.line} imports {name} from {i.target}" for i in imports
            for name in i.names if name.startswith("_") and i.target != i.importer]


def test_every_module_has_a_layer() -> None:
    assert unplaced() == []


def test_no_import_cycle() -> None:
    assert cycles(edges(all_imports())) == []


def test_no_import_goes_up_a_layer() -> None:
    assert upward(all_imports()) == []


def test_imports_inside_functions_are_lazy_subcommands_or_integrations() -> None:
    assert lazy(all_imports()) == []


def test_no_private_name_is_imported_from_another_module() -> None:
    assert private(all_imports()) == []


def documented_layers() -> list[tuple[str, list[str]]]:
    """The layer table of docs/architecture.md: rows ``| n | name | `module`, `module` | ... |``."""
    rows = []
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].isdigit():
            rows.append((cells[1], re.findall(r"`([\w.]+)`", cells[2])))
    return rows


def test_docs_list_the_same_layers() -> None:
    short = [(name, [m.removeprefix("slimtorch.") if m != "slimtorch" else "slimtorch" for m in members])
             for name, members in LAYERS]
    assert documented_layers() == short


def test_readme_names_the_layers_of_real_modules() -> None:
    """Each row of the README's "What is where" names its layer and modules that exist in that layer."""
    text = (ROOT / "README.md").read_text().split("## What is where", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d", line)]
    assert rows
    for layer, _, packages, _ in rows:
        low, _, high = layer.partition("-")
        for name in re.findall(r"`([\w.]+)`", packages):
            module = name if name.startswith("slimtorch.") else f"slimtorch.{name}"
            assert module in modules(), (layer, name)
            assert int(low) <= layer_of(module) <= int(high or low), (layer, name)


# -- the checks themselves --------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "slimtorch"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from .a import f\n")
    (root / "sub" / "a.py").write_text("from slimtorch.sub import b\n\ndef f():\n    from ..top import _g\n")
    (root / "sub" / "b.py").write_text("import slimtorch.top\n")
    (root / "top.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                 "    from slimtorch.sub.a import f\n")
    return root


def test_the_import_reader_resolves_every_form(tiny: Path) -> None:
    found = all_imports(tiny)
    read = {m: [(i.target, i.names, i.in_function) for i in found if i.importer == m] for m in modules(tiny)}
    assert read == {
        "slimtorch": [],
        "slimtorch.sub": [("slimtorch.sub.a", ("f",), False)],  # relative, a name from a module
        "slimtorch.sub.a": [("slimtorch.sub.b", (), False), ("slimtorch.top", ("_g",), True)],  # in a function
        "slimtorch.sub.b": [("slimtorch.top", (), False)],
        "slimtorch.top": [("slimtorch.sub.a", ("f",), False)],  # under TYPE_CHECKING
    }
    graph = edges(found)
    assert graph["slimtorch.top"] == {"slimtorch.sub.a", "slimtorch.sub"}  # the package's __init__ runs first
    assert graph["slimtorch.sub.a"] == {"slimtorch.sub.b", "slimtorch.top"}  # (its own package is running)
    assert cycles(graph) == [["slimtorch.sub", "slimtorch.sub.a", "slimtorch.sub.b", "slimtorch.top"]]


def test_each_check_finds_its_violation(tiny: Path) -> None:
    found = all_imports(tiny)
    layers = [("low", ["slimtorch.top"]), ("high", ["slimtorch.sub", "slimtorch"])]
    assert unplaced(tiny, layers[:1]) == ["slimtorch", "slimtorch.sub", "slimtorch.sub.a", "slimtorch.sub.b"]
    assert upward(found, layers) == ["slimtorch.top:4 (low) imports slimtorch.sub.a (high)"]
    assert lazy(found) == ["slimtorch.sub.a:4 imports slimtorch.top"]
    assert private(found) == ["slimtorch.sub.a:4 imports _g from slimtorch.top"]
