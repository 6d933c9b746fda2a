"""The protocol of a sweep's training and unlearning: how conversations are rendered (ChatConfig) and how S_U is
unlearned (UnlearnConfig), with the authors' constants their defaults follow (docs/fidelity.md). Part of the
sweep config (reteq.config.SweepConfig); every field changes results, so each is in the keys of the runs it
affects.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Literal

from pydantic import Field, field_validator, model_validator

from reteq.algorithms import ALGORITHMS
from reteq.config_files import MAX_BATCH, MAX_EPOCHS, MAX_LENGTH, MAX_STEPS, PositiveFloat
from reteq.config_files import Strict as _Strict

AUTHORS_SYSTEM_PROMPT = "You are a helpful assistant."  # data/convert_format.py, src/unlearn_trainer.py
AUTHORS_UNLEARN_LABEL = "Sorry, I can not assist"  # src/unlearn_trainer.py (the paper prints "... you")
TEMPLATE_DEFAULT_DATE = datetime.date(2024, 7, 26)  # the Llama-3.x templates' own fallback date_string
# The GSM8K user turn of the paper's Appendix F, verbatim (PDF line wraps joined, paragraph breaks kept: every
# paragraph gap of the appendix is the same, one blank line, the one after {question} included);
# a config selects it with `eval.math_prompt: appendix_f`.
APPENDIX_F = "appendix_f"
APPENDIX_F_MATH_PROMPT = (
    "Solve the following math problem.\n"
    "\n"
    "### Problem\n"
    "\n"
    "{question}\n"
    "\n"
    "### Output Requirement\n"
    "\n"
    "Provide a step-by-step explanation of your reasoning as you work through the problem. After your "
    "explanation, output a delimiter line that contains exactly \"####\" (four hash symbols) on a new line. "
    "Then, output only the final numerical answer\u2014nothing else, no extra text, symbols, or units.\n"
    "\n"
    "For example, if the final answer is 42, your output should end with:\n"
    "\n"
    "#### 42"
)


class ChatConfig(_Strict):
    """How every conversation is rendered and which of its tokens carry the loss (docs/fidelity.md).

    All of it changes token ids, so it is part of every stage-node and leaf key and a param of every run.
    """

    date: datetime.date = Field(
        TEMPLATE_DEFAULT_DATE, description="the date chat templates print (Llama-3.x 'Today Date'); fixed so a "
        "prompt renders the same on every day (passed as date_string and strftime_now)")
    system_prompt: str | None = Field(
        AUTHORS_SYSTEM_PROMPT, description="system message added to every training and eval conversation that "
        "has none (the authors' data and eval); null = none (the template's own default applies)")
    label_tokens: Literal["header_body_eot", "body_eot"] = Field(
        "header_body_eot", description="tokens of an assistant turn that carry the loss: header + body + end of "
        "turn (torchtune, the authors' trainer) or body + end of turn")
    template: Literal["hf", "torchtune"] = Field(
        "hf", description="hf = the tokenizer's (instruct sibling's) chat template; torchtune = torchtune's "
        "llama3_tokenizer format, the authors' (Llama-3.x tokenizers only): no 'Cutting Knowledge Date' / "
        "'Today Date' lines, each message's content stripped")


class UnlearnConfig(_Strict):
    algorithms: list[str] = Field(default_factory=lambda: ["ga", "npo", "simnpo"], min_length=1)
    lrs: list[PositiveFloat] = Field(default_factory=lambda: [1e-5], min_length=1)
    betas: dict[str, list[PositiveFloat]] = Field(
        default_factory=dict,
        description="beta grid per algorithm, the same as `params: {<algorithm>: {beta: [...]}}` (kept for "
        "configs written before `params`); unset: each method's default (NPO 0.5, SimNPO 1.0)",
    )
    params: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="each method's knobs as grids, e.g. {wga: {beta: [0.5, 1]}, rmu: {layer: [2], coeff: [20]}}: "
        "every combination is a leaf and a Tune axis; an unset knob takes the method's default "
        "(docs/methods.md lists them)",
    )
    retain_stage: str | None = Field(
        None, description="stage whose conversations form the retain set of methods with a retain term "
        "(graddiff, npo_retain, rmu with retain_weight > 0); default: eval.knowledge_stage")
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="optimizer steps; default: one epoch of the "
                              "forget set")
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    schedule: Literal["wsd", "cosine", "constant"] = "constant"
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="warmup in optimizer steps; overrides warmup_frac "
                                     "(the authors' unlearn config: 5)")
    decay_frac: float = Field(0.0, ge=0, lt=1, description="WSD: fraction of steps in the final linear decay "
                              "(the authors' get_wsd drop_iter: 0.8, i.e. decay from 20% of the steps on)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="WSD decays to this fraction of peak (authors: 0.1)")
    global_batch: int = Field(128, gt=0, le=MAX_BATCH)
    micro_batch: int = Field(8, gt=0, le=MAX_BATCH)
    max_length: int = Field(512, gt=8, le=MAX_LENGTH)
    eval_every: int = Field(1, le=MAX_STEPS, description="evaluate at step 0 and every k optimizer steps")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    loss_normalisation: dict[str, Literal["sequence", "token"]] = Field(
        default_factory=lambda: {"ga": "token", "npo": "sequence", "simnpo": "sequence"},
        description="per algorithm: `sequence` = mean over sequences of the per-sequence loss; `token` = their "
        "sum over the batch's response tokens (authors: GA token-mean, NPO/SimNPO per sequence)")
    schedule_from_grid: bool = Field(
        False, description="with a sweep-level `schedules` grid (Fig. 8), unlearn each leaf with its grid point's "
        "schedule instead of `schedule` (the ablation runs cosine finetuning with cosine unlearning)")
    adapter: Literal["fresh", "continue"] = Field(
        "fresh", description="LoRA for unlearning: `fresh` = merge the finetuned adapter into the weights and "
        "train a new one (the authors' unlearn_trainer); `continue` = keep training the finetuning adapter")

    @field_validator("eval_every")
    @classmethod
    def _eval_every(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(ALGORITHMS))})")
        return names

    @field_validator("loss_normalisation")
    @classmethod
    def _known_normalised(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(ALGORITHMS))
        if unknown:
            raise ValueError(f"unknown algorithm(s) {unknown} (known: {', '.join(sorted(ALGORITHMS))})")
        return v

    @field_validator("params")
    @classmethod
    def _known_knobs(cls, v: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
        for name, grid in v.items():
            alg = ALGORITHMS.get(name)
            if alg is None:
                raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(ALGORITHMS))})")
            for k, values in grid.items():
                problem = alg.check(k, values)  # its knobs, their bounds and whole numbers (reteq.algorithms)
                if problem:
                    raise ValueError(problem)
        return v

    def normalisation(self, algorithm: str) -> str:
        """`sequence` or `token` for this algorithm (unlisted: the method's own, reteq.algorithms)."""
        return self.loss_normalisation.get(algorithm, ALGORITHMS[algorithm].normalisation)

    @model_validator(mode="after")
    def _batches(self) -> UnlearnConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError("global_batch must be a multiple of micro_batch")
        both = sorted(a for a in self.betas if "beta" in self.params.get(a, {}))
        if both:
            raise ValueError(f"betas and params both set beta for {both}: keep one (params)")
        unused = sorted((set(self.params) | set(self.betas)) - set(self.algorithms))
        if unused:
            raise ValueError(f"params/betas name {unused}, which unlearn.algorithms does not sweep")
        return self

    def betas_for(self, algorithm: str) -> list[float | None]:
        """The beta grid of this algorithm ([None] for a method without beta)."""
        if not ALGORITHMS[algorithm].uses_beta:
            return [None]
        grid = self.params.get(algorithm, {}).get("beta") or self.betas.get(algorithm)
        return list(grid or [ALGORITHMS[algorithm].default_beta])

    def knob_grid(self, algorithm: str) -> list[dict[str, float]]:
        """Every combination of this algorithm's knob values, each knob's grid or its default; [{}] for GA.
        Values keep the type of the method's default (RMU's layer is an int); a knob added after keys were
        recorded is left out at its default (reteq.algorithms.method.Knob.later), so those keys are unchanged."""
        method = ALGORITHMS[algorithm]
        defaults = method.defaults
        grids = {k: (self.betas_for(algorithm) if k == "beta" else
                     self.params.get(algorithm, {}).get(k) or [d]) for k, d in defaults.items()}
        return [method.keyed({k: type(defaults[k])(v) for k, v in zip(grids, combo)})
                for combo in itertools.product(*grids.values())]
