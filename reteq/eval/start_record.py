"""Step 0 evaluated once per start checkpoint (execution.share_start_eval): the shared start record.

Every leaf of a path starts from the same model: its parent node's checkpoint (with `unlearn.adapter: fresh`, a
new LoRA seeded by the leaf's seed whose B is zero, so it adds exactly nothing). A design with 13 methods x 3 lrs
evaluated that model 39 times. Now the first leaf to get there evaluates it and publishes the raw step-0 metrics
and the probe's step-0 vectors (the start record, a JSON file with its sha256) in the sweep's MLflow store
(reteq.sweep.record.MlflowHooks); every later leaf with the same `start_key` reads them instead.

Why the numbers are the same as the leaf's own (tests/test_start_record.py checks it bit for bit): before step 0
a leaf only loads the parent checkpoint (plus the seeded fresh adapter), theta_r's probe reference, and the
method's no-grad reference pass (reteq.train.reference: eval mode, restored after); no method hooks or changes
the model before its first optimizer step (the 13 in reteq.algorithms define losses only), and evaluation forks
the RNG it samples with (reteq.eval.generation) and restores train/eval mode, so skipping it leaves training
unchanged. `start_key` holds everything else the step-0 numbers read: the parent and theta_r node keys, the
leaf's seed (the adapter's and math sampling's), the model config, the adapter mode, the chat template, the
whole eval config (dtype, samples, schedule, math), the eval samples' and probe's content hashes, the vocabulary,
and the worker's precision and numerics (training and scoring dtype, the bf16 base, denormal flushing) with the
device, its CPU capability or GPU name, and the torch version (reteq.pipeline.leaf.start_key). The method, lr
and knobs are not in it.

This module imports neither torch nor MLflow: the sweep's record module (light processes import it) reads it.

Only single-worker leaves share (ctx.world == 1): ranks of a multi-worker leaf could disagree on a hit, and
under ZeRO-3 a rank that skips the evaluation would leave the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from reteq.errors import ReteqError

FORMAT = 1  # bump when the record's content or meaning changes: older records stop matching
FILE = "start_record.json"


def encode(key: str, raw: dict[str, float], probe_rows: list[dict[str, Any]]) -> tuple[bytes, str]:
    """The record's bytes and their sha256. JSON floats round-trip exactly (repr), NaN included."""
    body = json.dumps({"format": FORMAT, "key": key, "raw": raw, "probe_rows": probe_rows}).encode()
    return body, hashlib.sha256(body).hexdigest()


class BadRecord(ReteqError, ValueError):
    """A start record that is unreadable, does not match its sha256, or is not the record of this key."""


def decode(body: bytes, sha256: str, key: str) -> dict[str, Any]:
    """The record in `body` after checking its sha256 and key; BadRecord otherwise."""
    if hashlib.sha256(body).hexdigest() != sha256:
        raise BadRecord("its sha256 does not match the one it was published with")
    try:
        record = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRecord(f"not JSON: {e}") from e
    if not isinstance(record, dict) or record.get("key") != key or record.get("format") != FORMAT:
        raise BadRecord("it is the record of another key or format")
    if not isinstance(record.get("raw"), dict) or not isinstance(record.get("probe_rows"), list):
        raise BadRecord("it lacks the raw metrics or the probe rows")
    return record
