"""The actor that submits a sweep's node tasks, retrain records and warm-ups (see `Launcher`)."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from reteq.sweep import worker
from reteq.sweep.nodes import submit_nodes
from reteq.sweep.ray_session import LAUNCHER_CPUS, task_lanes, trial_runtime_env
from reteq.sweep.retrain_records import submit_records
from reteq.sweep.settings import SweepRun
from reteq.sweep.worker import warm_up

HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (one unit, on the head only)


class Launcher:
    """Submits the node tasks and the warm-ups from inside a placement group, as Tune's trials submit the
    leaves' tasks. Measured on Ray 2.60: the tasks of a process in a placement group never reuse a worker that
    ran a task of the driver (they get a pool of their own), so node tasks submitted by the driver left the
    leaves to start cold workers (~15-30 s on 2 cores). Submitted from here, nodes, warm-ups and leaves share
    one pool of warm workers. It owns the node tasks (retries included) and lives as long as the sweep."""

    def warm(self, cpus_per_task: float, runtime_env: dict, resources: dict | None = None) -> int:
        """Start as many task workers as tasks of `cpus_per_task` fit, each importing what a node or leaf needs
        (torch, transformers, MLflow: 5-10 s per process on 2 cores) while the driver is still busy. Nothing
        waits on them. `resources`: execution.worker_resources, so they warm the nodes the work will use (on an
        autoscaling cluster they are also the first requests that make it launch one)."""
        lanes = task_lanes(cpus_per_task, ray.cluster_resources().get("CPU", 0))
        task = ray.remote(warm_up).options(num_cpus=cpus_per_task, name="warm-up", runtime_env=runtime_env,
                                           scheduling_strategy="DEFAULT", resources=dict(resources or {}))
        self._warming = [task.remote() for _ in range(lanes)]
        return lanes

    def submit(self, settings: SweepRun, keys: list[str], settings_ref: list, done: dict, records: list[str]) -> tuple:
        """nodes.submit_nodes and retrain_records.submit_records, here -> (node refs, record refs).
        `settings_ref` comes in a list: the tasks get the ref, not its value."""
        cfg, plan = worker.plan_of(settings)
        refs = submit_nodes(cfg, plan, keys, settings_ref[0], done, settings)
        return refs, submit_records(cfg, plan, records, settings_ref[0], refs, settings)


def start_launcher():
    """A Launcher actor in a placement group of its own (0.01 CPU) -> (actor, placement group). On the head node:
    it owns every node task, and a task whose owner dies is lost with it (its result and its retries), so the
    launcher must live where the driver lives, on the one node an autoscaler never removes or a spot market
    reclaims."""
    head = {HEAD_RESOURCE: 0.001} if HEAD_RESOURCE in ray.cluster_resources() else {}
    pg = placement_group([{"CPU": LAUNCHER_CPUS, **head}], name="reteq-launcher")
    ray.get(pg.ready())
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=False)
    actor = ray.remote(Launcher).options(num_cpus=LAUNCHER_CPUS, scheduling_strategy=strategy, name=None,
                                         runtime_env=trial_runtime_env()).remote()
    return actor, pg


def stop_launcher(launcher) -> None:
    if launcher is not None:
        ray.kill(launcher[0])
        remove_placement_group(launcher[1])
