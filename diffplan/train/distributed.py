"""Small DistributedDataParallel helpers. `torchrun` sets WORLD_SIZE, RANK and LOCAL_RANK.

Everything here is a no-op in a single process, so callers never branch on distributed-ness.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from diffplan.config import resolve_device

__all__ = [
    "barrier",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "setup",
    "teardown",
    "world_size",
]


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str | torch.device = "cpu") -> tuple[torch.device, bool]:
    """Join the process group when WORLD_SIZE > 1; return ``(device, created)``.

    gloo on CPU, nccl on CUDA. On CUDA each process takes ``cuda:LOCAL_RANK``. ``created`` says
    whether this call made the group (and so whether `teardown` should destroy it): a group the
    caller already made is left alone.
    """
    device = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    return device, True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
