"""Packing: samples share rows but never attend across each other, so a packed batch gives every sample the
same log-probs (fp32, ~1e-5) and the same gradients as running it alone or padded; micro-batches keep the
padded path's count per worker (DeepSpeed's accumulation boundary) and lose far less to padding."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import reteq_cache  # noqa: F401  (session fixture)

from reteq.data.packing import (
    balance,
    first_fit_decreasing,
    pack,
    packed_micro_batches,
    padding_fraction,
)
from reteq.data.tokenize import IGNORE, Example, collate, micro_batches
from reteq.train.logprobs import batch_token_logps, block_causal_mask, sequence_logps, token_logps

pytestmark = pytest.mark.usefixtures("reteq_cache")


def _examples(n: int, seed: int = 0, lo: int = 4, hi: int = 40, vocab: int = 1000) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(8, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 1)  # prompt | response
        out.append(Example(ids, [IGNORE] * cut + ids[cut:], index=100 + i))
    return out


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from reteq.tiny import ensure_tiny_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
    return model.eval()


# ---- assignment ------------------------------------------------------------------------------------------------

def test_first_fit_decreasing_respects_capacity_and_places_everything():
    lengths = [7, 3, 9, 1, 4, 4, 10, 2]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10: perfect fill here
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # an item over capacity gets its own bin


def test_balance_spreads_weight_and_fills_every_slot():
    w = [50, 40, 30, 20, 10, 10, 10, 10]
    groups = balance(w, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(w)))
    loads = sorted(sum(w[i] for i in g) for g in groups)
    assert loads == [40, 40, 50, 50] and all(groups)


def test_pack_restarts_positions_and_never_labels_a_first_token():
    a = Example([1, 2, 3], [IGNORE, 2, 3], 7)
    b = Example([4, 5], [4, 5], 9)  # a labelled first token: must not be predicted from a's last token
    batch = pack([a, b], pad_id=0, layout="varlen")
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.seq_ids.tolist() == [[0, 0, 0, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert batch.index.tolist() == [7, 9] and batch.n_tokens == 5
    rows = pack([a, b, Example([6], [IGNORE], 3)], pad_id=0, capacity=3)
    assert rows.input_ids.shape == (2, 3) and rows.n_tokens == 6
    assert rows.seq_ids.tolist() == [[0, 0, 0], [1, 1, 2]]


def test_block_causal_mask_confines_attention_to_each_sample():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seq)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [0, 0, 1, 0, 0, 0],
                 [0, 0, 1, 1, 0, 0],
                 [0, 0, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0, 1]]
    additive = block_causal_mask(seq, torch.float32)[0, 0]
    assert (additive == 0).int().tolist() == m and additive.min() == torch.finfo(torch.float32).min


# ---- same numbers as running alone -------------------------------------------------------------------------------

def _alone(model, examples: list[Example]) -> list[float]:
    out = []
    for e in examples:
        b = collate([e], pad_id=0)
        logp, _ = sequence_logps(model, b)
        out.append(float(logp[0]))
    return out


@pytest.mark.parametrize("layout", ["rows", "varlen"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequence_logps_equal_each_sample_run_alone(tiny, layout, attn):
    tiny.set_attn_implementation(attn)
    try:
        examples = _examples(9, seed=1)
        alone = _alone(tiny, examples)
        with torch.no_grad():
            batch = pack(examples, pad_id=0, capacity=48, layout=layout)
            if layout == "rows":
                assert batch.input_ids.size(0) > 1 and (batch.seq_ids == -1).any()  # padded tail rows too
            sums, counts = sequence_logps(tiny, batch)
        assert counts.tolist() == [e.n_label_tokens - (e.labels[0] != IGNORE) for e in examples]
        assert sums.tolist() == pytest.approx(alone, abs=1e-5, rel=1e-5)
    finally:
        tiny.set_attn_implementation("sdpa")


def test_packed_gradients_equal_padded_gradients(tiny):
    """The finetuning loss (token-sum / label tokens) and its gradient: packed == padded, to fp32 rounding."""
    examples = _examples(8, seed=2)
    n_labels = sum(e.n_label_tokens for e in examples)

    def grads(batch):
        tiny.zero_grad(set_to_none=True)
        logp, _ = batch_token_logps(tiny, batch)
        loss = -logp.sum() / n_labels
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in tiny.parameters() if p.grad is not None])

    loss_pad, g_pad = grads(collate(examples, pad_id=0))
    loss_pack, g_pack = grads(pack(examples, pad_id=0, capacity=40))
    tiny.zero_grad(set_to_none=True)
    assert loss_pack == pytest.approx(loss_pad, rel=1e-6)
    assert torch.allclose(g_pack, g_pad, atol=1e-6, rtol=1e-4)


def test_token_logps_of_the_padded_path_are_unchanged(tiny):
    examples = _examples(4, seed=3)
    b = collate(examples, pad_id=0)
    with torch.no_grad():
        logp, mask = token_logps(tiny, b.input_ids, b.attention_mask, b.labels)
        logits = tiny(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, b.labels[:, 1:].clamp_min(0)[..., None])[..., 0] * mask
    assert torch.allclose(logp, ref, atol=1e-5)


# ---- micro-batches -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
def test_packed_micro_batches_keep_the_padded_count_per_worker_and_cover_the_step(world):
    examples = _examples(64, seed=4, lo=4, hi=200)
    step = list(range(0, 64, 2))  # 32 samples
    micro = 4
    seen, all_padded, all_packed = [], [], []
    for rank in range(world):
        padded = micro_batches(examples, step, micro, rank, world, pad_id=0)
        packed = packed_micro_batches(examples, step, micro, rank, world, pad_id=0)
        assert len(packed) == len(padded) == 32 // (micro * world)
        assert max(b.input_ids.size(1) for b in packed) <= max(len(examples[i].input_ids) for i in step)
        seen += [i for b in packed for i in b.index.tolist()]
        all_padded += padded
        all_packed += packed
    assert sorted(seen) == sorted(examples[i].index for i in step)
    assert padding_fraction(all_packed) < padding_fraction(all_padded)
    assert sum(b.input_ids.numel() for b in all_packed) < sum(b.input_ids.numel() for b in all_padded)


def test_varlen_micro_batches_have_no_padding():
    examples = _examples(16, seed=5)
    mbs = packed_micro_batches(examples, list(range(16)), 4, 0, 1, pad_id=0, layout="varlen")
    assert len(mbs) == 4 and padding_fraction(mbs) == 0.0
    assert all(b.input_ids.size(0) == 1 for b in mbs)


def test_finetune_stage_packed_and_padded_start_from_the_same_loss():
    """Through recipes.finetune_stage: the first step's loss and gradient norm do not depend on packing."""
    from helpers import model_cfg, stage_dict

    from reteq.config import StageConfig
    from reteq.data.synthetic import instruct
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import finetune_stage
    from reteq.train.worker_context import WorkerContext

    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    stage = StageConfig.model_validate(stage_dict("inst", 16, epochs=1))
    first = {}
    for packing in (False, True):
        model = load_model(mcfg, seed=0)
        _, result, stats = finetune_stage(model, tokenizer, stage, instruct(16), WorkerContext(packing=packing), 0)
        first[packing] = (result.records[0].loss, result.records[0].grad_norm, stats["padding_fraction"])
    assert first[True][0] == pytest.approx(first[False][0], rel=1e-5)
    assert first[True][1] == pytest.approx(first[False][1], rel=1e-4)
    assert first[True][2] <= first[False][2]  # never more padding than the padded path


# ---- precision policy ------------------------------------------------------------------------------------------------

def test_matmul_policy_sets_tf32_only_for_tf32():
    from reteq.train.precision import apply_matmul_policy

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_matmul_policy("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        for d in ("fp32", "bf16"):
            apply_matmul_policy(d)
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError, match="unknown precision"):
            apply_matmul_policy("fp16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_frozen_bf16_base_weights_change_nothing_under_bf16_autocast():
    """LoRA base Linear weights stored in bf16 and peft's input casts off: logits and adapter gradients bit-identical
    to fp32 weights under bf16 autocast (autocast rounds them to bf16 anyway, and a bf16 -> fp32 -> bf16 cast is
    exact); the tied lm_head gets a bf16 copy while the embedding, and so the residual stream, stays fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from reteq.tiny import ensure_tiny_model
    from reteq.train.precision import FrozenBase, autocast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    batch = pack(_examples(5, seed=6), pad_id=0, capacity=64)

    def run():
        lora.zero_grad(set_to_none=True)
        with autocast("bf16", torch.device("cpu")):
            logp, _ = sequence_logps(lora, batch)
        logp.sum().backward()
        return logp.detach(), torch.cat([p.grad.flatten() for p in lora.parameters() if p.grad is not None])

    a, ga = run()
    base = FrozenBase(lora)
    linears = [m for m in lora.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    originals = [(m.weight.data_ptr(), m.weight.dtype) for m in linears]
    assert len(base) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head is tied
    base.use("bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    adapted = [m for m in lora.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(adapted) == 2 * 3 and not any(m.cast_input_dtype_enabled for m in adapted)
    b, gb = run()
    assert torch.equal(a, b) and torch.equal(ga, gb)
    base.use("fp32")  # an fp32 evaluation sees the untouched originals, not bf16 values cast back
    assert [(m.weight.data_ptr(), m.weight.dtype) for m in linears] == originals
    assert all(m.cast_input_dtype_enabled for m in adapted)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_global_step_splits_into_the_same_micro_batches_at_any_worker_count(packed):
    """1 worker accumulating 4 micro-batches, 2 workers taking 2 each, 4 taking 1: the step's micro-batches are
    the same (same samples, same rows), each with the same slot in the global step, which seeds its dropout
    (reteq.train.loop.micro_batch_seed); so the summed gradient does not depend on the worker count."""
    ex = _examples(16, seed=5)
    step = list(range(16))
    random.Random(1).shuffle(step)

    def split(world: int) -> dict[int, tuple]:
        out = {}
        for rank in range(world):
            batches = (packed_micro_batches(ex, step, 4, rank, world, pad_id=0) if packed
                       else micro_batches(ex, step, 4, rank, world, pad_id=0))
            assert len(batches) == 4 // world  # every worker the same number of micro-steps
            for b in batches:
                assert b.slot not in out
                out[b.slot] = (b.input_ids.tolist(), b.labels.tolist(), b.index.tolist())
        return out

    one = split(1)
    assert sorted(one) == [0, 1, 2, 3]
    assert split(2) == one and split(4) == one
