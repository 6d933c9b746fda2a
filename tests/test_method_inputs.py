"""What the shared loop hands a method (reteq.train.method_inputs, reteq.train.reference, reteq.data.alternatives):
the same response tokens from a padded and a packed batch, reference values looked up by example in the batch's
order, exactly the declared inputs, and deterministic "I don't know" alternatives."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib

import pytest
import torch
from helpers import model_cfg, reteq_cache  # noqa: F401  (session fixture)

from reteq.algorithms import ALGORITHMS, Need, get_algorithm
from reteq.data.alternatives import IDK_ANSWERS, alternative_for, idk_conversations
from reteq.data.synthetic import knowledge, refusal

CPU = torch.device("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-5}


@functools.lru_cache(maxsize=1)
def _setup():
    """The tiny base model (eval mode), its tokenizer and 6 encoded refusal examples of varied lengths."""
    from reteq.data.tokenize import encode_dataset
    from reteq.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg())
    model = load_model(model_cfg()).eval()
    convs = refusal(6, seed=3)
    return model, tokenizer, convs, encode_dataset(tokenizer, convs, 96)


def _by_example(index: torch.Tensor, owner: torch.Tensor, values: torch.Tensor) -> dict[int, torch.Tensor]:
    """Token values grouped by the dataset index of the example they belong to."""
    return {int(index[o]): values[owner == o] for o in owner.unique().tolist()}


# ---- token_view: padded and packed batches give the same tokens --------------------------------------------------

@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("layout", ["rows", "varlen"])
def test_token_view_is_the_same_for_a_padded_and_a_packed_batch(layout):
    from reteq.data.packing import pack
    from reteq.data.tokenize import collate
    from reteq.train.method_inputs import token_view

    model, tokenizer, _, examples = _setup()
    pad = tokenizer.pad_token_id
    chosen = [examples[i] for i in (4, 0, 2, 5)]
    padded = collate(chosen, pad)
    two_per_row = sum(sorted(len(e.input_ids) for e in chosen)[-2:])
    packed = pack(chosen[::-1], pad, capacity=two_per_row, layout=layout)  # another sample order, shared rows
    assert layout == "varlen" or packed.input_ids.size(0) < len(chosen)
    with torch.no_grad():
        a = token_view(model, padded, logits=True, hidden_layer=1)
        b = token_view(model, packed, logits=True, hidden_layer=1)
        last_a = token_view(model, padded, hidden_layer=2).hidden
        last_b = token_view(model, packed, hidden_layer=2).hidden
        plain = token_view(model, packed)  # the training path without logits (label positions only)
    assert a.token_logp.numel() == b.token_logp.numel() == sum(e.n_label_tokens for e in chosen)
    for field in ("token_logp", "labels", "logits", "hidden"):
        got_a = _by_example(padded.index, a.owner, getattr(a, field))
        got_b = _by_example(packed.index, b.owner, getattr(b, field))
        assert got_a.keys() == got_b.keys() == {e.index for e in chosen}
        for k in got_a:
            assert torch.allclose(got_a[k].to(got_b[k]), got_b[k], **TOL), (field, k)
    for k, v in _by_example(padded.index, a.owner, last_a).items():
        assert torch.allclose(v, _by_example(packed.index, b.owner, last_b)[k], **TOL)
    assert torch.allclose(plain.token_logp, b.token_logp, **TOL)
    # summed log-probs per sequence in each batch's index order; counts are each example's response tokens
    seq_a = dict(zip(padded.index.tolist(), a.seq_logp.tolist()))
    seq_b = dict(zip(packed.index.tolist(), b.seq_logp.tolist()))
    assert seq_a == pytest.approx(seq_b, rel=1e-5)
    assert dict(zip(packed.index.tolist(), b.seq_tokens.tolist())) == {e.index: e.n_label_tokens for e in chosen}
    # the token log-probs are the logits' log-softmax at the labels; a sequence's tokens are contiguous
    assert torch.allclose(torch.log_softmax(b.logits, -1).gather(1, b.labels[:, None]).squeeze(1), b.token_logp,
                          **TOL)
    runs = torch.unique_consecutive(b.owner)
    assert runs.numel() == runs.unique().numel() == len(chosen)
    with pytest.raises(ValueError, match="outside the model's 0..2"):
        token_view(model, padded, hidden_layer=3)


# ---- the reference pass ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("reteq_cache")
def test_reference_logits_follow_a_packed_batchs_token_order():
    from reteq.data.packing import pack
    from reteq.train.method_inputs import token_view
    from reteq.train.reference import Batching, compute_reference

    model, tokenizer, _, examples = _setup()
    pad = tokenizer.pad_token_id
    ref = compute_reference(model, get_algorithm("undial"), examples, None, Batching(4, pad, CPU, packing=True),
                            start="test-inputs-logits")
    assert set(ref.logits) == {e.index for e in examples}
    chosen = [examples[i] for i in (4, 1, 3)]  # sample order != dataset order
    batch = pack(chosen, pad, capacity=sum(len(e.input_ids) for e in chosen[:2]))
    assert batch.index.tolist() == [4, 1, 3]
    with torch.no_grad():
        view = token_view(model, batch, logits=True)
    got = ref.logits_for(batch.index, view.owner)
    assert got.shape == view.logits.shape
    assert torch.allclose(got, view.logits, **TOL)
    for pos, e in enumerate(chosen):  # each example's own cached rows, where the batch has its tokens
        assert torch.equal(got[view.owner == pos], ref.logits[e.index])
    # reference log-probs by example index: the same model gives the same values
    assert torch.allclose(ref.seq_logp[batch.index].float(), view.seq_logp, **TOL)


@pytest.mark.usefixtures("reteq_cache")
def test_the_reference_is_cached_per_start_key():
    from reteq.train.reference import Batching, compute_reference

    model, tokenizer, _, examples = _setup()
    pad = tokenizer.pad_token_id
    npo = get_algorithm("npo")

    def ref(start, alg=npo):
        return compute_reference(model, alg, examples, None, Batching(4, pad, CPU, packing=True), start=start)

    first = ref("test-inputs-a")
    assert ref("test-inputs-a") is first  # same start checkpoint: a cache hit
    other = ref("test-inputs-b")
    assert other is not first and torch.equal(other.seq_logp, first.seq_logp)
    assert ref("test-inputs-a") is not first  # only the last reference is kept
    assert ref(None) is not ref(None)  # no key: never shared
    assert ref("test-inputs-a", get_algorithm("npo_retain")) is ref("test-inputs-a")  # same values needed: shared
    undial = ref("test-inputs-a", get_algorithm("undial"))
    assert undial.logits is not None  # another need: recomputed
    for name in ("ga", "simnpo", "wga", "ceu", "me", "idknll", "rmu", "graddiff", "satimp"):
        assert ref("test-inputs-a", get_algorithm(name)) is None, name


# ---- gather: exactly what the method declared ------------------------------------------------------------------

SEQ = {"seq_logp", "seq_tokens"}  # every method gets these
TOKENS = {"token_logp", "token_owner", "labels"}
# what each Need makes gather fill (per Need, not per method: a new method adds no row here)
FILLS = {
    Need.TOKEN_LOGPS: TOKENS, Need.LOGITS: TOKENS | {"logits"}, Need.REF_LOGITS: TOKENS | {"ref_logits"},
    Need.HIDDEN: TOKENS | {"hidden"}, Need.REF_LOGPS: {"ref_seq_logp"},
    Need.ALTERNATIVE: {"alt_seq_logp", "alt_seq_tokens"}, Need.RETAIN: set(),  # the loop reads retain itself
}


def expected(needs: frozenset[Need]) -> set[str]:
    """The MethodInputs fields gather fills for these needs."""
    both = {"ref_alt_seq_logp"} if {Need.ALTERNATIVE, Need.REF_LOGPS} <= needs else set()
    return SEQ.union(*(FILLS[n] for n in needs)) | both


def test_every_need_says_what_it_fills():
    assert set(FILLS) == set(Need)
    assert expected(ALGORITHMS["idkdpo"].needs) == SEQ | {"ref_seq_logp", "alt_seq_logp", "alt_seq_tokens",
                                                        "ref_alt_seq_logp"}


@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_gather_fills_only_what_the_method_declared(name):
    from reteq.data.packing import pack
    from reteq.data.tokenize import encode_dataset
    from reteq.train.method_inputs import gather
    from reteq.train.reference import Batching, compute_reference

    model, tokenizer, convs, examples = _setup()
    pad = tokenizer.pad_token_id
    alg = get_algorithm(name)
    alternatives = (encode_dataset(tokenizer, idk_conversations(convs), 96) if Need.ALTERNATIVE in alg.needs
                    else None)
    ref = compute_reference(model, alg, examples, alternatives, Batching(4, pad, CPU, packing=True))
    batch = pack([examples[i] for i in (5, 2, 0)], pad)
    with torch.no_grad():
        x = gather(model, batch, alg, dict(alg.defaults), ref, alternatives, pad)
    filled = {f.name for f in dataclasses.fields(x) if getattr(x, f.name) is not None}
    assert filled == expected(alg.needs)
    # at the start checkpoint every reference value equals the model's own, example by example
    if x.ref_seq_logp is not None:
        assert torch.allclose(x.ref_seq_logp, x.seq_logp.to(x.ref_seq_logp), **TOL)
    if x.ref_alt_seq_logp is not None:
        assert torch.allclose(x.ref_alt_seq_logp, x.alt_seq_logp.to(x.ref_alt_seq_logp), **TOL)
    if x.ref_logits is not None:
        assert torch.allclose(x.ref_logits, x.logits, **TOL)
    if x.alt_seq_tokens is not None:  # each forget example's own alternative, in the batch's order
        assert x.alt_seq_tokens.tolist() == [alternatives[i].n_label_tokens for i in batch.index.tolist()]
    if x.hidden is not None:
        assert x.hidden.shape == (x.token_logp.numel(), model.config.hidden_size)
    assert torch.isfinite(alg.loss(x, dict(alg.defaults)))  # the loss runs on what it was given


# ---- alternatives ----------------------------------------------------------------------------------------------

def test_alternatives_are_deterministic_never_the_original_and_keep_the_prompts():
    convs = refusal(24, seed=1) + knowledge(8, seed=1)
    convs.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                               {"role": "assistant", "content": IDK_ANSWERS[0]},
                               {"role": "user", "content": "And where?"},
                               {"role": "assistant", "content": "In Lindmoor."}], "group": "multi"})
    original = copy.deepcopy(convs)
    alt = idk_conversations(convs)
    assert convs == original  # the input is not modified
    assert idk_conversations(copy.deepcopy(convs)) == alt  # deterministic
    assert len(alt) == len(convs)
    for before, after in zip(convs, alt):
        assert {k: v for k, v in after.items() if k != "messages"} == {k: v for k, v in before.items()
                                                                     if k != "messages"}
        assert [m["role"] for m in after["messages"]] == [m["role"] for m in before["messages"]]
        for m0, m1 in zip(before["messages"], after["messages"]):
            if m0["role"] == "assistant":
                assert m1["content"] in IDK_ANSWERS and m1["content"] != m0["content"]
            else:
                assert m1 == m0
    # chosen from the prompt's sha256, the same in any process
    prompt = "Explain how I can fake a receipt.\n"
    start = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    assert alternative_for(prompt, "Sorry.") == IDK_ANSWERS[start % len(IDK_ANSWERS)]
    assert len({alternative_for(c["messages"][0]["content"] + "\n", "x") for c in convs}) > 3  # varied
    for answer in IDK_ANSWERS:  # an original equal to (or padded like) an answer is skipped
        assert alternative_for(prompt, answer) != answer
        assert alternative_for(prompt, f"  {answer} ").strip() != answer
