"""Batched generation for the math metric: greedy answers equal the plain one-call-per-batch dynamic-cache path,
with a static KV cache too; sampling is batched across questions x samples and reproducible from its seed."""

from __future__ import annotations

import pytest
import torch
from helpers import reteq_cache, tiny_base  # noqa: F401  (reteq_cache: session fixture)

pytestmark = pytest.mark.usefixtures("reteq_cache")


@pytest.fixture(scope="module")
def setup():
    from reteq.data.synthetic import math as math_convs
    model, tok = tiny_base()
    # The pretrained tiny base (no math stage yet) answers every question with the same greedy text; seeded
    # noise on its matrices makes greedy answers depend on the prompt, which the equality checks need.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    questions = [c["messages"][0]["content"] for c in math_convs(7, seed=5)]
    return model, tok, questions


def _plain_greedy(model, tok, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The reference: what reteq.eval.math did before (tokenizer left padding, dynamic cache, input order)."""
    from reteq.data.tokenize import render

    prompts = [render(tok, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = tok(prompts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, do_sample=False, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = side
    return out


@pytest.mark.parametrize("static_cache", [False, True])
def test_greedy_answers_equal_the_plain_path(setup, static_cache):
    from reteq.eval.math import generate_answers

    model, tok, questions = setup
    plain = _plain_greedy(model, tok, questions, max_new_tokens=20, batch_size=3)
    from reteq.eval.generation import Decoding

    decoding = Decoding(samples=5, greedy=True, max_new_tokens=20, batch_size=4, static_cache=static_cache)
    fast = generate_answers(model, tok, questions, decoding, torch.device("cpu"))
    assert [len(a) for a in fast] == [1] * len(questions)
    assert [a[0] for a in fast] == plain
    assert len(set(plain)) > 1  # different questions really give different answers


def test_static_cache_with_bucketed_prompt_widths_gives_the_same_tokens(setup):
    from reteq.data.tokenize import render
    from reteq.eval.generation import Decoding, generate_ids

    model, tok, questions = setup
    ids = [tok(render(tok, [{"role": "user", "content": q}], add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for q in questions]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    a = generate_ids(model, ids, decoding=Decoding(max_new_tokens=12, batch_size=7, static_cache=False), **kw)
    b = generate_ids(model, ids, decoding=Decoding(max_new_tokens=12, batch_size=7, static_cache=True,
                                                   pad_multiple=64), **kw)
    assert a == b


def test_sampling_is_batched_per_question_and_reproducible(setup):
    from reteq.eval.generation import Decoding
    from reteq.eval.math import generate_answers

    model, tok, questions = setup
    cpu = torch.device("cpu")

    def sampled(seed: int) -> Decoding:
        return Decoding(samples=3, greedy=False, temperature=1.0, max_new_tokens=10, batch_size=9, seed=seed)

    a = generate_answers(model, tok, questions[:4], sampled(1), cpu)
    b = generate_answers(model, tok, questions[:4], sampled(1), cpu)
    c = generate_answers(model, tok, questions[:4], sampled(2), cpu)
    assert [len(x) for x in a] == [3, 3, 3, 3]
    assert a == b and a != c
    state = torch.random.get_rng_state()
    generate_answers(model, tok, questions[:1], sampled(3), cpu)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
