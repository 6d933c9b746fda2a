"""The converter registry and what every converter shares: loading a hub dataset, and row helpers.

Each converter turns an already-loaded `datasets.Dataset` (in the exact columns the hub publishes) into
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` rows. Taking a loaded Dataset rather
than a hub id lets the tests run the very same conversion on small local files in the published schema.
Converter modules (`reteq.data.hub`, `reteq.data.gsm8k`, `reteq.data.refusals`) import this one and
register themselves; `reteq.data.hub` chooses among them. Its `version` string names the transformation;
`reteq data prepare` records it, so a cached copy is rebuilt when the transform changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reteq.config import DataSource
from reteq.errors import MAX_LINE, HubDataError, MalformedRowError

if TYPE_CHECKING:
    from datasets import Dataset

Conversation = dict[str, Any]
ConvertFn = Callable[["Dataset", DataSource], list[Conversation]]


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


def access_help(dataset_id: str) -> str:
    """How to get a dataset that could not be loaded here (gated, private, or no network): short, because it
    ends a one-line error of at most MAX_LINE characters."""
    return (f"gated: `huggingface-cli login` (or HF_TOKEN), accept its terms at "
            f"https://huggingface.co/datasets/{dataset_id}; offline: run `reteq data prepare CONFIG` where there "
            "is access and copy its output folder here")


def load_hub_dataset(source: DataSource, split: str | None = None) -> Dataset:
    """`datasets.load_dataset(id, subset, split=..., revision=...)`, with one clear error when it fails.

    A `subset` that looks like a file in the repository (ends in .json/.jsonl/.parquet/.csv) is passed as
    `data_files`, for hub repos whose default config concatenates several files.
    """
    # lazy: `datasets` only for hub data
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
        where = f"subset={source.subset!r}, split={split!r}, revision={source.revision!r}"
        head, tail = f"cannot load hub dataset {source.id!r} ({where}): {type(e).__name__}: ", \
            f"; {access_help(source.id or '')}"
        # The cause gets what the line has left, so the way out (the tail) is never cut off.
        detail = " ".join(str(e).split())[:max(40, MAX_LINE - len(head) - len(tail))] or type(e).__name__
        raise HubDataError(head + detail + tail) from None


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
