"""Seeded eval samples stratified across groups (SORRY-BENCH categories, TOFU authors), and their hashes.

Why: a sample of N rows should cover as many groups as N allows, whatever the file's order. TOFU stores its
authors one after another (the first N rows cover N / 20 authors); the authors' S_U split is shuffled
(`train_test_split(seed=42)`), so its first N rows are a random draw, not one category, yet a random draw of 64
still misses some of the 44 categories and changes with the split. Taking rows round-robin over the groups, in a
seeded order, covers them evenly either way; every run of a sweep draws the same sample (`eval.sample_seed`),
and its hash is an MLflow param. The paper configs score every forget question (`eval.forget_prompts: all`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

UNGROUPED = ""


def stratified_indices(groups: Sequence[str | None], n: int | str, seed: int) -> list[int]:
    """Indices of a sample of size n ("all" = every row) spread evenly over `groups` (one label per row).

    Groups are visited in a seeded order, each group's rows in a seeded order, one row per group per round;
    rows without a group form one group. The result is sorted (file order), so it does not depend on n's rounds.
    """
    total = len(groups)
    if n == "all" or int(n) >= total:
        return list(range(total))
    rng = random.Random(f"eval-sample-{seed}")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g or UNGROUPED, []).append(i)
    order = sorted(by_group)
    rng.shuffle(order)
    queues = []
    for g in order:
        rows = list(by_group[g])
        rng.shuffle(rows)
        queues.append(rows)
    chosen: list[int] = []
    while len(chosen) < int(n):
        for q in queues:
            if q and len(chosen) < int(n):
                chosen.append(q.pop())
    return sorted(chosen)


def sample_hash(items: Sequence) -> str:
    """sha256 (16 hex) of the sampled items' text: equal hashes mean the same eval questions and targets."""
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()[:16]
