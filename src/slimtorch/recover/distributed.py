"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel`` (gloo on CPU).

Launch any training command under ``torchrun`` and :func:`init_distributed` picks the process group up
from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...)::

    torchrun --standalone --nproc_per_node 2 -m slimtorch recipe recipe.yaml

Without ``torchrun`` everything runs in one process and these helpers are no-ops::

    >>> from slimtorch.recover.distributed import init_distributed
    >>> init_distributed()
    DistInfo(rank=0, world_size=1)

Where one process cannot hold the model, its optimizer state and gradients, ``TrainConfig(fsdp=True)`` shards
them over the processes with PyTorch's FSDP2 (``fully_shard``; :func:`shard_fsdp_`), on CPU with gloo as on
GPUs: each process keeps ``1 / world_size`` of every parameter and gathers one block's weights at a time for
its forward and backward. :func:`full_state_dict` gathers the trained weights back (for process 0, or all).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimtorch.errors import ConfigError

__all__ = ["DistInfo", "all_reduce_sum", "dist_info", "full_optimizer_state", "full_state_dict", "init_distributed",
           "shard_fsdp_", "shutdown_distributed"]


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


def shard_fsdp_(root: nn.Module, model: nn.Module) -> None:
    """Shard ``root`` (which holds ``model``) in place with FSDP2 over all processes: every block the model
    names as never to be split (Hugging Face's ``_no_split_modules``: the decoder layers of a LLaMA) is its
    own unit, gathered alone; what is left (embeddings, final norm, output head, a loss's parameters) is
    the root's. Collective: every process calls it on the same model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("fsdp=True shards the model over the processes of a torchrun launch, and none is running "
                          "here: launch with torchrun --nproc-per-node N (after init_distributed()), or set fsdp=False")
    first = next(root.parameters(), None)
    device = first.device.type if first is not None else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(root, mesh=mesh)


def full_state_dict(module: nn.Module, *, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The whole state of a module sharded by :func:`shard_fsdp_`, as plain CPU tensors under the module's own
    names, for process 0 (the others get ``{}``), or for every process with ``all_ranks``. Collective: every
    process must call it. A module that is not sharded gives its ``state_dict()``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return dict(module.state_dict())
    options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    return {k: v.detach().cpu() for k, v in get_model_state_dict(module, options=options).items()}


def full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a model sharded by :func:`shard_fsdp_`, gathered whole for process 0 (``{}`` on
    the others) and numbered as ``optimizer.state_dict()`` numbers it (parameters 0, 1, ... in the order of
    its groups). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(root, optimizer, options=options)
    if not state:
        return {}
    # the gathered state is keyed by parameter names: back to the positions a plain state_dict() uses
    index = {name: i for i, name in enumerate(chain.from_iterable(g["params"] for g in state["param_groups"]))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: _plain(v) for n, v in state["state"].items()}, "param_groups": groups}


def _plain(entries: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
