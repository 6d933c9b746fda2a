"""MLflow as the system of record: the experiment, the parent run, a child run per node, and resume by key.

The driver creates the experiment and the parent run (schema migrations must not race in workers); workers
log their node's run through `MlflowHooks`. A node is finished when its run carries status=done and its
checkpoint artifact; a rerun of the same sweep looks those up by their plan key (`tracking.TAG_PLAN_KEY`) and skips them.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from reteq import tracking as T
from reteq.eval.start_record import FILE as START_FILE
from reteq.eval.start_record import BadRecord, decode
from reteq.mlflow_store import finished_run, finished_runs, search_runs, tracking_client
from reteq.pipeline.context import Hooks
from reteq.plan import RetrainRecord, StageNode, UnlearnLeaf
from reteq.redact import redact, redact_tree
from reteq.sweep.faults import fault
from reteq.sweep.lifecycle import finish_run
from reteq.sweep.mlflow_ui import save_views
from reteq.train.checkpoint import checkpoint_manifest

# The system-metrics monitor is imported inside a function: optional (psutil), and failure is reported there.


def parent_run(c, exp_id: str, sweep_name: str, config_hash: str) -> str:
    """The sweep's parent run: reused by a rerun of the same config, so children stay under one parent. The
    experiment gets reteq's saved views of the unlearning curves (reteq.sweep.mlflow_ui) if it lacks them."""
    save_views(c, exp_id)
    found = search_runs(c, exp_id, f"tags.`{T.TAG_KIND}` = '{T.KIND_SWEEP}' and tags.`{T.TAG_CONFIG_HASH}` = "
                               f"'{config_hash}'")
    if found:
        rid = found[0].info.run_id
        if found[0].info.status != T.RUN_RUNNING:
            c.update_run(rid, status=T.RUN_RUNNING)  # this attempt runs it again; it ends when the attempt ends
        return rid
    run = c.create_run(exp_id, run_name=f"sweep/{sweep_name}",
                       tags={T.TAG_KIND: T.KIND_SWEEP, T.TAG_SWEEP: sweep_name, T.TAG_CONFIG_HASH: config_hash})
    return run.info.run_id


def sweep_params(cfg) -> dict[str, str]:
    """The parent run's key params (T.P_SWEEP_PARAMS), all derived from the config (its hash names the run)."""
    u, ex = cfg.unlearn, cfg.execution
    values = {"models": ",".join(m.name for m in cfg.models),
              "orders": ";".join(T.order_tag(o) for o in cfg.stage_orders()),
              "algorithms": ",".join(u.algorithms), "lrs": ",".join(T.format_float(x) for x in u.lrs),
              "betas": ";".join(f"{a}:{','.join(T.format_float(b) for b in u.betas_for(a) if b is not None)}"
                                for a in u.algorithms if u.betas_for(a) != [None]),
              "seeds": ",".join(map(str, cfg.seeds)), "forget_stage": cfg.forget_stage, "workers": str(ex.workers),
              "use_gpu": str(ex.use_gpu).lower(), "deepspeed": ex.deepspeed or "",
              "schedules": ",".join(cfg.schedules or [])}
    return {k: values[k] for k in T.P_SWEEP_PARAMS}


def log_sweep_config(c, run_id: str, cfg) -> None:
    """The parent run carries the resolved config (an artifact) and its key params."""
    c.log_batch(run_id, params=[Param(k, redact(v)) for k, v in sweep_params(cfg).items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / T.CONFIG_FILE  # passwords in tracking_uri / storage_path stay out (reteq.redact)
        path.write_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False))
        c.log_artifact(run_id, str(path), artifact_path=T.ARTIFACT_CONFIG)


def log_phases(c, run_id: str, phases: dict[str, float]) -> None:
    """Where the driver's time went (MLflow setup, Ray start, the DAG, ...): one metric per phase, seconds from
    the attempt's start, so the MLflow UI compares attempts and sweeps."""
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(T.M_SWEEP_PHASE.format(k), v, now, 0) for k, v in phases.items()])


def _is_record(tags: dict[str, str]) -> bool:
    """A retrain record (theta_r evaluated), not a node: it names its node in TAG_RETRAIN_KEY."""
    return tags.get(T.TAG_KIND) == T.KIND_RETRAIN and bool(tags.get(T.TAG_RETRAIN_KEY))


def finished_nodes(c, exp_id: str) -> dict[str, dict[str, str]]:
    """node key -> {run_id, checkpoint} for node runs that finished and published a checkpoint (kind finetune;
    kind retrain without a retrain key: a retrain-only node recorded before retrain records existed)."""
    out: dict[str, dict[str, str]] = {}
    for r in finished_runs(c, exp_id):
        if r.data.tags.get(T.TAG_KIND) in (T.KIND_FINETUNE, T.KIND_RETRAIN) and not _is_record(r.data.tags):
            out.setdefault(r.data.tags[T.TAG_PLAN_KEY], {"run_id": r.info.run_id,
                                                         "checkpoint": r.data.tags.get(T.TAG_CHECKPOINT, "")})
    return out


def finished_leaves(c, exp_id: str) -> set[str]:
    return {r.data.tags[T.TAG_PLAN_KEY] for r in finished_runs(c, exp_id) if r.data.tags.get(T.TAG_KIND) == T.KIND_UNLEARN}


def finished_records(c, exp_id: str) -> set[str]:
    """Keys of the retrain records (theta_r evaluated) that finished."""
    return {r.data.tags[T.TAG_PLAN_KEY] for r in finished_runs(c, exp_id) if _is_record(r.data.tags)}


def node_tags(node: StageNode, sweep: str, schedule: str) -> dict[str, str]:
    """Every node run is a finetuning run; one that is some path's theta_r, or that only retrain paths need, says
    so (reteq.plan). theta_r's own run of kind "retrain" is its record (`record_tags`)."""
    tags = {T.TAG_KIND: T.KIND_FINETUNE, T.TAG_MODEL: node.model, T.TAG_ORDER: T.order_tag(node.prefix),
            T.TAG_STAGE: node.stage, T.TAG_SEED: str(node.seed), T.TAG_PLAN_KEY: node.key,
            T.TAG_PARENT_KEY: node.parent or "", T.TAG_SWEEP: sweep, T.TAG_SCHEDULE: schedule}
    if node.retrain_baseline:
        tags[T.TAG_RETRAIN_BASELINE] = "true"
    if node.retrain_only:
        tags[T.TAG_RETRAIN_ONLY] = "true"
    return tags


def record_tags(rec: RetrainRecord, sweep: str, schedule: str, node_run_id: str, checkpoint: str) -> dict[str, str]:
    """theta_r's record: keyed by its own record key, pointing at the node (key, run, checkpoint) it evaluates."""
    return {T.TAG_KIND: T.KIND_RETRAIN, T.TAG_MODEL: rec.model, T.TAG_ORDER: T.order_tag(rec.order),
            T.TAG_SEED: str(rec.seed), T.TAG_PLAN_KEY: rec.key, T.TAG_PARENT_KEY: rec.node,
            T.TAG_RETRAIN_KEY: rec.node, T.TAG_NODE_RUN: node_run_id, T.TAG_CHECKPOINT: checkpoint,
            T.TAG_SWEEP: sweep, T.TAG_SCHEDULE: schedule}


def leaf_tags(leaf: UnlearnLeaf, sweep: str, schedule: str) -> dict[str, str]:
    return {T.TAG_KIND: T.KIND_UNLEARN, T.TAG_MODEL: leaf.model, T.TAG_ORDER: T.order_tag(leaf.order),
            T.TAG_P: str(leaf.p), T.TAG_ALGORITHM: leaf.algorithm, T.TAG_LR: T.format_float(leaf.lr),
            T.TAG_BETA: T.format_float(leaf.beta), T.TAG_PARAMS: T.params_tag(leaf.params), T.TAG_SEED: str(leaf.seed), T.TAG_PLAN_KEY: leaf.key,
            T.TAG_PARENT_KEY: leaf.parent, T.TAG_SWEEP: sweep, T.TAG_SCHEDULE: schedule,
            T.TAG_RETRAIN_KEY: leaf.retrain or ""}


SYSTEM_METRICS_INTERVAL_S = 2.0


class MlflowHooks(Hooks):
    """Worker-side logging (main worker only): one child run per node trained or leaf unlearned here."""

    FLUSH_EVERY = 20  # metric rows buffered before one log_batch call

    # params: where runs go (uri, experiment, parent, sweep), how to tag them, echo, and who started them
    def __init__(self, uri: str, exp_id: str, parent_run_id: str, sweep: str, schedule_of, echo=print,
                 attempt: str = "", trial: str = ""):
        self.c = tracking_client(uri)
        self.uri = uri
        self.exp_id, self.parent, self.sweep = exp_id, parent_run_id, sweep
        self.schedule_of = schedule_of  # stage -> its configured schedule (when the sweep has no schedule grid)
        self.echo = echo
        self.run_ids: dict[str, str] = {}
        self._buffer: dict[str, list] = {}
        self.leaf_run_id: str | None = None
        self._monitors: dict[str, Any] = {}
        self.attempt, self.trial = attempt, trial  # who started the runs: closes them if this process dies

    def _start(self, key: str, name: str, tags: dict[str, str]) -> str:
        run = self.c.create_run(self.exp_id, run_name=name, tags={**tags, T.TAG_MLFLOW_PARENT: self.parent,
                                                                  T.TAG_ATTEMPT: self.attempt, T.TAG_TRIAL: self.trial})
        self.run_ids[key] = run.info.run_id
        self._monitor(key, run.info.run_id)
        return run.info.run_id

    def _monitor(self, key: str, run_id: str) -> None:
        """CPU / memory / GPU utilisation as MLflow system metrics, where psutil (and pynvml) allow."""
        try:
            # lazy: optional (psutil); a failure is reported below
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           tracking_uri=self.uri)
            monitor.start()
            self._monitors[key] = monitor
        except Exception as e:  # optional: a platform without psutil still trains and logs
            self.echo(f"system metrics unavailable: {type(e).__name__}: {e}")

    def _metrics(self, key: str, values: dict[str, float], step: int, flush: bool = False) -> None:
        now = int(time.time() * 1000)
        rows = self._buffer.setdefault(key, [])
        rows.extend(Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(v))
        if flush or len(rows) >= self.FLUSH_EVERY:
            for i in range(0, len(rows), 1000):
                self.c.log_batch(self.run_ids[key], metrics=rows[i:i + 1000])
            rows.clear()

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        # a value that does not apply (GA's beta) is left out, never logged as the string "None"
        self.c.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if v is not None])

    def _end(self, key: str, status: str, tags: dict[str, str] | None = None) -> None:
        self._metrics(key, {}, 0, flush=True)
        if key in self._monitors:
            self._monitors.pop(key).finish()
        finish_run(self.c, self.run_ids[key], status, tags=tags)

    # ---- stage nodes -----------------------------------------------------------------------------------
    def node_skipped(self, node: StageNode, path: Path) -> None:
        self.echo(f"[node {node.key[:8]}] {node.model} {T.order_tag(node.prefix)}: reusing {path}")
        if finished_run(self.c, self.exp_id, node.key) is None:  # published here, then the process died
            tags = node_tags(node, self.sweep, node.schedule or self.schedule_of(node.stage))
            rid = record_reused_node(self.c, self.exp_id, self.parent, {**tags, T.TAG_TRIAL: self.trial}, path,
                                     self.attempt)
            self.echo(f"[node {node.key[:8]}] had no finished record: recorded as run {rid}")

    def node_started(self, node: StageNode) -> None:
        self._start(node.key, T.run_name(T.KIND_FINETUNE, node.model, T.order_tag(node.prefix), f"s{node.seed}"),
                    node_tags(node, self.sweep, node.schedule or self.schedule_of(node.stage)))
        self.echo(f"[node {node.key[:8]}] {node.model} {T.order_tag(node.prefix)}: training {node.stage}")

    def node_resumed(self, node: StageNode, step: int) -> None:
        self.c.set_tag(self.run_ids[node.key], T.TAG_RESUMED_FROM_STEP, str(step))
        self.echo(f"[node {node.key[:8]}] resumed from its Ray Train checkpoint of step {step}")

    def node_step(self, node: StageNode, r) -> None:
        self._metrics(node.key, {T.M_TRAIN_LOSS: r.loss, T.M_TRAIN_LR: r.lr, T.M_TRAIN_GRAD_NORM: r.grad_norm,
                                 T.M_TRAIN_TOKENS_PER_S: r.tokens_per_s}, r.step)
        fault("node_step")
        self.echo(f"[node {node.key[:8]}] {node.stage} step {r.step} loss {r.loss:.4f} tok/s {r.tokens_per_s:.0f}")

    def node_done(self, node: StageNode, path: Path, stats: dict[str, Any]) -> None:
        fault("node_published")  # the checkpoint is in the store, its record not yet written
        rid = self.run_ids[node.key]
        self._metrics(node.key, {T.M_TRAIN_PAD_FRAC: stats["padding_fraction"]}, stats["steps"])
        self._params(rid, {T.P_STEPS: stats["steps"], "examples": stats["examples"], "stage": node.stage})
        self.c.log_artifacts(rid, str(path), artifact_path=T.ARTIFACT_CHECKPOINT)
        self._end(node.key, T.STATUS_DONE, {T.TAG_CHECKPOINT: str(path)})

    # ---- unlearning leaves ------------------------------------------------------------------------------
    def leaf_started(self, leaf: UnlearnLeaf) -> None:
        self.leaf_run_id = self._start(
            leaf.key, T.leaf_run_name(leaf.p, leaf.algorithm, leaf.lr, leaf.seed, leaf.model, leaf.params, leaf.schedule),
            leaf_tags(leaf, self.sweep, leaf.schedule or self.schedule_of(leaf.order[0])))
        self._params(self.leaf_run_id, {"model": leaf.model, "order": T.order_tag(leaf.order), "p": leaf.p,
                                        "algorithm": leaf.algorithm, "lr": leaf.lr, "seed": leaf.seed,
                                        **leaf.params})

    # ---- retrain records ---------------------------------------------------------------------------------
    def retrain_started(self, rec: RetrainRecord, node_run_id: str, checkpoint: Path) -> None:
        schedule = rec.schedule or self.schedule_of(rec.order[0])
        self._start(rec.key, T.retrain_run_name(rec.order, rec.seed, rec.model),
                    record_tags(rec, self.sweep, schedule, node_run_id, str(checkpoint)))

    def retrain_done(self, rec: RetrainRecord, metrics: dict[str, float]) -> None:
        self._metrics(rec.key, metrics, 0, flush=True)
        shown = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items()
                          if k in (T.M_FORGET_LABEL, T.M_FORGET_PARAPHRASE, T.M_TOFU_LOGP))
        self.echo(f"[retrain {rec.key[:8]}] {rec.model} {T.order_tag(rec.order)}: {shown}")
        self._end(rec.key, T.STATUS_DONE)

    def run_params(self, key: str, params: dict[str, str]) -> None:
        self._params(self.run_ids[key], params)

    def leaf_step(self, leaf: UnlearnLeaf, r) -> None:
        self._metrics(leaf.key, {T.M_TRAIN_LOSS: r.loss, T.M_TRAIN_LR: r.lr, T.M_TRAIN_GRAD_NORM: r.grad_norm},
                      r.step)

    def leaf_eval(self, leaf: UnlearnLeaf, step: int, metrics: dict[str, float]) -> None:
        self._metrics(leaf.key, metrics, step, flush=True)
        fault("leaf_eval")
        shown = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items() if k in
                          (T.M_FORGET_LABEL, T.M_FORGET_SCORE, T.M_TOFU_UTILITY))
        self.echo(f"[leaf {leaf.key[:8]}] {leaf.algorithm} p={leaf.p} step {step}: {shown}")

    def leaf_done(self, leaf: UnlearnLeaf, result) -> None:
        vectors = getattr(result, "vectors", None)
        if vectors is not None and vectors.height:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / T.PREDICTIONS_FILE
                vectors.write_parquet(path)
                self.c.log_artifact(self.run_ids[leaf.key], str(path), artifact_path=T.ARTIFACT_PREDICTIONS)
        seconds = getattr(result, "seconds", {})  # where the leaf's time went (bench/cpu_precision.py reads it)
        self._metrics(leaf.key, {T.M_TIME.format(part): s for part, s in seconds.items()}, 0)
        self._end(leaf.key, T.STATUS_COLLAPSED if result.collapsed else T.STATUS_DONE, {T.P_STEPS: str(result.steps)})

    # ---- step 0 once per start checkpoint (reteq.eval.start_record) ---------------------------------------
    def start_record(self, key: str) -> tuple[dict, str] | None:
        """The oldest published record of `key` that downloads and matches its sha256; a corrupt or unreadable
        one is passed over with a warning line (the leaf then evaluates step 0 itself)."""
        for r in search_runs(self.c, self.exp_id, f"tags.`{T.TAG_START_KEY}` = '{key}'",
                             order_by=["attributes.start_time ASC"]):
            rid = r.info.run_id
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    local = self.c.download_artifacts(rid, f"{T.ARTIFACT_START_RECORD}/{START_FILE}", tmp)
                    body = Path(local).read_bytes()
                return decode(body, r.data.tags.get(T.TAG_START_SHA256, ""), key), f"run {rid}"
            except (OSError, MlflowException, BadRecord) as e:
                self.echo(f"warning: the step-0 record {key[:8]} of run {rid} is ignored ({type(e).__name__}: "
                          f"{e}); step 0 is evaluated here")
        return None

    def publish_start_record(self, leaf_key: str, key: str, body: bytes, sha256: str) -> None:
        rid = self.run_ids[leaf_key]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / START_FILE
                path.write_bytes(body)
                self.c.log_artifact(rid, str(path), artifact_path=T.ARTIFACT_START_RECORD)
            self.c.set_tag(rid, T.TAG_START_SHA256, sha256)
            self.c.set_tag(rid, T.TAG_START_KEY, key)  # last: readers search by it, so they find a whole record
        except (OSError, MlflowException) as e:  # the leaf's own metrics do not depend on it
            self.echo(f"warning: the step-0 record {key[:8]} was not published ({type(e).__name__}: {e})")

    def start_source(self, leaf_key: str, source: str) -> None:
        self.c.set_tag(self.run_ids[leaf_key], T.TAG_START_SOURCE, source)
        if source != "computed":
            self.echo(f"[leaf {leaf_key[:8]}] step 0: the start checkpoint's shared record ({source})")

    def run_id(self, key: str) -> str:
        return self.run_ids.get(key, "")

    def fail_open_runs(self, error: str) -> None:
        for monitor in self._monitors.values():
            monitor.finish()
        self._monitors.clear()
        for rid in self.run_ids.values():
            if self.c.get_run(rid).info.status == T.RUN_RUNNING:
                finish_run(self.c, rid, T.STATUS_FAILED, error)


def record_failed_children(c, exp_id: str, parent_run_id: str, attempt: str) -> int:
    """Count this attempt's child runs that ended FAILED or KILLED; put the count on the parent run."""
    failed = search_runs(c, exp_id, f"tags.`{T.TAG_ATTEMPT}` = '{attempt}' and attributes.status != "
                                    f"'{T.RUN_FINISHED}' and attributes.status != '{T.RUN_RUNNING}'")
    n = sum(1 for r in failed if r.data.tags.get(T.TAG_KIND) != T.KIND_SWEEP)
    c.log_batch(parent_run_id, metrics=[Metric(T.M_CHILDREN_FAILED, n, int(time.time() * 1000), 0)],
                tags=[RunTag(T.TAG_CHILDREN_FAILED, str(n))])
    return n


def record_reused_node(c, exp_id: str, parent_run_id: str, tags: dict[str, str], path: Path,
                       attempt: str = "") -> str:
    """Give a checkpoint found complete in the store the record it lacks (params, tags, artifact); returns the
    FINISHED run of its key (the existing one when there already is one)."""
    key = tags[T.TAG_PLAN_KEY]
    found = finished_run(c, exp_id, key)
    if found:
        return found
    meta = checkpoint_manifest(path).get("meta", {})
    run = c.create_run(exp_id, run_name=f"{tags.get(T.TAG_KIND, 'node')}/{key[:8]}/recorded",
                       tags={**tags, T.TAG_ATTEMPT: attempt, T.TAG_RECORDED_ON_REUSE: "1",
                             T.TAG_MLFLOW_PARENT: parent_run_id})
    rid = run.info.run_id
    params = {k: v for k, v in meta.items() if k in ("steps", "examples", "stage", "model", "seed")}
    params.setdefault("stage", tags.get(T.TAG_STAGE, ""))
    c.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    c.log_artifacts(rid, str(path), artifact_path=T.ARTIFACT_CHECKPOINT)
    finish_run(c, rid, T.STATUS_DONE, tags={T.TAG_CHECKPOINT: str(path)})
    return rid
