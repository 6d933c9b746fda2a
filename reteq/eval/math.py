"""Math accuracy: sample answers to held-out word problems and compare the number after '####'.

Why stop tokens beyond eos: a base tokenizer's eos (Llama-3 `<|end_of_text|>`, Qwen2.5 `<|endoftext|>`) is never
what a chat-trained model writes at the end of its answer; it writes the template's turn end (`<|eot_id|>`,
`<|im_end|>`). Generation stops at any of them (`stop_ids`, as torchtune's `stop_tokens = [eos, eot]`), and an
answer is the text before the first one (`answer_text`): a model that runs on into a second turn is scored on
its first answer, never on a number it wrote later.
"""

from __future__ import annotations

import torch

from reteq.data.gsm8k import extract_answer, normalise_number
from reteq.data.tokenize import render, special_token_strings, turn_end_ids
from reteq.eval.generation import Decoding, generate_ids


def stop_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends an answer: the chat template's turn end(s), the tokenizer's eos and the model's
    generation_config eos (one id or a list), in that order, without repeats."""
    ids = list(turn_end_ids(tokenizer))
    extra = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    for i in extra:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def answer_text(tokenizer, ids: list[int], stops: list[int], specials: list[str] | None = None) -> str:
    """The answer in generated ids: decoded with special tokens kept, cut at the first stop token's text, then
    stripped of special tokens (so '... #### 18<turn end>assistant ... #### 20' reads '... #### 18').
    `specials`: the tokenizer's special-token texts, longest first (computed here when not given)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    markers = [m for m in tokenizer.convert_ids_to_tokens(stops) if m]
    cut = min((text.find(m) for m in markers if m in text), default=len(text))
    text = text[:cut]
    for special in specials if specials is not None else _specials_longest_first(tokenizer):
        text = text.replace(special, "")
    return text


def _specials_longest_first(tokenizer) -> list[str]:
    return sorted(special_token_strings(tokenizer), key=len, reverse=True)


def generate_answers(model, tokenizer, questions: list[str], decoding: Decoding, device: torch.device,
                     ) -> list[list[str]]:
    """`decoding.samples` decoded answers per question (identical on every worker for a seed).

    Batched across questions and samples by `reteq.eval.generation.generate_ids` (length-sorted left-padded
    batches, `num_return_sequences`, a static KV cache on CUDA unless static_cache=False; compile optional).
    """
    prompts = [render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stops = stop_ids(tokenizer, model)
    new = generate_ids(model, ids, pad_id=tokenizer.pad_token_id, eos_id=stops, decoding=decoding, device=device)
    specials = _specials_longest_first(tokenizer)  # once per call, not per answer
    return [[answer_text(tokenizer, s, stops, specials) for s in seqs] for seqs in new]


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
