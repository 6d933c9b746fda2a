"""RMU, representation misdirection for unlearning (Li et al., 2024, WMDP): steer the forget responses' hidden
states at one layer towards a fixed random direction scaled up.

    loss = sum_t  (1/H) || h_t - coeff * u ||^2

h_t: the hidden state after layer `layer` (hidden_states[layer], 0 = embeddings) at response token t; u: a fixed
random unit vector (torch.rand with a generator seeded 0, normalised, as the original's torch.rand / norm),
the same for every leaf so all orders aim at one target. Summed over response tokens; the loop divides by the
global batch's response tokens (the original takes each sequence's token mean, then the batch mean).

What differs from the original (and open-unlearning's RMU):
- reteq trains the run's parameters as every other method does (its LoRA adapter, or the full model), not the
  MLP down-projections of the three layers up to the steered one alone;
- the retain term is the loop's NLL on the retain set (`retain_weight`, 0 = the paper's local setting;
  `retain_token_mean` says how it is averaged), not the original's activation matching against the frozen
  model (alpha x MSE to pi_ref's states);
- `layer` defaults to 1 so it is valid on the 2-layer tiny model and on SmolLM2-135M (30 layers): hidden_states
  has layers + 1 entries, and in transformers' Llama-style models the last one is after the final norm. The
  original steers the output of `model.layers.7` of 7B models (hidden_states[8], so `layer: 8` here). `coeff`
  scales with the norm of the hidden states at that layer, so no one value carries across models: the original
  tunes it per model (its Zephyr-7B run: 6.5), open-unlearning's class default is 20. Tune both per model with
  `unlearn.params.rmu`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.rmu_config import METHOD

SEED = 0  # the control direction's seed: fixed, so every leaf (every order) steers towards the same target


@functools.lru_cache(maxsize=8)
def _direction(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    u = torch.rand(size, generator=g, dtype=torch.float64)
    return u / u.norm()


def control_vector(size: int, coeff: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """coeff x the fixed random unit direction of a hidden size (on `like`'s device and dtype when given)."""
    v = coeff * _direction(size)
    return v if like is None else v.to(device=like.device, dtype=like.dtype)


@implements(METHOD)
def rmu(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """RMU: minimise sum_t mean_h (h_t - coeff u)^2 over response tokens' hidden states at `layer`."""
    coeff = knob(params, "coeff", "rmu")
    hidden = required(x.hidden, "hidden states", "rmu")
    target = control_vector(hidden.size(-1), coeff, hidden)
    return (hidden - target).pow(2).mean(-1).sum()
