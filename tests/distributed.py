"""Run a function on N real processes joined by a gloo group on 127.0.0.1 (DeepSpeed's CPU stand-in for NCCL).

`run_ranks("dist_jobs:zero3_round_trip", 2, out_dir, **kwargs)` starts one Python process per rank with the
rank variables DeepSpeed expects, calls `fn(rank, world, out_dir, **kwargs)` after `init_process_group`, and
returns what each rank wrote with `write_result`. A rank that fails or hangs fails the test with its log tail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

_BOOT = """
import json, os, sys
sys.path[:0] = [{tests!r}, {root!r}]
import torch
import torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
module, fn = {target!r}.split(":")
getattr(__import__(module), fn)(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), {out!r}, **json.loads({kwargs!r}))
dist.barrier()  # no rank tears gloo down while its peer still has work in flight ('terminate called', under load)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(out_dir: str | Path, rank: int, result: dict[str, Any]) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(target: str, world: int, out_dir: Path, timeout: float = 600, **kwargs: Any) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    code = _BOOT.format(tests=str(TESTS), root=str(ROOT), target=target, out=str(out_dir),
                        kwargs=json.dumps(kwargs))
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    failed: list[tuple[int, Any]] = []
    deadline = time.monotonic() + timeout
    try:  # one failed rank leaves the others blocked in a collective: stop them all at the first failure
        while not failed and any(p.poll() is None for p, _ in procs):
            failed = [(r, p.returncode) for r, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
            if time.monotonic() > deadline:
                failed = [(r, "timeout") for r, (p, _) in enumerate(procs) if p.poll() is None]
            time.sleep(0.5)
        failed = failed or [(r, p.returncode) for r, (p, _) in enumerate(procs) if p.returncode != 0]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failed:
        rank, rc = failed[0]
        tail = (out_dir / f"rank{rank}.log").read_text()[-4000:]
        raise AssertionError(f"rank {rank} exited with {rc}:\n{tail}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
