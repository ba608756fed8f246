"""Process-group set-up for ``torchrun`` launches (DistributedDataParallel).

``torchrun --nproc_per_node=K [--nnodes ... --rdzv-endpoint ...] -m cryoformer train ...``
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; without them training runs
in a single process. Backend: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on
CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cryoformer.errors import InputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, "--device", "cuda requested but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_name: str) -> DistInfo:
    """Initialise the process group when launched by torchrun; return this process's info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """Maximum of a scalar over ranks (stop flags: any rank stopping stops all)."""
    if not info.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a small float tensor (loss terms for logging and the NaN check)."""
    if not info.distributed:
        return values
    t = values.detach().to(device=_comm_device(info), dtype=torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world).to(values.device)


def broadcast_array(array, info: DistInfo):
    """Rank 0's numpy array on every rank (same shape and dtype everywhere)."""
    if not info.distributed:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device(info))
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    return info.device if info.device.type == "cuda" else torch.device("cpu")
