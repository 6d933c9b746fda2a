"""GSM8K as clean step-by-step traces ending in `#### <number>`, a rewriting hook, and the test split.

The published `answer` column mixes the reasoning with calculator annotations (`<<48/2=24>>`) and ends with a
line `#### 72`. The paper trains on step-by-step traces that end in `#### <number>`; we strip the annotations,
keep one step per line, and normalise the final number (commas removed) so accuracy can compare strings.

The authors rewrote the traces with an LLM. That is optional here: register a rewriter, a callable
`(question, clean_solution) -> str`, and name it in the stage's converter as `gsm8k+<name>` (or
`gsm8k+package.module:function`, imported on use). A rewrite must still end with the line `#### <number>`
for the same number, or the row is rejected with its index: a rewrite that changes the answer would teach
wrong math.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING

from reteq.config import DataSource
from reteq.data.converters import (
    Conversation,
    Converter,
    chat,
    dataset_label,
    load_hub_dataset,
    register,
    require_columns,
    text_field,
)
from reteq.errors import DataError, HubDataError, MalformedRowError

if TYPE_CHECKING:
    from datasets import Dataset

GSM8K_ID = "openai/gsm8k"
VERSION = "gsm8k/2"  # /2: one number normaliser (3.50 -> 3.5)
TEST_SOURCE = DataSource(kind="hub", id=GSM8K_ID, subset="main", split="test")

Rewriter = Callable[[str, str], str]
REWRITERS: dict[str, Rewriter] = {}

_ANNOTATION = re.compile(r"<<[^<>]*>>")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_ANSWER = re.compile(r"[-+]?\$?[-+]?\d[\d,]*(?:\.\d+)?")  # the first number-like token after '####'


def normalise_number(text: str) -> str | None:
    """The canonical spelling of a number, or None when `text` is not one.

    Commas, '$', a leading '+' and a trailing period go; the value is written without trailing zeros or
    exponent: '1,234' -> '1234', '$5.' -> '5', '7.00' -> '7', '0.50' -> '0.5', '+5' -> '5', '-0' -> '0'.
    """
    token = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(token):
        return None
    value = Decimal(token)
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """THE answer parser, for references and model outputs alike: the normalised first number on the text
    after the last '####' (e.g. '#### $1,234.50.' -> '1234.5'), or None when there is none."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    line = tail.splitlines()[0] if tail else ""
    match = _ANSWER.search(line)
    return normalise_number(match.group(0)) if match else None


def clean_solution(answer: str) -> tuple[str, str]:
    """(trace, number): annotation-free steps, one per line, then `#### <number>`. ValueError if malformed."""
    lines = answer.strip().splitlines()
    finals = [i for i, line in enumerate(lines) if line.strip().startswith("####")]
    if not finals:
        raise ValueError("no final '#### <number>' line")
    last = finals[-1]
    number = normalise_number(lines[last].strip().removeprefix("####"))
    if number is None:
        raise ValueError(f"final line {lines[last].strip()!r} does not hold a number")
    steps = [" ".join(_ANNOTATION.sub("", line).split()) for line in lines[:last]]
    steps = [s for s in steps if s]
    return "\n".join([*steps, f"#### {number}"]), number


def check_rewrite(text: str, reference: str) -> str:
    """A rewritten trace, accepted only if its last line is `#### <reference>` (returned normalised)."""
    if not isinstance(text, str):
        raise ValueError(f"rewriter returned {type(text).__name__}, not str")
    lines = text.strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if not last.startswith("####"):
        raise ValueError("rewrite does not end with a '#### <number>' line")
    number = normalise_number(last.removeprefix("####"))
    if number != reference:
        raise ValueError(f"rewrite ends with {last!r} but the reference answer is {reference}")
    body = [line.rstrip() for line in lines[:-1]]
    return "\n".join([*body, f"#### {number}"]).strip()


# ---- converters --------------------------------------------------------------------------------------------
def _convert(ds: Dataset, source: DataSource, rewriter: Rewriter | None) -> list[Conversation]:
    name = dataset_label(source)
    require_columns(ds, ("question", "answer"), name)
    if source.n is not None and source.n < len(ds):  # no rows are filtered, so the first n suffice (and a
        ds = ds.select(range(source.n))               # costly rewriter is not called on rows that are cut)
    out = []
    for i, row in enumerate(ds):
        question = text_field(row, "question", name, i)
        try:
            trace, number = clean_solution(text_field(row, "answer", name, i))
        except ValueError as e:
            raise MalformedRowError(name, i, f"answer: {e}") from None
        if rewriter is not None:
            try:
                trace = check_rewrite(rewriter(question, trace), number)
            except Exception as e:
                raise MalformedRowError(name, i, f"rewrite rejected: {e}") from None
        out.append(chat(question, trace))
    return out


@register("gsm8k", version=VERSION, hub_ids=(GSM8K_ID, "gsm8k"))
def convert_gsm8k(ds: Dataset, source: DataSource) -> list[Conversation]:
    """GSM8K (config `main`): `question` -> user; `answer` cleaned to steps + `#### <number>` -> assistant."""
    return _convert(ds, source, None)


def register_rewriter(name: str, fn: Rewriter) -> None:
    """Make `fn(question, clean_solution) -> str` available as converter `gsm8k+<name>`."""
    if not callable(fn):
        raise TypeError("a GSM8K rewriter must be callable (question, solution) -> str")
    REWRITERS[name] = fn


def resolve_rewriter(spec: str) -> Rewriter:
    """A registered rewriter name, or an import path `package.module:function`."""
    if spec in REWRITERS:
        return REWRITERS[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise HubDataError(f"GSM8K rewriter {spec!r} cannot be imported: {e}") from None
        if callable(fn):
            return fn
    known = ", ".join(sorted(REWRITERS)) or "none"
    raise HubDataError(f"unknown GSM8K rewriter {spec!r} (registered: {known}; "
                       "or give package.module:function)")


def rewriting_converter(spec: str) -> Converter:
    """The GSM8K converter with a rewriting hook. Its version names the rewriter (and `fn.version` if set)."""
    fn = resolve_rewriter(spec)
    version = f"{VERSION}+rewrite:{spec}" + (f"@{fn.version}" if getattr(fn, "version", None) else "")
    return Converter(f"gsm8k+{spec}", lambda ds, source: _convert(ds, source, fn), version, (GSM8K_ID,),
                     "GSM8K with traces rewritten by a user hook")


# ---- evaluation split -------------------------------------------------------------------------------------
def eval_pairs(conversations: list[Conversation]) -> list[tuple[str, str]]:
    """(question, reference number) of converted GSM8K conversations (first user, last assistant turn)."""
    pairs = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"]
        question = next(m["content"] for m in messages if m["role"] == "user")
        reference = extract_answer(messages[-1]["content"])
        if reference is None:
            raise DataError(f"math eval row {i}: the answer has no '#### <number>' line")
        pairs.append((question, reference))
    return pairs


def load_gsm8k_test(source: DataSource | None = None) -> list[tuple[str, str]]:
    """(question, reference number) pairs of the GSM8K test split, or of `source` (`eval.math_source`)."""
    source = source or TEST_SOURCE
    ds = load_hub_dataset(source)
    return eval_pairs(_convert(ds, source, None))  # _convert keeps the first `source.n` rows
