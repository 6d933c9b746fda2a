"""Chaos: `reteq sweep` as an operator runs it (a subprocess, a driver of the session's Ray cluster as under
`ray job submit`, recording into a real MLflow SQLite store), killed by SIGKILL at chosen points (the RETEQ_FAULT
hook, reteq/sweep/faults.py) and rerun until it finishes.

One path (inst>tofu>U: 3 stage nodes, one GA leaf) keeps it short. The driver dies at four points: during a
node's training, after a node's checkpoint is published but before its MLflow record, during a leaf's
unlearning, and at the report. Each rerun takes over the dead driver's work-dir lock and closes the runs it
left RUNNING (the reruns that need no SIGKILL run in this process: no interpreter or Ray job to start).
Afterwards the record must be what an uninterrupted sweep of the same config writes: one FINISHED run per key,
nothing RUNNING, nothing finished trained twice, and the report's tables equal (bitwise: every step is seeded).
Then one more lr, with the leaf's parent checkpoint corrupted on disk, runs only the new leaf, the parent
restored from its MLflow artifact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import reteq_cache  # noqa: F401  (session fixture)
from mlflow import MlflowClient

from reteq import tracking as T
from reteq.cli import EXIT_BAD_INPUT, main
from reteq.commands.sweep import run_sweep
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.train.checkpoint import is_complete
from tests.sweep_configs import tiny_sweep, write

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("reteq_cache")]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
RAY_START_FAILED = ("during startup", "Timed out waiting for file", "Failed to connect to GCS")
EXCLUDED = "runs_excluded_from_the_analysis_and_why"
KILL_POINTS = ("node_step", "node_published", "leaf_eval:2", "report")
NOT_COMPARED = ("run_id", "run_name", "start_time", "link")  # differ between any two sweeps


def _config(work: Path) -> dict:
    return tiny_sweep(work, name="chaos", retain=("inst", "tofu"), positions=(3,), algorithms=("ga",),
                      lrs=(1e-3,), workers=1, concurrent=1, deepspeed="zero0_fp32.json")


def _sweep(config: Path, work: Path, fault: str, ray_address: str, while_running=None,
           ) -> tuple[subprocess.CompletedProcess, str]:
    """`reteq sweep` killed at `fault`; started again when Ray itself failed to start (an overloaded machine).
    Returns the process and what the fault hook wrote when it fired (host process, point, pid)."""
    for i in range(3):
        mark = work.parent / f"fault-{fault.replace(':', '-')}-{i}"
        res = _sweep_once(config, work, fault, mark, ray_address, while_running)
        fired = mark.read_text() if mark.exists() else ""
        if fired or not any(x in res.stderr for x in RAY_START_FAILED):
            return res, fired
    return res, fired


def _sweep_once(config: Path, work: Path, fault: str, mark: Path, ray_address: str, while_running,
                ) -> subprocess.CompletedProcess:
    """`reteq sweep` in its own session, a driver of the session's Ray cluster (as under `ray job submit`: the
    cluster outlives the driver, and Ray ends a dead driver's tasks and trials)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RETEQ_DRIVER_PID")}
    env.update(PYTHONPATH=str(REPO), RAY_ADDRESS=ray_address, RETEQ_FAULT=fault, RETEQ_FAULT_MARK=str(mark))
    p = subprocess.Popen([sys.executable, "-m", "reteq", "sweep", str(config), "--work-dir", str(work)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        if while_running is not None:
            while_running(p)
        out, err = p.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _second_sweep_refused(config: Path, work: Path, capsys):
    """While a sweep holds the work dir, a second `reteq sweep` on it exits 2 with one line naming the holder."""

    def check(first: subprocess.Popen) -> None:
        lock, deadline = work / "sweep.lock", time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and f'"pid": {first.pid},' not in _text(lock):
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["sweep", str(config), "--work-dir", str(work)]) == EXIT_BAD_INPUT
        err = [x for x in capsys.readouterr().err.splitlines() if " INFO mlflow." not in x]
        assert first.poll() is None, "the first sweep ended before the second one was refused"
        assert len(err) == 1 and f"work dir is in use by another reteq sweep (pid {first.pid} on " in err[0], err

    return check


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _runs(work: Path) -> list:
    c = MlflowClient(T.default_tracking_uri(work))
    return c.search_runs([c.get_experiment_by_name("chaos").experiment_id], max_results=10_000)


def _report_tables(work: Path) -> dict[str, pl.DataFrame]:
    out = {}
    for path in sorted((work / "report" / "tables").glob("*.parquet")):
        table = pl.read_parquet(path)
        out[path.stem] = table.drop([c for c in table.columns if c in NOT_COMPARED])
    return out


def test_driver_killed_at_four_points_then_rerun_equals_an_uninterrupted_sweep(ray_cluster, tmp_path, capsys):
    base, chaos = tmp_path / "base", tmp_path / "chaos"
    raw = _config(chaos)
    config = write(raw, tmp_path / "chaos.yaml")
    plan = build_plan(parse_config(raw))
    assert len(plan.nodes) == 3 and len(plan.leaves) == 1
    (leaf,) = plan.leaves
    address = ray_cluster.get_runtime_context().gcs_address

    def killed(fault: str, while_running=None) -> str:
        res, fired = _sweep(config, chaos, fault, address, while_running)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stdout[-3000:], res.stderr[-3000:])
        assert fired.startswith(f"{fault.split(':')[0]}:"), (fault, fired)  # the hook fired, and it killed
        return res.stdout

    # 1-3: the driver dies during a node, after a node's publish (before its record), during unlearning
    killed("node_step")
    out = killed("node_published")
    assert "closed 1 run(s) left RUNNING by an earlier attempt that died (now KILLED)" in out, out
    out = killed("leaf_eval:2", while_running=_second_sweep_refused(config, chaos, capsys))
    assert "closed 1 run(s) left RUNNING" in out and "had no finished record: recorded as run" in out, out
    assert all(is_complete(chaos / "checkpoints" / k, k) for k in plan.nodes)

    # a rerun in this process finishes the sweep: the killed leaf starts over, no node is trained again (θ_r's
    # retrain record, evaluated once inst>tofu is published, may have been killed with the driver too)
    assert run_sweep(parse_config(raw), str(chaos), report=False).code == 0
    out = capsys.readouterr().out
    assert re.search(r"closed [12] run\(s\) left RUNNING", out) and "already done: 3 nodes, 0 runs" in out, out

    # 4: the driver dies at the report; the rerun takes over its lock, trains nothing, writes the report
    assert "nothing to do" in killed("report")
    assert run_sweep(parse_config(raw), str(chaos)).code == 0
    assert "nothing to do" in capsys.readouterr().out
    lock = json.loads((chaos / "sweep.lock").read_text())
    assert lock["released"] and lock["took_over_from"].startswith("pid "), lock

    runs = _runs(chaos)
    assert not [r for r in runs if r.info.status == T.RUN_RUNNING], "no run is left RUNNING"
    for key in [*plan.nodes, leaf.key, *plan.records]:
        mine = [r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == key]
        finished = [r for r in mine if r.info.status == T.RUN_FINISHED]
        assert len(finished) == 1, (key, [(r.info.status, r.data.tags.get(T.TAG_ERROR)) for r in mine])
        later = [r for r in mine if r.info.start_time > finished[0].info.end_time]
        assert not later, f"{key} was finished and then trained again"
        for r in mine:
            if r.info.status != T.RUN_FINISHED:  # each unfinished run was closed by the next attempt, saying why
                assert r.info.status == T.RUN_KILLED and "closed by" in r.data.tags[T.TAG_ERROR], r.data.tags
    first = next(k for k, n in plan.nodes.items() if n.parent is None)
    killed_runs = [r.data.tags[T.TAG_PLAN_KEY] for r in runs if r.info.status == T.RUN_KILLED]
    records = [k for k in killed_runs if k in plan.records]  # a record running when the driver died
    assert sorted(k for k in killed_runs if k not in plan.records) == sorted([first, first, leaf.key])
    (recorded,) = [r for r in runs if r.data.tags.get(T.TAG_RECORDED_ON_REUSE) == "1"]
    assert recorded.data.tags[T.TAG_PLAN_KEY] == first  # published, then its driver died: recorded on reuse

    # an uninterrupted sweep of the same config (in this process, on the session's Ray cluster)
    assert run_sweep(parse_config(_config(base)), str(base)).code == 0
    capsys.readouterr()
    base_tables, chaos_tables = _report_tables(base), _report_tables(chaos)
    excluded = chaos_tables.pop(EXCLUDED)  # the killed runs: listed in the report, left out of every table
    assert sorted(excluded["mlflow_status"]) == [T.RUN_KILLED] * (3 + len(records)) and EXCLUDED not in base_tables
    assert {"table_1_forget_score", "table_1_tofu_utility", "final_values_per_setting_and_p"} <= set(base_tables)
    assert base_tables.keys() == chaos_tables.keys()
    for name, table in base_tables.items():
        assert table.equals(chaos_tables[name]), (name, table, chaos_tables[name])

    # extending the lr grid runs only the new leaf; its parent's corrupted checkpoint comes back from MLflow
    weights = chaos / "checkpoints" / leaf.parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    wider = parse_config({**raw, "unlearn": {**raw["unlearn"], "lrs": [1e-3, 3e-3]}})
    assert run_sweep(wider, str(chaos), report=False).code == 0
    out = capsys.readouterr().out
    assert "local checkpoint failed sha256: replaced by the artifact" in out, out
    assert "already done: 3 nodes, 1 runs" in out, out
    new = [r for r in _runs(chaos) if r.info.run_id not in {x.info.run_id for x in runs}]
    assert sorted(r.data.tags[T.TAG_KIND] for r in new) == [T.KIND_SWEEP, T.KIND_UNLEARN]  # a new grid's parent
    assert is_complete(chaos / "checkpoints" / leaf.parent, leaf.parent)
