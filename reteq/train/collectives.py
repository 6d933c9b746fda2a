"""Every collective reteq itself issues, in one place, with its tensors on the worker's device.

Ray Train picks NCCL when a trial asks for GPUs, and NCCL has no CPU backend: a CPU tensor handed to
`all_reduce` fails there ("No backend type associated with device type cpu") even though gloo accepts it on a
laptop. So every function here takes the worker's device, builds its tensors on it, and checks that before
calling torch.distributed; tests/test_collectives.py makes sure no other module calls torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from reteq.errors import ReteqError


class CollectiveDeviceError(ReteqError, RuntimeError):
    """A tensor bound for a collective is not on the worker's device (NCCL would fail on it)."""


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    device = torch.device(device)
    other_index = device.type != "cpu" and device.index is not None and tensor.device.index != device.index
    if tensor.device.type != device.type or other_index:
        raise CollectiveDeviceError(f"collective tensor on {tensor.device}, the worker's device is {device}")
    return tensor


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of `value` over all ranks (float64 on the worker's device); `value` itself outside a group."""
    if not active():
        return value
    t = check_device(torch.tensor([value], dtype=torch.float64, device=device), device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over all ranks, in place, as one flat buffer (one collective): plain
    torch data parallelism (each rank's loss already carries its share of the global batch, so the sum is the
    global gradient). A parameter without a gradient on this rank contributes zeros. Nothing outside a group."""
    if not active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = check_device(torch.cat([g.reshape(-1) for g in grads]), grads[0].device)
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads, strict=True):
        summed = flat[at:at + g.numel()].view_as(g)
        at += g.numel()
        if p.grad is None:
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)


def broadcast_object(obj: Any, device: torch.device, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank; the pickled bytes travel in a tensor on the worker's device."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device(device))
    return box[0]


def all_gather_object(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's `obj`, by rank; the pickled bytes travel in tensors on the worker's device (torch picks the
    current CUDA device for NCCL, so it is set to the worker's for the call)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            dist.all_gather_object(out, obj)
    else:
        dist.all_gather_object(out, obj)
    return out


def barrier(device: torch.device) -> None:
    """Wait for every rank; NCCL's barrier runs on the given CUDA device rather than guessing one."""
    if not active():
        return
    device = torch.device(device)
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


# DeepSpeed's CPU accelerator builds a C++ op (deepspeed_shm_comm) with gcc when its comm backend starts, on
# every new machine (~1 min on 2 cores), under torch's JIT lock file. A process killed meanwhile (a preempted
# worker, a killed trial) leaves that lock behind, and every later DeepSpeed start on the machine waits on it
# forever (seen: a CI run hung until its 90-minute limit). The op serves only `inference_all_reduce`, which
# training never calls: reteq's collectives above, and DeepSpeed's own training collectives, are torch's.
SHM_OP = "deepspeed_shm_comm"


def import_deepspeed():
    """`import deepspeed`, with the CPU-only shared-memory op switched off (above) -> the module. Call it before
    anything starts DeepSpeed's comm backend (deepspeed.initialize, zero.Init)."""
    # lazy: optional DeepSpeed, only on its path
    import deepspeed

    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_OP] = False
    return deepspeed
