"""One home per concern, kept by grep: only reteq/mlflow_store.py builds an MlflowClient or points MLflow at
a store, only reteq/tracking.py spells MLflow's parent-run tag, and only reteq/environment.py sets a process
environment variable or reads one of reteq's own RETEQ_* variables. A stray in any other module fails here,
naming the file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "reteq"

HOMES = {
    "MLflow clients and the tracking URI": (re.compile(r"MlflowClient\(|set_tracking_uri"), "mlflow_store.py"),
    "MLflow's parent-run tag": (re.compile(r"mlflow\.parentRunId"), "tracking.py"),
    "process environment writes": (
        re.compile(r"environ\[[^]]+\]\s*=[^=]|environ\.(setdefault|update|pop|clear)\(|putenv|unsetenv"),
        "environment.py"),
    "RETEQ_* variable reads": (re.compile(r"(environ|getenv).*RETEQ_"), "environment.py"),
}


def strays(pattern: re.Pattern, home: str, root: Path = ROOT) -> list[str]:
    """`file:line` of every match of `pattern` in reteq/ outside `home` (comments and docstrings included: a
    name spelled out in prose is how the next copy starts)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() == home:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                out.append(f"{path.relative_to(root.parent)}:{i}: {line.strip()}")
    return out


@pytest.mark.parametrize("concern", sorted(HOMES))
def test_one_home(concern):
    pattern, home = HOMES[concern]
    found = strays(pattern, home)
    assert not found, f"{concern} belong in reteq/{home} only:\n" + "\n".join(found)


def test_the_grep_finds_a_stray(tmp_path):
    (tmp_path / "mlflow_store.py").write_text("mlflow.MlflowClient(uri)\n")
    (tmp_path / "elsewhere.py").write_text("x = 1\nc = MlflowClient(uri)\n")
    pattern, home = HOMES["MLflow clients and the tracking URI"]
    assert [s.split(":")[1] for s in strays(pattern, home, tmp_path)] == ["2"]
    (tmp_path / "env.py").write_text('import os\nos.environ["A"] = "1"\nos.environ.setdefault("B", "2")\n'
                                     'ok = os.environ["A"] == "1"\nos.environ.get("RETEQ_X")\n')
    pattern, home = HOMES["process environment writes"]
    assert [s.split(":")[1] for s in strays(pattern, home, tmp_path)] == ["2", "3"]
    pattern, home = HOMES["RETEQ_* variable reads"]
    assert [s.split(":")[1] for s in strays(pattern, home, tmp_path)] == ["5"]

