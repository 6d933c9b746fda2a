"""The torch side of every unlearning method: what a loss receives (`MethodInputs`), what it returns, and the
registry of losses (`implements`); what a method declares lives without torch in reteq.algorithms.method.

A method is a loss over one micro-batch of the forget set, `loss(x: MethodInputs, params) -> scalar`, that
returns the micro-batch's SUM of per-unit losses (a unit is a sequence or a response token, as the method
says); the loop divides by the global batch's sequences or response tokens (`UnlearnConfig.loss_normalisation`,
defaulting to the method's own `normalisation`), so accumulation and data parallelism give one big batch's
gradient. `params` holds every one of the method's knobs by name (a leaf's own values over the defaults), each
one a Tune axis (`unlearn.params`).

A method declares what it `needs` (the `Need` flags) and gets exactly that: the loop computes no full-vocabulary
logits, reference pass, hidden states, retain or alternative batch that no swept method asks for. Reference
quantities (`REF_LOGPS`, `REF_LOGITS`) are computed once per leaf from its start checkpoint, before the first
step, and looked up by example (reteq.train.reference); open-unlearning runs a reference model every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from reteq.algorithms.method import Method


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
    alt_mean_tokens: float | None = None  # alternatives' mean length over the whole step (all micro-batches)

    @classmethod
    def of_sequences(cls, seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor | None = None) -> MethodInputs:
        """Inputs of a sequence-level method from summed log-probs alone (tests, benchmarks, the theory's
        linear model, whose "log-prob" is a negative squared error)."""
        return cls(seq_logp, torch.ones_like(seq_logp, dtype=torch.long), ref_seq_logp=ref_seq_logp)


LossFn = Callable[[MethodInputs, Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Algorithm(Method):
    """A declared method with its loss: what the training loop runs."""

    loss: LossFn


LOSSES: dict[str, Algorithm] = {}  # filled as reteq.algorithms.load_losses imports each method's loss module


def implements(method: Method) -> Callable[[LossFn], LossFn]:
    """Enter `fn` as the loss of the declared `method`; a second loss for one method is an error."""

    def deco(fn: LossFn) -> LossFn:
        known = LOSSES.get(method.name)
        if known is not None and _origin(known.loss) != _origin(fn):  # a module reloaded registers its own again
            raise ValueError(f"algorithm {method.name!r} is already implemented by {_origin(known.loss)}; "
                             f"{_origin(fn)} must declare another method")
        LOSSES[method.name] = Algorithm(**{f.name: getattr(method, f.name) for f in fields(method)}, loss=fn)
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
        raise ValueError(f"{algorithm} needs {what}: declare it in its METHOD (needs=...)")
    return value


def per_sequence(token_values: torch.Tensor, owner: torch.Tensor, sequences: int) -> torch.Tensor:
    """Sum token values into their sequences: (N,) -> (B,)."""
    return torch.zeros(sequences, dtype=token_values.dtype, device=token_values.device).index_add(
        0, owner, token_values)
