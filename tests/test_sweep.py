"""The distributed sweep on a real local Ray cluster: Ray Tune trials of 2 Ray Train workers under DeepSpeed
(CPU, gloo), recorded in a real MLflow SQLite store, resumed by node key."""

from __future__ import annotations

import json

import mlflow
import pytest

from reteq import tracking as T
from reteq.commands.sweep import sweep_command
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.train.checkpoint import verify_checkpoint
from tests.sweep_configs import tiny_sweep

pytestmark = pytest.mark.ray


def _runs(uri: str, exp: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[exp], output_format="list", max_results=10_000)


def test_sweep_trains_each_node_once_and_resumes(ray_cluster, tmp_path, capsys):
    raw = tiny_sweep(tmp_path / "work")
    cfg = parse_config(raw)
    plan = build_plan(cfg)
    assert plan.summary()["stage_nodes"] == 6 and plan.summary()["stage_runs_without_sharing"] == 8
    assert len(plan.leaves) == 8  # 2 orders x 2 algorithms x 2 lrs

    assert sweep_command(cfg, report=False) == 0
    uri = T.default_tracking_uri(tmp_path / "work")
    runs = _runs(uri, cfg.name)
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get(T.TAG_KIND), []).append(r)

    finetune = by_kind[T.KIND_FINETUNE]
    keys = [r.data.tags[T.TAG_PLAN_KEY] for r in finetune]
    assert sorted(keys) == sorted(plan.nodes), "exactly one finetune run per stage node"
    parent_id = by_kind[T.KIND_SWEEP][0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in finetune)

    unlearn = by_kind[T.KIND_UNLEARN]
    assert sorted(r.data.tags[T.TAG_PLAN_KEY] for r in unlearn) == sorted(x.key for x in plan.leaves)
    client = mlflow.MlflowClient(uri)
    for r in unlearn:
        assert r.data.tags[T.TAG_STATUS] in (T.STATUS_DONE, T.STATUS_COLLAPSED)
        hist = client.get_metric_history(r.info.run_id, T.M_FORGET_LABEL)
        assert [m.step for m in hist] == [0, 1, 2]
        assert r.data.tags[T.TAG_P] in ("3", "4")

    for r in finetune + unlearn:  # the protocol (docs/fidelity.md) is a param of every run
        assert r.data.params[T.P_UNLEARN_LABEL] == "Sorry, I can not assist"
        assert r.data.params[T.P_CHAT_DATE] == "2024-07-26"
        assert r.data.params[T.P_SYSTEM_PROMPT] == "You are a helpful assistant."
    assert {r.data.params[T.P_NORMALISATION] for r in unlearn} == {"token", "sequence"}  # GA, NPO
    assert len({r.data.params[T.P_FORGET_SAMPLE] for r in unlearn}) == 1  # every leaf scores the same sample
    assert len({r.data.params[T.P_KNOWLEDGE_SAMPLE] for r in unlearn}) == 1

    system = [k for r in finetune + unlearn for k in r.data.metrics if k.startswith("system/")]
    assert system, "system metrics (CPU, memory) are logged for node runs"

    for r in finetune:  # checkpoints logged as artifacts whose manifests verify
        local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path=T.ARTIFACT_CHECKPOINT,
                                                    dst_path=str(tmp_path / "dl" / r.info.run_id))
        manifest = verify_checkpoint(local, r.data.tags[T.TAG_PLAN_KEY])
        assert "model.safetensors" in manifest["files"]
        assert json.loads((tmp_path / "dl" / r.info.run_id / "checkpoint" / "manifest.json").read_text())["key"] \
            == r.data.tags[T.TAG_PLAN_KEY]

    # rerunning the same command trains nothing
    capsys.readouterr()
    assert sweep_command(cfg, report=False) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out
    assert len(_runs(uri, cfg.name)) == len(runs)
