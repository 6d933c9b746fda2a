"""Stage data: synthetic generators, local files, label masking on assistant tokens, step planning, batching."""

from __future__ import annotations

import json
import re

import pytest
from helpers import (
    model_cfg,
    reteq_cache,  # noqa: F401  (session fixture)
)

from reteq.config import DataSource
from reteq.data import synthetic
from reteq.data.gsm8k import extract_answer
from reteq.data.packing import padding_fraction
from reteq.data.sources import load_conversations, read_local
from reteq.data.tokenize import (
    IGNORE,
    Example,
    collate,
    encode_conversation,
    encode_dataset,
    micro_batches,
    plan_steps,
)
from reteq.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(reteq_cache):  # noqa: F811
    from reteq.models import load_tokenizer

    return load_tokenizer(model_cfg())


# ---- synthetic stages -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(synthetic.GENERATORS))
def test_synthetic_stages_are_seeded(task):
    a, b = synthetic.generate(task, 20, seed=3), synthetic.generate(task, 20, seed=3)
    assert a == b and len(a) == 20
    assert a != synthetic.generate(task, 20, seed=4)
    for conv in a:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] and all(m["content"] for m in conv["messages"])


def test_refusals_start_with_the_papers_sentence():
    for conv in synthetic.refusal(30):
        assert conv["messages"][1]["content"].startswith("Sorry, I can not assist you with this question. ")


def test_math_answers_reason_then_end_in_the_number():
    for conv in synthetic.math(30, seed=1):
        question, answer = (m["content"] for m in conv["messages"])
        *steps, last = answer.splitlines()
        assert steps and re.fullmatch(r"#### \d+", last)
        # the number is what the last step computed
        assert steps[-1].rstrip(".").endswith(f"= {last[5:]}")
    evals = synthetic.math_eval(10)
    assert all(ref.isdigit() for _, ref in evals)
    assert {q for q, _ in evals}.isdisjoint(c["messages"][0]["content"] for c in synthetic.math(10))


@pytest.mark.parametrize("text,number", [
    ("so 3 + 4 = 7.\n#### 7", "7"), ("#### 1,234.", "1234"), ("#### $12 dollars", "12"),
    ("a #### 3\n#### 5", "5"), ("no marker 5", None), ("####", None), ("####   ", None),
    ("#### 7.00", "7"), ("#### +5", "5"), ("#### -0", "0"), ("#### 0.50", "0.5"), ("#### 0.5", "0.5"),
    ("#### -12", "-12"), ("#### -$1,234.50.", "-1234.5"), ("#### $-3", "-3"), ("#### 2.25.", "2.25"),
    ("#### 1,000,000", "1000000"), ("#### 18.\nmore text", "18"), ("####42", "42"), ("#### 007", "7"),
])
def test_one_parser_reads_the_number_after_the_last_marker(text, number):
    assert extract_answer(text) == number


def test_outputs_and_references_go_through_the_same_parser():
    """'#### 7.00' vs reference '7', '0.50' vs '0.5', '+5' vs '5', '-0' vs '0' all score as right."""
    from reteq.eval.math import accuracy

    outputs = [["#### 7.00"], ["#### +5"], ["#### -0"], ["#### 0.50"], ["#### $1,234."], ["#### 3"]]
    references = ["7", "5", "0", "0.5", "1234", "4"]
    assert accuracy(outputs, references) == pytest.approx(5 / 6)
    assert accuracy([["#### 0.5"]], ["0.50"]) == 1.0  # a reference spelled unnormalised is normalised too


# ---- local files --------------------------------------------------------------------------------------------------

ROWS = [
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "a1"}]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "extra": 1},
]
CLEAN = [{"messages": r["messages"]} for r in ROWS]


def test_read_local_json_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    pq.write_table(pa.Table.from_pylist(CLEAN), tmp_path / "d.parquet")
    for name in ("d.json", "d.jsonl", "d.parquet"):
        assert read_local(tmp_path / name) == CLEAN, name
    src = DataSource(kind="local", path=str(tmp_path / "d.jsonl"), n=1)
    assert load_conversations(src) == CLEAN[:1]


@pytest.mark.parametrize("row,reason", [
    ({"text": "hi"}, "no 'messages' field"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "messages[0] needs role"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "messages[0] needs role"),
])
def test_a_bad_row_names_file_and_row(tmp_path, row, reason):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*ROWS, row]))
    with pytest.raises(DataError) as e:
        read_local(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: row 2: ") and reason in msg


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    (tmp_path / "d.json").write_text(json.dumps({"messages": []}))
    (tmp_path / "d.csv").write_text("a,b\n")
    for name, reason in [("d.jsonl", "row 1: not valid JSON"), ("d.json", "must hold a list"),
                         ("d.csv", "unsupported data file type"), ("nope.jsonl", "does not exist")]:
        with pytest.raises(DataError, match=re.escape(reason)):
            read_local(tmp_path / name)


# ---- labels: assistant tokens only ------------------------------------------------------------------------------

def _labelled_runs(tokenizer, ex) -> list[str]:
    """Decoded maximal runs of consecutive labelled tokens."""
    runs, cur = [], []
    for tok, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == tok  # a label is the token itself (the loop shifts)
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("label_tokens", ["header_body_eot", "body_eot"])
def test_labels_cover_exactly_the_assistant_turns(tokenizer, label_tokens):
    from reteq.config import ChatConfig
    from reteq.data.tokenize import configure_chat

    configure_chat(tokenizer, ChatConfig(label_tokens=label_tokens))
    header = "<|assistant|>\n" if label_tokens == "header_body_eot" else ""  # torchtune labels the header too
    conv = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Count from 1 to 3."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Sorry, I can not assist you with this question."},  # user text, never labelled
        {"role": "assistant", "content": "List three colors.\n1. red"},
    ]}
    ex = encode_conversation(tokenizer, conv, max_length=512)
    configure_chat(tokenizer, ChatConfig())
    assert tokenizer.decode(ex.input_ids).startswith(tokenizer.bos_token)
    runs = _labelled_runs(tokenizer, ex)
    end = tokenizer.eos_token
    assistant = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
    assert len(runs) == 2
    for run, content in zip(runs, assistant):
        # the turn's text and its end marker (the template's line break after the marker may ride along)
        assert run.rstrip("\n") == header + content + end, run
    labelled = "".join(runs)
    for m in conv["messages"]:
        if m["role"] != "assistant":
            assert m["content"] not in labelled
    assert "<|user|>" not in labelled and "<|system|>" not in labelled
    assert ("<|assistant|>" in labelled) == bool(header)
    assert ex.n_label_tokens == sum(1 for x in ex.labels if x != IGNORE)


def test_truncation_keeps_labels_aligned_and_rejects_rows_left_without_answer(tokenizer):
    conv = synthetic.refusal(1)[0]
    full = encode_conversation(tokenizer, conv, max_length=512)
    cut = encode_conversation(tokenizer, conv, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    prompt_len = full.labels.index(next(x for x in full.labels if x != IGNORE))
    with pytest.raises(DataError, match="no assistant tokens left"):
        encode_dataset(tokenizer, [conv], max_length=prompt_len)


# ---- steps and batches ----------------------------------------------------------------------------------------------

def test_plan_steps_full_batches_epochs_and_seed():
    steps = plan_steps(20, epochs=2, global_batch=8, seed=0)
    assert len(steps) == 5 and all(len(s) == 8 for s in steps)  # 40 sequences -> 5 full batches
    flat = [i for s in steps for i in s]
    assert sorted(flat[:20]) == list(range(20)) and sorted(flat[20:]) == list(range(20))  # epoch = permutation
    assert steps == plan_steps(20, 2, 8, seed=0) and steps != plan_steps(20, 2, 8, seed=1)
    assert len(plan_steps(20, 1, 8, seed=0)) == 2  # trailing partial batch dropped
    assert len(plan_steps(3, 1, 8, seed=0)) == 1  # smaller than a batch: cycled into one step
    fixed = plan_steps(20, 1, 8, seed=0, steps=7)
    assert len(fixed) == 7 and all(len(s) == 8 for s in fixed)


def test_micro_batches_sort_by_length_and_split_over_workers():
    examples = [Example(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1)), i)
                for i, n in enumerate([5, 9, 2, 7, 3, 8, 4, 6])]
    step = list(range(8))
    all_mb = micro_batches(examples, step, micro_batch=2, rank=0, world=1, pad_id=0)
    assert [b.input_ids.shape for b in all_mb] == [(2, 3), (2, 5), (2, 7), (2, 9)]
    r0 = micro_batches(examples, step, 2, rank=0, world=2, pad_id=0)
    r1 = micro_batches(examples, step, 2, rank=1, world=2, pad_id=0)
    got = sorted(int(i) for b in r0 + r1 for i in b.index)
    assert got == step and len(r0) == len(r1) == 2
    assert {int(i) for b in r0 for i in b.index}.isdisjoint(int(i) for b in r1 for i in b.index)


def test_collate_pads_right_and_masks_padding():
    a = Example([5, 6, 7], [IGNORE, 6, 7], 3)
    b = Example([8], [8], 9)
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch.index.tolist() == [3, 9] and batch.n_tokens == 4 and batch.n_label_tokens == 3
    assert padding_fraction([batch]) == pytest.approx(2 / 6)
