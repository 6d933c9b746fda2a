"""Math accuracy: sample answers to held-out word problems and compare the number after '####'."""

from __future__ import annotations

import torch

from reteq.data.sources import parse_final_number
from reteq.data.tokenize import render


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], *, samples: int, greedy: bool, temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int, device: torch.device) -> list[list[str]]:
    """`samples` decoded answers per question (left-padded batches; identical on every worker for a seed)."""
    prompts = [render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    flat = [p for p in prompts for _ in range(1 if greedy else samples)]
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(flat), batch_size):
            enc = tokenizer(flat[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, do_sample=not greedy, temperature=temperature if not greedy else None,
                                 top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    tokenizer.padding_side = old_side
    model.train(was_training)
    per_q = 1 if greedy else samples
    return [texts[i * per_q:(i + 1) * per_q] for i in range(len(questions))]


def accuracy(answers: list[list[str]], references: list[str]) -> float:
    """Mean over questions of the fraction of sampled answers whose '####' number equals the reference."""
    if not references:
        return float("nan")
    per_q = []
    for outs, ref in zip(answers, references):
        per_q.append(sum(parse_final_number(o) == ref for o in outs) / max(1, len(outs)))
    return sum(per_q) / len(per_q)
