"""Who trains a stage node that several concurrent trials need: a Ray actor hands out one owner per key.

The others wait for the owner's published checkpoint and reuse it, so no node is trained twice. A node whose
owner failed is reported as failed to its waiters instead of leaving them hanging.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from reteq.pipeline import CheckpointStore, Coordinator

ACTOR_NAME = "reteq-node-registry"
POLL_S = 1.0


@ray.remote(num_cpus=0)
class NodeRegistry:
    def __init__(self, finished: dict[str, dict[str, str]]):
        self.done = {k: v.get("checkpoint", "") for k, v in finished.items()}  # key -> checkpoint path
        self.runs = {k: v.get("run_id", "") for k, v in finished.items()}  # key -> MLflow run id
        self.owner: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def lookup(self, key: str) -> tuple[str, str] | None:
        return (self.done[key], self.runs.get(key, "")) if key in self.done else None

    def claim(self, key: str, who: str) -> bool:
        if key in self.done or (key in self.owner and key not in self.failed):
            return False
        self.owner[key] = who
        self.failed.pop(key, None)
        return True

    def finish(self, key: str, path: str | None, error: str | None, run_id: str = "") -> None:
        if error is not None:
            self.failed[key] = error
        else:
            self.done[key] = path or ""
            self.runs[key] = run_id

    def status(self, key: str) -> tuple[str, str]:
        if key in self.done:
            return "done", self.done[key]
        if key in self.failed:
            return "failed", self.failed[key]
        return "running", ""


class RayCoordinator(Coordinator):
    """Client side, used by a trial's main worker."""

    def __init__(self, who: str, fetch=None, run_ids: dict[str, str] | None = None):
        self.registry = ray.get_actor(ACTOR_NAME)
        self.who = who
        self.fetch = fetch  # (key, run_id, target) -> Path: downloads a checkpoint artifact (other machines)
        self.run_ids = run_ids if run_ids is not None else {}  # MLflow run ids of nodes trained here

    def find(self, key: str, store: CheckpointStore) -> Path | None:
        if store.has(key):
            return store.path(key)
        found = ray.get(self.registry.lookup.remote(key))
        if found is None:
            return None
        _, run_id = found
        if self.fetch and run_id:
            return self.fetch(key, run_id, store.path(key))
        return None

    def claim(self, key: str) -> bool:
        return ray.get(self.registry.claim.remote(key, self.who))

    def wait(self, key: str, store: CheckpointStore) -> Path:
        while True:
            state, value = ray.get(self.registry.status.remote(key))
            if state == "done":
                return self.find(key, store) or Path(value)
            if state == "failed":
                raise RuntimeError(f"node {key} failed in another trial: {value}")
            time.sleep(POLL_S)

    def finish(self, key: str, path: Path | None, error: str | None = None) -> None:
        ray.get(self.registry.finish.remote(key, str(path) if path else None, error, self.run_ids.get(key, "")))
