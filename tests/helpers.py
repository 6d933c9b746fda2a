"""Shared builders for the engine tests: a session-wide tiny-model cache and tiny sweep configs.

Import the fixture into a test module with `from helpers import reteq_cache  # noqa: F401` and mark the module
`pytestmark = pytest.mark.usefixtures("reteq_cache")`. The tiny base model is built once per test session
(20-40 s on 2 cores) under $RETEQ_CACHE; an already-set RETEQ_CACHE is reused, so a warm cache makes the
suite fast locally while CI (fresh cache) still builds the model itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reteq.config import ModelConfig, SweepConfig, parse_config

RETAIN = ("inst", "tofu", "math")
TASKS = {"inst": "instruct", "tofu": "knowledge", "math": "math", "U": "refusal"}


@pytest.fixture(scope="session")
def reteq_cache(tmp_path_factory) -> Path:
    """RETEQ_CACHE for the whole session (the caller's, or a fresh temp dir) with the tiny model built in it.

    A missing model is built in a child process with OMP_WAIT_POLICY=PASSIVE (it must be set before torch
    loads): the build pins two OpenMP threads, which spin-wait for each other whenever another process holds
    one of two shared cores (measured: 612 s instead of 22 s; the weights are bit-identical either way).
    Tests then run with one torch thread, for the same reason."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("RETEQ_CACHE"):
            mp.setenv("RETEQ_CACHE", str(tmp_path_factory.mktemp("reteq-cache")))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        from reteq import tiny

        if not (tiny.cache_root() / f"tiny-llama-{tiny._fingerprint()}" / "config.json").exists():
            build = subprocess.run(
                [sys.executable, "-c", "from reteq.tiny import ensure_tiny_model; ensure_tiny_model()"],
                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=1800)
            assert build.returncode == 0, build.stderr[-3000:]
        tiny.ensure_tiny_model()  # a cache hit now (or an in-process build if the fingerprint scheme changed)
        torch.set_num_threads(1)
        yield Path(os.environ["RETEQ_CACHE"])
    torch.set_num_threads(threads)


def model_dict(lora: dict | None = None, **kw: Any) -> dict:
    """The built-in tiny Llama; full finetuning unless `lora` (e.g. {"r": 4, "alpha": 8}) is given."""
    return {"name": "tiny", "source": "builtin:tiny", "dtype": "fp32", "lora": lora, **kw}


def model_cfg(lora: dict | None = None, **kw: Any) -> ModelConfig:
    return ModelConfig.model_validate(model_dict(lora, **kw))


def stage_dict(name: str, n: int = 16, **kw: Any) -> dict:
    """A synthetic stage of `n` rows: one epoch in global batches of 8 (2 steps) unless overridden."""
    d: dict[str, Any] = {
        "name": name,
        "source": {"kind": "synthetic", "task": TASKS[name], "n": n},
        "epochs": 1,
        "lr": 3e-3,
        "global_batch": 8,
        "micro_batch": 4,
        "max_length": 96,
    }
    d.update(kw)
    return d


def sweep_dict(tmp_path: Path | str, n: int = 16, **overrides: Any) -> dict:
    """A four-stage sweep at toy scale (the demo's design, n rows per stage); top-level keys overridable."""
    d: dict[str, Any] = {
        "name": "test",
        "work_dir": str(Path(tmp_path) / "work"),
        "seeds": [0],
        "models": [model_dict()],
        "stages": [stage_dict(s, n) for s in (*RETAIN, "U")],
        "forget_stage": "U",
        "orders": {"forget_positions": [4], "retain_order": list(RETAIN)},
        "unlearn": {
            "algorithms": ["ga"],
            "lrs": [1e-3],
            "steps": 2,
            "global_batch": 8,
            "micro_batch": 8,
            "max_length": 96,
            "eval_every": 1,
        },
        "eval": {
            "metrics": ["forget", "tofu", "math"],
            "knowledge_stage": "tofu",
            "forget_prompts": 3,
            "knowledge_prompts": 8,
            "math_questions": 2,
            "math_samples": 2,
            "max_new_tokens": 8,
            "batch_size": 64,
        },
    }
    d.update(overrides)
    return d


def sweep_cfg(tmp_path: Path | str, **kw: Any) -> SweepConfig:
    return parse_config(sweep_dict(tmp_path, **kw))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def checkpoint_dirs(work_dir: Path | str) -> list[Path]:
    """Everything a run published (or left half-written) under work_dir/checkpoints."""
    root = Path(work_dir) / "checkpoints"
    return sorted(root.iterdir()) if root.exists() else []


@dataclass(frozen=True)
class Finetuned:
    """The tiny model after finetuning on the synthetic refusal stage, as plain tensors (copy before use)."""

    state: dict
    convs: list
    losses: list[float]
    lrs: list[float]


@functools.lru_cache(maxsize=1)
def refusal_finetune() -> Finetuned:
    """Finetune the tiny base model on 32 refusal rows for 12 steps (once per process; needs `reteq_cache`)."""
    import torch

    from reteq.config import StageConfig
    from reteq.data.synthetic import refusal
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import finetune_stage
    from reteq.train.worker_context import WorkerContext

    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    torch.manual_seed(0)
    model = load_model(mcfg, seed=0)
    convs = refusal(32, seed=0)
    stage = StageConfig.model_validate(stage_dict("U", 32, epochs=3, schedule="constant", micro_batch=8))
    module, result, _ = finetune_stage(model, tokenizer, stage, convs, WorkerContext(), seed=0)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return Finetuned(state, convs, [r.loss for r in result.records], [r.lr for r in result.records])


def tiny_base():
    """The built-in tiny model (fp32, eval mode) and its tokenizer, straight from the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reteq.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` for the block (e.g. "size=64k" for a disk that fills, "size=1m,ro" for a
    read-only one); skips the test where mounting needs a privilege this machine lacks."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        time.sleep(0.2)  # let a closing writer let go of the mount
        subprocess.run(["umount", "-l", str(where)], check=False)
