"""Shared-prefix scoring (one forward per prompt tree) gives the padded path's numbers, in a fraction of the
tokens: forget targets (label + 19 paraphrases per question), one-target likelihoods, peft models, eager."""

from __future__ import annotations

import pytest
import torch
from helpers import reteq_cache, tiny_base  # noqa: F401  (reteq_cache: session fixture)

from reteq.eval.prefix_scoring import build_trees, score_pairs_shared, tree_mask
from reteq.eval.scoring import score_pairs, score_pairs_padded

pytestmark = pytest.mark.usefixtures("reteq_cache")


@pytest.fixture(scope="module")
def setup():
    from reteq.data.forget_targets import FORGET_TARGETS
    from reteq.data.synthetic import knowledge, refusal
    from reteq.data.tokenize import encode_prompt_target
    model, tok = tiny_base()
    questions = [c["messages"][0]["content"] for c in refusal(5, seed=3)]
    forget = [encode_prompt_target(tok, q, t) for q in questions for t in FORGET_TARGETS]
    know = []
    for c in knowledge(6, seed=4):
        m = c["messages"]
        know.append(encode_prompt_target(tok, m[0]["content"], m[1]["content"]))
    return model, tok, forget, know


def test_forget_and_knowledge_pairs_score_the_same_as_the_padded_path(setup):
    model, tok, forget, know = setup
    pairs = forget + know
    plain = score_pairs_padded(model, pairs, pad_id=tok.pad_token_id, batch_size=16)
    shared = score_pairs(model, pairs, pad_id=tok.pad_token_id, batch_size=16)  # auto -> shared on sdpa
    assert shared == pytest.approx(plain, abs=1e-5)
    # the trees really share: 5 prompts encoded once each instead of 20 times
    trees = build_trees(forget, 4096)
    assert len(trees) == 5 and all(len(t.targets) == 20 for t in trees)
    tree_tokens = sum(t.size for t in trees)
    pair_tokens = sum(len(p) + len(t) for p, t in forget)
    assert tree_tokens < 0.5 * pair_tokens


def test_small_rows_split_trees_and_eager_attention_agree(setup):
    model, tok, forget, know = setup
    pairs = forget[:40] + know[:3]
    plain = score_pairs_padded(model, pairs, pad_id=tok.pad_token_id, batch_size=8)
    small = score_pairs_shared(model, pairs, pad_id=tok.pad_token_id, batch_size=2, row_tokens=48)
    assert small == pytest.approx(plain, abs=1e-5)
    model.set_attn_implementation("eager")
    try:
        eager = score_pairs_shared(model, pairs, pad_id=tok.pad_token_id, batch_size=8)
    finally:
        model.set_attn_implementation("sdpa")
    assert eager == pytest.approx(plain, abs=1e-5)


def test_peft_model_bf16_and_edge_cases(setup):
    from peft import LoraConfig, get_peft_model

    model, tok, forget, know = setup
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    try:
        pairs = forget[:20] + [(forget[0][0], [])] + know[:2]  # an empty target scores 0.0 on both paths
        plain = score_pairs_padded(lora, pairs, pad_id=tok.pad_token_id)
        shared = score_pairs(lora, pairs, pad_id=tok.pad_token_id)
        assert shared == pytest.approx(plain, abs=1e-5) and shared[20] == 0.0
        assert score_pairs(lora, [], pad_id=tok.pad_token_id) == []
        bf_plain = score_pairs_padded(lora, pairs, pad_id=tok.pad_token_id, dtype="bf16")
        bf_shared = score_pairs(lora, pairs, pad_id=tok.pad_token_id, dtype="bf16")
        assert bf_shared == pytest.approx(bf_plain, abs=5e-2)  # bf16: same policy, same numbers to bf16 noise
    finally:
        lora.unload()
    with pytest.raises(ValueError, match="unknown scoring method"):
        score_pairs(model, pairs, pad_id=0, method="fast")


def test_tree_mask_shape():
    tree = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0]])  # prompt of 2, target 1 of 2 tokens, target 2 of 1 token, pad
    m = tree_mask(tree, branch)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],  # target 2 sees the prompt and itself, never target 1
                 [0, 0, 0, 0, 0, 1]]


def test_evaluator_raw_is_unchanged_by_the_shared_path(setup):
    """Evaluator.raw (shared path by default) against the same metrics computed on the padded path."""
    from reteq.config import EvalConfig
    from reteq.data.synthetic import knowledge, refusal
    from reteq.eval import evaluator as ev

    model, tok, _, _ = setup
    e = ev.Evaluator.build(EvalConfig(metrics=["forget", "tofu"], forget_prompts=3, knowledge_prompts=4), tok,
                           refusal(3, seed=1), knowledge(4, seed=2), None)
    fast = e.raw(model, torch.device("cpu"))
    orig = ev.score_pairs
    ev.score_pairs = lambda *a, **k: score_pairs(*a, **k, method="padded")
    try:
        slow = e.raw(model, torch.device("cpu"))
    finally:
        ev.score_pairs = orig
    assert set(fast) == set(slow)
    assert all(fast[k] == pytest.approx(slow[k], abs=1e-5) for k in fast)


def test_scoring_in_small_log_softmax_chunks_changes_nothing(setup, monkeypatch):
    """picked_logps normalises PICK_ROWS positions at a time; the log-softmax is row-wise, so any chunk size gives
    bit-identical scores (here 7, against one chunk holding every position)."""
    import reteq.eval.prefix_scoring as ps

    model, tok, forget, know = setup
    monkeypatch.setattr(ps, "PICK_ROWS", 1 << 20)
    whole = score_pairs_shared(model, forget + know, pad_id=tok.pad_token_id)
    monkeypatch.setattr(ps, "PICK_ROWS", 7)
    assert score_pairs_shared(model, forget + know, pad_id=tok.pad_token_id) == whole
