"""Batched generation for the math metric: token ids in, new token ids out, many questions x samples per call.

What makes it cheap on a GPU (docs/performance.md): prompts sorted by length and left-padded together;
`num_return_sequences` for the samples of one question; big batches (decode is memory-bound: a batch of 512
costs little more per step than a batch of 64); a static KV cache (`cache_implementation="static"`), which
also lets transformers compile the decode step (`compile=True`; prompt widths are bucketed to a multiple of
64 then, so a handful of shapes compile). Greedy outputs equal the plain dynamic-cache path's.

Import-light (torch only) for bench/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reteq.train.precision import autocast


@dataclass(frozen=True)
class Decoding:
    """How to decode: answers per prompt, greedy or sampled, length, batch size, seed, cache, precision."""

    samples: int = 1  # continuations per prompt (1 when greedy)
    greedy: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64  # sequences per `generate` call (prompts x samples)
    seed: int = 0  # sampling is seeded once in a forked RNG, so every worker draws the same answers
    static_cache: bool | None = None  # None: on for CUDA
    compile: bool = False
    dtype: str = "fp32"
    pad_multiple: int | None = None  # prompt widths rounded up to this; None: 64 with static cache + compile


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | list[int] | None,
                 decoding: Decoding = Decoding(), device: torch.device | None = None) -> list[list[list[int]]]:
    """`decoding.samples` continuations (1 when greedy) per prompt, as new-token ids (EOS and any padding
    after it kept)."""
    d = decoding
    device = device or next(model.parameters()).device
    static_cache = device.type == "cuda" if d.static_cache is None else d.static_cache
    pad_multiple = d.pad_multiple or (64 if static_cache and d.compile else 1)
    per = 1 if d.greedy else d.samples
    per_call = max(1, d.batch_size // per)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[list[list[int]]] = [[] for _ in prompts]
    kwargs = dict(do_sample=not d.greedy, num_return_sequences=per, max_new_tokens=d.max_new_tokens,
                  pad_token_id=pad_id, eos_token_id=eos_id, top_p=None, top_k=None,
                  temperature=None if d.greedy else d.temperature)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    kwargs["disable_compile"] = not d.compile
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(d.seed)
        for start in range(0, len(order), per_call):
            chunk = order[start:start + per_call]
            width = max(len(prompts[i]) for i in chunk)
            width = -(-width // pad_multiple) * pad_multiple
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                n = len(prompts[i])
                ids[r, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - n:] = 1
            with autocast(d.dtype, device):
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = gen[:, width:].cpu().tolist()
            for r, i in enumerate(chunk):
                out[i] = new[r * per:(r + 1) * per]
    model.train(was_training)
    return out
