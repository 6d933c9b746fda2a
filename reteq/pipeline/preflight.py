"""Everything that can be wrong with a sweep's input, checked before any training starts (raises BadInput
subclasses): model sources, stage data, the math eval set, and whether every row fits its length limit."""

from __future__ import annotations

from collections.abc import Callable

from reteq.config import SweepConfig
from reteq.data.tokenize import IGNORE, configure_chat, encode_conversation
from reteq.errors import DataError
from reteq.models import load_tokenizer, resolve_source
from reteq.pipeline.context import DataCache


def preflight(cfg: SweepConfig, data: DataCache, report: Callable[[str], None] | None = None) -> None:
    """Everything that can be wrong with the input, checked before any training starts (raises BadInput);
    `report` gets one line per stage, model and length limit: how many rows it truncates."""
    for m in cfg.models:
        resolve_source(m)  # raises ModelError for a missing local path
    for s in cfg.stages:
        try:
            data.stage(s.name)
        except DataError as e:
            raise DataError(f"stages.{s.name}.source: {e}") from None
    try:
        data.math_items()
    except DataError as e:
        raise DataError(f"eval.math_source: {e}") from None
    check_rows_fit(cfg, data, report)


def check_rows_fit(cfg: SweepConfig, data: DataCache, report: Callable[[str], None] | None = None) -> None:
    """Every training row keeps at least one assistant token after truncation to its max_length: a row whose
    prompt fills it would train on nothing (an all-ignored batch is a NaN loss hours into a sweep). And
    truncation is visible: each stage's count of rows longer than its limit is reported, and a share above
    `stages[*].max_truncated_frac` stops here (a cut answer trains on a different target than the authors')."""
    for m in cfg.models:
        tokenizer = configure_chat(load_tokenizer(m), cfg.chat)
        for s in cfg.stages:
            limits = [(s.max_length, f"stages.{s.name}.max_length")]
            if s.name == cfg.forget_stage:
                limits.append((cfg.unlearn.max_length, "unlearn.max_length"))
            origin = s.source.path or s.source.id or f"synthetic:{s.source.task}"
            rows = [encode_conversation(tokenizer, conv, _UNLIMITED, i) for i, conv in enumerate(data.stage(s.name))]
            for limit, where in limits:
                for e in rows:
                    if all(label == IGNORE for label in e.labels[:limit]):
                        raise DataError(f"stages.{s.name}.source: {origin}: row {e.index}: messages: no assistant "
                                        f"token fits in {limit} tokens ({where}, model {m.name})")
                over, line = truncation(rows, limit)
                if report is not None:
                    report(f"{where} = {limit}, model {m.name}: {line}")
                if over > s.max_truncated_frac * len(rows):
                    raise DataError(f"{where}: {line}, above stages.{s.name}.max_truncated_frac "
                                    f"({s.max_truncated_frac:g}) (model {m.name}); raise the limit or the share")


_UNLIMITED = 1 << 30  # encode whole rows; each limit is applied by slicing


def truncation(rows, limit: int) -> tuple[int, str]:
    """(rows longer than `limit` tokens, one line saying so with the longest row's length)."""
    lengths = [len(e.input_ids) for e in rows]
    over = sum(n > limit for n in lengths)
    share = over / len(lengths) if lengths else 0.0
    return over, f"{over} of {len(lengths)} rows ({share:.1%}) exceed {limit} tokens (longest {max(lengths, default=0)})"
