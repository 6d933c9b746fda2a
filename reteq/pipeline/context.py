"""What the work of a node or leaf runs in: one RunContext (the config, the plan, the WorkerContext, this
machine's checkpoint store, the cached data, the progress hooks), built once per process by `reteq run-path`, or
in each Ray task, Tune trial or Train worker of `reteq sweep` (reteq.sweep.rank.rank_run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reteq.config import SweepConfig
from reteq.data.prepare import lookup_prepared, read_prepared
from reteq.data.sources import load_conversations, load_math_eval
from reteq.plan import Plan, RetrainRecord, StageNode, UnlearnLeaf
from reteq.train import collectives
from reteq.train.checkpoint import CheckpointError, discard, is_complete
from reteq.train.recipes import UnlearnResult
from reteq.train.worker_context import WorkerContext
from reteq.workdir import data_home, resolve_work_dir


class Hooks:
    """Progress sinks; the default does nothing. Called on the main worker only."""

    def node_skipped(self, node: StageNode, path: Path) -> None: ...
    def node_started(self, node: StageNode) -> None: ...
    def node_resumed(self, node: StageNode, step: int) -> None: ...  # after node_started: steps already done
    def node_step(self, node: StageNode, record) -> None: ...
    def node_done(self, node: StageNode, path: Path, stats: dict[str, Any]) -> None: ...
    def run_params(self, key: str, params: dict[str, str]) -> None: ...  # after node/leaf_started
    def leaf_started(self, leaf: UnlearnLeaf) -> None: ...
    def leaf_step(self, leaf: UnlearnLeaf, record) -> None: ...
    def leaf_eval(self, leaf: UnlearnLeaf, step: int, metrics: dict[str, float]) -> None: ...
    def leaf_done(self, leaf: UnlearnLeaf, result: UnlearnResult) -> None: ...
    def retrain_started(self, rec: RetrainRecord, node_run_id: str, checkpoint: Path) -> None: ...
    def retrain_done(self, rec: RetrainRecord, metrics: dict[str, float]) -> None: ...

    def start_record(self, key: str) -> tuple[dict, str] | None:
        """The verified start record of start key `key` (reteq.eval.start_record) and where it came from, or None
        when these hooks know none (a corrupt or unreadable one is ignored, with a warning)."""
        return None

    def publish_start_record(self, leaf_key: str, key: str, body: bytes, sha256: str) -> None:
        """Publish the start record of `key` (its bytes and sha256) that leaf `leaf_key` computed."""

    def start_source(self, leaf_key: str, source: str) -> None:
        """Say where leaf `leaf_key`'s step-0 metrics came from ("computed", or the run whose record it read)."""

    def run_id(self, key: str) -> str:
        """The id of the run these hooks recorded `key` in ("" when they record nowhere)."""
        return ""

    def fail_open_runs(self, error: str) -> None:
        """The work failed with `error`: end every run these hooks left open, saying why."""


@dataclass
class CheckpointStore:
    """This machine's published checkpoints, by node key. `fetch` (reteq.sweep.delivery) copies a node published
    elsewhere (another machine, via MLflow) into it; None in one process, where everything is local."""

    root: Path
    fetch: Callable[[str, Path], Path | None] | None = None

    def path(self, key: str) -> Path:
        return Path(self.root) / key

    def has(self, key: str) -> bool:
        """True for a complete, verified checkpoint; a corrupt or partial copy is removed (never loaded, never
        kept), so whatever repairs it (an MLflow artifact, or retraining) publishes into an empty place."""
        if is_complete(self.path(key), key):
            return True
        discard(self.path(key))
        return False

    def ensure_local(self, key: str, ctx: WorkerContext) -> Path:
        """Call on EVERY rank before loading `key`. Only each machine's local rank 0 reads the store: it verifies
        the checkpoint (sha256) and fetches a missing or corrupt one; the other ranks wait for its word (one
        all-gather, so a machine that cannot get it fails every rank with its reason instead of hanging one)."""
        error = None
        if ctx.local_rank == 0 and not self.has(key):
            try:
                if self.fetch is None or self.fetch(key, self.path(key)) is None:
                    error = "not published anywhere this worker can fetch from"
            except Exception as e:  # reach the collective anyway, or the other ranks hang
                error = f"{type(e).__name__}: {e}"
        errors = collectives.all_gather_object(error, ctx.device) if ctx.world > 1 else [error]
        if error:
            raise CheckpointError(f"node {key}: no verified checkpoint in {self.root} on this machine (rank "
                                  f"{ctx.rank}): {error}")
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            raise CheckpointError(f"node {key}: the machine of rank {failed[0][0]} has no verified checkpoint: "
                                  f"{failed[0][1]}")
        return self.path(key)


@dataclass
class DataCache:
    """Stage conversations and eval items, loaded once per process."""

    cfg: SweepConfig
    _stages: dict[str, list[dict]] = field(default_factory=dict)
    _math: list | None = None

    @classmethod
    def holding(cls, cfg: SweepConfig, stages: dict[str, list[dict]]) -> DataCache:
        """A cache that already holds these stages' conversations (e.g. the files `reteq data prepare` wrote)."""
        return cls(cfg, dict(stages))

    def stage(self, name: str) -> list[dict]:
        """A stage's conversations; a hub source reads its `reteq data prepare` copy when one exists."""
        if name not in self._stages:
            source = self.cfg.stage(name).source
            prepared = None
            if source.kind == "hub":
                for data_dir in filter(None, (data_home(), resolve_work_dir(self.cfg.work_dir) / "data")):
                    prepared = prepared or lookup_prepared(source, data_dir)
            if prepared is not None:
                self._stages[name] = read_prepared(prepared)
            else:
                self._stages[name] = load_conversations(source)
        return self._stages[name]

    def math_items(self) -> list[tuple[str, str]]:
        if self._math is None:
            e = self.cfg.eval
            self._math = load_math_eval(e.math_source, e.math_questions) if "math" in e.metrics else []
        return self._math


@dataclass
class RunContext:
    """Everything the work of a node or leaf needs, built once per process (by `reteq run-path`, or in each Ray
    task, Tune trial or Train worker of `reteq sweep`) instead of being threaded through every call."""

    cfg: SweepConfig
    plan: Plan
    worker: WorkerContext  # rank, world, device, DeepSpeed config, precision, packing
    store: CheckpointStore
    data: DataCache
    hooks: Hooks = field(default_factory=Hooks)
