"""Issue #20 on real tokenizer shapes: turns end at the template's turn-end token, not the base model's eos.

Math generation stops at the turn end and reads only the first turn; training labels end WITH the turn end (the
pad token may be that very token: nothing masks labels by pad id); torchtune's Llama-3 rendering prints no date.
"""

from __future__ import annotations

import pytest
import torch
from chat_tokenizers import bigram_model, llama3_base, qwen_base, smollm2

from reteq.config import ChatConfig
from reteq.data.gsm8k import extract_answer
from reteq.data.packing import pack
from reteq.data.tokenize import IGNORE, collate, configure_chat, encode_conversation, render, turn_end_ids
from reteq.eval.generation import Decoding
from reteq.eval.math import answer_text, generate_answers, stop_ids

CONV = {"messages": [{"role": "user", "content": "Count from 1 to 3."},
                     {"role": "assistant", "content": "1, 2, 3."}]}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("build,end,eos", [(llama3_base, "<|eot_id|>", "<|end_of_text|>"),
                                           (qwen_base, "<|im_end|>", "<|endoftext|>"),
                                           (smollm2, "<|im_end|>", "<|im_end|>")])
def test_the_turn_end_is_derived_from_the_template_not_the_eos(build, end, eos):
    tok = build()
    assert tok.eos_token == eos
    assert tok.convert_ids_to_tokens(turn_end_ids(tok))[0] == end
    assert set(stop_ids(tok)) == set(turn_end_ids(tok)) | {tok.eos_token_id}
    configure_chat(tok, ChatConfig(template="torchtune")) if build is llama3_base else None
    assert tok.convert_ids_to_tokens(turn_end_ids(tok))[0] == end  # torchtune's rendering closes turns alike


def test_math_generation_stops_at_the_turn_end_and_scores_the_first_answer():
    """A real model that writes '#### 18<|im_end|>' and then, unless stopped, '0' forever. Qwen2.5's eos is
    <|endoftext|>: stopping only there gave '#### 18000...' (scored 18000)."""
    tok = qwen_base()
    prompt = _ids(tok, render(tok, [{"role": "user", "content": "Solve the following math problem."}],
                              add_generation_prompt=True))
    answer = _ids(tok, "#### 18")
    (im_end,), zero = turn_end_ids(tok), _ids(tok, "0")[0]
    chain = [prompt[-1], *answer, im_end, zero]
    assert len(set(chain)) == len(chain)  # a bigram chain: every token has one successor
    model = bigram_model(tok, {**dict(zip(chain, chain[1:])), zero: zero})
    decoding = Decoding(samples=1, greedy=True, max_new_tokens=12, batch_size=2)
    answers = generate_answers(model, tok, ["Solve the following math problem."], decoding, torch.device("cpu"))
    assert answers == [["#### 18"]] and extract_answer(answers[0][0]) == "18"
    from reteq.eval.generation import generate_ids

    (new,), = generate_ids(model, [prompt], pad_id=tok.pad_token_id, eos_id=stop_ids(tok, model), decoding=decoding)
    assert new == [*answer, im_end]  # stopped at the turn end, not after max_new_tokens
    (unstopped,), = generate_ids(model, [prompt], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                 decoding=decoding)
    assert len(unstopped) == 12 and extract_answer(answer_text(tok, unstopped, [tok.eos_token_id])) != "18"
    assert extract_answer(answer_text(tok, unstopped, stop_ids(tok))) == "18"  # parsing alone cuts there too


@pytest.mark.parametrize("build", [llama3_base, qwen_base])
def test_an_answer_followed_by_a_second_turn_scores_the_first(build):
    tok = build()
    end = tok.convert_ids_to_tokens(turn_end_ids(tok))[0]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n" if build is llama3_base else "<|im_start|>assistant\n"
    ids = _ids(tok, f"So the answer is 18.\n#### 18{end}{header}#### 20{end}")
    text = answer_text(tok, ids, stop_ids(tok))
    assert text == "So the answer is 18.\n#### 18" and extract_answer(text) == "18"
    old = tok.decode(ids, skip_special_tokens=True)  # what was parsed before: both turns, the last '####' wins
    assert extract_answer(old) == "20"


def test_chatml_labels_end_at_im_end_and_the_newline_after_it_carries_no_loss():
    tok = qwen_base()
    e = encode_conversation(tok, CONV, 512)
    labelled = [t for t, lab in zip(tok.convert_ids_to_tokens(e.input_ids), e.labels) if lab != IGNORE]
    assert labelled[-1] == "<|im_end|>"
    assert tok.convert_ids_to_tokens(e.input_ids)[-1] == "Ċ" and e.labels[-1] == IGNORE  # the template's newline
    assert "".join(labelled).replace("Ġ", " ").replace("Ċ", "\n") == "<|im_start|>assistant\n1, 2, 3.<|im_end|>"


def test_a_pad_token_equal_to_the_turn_end_keeps_its_label():
    """SmolLM2: eos = pad = <|im_end|>. Padding is told apart by position, never by id, so the end-of-turn label
    survives tokenisation, padded collation and packing."""
    tok = smollm2()
    (im_end,) = turn_end_ids(tok)
    assert tok.pad_token_id == im_end
    long = {"messages": [CONV["messages"][0], {"role": "assistant", "content": "1, 2, 3, and so on up to 18."}]}
    short, longer = encode_conversation(tok, CONV, 512, 0), encode_conversation(tok, long, 512, 1)
    for e in (short, longer):
        assert im_end in [lab for lab in e.labels if lab != IGNORE]
    batch = collate([short, longer], tok.pad_token_id)
    assert int((batch.labels == im_end).sum()) == 2  # one per row; the short row's padding is not labelled
    packed = pack([short, longer], tok.pad_token_id)
    assert int((packed.labels == im_end).sum()) == 2


def test_torchtune_rendering_of_llama3_prints_no_date_where_the_hf_template_does():
    tok = llama3_base()
    hf = render(configure_chat(tok, ChatConfig()), CONV["messages"])
    assert "Cutting Knowledge Date" in hf and "Today Date: 26 Jul 2024" in hf  # the trap is real
    tt = render(configure_chat(tok, ChatConfig(template="torchtune")), CONV["messages"])
    assert "Date" not in tt
    assert tt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCount from 1 to 3.<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n1, 2, 3.<|eot_id|>")
    prompt = render(tok, [{"role": "user", "content": "  padded  "}], add_generation_prompt=True)
    assert prompt.endswith("user<|end_header_id|>\n\npadded<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    e = encode_conversation(tok, CONV, 512)  # header + body + <|eot_id|> labelled, as torchtune's mask
    labelled = tok.decode([lab for lab in e.labels if lab != IGNORE])
    assert labelled == "<|start_header_id|>assistant<|end_header_id|>\n\n1, 2, 3.<|eot_id|>"


def test_torchtune_rendering_on_a_tokenizer_without_llama3_tokens_is_one_line():
    from reteq.errors import DataError

    tok = configure_chat(qwen_base(), ChatConfig(template="torchtune"))
    with pytest.raises(DataError, match=r"^chat.template: torchtune renders Llama-3 chats, but this tokenizer has "
                                        r"no <\|begin_of_text\|> \(use template: hf\)$"):
        render(tok, CONV["messages"])
