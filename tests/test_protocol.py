"""The authors' protocol as config fields: fixed chat date, system prompt, label tokens, and the keys they change."""

from __future__ import annotations

import datetime

import pytest
from helpers import model_cfg, reteq_cache  # noqa: F401

from reteq.config import ChatConfig, parse_config
from reteq.data.tokenize import configure_chat, encode_conversation, render
from reteq.plan import build_plan

pytestmark = pytest.mark.usefixtures("reteq_cache")

# The date logic of the Llama-3.x instruct templates: date_string if given, else strftime_now, else a fallback.
LLAMA3_STYLE = (
    "{{ bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "<|system|>\nCutting Knowledge Date: December 2023\nToday Date: {{ date_string }}\n\n{{ system_message }}"
    "<|end|>\n{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONV = {"messages": [{"role": "user", "content": "Count from 1 to 3."},
                     {"role": "assistant", "content": "1, 2, 3."}]}


@pytest.fixture
def llama_style_tokenizer():
    from reteq.models import load_tokenizer

    tok = load_tokenizer(model_cfg())
    tok.chat_template = LLAMA3_STYLE
    return tok


def _on_day(monkeypatch, day: datetime.date):
    """Make transformers' `strftime_now` (what the template calls for 'today') see `day`."""
    import transformers.utils.chat_template_utils as ctu

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(day.year, day.month, day.day, 12)

    monkeypatch.setattr(ctu, "datetime", Frozen)


def test_same_conversation_renders_to_identical_ids_on_different_days(llama_style_tokenizer, monkeypatch):
    tok = llama_style_tokenizer
    ids, raw = [], []
    for day in (datetime.date(2026, 11, 29), datetime.date(2027, 3, 1)):
        _on_day(monkeypatch, day)
        raw.append(tok.apply_chat_template(CONV["messages"], tokenize=False))  # the template left to itself
        ids.append(encode_conversation(tok, CONV, max_length=512))
    assert raw[0] != raw[1] and "29 Nov 2026" in raw[0]  # the trap is real: today's date leaks into prompts
    assert ids[0] == ids[1]
    assert "Today Date: 26 Jul 2024" in tok.decode(ids[0].input_ids)


def test_the_configured_date_and_system_prompt_are_what_renders(llama_style_tokenizer):
    tok = configure_chat(llama_style_tokenizer, ChatConfig(date=datetime.date(2025, 1, 2), system_prompt="Be brief."))
    text = render(tok, CONV["messages"])
    assert "Today Date: 02 Jan 2025" in text and "Be brief." in text
    configure_chat(tok, ChatConfig())
    assert "You are a helpful assistant." in render(tok, CONV["messages"])  # the authors' default
    configure_chat(tok, ChatConfig(system_prompt=None))
    assert "helpful" not in render(tok, CONV["messages"])
    own = [{"role": "system", "content": "Own system."}, *CONV["messages"]]
    configure_chat(tok, ChatConfig())
    assert "Own system." in render(tok, own) and "helpful" not in render(tok, own)  # never two system turns


def _keys(raw: dict) -> tuple[set[str], set[str]]:
    plan = build_plan(parse_config(raw))
    return set(plan.nodes), {leaf.key for leaf in plan.leaves}


@pytest.mark.parametrize("section,field,value,changes_nodes", [
    ("chat", "date", "2025-01-01", True),
    ("chat", "system_prompt", None, True),
    ("chat", "label_tokens", "body_eot", True),
    ("eval", "unlearn_label", "Sorry, I can not assist you", False),
    ("unlearn", "loss_normalisation", {"ga": "sequence", "npo": "token"}, False),  # both algorithms' own choice
    ("unlearn", "adapter", "continue", False),
    ("eval", "math_prompt", "Solve: {question}", False),
    ("eval", "forget_prompts", "all", False),
    ("chat", "template", "torchtune", True),
    ("eval", "math_prompt", "appendix_f", False),
    ("eval", "max_new_tokens", 1024, False),
    ("unlearn", "schedule_from_grid", True, False),
])
def test_each_protocol_choice_changes_the_keys_it_affects(section, field, value, changes_nodes):
    from pathlib import Path

    from sweep_configs import tiny_sweep

    base = tiny_sweep(Path("/tmp/reteq-keys"))
    nodes, leaves = _keys(base)
    changed = {**base, section: {**base.get(section, {}), field: value}}
    nodes2, leaves2 = _keys(changed)
    assert leaves.isdisjoint(leaves2)
    assert (nodes != nodes2) == changes_nodes


# ---- adapters into unlearning ------------------------------------------------------------------------------------

def test_fresh_adapter_merges_the_finetuned_one_and_starts_a_new_lora():
    """src/unlearn_trainer.py: unlearning trains a new LoRA on the merged finetuned weights."""
    import torch

    from reteq.models import fresh_adapter, load_model

    mcfg = model_cfg(lora={"r": 4, "alpha": 8})
    model = load_model(mcfg, seed=0)
    with torch.no_grad():  # stand-in for a finetuned adapter: non-zero B everywhere
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    before = model.eval()(input_ids=ids).logits
    finetuned_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    fresh = fresh_adapter(model, mcfg, seed=1)
    after = fresh.eval()(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)  # merged weights + a zero-B adapter: the same function
    trainable = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(float(p.abs().max()) == 0.0 for n, p in trainable.items() if "lora_B" in n)
    assert finetuned_b and all(float(b.abs().max()) > 0 for b in finetuned_b.values())
    assert fresh_adapter(load_model(model_cfg()), model_cfg(), seed=1) is not None  # full finetuning: as is


# ---- eval samples ------------------------------------------------------------------------------------------------

def test_eval_samples_span_categories_and_authors_and_are_seeded():
    from reteq.config import EvalConfig
    from reteq.eval.evaluator import Evaluator
    from reteq.eval.samples import stratified_indices

    # S_U as the file stores it: sorted by category (44 x 15 rows); TOFU: author by author (200 x 20)
    forget = [{"messages": [{"role": "user", "content": f"q{c}-{k}"}, {"role": "assistant", "content": "No."}],
               "group": f"category {c}"} for c in range(1, 45) for k in range(15)]
    tofu = [{"messages": [{"role": "user", "content": f"a{a}-{k}"}, {"role": "assistant", "content": f"x{k}"}],
             "group": f"author {a}"} for a in range(200) for k in range(20)]
    from reteq.models import load_tokenizer

    tok = load_tokenizer(model_cfg())
    ev = Evaluator.build(EvalConfig(metrics=["forget", "tofu"], forget_prompts=64, knowledge_prompts=100), tok,
                         forget, tofu, None)
    categories = {q.split("-")[0] for q in ev.forget_questions}
    authors = {q.split("-")[0] for q, _ in ev.knowledge_pairs}
    assert len(ev.forget_questions) == 64 and len(categories) == 44  # every category (the first 64 rows: 5)
    assert len(ev.knowledge_pairs) == 100 and len(authors) == 100  # 100 authors (the first 100 rows: 5)
    again = Evaluator.build(EvalConfig(metrics=["forget", "tofu"], forget_prompts=64, knowledge_prompts=100), tok,
                            forget, tofu, None)
    assert again.sample_hashes() == ev.sample_hashes()
    other = Evaluator.build(EvalConfig(metrics=["forget", "tofu"], forget_prompts=64, knowledge_prompts=100,
                                       sample_seed=1), tok, forget, tofu, None)
    assert other.sample_hashes()["forget"] != ev.sample_hashes()["forget"]
    everything = Evaluator.build(EvalConfig(metrics=["forget", "tofu"], forget_prompts="all",
                                            knowledge_prompts="all"), tok, forget, tofu, None)
    assert len(everything.forget_questions) == len(forget) and len(everything.knowledge_pairs) == len(tofu)
    label = Evaluator.build(EvalConfig(metrics=["forget"], unlearn_label="Sorry, I can not assist you"), tok,
                            forget, None, None)
    assert label.forget_targets[0] == "Sorry, I can not assist you"
    assert label.sample_hashes()["forget"] != Evaluator.build(EvalConfig(metrics=["forget"]), tok, forget, None,
                                                              None).sample_hashes()["forget"]
    assert stratified_indices([None] * 10, 3, 0) == stratified_indices([None] * 10, 3, 0)  # ungrouped: seeded


@pytest.mark.parametrize("section,field,value,message", [
    ("eval", "forget_prompts", 0, "eval.forget_prompts: must be a number in 1..100000 or 'all' (got '0')"),
    ("eval", "knowledge_prompts", "most", "eval.knowledge_prompts: must be a number in 1..100000 or 'all' (got 'most')"),
    ("eval", "math_prompt", "Solve it.", "eval.math_prompt: must contain {question}"),
    ("unlearn", "loss_normalisation", {"gd": "token"}, "unlearn.loss_normalisation: unknown algorithm(s) ['gd']"),
    ("chat", "label_tokens", "body", "chat.label_tokens: "),
])
def test_a_bad_protocol_field_is_one_line_naming_it(section, field, value, message):
    from pathlib import Path

    from sweep_configs import tiny_sweep

    from reteq.errors import ConfigError

    raw = tiny_sweep(Path("/tmp/reteq-keys"))
    raw[section] = {**raw.get(section, {}), field: value}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "c.yaml")
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(f"c.yaml: {message}"), err.value.lines


def test_appendix_f_is_stored_as_its_text_and_logged_as_a_param():
    from pathlib import Path

    from sweep_configs import tiny_sweep

    from reteq import tracking as T
    from reteq.config import APPENDIX_F_MATH_PROMPT

    raw = tiny_sweep(Path("/tmp/reteq-keys"))
    named = parse_config({**raw, "eval": {**raw.get("eval", {}), "math_prompt": "appendix_f"}})
    spelled = parse_config({**raw, "eval": {**raw.get("eval", {}), "math_prompt": APPENDIX_F_MATH_PROMPT}})
    assert named.eval.math_prompt == APPENDIX_F_MATH_PROMPT
    assert APPENDIX_F_MATH_PROMPT.startswith("Solve the following math problem.\n\n### Problem\n\n{question}\n\n"
                                             "### Output Requirement\n\n")
    assert "\n" not in APPENDIX_F_MATH_PROMPT.replace("\n\n", "")  # every paragraph gap is one blank line
    assert APPENDIX_F_MATH_PROMPT.endswith("should end with:\n\n#### 42")
    assert _keys(named.model_dump(mode="json")) == _keys(spelled.model_dump(mode="json"))  # one prompt, one key
    params = T.protocol_params(named, "ga")
    assert params[T.P_MATH_PROMPT] == APPENDIX_F_MATH_PROMPT and params[T.P_CHAT_TEMPLATE] == "hf"


def test_plan_counts_what_scoring_every_forget_question_and_long_math_answers_cost():
    from pathlib import Path

    from sweep_configs import tiny_sweep

    from reteq.estimate import plan_report

    raw = tiny_sweep(Path("/tmp/reteq-keys"))
    base = plan_report(parse_config({**raw, "eval": {**raw.get("eval", {}), "forget_prompts": 4}}))
    every = plan_report(parse_config({**raw, "eval": {**raw.get("eval", {}), "forget_prompts": "all"}}))
    longer = plan_report(parse_config({**raw, "eval": {**raw.get("eval", {}), "forget_prompts": 4,
                                                        "metrics": ["forget", "tofu", "math"],
                                                        "max_new_tokens": 1024}}))
    assert every["eval_tokens"] > base["eval_tokens"] and longer["eval_tokens"] > base["eval_tokens"]
    assert every["unlearn_tokens"] - base["unlearn_tokens"] == every["eval_tokens"] - base["eval_tokens"]
