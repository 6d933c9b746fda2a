"""A DeepSpeed config file (`execution.deepspeed`) read and judged without torch or DeepSpeed: the driver, the
cluster check and a Tune trial decide from it whether work runs in process (reteq.sweep.process.in_process), and
none of them may load torch to do so (reteq.train.engine, which builds the engines, does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reteq.errors import BadInput


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"execution.deepspeed: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"execution.deepspeed: {path} is not valid JSON ({e.msg})") from None


def deepspeed_needed(ds_config: dict[str, Any] | None) -> bool:
    """False when a DeepSpeed config has nothing to do for ONE CPU worker (none, or ZeRO-0 in fp32 without
    clipping): plain torch then does the same arithmetic without a process group or `import deepspeed`, so
    the sweep runs such work in process (reteq.sweep.process.in_process) and so does reteq.sweep.worlds."""
    if ds_config is None:
        return False
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    half = any(ds_config.get(k, {}).get("enabled", False) for k in ("fp16", "bf16"))
    return zero != 0 or half or bool(float(ds_config.get("gradient_clipping", 0) or 0))
