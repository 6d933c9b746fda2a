"""The forget set S_U: SORRY-BENCH prompts answered by a fixed refusal sentence plus a short category reason.

Only refusals are produced: the unsafe prompts are kept as questions and every response declines. The
refusal always starts with the paper's unlearn label sentence, so the forget score (log-prob of "Sorry, I can
not assist you") measures exactly what S_U taught. The reason comes from a small table keyed by SORRY-BENCH's
44 categories (the authors generated reasons with GPT-4o; a table keeps the data offline and reproducible).

Schema of `sorry-bench/sorry-bench-202503` (gated, config `default`, split `train`): question_id (int64),
category (string "1".."44"; ints are accepted too), turns (list of user turns), prompt_style (string).
440 base prompts x 21 styles = 9,240 rows. Styles whose text is encoded or deliberately misspelled are dropped,
as in the paper. Each conversation carries `group` = its category, for stratified eval samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from reteq.config import DataSource
from reteq.data.converters import Conversation, dataset_label, register, require_columns
from reteq.data.synthetic import REFUSAL_PREFIX
from reteq.errors import HubDataError, MalformedRowError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("reteq.data")

SORRY_BENCH_ID = "sorry-bench/sorry-bench-202503"
SORRY_BENCH_COLUMNS = ("question_id", "category", "turns", "prompt_style")
_ROW = "__reteq_row__"
# The paper's text drops these prompt styles (converter `sorry_bench`).
DROPPED_STYLES = frozenset({"ascii", "atbash", "caesar", "morse", "misspellings"})
# The authors' script (data/create_safety_dataset.py), verbatim: its drop list spells caesar "ceasar", so the
# caesar rows stay; it also drops two translations. 15 styles x 440 = 6,600 rows, split 70/30 with seed 42 by
# `datasets.Dataset.train_test_split`: 4,620 train rows (converter `sorry_bench_authors`).
AUTHORS_DROPPED_STYLES = frozenset({"ascii", "atbash", "ceasar", "morse", "translate-fr", "translate-mr",
                                    "misspellings"})
AUTHORS_TEST_FRACTION, AUTHORS_SPLIT_SEED = 0.3, 42

# Known upstream defects, skipped with a warning (never silently) so a real `prepare` is not blocked by them:
# (question_id, prompt_style) -> why. Only skipped while the row is actually malformed.
KNOWN_UPSTREAM_DEFECTS: dict[tuple[str, str], str] = {
    ("167", "question"): "turns is [None] upstream (reported by other SORRY-BENCH pipelines)",
}

_REASONS: dict[str, tuple[int, ...]] = {
    "Producing insults, threats, obscene or defamatory content would hurt real people.": (1, 2, 3, 4, 5),
    "I don't want to contribute to anyone getting hurt; if you are struggling, please reach out to "
    "someone you trust or a local crisis line.": (6,),
    "It could help someone hurt, harass or abuse other people.": (7, 8, 9),
    "It could help someone break the law or cheat other people.": (10, 11, 14, 15, 16, 23),
    "It could be used to break into or damage computer systems.": (12, 13),
    "It could violate someone's privacy.": (17,),
    "It could help cause serious physical harm.": (18, 19, 24, 31),
    "It could put children at risk.": (20,),
    "It could harm animals or the environment.": (21, 22),
    "I don't produce sexually explicit or graphic content.": (25, 26, 27),
    "It would spread false or misleading information.": (28, 29, 37, 38),
    "It would promote discrimination, stereotypes or extremism.": (30, 35, 36),
    "I shouldn't push a personal view on divisive political, ethical or religious questions.": (32, 33, 34),
    "It could encourage unhealthy or dangerous behaviour.": (39,),
    "It needs advice from a qualified professional who knows your situation.": (40, 41, 42, 43, 44),
}
CATEGORY_REASON: dict[int, str] = {c: reason for reason, cats in _REASONS.items() for c in cats}
assert sorted(CATEGORY_REASON) == list(range(1, 45)), "every SORRY-BENCH category needs exactly one reason"


def refusal(category: int) -> str:
    """The assistant response for a prompt of this SORRY-BENCH category."""
    return f"{REFUSAL_PREFIX} {CATEGORY_REASON[category]}"


def _category(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        return None
    return number if number in CATEGORY_REASON else None


def _turns(value: Any) -> list[str] | None:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(t, str) and t.strip() for t in value):
        return None
    return [t.strip() for t in value]


def _row_problem(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("prompt_style"), str):
        return f"prompt_style must be a string (got {row.get('prompt_style')!r:.40})"
    if _category(row.get("category")) is None:
        return f"category must be a SORRY-BENCH category number 1..44 (got {row.get('category')!r:.40})"
    if _turns(row.get("turns")) is None:
        return f"turns must be a non-empty list of non-empty strings (got {row.get('turns')!r:.80})"
    return None


def _refusal_conversations(rows: Iterable[tuple[int, dict[str, Any]]], name: str,
                           dropped: frozenset[str], first_turn_only: bool = False) -> list[Conversation]:
    """Refusal conversations for (source row index, row) pairs; a malformed row raises with its index.

    first_turn_only: only `turns[0]`, as the authors' script prompts GPT-4o with.
    """
    out = []
    for i, row in rows:
        if row.get("prompt_style") in dropped:
            continue
        problem = _row_problem(row)
        if problem:
            known = KNOWN_UPSTREAM_DEFECTS.get((str(row.get("question_id")), str(row.get("prompt_style"))))
            if known is None:
                raise MalformedRowError(name, i, problem)
            log.warning("%s: row %d skipped: known upstream defect: %s", name, i, known)
            continue
        category = _category(row["category"])
        response = refusal(category)  # type: ignore[arg-type]
        turns = _turns(row["turns"]) or []
        messages: list[dict[str, str]] = []
        for turn in turns[:1] if first_turn_only else turns:  # else a refusal after every user turn
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": response}]
        out.append({"messages": messages, "group": f"category {category}"})
    return out


@register("sorry_bench", version="sorry_bench/2", hub_ids=(SORRY_BENCH_ID,))
def convert_sorry_bench(ds: Dataset, source: DataSource) -> list[Conversation]:
    """SORRY-BENCH minus the ascii/atbash/caesar/morse/misspellings styles; refusal + category reason."""
    name = dataset_label(source)
    require_columns(ds, SORRY_BENCH_COLUMNS, name)
    return _refusal_conversations(enumerate(ds), name, DROPPED_STYLES)


@register("sorry_bench_authors", version="sorry_bench_authors/2", hub_split="train")
def convert_sorry_bench_authors(ds: Dataset, source: DataSource) -> list[Conversation]:
    """S_U as the authors built it (data/create_safety_dataset.py), row for row.

    Their filter (drop list verbatim, "ceasar" included, so caesar rows stay), then their split: the very
    `datasets` call they make, `train_test_split(test_size=0.3, seed=42)`, on the rows in published order.
    `source.split` picks the part: `train` (4,620 of 6,600 rows: the paper's ~4.5k S_U) or `test` (1,980).
    Only `turns[0]` is used, as their script does. Errors name the row index in the published split.
    """
    name = dataset_label(source)
    require_columns(ds, SORRY_BENCH_COLUMNS, name)
    if source.split not in ("train", "test"):
        raise HubDataError(f"{name}: converter sorry_bench_authors takes split train or test, "
                           f"not {source.split!r}")
    indexed = ds.add_column(_ROW, list(range(len(ds))))
    kept = indexed.filter(lambda style: style not in AUTHORS_DROPPED_STYLES, input_columns="prompt_style")
    part = kept.train_test_split(test_size=AUTHORS_TEST_FRACTION, seed=AUTHORS_SPLIT_SEED)[source.split]
    return _refusal_conversations(((r[_ROW], r) for r in part), name, AUTHORS_DROPPED_STYLES,
                                  first_turn_only=True)
