"""The life of a run in the record: a node or leaf counts once, and a run that did not finish says why.

Only a run MLflow calls FINISHED is a result, and each node or leaf key has at most one. A process that dies
(spot preemption, SIGKILL, OOM) cannot close its own run, so closing is done by whoever outlives it: the
trial that saw its worker group die, or the next attempt of the sweep, which holds the work dir's lock and so
knows every RUNNING run of an earlier attempt is dead. Any scheduler calls these functions; none of them
trains or waits.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from reteq import tracking as T
from reteq.mlflow_store import COUNTED, finished_runs
from reteq.mlflow_store import search_runs as search
from reteq.redact import redact

# mlflow.entities is imported inside functions: rank.py imports this module in light Tune trials. What records a
# reused node or counts failed children (work of the driver and the ranks, which load MLflow) is in reteq.sweep.record.

_MLFLOW_STATUS = {T.STATUS_DONE: T.RUN_FINISHED, T.STATUS_COLLAPSED: T.RUN_FINISHED, T.STATUS_KILLED: T.RUN_KILLED}


def new_attempt() -> str:
    """An id for one `reteq sweep` process: host, pid, start time (what an operator needs to find it)."""
    return f"{socket.gethostname()}/{os.getpid()}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}/" \
           f"{uuid.uuid4().hex[:6]}"


def finish_run(c, run_id: str, status: str, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
    """End a run: its tags first (one batch), then the MLflow status, so a FINISHED run is always complete."""
    # lazy: `reteq plan` and light Tune trials import this module without MLflow
    from mlflow.entities import RunTag

    values = {**(tags or {}), T.TAG_STATUS: status}
    if reason:
        values[T.TAG_ERROR] = redact(reason)[:4000]
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])
    c.set_terminated(run_id, _MLFLOW_STATUS.get(status, T.RUN_FAILED))


def close_stale_runs(c, exp_id: str, sweep: str, attempt: str) -> int:
    """Close the RUNNING runs that earlier attempts of this sweep left behind; returns how many.

    Call it while holding the work dir's lock: no other live process of this sweep can own them. A run whose
    reteq.status already says done logged everything before that tag (artifact, metrics), so it is finished
    rather than killed, unless its key already has a finished run.
    """
    closed = 0
    for r in search(c, exp_id, f"attributes.status = '{T.RUN_RUNNING}' and tags.`{T.TAG_SWEEP}` = '{sweep}'"):
        tags = r.data.tags
        if tags.get(T.TAG_ATTEMPT) == attempt or tags.get(T.TAG_KIND) == T.KIND_SWEEP:
            continue
        rid, key = r.info.run_id, tags.get(T.TAG_PLAN_KEY, "")
        if tags.get(T.TAG_STATUS) in COUNTED and not (key and finished_runs(c, exp_id, key)):
            c.set_terminated(rid, T.RUN_FINISHED)
            continue
        who = tags.get(T.TAG_ATTEMPT) or "an earlier attempt"
        finish_run(c, rid, T.STATUS_KILLED, f"unfinished: the process of {who} died (closed by {attempt})")
        closed += 1
    return closed


def close_trial_runs(c, exp_id: str, attempt: str, trial: str, status: str, reason: str) -> int:
    """Close the RUNNING runs one trial of this attempt started (its worker group died or failed)."""
    runs = search(c, exp_id, f"attributes.status = '{T.RUN_RUNNING}' and tags.`{T.TAG_ATTEMPT}` = '{attempt}' "
                             f"and tags.`{T.TAG_TRIAL}` = '{trial}'")
    for r in runs:
        finish_run(c, r.info.run_id, status, reason)
    return len(runs)


def close_attempt_runs(c, exp_id: str, attempt: str, reason: str) -> int:
    """The driver's last word when it fails: every run this attempt left RUNNING ends FAILED."""
    runs = search(c, exp_id, f"attributes.status = '{T.RUN_RUNNING}' and tags.`{T.TAG_ATTEMPT}` = '{attempt}'")
    runs = [r for r in runs if r.data.tags.get(T.TAG_KIND) != T.KIND_SWEEP]
    for r in runs:
        finish_run(c, r.info.run_id, T.STATUS_FAILED, reason)
    return len(runs)
