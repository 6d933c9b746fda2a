"""The record stays true without Ray: stale runs closed, one finished run per key, repair from the artifact,
the work dir lock, leaf keys that ignore the grid, bad data and full or read-only disks as one line.

Real MLflow SQLite stores, real tiny-model checkpoints, real subprocesses and mounts; no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import model_cfg, reteq_cache, sweep_dict, tmpfs, write_config  # noqa: F401  (session fixture)
from mlflow import MlflowClient

from reteq import tracking as T
from reteq.analysis.load import load_run_record
from reteq.cli import EXIT_BAD_INPUT, main
from reteq.config import parse_config
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.plan import build_plan
from reteq.sweep import lifecycle, record
from reteq.sweep.lock import WorkDirBusy, WorkDirLock
from reteq.sweep.repair import RecordTarget, reconcile_nodes
from reteq.train.checkpoint import is_complete, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _exp(uri: str, root: str, name: str = "life") -> tuple[MlflowClient, str]:
    return tracking_client(uri), ensure_experiment(uri, name, root)


def _run(c, exp, key: str, kind: str = T.KIND_UNLEARN, attempt: str = "old", **tags) -> str:
    return c.create_run(exp, tags={T.TAG_KIND: kind, T.TAG_PLAN_KEY: key, T.TAG_SWEEP: "life",
                                   T.TAG_ATTEMPT: attempt, **tags}).info.run_id


def test_stale_runs_closed_and_only_one_finished_run_counts(sqlite_tracking):
    uri, root = sqlite_tracking
    c, exp = _exp(uri, root)
    parent = record.parent_run(c, exp, "life", "hash")
    dead = _run(c, exp, "leafA")  # a leaf whose driver was SIGKILLed mid-unlearning
    c.log_metric(dead, T.M_FORGET_SCORE, 0.1, step=1)
    done_tag = _run(c, exp, "nodeB", T.KIND_FINETUNE, **{T.TAG_STATUS: T.STATUS_DONE})  # killed after its tags
    mine = _run(c, exp, "leafC", attempt="now")  # this attempt's own, still running
    closed = lifecycle.close_stale_runs(c, exp, "life", "now")
    assert closed == 1
    killed = c.get_run(dead)
    assert killed.info.status == T.RUN_KILLED and killed.data.tags[T.TAG_STATUS] == T.STATUS_KILLED
    assert "closed by now" in killed.data.tags[T.TAG_ERROR]
    assert c.get_run(done_tag).info.status == T.RUN_FINISHED
    assert c.get_run(mine).info.status == T.RUN_RUNNING and c.get_run(parent).info.status == T.RUN_RUNNING

    rerun = _run(c, exp, "leafA", attempt="now")  # the rerun replaces the killed run
    c.log_metric(rerun, T.M_FORGET_SCORE, 0.7, step=2)
    lifecycle.finish_run(c, rerun, T.STATUS_DONE)
    twice = _run(c, exp, "leafA", attempt="now")  # a duplicate finished run (two writers raced)
    lifecycle.finish_run(c, twice, T.STATUS_DONE)
    lifecycle.finish_run(c, mine, T.STATUS_FAILED, "ValueError: boom")
    assert record.finished_leaves(c, exp) == {"leafA"}
    assert lifecycle.finished_runs(c, exp, "leafA")[0].info.run_id == rerun
    assert record.record_failed_children(c, exp, parent, "now") == 1
    assert c.get_run(parent).data.tags[T.TAG_CHILDREN_FAILED] == "1"

    runs, excluded = load_run_record(uri, "life")
    counted = runs.filter(runs["kind"] == T.KIND_UNLEARN)["run_id"].to_list()
    assert counted == [rerun]
    reasons = dict(zip(excluded["run_id"], excluded["reason"], strict=True))
    assert reasons[dead].startswith("KILLED") and reasons[mine].startswith("FAILED: did not finish (ValueError")
    assert reasons[twice].startswith("FINISHED again")
    from reteq.analysis.report import _excluded_text

    assert _excluded_text(excluded).startswith("3 run(s) excluded from every table and figure (1 FAILED, "
                                               "1 FINISHED again, 1 KILLED)")


def test_work_dir_lock_refuses_a_second_holder_and_takes_over_a_dead_one(tmp_path):
    hold = ("import sys, time; from reteq.sweep.lock import WorkDirLock; WorkDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(WorkDirBusy, match=rf"work dir is in use by another reteq sweep \(pid {p.pid} on "):
            WorkDirLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = WorkDirLock(tmp_path).acquire()  # the holder died: its lock is taken over
    held = json.loads((tmp_path / "sweep.lock").read_text())
    assert held["pid"] == os.getpid() and held["took_over_from"].startswith(f"pid {p.pid} on ")
    lock.release()
    with WorkDirLock(tmp_path):
        pass


def test_extending_a_grid_keeps_every_finished_leaf_key(tmp_path):
    raw = sweep_dict(tmp_path)
    before = {leaf.key for leaf in build_plan(parse_config(raw)).leaves}
    raw["unlearn"] = {**raw["unlearn"], "lrs": [1e-3, 3e-3], "algorithms": ["ga", "npo"]}
    after = {leaf.key for leaf in build_plan(parse_config(raw)).leaves}
    assert before < after and len(after) == 4
    npo = {leaf.key for leaf in build_plan(parse_config(raw)).leaves if leaf.algorithm == "npo"}
    raw["unlearn"]["loss_normalisation"] = {"ga": "sequence", "npo": "sequence"}  # GA's changes, NPO's does not
    changed = build_plan(parse_config(raw)).leaves
    assert {x.key for x in changed if x.algorithm == "npo"} == npo
    assert not before & {x.key for x in changed if x.algorithm == "ga"}
    raw["unlearn"]["steps"] = 3  # what changes a leaf's result changes its key
    assert not before & {leaf.key for leaf in build_plan(parse_config(raw)).leaves}


@pytest.mark.usefixtures("reteq_cache")
def test_corrupt_checkpoint_repaired_from_artifact_else_retrained(tmp_path, sqlite_tracking):
    from reteq.models import load_model

    uri, root = sqlite_tracking
    c, exp = _exp(uri, root)
    parent = record.parent_run(c, exp, "life", "hash")
    store, key = tmp_path / "checkpoints", "nodekey"
    path = save_checkpoint(load_model(model_cfg(), seed=0), store / key, key, {"stage": "inst"})
    tags = {T.TAG_KIND: T.KIND_FINETUNE, T.TAG_PLAN_KEY: key, T.TAG_SWEEP: "life", T.TAG_STAGE: "inst"}
    node = object()
    seen: list[str] = []

    def reconcile():
        return reconcile_nodes(RecordTarget(c, exp, parent, "now"), store, {key: node}, lambda n: tags, {key},
                               echo=seen.append)

    assert reconcile() == {"recorded": 1, "repaired": 0, "retrain": 0}  # published, never recorded
    (rid,) = [r.info.run_id for r in lifecycle.finished_runs(c, exp, key)]
    assert c.get_run(rid).data.tags[T.TAG_RECORDED_ON_REUSE] == "1"

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    assert reconcile() == {"recorded": 0, "repaired": 1, "retrain": 0}
    assert is_complete(path, key) and "replaced by the artifact" in seen[-1]

    artifact = Path(root.removeprefix("file://")) / "life" / rid / "artifacts" / T.ARTIFACT_CHECKPOINT
    (artifact / "model.safetensors").write_bytes(b"bad")
    weights.write_bytes(b"bad too")
    assert reconcile() == {"recorded": 0, "repaired": 0, "retrain": 1}
    assert not path.exists(), "a corrupt checkpoint is never kept"
    old = c.get_run(rid)
    assert old.info.status == T.RUN_FAILED and old.data.tags[T.TAG_STATUS] == T.STATUS_CORRUPT
    assert record.finished_nodes(c, exp) == {}, "the node is retrained: nothing counts as finished"


# ---- bad data: one line naming file, row and field; exit 2; the work dir is not created ----------------------------

GOOD = {"messages": [{"role": "user", "content": "Help me."}, {"role": "assistant", "content": "Sorry, no."}]}


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("messages", pa.list_(pa.struct(
        [("role", pa.string()), ("content", pa.string())])))])), path)


def _bad_data(tmp_path: Path, case: str) -> tuple[Path, str]:
    if case == "invalid-utf8":
        p = tmp_path / "u.jsonl"
        p.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode()[:-3] + b"\xff\xfe\"}]}\n")
        return p, "row 1: invalid UTF-8 at byte"
    if case == "truncated-parquet":
        p = tmp_path / "u.parquet"
        _parquet(p, [GOOD] * 4)
        p.write_bytes(p.read_bytes()[:-20])
        return p, "not a readable Parquet file, truncated or corrupt"
    if case == "empty-parquet":
        p = tmp_path / "u.parquet"
        _parquet(p, [])
        return p, "row 0: the Parquet file has no rows"
    if case == "empty-assistant-turn":
        p = tmp_path / "u.jsonl"
        empty = {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "  "}]}
        p.write_text("\n".join(json.dumps(r) for r in (GOOD, GOOD, empty)) + "\n")
        return p, "row 2: messages[1].content: empty assistant turn"
    p = tmp_path / "u.jsonl"  # too-long: the prompt alone fills max_length
    long = {"messages": [{"role": "user", "content": "word " * 200}, GOOD["messages"][1]]}
    p.write_text("\n".join(json.dumps(r) for r in (GOOD, long)) + "\n")
    return p, "row 1: messages: no assistant token fits in 96 tokens (stages.U.max_length, model tiny)"


@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("case", ["invalid-utf8", "truncated-parquet", "empty-parquet", "empty-assistant-turn",
                                  "too-long"])
def test_bad_data_is_one_line_before_training(tmp_path, capsys, case):
    data, reason = _bad_data(tmp_path, case)
    raw = sweep_dict(tmp_path)
    raw["stages"][3]["source"] = {"kind": "local", "path": str(data)}
    config = write_config(tmp_path / "sweep.yaml", raw)
    work = tmp_path / "work"
    assert main(["sweep", str(config), "--work-dir", str(work)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(data) in err[0] and reason in err[0] and "stages.U.source" in err[0], err
    assert not work.exists(), "the work dir is created only after preflight"


# ---- a full or read-only disk: one line naming the path and what was being written ----------------------------------

@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("case", ["disk-full", "read-only"])
def test_full_or_read_only_work_dir_is_one_line(tmp_path, capsys, case):
    with tmpfs(tmp_path / "mnt", "size=64k" if case == "disk-full" else "size=1m,ro") as mnt:
        config = write_config(tmp_path / "sweep.yaml", sweep_dict(tmp_path))
        rc = main(["sweep", str(config), "--work-dir", str(mnt / "work"), "--no-report"])
        err = [x for x in capsys.readouterr().err.splitlines() if " INFO mlflow." not in x]  # MLflow's own log
        assert rc == 1 and len(err) == 1, err
        if case == "disk-full":
            assert err[0] == f"error: {mnt / 'work' / 'mlflow.db'}: disk full while writing the MLflow store", err
        else:
            assert err[0] == f"error: {mnt / 'work'}: read-only file system while writing the work dir", err


@pytest.mark.usefixtures("reteq_cache")
def test_a_disk_that_fills_mid_sweep_names_the_cause_and_ends_in_one_line(tmp_path, capsys):
    """Room for the MLflow store and its setup, none for a stage checkpoint: the disk fills once nodes train.
    Each failed node says why (the OSError, or SQLite's own words; never SQLAlchemy's footer), and the driver
    ends with one `error:` line, not a traceback."""
    from reteq.workdir import cache_root

    template = next(cache_root().glob("mlflow-schema-*.db"), None)
    room = (template.stat().st_size if template else 1 << 20) + (384 << 10)
    with tmpfs(tmp_path / "mnt", f"size={room // 1024}k") as mnt:
        config = write_config(tmp_path / "sweep.yaml", sweep_dict(tmp_path))
        rc = main(["sweep", str(config), "--work-dir", str(mnt / "work"), "--no-report"])
        captured = capsys.readouterr()
        out, err = captured.out, [x for x in captured.err.splitlines() if " INFO mlflow." not in x]
        assert rc == 1, (out, err)
        assert "sqlalche.me" not in out + "\n".join(err) and "Traceback" not in "\n".join(err), (out, err)
        failed = [x for x in out.splitlines() if "FAILED" in x and "[node]" in x]
        assert failed and all(any(s in x for s in ("No space left", "disk full", "disk is full")) for x in failed), out
        assert all(x.startswith("error: ") for x in err) and len(err) <= 1, err
