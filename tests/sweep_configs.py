"""Tiny sweep configs for the Ray tests (written into tmp dirs; paths absolute)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def tiny_sweep(work_dir: Path, *, name: str = "tiny-sweep", positions=(3, 4), algorithms=("ga", "npo"),
               lrs=(1e-3, 3e-3), workers: int = 2, concurrent: int = 2, deepspeed: str = "zero2_fp32.json",
               unlearn_steps: int = 2, retain=("inst", "tofu", "math")) -> dict:
    stage = {"epochs": 1, "lr": 3e-3, "global_batch": 8, "micro_batch": 4, "max_length": 80}
    tasks = {"inst": "instruct", "tofu": "knowledge", "math": "math", "U": "refusal"}
    return {
        "name": name,
        "work_dir": str(work_dir),
        "models": [{"name": "tiny", "source": "builtin:tiny", "lora": None}],
        "stages": [{"name": n, "source": {"kind": "synthetic", "task": tasks[n], "n": 8}, **stage}
                   for n in (*retain, "U")],
        "orders": {"forget_positions": list(positions), "retain_order": list(retain)},
        "unlearn": {"algorithms": list(algorithms), "lrs": list(lrs), "steps": unlearn_steps, "global_batch": 8,
                    "micro_batch": 4, "eval_every": 1, "max_length": 80},
        "eval": {"forget_prompts": 2, "knowledge_prompts": 4, "math_questions": 2, "math_samples": 1,
                 "max_new_tokens": 6, "batch_size": 64,
                 **({} if "tofu" in retain else {"knowledge_stage": None, "metrics": ["forget", "math"]})},
        "execution": {"workers": workers, "cpus_per_worker": round(0.95 / (workers * concurrent), 3),
                      "max_concurrent_trials": concurrent,
                      "deepspeed": str(REPO / "configs" / "deepspeed" / deepspeed) if deepspeed else None},
    }


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
