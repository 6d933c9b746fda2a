"""Hub datasets -> chat conversations: choose a converter for a source, load it with `datasets`, convert.

A converter is chosen by `DataSource.converter`, or by the hub id when that is not given. The registry and
the helpers converters share live in `reteq.data.converters`; this module imports every converter module
(the plain question/answer schemas below, GSM8K, SORRY-BENCH), so the registry is complete once it is loaded.

Errors are one line: a malformed source row names the dataset and the row index (it is never silently
dropped); a hub dataset that cannot be loaded (gated, missing, offline) names the dataset and how to get it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from reteq.config import DataSource
from reteq.data import converters as cv
from reteq.data import gsm8k, refusals  # noqa: F401  (importing them registers their converters)
from reteq.data.converters import Conversation, Converter
from reteq.errors import HubDataError, MalformedRowError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("reteq.data")


def converter_for(source: DataSource) -> Converter:
    """The converter named by `source.converter`, else the one registered for `source.id`."""
    registry = cv.CONVERTERS
    name = source.converter
    if name is None:
        matches = [c for c in registry.values() if source.id in c.hub_ids]
        if not matches:
            raise HubDataError(
                f"{source.id}: no converter is registered for this hub id; set `converter` to one of "
                f"{', '.join(sorted(registry))}"
            )
        return matches[0]
    if name.startswith("gsm8k+"):  # GSM8K with a user rewriting hook, e.g. gsm8k+mypkg.rewrite:fn
        return gsm8k.rewriting_converter(name.removeprefix("gsm8k+"))
    if name not in registry:
        raise HubDataError(f"{source.id}: unknown converter {name!r} (known: {', '.join(sorted(registry))}, "
                           "or gsm8k+<rewriter>)")
    return registry[name]


def convert(ds: Dataset, source: DataSource) -> list[Conversation]:
    """Run the converter chosen for `source` on a loaded Dataset; keep the first `source.n` rows if set."""
    conversations = converter_for(source).fn(ds, source)
    if source.n is not None:
        if len(conversations) < source.n:
            log.warning("%s: asked for n=%d rows, the source has %d after conversion; keeping all",
                        source.id, source.n, len(conversations))
        conversations = conversations[: source.n]
    return conversations


def load_hub(source: DataSource) -> list[Conversation]:
    """The conversations of a `kind: hub` source: load with `datasets`, convert, keep the first n rows."""
    if source.kind != "hub" or not source.id:
        raise HubDataError(f"load_hub needs a hub source with an id (got kind={source.kind!r})")
    converter = converter_for(source)
    ds = cv.load_hub_dataset(source, converter.hub_split)
    return convert(ds, source)


# ---- converters for plain question/answer schemas ----------------------------------------------------------
TOFU_QA_PER_AUTHOR = 20  # TOFU `full`: 200 fictitious authors x 20 QA pairs, stored author by author


@cv.register("tofu", version="tofu/2", hub_ids=("locuslab/TOFU",))
def convert_tofu(ds: Dataset, source: DataSource) -> list[Conversation]:
    """TOFU (config `full`): columns `question`, `answer` -> one user/assistant pair each, text unchanged.

    `group` names the author (row // 20: the published order), the stratum of TOFU utility samples.
    """
    name = cv.dataset_label(source)
    cv.require_columns(ds, ("question", "answer"), name)
    return [{**cv.chat(cv.text_field(r, "question", name, i), cv.text_field(r, "answer", name, i)),
             "group": f"author {i // TOFU_QA_PER_AUTHOR}"} for i, r in enumerate(ds)]


@cv.register("instruct_skillmix", version="instruct_skillmix/1", hub_ids=(
    "PrincetonPLI/Instruct-SkillMix-SDD", "PrincetonPLI/Instruct-SkillMix-SDA"))
def convert_instruct_skillmix(ds: Dataset, source: DataSource) -> list[Conversation]:
    """Instruct-SkillMix: `instruction` (+ non-empty `input` as a paragraph) -> user, `output` -> assistant.

    Columns as in the authors' released JSON (princeton-pli/Instruct-SkillMix datasets/ism_sda_k2_1000.json):
    orig_instruction, instruction, input, output, skills_joined_str, query_type. That the SDD hub files use
    the same Alpaca-style columns is an assumption (the SDD card could not be read here); another schema
    fails up front, listing the columns it found.
    """
    name = cv.dataset_label(source)
    cv.require_columns(ds, ("instruction", "output"), name)
    has_input = "input" in ds.column_names
    out = []
    for i, row in enumerate(ds):
        prompt = cv.text_field(row, "instruction", name, i)
        extra = row.get("input") if has_input else None
        if extra is not None and not isinstance(extra, str):
            raise MalformedRowError(name, i, f"column 'input' must be a string (got {extra!r:.60})")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        out.append(cv.chat(prompt, cv.text_field(row, "output", name, i)))
    return out
