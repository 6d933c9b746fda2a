"""Shared-prefix scoring: every prompt is encoded once, all of its targets are scored in the same forward.

The forget score asks for log p(target | question) for the unlearn label and its 19 paraphrases on every forget
question: 20 pairs that share a ~100-token prompt and differ in ~8 target tokens. Scored pair by pair, 90% of
the tokens are the same prompt again. Here each prompt becomes a small tree, laid out in one row:

    [ prompt (positions 0..P-1) | target 1 (P..) | target 2 (P..) | ... | target k (P..) ]

with a 4D attention mask in which the prompt is causal, and every target token sees the whole prompt plus the
earlier tokens of its own target only (tree attention). Position ids restart at P for each target, so each
target sees exactly the context it has in the plain path. The first token of every target is predicted from
the prompt's last position; later ones from the previous token of the same target. Several trees share a row,
rows are batched under a token budget, and only the positions that predict a target token are projected onto
the vocabulary (`logits_to_keep`). Same numbers as the padded path (`scoring.score_pairs_padded`) to float
rounding; likelihood evaluations with one target per prompt (TOFU answers) still gain from packing.

Needs an attention implementation that takes a custom 4D mask (sdpa or eager); `scoring.score_pairs` falls
back to the padded path otherwise (e.g. flash_attention_2). Import-light (torch only) for bench/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reteq.data.packing import attn_implementation, first_fit_decreasing
from reteq.train.logprobs import accepts_logits_to_keep
from reteq.train.precision import autocast

TREE_ATTENTION = ("sdpa", "eager")


def supports_tree_attention(model) -> bool:
    return attn_implementation(model) in TREE_ATTENTION


@dataclass
class _Tree:
    prompt: list[int]
    targets: list[tuple[int, list[int]]]  # (pair index, target ids)

    @property
    def size(self) -> int:
        return len(self.prompt) + sum(len(t) for _, t in self.targets)


def build_trees(pairs: list[tuple[list[int], list[int]]], max_tree_tokens: int) -> list[_Tree]:
    """Group pairs by identical prompt (first-seen order); split a group whose tree would exceed the budget."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(pairs):
        groups.setdefault(tuple(p), []).append(i)
    trees = []
    for prompt, members in groups.items():
        cur = _Tree(list(prompt), [])
        for i in members:
            t = list(pairs[i][1])
            if cur.targets and cur.size + len(t) > max_tree_tokens:
                trees.append(cur)
                cur = _Tree(list(prompt), [])
            cur.targets.append((i, t))
        trees.append(cur)
    return trees


def _layout_row(trees: list[_Tree], width: int, pad_id: int):
    """One row: token ids, position ids, (tree, branch) ids for the mask, and the (source column, target
    token, pair index) of every scored token."""
    ids = torch.full((width,), pad_id, dtype=torch.long)
    pos = torch.zeros(width, dtype=torch.long)
    tree = torch.full((width,), -1, dtype=torch.long)
    branch = torch.zeros(width, dtype=torch.long)
    scored: list[tuple[int, int, int]] = []
    at = 0
    for g, tr in enumerate(trees):
        p = len(tr.prompt)
        ids[at:at + p] = torch.tensor(tr.prompt, dtype=torch.long)
        pos[at:at + p] = torch.arange(p)
        tree[at:at + p] = g
        last_prompt = at + p - 1
        at += p
        for b, (pair, t) in enumerate(tr.targets, start=1):
            n = len(t)
            if n == 0:
                continue
            ids[at:at + n] = torch.tensor(t, dtype=torch.long)
            pos[at:at + n] = torch.arange(p, p + n)
            tree[at:at + n] = g
            branch[at:at + n] = b
            scored.append((last_prompt, t[0], pair))
            scored.extend((at + j - 1, t[j], pair) for j in range(1, n))
            at += n
    pos[at:] = torch.arange(width - at)
    return ids, pos, tree, branch, scored


def tree_mask(tree: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R, 1, T, T): q sees k iff same tree, k not after q, and k is in the prompt or in q's own target.
    Padding (tree -1) sees padding, so no query row is fully masked. bool for sdpa; additive float for eager."""
    idx = torch.arange(tree.size(1), device=tree.device)
    same = tree[:, :, None] == tree[:, None, :]
    causal = idx[None, :] <= idx[:, None]
    own = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = (same & causal[None] & own)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=tree.device).masked_fill(~allowed, torch.finfo(dtype).min)


def plan(pairs: list[tuple[list[int], list[int]]], batch_size: int, row_tokens: int,
         ) -> tuple[list[_Tree], list[tuple[list[list[int]], int]]]:
    """Trees, and the forwards: (rows as lists of tree positions, row width) under the token budget."""
    longest_pair = max(len(p) + len(t) for p, t in pairs)
    width_cap = max(row_tokens, longest_pair)
    budget = max(batch_size * longest_pair, width_cap)
    trees = build_trees(pairs, width_cap)
    bins = first_fit_decreasing([t.size for t in trees], width_cap)
    bins.sort(key=lambda b: -sum(trees[i].size for i in b))
    forwards = []
    start = 0
    while start < len(bins):
        width = max(sum(trees[i].size for i in bins[start]), 1)
        n_rows = max(1, min(len(bins) - start, budget // width))
        forwards.append((bins[start:start + n_rows], width))
        start += n_rows
    return trees, forwards


PICK_ROWS = 16  # positions per log-softmax chunk: a 16 x 49k fp32 buffer (3 MB) stays in cache; 256 rows: 6x slower


def picked_logps(logits: torch.Tensor, row_of: torch.Tensor, col: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log p(tok[i] | position (row_of[i], col[i])) in fp32, PICK_ROWS positions at a time. The same numbers as
    one log_softmax over all picked rows (it is row-wise), without materialising an (N, vocab) copy in bf16 and
    another in fp32: at SmolLM2's 49k vocabulary those were 860 x 49k and cost 6% of bf16 scoring."""
    out = torch.empty(len(tok), dtype=torch.float32, device=logits.device)
    for start in range(0, len(tok), PICK_ROWS):
        end = start + PICK_ROWS
        rows = logits[row_of[start:end], col[start:end]].float()
        out[start:end] = torch.log_softmax(rows, dim=-1).gather(-1, tok[start:end, None])[:, 0]
    return out


@torch.no_grad()
def score_pairs_shared(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 32,
                       device: torch.device | None = None, dtype: str = "fp32", row_tokens: int = 512,
                       ) -> list[float]:
    """Mean per-token log p(target | prompt) for each (prompt_ids, target_ids) pair (0.0 for an empty target).

    Memory matches the padded path's: a forward holds at most batch_size x (longest pair) tokens (and at least
    one row); rows are `row_tokens` wide (or the longest tree), filled with trees by first-fit decreasing.
    """
    if not pairs:
        return []
    if not supports_tree_attention(model):
        raise ValueError(f"tree attention needs sdpa or eager attention, not {attn_implementation(model)}")
    device = device or next(model.parameters()).device
    trees, forwards = plan(pairs, batch_size, row_tokens)
    eager = attn_implementation(model) == "eager"
    keep_ok = accepts_logits_to_keep(model)
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    counts = torch.tensor([len(t) for _, t in pairs], dtype=torch.float64)
    was_training = model.training
    model.eval()
    for chunk, width in forwards:
        rows = [_layout_row([trees[i] for i in b], width, pad_id) for b in chunk]
        ids = torch.stack([r[0] for r in rows]).to(device)
        pos = torch.stack([r[1] for r in rows]).to(device)
        tree = torch.stack([r[2] for r in rows]).to(device)
        branch = torch.stack([r[3] for r in rows]).to(device)
        row_of = torch.tensor([k for k, r in enumerate(rows) for _ in r[4]], dtype=torch.long)
        col = torch.tensor([s[0] for r in rows for s in r[4]], dtype=torch.long)
        tok = torch.tensor([s[1] for r in rows for s in r[4]], dtype=torch.long, device=device)
        pair = torch.tensor([s[2] for r in rows for s in r[4]], dtype=torch.long)
        if col.numel() == 0:
            continue
        mask = tree_mask(tree, branch, torch.float32 if eager else None)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": False}
        if keep_ok:  # project only the columns that predict a target token (union over the rows)
            keep, col = torch.unique(col, return_inverse=True)
            kwargs["logits_to_keep"] = keep.to(device)
        with autocast(dtype, device):
            logits = model(**kwargs).logits
        logp = picked_logps(logits, row_of.to(device), col.to(device), tok)
        sums.index_add_(0, pair, logp.double().cpu())
    model.train(was_training)
    return (sums / counts.clamp_min(1)).tolist()
