"""Shared fixtures: one local Ray cluster per test session (ray.init costs ~5 s), kept on 127.0.0.1."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Keep Ray's node address (and so the gloo rendezvous) on loopback: Ray reads this when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def _restored_environment():
    """os.environ as it was found, afterwards: in-process sweeps export MLFLOW_TRACKING_URI (mlflow's
    set_tracking_uri does), and a leaked one silently points a later test's `default_tracking_uri` at an
    earlier test's store. MLflow's own module-level URI goes back too. The block starts without one, so a
    developer's exported MLFLOW_TRACKING_URI never receives test runs."""
    import sys

    before = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    uri_before = getattr(utils, "_tracking_uri", None)
    yield
    for name in set(os.environ) - set(before):
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and utils._tracking_uri != uri_before:
        utils._tracking_uri = uri_before


@pytest.fixture(autouse=True)
def _environment_restored():
    """Around every test."""
    yield from _restored_environment()


@pytest.fixture(autouse=True, scope="module")
def _module_environment_restored():
    """Around every module, so its module-scoped fixtures start clean too: a fixture that made a store in
    tests/test_checkpoint_code.py once sent tests/test_mlflow_ui.py's sweep into that store (autouse fixtures
    of a scope are set up before the other fixtures of that scope)."""
    yield from _restored_environment()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), started once and shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        # idle workers kept as `reteq sweep` keeps them (reteq.sweep.ray_session.init_ray): warm task workers
        # survive while Tune's trial actors are alive
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, _system_config={"num_workers_soft_limit": 6})
    yield ray
    ray.shutdown()


@pytest.fixture
def sqlite_tracking(tmp_path):
    """A real MLflow SQLite store plus artifact folder in a temp dir; returns (tracking_uri, artifact_root)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, (tmp_path / "mlartifacts").as_uri()


# The whole suite's budget: CI gives 90 minutes including the install, the suite takes ~19 on 2 idle cores. Past
# it, the tests left fail at once (named, with this reason), so a pathologically slow machine still ends with
# the summary and the slowest tests printed instead of being cut off mid-run.
SUITE_BUDGET_S = float(os.environ.get("RETEQ_TEST_BUDGET_S", 70 * 60))
_SUITE_START = time.monotonic()


def pytest_runtest_setup(item):
    spent = time.monotonic() - _SUITE_START
    if spent > SUITE_BUDGET_S:
        pytest.fail(f"not run: the suite has spent {spent / 60:.0f} min, over its {SUITE_BUDGET_S / 60:.0f}-min "
                    "budget (RETEQ_TEST_BUDGET_S); the slowest tests are listed below", pytrace=False)


def pytest_configure(config):
    # One torch thread in the test process: on 2 shared cores, oversubscribed matmul threads slow the tiny
    # models' steps by 10-50x (Ray workers set their own thread counts).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zero3_two_ranks(tmp_path_factory):
    """Two gloo ranks under real DeepSpeed ZeRO-3 with every tensor partitioned (tests/dist_jobs.py), run once:
    a LoRA stage trained, saved ungathered and gathered, reloaded; then a whole leaf with collectives recorded.
    Modules that use it mark themselves `usefixtures("reteq_cache")` so the tiny model exists first."""
    from distributed import run_ranks

    out = tmp_path_factory.mktemp("zero3")
    return run_ranks("dist_jobs:zero3_round_trip", 2, out, threshold=0, lora={"r": 4, "alpha": 8})
