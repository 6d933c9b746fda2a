"""Local unlearning methods, each a pair of small files found by name (docs/methods.md lists them):

    reteq/algorithms/<name>_config.py   METHOD = Method(...): knobs, needs, normalisation, docs row (no torch)
    reteq/algorithms/<name>.py          @implements(METHOD) def <loss>(x: MethodInputs, params) -> scalar

`ALGORITHMS` holds every declaration, read without torch (planning, config validation, analysis, the docs
generator); `get_algorithm(name)` gives the declaration with its loss, importing the loss modules on first use
(the training side). Adding a method is adding its two files (and its test): nothing here names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from reteq.algorithms.method import RETAIN_TOKEN_MEAN, RETAIN_WEIGHT, Knob, Method, Need

if TYPE_CHECKING:  # the losses import torch; this module must not (a planning process loads no torch)
    from reteq.algorithms.base import Algorithm

__all__ = ["ALGORITHMS", "RETAIN_TOKEN_MEAN", "RETAIN_WEIGHT", "Knob", "Method", "Need", "get_algorithm",
           "load_losses"]

SUFFIX = "_config"


def discover(path: list[str] = __path__, package: str = __name__) -> dict[str, Method]:
    """Every `<name>_config.py` module's METHOD in a package (this one unless told), by name; its name must be
    the module's."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.endswith(SUFFIX):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        method = getattr(module, "METHOD", None)
        stem = info.name[: -len(SUFFIX)]
        if not isinstance(method, Method) or method.name != stem:
            raise ValueError(f"{module.__file__}: declare METHOD = Method({stem!r}, ...)")
        found[stem] = method
    return found


ALGORITHMS: dict[str, Method] = discover()


def load_losses() -> dict[str, Algorithm]:
    """Import each declared method's loss module (`<name>.py`, which imports torch) and return the registry of
    declarations with their losses; a declaration without a loss is an error naming its file."""
    base = importlib.import_module(f"{__name__}.base")
    for name in ALGORITHMS:
        importlib.import_module(f"{__name__}.{name}")
    missing = sorted(set(ALGORITHMS) - set(base.LOSSES))
    if missing:
        raise ValueError(f"reteq/algorithms/{missing[0]}.py: no @implements(METHOD) loss for {missing[0]!r}")
    return base.LOSSES


def get_algorithm(name: str) -> Algorithm:
    """The method `name` with its loss (loads torch)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(ALGORITHMS))})")
    return load_losses()[name]
