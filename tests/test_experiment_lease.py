"""One sweep per (tracking store, experiment): a lease recorded in the tracking store itself
(reteq.sweep.lock.ExperimentLease, docs/security.md).

Two work dirs share one MLflow store (`execution.tracking_uri`). While a live sweep from work dir A holds the
experiment's lease, `reteq sweep` of the same name from work dir B is refused in one line, exit 2, and kills
nothing: A's RUNNING run stays RUNNING (without the lease, B would close it KILLED as an earlier attempt's).
"""

from __future__ import annotations

import json
import time

import pytest
from helpers import reteq_cache, sweep_dict, write_config  # noqa: F401  (session fixture)

from reteq import tracking as T
from reteq.cli import EXIT_BAD_INPUT, main
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.sweep.lock import ExperimentBusy, ExperimentLease

pytestmark = pytest.mark.usefixtures("reteq_cache")


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    exp = ensure_experiment(uri, "test", str(tmp_path / "shared" / "artifacts"))
    return uri, exp, tracking_client(uri)


def test_a_second_sweep_on_the_same_experiment_is_refused_and_kills_nothing(tmp_path, capsys):
    uri, exp, c = _store(tmp_path)
    a = ExperimentLease(uri, "test", tmp_path / "a", "host/1/a").acquire(c, exp)
    live = c.create_run(exp, tags={T.TAG_SWEEP: "test", T.TAG_KIND: T.KIND_FINETUNE,
                                   T.TAG_ATTEMPT: "host/1/a"}).info.run_id
    try:
        raw = sweep_dict(tmp_path)
        raw["execution"] = {"tracking_uri": uri}
        config = write_config(tmp_path / "sweep.yaml", raw)
        started = time.perf_counter()
        rc = main(["sweep", str(config), "--work-dir", str(tmp_path / "b"), "--no-report"])
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert rc == EXIT_BAD_INPUT and len(err) == 1, err
        assert err[0].startswith(f"error: experiment 'test' in {uri} is in use by a live sweep in "
                                 f"{(tmp_path / 'a').resolve()} (pid "), err[0]
        assert time.perf_counter() - started < 60
        assert c.get_run(live).info.status == "RUNNING"  # nothing killed
        assert [r.info.run_id for r in c.search_runs([exp])] == [live]  # nothing created
        assert json.loads(c.get_experiment(exp).tags[T.TAG_LEASE])["attempt"] == "host/1/a"
    finally:
        a.release()
    assert json.loads(c.get_experiment(exp).tags[T.TAG_LEASE])["released"] is True


def test_a_lease_without_heartbeat_is_taken_over_and_the_same_work_dir_takes_it(tmp_path):
    uri, exp, c = _store(tmp_path)
    dead = [ExperimentLease(uri, "test", tmp_path / "a", "host/1/a").acquire(c, exp)]  # its holder "dies":
    dead[0]._stop.set()  # no heartbeat, never released
    with pytest.raises(ExperimentBusy, match="in use by a live sweep"):
        ExperimentLease(uri, "test", tmp_path / "b", "host/2/b").acquire(c, exp)
    ExperimentLease(uri, "test", tmp_path / "a", "host/3/a").acquire(c, exp).release()  # A's flock proves it dead
    dead.append(ExperimentLease(uri, "test", tmp_path / "a", "host/4/a").acquire(c, exp))  # "dies" again
    dead[1]._stop.set()
    b = ExperimentLease(uri, "test", tmp_path / "b", "host/5/b", ttl=0.0).acquire(c, exp)  # expired: taken over
    assert json.loads(c.get_experiment(exp).tags[T.TAG_LEASE])["attempt"] == "host/5/b"
    b.release()
