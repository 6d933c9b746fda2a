"""Chat conversations -> token ids with labels on assistant tokens only -> length-bucketed batches.

Why offsets: a chat template can put anything around a turn (headers, end tokens, default system prompts).
We render the conversation once, find each assistant turn's character span by rendering the prefixes, and keep
the labels of exactly the tokens inside those spans: the turn's header, text and end-of-turn marker (as
torchtune, the authors' trainer), or only its text and end-of-turn marker (`chat.label_tokens`). A span ends
WITH the turn-end token (`turn_end_ids`): ChatML writes a newline after `<|im_end|>`, which belongs to the
template, not to the answer, and torchtune labels nothing after the end of turn.

Why one `turn_end_ids`: the tokens that close an assistant turn are what training labels last and what math
generation must stop at; a base tokenizer's eos (`<|end_of_text|>`, `<|endoftext|>`) is not one of them.

Why a torchtune rendering (`chat.template: torchtune`): the authors tokenized Llama-3 chats with torchtune's
llama3_tokenizer, which writes `<|begin_of_text|>` then `<|start_header_id|>role<|end_header_id|>\n\n` +
stripped content + `<|eot_id|>` per message, and no "Cutting Knowledge Date" / "Today Date" lines.

Why a fixed date and system prompt: Llama-3.x templates print today's date and fall back to their own system
text; the run's `chat` config (attached to the tokenizer by `configure_chat`) pins both, so a prompt renders to
the same ids on every day (docs/fidelity.md).
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from reteq.config import ChatConfig
from reteq.errors import DataError

if TYPE_CHECKING:
    from reteq.config import ChatConfig

IGNORE = -100  # the label of a token that is not a target (prompt, padding); torch's ignore_index
_CHAT_ATTR = "_reteq_chat"
_TURN_END_ATTR = "_reteq_turn_end"
_PROBE_BODY = "reteq turn body"  # an assistant message whose rendering shows what closes a turn
# torchtune's llama3_tokenizer (torchtune/models/llama3/_tokenizer.py, tokenize_messages / tokenize_message)
TT_LLAMA3_BOS = "<|begin_of_text|>"
TT_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
TT_LLAMA3_EOT = "<|eot_id|>"
# another token that ends a Llama-3 assistant turn (a tool call's end of message): a stop token where it exists
_ALSO_ENDS_TURN = {"<|eot_id|>": ("<|eom_id|>",)}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    index: int  # position in the stage's dataset (NPO's reference log-probs are looked up by it)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def configure_chat(tokenizer, chat: ChatConfig):
    """Attach the run's chat settings to its tokenizer: every render through `render` then follows them."""
    setattr(tokenizer, _CHAT_ATTR, chat)
    return tokenizer


def chat_settings(tokenizer) -> ChatConfig:
    """The settings attached by `configure_chat`, else the defaults (the authors' protocol)."""
    chat = getattr(tokenizer, _CHAT_ATTR, None)
    if chat is None:
        chat = ChatConfig()
    return chat


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text, with the configured system prompt (if the conversation has none) and date;
    `chat.template: torchtune` renders as torchtune's Llama-3 tokenizer instead (`render_torchtune_llama3`)."""
    chat = chat_settings(tokenizer)
    if chat.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": chat.system_prompt}, *messages]
    if chat.template == "torchtune":
        return render_torchtune_llama3(tokenizer, messages, add_generation_prompt)
    day = datetime.datetime.combine(chat.date, datetime.time())
    # Llama-3.x templates read `date_string` (else call `strftime_now`); both are pinned; others ignore them
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         date_string=day.strftime("%d %b %Y"), strftime_now=day.strftime)


def render_torchtune_llama3(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """torchtune's Llama-3 chat format as text: bos, then per message header + content.strip() + `<|eot_id|>`;
    the generation prompt is the assistant header. No date lines. (torchtune also appends an unlabelled
    `<|end_of_text|>` to a training sequence; the last token of a sequence carries no loss, so it is left out.)"""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (TT_LLAMA3_BOS, "<|start_header_id|>", "<|end_header_id|>", TT_LLAMA3_EOT)
               if t not in vocab]
    if missing:
        raise DataError(f"chat.template: torchtune renders Llama-3 chats, but this tokenizer has no {missing[0]} "
                        "(use template: hf)")
    parts = [TT_LLAMA3_BOS]
    for m in messages:
        parts.append(TT_LLAMA3_HEADER.format(role=m["role"].strip()) + m["content"].strip() + TT_LLAMA3_EOT)
    if add_generation_prompt:
        parts.append(TT_LLAMA3_HEADER.format(role="assistant"))
    return "".join(parts)


def special_token_strings(tokenizer) -> set[str]:
    """Every special token's text: the named ones (bos, eos, pad...) and added tokens marked special."""
    out = set(tokenizer.all_special_tokens)
    out.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return out


def turn_end_ids(tokenizer) -> list[int]:
    """Token ids that close an assistant turn under the configured rendering, derived from it.

    An assistant turn is rendered and the first run of special tokens after its body (up to any non-special
    text such as ChatML's newline) is the turn end: `<|eot_id|>` (Llama-3; plus `<|eom_id|>` where the
    vocabulary has it), `<|im_end|>` (ChatML), `</s>` (Llama-2 chat), `<|end|>` (the tiny model). [] when the
    template closes turns with plain text only. Cached on the tokenizer per chat settings.
    """
    chat = chat_settings(tokenizer)
    cached = getattr(tokenizer, _TURN_END_ATTR, None)
    if cached is not None and cached[0] == chat:
        return list(cached[1])
    text = render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE_BODY}])
    tail = text[text.rindex(_PROBE_BODY) + len(_PROBE_BODY):]
    specials = special_token_strings(tokenizer)
    ends: list[str] = []
    for token in tokenizer.convert_ids_to_tokens(tokenizer(tail, add_special_tokens=False)["input_ids"]):
        if token in specials:
            ends.append(token)
        elif ends:  # the first run of special tokens after the body (Llama-2 writes ' </s>': skip the space)
            break
    vocab = tokenizer.get_vocab()
    for end in list(ends):
        ends += [t for t in _ALSO_ENDS_TURN.get(end, ()) if t in vocab and t not in ends]
    ids = [vocab[t] for t in ends]
    setattr(tokenizer, _TURN_END_ATTR, (chat, ids))
    return list(ids)


def turn_end_strings(tokenizer) -> list[str]:
    """The text of each turn-end token (what a rendered turn ends with)."""
    return tokenizer.convert_ids_to_tokens(turn_end_ids(tokenizer))


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant turn's labelled character span, which ends with the turn's
    end token (the template's text after it, e.g. ChatML's newline, is not a target)."""
    text = render(tokenizer, messages)
    with_header = chat_settings(tokenizer).label_tokens == "header_body_eot"
    ends = turn_end_strings(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=not with_header))
        body = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        turn = render(tokenizer, messages[: i + 1])
        if not text.startswith(turn):
            raise DataError("chat template is not prefix-stable: cannot locate assistant turns")
        end = len(turn)
        found = [(turn.rfind(e, body), e) for e in ends]
        found = [(at, e) for at, e in found if at >= 0]
        if found:
            at, e = max(found)
            end = at + len(e)
        spans.append((start, end))
    return text, spans


def encode_conversation(tokenizer, conv: dict, max_length: int, index: int = 0) -> Example:
    text, spans = assistant_spans(tokenizer, conv["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b > a and any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    return Example(ids[:max_length], labels[:max_length], index)


def encode_dataset(tokenizer, convs: list[dict], max_length: int) -> list[Example]:
    out = [encode_conversation(tokenizer, c, max_length, i) for i, c in enumerate(convs)]
    empty = [e.index for e in out if e.n_label_tokens == 0]
    if empty:
        raise DataError(f"rows {empty[:5]}: no assistant tokens left after truncation to {max_length}")
    return out


def encode_prompt_target(tokenizer, question: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids (chat-formatted question + generation prompt) and target ids (the bare response text)."""
    prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return p_ids, t_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # (B,) dataset positions
    n_tokens: int  # real (non-pad) tokens
    slot: int = 0  # which micro-batch of its global step, counted over all workers (seeds its dropout)

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.index.to(device), self.n_tokens, self.slot)


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, mask, labels, torch.tensor([e.index for e in examples]), int(mask.sum()))


def plan_steps(n_examples: int, epochs: float, global_batch: int, seed: int, steps: int | None = None,
               ) -> list[list[int]]:
    """Example indices of each optimizer step: epochs of fresh seeded shuffles, cut into full global batches.

    A trailing partial batch is dropped (every step sees exactly `global_batch` sequences), except that a
    dataset smaller than one batch is cycled so at least one step exists.
    """
    rng = random.Random(seed)
    want = steps * global_batch if steps is not None else max(global_batch, int(round(n_examples * epochs)))
    stream: list[int] = []
    while len(stream) < want:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        stream.extend(perm)
    stream = stream[:want]
    n_steps = len(stream) // global_batch
    return [stream[i * global_batch:(i + 1) * global_batch] for i in range(n_steps)]


def micro_batches(examples: list[Example], step_indices: list[int], micro_batch: int, rank: int, world: int,
                  pad_id: int) -> list[Batch]:
    """This worker's micro-batches of one step: sorted by length so each micro-batch pads little. The step's
    chunks do not depend on the worker count (worker r takes chunks r, r + world, ...), and each batch keeps
    its chunk's number as its `slot`."""
    chosen = sorted((examples[i] for i in step_indices), key=lambda e: len(e.input_ids))
    chunks = [chosen[i:i + micro_batch] for i in range(0, len(chosen), micro_batch)]
    out = []
    for slot in range(rank, len(chunks), world):
        batch = collate(chunks[slot], pad_id)
        batch.slot = slot
        out.append(batch)
    return out
