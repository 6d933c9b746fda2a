"""SweepRun, the settings every Ray process of a sweep reads: frozen, and whole after a trip through Ray's
serialiser (cloudpickle), so no worker ever falls back to reading a dict by string key."""

from __future__ import annotations

import dataclasses

import cloudpickle
import pytest

from reteq.sweep.settings import SweepRun


def test_a_sweep_run_is_frozen_and_survives_ray_serialisation():
    s = SweepRun(config={"name": "x"}, config_name="x.yaml", digest="d", tracking_uri="sqlite:///m.db",
                 experiment_id="1", parent_run_id="p", checkpoints="/w/checkpoints", storage_path="/w/ray",
                 deepspeed=None, in_process=True, task_cpus=0.9, runtime_env={"env_vars": {"A": "1"}},
                 env={"B": "2"}, attempt="host/1/t/abc")
    assert cloudpickle.loads(cloudpickle.dumps(s)) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.in_process = False  # type: ignore[misc]
