"""Math accuracy: sample answers to held-out word problems and compare the number after '####'."""

from __future__ import annotations

import torch

from reteq.data.gsm8k import extract_answer, normalise_number
from reteq.data.tokenize import render
from reteq.eval.generation import Decoding, generate_ids


def generate_answers(model, tokenizer, questions: list[str], decoding: Decoding, device: torch.device,
                     ) -> list[list[str]]:
    """`decoding.samples` decoded answers per question (identical on every worker for a seed).

    Batched across questions and samples by `reteq.eval.generation.generate_ids` (length-sorted left-padded
    batches, `num_return_sequences`, a static KV cache on CUDA unless static_cache=False; compile optional).
    """
    prompts = [render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new = generate_ids(model, ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, decoding=decoding,
                       device=device)
    return [tokenizer.batch_decode(seqs, skip_special_tokens=True) for seqs in new]


def accuracy(answers: list[list[str]], references: list[str]) -> float:
    """Mean over questions of the fraction of sampled answers whose '####' number equals the reference.

    Outputs and references go through the same parser (`reteq.data.gsm8k`): '#### 7.00' matches '7'.
    """
    if not references:
        return float("nan")
    per_q = []
    for outs, ref in zip(answers, references):
        want = normalise_number(ref)
        per_q.append(sum(want is not None and extract_answer(o) == want for o in outs) / max(1, len(outs)))
    return sum(per_q) / len(per_q)
