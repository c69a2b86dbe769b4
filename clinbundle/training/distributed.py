"""Multi-process training (DDP) under torchrun, and the same code path for one process.

`torchrun --nproc_per_node N -m clinbundle train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; every
rank trains its shard of the training volumes, gradients are averaged by DDP, and only rank 0
talks to MLflow and writes files. Without those variables everything here is a no-op, so the
single-process loop is the same code.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("clinbundle.distributed")

#: Ranks wait in a collective while rank 0 validates or uploads; allow that to take a while.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """The process's place in the job, from torchrun's environment variables."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed() -> DistInfo:
    """Join the process group if torchrun started us: NCCL when CUDA is there, gloo otherwise."""
    info = dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    log.info(
        "rank %d of %d (local rank %d), backend %s",
        info.rank,
        info.world_size,
        info.local_rank,
        backend,
    )
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's object on every rank (config, resume checkpoint, validation results)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_step(
    loss: float, stop: bool, info: DistInfo, device: torch.device
) -> tuple[float, bool]:
    """Mean loss over ranks and whether any rank was asked to stop, in one collective.

    All ranks then record the same loss and stop after the same step, so the `last` written by
    rank 0 describes every rank's position.
    """
    if not info.enabled:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / info.world_size, bool(t[1] > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
