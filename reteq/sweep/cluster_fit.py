"""Does every resource request of a sweep fit some node type of a Ray cluster file? Checked before Ray starts.

Why: Ray's autoscaler launches a node type only for a request that type can hold; a placement group that no
type can satisfy (a 4-worker STRICT_PACK trial on 1-GPU nodes, a GPU trial on a CPU-only cluster, a custom
resource no node offers) stays PENDING forever with only a warning in `ray status`. On an autoscaling cluster the
live cluster has nothing to compare with (it starts with zero workers), so the comparison is made against the
cluster file the user will `ray up`: `reteq validate|plan|sweep CONFIG --cluster cluster.yaml`.

`sweep_requests` lists what reteq asks Ray for (the same numbers reteq.sweep's launcher, node tasks, Tune trials and
TorchTrainer worker groups use); `unplaceable` compares them with the node types' `resources` (Ray adds memory and
accelerator labels on its own; they are never requested here). Only `--cluster` imports this module
(reteq.commands.plan): Ray and torch load with it (~2 s), never for a plain `reteq validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reteq.config import SweepConfig
from reteq.config_files import read_yaml_mapping
from reteq.errors import ConfigError
from reteq.sweep.nodes import TRAINER_DRIVER_CPUS
from reteq.sweep.process import in_process
from reteq.sweep.ray_session import LAUNCHER_CPUS, TRIAL_DRIVER_CPUS
from reteq.train.deepspeed_config import load_deepspeed_config

_EPS = 1e-9


@dataclass(frozen=True)
class NodeType:
    """One `available_node_types` entry: what one node of it offers and how many may run."""

    name: str
    resources: dict[str, float]
    max_workers: int  # the head type: 1 (the head itself)
    head: bool = False


@dataclass(frozen=True)
class Request:
    """One placement group (or single task) a sweep asks Ray for: its bundles and Ray's placement strategy."""

    what: str  # for the error line, e.g. "a leaf's worker group (execution.workers x ...)"
    bundles: tuple[dict[str, float], ...]
    strategy: str = "PACK"
    head_only: bool = False  # the launcher: pinned to the head (reteq.sweep.remote.start_launcher)


def node_types(path: str | Path) -> list[NodeType]:
    """The node types of a Ray cluster-launcher file; ConfigError naming the file and field when malformed."""
    raw = read_yaml_mapping(path)
    types = raw.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError([f"{path}: available_node_types: required mapping of node types is missing"])
    head = raw.get("head_node_type")
    if head not in types:
        raise ConfigError([f"{path}: head_node_type: {head!r} is not one of available_node_types"])
    out = []
    for name, spec in types.items():
        res = (spec or {}).get("resources")
        if not isinstance(res, dict) or not all(isinstance(v, int | float) for v in res.values()):
            raise ConfigError([f"{path}: available_node_types.{name}.resources: must be a mapping of numbers"])
        top = 1 if name == head else int(spec.get("max_workers", raw.get("max_workers", 0)) or 0)
        out.append(NodeType(name, {k: float(v) for k, v in res.items()}, top, name == head))
    return out


def worker_bundle(cfg: SweepConfig) -> dict[str, float]:
    """One Ray Train worker's resources (reteq.sweep.remote.worker_group)."""
    ex = cfg.execution
    return {"CPU": ex.cpus_per_worker, **ex.worker_resources, **({"GPU": ex.gpus_per_worker} if ex.use_gpu else {})}


def sweep_requests(cfg: SweepConfig) -> list[Request]:
    """What a sweep of `cfg` asks Ray for, as reteq.sweep.driver runs it."""
    ex = cfg.execution
    ds = load_deepspeed_config(ex.deepspeed) if ex.deepspeed else None
    trial = Request("a leaf's Tune trial", ({"CPU": TRIAL_DRIVER_CPUS},))
    if in_process(cfg, ds):  # one CPU worker, ZeRO-0: nodes and leaves are single tasks
        task = {"CPU": ex.cpus_per_worker, **ex.worker_resources}
        return [Request("the sweep's launcher actor (on the head)", ({"CPU": LAUNCHER_CPUS},), head_only=True),
                trial, Request(f"a node or leaf task ({_shown(task)}: execution.cpus_per_worker, worker_resources)",
                               (task,))]
    bundle = worker_bundle(cfg)
    shown = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    return [trial, Request("a node's trainer task", ({"CPU": TRAINER_DRIVER_CPUS},)),
            Request(f"a trial's worker group (execution.workers {ex.workers} x {{{shown}}}, placement "
                    f"{ex.placement})", tuple(dict(bundle) for _ in range(ex.workers)), ex.placement)]


def _fits(bundle: dict[str, float], offer: dict[str, float]) -> bool:
    return all(v <= offer.get(k, 0.0) + _EPS for k, v in bundle.items() if v > 0)


def _summed(bundles) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def placeable(req: Request, types: list[NodeType]) -> bool:
    """Whether some set of nodes the cluster may run can hold `req` at once. STRICT_PACK: one node holds every
    bundle. STRICT_SPREAD: each bundle on its own node. PACK/SPREAD: each bundle on some node, and the cluster at
    its largest holds them all (a greedy first-fit over nodes, largest first: exact for identical bundles)."""
    if req.head_only:
        types = [t for t in types if t.head]
    if req.strategy == "STRICT_PACK":
        return any(_fits(_summed(req.bundles), t.resources) for t in types)
    slots = [dict(t.resources) for t in types for _ in range(t.max_workers)]
    slots.sort(key=lambda r: -sum(r.values()))
    for bundle in req.bundles:
        for slot in slots:
            if _fits(bundle, slot):
                if req.strategy == "STRICT_SPREAD":
                    slot.clear()
                else:
                    for k, v in bundle.items():
                        slot[k] = slot.get(k, 0.0) - v
                break
        else:
            return False
    return True


def unplaceable(cfg: SweepConfig, types: list[NodeType]) -> list[str]:
    """The sweep's requests that no set of the cluster's nodes can ever hold, each described in words."""
    return [r.what for r in sweep_requests(cfg) if not placeable(r, types)]


def check_cluster_fit(cfg: SweepConfig, config: str, cluster: str | Path) -> None:
    """ConfigError, one line naming both files and the request, when a trial of `cfg` could never be placed on
    the cluster file's node types (Ray would leave it PENDING forever)."""
    types = node_types(cluster)
    bad = unplaceable(cfg, types)
    if bad:
        offered = "; ".join(f"{t.name} {_shown(t.resources)}" for t in types)
        raise ConfigError([f"{config}: execution: {bad[0]} fits no node type of {cluster} ({offered}): "
                           "Ray would leave it PENDING forever"])


def _shown(resources: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"
