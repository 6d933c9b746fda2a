"""The house rules of reteq's source, read with `ast` (nothing is imported, so these run in a second):

- one error root: every public exception class reteq defines derives (by name, inside reteq) from ReteqError;
- short signatures: at most MAX_LONG functions take more than MAX_PARAMS parameters;
- few lazy imports, each with a reason: at most MAX_LAZY imports inside functions, each with a comment on its
  line or on the line(s) directly above it;
- every Ray entry point in one module: `@ray.remote`, `ray.remote(...)`, `.remote(...)`, `ray.get`, `ray.wait`,
  `ray.put`, a TorchTrainer and a Tune Tuner / trainable appear in reteq/sweep/remote.py only (and in the Section
  3 theory grid, reteq/theory/grid.py, a Tune program of its own above the sweep's layer), so the rest of the
  sweep is plain functions a reader follows with grep.

Each guard has a test that plants a violation in a throwaway tree and sees the guard catch it.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "reteq"

MAX_PARAMS = 7  # parameters of one function, self/cls not counted
MAX_LONG = 4  # functions allowed over MAX_PARAMS
MAX_LAZY = 60  # imports inside functions (59 before `reteq tables` added its verb; 128 before #31.6, 87 before #31.1, 82 before the last pass; the goal is 60)
RAY_HOMES = ("reteq/sweep/remote.py", "reteq/theory/grid.py")  # where Ray entry points may be
RAY_CALLS = {("ray", "get"), ("ray", "wait"), ("ray", "put"), ("ray", "remote"), ("tune", "Tuner"),
             ("tune", "with_parameters"), ("tune", "with_resources")}


def _trees(root: Path) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return ""


def _is_std_exception(name: str) -> bool:
    obj = getattr(builtins, name, None)
    if isinstance(obj, type):
        return issubclass(obj, BaseException)
    return name.endswith(("Error", "Exception"))  # a third-party base (yaml.YAMLError and the like)


def exceptions_outside_the_root(root: Path = ROOT) -> list[str]:
    """`path:line Name` for each public exception class under `root` that does not derive from ReteqError."""
    bases: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for path, tree in _trees(root).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, []).extend(_base_name(b) for b in node.bases)
                where.setdefault(node.name, f"{path.relative_to(root.parent)}:{node.lineno}")

    def reaches(name: str, goal, seen: frozenset = frozenset()) -> bool:
        if name in seen:
            return False
        if goal(name):
            return True
        return any(reaches(b, goal, seen | {name}) for b in bases.get(name, ()) if b)

    def is_exception(name: str) -> bool:
        return reaches(name, lambda n: n not in bases and _is_std_exception(n))

    return sorted(f"{where[n]} {n}" for n in bases
                  if not n.startswith("_") and n != "ReteqError" and is_exception(n)
                  and not reaches(n, lambda m: m == "ReteqError"))


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def long_signatures(root: Path = ROOT) -> list[str]:
    out = []
    for path, tree in _trees(root).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _param_count(node) > MAX_PARAMS:
                out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({_param_count(node)})")
    return sorted(out)


def lazy_imports(root: Path = ROOT) -> list[tuple[str, bool]]:
    """(`path:line`, has a reason) for each import statement inside a function. The reason is a comment on
    the import's line, or on the line(s) directly above it inside the same function; one comment may cover a
    block of consecutive imports."""
    out: dict[str, bool] = {}
    for path, tree in _trees(root).items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
            import_lines = {i for n in imports for i in range(n.lineno, (n.end_lineno or n.lineno) + 1)}
            for node in imports:
                key = f"{path.relative_to(root.parent)}:{node.lineno}"
                if key in out:
                    continue  # an import in a nested function is seen from the outer one too
                reason = any("#" in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1))
                line = node.lineno - 1  # 1-based: the line above
                while not reason and line > fn.lineno:  # the lines between the def and the import
                    if lines[line - 1].strip().startswith("#"):
                        reason = True
                    elif line not in import_lines:  # another import of the same block: its comment covers this
                        break
                    line -= 1
                out[key] = reason
    return sorted(out.items())


def _dotted(node: ast.expr) -> tuple[str, ...]:
    """`a.b.c` -> ("a", "b", "c"); () for anything that is not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return ()


def ray_entry_points(root: Path = ROOT, homes: tuple[str, ...] = RAY_HOMES) -> list[str]:
    """`path:line what` for each Ray entry point outside `homes`: a call of `X.remote(...)` (a task, an actor, an
    actor method), `ray.get/wait/put/remote`, `TorchTrainer(...)`, `tune.Tuner/with_parameters/with_resources`,
    and a `@ray.remote` decorator. Read with ast: docstrings and comments may name them freely."""
    out = []
    for path, tree in _trees(root).items():
        where = path.relative_to(root.parent).as_posix()
        if where in homes:
            continue
        for node in ast.walk(tree):
            found = ""
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if isinstance(node.func, ast.Attribute) and node.func.attr == "remote":
                    found = ".remote("
                elif name[-2:] in RAY_CALLS or (name and name[-1] == "TorchTrainer"):
                    found = ".".join(name[-2:]) + "("
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if any(_dotted(d.func if isinstance(d, ast.Call) else d)[-2:] == ("ray", "remote")
                       for d in node.decorator_list):
                    found = f"@ray.remote {node.name}"
            if found:
                out.append(f"{where}:{node.lineno} {found}")
    return sorted(out)


# --- the guards -------------------------------------------------------------------------------------------------


def test_every_public_exception_derives_from_reteq_error():
    assert exceptions_outside_the_root() == []


def test_few_functions_take_more_than_seven_parameters():
    found = long_signatures()
    assert len(found) <= MAX_LONG, "\n".join(found)


def test_few_lazy_imports_and_each_says_why():
    found = lazy_imports()
    assert len(found) <= MAX_LAZY, f"{len(found)} imports inside functions (at most {MAX_LAZY})"
    unexplained = [where for where, reason in found if not reason]
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)


def test_every_ray_entry_point_is_in_sweep_remote():
    found = ray_entry_points()
    assert not found, "Ray entry points outside reteq/sweep/remote.py:\n" + "\n".join(found)


# --- the guards can fail --------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "reteq"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_exception_guard_sees_a_stray_root(tmp_path):
    root = _tree(tmp_path, {
        "errors.py": "class ReteqError(Exception): ...\nclass BadInput(ReteqError): ...\n",
        "a.py": "from reteq.errors import BadInput\nclass Fine(BadInput, ValueError): ...\n"
                "class Stray(RuntimeError): ...\nclass _Private(Exception): ...\nclass NotAnError: ...\n"
                "class Child(Stray): ...\n",
    })
    assert sorted(x.split()[-1] for x in exceptions_outside_the_root(root)) == ["Child", "Stray"]


def test_the_signature_guard_counts_parameters(tmp_path):
    root = _tree(tmp_path, {"a.py": "def f(a, b, c, d, e, f, g): ...\n"
                                    "class C:\n    def m(self, a, b, c, d, e, f, g): ...\n"
                                    "def g(a, b, c, d, e, f, *, g, h): ...\n"
                                    "def h(a, *args, **kwargs): ...\n"})
    assert [x.split()[1] for x in long_signatures(root)] == ["g"]


def test_the_lazy_import_guard_wants_a_reason(tmp_path):
    root = _tree(tmp_path, {"a.py": "import os\n\n"
                                    "def f():\n    # lazy: keeps torch out\n    import torch\n    import numpy\n"
                                    "    from x import (\n        a,\n        b,\n    )\n    return 1\n\n"
                                    "def g():\n    import json  # lazy: a cycle\n\n"
                                    "def h():\n    x = 1\n    import torch\n\n"
                                    "# a comment outside\ndef k():\n    import yaml\n"})
    assert dict(lazy_imports(root)) == {"reteq/a.py:5": True, "reteq/a.py:6": True, "reteq/a.py:7": True,
                                        "reteq/a.py:14": True, "reteq/a.py:18": False, "reteq/a.py:22": False}


def test_the_ray_guard_sees_entry_points_outside_remote(tmp_path):
    root = _tree(tmp_path, {
        "sweep/remote.py": "import ray\n@ray.remote\ndef task(): ...\nray.get(task.remote())\n",
        "sweep/nodes.py": '"""node_task.remote(settings) and ray.get(ref), in prose only."""\nimport ray\n'
                          "from ray import tune\nfrom ray.train.torch import TorchTrainer\n"
                          "@ray.remote(num_cpus=1)\ndef t(): ...\n"
                          "def f(actor, refs):\n    actor.submit.remote(1)\n    ray.wait(refs)\n"
                          "    ray.put(1)\n    tune.Tuner(f)\n    TorchTrainer(f)\n    ray.get_runtime_context()\n",
    })
    assert {x.split(" ", 1)[1] for x in ray_entry_points(root, ("reteq/sweep/remote.py",))} == {
        "@ray.remote t", ".remote(", "ray.wait(", "ray.put(", "tune.Tuner(", "TorchTrainer("}
