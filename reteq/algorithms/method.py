"""What an unlearning method declares, without torch: its name, knobs (defaults and bounds), what it needs from the
shared loop, what its loss sums over, and the words docs/methods.md prints for it.

Each method is a pair, as TRL's `<method>_config.py` + `<method>_trainer.py`: `reteq/algorithms/<name>_config.py`
holds `METHOD = Method(...)` (this module's types only, so planning, config validation and the docs generator
read every method without loading torch), and `reteq/algorithms/<name>.py` holds the loss, entered with
`@implements(METHOD)` (reteq.algorithms.base). The package finds both by that naming (reteq.algorithms).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum


class Need(str, Enum):
    """What a method reads beyond each forget sequence's summed log-prob (which every method gets)."""

    TOKEN_LOGPS = "token_logps"  # per-token log-probs of the response (x.token_logp, x.token_owner)
    LOGITS = "logits"  # full-vocabulary logits at the response positions (x.logits, x.labels)
    REF_LOGPS = "ref_logps"  # summed response log-probs under the start checkpoint (x.ref_seq_logp)
    REF_LOGITS = "ref_logits"  # the start checkpoint's logits at the response positions (x.ref_logits)
    HIDDEN = "hidden"  # hidden states at the response tokens after layer `params["layer"]` (x.hidden)
    RETAIN = "retain"  # a retain batch: the loop adds retain_weight x its NLL (RETAIN_KNOBS say how averaged)
    ALTERNATIVE = "alternative"  # a refusal-style alternative answer per forget prompt (x.alt_seq_logp, ...)


# Knob names become Tune config keys, analysis columns and MLflow params beside these: they cannot be knobs.
RESERVED_KNOBS = frozenset({"model", "order", "p", "algorithm", "lr", "seed", "schedule", "scheduler", "step",
                            "params", "kind", "status", "run_id", "metric", "value"})
RETAIN_WEIGHT = "retain_weight"  # the knob of every method that needs RETAIN (0: the paper's local setting)
# 0: the retain NLL is each retain sequence's token mean, averaged over the step's sequences; 1: the step's
# token mean over all retain tokens (open-unlearning's, one cross-entropy over the batch). Also on every RETAIN
# method.
RETAIN_TOKEN_MEAN = "retain_token_mean"
RETAIN_KNOBS = (RETAIN_WEIGHT, RETAIN_TOKEN_MEAN)
NORMALISATIONS = ("sequence", "token")


@dataclass(frozen=True)
class Knob:
    """One knob: its default (an int default makes it a whole-number knob), the values it accepts, and why.

    `later`: the knob came after leaf keys were recorded; a leaf's params (its key, Tune axis, MLflow params)
    carry it only when set away from its default, so every leaf recorded before it keeps its key."""

    default: float | int
    low: float | None = None  # the smallest value accepted
    high: float | None = None  # the largest
    low_open: bool = False  # `low` itself refused (beta > 0)
    doc: str = ""
    later: bool = False

    @property
    def whole(self) -> bool:
        return isinstance(self.default, int)

    def problem(self, value: float) -> str | None:
        """Why `value` is refused (None: accepted)."""
        if not math.isfinite(value):
            return "must be finite"
        if self.whole and float(value) != int(value):
            return "takes whole numbers"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}"
        return None

    @property
    def range_text(self) -> str:
        """The accepted values as docs/methods.md prints them: "> 0", ">= 0, whole", "0 or 1"."""
        if self.whole and self.low is not None and self.high is not None and self.high - self.low == 1:
            return f"{self.low:g} or {self.high:g}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return ", ".join(parts + (["whole"] if self.whole else [])) or "any"


def flag(doc: str) -> Knob:
    """A 0/1 choice added after keys were recorded; 0, the default, is the behaviour before it existed."""
    return Knob(0, 0, 1, doc=doc, later=True)


def retain_knobs() -> dict[str, Knob]:
    """The knobs of the loop's retain term, which every method that needs RETAIN declares."""
    return {RETAIN_WEIGHT: Knob(0.0, 0.0, doc="weight of the loop's retain NLL (0: the paper's local setting)"),
            RETAIN_TOKEN_MEAN: flag("retain NLL: 0 = mean of per-sequence token means; 1 = the step's token "
                                    "mean (open-unlearning)")}


@dataclass(frozen=True)
class Method:
    """One method's declaration. `formula` and `source` are docs/methods.md's row; `summary` is one line."""

    name: str
    summary: str
    formula: str  # the loss minimised, summed over the unit `normalisation` names (the docs table's notation)
    source: str  # paper and the implementation followed
    knobs: Mapping[str, Knob] = field(default_factory=dict)
    needs: frozenset[Need] = frozenset()
    normalisation: str = "sequence"  # what its loss sums over: "sequence" or "token" (reteq.algorithms.base)
    label: str = ""  # as tables and figures print it ("WGA"); default: the name

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "knobs", dict(self.knobs))
        problem = declaration_problem(self)
        if problem:
            raise ValueError(f"method {self.name!r}: {problem}")

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def defaults(self) -> dict[str, float]:
        """Every knob's default by name: what a leaf's loss reads for a knob its params leave out."""
        return {k: knob.default for k, knob in self.knobs.items()}

    @property
    def needs_reference(self) -> bool:
        return bool(self.needs & {Need.REF_LOGPS, Need.REF_LOGITS})

    @property
    def reads_retain(self) -> bool:
        """Whether the method has a retain term at all (a leaf reads retain data: `reads_retain_at`)."""
        return Need.RETAIN in self.needs

    def reads_retain_at(self, params: Mapping[str, float]) -> bool:
        """Whether a leaf with these knobs reads retain data: a retain term with a positive weight."""
        return self.reads_retain and float(params.get(RETAIN_WEIGHT, 0.0)) > 0

    @property
    def uses_beta(self) -> bool:
        """Whether the legacy `unlearn.betas` grid applies (it is `unlearn.params.<method>.beta`)."""
        return "beta" in self.knobs

    @property
    def default_beta(self) -> float | None:
        knob = self.knobs.get("beta")
        return None if knob is None else knob.default

    def keyed(self, params: Mapping[str, float]) -> dict[str, float]:
        """A leaf's params without the `later` knobs left at their defaults (see Knob)."""
        return {k: v for k, v in params.items()
                if not (k in self.knobs and self.knobs[k].later and v == self.knobs[k].default)}

    def check(self, name: str, values: Iterable[float]) -> str | None:
        """Why a grid of values for knob `name` is refused, as one line naming both (None: accepted)."""
        knob = self.knobs.get(name)
        if knob is None:
            return f"{self.name} has no knob {name!r} (its knobs: {', '.join(self.knobs) or 'none'})"
        values = list(values)
        if not values:
            return f"{self.name}.{name}: give at least one value"
        for v in values:
            problem = knob.problem(float(v))
            if problem:
                return f"{self.name}.{name}: {problem}, got {v:g}"
        return None


def declaration_problem(m: Method) -> str | None:
    """What makes a declaration one the loop could not serve (None: none)."""
    bad = sorted(set(m.knobs) & RESERVED_KNOBS)
    if bad:
        return f"knob name(s) {bad} are reserved (sweep axes and columns)"
    if Need.RETAIN in m.needs and not set(RETAIN_KNOBS) <= set(m.knobs):
        return f"needs a retain batch but lacks the knob(s) {[k for k in RETAIN_KNOBS if k not in m.knobs]}"
    if Need.HIDDEN in m.needs and "layer" not in m.knobs:
        return "needs hidden states but has no 'layer' knob"
    if m.normalisation not in NORMALISATIONS:
        return f"normalisation must be one of {NORMALISATIONS}"
    for k, knob in m.knobs.items():
        problem = knob.problem(knob.default)
        if problem:
            return f"knob {k!r}: its default {knob.default!r} {problem}"
    if not (m.summary and m.formula and m.source):
        return "declare its summary, formula and source (docs/methods.md prints them)"
    return None
