"""What one Ray process of a sweep keeps between its tasks: the parsed config, the plan and the data, cached.

A node task, a leaf task or trial, a retrain record task or a Ray Train worker receives `settings` (a SweepRun:
the sweep's settings, put in the object store once) and builds its state from it. Ray reuses worker processes
(and Tune reuses trial actors), so the parsed config, plan and data are cached per process: the second task in
a process pays nothing for them. Every entry point in reteq.sweep.remote applies the sweep's worker env
(`apply_env`) before it asks for anything here.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
from typing import Any

from reteq import environment
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.sweep.settings import SweepRun
from reteq.train.deepspeed_config import deepspeed_needed, load_deepspeed_config

# Imports inside functions below are the heavy ones (torch through reteq.pipeline / reteq.train, MLflow): a Tune
# trial imports this module and must stay a light process.

_CACHE: dict[str, tuple] = {}  # config digest -> (cfg, plan, DataCache), per process


def apply_env(settings: SweepRun, secrets: dict[str, str]) -> None:
    """The sweep's worker env and its MLflow credentials (`secrets`: the value of `settings.secrets`) in this
    process's environment; called first by every Ray entry point (a warm worker may run several sweeps)."""
    environment.apply_worker_env({**settings.env, **secrets})


def plan_of(settings: SweepRun):
    """(cfg, plan) for this sweep, parsed once per process; imports neither torch nor MLflow (a Tune trial that
    only drives a task or a trainer stays a light process)."""
    digest = settings.digest
    if digest not in _CACHE:
        cfg = parse_config(settings.config, source=settings.config_name, max_leaves=None)  # the driver checked
        _CACHE.clear()
        _CACHE[digest] = (cfg, build_plan(cfg), None)
    return _CACHE[digest][:2]


def state(settings: SweepRun):
    """(cfg, plan, data) for this sweep, built once per process."""
    cfg, plan = plan_of(settings)
    digest = settings.digest
    if _CACHE[digest][2] is None:
        # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
        from reteq.pipeline.context import DataCache

        _CACHE[digest] = (cfg, plan, DataCache(cfg))
    return _CACHE[digest]


def deepspeed_config(settings: SweepRun) -> dict[str, Any] | None:
    return load_deepspeed_config(settings.deepspeed) if settings.deepspeed else None


def in_process(cfg, ds: dict[str, Any] | None) -> bool:
    """True when one CPU worker and a DeepSpeed config with nothing to do (ZeRO-0, fp32, no clipping): the
    work then runs in the task or trial itself with plain torch, the same arithmetic without a worker group,
    a process group or `import deepspeed`. Multi-worker and GPU work keeps Ray Train + DeepSpeed."""
    ex = cfg.execution
    return ex.workers == 1 and not ex.use_gpu and not deepspeed_needed(ds)


def release_memory() -> None:
    """Give a finished node's or leaf's memory back to the OS before this warm worker takes its next task.

    Each task loads the base model again (538 MB in fp32 for SmolLM2-135M, plus theta_r and merged copies), and
    glibc keeps freed blocks in its arenas: on configs/smol.yaml a warm worker grew from 2.9 to 7.1 GB over five
    leaves, and two such lanes would outgrow a 16 GB laptop. malloc_trim returns the free arena pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


# What a warm worker preloads, by name: this module stays light (a Tune trial imports it), so they load only here.
WARM_MODULES = (
    "transformers.models.llama.modeling_llama",  # the tiny model's; else loaded lazily on the first node
    "reteq.pipeline.leaf",  # torch, transformers, peft
    "reteq.sweep.record",  # MLflow
)


def warm_up() -> None:
    """Import what every in-process node and leaf needs (see reteq.sweep.remote.Launcher.warm)."""
    for name in WARM_MODULES:
        importlib.import_module(name)
