"""Chaos: `reteq sweep` as an operator runs it (a subprocess with its own local Ray and a real MLflow SQLite store),
killed by SIGKILL at chosen points (the RETEQ_FAULT hook, reteq/sweep/faults.py), then rerun until it finishes.

One path (inst>tofu>math>U, 4 stage nodes, one leaf per lr) keeps it short; the points are: one Ray Train worker
during a node; the driver during a node, after a node's checkpoint is published but before its record, and during
a leaf's unlearning. Afterwards the record must be what an uninterrupted sweep writes, and extending the lr grid
(with the leaf's parent checkpoint corrupted) must repair it from MLflow and run only the new leaf.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import reteq_cache, sweep_dict, write_config  # noqa: F401  (session fixture)
from mlflow import MlflowClient

from reteq import tracking as T
from reteq.analysis import tables as TB
from reteq.analysis.load import load_metrics, load_run_record
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.train.checkpoint import is_complete

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("reteq_cache")]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1500


def _config(tmp_path: Path, name: str, lrs=(1e-3,)) -> Path:
    raw = sweep_dict(tmp_path, n=8, name=name)
    raw["unlearn"]["lrs"] = list(lrs)
    raw["execution"] = {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1}
    return write_config(tmp_path / f"{name}-{len(lrs)}.yaml", raw)


RAY_START_FAILED = ("during startup", "Timed out waiting for file", "Failed to connect to GCS")


def _sweep(config: Path, work: Path, fault: str | None = None, on_lock=None) -> subprocess.CompletedProcess:
    """`reteq sweep`; started again when Ray itself failed to start (an overloaded machine), before any trial."""
    for _ in range(3):
        res = _sweep_once(config, work, fault, on_lock)
        if "Trial status" in res.stdout + res.stderr or not any(x in res.stderr for x in RAY_START_FAILED):
            return res
    return res


def _sweep_once(config: Path, work: Path, fault: str | None, on_lock) -> subprocess.CompletedProcess:
    """`reteq sweep` in its own session; whatever of its Ray cluster outlives a SIGKILL is killed after it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RETEQ_FAULT")}
    env.update(PYTHONPATH=str(REPO), RETEQ_FAULT_MARK=str(work.parent / f"fault-{time.monotonic_ns()}"))
    if fault:
        env["RETEQ_FAULT"] = fault
    p = subprocess.Popen([sys.executable, "-m", "reteq", "sweep", str(config), "--work-dir", str(work),
                          "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        if on_lock is not None:
            on_lock(p)
        out, err = p.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _second_sweep_refused(config: Path, work: Path):
    """While the first sweep holds the work dir, a second one exits 2 with one line naming the holder."""

    def check(first: subprocess.Popen) -> None:
        lock = work / "sweep.lock"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
            time.sleep(0.5)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("MLFLOW_TRACKING_URI", None)
        second = subprocess.run([sys.executable, "-m", "reteq", "sweep", str(config), "--work-dir", str(work)],
                                capture_output=True, text=True, env=env, timeout=600)
        assert first.poll() is None, "the first sweep ended before the second one was refused"
        lines = [x for x in second.stderr.splitlines() if " INFO mlflow." not in x]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"work dir is in use by another reteq sweep (pid {first.pid} on " in lines[0], lines

    return check


def _runs(work: Path, name: str) -> list:
    c = MlflowClient(T.default_tracking_uri(work))
    exp = c.get_experiment_by_name(name).experiment_id
    return c.search_runs([exp], max_results=10_000)


def _tables(work: Path, name: str) -> dict[str, pl.DataFrame]:
    uri = T.default_tracking_uri(work)
    runs, _ = load_run_record(uri, name)
    metrics = load_metrics(uri, name, runs=runs)
    out = {"final": TB.final_table(metrics), **TB.table1(metrics)}
    return {k: v.drop([c for c in v.columns if c in ("run_id", "run_name", "start_time")]) for k, v in out.items()}


def _check(res: subprocess.CompletedProcess, code: int | None) -> None:
    assert code is None or res.returncode == code, (res.returncode, res.stdout[-3000:], res.stderr[-3000:])


def test_sigkill_at_five_points_then_rerun_equals_an_uninterrupted_sweep(tmp_path):
    base_cfg, chaos_cfg = _config(tmp_path, "base"), _config(tmp_path, "chaos")
    base, chaos = tmp_path / "base", tmp_path / "chaos"
    plan = build_plan(parse_config(_load(chaos_cfg)))
    assert len(plan.nodes) == 4 and len(plan.leaves) == 1

    _check(_sweep(base_cfg, base, on_lock=_second_sweep_refused(base_cfg, base)), 0)

    # 1. one Ray Train worker dies during node 2 (inst>tofu): its trial fails, the run says so
    res = _sweep(chaos_cfg, chaos, "node_step:2:worker")
    _check(res, 1)
    assert "1 failed trials" in res.stdout, res.stderr[-3000:]
    runs = _runs(chaos, "chaos")
    assert not [r for r in runs if r.info.status == T.RUN_RUNNING], "no run is left RUNNING after a worker dies"
    (dead,) = [r for r in runs if r.info.status in (T.RUN_FAILED, T.RUN_KILLED)
               and r.data.tags.get(T.TAG_KIND) == T.KIND_FINETUNE]
    assert dead.data.tags[T.TAG_STAGE] == "tofu" and dead.data.tags[T.TAG_ERROR]
    sweep_run = next(r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_SWEEP)
    assert sweep_run.data.tags[T.TAG_CHILDREN_FAILED] == "1"

    # 2-4. the driver dies: during a node, after a node is published but not recorded, during unlearning
    for fault in ("node_step:1", "node_published:2", "leaf_eval:2"):
        res = _sweep(chaos_cfg, chaos, fault)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stderr[-3000:])
    published = {k for k in plan.nodes if is_complete(chaos / "checkpoints" / k, k)}
    _check(_sweep(chaos_cfg, chaos), 0)

    runs = _runs(chaos, "chaos")
    assert not [r for r in runs if r.info.status == T.RUN_RUNNING]
    keys = [*plan.nodes, *(leaf.key for leaf in plan.leaves)]
    for key in keys:
        mine = [r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == key]
        finished = [r for r in mine if r.info.status == T.RUN_FINISHED]
        assert len(finished) == 1, (key, [(r.info.status, r.data.tags.get(T.TAG_ERROR)) for r in mine])
        later = [r for r in mine if r.info.start_time > finished[0].info.end_time]
        assert not later, f"{key} was finished and then started again"
        unfinished = [r for r in mine if r.info.status != T.RUN_FINISHED]
        assert all(r.data.tags.get(T.TAG_ERROR) for r in unfinished), "every unfinished run says why"
    recorded = [r for r in runs if r.data.tags.get(T.TAG_RECORDED_ON_REUSE) == "1"]
    assert len(recorded) == 1 and recorded[0].data.tags[T.TAG_PLAN_KEY] in published
    base_tables, chaos_tables = _tables(base, "base"), _tables(chaos, "chaos")
    assert base_tables.keys() == chaos_tables.keys() and base_tables["final"].height
    for name, table in base_tables.items():
        assert table.equals(chaos_tables[name]), (name, table, chaos_tables[name])

    # extending the lr grid runs only the new leaf; the corrupt parent checkpoint comes back from its artifact
    leaf_parent = chaos / "checkpoints" / plan.leaves[0].parent
    weights = leaf_parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    before = len(runs)
    res = _sweep(_config(tmp_path, "chaos", lrs=(1e-3, 3e-3)), chaos)
    _check(res, 0)
    assert "local checkpoint failed sha256: replaced by the artifact" in res.stdout
    assert "already done: 4 nodes, 1 runs" in res.stdout
    after = _runs(chaos, "chaos")  # newest first
    new = after[: len(after) - before]
    assert sorted(r.data.tags.get(T.TAG_KIND) for r in new) == [T.KIND_SWEEP, T.KIND_UNLEARN]
    assert is_complete(leaf_parent, plan.leaves[0].parent)


def _load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
