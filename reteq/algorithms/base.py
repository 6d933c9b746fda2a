"""The registry every unlearning method enters, and what a method can ask the shared loop for.

A method is a loss over one micro-batch of the forget set, `loss(x: MethodInputs, params) -> scalar`, that
returns the micro-batch's SUM of per-unit losses (a unit is a sequence or a response token, as the method
says); the loop divides by the global batch's sequences or response tokens (`UnlearnConfig.loss_normalisation`,
defaulting to the method's own `normalisation`), so accumulation and data parallelism give one big batch's
gradient. `params` holds the method's knobs by name, each one a Tune axis (`unlearn.params`).

A method declares what it `needs` (the `Need` flags) and gets exactly that: the loop computes no full-vocabulary
logits, reference pass, hidden states, retain or alternative batch that no swept method asks for. Reference
quantities (`REF_LOGPS`, `REF_LOGITS`) are computed once per leaf from its start checkpoint, before the first
step, and looked up by example (reteq.train.reference); open-unlearning runs a reference model every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch


class Need(str, Enum):
    """What a method reads beyond each forget sequence's summed log-prob (which every method gets)."""

    TOKEN_LOGPS = "token_logps"  # per-token log-probs of the response (x.token_logp, x.token_owner)
    LOGITS = "logits"  # full-vocabulary logits at the response positions (x.logits, x.labels)
    REF_LOGPS = "ref_logps"  # summed response log-probs under the start checkpoint (x.ref_seq_logp)
    REF_LOGITS = "ref_logits"  # the start checkpoint's logits at the response positions (x.ref_logits)
    HIDDEN = "hidden"  # hidden states at the response tokens after layer `params["layer"]` (x.hidden)
    RETAIN = "retain"  # a retain batch: the loop adds retain_weight x its token-mean NLL per sequence
    ALTERNATIVE = "alternative"  # a refusal-style alternative answer per forget prompt (x.alt_seq_logp, ...)


@dataclass
class MethodInputs:
    """One forget micro-batch as a method sees it; a field is None unless the method needs it.

    Token-level fields are flat over the micro-batch's response tokens in one fixed order; `token_owner[k]` is
    the sequence (0..B-1, the order of `seq_logp`) token k belongs to, and a sequence's tokens are contiguous.
    """

    seq_logp: torch.Tensor  # (B,) summed response log-prob of each forget sequence
    seq_tokens: torch.Tensor  # (B,) its number of response tokens
    token_logp: torch.Tensor | None = None  # (N,) log p(y_t | prefix) of every response token
    token_owner: torch.Tensor | None = None  # (N,)
    labels: torch.Tensor | None = None  # (N,) the response token ids
    logits: torch.Tensor | None = None  # (N, V) the logits that predict them
    ref_seq_logp: torch.Tensor | None = None  # (B,)
    ref_logits: torch.Tensor | None = None  # (N, V)
    hidden: torch.Tensor | None = None  # (N, H) hidden states at the response tokens
    alt_seq_logp: torch.Tensor | None = None  # (B,) summed log-prob of each prompt's alternative answer
    alt_seq_tokens: torch.Tensor | None = None  # (B,)
    ref_alt_seq_logp: torch.Tensor | None = None  # (B,) the same under the start checkpoint

    @classmethod
    def of_sequences(cls, seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor | None = None) -> MethodInputs:
        """Inputs of a sequence-level method from summed log-probs alone (tests, benchmarks, the theory's
        linear model, whose "log-prob" is a negative squared error)."""
        return cls(seq_logp, torch.ones_like(seq_logp, dtype=torch.long), ref_seq_logp=ref_seq_logp)


LossFn = Callable[[MethodInputs, Mapping[str, float]], torch.Tensor]
# Knob names become Tune config keys, analysis columns and MLflow params beside these: they cannot be knobs.
RESERVED_KNOBS = frozenset({"model", "order", "p", "algorithm", "lr", "seed", "schedule", "scheduler", "step",
                            "params", "kind", "status", "run_id", "metric", "value"})
RETAIN_WEIGHT = "retain_weight"  # the knob of every method that needs RETAIN (0: the paper's local setting)


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss: LossFn
    defaults: Mapping[str, float] = field(default_factory=dict)  # its knobs and their default values
    needs: frozenset[Need] = frozenset()
    normalisation: str = "sequence"  # what its loss sums over: "sequence" or "token" (see module docstring)
    source: str = ""  # paper and reference implementation, for docs/methods.md
    summary: str = ""
    label: str = ""  # as tables and figures print it ("WGA"); default: the name

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def needs_reference(self) -> bool:
        return bool(self.needs & {Need.REF_LOGPS, Need.REF_LOGITS})

    @property
    def uses_beta(self) -> bool:
        """Whether the legacy `unlearn.betas` grid applies (it is `unlearn.params.<method>.beta`)."""
        return "beta" in self.defaults

    @property
    def default_beta(self) -> float | None:
        return self.defaults.get("beta")

    @property
    def knobs(self) -> tuple[str, ...]:
        return tuple(self.defaults)


ALGORITHMS: dict[str, Algorithm] = {}


# params: the method's name, then what it declares: knobs, needs, normalisation, source, label
def register(name: str, *, defaults: Mapping[str, float] | None = None, needs: set[Need] | frozenset = frozenset(),
             normalisation: str = "sequence", source: str = "", label: str = "") -> Callable[[LossFn], LossFn]:
    """Enter a loss into the registry under `name`; a second method under a taken name is an error."""
    knobs = dict(defaults or {})
    bad = sorted(set(knobs) & RESERVED_KNOBS)
    if bad:
        raise ValueError(f"algorithm {name!r}: knob name(s) {bad} are reserved (sweep axes and columns)")
    if Need.RETAIN in needs and RETAIN_WEIGHT not in knobs:
        raise ValueError(f"algorithm {name!r} needs a retain batch but has no {RETAIN_WEIGHT!r} knob")
    if Need.HIDDEN in needs and "layer" not in knobs:
        raise ValueError(f"algorithm {name!r} needs hidden states but has no 'layer' knob")
    if normalisation not in ("sequence", "token"):
        raise ValueError(f"algorithm {name!r}: normalisation must be 'sequence' or 'token'")

    def deco(fn: LossFn) -> LossFn:
        known = ALGORITHMS.get(name)
        if known is not None and _origin(known.loss) != _origin(fn):  # a module reloaded registers its own again
            raise ValueError(f"algorithm {name!r} is already registered by {_origin(known.loss)}; "
                             f"{_origin(fn)} must use another name")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        ALGORITHMS[name] = Algorithm(name, fn, knobs, frozenset(needs), normalisation, source, summary, label)
        return fn

    return deco


def _origin(fn: LossFn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def knob(params: Mapping[str, float], name: str, algorithm: str) -> float:
    """A method's knob from its params, or a clear error naming both."""
    value = params.get(name)
    if value is None:
        raise ValueError(f"{algorithm} needs {name}")
    return float(value)


def required(value: torch.Tensor | None, what: str, algorithm: str) -> torch.Tensor:
    """An input the method declared; None means the loop was not asked for it (a registration bug)."""
    if value is None:
        raise ValueError(f"{algorithm} needs {what}: declare it in its register(needs=...)")
    return value


def per_sequence(token_values: torch.Tensor, owner: torch.Tensor, sequences: int) -> torch.Tensor:
    """Sum token values into their sequences: (N,) -> (B,)."""
    return torch.zeros(sequences, dtype=token_values.dtype, device=token_values.device).index_add(
        0, owner, token_values)
