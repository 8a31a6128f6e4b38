"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel`` (gloo on CPU).

Launch any training command under ``torchrun`` and :func:`init_distributed` picks the process group up
from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)::

    torchrun --standalone --nproc_per_node 2 -m slimtorch recipe recipe.yaml

Without ``torchrun`` everything runs in one process and these helpers are no-ops::

    >>> from slimtorch.recover.distributed import init_distributed
    >>> init_distributed()
    DistInfo(rank=0, world_size=1)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimtorch.errors import ConfigError

__all__ = ["DistInfo", "all_reduce_sum", "dist_info", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group: ``rank`` in ``0 .. world_size - 1``."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the current process group (0 and 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo(0, 1)


def init_distributed(backend: str = "gloo") -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment; a no-op in a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    dist.init_process_group(backend)
    return dist_info()


def shutdown_distributed() -> None:
    """Leave the process group after every process has finished (a no-op in a plain process). What still
    holds on to the group (a DDP wrapper and its reducer, a communication hook's futures) is collected first:
    left alive until interpreter exit, such objects made a worker abort now and then under load
    ("terminate called without an active exception") after its work was done."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (float64; returned unchanged in a single process)."""
    if not dist_info().distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
