"""Prediction vectors for Retrain Equivalence: a fixed probe set, scored per pair, and the distance to theta_r.

The paper's RE distance (Definition 2.1) is d(theta_u, theta_r) = mean over test points of
||Pred(theta_u, x) - Pred(theta_r, x)||^2. For a language model reteq uses two Preds on one fixed probe set:
  s(x)    the per-token mean log-prob of the pair's target   -> re/logp_mse = mean_x (s_u(x) - s_r(x))^2
  pi(.|x) the teacher-forced next-token distribution at every target position
                                                             -> re/kl = mean over positions KL(pi_u || pi_r)
theta_r's distributions are computed ONCE per leaf (from the retrain checkpoint) and kept in memory; only
per-pair numbers (score, mean KL, the target-token log-probs) are kept per eval step and stored as a small
Parquet artifact, never full vocabulary distributions (docs/retrain_equivalence.md).

The probe set depends only on the config (stage data, eval.probe_size, eval.probe_seed), so every run of a
sweep scores the same pairs in the same order: runs can be compared pair by pair (path divergence).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from reteq import tracking as T
from reteq.data.forget_targets import UNLEARN_LABEL
from reteq.data.tokenize import encode_prompt_target
from reteq.train.logprobs import accepts_logits_to_keep
from reteq.train.precision import autocast

MAX_TARGET_TOKENS = 32  # a probe target is scored on its first 32 tokens (answers can be long; cost stays flat)
MAX_PROMPT_TOKENS = 256  # longer prompts keep their last 256 tokens
FORGET_LABEL_SOURCE = "forget_label"  # forget questions with the unlearn label as target
HELDOUT_SOURCE = "heldout"  # held-out math questions with their reference answer line
FLOAT16_ABOVE = 1 << 26  # theta_r log-distributions with more elements are kept in float16 (paper-scale vocab)


def _first_turn(conv: dict) -> tuple[str, str]:
    msgs = conv["messages"]
    return (next(m["content"] for m in msgs if m["role"] == "user"),
            next(m["content"] for m in msgs if m["role"] == "assistant"))


def probe_pairs(size: int, seed: int, stages: dict[str, list[dict]], forget_stage: str,
                heldout: list[tuple[str, str]], label: str = UNLEARN_LABEL) -> list[tuple[str, str, str]]:
    """(source, prompt, target) triples: an even, seeded share from each stage's data, the forget questions
    (target: the unlearn label) and held-out math questions (target: '#### <answer>')."""
    pools: dict[str, list[tuple[str, str]]] = {name: [_first_turn(c) for c in convs] for name, convs in
                                               stages.items()}
    if forget_stage in stages:
        pools[FORGET_LABEL_SOURCE] = [(q, label) for q, _ in pools[forget_stage]]
    if heldout:
        pools[HELDOUT_SOURCE] = [(q, f"#### {ref}") for q, ref in heldout]
    pools = {k: v for k, v in pools.items() if v}
    if not pools:
        return []
    share, extra = divmod(size, len(pools))
    out = []
    for i, (name, pool) in enumerate(pools.items()):
        k = min(len(pool), share + (i < extra))
        rng = random.Random(f"probe-{seed}-{name}")
        out.extend((name, *pool[j]) for j in sorted(rng.sample(range(len(pool)), k)))
    return out


def probe_digest(triples: list[tuple[str, str, str]]) -> str:
    return hashlib.sha256(json.dumps(triples, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class ProbeOutput:
    token_logps: list[torch.Tensor]  # per pair: log p(target token | prefix), shape (T_i,)
    token_kl: list[torch.Tensor] | None = None  # per pair: KL(pi_model || pi_ref) per target position
    dists: list[torch.Tensor] | None = None  # per pair: log pi(. | prefix) at target positions, (T_i, V)

    @property
    def scores(self) -> list[float]:
        return [float(t.mean()) if t.numel() else float("nan") for t in self.token_logps]


@torch.no_grad()
def probe_forward(model, probe: Probe, *, device, dtype: str = "fp32", reference: list[torch.Tensor] | None = None,
                  keep_dists: bool = False) -> ProbeOutput:
    """Teacher-forced pass over the probe pairs, results in input order.

    Pairs are batched by length (little padding) in a fixed order, so two calls on one model match exactly. Only
    the positions that predict a target token are projected onto the vocabulary and normalised (on SmolLM2's
    probe: 49 of 73 columns projected, 320 of 1,752 positions normalised), the same numbers as the full logits'
    rows up to the projection's float rounding."""
    encoded, pad_id, batch_size = probe.encoded, probe.pad_id, probe.batch_size
    was = model.training
    model.eval()
    n = len(encoded)
    token_logps: list = [None] * n
    token_kl: list | None = [None] * n if reference is not None else None
    dists: list | None = [None] * n if keep_dists else None
    big = sum(len(t) for _, t in encoded) * _vocab(model) > FLOAT16_ABOVE
    keep_ok = accepts_logits_to_keep(model)
    order = sorted(range(n), key=lambda i: (len(encoded[i][0]) + len(encoded[i][1]), i))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        chunk = [encoded[i] for i in idx]
        width = max(len(p) + len(t) for p, t in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (p, t) in enumerate(chunk):
            ids[r, :len(p) + len(t)] = torch.tensor(p + t)
            mask[r, :len(p) + len(t)] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        first = {r: len(p) - 1 for r, (p, _) in enumerate(chunk)}  # position i predicts token i + 1
        if keep_ok:  # project only the columns that predict a target token (union over the rows)
            keep = sorted({c for r, (p, t) in enumerate(chunk) for c in range(len(p) - 1, len(p) + len(t) - 1)})
            kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
            first = {r: keep.index(len(p) - 1) for r, (p, _) in enumerate(chunk)}  # targets' columns are contiguous
        with autocast(dtype, device):
            logits = model(**kwargs).logits
        for r, (i, (_, t)) in enumerate(zip(idx, chunk)):
            rows = F.log_softmax(logits[r, first[r]:first[r] + len(t)].float(), dim=-1)  # this row's targets only
            target = torch.tensor(t, device=rows.device)
            token_logps[i] = rows.gather(-1, target[:, None]).squeeze(-1).cpu()
            if token_kl is not None:
                ref = reference[i].to(rows.device, torch.float32)
                token_kl[i] = (rows.exp() * (rows - ref)).sum(-1).clamp_min(0.0).cpu()  # >= 0 up to rounding
            if dists is not None:
                dists[i] = rows.to(torch.float16 if big else torch.float32).cpu()
    model.train(was)
    return ProbeOutput(token_logps, token_kl, dists)


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def distances(current: ProbeOutput, reference_scores: list[float]) -> dict[str, float]:
    """re/logp_mse and re/kl from a probe pass made against theta_r's distributions."""
    s = torch.tensor(current.scores, dtype=torch.float64)
    r = torch.tensor(reference_scores, dtype=torch.float64)
    out = {T.M_RE_LOGP_MSE: float(((s - r) ** 2).mean())}
    if current.token_kl is not None:
        out[T.M_RE_KL] = float(torch.cat(current.token_kl).double().mean())
    return out


@dataclass
class Probe:
    """The probe set of one leaf: encoded pairs, theta_r's reference (once), and the rows kept per eval step."""

    triples: list[tuple[str, str, str]]
    encoded: list[tuple[list[int], list[int]]]
    pad_id: int
    batch_size: int
    ref_scores: list[float] | None = None
    ref_dists: list[torch.Tensor] | None = None
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer, triples: list[tuple[str, str, str]], batch_size: int) -> Probe:
        encoded = []
        for _, q, t in triples:
            p_ids, t_ids = encode_prompt_target(tokenizer, q, t)
            encoded.append((p_ids[-MAX_PROMPT_TOKENS:], t_ids[:MAX_TARGET_TOKENS] or [tokenizer.eos_token_id]))
        return cls(triples, encoded, tokenizer.pad_token_id, batch_size)

    @property
    def digest(self) -> str:
        return probe_digest(self.triples)

    def set_reference(self, model, device, dtype: str = "fp32") -> None:
        """Score theta_r once and keep its per-position log-distributions in memory for the KL."""
        ref = probe_forward(model, self, device=device, dtype=dtype, keep_dists=True)
        self.ref_scores, self.ref_dists = ref.scores, ref.dists

    def measure(self, model, device, dtype: str = "fp32", step: int | None = None) -> dict[str, float]:
        """Score `model` on the probe set; keep the per-pair vector for `step`; return the re/* distances."""
        cur = probe_forward(model, self, device=device, dtype=dtype, reference=self.ref_dists)
        if step is not None:
            for i, (src, tok) in enumerate(zip([s for s, _, _ in self.triples], cur.token_logps)):
                kl = cur.token_kl[i] if cur.token_kl is not None else None
                self.rows.append({"step": step, "pair": i, "source": src, "logp": float(tok.mean()),
                                  "kl": float(kl.mean()) if kl is not None else None,
                                  "token_logp": tok.tolist()})
        return distances(cur, self.ref_scores) if self.ref_scores is not None else {}

    def table(self, steps: set[int] | None = None):
        """The kept vectors as a polars frame (step x pair), optionally only the given steps."""
        # lazy: polars only for the table, not in every worker
        import polars as pl

        schema = {"step": pl.Int64, "pair": pl.Int64, "source": pl.String, "logp": pl.Float64, "kl": pl.Float64,
                  "token_logp": pl.List(pl.Float32)}
        rows = [r for r in self.rows if steps is None or r["step"] in steps]
        return pl.DataFrame(rows, schema=schema, orient="row")
