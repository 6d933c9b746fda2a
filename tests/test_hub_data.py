"""Hub converters on small files in the published schemas, loaded through the real `datasets.load_dataset`."""

from __future__ import annotations

import logging

import datasets
import pyarrow as pa
import pytest
from fixtures import hub_schemas as fx

from reteq.config import DataSource
from reteq.data import gsm8k, refusals
from reteq.data.converters import access_help
from reteq.data.hub import convert, converter_for, load_hub
from reteq.data.sources import load_conversations
from reteq.errors import HubDataError, MalformedRowError


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (Arrow files written by load_dataset) inside the test's temp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def load(builder: str, path) -> datasets.Dataset:
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def hub_source(hub_id: str, **kw) -> DataSource:
    return DataSource(kind="hub", id=hub_id, **kw)


def pair(conv: dict) -> tuple[str, str]:
    (user, assistant) = conv["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


# ---- converter choice ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hub_id, name",
    [
        ("locuslab/TOFU", "tofu"),
        ("openai/gsm8k", "gsm8k"),
        ("sorry-bench/sorry-bench-202503", "sorry_bench"),
        ("PrincetonPLI/Instruct-SkillMix-SDD", "instruct_skillmix"),
    ],
)
def test_converter_is_chosen_by_hub_id(hub_id, name):
    assert converter_for(hub_source(hub_id)).name == name


def test_unknown_hub_id_or_converter_is_one_clear_error():
    with pytest.raises(HubDataError, match="no converter is registered.*tofu"):
        converter_for(hub_source("someone/else"))
    with pytest.raises(HubDataError, match="unknown converter 'nope'"):
        converter_for(hub_source("locuslab/TOFU", converter="nope"))


# ---- TOFU and Instruct-SkillMix ------------------------------------------------------------------
def test_tofu_rows_become_user_assistant_pairs_unchanged(tmp_path):
    ds = load("json", fx.write_tofu(tmp_path))
    assert ds.column_names == ["question", "answer"]
    out = convert(ds, hub_source("locuslab/TOFU", subset="full"))
    assert [pair(c) for c in out] == [(r["question"], r["answer"]) for r in fx.TOFU_ROWS]


def test_skillmix_joins_a_nonempty_input_and_keeps_the_output(tmp_path):
    ds = load("json", fx.write_skillmix(tmp_path))
    out = convert(ds, hub_source("PrincetonPLI/Instruct-SkillMix-SDD"))
    (q0, a0), (q1, a1) = (pair(c) for c in out)
    assert q0 == fx.SKILLMIX_ROWS[0]["instruction"] and a0 == fx.SKILLMIX_ROWS[0]["output"]
    assert q1 == "Summarise the text below in one sentence.\n\n" + fx.SKILLMIX_ROWS[1]["input"]
    assert a1 == "The committee approved the new budget on Monday."


def test_a_missing_column_fails_before_converting(tmp_path):
    ds = load("json", fx.write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "x.jsonl"))
    with pytest.raises(HubDataError, match=r"locuslab/TOFU: missing column\(s\) \['question', 'answer'\]"):
        convert(ds, hub_source("locuslab/TOFU"))


def test_an_empty_answer_names_the_dataset_and_row(tmp_path):
    rows = [*fx.TOFU_ROWS[:2], {"question": "Q?", "answer": "  "}]
    ds = load("json", fx.write_tofu(tmp_path, rows))
    with pytest.raises(MalformedRowError, match=r"^locuslab/TOFU: row 2: column 'answer' is empty$"):
        convert(ds, hub_source("locuslab/TOFU"))


# ---- GSM8K ---------------------------------------------------------------------------------------
def test_gsm8k_traces_lose_annotations_keep_one_step_per_line_and_end_in_a_clean_number(tmp_path):
    ds = load("parquet", fx.write_gsm8k(tmp_path)["train"])
    out = [pair(c) for c in convert(ds, hub_source("openai/gsm8k", subset="main"))]
    assert [q for q, _ in out] == [r["question"] for r in fx.GSM8K_TRAIN]
    assert out[0][1] == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert out[1][1] == "In 4 days it bakes 1,250 * 4 = 5000 rolls.\n#### 5000"  # "#### 5,000" -> 5000
    assert out[2][1] == "It is now 4 - 6 = -2 degrees.\n#### -2"
    for _, answer in out:
        assert "<<" not in answer and answer.splitlines()[-1].startswith("#### ")


def test_gsm8k_without_a_final_number_line_names_dataset_and_row(tmp_path):
    rows = [fx.GSM8K_TRAIN[0], {"question": "q", "answer": "It is 5.\nSo 5."}]
    ds = load("parquet", fx.write_gsm8k(tmp_path, train=rows)["train"])
    with pytest.raises(
        MalformedRowError, match=r"openai/gsm8k: row 1: answer: no final '#### <number>' line"
    ):
        convert(ds, hub_source("openai/gsm8k"))
    rows[1] = {"question": "q", "answer": "It is five.\n#### five"}
    ds = load("parquet", fx.write_gsm8k(tmp_path / "b", train=rows)["train"])
    with pytest.raises(MalformedRowError, match=r"row 1: .*does not hold a number"):
        convert(ds, hub_source("openai/gsm8k"))


@pytest.mark.parametrize(
    "text, number",
    [
        ("#### 1,234", "1234"),
        ("so #### $5.", "5"),
        ("#### 7.00", "7"),
        ("#### -3 apples", "-3"),
        ("#### 2.5", "2.5"),
        ("no marker", None),
        ("#### twelve", None),
        ("####", None),
    ],
)
def test_extract_answer_normalises_the_number_after_the_last_marker(text, number):
    assert gsm8k.extract_answer(text) == number


def test_gsm8k_test_split_gives_question_and_reference_number(tmp_path):
    fx.write_gsm8k(tmp_path)
    source = hub_source(str(tmp_path / "gsm8k" / "main"), split="test", converter="gsm8k")
    assert gsm8k.load_gsm8k_test(source) == [
        (fx.GSM8K_TEST[0]["question"], "13"),
        (fx.GSM8K_TEST[1]["question"], "13500"),
    ]


def test_a_registered_rewriter_rewrites_traces_and_names_the_transform(tmp_path, monkeypatch):
    monkeypatch.setattr(gsm8k, "REWRITERS", {})
    gsm8k.register_rewriter("numbered", fx.numbered_steps)
    ds = load("parquet", fx.write_gsm8k(tmp_path)["train"])
    source = hub_source("openai/gsm8k", converter="gsm8k+numbered")
    out = [pair(c)[1] for c in convert(ds, source)]
    assert out[0] == (
        "Step 1: Natalia sold 48/2 = 24 clips in May.\n"
        "Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert converter_for(source).version == "gsm8k/2+rewrite:numbered@2"
    by_path = hub_source("openai/gsm8k", converter="gsm8k+fixtures.hub_schemas:numbered_steps")
    assert [pair(c)[1] for c in convert(ds, by_path)] == out


@pytest.mark.parametrize(
    "rewrite, reason",
    [
        (lambda q, s: "I think it is 72.", "does not end with a '#### <number>' line"),
        (lambda q, s: "Half of 48 is 24.\n#### 73", "ends with '#### 73' but the reference answer is 72"),
        (lambda q, s: None, "returned NoneType"),
    ],
)
def test_a_rewrite_that_loses_or_changes_the_answer_is_rejected_with_its_row(
    tmp_path, monkeypatch, rewrite, reason
):
    monkeypatch.setattr(gsm8k, "REWRITERS", {})
    gsm8k.register_rewriter("bad", rewrite)
    ds = load("parquet", fx.write_gsm8k(tmp_path)["train"])
    with pytest.raises(MalformedRowError) as err:
        convert(ds, hub_source("openai/gsm8k", converter="gsm8k+bad"))
    assert str(err.value).startswith("openai/gsm8k: row 0: rewrite rejected: ") and reason in str(err.value)


def test_an_unknown_rewriter_is_a_clear_error():
    with pytest.raises(HubDataError, match="unknown GSM8K rewriter 'missing'"):
        converter_for(hub_source("openai/gsm8k", converter="gsm8k+missing"))


# ---- SORRY-BENCH refusals ------------------------------------------------------------------------
def test_sorry_bench_drops_encoded_styles_and_answers_with_prefix_and_category_reason(tmp_path):
    ds = load("parquet", fx.write_sorry_bench(tmp_path))
    assert ds.features["turns"].feature.dtype == "string"
    out = [pair(c) for c in convert(ds, hub_source(refusals.SORRY_BENCH_ID))]
    kept = [r for r in fx.sorry_rows() if r["prompt_style"] not in refusals.DROPPED_STYLES]
    assert len(out) == len(kept) == 14
    assert [q for q, _ in out] == [r["turns"][0] for r in kept]
    for style in ("ascii", "atbash", "caesar", "morse", "misspellings"):
        assert not any(f"in the {style} style" in q for q, _ in out)
    assert any("in the translate-fr style" in q for q, _ in out)  # only the paper's five styles go
    for (_, answer), row in zip(out, kept):
        assert answer.startswith("Sorry, I can not assist you with this question. ")
        assert answer == f"{refusals.REFUSAL_PREFIX} {refusals.CATEGORY_REASON[int(row['category'])]}"
    assert out[0][1].endswith("would hurt real people.")  # category 1: personal insults
    assert out[-1][1].endswith("a qualified professional who knows your situation.")  # 40: medical advice


def test_sorry_bench_accepts_integer_categories_too(tmp_path):
    schema = fx.SORRY_SCHEMA.set(1, pa.field("category", pa.int64()))
    rows = [dict(r, category=int(r["category"])) for r in fx.sorry_rows()]
    ds = load("parquet", fx.write_sorry_bench(tmp_path, rows, schema))
    assert len(convert(ds, hub_source(refusals.SORRY_BENCH_ID))) == 14


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"turns": []}, "turns must be a non-empty list"),
        ({"turns": [""]}, "turns must be a non-empty list"),
        ({"category": "99"}, "category must be a SORRY-BENCH category number 1..44"),
        ({"prompt_style": None}, "prompt_style must be a string"),
    ],
)
def test_a_malformed_sorry_bench_row_is_reported_with_its_index(tmp_path, change, problem):
    rows = fx.sorry_rows()
    rows[2] = dict(rows[2], **change)  # row 2 is a kept style (role_play)
    ds = load("parquet", fx.write_sorry_bench(tmp_path, rows))
    with pytest.raises(MalformedRowError) as err:
        convert(ds, hub_source(refusals.SORRY_BENCH_ID))
    assert str(err.value).startswith("sorry-bench/sorry-bench-202503: row 2: ") and problem in str(err.value)


def test_a_known_upstream_defect_is_skipped_with_a_warning_not_silently(tmp_path, caplog):
    rows = [
        *fx.sorry_rows(),
        {"question_id": 167, "category": "17", "prompt_style": "question", "turns": [None]},
    ]
    ds = load("parquet", fx.write_sorry_bench(tmp_path, rows))
    with caplog.at_level(logging.WARNING, logger="reteq.data"):
        out = convert(ds, hub_source(refusals.SORRY_BENCH_ID))
    assert len(out) == 14
    assert "row 24 skipped: known upstream defect" in caplog.text


def test_multi_turn_rows_get_a_refusal_after_every_user_turn(tmp_path):
    rows = [{"question_id": 5, "category": "12", "prompt_style": "base", "turns": ["first ask", "second ask"]}]
    ds = load("parquet", fx.write_sorry_bench(tmp_path, rows))
    (conv,) = convert(ds, hub_source(refusals.SORRY_BENCH_ID))
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][2]["content"] == "second ask" and conv["messages"][1] == conv["messages"][3]


def test_sorry_bench_authors_split_partitions_the_filtered_rows_70_30(tmp_path):
    ds = load("parquet", fx.write_sorry_bench(tmp_path))
    parts = {
        split: [
            pair(c)[0]
            for c in convert(
                ds, hub_source(refusals.SORRY_BENCH_ID, split=split, converter="sorry_bench_authors")
            )
        ]
        for split in ("train", "test")
    }
    kept = {
        r["turns"][0] for r in fx.sorry_rows() if r["prompt_style"] not in refusals.AUTHORS_DROPPED_STYLES
    }
    assert (len(parts["train"]), len(parts["test"])) == (8, 4)  # 12 rows survive the authors' filter
    assert set(parts["train"]) | set(parts["test"]) == kept and not set(parts["train"]) & set(parts["test"])


def test_sorry_bench_authors_reproduces_their_filter_and_split_row_for_row(tmp_path):
    """data/create_safety_dataset.py on a 202503-shaped set: drop list verbatim ("ceasar": caesar rows stay),
    then datasets' train_test_split(test_size=0.3, seed=42): test = the first ceil(0.3 n) of
    np.random.default_rng(42).permutation(n), train = the rest, in that order."""
    import numpy as np

    rows = fx.sorry_rows_202503()
    assert len(rows) == 44 * 21 and isinstance(rows[0]["category"], str)
    ds = load("parquet", fx.write_sorry_bench(tmp_path, rows))
    assert ds.features["category"].dtype == "string" and ds.features["question_id"].dtype == "int64"
    kept = [r for r in rows if r["prompt_style"] not in
            {"ascii", "atbash", "ceasar", "morse", "translate-fr", "translate-mr", "misspellings"}]
    assert len(kept) == 44 * 15  # caesar is kept: 15 of the 21 styles
    perm = np.random.default_rng(42).permutation(len(kept))
    n_test = int(np.ceil(0.3 * len(kept)))
    for split, idx in (("train", perm[n_test:]), ("test", perm[:n_test])):
        convs = convert(ds, hub_source(refusals.SORRY_BENCH_ID, split=split, converter="sorry_bench_authors"))
        assert [pair(c)[0] for c in convs] == [kept[i]["turns"][0] for i in idx]
        assert [c["group"] for c in convs] == [f"category {kept[i]['category']}" for i in idx]
    train = convert(ds, hub_source(refusals.SORRY_BENCH_ID, split="train", converter="sorry_bench_authors"))
    styles = {pair(c)[0].split(" in the ")[1].removesuffix(" style]") for c in train}
    assert "caesar" in styles and not styles & {"ascii", "atbash", "morse", "misspellings"}
    assert len(train) == 462  # 70% of 660; on the real 6,600 kept rows: 4,620 (docs/data.md)


# ---- load_hub: the path sources.py dispatches to -------------------------------------------------
def test_load_hub_runs_load_dataset_then_the_converter_and_keeps_the_first_n(tmp_path):
    fx.write_tofu(tmp_path)
    source = hub_source(str(tmp_path / "tofu"), converter="tofu", n=2)
    out = load_hub(source)
    assert [pair(c) for c in out] == [(r["question"], r["answer"]) for r in fx.TOFU_ROWS[:2]]
    assert load_conversations(source) == out  # the lead's dispatcher gives the same rows


def test_a_subset_naming_a_file_is_loaded_as_data_files(tmp_path):
    path = fx.write_skillmix(tmp_path)
    source = hub_source(str(tmp_path / "skillmix"), subset=f"data/{path.name}", converter="instruct_skillmix")
    assert len(load_hub(source)) == len(fx.SKILLMIX_ROWS)


def test_a_gated_or_unreachable_dataset_is_one_line_naming_it_and_how_to_get_access():
    with pytest.raises(HubDataError) as err:
        load_hub(hub_source(refusals.SORRY_BENCH_ID))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot load hub dataset 'sorry-bench/sorry-bench-202503'")
    for hint in (
        "huggingface-cli login",
        "https://huggingface.co/datasets/sorry-bench/sorry-bench-202503",
        "reteq data prepare",
    ):
        assert hint in message
    assert message.endswith(access_help(refusals.SORRY_BENCH_ID))
