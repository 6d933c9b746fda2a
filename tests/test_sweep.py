"""The distributed sweep on a real local Ray cluster, recorded in a real MLflow SQLite store: stage nodes as Ray
tasks chained by object refs, leaves as Ray Tune trials over named axes, Ray's own retries, resume by key."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from reteq import tracking as T
from reteq.commands.sweep import run_sweep
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.sweep import faults
from reteq.sweep.leaves import leaf_of
from reteq.train.checkpoint import verify_checkpoint
from tests.sweep_configs import tiny_sweep

pytestmark = pytest.mark.ray


def _runs(uri: str, exp: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[exp], output_format="list", max_results=10_000)


def _by_kind(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags.get(T.TAG_KIND), []).append(r)
    return out


def _finished_per_node(runs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in _by_kind(runs).get(T.KIND_FINETUNE, []):
        if r.info.status == "FINISHED" and r.data.tags.get(T.TAG_STATUS) == T.STATUS_DONE:
            counts[r.data.tags[T.TAG_PLAN_KEY]] = counts.get(r.data.tags[T.TAG_PLAN_KEY], 0) + 1
    return counts


SYSTEM_METRICS_S = 0.05  # MLflow's system-metrics sampling interval in this test (the sweep's own is 2 s)


def test_sweep_runs_the_dag_and_resumes(ray_cluster, tmp_path, capsys, monkeypatch):
    """One CPU worker, ZeRO-0: nodes and leaves run in their task / trial process."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_S))  # reaches the workers
    cfg = parse_config(tiny_sweep(tmp_path / "work", lrs=(1e-3,), workers=1, deepspeed="zero0_fp32.json"))
    plan = build_plan(cfg)
    assert plan.summary()["stage_nodes"] == 6 and plan.summary()["stage_runs_without_sharing"] == 8
    assert len(plan.leaves) == 4  # 2 orders x 2 algorithms

    outcome = run_sweep(cfg, report=False)
    assert outcome.code == 0
    out = capsys.readouterr().out
    assert out.count("[node ") == 6 and out.count("[leaf ") == 4, out  # one line per node and per leaf
    uri = T.default_tracking_uri(tmp_path / "work")
    runs = _runs(uri, cfg.name)
    by_kind = _by_kind(runs)
    assert _finished_per_node(runs) == {k: 1 for k in plan.nodes}, "each stage node trained exactly once"
    parent_id = by_kind[T.KIND_SWEEP][0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in by_kind[T.KIND_FINETUNE])

    unlearn = by_kind[T.KIND_UNLEARN]
    assert sorted(r.data.tags[T.TAG_PLAN_KEY] for r in unlearn) == sorted(x.key for x in plan.leaves)
    client = mlflow.MlflowClient(uri)
    for r in unlearn:
        assert r.data.tags[T.TAG_STATUS] in (T.STATUS_DONE, T.STATUS_COLLAPSED)
        assert [m.step for m in client.get_metric_history(r.info.run_id, T.M_FORGET_LABEL)] == [0, 1, 2]
    for r in by_kind[T.KIND_FINETUNE] + unlearn:  # the protocol (docs/fidelity.md) is a param of every run
        assert r.data.params[T.P_UNLEARN_LABEL] == "Sorry, I can not assist"
        assert r.data.params[T.P_CHAT_DATE] == "2024-07-26"
        assert r.data.params[T.P_SYSTEM_PROMPT] == "You are a helpful assistant."
    assert {r.data.params[T.P_NORMALISATION] for r in unlearn} == {"token", "sequence"}  # GA, NPO
    assert len({r.data.params[T.P_FORGET_SAMPLE] for r in unlearn}) == 1  # every leaf scores the same sample
    assert len({r.data.params[T.P_KNOWLEDGE_SAMPLE] for r in unlearn}) == 1
    # MLflow samples system metrics every SYSTEM_METRICS_S (set at the top of this test, for the workers too) from
    # just after a run starts until just before its last writes, and drops a sample its run's end cuts short: the
    # longest run (there is one on any machine, so the check never checks nothing) and every run of a second or
    # more have them (a 0.56 s node run on a busy 2-core machine had none at 0.1 s)
    by_length = sorted(by_kind[T.KIND_FINETUNE] + unlearn, key=lambda r: r.info.end_time - r.info.start_time)
    sampled = [by_length[-1]] + [r for r in by_length[:-1] if r.info.end_time - r.info.start_time > 1000]
    for r in sampled:
        assert any(k.startswith("system/") for k in r.data.metrics), f"no system metrics in {r.info.run_name}"
    for r in by_kind[T.KIND_FINETUNE]:  # checkpoints logged as artifacts whose manifests verify
        local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path=T.ARTIFACT_CHECKPOINT,
                                                    dst_path=str(tmp_path / "dl" / r.info.run_id))
        assert "model.safetensors" in verify_checkpoint(local, r.data.tags[T.TAG_PLAN_KEY])["files"]

    # Tune sees the axes, and got the eval metrics at every eval step (3 reports: steps 0, 1, 2)
    df = outcome.dag.results.get_dataframe()
    for axis in ("model", "order", "algorithm", "lr", "beta", "seed", "schedule"):
        assert f"config/{axis}" in df.columns
    assert sorted(df["config/algorithm"]) == ["ga", "ga", "npo", "npo"]
    assert set(df["config/order"]) == {"inst>tofu>U>math", "inst>tofu>math>U"}
    assert (df["training_iteration"] == 3).all() and (df["step"] == 2).all() and "forget" in df.columns

    # no trial started before its parent node was published (its MLflow run FINISHED with status done)
    published = {r.data.tags[T.TAG_PLAN_KEY]: r.info.end_time / 1000 for r in by_kind[T.KIND_FINETUNE]}
    for _, row in df.iterrows():
        axes = {k[len("config/"):]: None if v != v else v for k, v in row.items() if k.startswith("config/")}
        leaf = leaf_of(plan, axes)  # (pandas reads GA's beta None back as NaN, which is not equal to itself)
        assert row["trial_started"] >= published[leaf.parent], (leaf.order, row["trial_started"])

    # theta_r (inst>tofu>math: the p = 4 path's prefix node, trained once above) has one run of kind retrain:
    # evaluated like a leaf's step 0, pointing at the node's run and checkpoint, uploading nothing
    (rkey,) = {leaf.retrain for leaf in plan.leaves}
    (rec,) = by_kind[T.KIND_RETRAIN]
    node_run = next(r for r in by_kind[T.KIND_FINETUNE] if r.data.tags[T.TAG_PLAN_KEY] == rkey)
    assert rec.info.status == "FINISHED" and rec.data.tags[T.TAG_PLAN_KEY] == plan.record_of(rkey).key
    assert rec.data.tags[T.TAG_RETRAIN_KEY] == rkey and rec.data.tags[T.TAG_NODE_RUN] == node_run.info.run_id
    assert rec.data.tags["mlflow.parentRunId"] == parent_id and not client.list_artifacts(rec.info.run_id)
    assert T.M_FORGET_PARAPHRASE in rec.data.metrics and T.M_TOFU_LOGP in rec.data.metrics

    # rerunning the same command trains nothing
    assert run_sweep(cfg, report=False).code == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(_runs(uri, cfg.name)) == len(runs)

    # a missing record (here: deleted) is written by the next run, and nothing else runs
    client.delete_run(rec.info.run_id)
    assert run_sweep(cfg, report=False).code == 0
    assert "0 of 1 retrain records" in capsys.readouterr().out
    again = _by_kind(_runs(uri, cfg.name))
    assert [r.data.tags[T.TAG_PLAN_KEY] for r in again[T.KIND_RETRAIN]] == [rec.data.tags[T.TAG_PLAN_KEY]]
    assert len(again[T.KIND_FINETUNE]) == len(by_kind[T.KIND_FINETUNE]) and len(again[T.KIND_UNLEARN]) == 4


def test_killed_node_worker_is_retried(ray_cluster, tmp_path, monkeypatch):
    """SIGKILL the worker process training a stage node, mid-node (its first optimizer step logged, the RETEQ_FAULT
    hook): Ray re-runs the node's task, the sweep finishes, every node is trained (FINISHED, status done) exactly
    once, and the killed attempt's run is KILLED with the reason, not left RUNNING."""
    cfg = parse_config(tiny_sweep(tmp_path / "work", name="kill-sweep", positions=(4,), algorithms=("ga",),
                                  lrs=(1e-3,), workers=1, concurrent=1, deepspeed="zero0_fp32.json"))
    plan = build_plan(cfg)
    victim = next(n for n in plan.nodes.values() if n.parent is None)  # the first node to log a step
    pids, mark = tmp_path / "pids", tmp_path / "fault-fired"
    monkeypatch.setenv("RETEQ_PID_DIR", str(pids))
    monkeypatch.setenv(faults.ENV, "node_step:1:worker")
    monkeypatch.setenv(faults.ENV_MARK, str(mark))  # fires once: the retried task does not die again
    monkeypatch.setenv(faults.ENV_DRIVER, str(os.getpid()))  # run_sweep sets it; monkeypatch takes it back
    outcome = run_sweep(cfg, report=False)
    killed = int(mark.read_text().split(" pid ")[1])
    assert json.loads((pids / f"{victim.key}.pid").read_text())["pid"] != killed, "the node ran again"
    assert outcome.code == 0
    runs = _runs(T.default_tracking_uri(tmp_path / "work"), cfg.name)
    assert _finished_per_node(runs) == {k: 1 for k in plan.nodes}
    assert [r.data.tags[T.TAG_STATUS] for r in _by_kind(runs)[T.KIND_UNLEARN]] in ([T.STATUS_DONE],
                                                                                   [T.STATUS_COLLAPSED])
    assert not [r for r in runs if r.info.status == T.RUN_RUNNING], "no run is left RUNNING"
    (dead,) = [r for r in runs if r.info.status != T.RUN_FINISHED]
    assert dead.info.status == T.RUN_KILLED and dead.data.tags[T.TAG_PLAN_KEY] == victim.key
    assert dead.data.tags[T.TAG_STATUS] == T.STATUS_KILLED and "its process died" in dead.data.tags[T.TAG_ERROR]
    assert _by_kind(runs)[T.KIND_SWEEP][0].data.tags[T.TAG_CHILDREN_FAILED] == "1"


def test_failing_node_ends_its_branch_and_the_sweep(ray_cluster, tmp_path, monkeypatch, capsys):
    """A node that always fails: the sweep ends by itself, non-zero, naming the node; the leaves below it never
    start, while the independent branch (the other order) finishes."""
    cfg = parse_config(tiny_sweep(tmp_path / "work", name="fail-sweep", algorithms=("ga",), lrs=(1e-3,),
                                  workers=1, deepspeed="zero0_fp32.json"))
    plan = build_plan(cfg)
    bad = next(n for n in plan.nodes.values() if n.prefix == ("inst", "tofu", "U"))
    monkeypatch.setenv("RETEQ_FAULT_NODE", "inst>tofu>U")
    outcome = run_sweep(cfg, report=False)
    out = capsys.readouterr().out
    assert outcome.code == 1
    assert list(outcome.dag.failed_nodes) == [bad.key]
    assert f"node {bad.key[:8]} tiny inst>tofu>U failed" in out and "fault injected" in out
    runs = _runs(T.default_tracking_uri(tmp_path / "work"), cfg.name)
    leaves = _by_kind(runs)[T.KIND_UNLEARN]
    assert [r.data.tags[T.TAG_ORDER] for r in leaves] == ["inst>tofu>math>U"]  # the other branch finished
    assert leaves[0].data.tags[T.TAG_STATUS] in (T.STATUS_DONE, T.STATUS_COLLAPSED)
    assert len(outcome.dag.skipped_leaves) == 1
    trained = {r.data.tags[T.TAG_ORDER] for r in _by_kind(runs)[T.KIND_FINETUNE] if r.info.status == "FINISHED"}
    assert trained == {"inst", "inst>tofu", "inst>tofu>math", "inst>tofu>math>U"}


def _stage_records(cfg, plan, node, tmp_path) -> list:
    """Train `node` from the base model in this process (one worker, plain torch); its StepRecords."""
    from reteq.pipeline.context import CheckpointStore, DataCache, Hooks, RunContext
    from reteq.pipeline.node import train_node
    from reteq.train.worker_context import WorkerContext

    class Records(Hooks):
        def __init__(self):
            self.records: list = []

        def node_step(self, node, record) -> None:
            self.records.append(record)

    hooks = Records()
    train_node(RunContext(cfg, plan, WorkerContext(), CheckpointStore(tmp_path / "one"), DataCache(cfg), hooks),
               node, None)
    return hooks.records


def test_multi_worker_nodes_and_leaves_run_ray_train_deepspeed(ray_cluster, tmp_path, monkeypatch):
    """Two workers under DeepSpeed ZeRO-2: each node and leaf is one TorchTrainer; Tune still gets every eval.
    The first node (3 steps, a Ray Train checkpoint after every step: execution.checkpoint_every) loses its rank 0
    right after logging step 2: Train restarts the group, which loads the last checkpoint and trains only the
    steps after it; the node's finished run says where it resumed from and logs no step at or before it."""
    raw = tiny_sweep(tmp_path / "work", name="ds-sweep", retain=("inst",), positions=(2,), algorithms=("npo",),
                     lrs=(1e-3,), workers=2, concurrent=1)
    raw["stages"][0].update(epochs=3, schedule="cosine")  # 8 rows, global batch 8: 3 steps, each its own lr
    raw["execution"]["checkpoint_every"] = 1
    cfg = parse_config(raw)
    plan = build_plan(cfg)
    victim = next(n for n in plan.nodes.values() if n.parent is None)
    mark = tmp_path / "fault-fired"
    monkeypatch.setenv(faults.ENV, "node_step:2:worker")  # rank 0 of the first node, after its step 2 is logged
    monkeypatch.setenv(faults.ENV_MARK, str(mark))  # fires once: the retried group does not die again
    monkeypatch.setenv(faults.ENV_DRIVER, str(os.getpid()))
    outcome = run_sweep(cfg, report=False)
    assert outcome.code == 0 and mark.exists()
    uri = T.default_tracking_uri(tmp_path / "work")
    runs = _runs(uri, cfg.name)
    assert _finished_per_node(runs) == {k: 1 for k in plan.nodes}
    df = outcome.dag.results.get_dataframe()
    assert list(df["config/algorithm"]) == ["npo"] and list(df["training_iteration"]) == [3]

    finetune = _by_kind(runs)[T.KIND_FINETUNE]
    (resumed,) = [r for r in finetune if r.data.tags[T.TAG_PLAN_KEY] == victim.key and r.info.status == "FINISHED"]
    start = int(resumed.data.tags[T.TAG_RESUMED_FROM_STEP])
    assert start == 1  # the step-1 checkpoint (Train committed it before the kill); step 2's was never saved
    history = mlflow.MlflowClient(uri).get_metric_history(resumed.info.run_id, T.M_TRAIN_LOSS)
    assert [m.step for m in history] == [2, 3]
    # the resumed steps' losses and lrs are an uninterrupted run's (here: the same node in this process, plain
    # torch): the checkpoint restored the step-1 weights, AdamW state and lr schedule
    records = _stage_records(cfg, plan, victim, tmp_path)[1:]
    assert [m.value for m in history] == pytest.approx([r.loss for r in records], rel=1e-4)
    lrs = mlflow.MlflowClient(uri).get_metric_history(resumed.info.run_id, T.M_TRAIN_LR)
    assert [m.value for m in lrs] == pytest.approx([r.lr for r in records], rel=1e-6)
    (dead,) = [r for r in runs if r.info.status != "FINISHED"]
    assert dead.info.status == T.RUN_KILLED and dead.data.tags[T.TAG_PLAN_KEY] == victim.key
    assert all(T.TAG_RESUMED_FROM_STEP not in r.data.tags for r in finetune if r.data.tags[T.TAG_PLAN_KEY] != victim.key)
    assert not list((tmp_path / "work" / "ray").glob("node-*/checkpoint_*")), "a published node keeps no Train state"
    # theta_r's record names the run of the node it evaluates (the node's task reads it back: Train's Result
    # carries no final metrics of a multi-worker node)
    (retrain,) = _by_kind(runs)[T.KIND_RETRAIN]
    node_runs = {r.info.run_id: r.data.tags[T.TAG_PLAN_KEY] for r in finetune if r.info.status == "FINISHED"}
    assert node_runs[retrain.data.tags[T.TAG_NODE_RUN]] == plan.records[retrain.data.tags[T.TAG_PLAN_KEY]].node


def test_two_whole_cpu_lanes_fit_beside_the_bookkeeping_processes():
    """cpus_per_worker 1 on 2 cores: two node or leaf tasks must run side by side although the launcher (0.01)
    and two trials (0.05 each) hold a sliver of CPU; before, 1 + 1 + 0.11 > 2 ran every node in turn."""
    from reteq.sweep.ray_session import LAUNCHER_CPUS, TRIAL_DRIVER_CPUS, task_cpus

    cpus = task_cpus(1.0, trials=2, cluster_cpus=2)
    assert 2 * cpus + LAUNCHER_CPUS + 2 * TRIAL_DRIVER_CPUS <= 2 and cpus > 0.9
    assert task_cpus(0.9, trials=2, cluster_cpus=2) == 0.9  # already fits: unchanged
    assert task_cpus(1.0, trials=2, cluster_cpus=0) == 1.0  # an autoscaler's empty head: as configured
    # 8 lanes of 2 CPUs fill 16 cores exactly: each gives up its share of the bookkeeping's 0.06
    assert task_cpus(2.0, trials=1, cluster_cpus=16) == pytest.approx((16 - 0.06) / 8, abs=1e-3)
    assert task_cpus(2.0, trials=1, cluster_cpus=17) == 2.0  # room to spare: as configured
