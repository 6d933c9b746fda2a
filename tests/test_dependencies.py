"""What may be installed: pyproject's floors stay above the versions with published advisories, and the pinned
lock (what `make install` installs) satisfies them (docs/security.md; the hashes: tests/test_lock.py)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# package -> the first version past its advisories (issue 30: transformers 5.0-5.9, ray 2.50-2.53, mlflow < 3.13;
# torch < 2.6: CVE-2025-32434, torch.load(weights_only=True) could still run code, and reteq's checkpoint
# loading rests on weights_only=True)
FIXED_IN = {"transformers": "5.10", "ray": "2.54", "mlflow": "3.13", "torch": "2.6"}


def _requirements() -> dict[str, Requirement]:
    text = (ROOT / "pyproject.toml").read_text()  # [project] dependencies (no tomllib on Python 3.10)
    deps = re.findall(r'^\s+"([^"]+)",', text[text.index("dependencies = ["):text.index("]\n", text.index("dependencies = ["))], re.M)
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_floors_exclude_every_version_with_an_advisory():
    reqs = _requirements()
    for name, fixed in FIXED_IN.items():
        floor = min(Version(s.version) for s in reqs[name].specifier if s.operator == ">=")
        assert floor >= Version(fixed), f"pyproject admits {name} {floor} < {fixed}"
        assert Version(fixed) in reqs[name].specifier


def test_the_lock_satisfies_the_floors():
    reqs = _requirements()
    locks = "".join((ROOT / f).read_text() for f in ("requirements.lock", "requirements-nodeps.lock"))
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", locks, re.M))
    for name in FIXED_IN:
        assert Version(pins[name]) in reqs[name].specifier, (name, pins[name])
    assert "auth" in reqs["mlflow"].extras  # the cluster's tracking server runs MLflow's basic-auth app
