"""Layers point down: every module of reteq imports only from its own layer or below, and no import cycle
exists inside reteq. Imports are read with `ast` (module level and inside functions, TYPE_CHECKING blocks and
literal `importlib.import_module("reteq...")` calls included), so a lazy import cannot hide an upward edge.
The layer table is the one in reteq/__init__.py and the README.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "reteq"

# bottom to top; a module belongs to the layer whose prefix matches it (longest prefix wins). No prefix matches
# everything: the package itself ("reteq", its __init__) matches only itself, so a new module that no row names
# fails test_every_module_has_a_layer instead of landing in the top layer unchecked.
ROOT_PACKAGE = "reteq"
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("reteq.environment", "reteq.hardware", "reteq.errors", "reteq.redact", "reteq.resources", "reteq.tracking", "reteq.digest", "reteq.workdir", "reteq.model_files",
                    "reteq.mlflow_store",
                    "reteq.algorithms")),
    ("config", ("reteq.config_files", "reteq.config_protocol", "reteq.config", "reteq.hub_pins")),
    ("data", ("reteq.data",)),
    ("compute", ("reteq.models", "reteq.gguf", "reteq.tiny", "reteq.train", "reteq.eval")),
    ("pipeline", ("reteq.plan", "reteq.estimate", "reteq.pipeline")),
    ("execution", ("reteq.sweep",)),
    ("measures", ("reteq.analysis.gaps", "reteq.analysis.section")),  # shared by theory and analysis
    ("theory", ("reteq.theory",)),
    ("analysis", ("reteq.analysis",)),
    ("commands", ("reteq.commands", "reteq.cli", "reteq.__main__", ROOT_PACKAGE)),
]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The reteq module an imported name lives in (`reteq.a.b.func` -> `reteq.a.b`), or None outside reteq."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every reteq module `name` imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]  # `from pkg import mod` imports pkg.mod
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for n in names:
            target = _target(n, modules)
            if target is not None and target != name:
                found.add(target)
    return found


@functools.cache
def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; [] when acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            matches = module == p or (p != ROOT_PACKAGE and module.startswith(p + "."))
            if matches and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS (and to the README's table)"
    return rank


def test_the_cycle_finder_finds_a_cycle_and_the_graph_reader_sees_lazy_imports(tmp_path):
    pkg = tmp_path / "reteq"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from reteq.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from reteq.c import g\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('reteq.a')\ndef g(): ...\n")
    graph = import_graph(pkg)
    assert graph["reteq.a"] == {"reteq.sub.b"} and graph["reteq.sub.b"] == {"reteq.c"}
    assert cycles(graph) == [["reteq.a", "reteq.c", "reteq.sub.b"]]
    (pkg / "c.py").write_text("def g(): ...\n")
    import_graph.cache_clear()
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycle_inside_reteq():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_a_module_no_row_names_has_no_layer():
    """The guard rail can fail: the package root is no catch-all prefix."""
    assert LAYERS[layer_of("reteq")][0] == "commands"
    with pytest.raises(AssertionError, match="is in no layer"):
        layer_of("reteq.brand_new_module")


@pytest.mark.parametrize("module", sorted(module_files()))
def test_imports_point_down(module):
    graph = import_graph()
    mine = layer_of(module)
    upward = sorted(f"{t} ({LAYERS[layer_of(t)][0]})" for t in graph[module] if layer_of(t) > mine)
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports from a higher layer: {', '.join(upward)}"
