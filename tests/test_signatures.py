"""No function in reteq takes more than 7 parameters (keyword-only ones included; `self` / `cls` not counted)
unless a reason is written beside it: a `# params: <reason>` comment on the line above the `def` or on one of
the lines of its signature. Long argument lists are what the run context and per-algorithm params replace.
"""

from __future__ import annotations

import ast
from pathlib import Path

MAX_PARAMS = 7
MARKER = "# params:"
ROOT = Path(__file__).resolve().parent.parent / "reteq"


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)


def has_reason(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    first = fn.lineno - 1
    last = fn.body[0].lineno - 1  # the signature ends before the body starts
    window = lines[max(first - 1, 0):last]
    return any(MARKER in line and line.split(MARKER, 1)[1].strip() for line in window)


def long_signatures(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = parameter_count(node)
            if n > MAX_PARAMS and not has_reason(node, lines):
                out.append(f"{name}:{node.lineno} {node.name}() takes {n} parameters")
    return out


def test_the_check_counts_keyword_only_parameters_and_reads_the_reason():
    eight = "def f(a, b, c, d, *, e, f, g, h):\n    pass\n"
    assert long_signatures(eight, "x.py") == ["x.py:1 f() takes 8 parameters"]
    assert long_signatures("# params: mirrors torch's signature\n" + eight, "x.py") == []
    assert long_signatures("class C:\n    def m(self, a, b, c, d, e, f, g):\n        pass\n", "x.py") == []
    assert long_signatures("# params:\n" + eight, "x.py") != [], "a marker needs a reason"


def test_no_function_in_reteq_takes_more_than_7_parameters_without_a_reason():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        found += long_signatures(path.read_text(), str(path.relative_to(ROOT.parent)))
    assert not found, "\n".join(found)
