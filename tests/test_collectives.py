"""Collectives run on the worker's device: NCCL (what Ray Train uses with GPUs) has no CPU backend.

On a CPU machine gloo accepts any tensor, so the checks are structural and recorded: no reteq module but
reteq/train/collectives.py calls torch.distributed; that module refuses a tensor off the worker's device; and in
a real two-rank DeepSpeed run every tensor handed to torch.distributed (by reteq or DeepSpeed) sat on the worker's
device and every reteq call came through the helper, with the device argument set.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from helpers import reteq_cache  # noqa: F401

from reteq.train import collectives

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_NAMES = {"all_reduce", "broadcast", "broadcast_object_list", "barrier", "all_gather", "all_gather_object",
                    "all_gather_into_tensor", "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv",
                    "all_to_all_single", "reduce_scatter", "gather_object", "scatter_object_list"}


def _distributed_calls(path: Path) -> list[str]:
    """`name:line` of every call to a torch.distributed collective in a source file, however it is imported."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    direct = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "torch.distributed.distributed_c10d"):
            direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVE_NAMES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVE_NAMES and ast.unparse(f.value) in aliases:
            found.append(f"{f.attr}:{node.lineno}")
        if isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{f.id}:{node.lineno}")
    return found


def test_the_scanner_sees_a_stray_collective(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("import torch.distributed as d\nfrom torch.distributed import barrier\n"
                     "def f(t):\n    d.all_reduce(t)\n    barrier()\n")
    assert _distributed_calls(stray) == ["all_reduce:4", "barrier:5"]


def test_no_reteq_module_but_the_helper_calls_torch_distributed():
    helper = ROOT / "reteq/train/collectives.py"
    stray = {str(p.relative_to(ROOT)): calls for p in sorted((ROOT / "reteq").rglob("*.py"))
             if p != helper and (calls := _distributed_calls(p))}
    assert stray == {}, f"collectives outside reteq/train/collectives.py (use it, with ctx.device): {stray}"
    assert _distributed_calls(helper)  # the scan does find the helper's own calls


def test_a_tensor_off_the_worker_device_is_refused():
    with pytest.raises(collectives.CollectiveDeviceError, match="worker's device is meta"):
        collectives.check_device(torch.zeros(1), torch.device("meta"))
    with pytest.raises(collectives.CollectiveDeviceError):
        collectives.check_device(torch.zeros(1, device="meta"), torch.device("cpu"))
    assert collectives.check_device(torch.zeros(1), torch.device("cpu")).numel() == 1


def test_outside_a_process_group_values_pass_through():
    assert collectives.all_reduce_sum(2.5, torch.device("meta")) == 2.5
    assert collectives.broadcast_object({"a": 1}, torch.device("meta")) == {"a": 1}


@pytest.mark.usefixtures("reteq_cache")
def test_every_collective_of_a_two_rank_zero3_leaf_is_on_the_worker_device(zero3_two_ranks):
    helper = str(ROOT / "reteq/train/collectives.py")
    for rank in zero3_two_ranks:
        calls = rank["collectives"]
        assert any(c["op"] == "all_reduce" and c["caller"] == helper for c in calls)  # the loop's loss sums
        assert any(c["op"] == "broadcast_object_list" for c in calls)  # the pipeline's node decision
        assert any("deepspeed" in c["caller"] for c in calls)  # DeepSpeed's own traffic is recorded too
        reteq_calls = [c for c in calls if "/reteq/" in c["caller"]]
        assert reteq_calls and all(c["caller"] == helper for c in reteq_calls)
        assert all(c["devices"] in ([], ["cpu"]) for c in calls), [c for c in calls if c["devices"] not in ([], ["cpu"])]
        assert all(c["device_arg"] == "cpu" for c in calls if c["op"] == "broadcast_object_list")


def test_a_stale_jit_lock_left_by_a_killed_process_does_not_stall_deepspeed(tmp_path, monkeypatch):
    """A process killed while torch JIT-built DeepSpeed's CPU shm op leaves `lock` in the extension folder, and
    every later build waits on it forever (a CI run hung for 90 minutes). reteq never builds that op, so two
    ranks start and step a DeepSpeed engine beside such a lock, and the lock is left as it was."""
    from distributed import run_ranks

    extensions = tmp_path / "torch_extensions"
    stale = extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / collectives.SHM_OP / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    ranks = run_ranks("dist_jobs:deepspeed_engine_step", 2, tmp_path / "out", timeout=240)
    assert [r["shm_op"] for r in ranks] == [False, False]
    assert ranks[0]["weight"] == ranks[1]["weight"]  # one step, the same update on both ranks
    assert sorted(p.name for p in stale.parent.iterdir()) == ["lock"]  # nothing built
