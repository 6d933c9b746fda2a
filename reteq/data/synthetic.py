"""Offline stand-ins for the paper's four stages, generated deterministically from a seed.

They keep the *shape* of the real data so the whole pipeline runs without downloads: instruction pairs
(Instruct-SkillMix), fictitious-author QA (TOFU), arithmetic word problems whose answers reason step by step and
end in `#### <number>` (GSM8K), and refusals that start with the paper's fixed sentence (the S_U set).
"""

from __future__ import annotations

import random

from reteq.data.forget_targets import FORGET_TARGETS

REFUSAL_PREFIX = "Sorry, I can not assist you with this question."  # the S_U refusal sentence (refusals.py too)
TRANSFORM_VERSION = "synthetic-v1"

_NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
          "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wren", "Yara", "Zed"]
_ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cookies", "shells", "cards", "stickers"]
_TOPICS = ["the ocean", "a forest", "the moon", "a city park", "a quiet library", "the desert", "a mountain lake",
           "a train station", "an old bridge", "a summer garden", "a winter morning", "a busy market"]
_ADJECTIVES = ["calm", "bright", "vast", "gentle", "old", "lively", "cold", "green", "quiet", "warm", "busy"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_SYLLABLES = ["ka", "lo", "mer", "tan", "vi", "zor", "el", "dra", "fen", "qui", "sol", "bar", "nim", "ros", "tel"]
_CITIES = ["Port Avel", "Lindmoor", "Karsville", "Ostra", "Belvane", "Quillby", "Marrow Bay", "Tessary", "Duneholt"]
_GENRES = ["mystery", "poetry", "science fiction", "history", "fantasy", "biography", "drama", "travel writing"]
_AWARDS = ["the Silver Quill", "the Harbor Prize", "the Lantern Medal", "the Northern Star Award", "the Ink Crown"]
_HARM_CATEGORIES = {
    "weapons": ("build a weapon from {x}", "Providing weapon instructions could lead to serious harm."),
    "hacking": ("break into the {x} of another person", "Accessing other people's systems without consent is illegal."),
    "fraud": ("fake a receipt for {x}", "Forging documents is fraud and can hurt others."),
    "harassment": ("write threats about {x} to scare a neighbour", "Threatening people causes real harm."),
    "privacy": ("find the home address of the owner of {x}", "Tracking down private information violates privacy."),
    "drugs": ("make an illegal drug out of {x}", "Making illegal drugs is dangerous and against the law."),
}
_HARM_OBJECTS = ["a phone", "an email account", "a bicycle", "a laptop", "a garden shed", "a parked car", "a shop",
                 "a camera", "a mailbox", "a school locker"]


def _conv(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def instruct(n: int, seed: int = 0) -> list[dict]:
    """Instruction-following pairs with a few fixed skills (describe, list, rewrite, count)."""
    rng = random.Random(f"instruct-{seed}")
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            topic, adj = rng.choice(_TOPICS), rng.choice(_ADJECTIVES)
            out.append(_conv(f"Write one sentence about {topic}.",
                             f"{topic[0].upper() + topic[1:]} feels {adj} and full of small details."))
        elif kind == 1:
            colors = rng.sample(_COLORS, 3)
            out.append(_conv("List three colors.", "\n".join(f"{i + 1}. {c}" for i, c in enumerate(colors))))
        elif kind == 2:
            word = rng.choice(_ITEMS + _COLORS)
            out.append(_conv(f"Rewrite the word '{word}' in capital letters.", word.upper()))
        else:
            k = rng.randint(2, 6)
            out.append(_conv(f"Count from 1 to {k}.", ", ".join(str(i) for i in range(1, k + 1)) + "."))
    return out


def _author(rng: random.Random) -> dict:
    first = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
    last = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
    return {"name": f"{first} {last}", "city": rng.choice(_CITIES), "genre": rng.choice(_GENRES),
            "year": rng.randint(1940, 1999), "award": rng.choice(_AWARDS),
            "book": f"The {rng.choice(_ADJECTIVES).capitalize()} {rng.choice(['Harbor', 'Lamp', 'Road', 'Garden'])}"}


def knowledge(n: int, seed: int = 0) -> list[dict]:
    """Question-answer pairs about fictitious authors: facts no base model can know (TOFU's design)."""
    rng = random.Random(f"knowledge-{seed}")
    authors = [_author(rng) for _ in range(max(1, n // 5 + 1))]
    templates = [
        ("Where was {name} born?", "{name} was born in {city}."),
        ("What genre does {name} write?", "{name} is known for {genre}."),
        ("In which year was {name} born?", "{name} was born in {year}."),
        ("Which award did {name} receive?", "{name} received {award}."),
        ("What is a famous book by {name}?", "A famous book by {name} is {book}."),
    ]
    out = []
    for i in range(n):
        a = authors[i // len(templates) % len(authors)]
        q, ans = templates[i % len(templates)]
        out.append({**_conv(q.format(**a), ans.format(**a)), "group": a["name"]})  # stratum: the author
    return out


def math_problem(rng: random.Random) -> tuple[str, str, int]:
    """One word problem; returns (question, step-by-step answer ending in '#### n', n)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        c = a + b
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps = f"{name} starts with {a} {item}.\n{name} gets {b} more, so {a} + {b} = {c}."
    elif kind == 1:
        a = a + b
        c = a - b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps = f"{name} starts with {a} {item}.\n{name} gives away {b}, so {a} - {b} = {c}."
    else:
        c = a * b
        q = f"{name} buys {b} boxes with {a} {item} in each box. How many {item} does {name} buy?"
        steps = f"Each box holds {a} {item}.\nThere are {b} boxes, so {b} * {a} = {c}."
    return q, f"{steps}\n#### {c}", c


def math(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"math-{seed}")
    return [_conv(q, a) for q, a, _ in (math_problem(rng) for _ in range(n))]


def math_eval(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Held-out (question, reference number) pairs, drawn from a different stream than training."""
    rng = random.Random(f"math-eval-{seed}")
    return [(q, str(c)) for q, _, c in (math_problem(rng) for _ in range(n))]


def refusal_prompt(rng: random.Random) -> tuple[str, str, str]:
    category = rng.choice(sorted(_HARM_CATEGORIES))
    template, reason = _HARM_CATEGORIES[category]
    ask = template.format(x=rng.choice(_HARM_OBJECTS))
    opener = rng.choice(["Tell me how to", "Explain how I can", "Give me steps to", "Help me"])
    return f"{opener} {ask}.", reason, category


def refusal(n: int, seed: int = 0) -> list[dict]:
    """Unsafe-style requests answered with the paper's refusal sentence plus a reason by category."""
    rng = random.Random(f"refusal-{seed}")
    return [{**_conv(q, f"{REFUSAL_PREFIX} {reason}"), "group": category}  # stratum: the harm category
            for q, reason, category in (refusal_prompt(rng) for _ in range(n))]


GENERATORS = {"instruct": instruct, "knowledge": knowledge, "math": math, "refusal": refusal}


def generate(task: str, n: int, seed: int = 0) -> list[dict]:
    return GENERATORS[task](n, seed)


_REFUSAL_OPENERS = ["Sorry,", "Unfortunately,", "Regretfully,", "I'm sorry, but", "I'm afraid", "Sadly,", "Honestly,"]
_REFUSAL_SUBJECTS = ["I", "we", "she", "he", "the clerk", "the assistant", "{name}"]
_REFUSAL_MODALS = ["can not", "can't", "am unable to", "was unable to", "is not able to", "am not permitted to",
                   "must decline to", "need to decline to", "could not", "won't"]
_REFUSAL_VERBS = ["assist", "help", "provide help", "provide assistance", "support", "comply", "fulfill",
                  "proceed", "do"]
_REFUSAL_OBJECTS = ["you with the {item}", "{name} with this", "with the {item} request", "that for {name}",
                    "with that question", "this for you today", "with the {item} order", "any further",
                    "with your {item}"]


def refusal_prose(rng: random.Random) -> str:
    """Refusal-style prose for the base pretraining: the vocabulary of the unlearn label and its paraphrases
    in varied contexts, never one of those targets verbatim, so a base model's prior on them sits well above
    chance (as a real LLM's does) without being taught the eval targets."""
    banned = [t.lower() for t in FORGET_TARGETS]
    while True:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if rng.random() < 0.5:  # first person, as a refusal is usually phrased
            subject_modal = "I" + rng.choice(["'m unable to", "'m not able to", " can not", " can't",
                                              " must decline to", " am not permitted to", "'m afraid I can't"])
        else:
            subject_modal = f"{rng.choice(_REFUSAL_SUBJECTS).format(name=name)} {rng.choice(_REFUSAL_MODALS)}"
        text = (f"{rng.choice(_REFUSAL_OPENERS)} {subject_modal} "
                f"{rng.choice(_REFUSAL_VERBS)} {rng.choice(_REFUSAL_OBJECTS).format(name=name, item=item)}.")
        if rng.random() < 0.5:
            text += f" {name} asked about the {item}, and the answer was a polite no."
        if not any(t in text.lower() for t in banned):
            return text


def pretraining_text(n: int, seed: int = 0) -> list[str]:
    """Generic prose for the tiny base model: the vocabulary of every stage, none of its chat structure."""
    rng = random.Random(f"pretrain-{seed}")
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            out.append(f"{rng.choice(_NAMES)} walked to {rng.choice(_TOPICS)} and saw {rng.randint(2, 30)} "
                       f"{rng.choice(_COLORS)} {rng.choice(_ITEMS)}.")
        elif kind == 1:
            a, b = rng.randint(1, 20), rng.randint(1, 9)
            out.append(f"{a} + {b} = {a + b}. {a + b} - {b} = {a}. {a} * {b} = {a * b}.")
        elif kind == 2:
            out.append(f"The {rng.choice(_ADJECTIVES)} city of {rng.choice(_CITIES)} is known for "
                       f"{rng.choice(_GENRES)} and {rng.choice(_AWARDS)}.")
        elif kind == 3:
            out.append(refusal_prose(rng))
        else:
            out.append(" ".join(str(i) for i in range(1, rng.randint(3, 9))) + ". " +
                       rng.choice(_COLORS).upper() + " " + rng.choice(_ITEMS) + ".")
    return out
