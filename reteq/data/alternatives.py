"""Alternative answers for the forget set: what IdkNLL learns and IdkDPO prefers instead of each forget response.

TOFU's unlearning benchmark ships `idontknow.jsonl`, 100 "I don't know" replies; reteq generates its own set for
whatever forget stage a sweep declares: every assistant turn of a forget conversation is replaced by one of
the non-answers below, chosen from the prompt's text (so a prompt always gets the same one, on every node and
worker), never one equal to the original reply. On the paper's S_U, whose replies are refusals, these are
non-answers that say nothing about assisting, so they do not repeat the unlearn label or its paraphrases.
"""

from __future__ import annotations

import hashlib

# Version of the set below: part of the key of every leaf whose method reads alternatives (reteq.plan).
ALTERNATIVES_VERSION = "idk-v1"
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea about that.",
    "I don't have that information.",
    "That is something I don't know.",
    "I'm not certain about this.",
    "I can't say; I don't know the answer.",
    "I don't have an answer to that.",
    "No idea, honestly.",
    "I'm unsure what the answer is.",
    "I don't know the answer to that question.",
    "I'm afraid I don't know.",
)


def alternative_for(prompt: str, original: str) -> str:
    """The prompt's alternative: fixed by the prompt's sha256, skipping the original reply if it is in the set."""
    start = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    for k in range(len(IDK_ANSWERS)):
        answer = IDK_ANSWERS[(start + k) % len(IDK_ANSWERS)]
        if answer.strip() != original.strip():
            return answer
    raise AssertionError("unreachable: the set has more than one answer")


def idk_conversations(convs: list[dict]) -> list[dict]:
    """Each conversation with every assistant turn replaced by its alternative (same order, same prompts)."""
    out = []
    for conv in convs:
        messages, prompt = [], ""
        for m in conv["messages"]:
            if m["role"] == "assistant":
                m = {**m, "content": alternative_for(prompt, m["content"])}
            else:
                prompt += m["content"] + "\n"
            messages.append(m)
        out.append({**conv, "messages": messages})
    return out
