"""Test-only fault injection: die by SIGKILL at a named point of a sweep, as a spot preemption would.

Off unless RETEQ_FAULT is set; the chaos tests set it. Format: `POINT[:N[:WHO]]`:
- POINT: `node_step` (a stage node's optimizer step was logged), `node_published` (a node's checkpoint is in
  the store, its MLflow record not yet written), `leaf_eval` (an unlearning eval was logged), `report` (the
  driver closed every run and is about to write the report);
- N: fire at the N-th time this process reaches POINT (default 1);
- WHO: `driver` (default: SIGKILL the `reteq sweep` process, RETEQ_DRIVER_PID, then this process) or
  `worker` (SIGKILL only this process: one Ray Train worker dies, once Train has committed the checkpoints it
  reported, as a preemption minutes later would find them: Train's controller collects reports every 2 s) or
  `node` (stop here, up to 5 min, while the test reclaims this process's whole Ray node, raylet and all, as a
  cloud takes back a spot instance: tests/test_autoscaling.py reads the pid from the mark file).
RETEQ_FAULT_MARK names a file created when the fault fires; while it exists the fault stays off, so a
retried worker or a rerun does not die again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from reteq import environment

# ray.train is imported inside a function: only a Ray Train worker has anything to wait for.

ENV, ENV_MARK, ENV_DRIVER = environment.FAULT, environment.FAULT_MARK, environment.DRIVER_PID

_seen: dict[str, int] = {}


def fault(point: str) -> None:
    spec = environment.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    name, n, who = parts[0], (parts[1:2] or ["1"])[0], (parts[2:3] or ["driver"])[0]
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != int(n):
        return
    mark = environment.get(ENV_MARK)
    if mark:
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point}:{n}:{who} pid {os.getpid()}\n".encode())
        os.close(fd)
    if who == "node":
        print(f"RETEQ_FAULT: waiting at {point} #{n} for this node to be reclaimed", flush=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.5)
        return
    if who == "worker":
        _let_train_commit()
    print(f"RETEQ_FAULT: SIGKILL ({who}) at {point} #{n}", flush=True)
    if who == "driver" and environment.get(ENV_DRIVER):
        os.kill(int(environment.get(ENV_DRIVER)), signal.SIGKILL)
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _let_train_commit() -> None:
    try:  # raises outside a Ray Train worker (an in-process task): nothing to wait for there
        # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
        import ray.train

        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception:
        pass


def fired(mark: str | Path) -> bool:
    return Path(mark).exists()
