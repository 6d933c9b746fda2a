"""Hub datasets -> chat conversations: a registry of converters, one per published schema, and `load_hub`.

Each converter turns an already-loaded `datasets.Dataset` (in the exact columns the hub publishes) into
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` rows. Taking a loaded Dataset rather
than a hub id lets the tests run the very same conversion on small local files in the published schema.

A converter is chosen by `DataSource.converter`, or by the hub id when that is not given. Its `version`
string names the transformation; `reteq data prepare` records it, so a cached copy is rebuilt when the
transform changes.

Errors are one line: a malformed source row names the dataset and the row index (it is never silently
dropped); a hub dataset that cannot be loaded (gated, missing, offline) names the dataset and how to get it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reteq.config import DataSource

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("reteq.data")

Conversation = dict[str, Any]
ConvertFn = Callable[["Dataset", DataSource], list[Conversation]]

# Modules whose import registers converters (kept lazy so `reteq.data.hub` imports without `datasets`).
_CONVERTER_MODULES = ("reteq.data.gsm8k", "reteq.data.refusals")


class HubDataError(RuntimeError):
    """A hub dataset could not be loaded or has the wrong shape; the message is a single line."""


class MalformedRowError(ValueError):
    """A source row that cannot be converted. Names the dataset and the row index."""

    def __init__(self, dataset_id: str, index: int, reason: str):
        self.dataset_id, self.index, self.reason = dataset_id, index, reason
        super().__init__(f"{dataset_id}: row {index}: {reason}")


@dataclass(frozen=True)
class Converter:
    """One hub schema -> conversations. `version` changes whenever the produced text would change."""

    name: str
    fn: ConvertFn
    version: str
    hub_ids: tuple[str, ...] = ()
    description: str = ""
    hub_split: str | None = None  # load this split whatever `source.split` says (the converter splits itself)


CONVERTERS: dict[str, Converter] = {}


def register(name: str, *, version: str, hub_ids: tuple[str, ...] = (), description: str = "",
             hub_split: str | None = None) -> Callable[[ConvertFn], ConvertFn]:
    """Decorator: add a converter function to the registry under `name`."""

    def wrap(fn: ConvertFn) -> ConvertFn:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} is registered twice")
        CONVERTERS[name] = Converter(name, fn, version, hub_ids, description or (fn.__doc__ or "").strip(),
                                     hub_split)
        return fn

    return wrap


def _registry() -> dict[str, Converter]:
    for module in _CONVERTER_MODULES:
        importlib.import_module(module)
    return CONVERTERS


def converter_for(source: DataSource) -> Converter:
    """The converter named by `source.converter`, else the one registered for `source.id`."""
    registry = _registry()
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
        from reteq.data.gsm8k import rewriting_converter

        return rewriting_converter(name.removeprefix("gsm8k+"))
    if name not in registry:
        raise HubDataError(f"{source.id}: unknown converter {name!r} (known: {', '.join(sorted(registry))}, "
                           "or gsm8k+<rewriter>)")
    return registry[name]


def transform_version(source: DataSource) -> str:
    return converter_for(source).version


def access_help(dataset_id: str) -> str:
    """How to get a dataset that could not be loaded here (gated, private, or no network)."""
    return (f"if it is gated, log in (`huggingface-cli login` or `hf auth login`, or set HF_TOKEN) and "
            f"accept its terms at https://huggingface.co/datasets/{dataset_id}; without network access, run "
            "`reteq data prepare CONFIG` on a machine that has access and copy its output folder (Parquet "
            "files and manifest.json) here")


def load_hub_dataset(source: DataSource, split: str | None = None) -> Dataset:
    """`datasets.load_dataset(id, subset, split=..., revision=...)`, with one clear error when it fails.

    A `subset` that looks like a file in the repository (ends in .json/.jsonl/.parquet/.csv) is passed as
    `data_files`, for hub repos whose default config concatenates several files.
    """
    import datasets

    split = split or source.split
    kwargs: dict[str, Any] = {"split": split, "revision": source.revision}
    subset = source.subset
    if subset and subset.lower().endswith((".json", ".jsonl", ".parquet", ".csv")):
        kwargs["data_files"], subset = subset, None
    try:
        return datasets.load_dataset(source.id, subset, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # datasets raises many types: ConnectionError, GatedRepoError, FileNotFound...
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        where = f"subset={source.subset!r}, split={split!r}, revision={source.revision!r}"
        raise HubDataError(f"cannot load hub dataset {source.id!r} ({where}): {type(e).__name__}: {detail}; "
                           f"{access_help(source.id or '')}") from None


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
    ds = load_hub_dataset(source, converter.hub_split)
    return convert(ds, source)


# ---- helpers shared by converters --------------------------------------------------------------------------
def chat(user: str, assistant: str, system: str | None = None) -> Conversation:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def require_columns(ds: Dataset, columns: tuple[str, ...], dataset_id: str) -> None:
    """Fail before converting anything when the published schema is not what the converter reads."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise HubDataError(f"{dataset_id}: missing column(s) {missing}; found {ds.column_names}. The "
                           "published schema may have changed: pin `revision` or pick another `converter`")


def text_field(row: dict[str, Any], column: str, dataset_id: str, index: int, *,
               allow_empty: bool = False) -> str:
    """`row[column]` as a stripped string, or a MalformedRowError naming dataset, row and column."""
    value = row.get(column)
    if not isinstance(value, str):
        raise MalformedRowError(dataset_id, index, f"column {column!r} must be a string (got {value!r:.60})")
    value = value.strip()
    if not value and not allow_empty:
        raise MalformedRowError(dataset_id, index, f"column {column!r} is empty")
    return value


def dataset_label(source: DataSource) -> str:
    return source.id or source.path or "hub"


# ---- converters for plain question/answer schemas ----------------------------------------------------------
@register("tofu", version="tofu/1", hub_ids=("locuslab/TOFU",))
def convert_tofu(ds: Dataset, source: DataSource) -> list[Conversation]:
    """TOFU (config `full`): columns `question`, `answer` -> one user/assistant pair each, text unchanged."""
    name = dataset_label(source)
    require_columns(ds, ("question", "answer"), name)
    return [chat(text_field(r, "question", name, i), text_field(r, "answer", name, i))
            for i, r in enumerate(ds)]


@register("instruct_skillmix", version="instruct_skillmix/1", hub_ids=(
    "PrincetonPLI/Instruct-SkillMix-SDD", "PrincetonPLI/Instruct-SkillMix-SDA"))
def convert_instruct_skillmix(ds: Dataset, source: DataSource) -> list[Conversation]:
    """Instruct-SkillMix: `instruction` (+ non-empty `input` as a paragraph) -> user, `output` -> assistant.

    Columns as in the authors' released JSON (princeton-pli/Instruct-SkillMix datasets/ism_sda_k2_1000.json):
    orig_instruction, instruction, input, output, skills_joined_str, query_type. That the SDD hub files use
    the same Alpaca-style columns is an assumption (the SDD card could not be read here); another schema
    fails up front, listing the columns it found.
    """
    name = dataset_label(source)
    require_columns(ds, ("instruction", "output"), name)
    has_input = "input" in ds.column_names
    out = []
    for i, row in enumerate(ds):
        prompt = text_field(row, "instruction", name, i)
        extra = row.get("input") if has_input else None
        if extra is not None and not isinstance(extra, str):
            raise MalformedRowError(name, i, f"column 'input' must be a string (got {extra!r:.60})")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        out.append(chat(prompt, text_field(row, "output", name, i)))
    return out
