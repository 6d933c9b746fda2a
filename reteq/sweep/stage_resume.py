"""Mid-stage checkpoints of a stage node trained by Ray Train, so a retried worker group resumes, not restarts.

Every `execution.checkpoint_every` optimizer steps, every rank saves its DeepSpeed state (weights, optimizer and
ZeRO shards, the client lr schedule) into its own temp dir, rank 0 adds `resume.json` naming the node and the
step, and every rank hands its dir to `ray.train.report`: Ray Train merges the ranks' files into one checkpoint
in `execution.storage_path` (keeping the last only). When Train restarts the worker group (a dead worker, a
preempted machine), `ray.train.get_checkpoint()` returns it: every rank loads it into its fresh engine and the
loop skips the steps already done (the step plan is a function of the seed, so the data order is the same).

No code runs from a checkpoint (docs/security.md). DeepSpeed's state files are pickles, and `storage_path` (S3
on a cluster) may be writable by more hands than the tracking store, so:
- `resume.json` lists the sha256 of every file the ranks saved, and the sha256 of `resume.json` itself is logged
  as a param of the sweep's parent run (`tracking.P_STAGE_CHECKPOINT`) when the checkpoint is saved: MLflow
  refuses to change a param once logged, and a replaced checkpoint cannot carry its own digest there.
- before anything is deserialised, a retried group checks `resume.json` against that param and every file under
  the DeepSpeed tag against `resume.json` (no file missing, none added); a checkpoint that fails is refused in
  one line and the node trains from its parent (nothing lost but time);
- DeepSpeed then loads the verified files with `torch.load(weights_only=True)` (`WeightsOnlyLoads`), which
  allows tensors, containers and the three DeepSpeed data classes its optimizer state holds, nothing callable.

The in-process path (one CPU worker, ZeRO-0, a plain Ray task) has no Train checkpoints: a retried task
restarts the node from its parent. Frozen weights (a LoRA's base) are not saved: they come from the parent.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray.train

from reteq import tracking as T
from reteq.digest import sha256_file
from reteq.errors import CheckpointError
from reteq.mlflow_store import reader

# torch and deepspeed are imported inside functions: only a Ray Train worker calls them. ray.train is not: this
# module's one importer, reteq.sweep.remote, imports it at its top (ray.train itself loads no torch).

RESUME_FILE = "resume.json"
TAG = "stage"  # DeepSpeed's checkpoint tag (a subfolder of the checkpoint)
METRIC_STEP = "reteq_stage_step"  # what the Train checkpoint reports (Train's own bookkeeping, not MLflow's)
MAX_RESUME_BYTES = 1 << 20  # resume.json is a few KB; anything larger is not ours


class Digests(Protocol):
    """Where a checkpoint's digest is recorded, out of reach of whoever writes the checkpoint's files."""

    def record(self, name: str, digest: str) -> None: ...

    def get(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class ParentRunParams:
    """Digests as params of the sweep's parent run (immutable once logged)."""

    uri: str
    run_id: str

    def record(self, name: str, digest: str) -> None:
        reader(self.uri).log_param(self.run_id, name, digest)

    def get(self, name: str) -> str | None:
        return reader(self.uri).get_run(self.run_id).data.params.get(name)


def file_digests(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` but resume.json."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != RESUME_FILE}


def _merge(per_rank: list[dict[str, str]]) -> dict[str, str]:
    """The checkpoint's files from every rank's dir (Ray Train merges the dirs; a file two ranks both wrote must
    be the same file, or the merged checkpoint would hold whichever came last)."""
    files: dict[str, str] = {}
    for mine in per_rank:
        for name, digest in mine.items():
            if files.setdefault(name, digest) != digest:
                raise CheckpointError(f"ranks saved different {name} into one mid-stage checkpoint")
    return files


def param_name(key: str, step: int, nonce: str) -> str:
    return T.P_STAGE_CHECKPOINT.format(node=key[:16], step=step, nonce=nonce)


def verify_stage_checkpoint(folder: str | Path, key: str, digests: Digests) -> int:
    """The step of the checkpoint in `folder` once every byte DeepSpeed would read matches the digest recorded
    when it was saved; 0 when it is another node's; CheckpointError (one line) when it must not be loaded.
    Reads only resume.json (as JSON) and the files' bytes (to hash them): nothing is deserialised."""
    folder = Path(folder)
    meta_path = folder / RESUME_FILE
    if not meta_path.is_file() or meta_path.stat().st_size > MAX_RESUME_BYTES:
        raise CheckpointError(f"no {RESUME_FILE} (or an oversized one): not a checkpoint reteq saved")
    raw = meta_path.read_bytes()
    try:
        meta = json.loads(raw)
        node, step, nonce, files = meta["node"], int(meta["step"]), str(meta["nonce"]), dict(meta["files"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{RESUME_FILE} is not a resume record reteq wrote") from None
    if node != key:
        return 0
    want = digests.get(param_name(key, step, nonce))
    if want is None:
        raise CheckpointError(f"step {step}: no digest was recorded in MLflow for this checkpoint")
    if hashlib.sha256(raw).hexdigest() != want:
        raise CheckpointError(f"step {step}: {RESUME_FILE} does not match the sha256 recorded in MLflow")
    present = {n for n in file_digests(folder) if n.startswith(f"{TAG}/")}  # DeepSpeed reads only TAG/ here
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CheckpointError(f"step {step}: {unlisted[0]} is not in the checkpoint's recorded manifest")
    for name, digest in sorted(files.items()):
        f = folder / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"step {step}: {name} is missing or changed since it was saved (sha256 mismatch)")
    return step


def deepspeed_safe_globals() -> list[type]:
    """The classes a DeepSpeed ZeRO 0-3 optimizer state pickles besides tensors and containers (checked on
    fp32 and bf16 ZeRO-1/2/3 saves with `torch.serialization.get_unsafe_globals_in_checkpoint`): plain data."""
    # lazy: optional DeepSpeed, only on its path
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with `load` as `torch.load(weights_only=True)`: DeepSpeed's own calls
    `torch.load(weights_only=False)`, which runs whatever a pickle names. Everything else is the engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
        import torch

        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_deepspeed_state(engine, folder: str | Path, key: str, digests: Digests) -> int:
    """Verify the checkpoint in `folder` (CheckpointError when refused), then load it into `engine` (reteq's
    DeepSpeedEngine) weights-only; the step it had reached."""
    step = verify_stage_checkpoint(folder, key, digests)
    if not step:
        raise CheckpointError(f"node {key[:8]}: the checkpoint is another node's")
    ds = engine.model
    if not isinstance(ds.checkpoint_engine, WeightsOnlyLoads):
        ds.checkpoint_engine = WeightsOnlyLoads(ds.checkpoint_engine)
    path, _ = ds.load_checkpoint(str(folder), tag=TAG, load_module_strict=False)  # frozen weights: parent's
    if path is None:
        raise CheckpointError(f"node {key[:8]}: checkpoint of step {step} has no DeepSpeed state")
    return step


def save_deepspeed_state(engine, folder: Path, key: str, step: int, total: int, rank: int,
                         digests: Digests | None) -> str | None:
    """Every rank: DeepSpeed's state into `folder`; rank 0 adds resume.json (every rank's files with their
    sha256) and records its sha256 in `digests`. A collective. Returns the recorded digest on rank 0."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.train import collectives

    (folder / TAG).mkdir(exist_ok=True)
    engine.model.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=True)
    files = _merge(collectives.all_gather_object(file_digests(folder), engine.model.device))
    if rank != 0:
        return None
    nonce = secrets.token_hex(4)  # a retried group may save the same step again: a param is written once
    raw = json.dumps({"node": key, "step": step, "of": total, "nonce": nonce, "files": files},
                     sort_keys=True).encode()
    (folder / RESUME_FILE).write_bytes(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digests is not None:
        digests.record(param_name(key, step, nonce), digest)
    return digest


@dataclass
class StageResume:
    key: str  # the node being trained
    every: int = 0  # optimizer steps between checkpoints; 0: never save
    rank: int = 0
    checkpoint: Any = None  # the ray.train.Checkpoint to resume from, when it is this node's and verified
    step: int = 0  # optimizer steps done in it (0: start from the parent)
    digests: Digests | None = None  # where each checkpoint's digest is recorded and checked

    @classmethod
    def from_ray_train(cls, key: str, every: int, rank: int, digests: Digests) -> StageResume:
        """This node's last Train checkpoint, if the worker group is a retry (or a rerun of the same run dir)
        and the checkpoint verifies; a refused one is named in one line and the node starts from its parent."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                step = cls.checked_step(d, key, rank, digests)
            if step:
                return cls(key, every, rank, checkpoint, step, digests)
        return cls(key, every, rank, digests=digests)

    @staticmethod
    def checked_step(folder: str | Path, key: str, rank: int, digests: Digests) -> int:
        """The verified step of the checkpoint in `folder`, or 0 (another node's, or refused: one line)."""
        try:
            return verify_stage_checkpoint(folder, key, digests)
        except CheckpointError as e:
            if rank == 0:
                print(f"node {key[:8]}: refusing its Ray Train checkpoint ({e}); training the node from its parent",
                      flush=True)
            return 0

    def load(self, engine) -> None:
        """Every rank, right after the engine is built: weights, optimizer, ZeRO shards and lr schedule, from
        the checkpoint verified again here (the copy being loaded is the one checked)."""
        if self.checkpoint is None:
            return
        with self.checkpoint.as_directory() as d:
            load_deepspeed_state(engine, d, self.key, self.digests)

    def after_step(self, engine, step: int, total: int) -> None:
        """Every rank after optimizer step `step`: checkpoint every `every` steps (not the last: the node is
        published then). A collective: every rank saves and reports, or none does."""
        if not self.every or step % self.every or step >= total:
            return
        with tempfile.TemporaryDirectory(prefix="reteq-stage-") as d:
            save_deepspeed_state(engine, Path(d), self.key, step, total, self.rank, self.digests)
            ray.train.report({METRIC_STEP: step}, checkpoint=ray.train.Checkpoint.from_directory(d))
