"""Mid-stage checkpoints of a stage node trained by Ray Train, so a retried worker group resumes, not restarts.

Every `execution.checkpoint_every` optimizer steps, every rank saves its DeepSpeed state (weights, optimizer and
ZeRO shards, the client lr schedule) into its own temp dir, rank 0 adds `resume.json` naming the node and the
step, and every rank hands its dir to `ray.train.report`: Ray Train merges the ranks' files into one checkpoint
in `execution.storage_path` (keeping the last only). When Train restarts the worker group (a dead worker, a
preempted machine), `ray.train.get_checkpoint()` returns it: every rank loads it into its fresh engine and the
loop skips the steps already done (the step plan is a function of the seed, so the data order is the same).

The in-process path (one CPU worker, ZeRO-0, a plain Ray task) has no Train checkpoints: a retried task
restarts the node from its parent. Frozen weights (a LoRA's base) are not saved: they come from the parent.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ray.train is imported inside functions: only a Ray Train worker calls them.

RESUME_FILE = "resume.json"
TAG = "stage"  # DeepSpeed's checkpoint tag (a subfolder of the checkpoint)
METRIC_STEP = "reteq_stage_step"  # what the Train checkpoint reports (Train's own bookkeeping, not MLflow's)


@dataclass
class StageResume:
    key: str  # the node being trained
    every: int = 0  # optimizer steps between checkpoints; 0: never save
    rank: int = 0
    checkpoint: Any = None  # the ray.train.Checkpoint to resume from, when it is this node's
    step: int = 0  # optimizer steps done in it (0: start from the parent)

    @classmethod
    def from_ray_train(cls, key: str, every: int, rank: int) -> StageResume:
        """This node's last Train checkpoint, if the worker group is a retry (or a rerun of the same run dir)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                meta_path = Path(d) / RESUME_FILE
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if meta.get("node") == key and int(meta.get("step", 0)) > 0:
                return cls(key, every, rank, checkpoint, int(meta["step"]))
        return cls(key, every, rank)

    def load(self, engine) -> None:
        """Every rank, right after the engine is built: weights, optimizer, ZeRO shards and lr schedule."""
        if self.checkpoint is None:
            return
        with self.checkpoint.as_directory() as d:
            path, _ = engine.model.load_checkpoint(d, tag=TAG, load_module_strict=False)  # frozen weights: parent's
        if path is None:
            raise RuntimeError(f"node {self.key}: Ray Train checkpoint of step {self.step} has no DeepSpeed state")

    def after_step(self, engine, step: int, total: int) -> None:
        """Every rank after optimizer step `step`: checkpoint every `every` steps (not the last: the node is
        published then). A collective: every rank saves and reports, or none does."""
        if not self.every or step % self.every or step >= total:
            return
        import ray.train

        with tempfile.TemporaryDirectory(prefix="reteq-stage-") as d:
            (Path(d) / TAG).mkdir()
            engine.model.save_checkpoint(d, tag=TAG, exclude_frozen_parameters=True)
            if self.rank == 0:
                (Path(d) / RESUME_FILE).write_text(json.dumps({"node": self.key, "step": step, "of": total}))
            ray.train.report({METRIC_STEP: step}, checkpoint=ray.train.Checkpoint.from_directory(d))
