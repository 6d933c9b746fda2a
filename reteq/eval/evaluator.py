"""The paper's metrics for one model along unlearning, built once per path and run at every eval step.

forget/label_logp       mean per-token log p(eval.unlearn_label | forget question)
forget/paraphrase_logp  same, averaged over the 19 paraphrases
forget/all_logp         mean over the 20 targets;  forget/score = all_logp(0) - all_logp(t)
utility/tofu_logp       mean per-token log p(knowledge answer | question);  utility/tofu = 1 - |change|
utility/math_acc        accuracy of sampled answers;  utility/math = acc(t) - acc(0)
re/logp_mse, re/kl      distance to the retrain node theta_r on the probe set (reteq.eval.probe), when set
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch

from reteq import tracking as T
from reteq.config import EvalConfig
from reteq.data.forget_targets import PARAPHRASES
from reteq.data.rcu import rcu_rows
from reteq.data.tokenize import encode_prompt_target
from reteq.eval.generation import Decoding
from reteq.eval.math import accuracy, generate_answers
from reteq.eval.probe import Probe
from reteq.eval.samples import sample_hash, stratified_indices
from reteq.eval.scoring import score_pairs


def _first_turn(conv: dict) -> tuple[str, str]:
    msgs = conv["messages"]
    user = next(m["content"] for m in msgs if m["role"] == "user")
    answer = next(m["content"] for m in msgs if m["role"] == "assistant")
    return user, answer


@dataclass
class Evaluator:
    cfg: EvalConfig
    tokenizer: object
    forget_questions: list[str] = field(default_factory=list)
    knowledge_pairs: list[tuple[str, str]] = field(default_factory=list)
    math_items: list[tuple[str, str]] = field(default_factory=list)
    seed: int = 0
    depth_rows: list[dict[str, str]] = field(default_factory=list)  # Section 4.3: prompt + R/C/U responses
    probe: Probe | None = None  # retrain equivalence: prediction vectors and re/* (reteq.eval.probe)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per metric group, summed over calls

    @property
    def forget_targets(self) -> tuple[str, ...]:
        """The unlearn label (first) and its paraphrases: the forget score's targets."""
        return (self.cfg.unlearn_label, *PARAPHRASES)

    def sample_hashes(self) -> dict[str, str]:
        """Content hashes of the eval samples (forget questions + targets, knowledge pairs, math items)."""
        return {"forget": sample_hash([self.forget_questions, list(self.forget_targets)]),
                "knowledge": sample_hash(self.knowledge_pairs), "math": sample_hash(self.math_items)}

    @classmethod
    def build(cls, cfg: EvalConfig, tokenizer, forget_convs: list[dict], knowledge_convs: list[dict] | None,
              math_items: list[tuple[str, str]] | None, seed: int = 0) -> Evaluator:
        knowledge_convs = knowledge_convs or []
        forget_idx = stratified_indices([c.get("group") for c in forget_convs], cfg.forget_prompts,
                                        cfg.sample_seed)
        know_idx = stratified_indices([c.get("group") for c in knowledge_convs], cfg.knowledge_prompts,
                                      cfg.sample_seed)
        forget_q = [_first_turn(forget_convs[i])[0] for i in forget_idx]
        know = [_first_turn(knowledge_convs[i]) for i in know_idx]
        depth = []
        if "depth" in cfg.metrics:
            depth = rcu_rows()
        return cls(cfg, tokenizer, forget_q if "forget" in cfg.metrics else [],
                   know if "tofu" in cfg.metrics else [], (math_items or []) if "math" in cfg.metrics else [], seed,
                   depth)

    @cached_property
    def _forget_pairs(self) -> list:
        """(prompt ids, target ids) of every forget question x target, encoded once per evaluator."""
        return [encode_prompt_target(self.tokenizer, q, t) for q in self.forget_questions for t in self.forget_targets]

    @cached_property
    def _knowledge_pairs(self) -> list:
        return [encode_prompt_target(self.tokenizer, q, a) for q, a in self.knowledge_pairs]

    def raw(self, model, device: torch.device, dtype: str = "fp32", step: int | None = None,
            last: int | None = None) -> dict[str, float]:
        """Absolute metrics of `model` now (no reference to step 0); `step` labels the probe vectors kept. With
        `last` (the run's last step), only the groups eval.schedule has due at `step` run; without, all."""
        out: dict[str, float] = {}

        def due(group: str) -> bool:
            return last is None or step is None or self.cfg.schedule.due(group, step, last)

        pad = self.tokenizer.pad_token_id
        if self.probe is not None and due("re"):
            with self._timer("re"):
                out.update(self.probe.measure(model, device, dtype, step))
        if self.forget_questions and due("forget"):
            with self._timer("forget"):
                f = torch.tensor(score_pairs(model, self._forget_pairs, pad_id=pad, batch_size=self.cfg.batch_size,
                                             device=device, dtype=dtype)).view(-1, len(self.forget_targets))
            out[T.M_FORGET_LABEL] = float(f[:, 0].mean())
            out[T.M_FORGET_PARAPHRASE] = float(f[:, 1:].mean())
            out[T.M_FORGET_ALL] = float(f.mean())
        if self.knowledge_pairs and due("tofu"):
            with self._timer("tofu"):
                scores = score_pairs(model, self._knowledge_pairs, pad_id=pad, batch_size=self.cfg.batch_size, device=device,
                                     dtype=dtype)
            out[T.M_TOFU_LOGP] = float(torch.tensor(scores).mean())
        if self.depth_rows and due("depth"):
            with self._timer("depth"):
                out.update(self._depth(model, device, dtype))
        if self.math_items and due("math"):
            with self._timer("math"):
                decoding = Decoding(samples=self.cfg.math_samples, greedy=self.cfg.greedy,
                                    temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens,
                                    batch_size=self.cfg.batch_size, seed=self.seed, dtype=dtype)
                prompts = [self.cfg.math_prompt.replace("{question}", q) for q, _ in self.math_items]
                answers = generate_answers(model, self.tokenizer, prompts, decoding, device)
            out[T.M_MATH_ACC] = accuracy(answers, [r for _, r in self.math_items])
        return out

    @contextmanager
    def _timer(self, group: str) -> Iterator[None]:
        """Add the block's wall seconds to `seconds[group]` (the leaf's time split, logged as time/* metrics)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[group] = self.seconds.get(group, 0.0) + time.perf_counter() - start

    def _depth(self, model, device, dtype) -> dict[str, float]:
        """Mean per-token log-prob of R, C and U given their shared prompt (superficial vs deep forgetting)."""
        keys = {"R": T.M_DEPTH_R, "C": T.M_DEPTH_C, "U": T.M_DEPTH_U}
        pairs = [encode_prompt_target(self.tokenizer, r["prompt"], r[k]) for k in keys for r in self.depth_rows]
        scores = torch.tensor(score_pairs(model, pairs, pad_id=self.tokenizer.pad_token_id,
                                          batch_size=self.cfg.batch_size, device=device, dtype=dtype))
        per = scores.view(len(keys), -1).mean(-1).tolist()
        return {metric: per[i] for i, metric in enumerate(keys.values())}


def relative(raw: dict[str, float], raw0: dict[str, float]) -> dict[str, float]:
    """Add the step-0-relative scores (forget score, utilities) to a raw metric dict."""
    out = dict(raw)
    if T.M_FORGET_ALL in raw:
        out[T.M_FORGET_SCORE] = raw0[T.M_FORGET_ALL] - raw[T.M_FORGET_ALL]
    if T.M_TOFU_LOGP in raw:
        out[T.M_TOFU_UTILITY] = 1.0 - abs(raw[T.M_TOFU_LOGP] - raw0[T.M_TOFU_LOGP])
    if T.M_MATH_ACC in raw:
        out[T.M_MATH_UTILITY] = raw[T.M_MATH_ACC] - raw0[T.M_MATH_ACC]
    return out
