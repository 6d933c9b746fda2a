"""Packing: several variable-length chat samples per row, with boundaries the model cannot see across.

Padding a batch of chat samples to its longest member wastes the compute of every pad token (30-50% on a
lognormal 64..1024 length mix, see docs/performance.md). A packed batch concatenates samples into rows instead:

    input_ids     (R, T)  samples back to back; a row's tail is padded only up to the batch's widest row
    position_ids  (R, T)  restart at 0 at every sample, so rotary embeddings see each sample as if alone
    seq_ids       (R, T)  which sample (0..N-1, the order of `index`) each token belongs to; -1 on padding
    labels        (R, T)  the samples' labels; IGNORE on padding and on every sample's first token, so no
                          token is ever predicted from the previous sample's last token
    index         (N,)    dataset positions of the samples (NPO's reference log-probs are looked up by it)

Attention never crosses samples: `reteq.train.logprobs` turns seq_ids + position_ids into a block-diagonal
causal 4D mask for sdpa/eager, or hands position_ids alone to flash-attention's varlen path (one row, no
padding at all; see `layout_for`). Per-sample summed log-probs come back by a segment sum over seq_ids.

Importing this module needs only torch (no pydantic): the GPU benchmarks in bench/ use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from reteq.data.tokenize import IGNORE

# How a packed batch is laid out for an attention implementation:
#   "rows"   several rows of at most `capacity` tokens, block-diagonal causal 4D mask (sdpa, eager)
#   "varlen" one row holding every sample and no padding; attention boundaries from position_ids alone
#            (flash_attention_2/3: transformers' varlen path; it needs batch size 1)
LAYOUTS = ("rows", "varlen")


class ExampleLike(Protocol):  # reteq.data.tokenize.Example
    input_ids: list[int]
    labels: list[int]
    index: int


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    seq_ids: torch.Tensor  # (R, T), -1 = padding
    labels: torch.Tensor  # (R, T)
    index: torch.Tensor  # (N,) dataset positions, in sample order
    n_tokens: int  # real (non-pad) tokens
    layout: str = "rows"
    slot: int = 0  # which micro-batch of its global step, counted over all workers (seeds its dropout)

    packed = True  # class attribute: lets callers tell a PackedBatch from a padded Batch without importing it

    @property
    def n_sequences(self) -> int:
        return int(self.index.numel())

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.seq_ids.to(device),
                           self.labels.to(device), self.index.to(device), self.n_tokens, self.layout, self.slot)


def is_packed(batch) -> bool:
    return bool(getattr(batch, "packed", False))


def attn_implementation(model) -> str:
    """The attention implementation a (possibly peft- or DeepSpeed-wrapped) HF model runs with."""
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None):
            return str(cfg._attn_implementation)
    return "eager"


def layout_for(model) -> str:
    """"varlen" for flash-attention kernels (transformers packs by position_ids, batch size 1), else "rows"."""
    return "varlen" if "flash" in attn_implementation(model) else "rows"


# ---- assigning samples to rows and micro-batches --------------------------------------------------------------

def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item positions whose lengths sum to <= capacity (an item longer than capacity gets its own bin).

    Deterministic: items are placed longest first (ties by position), each into the first bin it fits.
    """
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max(0, capacity - n))
    return bins


def balance(weights: Sequence[int], slots: int) -> list[list[int]]:
    """Longest-processing-time assignment of items to `slots` groups with near-equal total weight.

    Every slot gets at least one item when there are at least `slots` items. Deterministic (ties by position).
    """
    groups: list[list[int]] = [[] for _ in range(slots)]
    load = [0] * slots
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        s = min(range(slots), key=lambda s: (load[s], len(groups[s]), s))
        groups[s].append(i)
        load[s] += weights[i]
    return groups


# ---- building packed batches ----------------------------------------------------------------------------------

def pack(examples: Sequence[ExampleLike], pad_id: int, capacity: int | None = None, layout: str = "rows",
         rows: list[list[int]] | None = None) -> PackedBatch:
    """Pack `examples` (sample order = list order) into one PackedBatch.

    layout "varlen": one row, no padding. layout "rows": rows of at most `capacity` tokens (default: the
    longest example) by first-fit decreasing, or the given `rows` (lists of positions in `examples`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packing layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if not examples:
        raise ValueError("pack: no examples")
    lengths = [len(e.input_ids) for e in examples]
    if layout == "varlen":
        rows = [list(range(len(examples)))]
    elif rows is None:
        rows = first_fit_decreasing(lengths, capacity or max(lengths))
    width = max(sum(lengths[i] for i in r) for r in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    seq = torch.full((n_rows, width), -1, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            e, n = examples[i], lengths[i]
            ids[r, at:at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            lab = torch.tensor(e.labels, dtype=torch.long)
            lab[0] = IGNORE  # a sample's first token is never a target (it would be predicted across samples)
            labels[r, at:at + n] = lab
            seq[r, at:at + n] = i
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: its own run of positions (never labelled)
    index = torch.tensor([e.index for e in examples], dtype=torch.long)
    return PackedBatch(ids, pos, seq, labels, index, sum(lengths), layout)


def packed_micro_batches(examples: Sequence[ExampleLike], step_indices: list[int], micro_batch: int, rank: int,
                         world: int, pad_id: int, layout: str = "rows") -> list[PackedBatch]:
    """This worker's packed micro-batches of one optimizer step (the packed twin of tokenize.micro_batches).

    Every worker gets exactly as many micro-batches as the padded path gives it (len / (micro x world)), so
    gradient-accumulation boundaries (DeepSpeed counts micro-steps) and collective calls line up across
    workers. The step's samples are balanced over all workers' micro-batches by tokens, not by count (about
    micro_batch x mean-length tokens each), then each micro-batch is packed: "varlen" into one row, "rows" into
    rows no wider than the step's longest sample (the padded path's widest row), at the width that pads least.
    The plan covers the whole global step (per_worker x world slots, the same for 1 worker accumulating and N
    workers: the global batch fixes it) and worker r takes slots r x per_worker onwards, so the global step's
    micro-batches, and so its gradient, do not depend on the worker count; each batch keeps its slot number.
    """
    chosen = [examples[i] for i in step_indices]
    lengths = [len(e.input_ids) for e in chosen]
    per_worker = -(-len(chosen) // (micro_batch * world))  # = gradient-accumulation steps in recipes
    slots = per_worker * world
    if len(chosen) < slots:
        raise ValueError(f"{len(chosen)} samples cannot fill {slots} micro-batches")
    plan = _plan_rows(lengths, slots) if layout == "rows" else [[g] for g in balance(lengths, slots)]
    out = []
    for s in range(rank * per_worker, (rank + 1) * per_worker):
        members = sorted(i for row in plan[s] for i in row)
        local = {i: k for k, i in enumerate(members)}
        rows = [[local[i] for i in row] for row in plan[s]] if layout == "rows" else None
        batch = pack([chosen[i] for i in members], pad_id, layout=layout, rows=rows)
        batch.slot = s
        out.append(batch)
    return out


def _plan_rows(lengths: list[int], slots: int) -> list[list[list[int]]]:
    """Rows (lists of sample positions) of each micro-batch slot, whichever plan computes fewest tokens:
    (a) rows packed over the whole step at the longest sample's width, then balanced over slots by fill;
    (b) samples balanced over slots by tokens, then packed per slot at its least-padded width;
    (c) the padded path's own plan (length-sorted chunks, one sample per row), so packing never loses to it."""
    step_max = max(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # as tokenize.micro_batches
    size = -(-len(lengths) // slots)
    chunks = [order[k:k + size] for k in range(0, len(order), size)]
    padded = [[[i] for i in c] for c in chunks] if len(chunks) == slots else None

    def cost(plan):
        return sum(len(rows) * max(sum(lengths[i] for i in r) for r in rows) for rows in plan)

    by_samples = []
    for g in balance(lengths, slots):
        rows = least_padded_rows([lengths[i] for i in g], step_max)
        by_samples.append([[g[k] for k in row] for row in rows])
    plans = [by_samples]
    bins = first_fit_decreasing(lengths, step_max)
    if len(bins) >= slots:
        plans.insert(0, [[bins[b] for b in sorted(s)] for s in balance([sum(lengths[i] for i in b) for b in bins],
                                                                       slots)])
    if padded is not None:
        plans.append(padded)
    return min(plans, key=cost)  # first of equal cost


def least_padded_rows(lengths: Sequence[int], max_width: int) -> list[list[int]]:
    """First-fit-decreasing rows at the width (<= max_width, >= the longest item) that wastes fewest tokens.

    Rows x width is what a padded row batch computes; wider rows also cost attention (a dense block-diagonal
    mask), hence the cap. Candidates: the longest item times 1, 1.25, 1.5, 2, 3, 4, and max_width.
    """
    longest = max(lengths)
    cands = sorted({min(max_width, max(longest, int(longest * f))) for f in (1, 1.25, 1.5, 2, 3, 4)} | {
        max(longest, max_width)})
    best: tuple[int, int, list[list[int]]] | None = None
    for w in cands:
        rows = first_fit_decreasing(lengths, w)
        cost = len(rows) * max(sum(lengths[i] for i in r) for r in rows)
        if best is None or cost < best[0]:
            best = (cost, w, rows)
    return best[2]


def padding_fraction(batches) -> float:
    """Share of the computed token positions that are padding, for padded or packed batches."""
    total = sum(b.input_ids.numel() for b in batches)
    real = sum(b.n_tokens for b in batches)
    return 0.0 if total == 0 else 1.0 - real / total
