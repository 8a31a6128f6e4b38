"""Gradient sparsity for data-parallel training: a DDP communication hook that sends only the top-k.

Each process adds the gradient it could not send before (*error feedback*) to its new gradient, keeps
the ``ratio`` largest entries by magnitude, sends them as (value, int32 index) pairs with an
``all_gather``, and keeps the rest as its new residual. Every process then adds up what all sent and
divides by the world size, as the dense all-reduce would. Nothing is ever dropped, only delayed, which
is why training still converges (Lin et al., *Deep Gradient Compression*, 2018)::

    ddp = DistributedDataParallel(model)
    state = register_topk_hook_(ddp, ratio=0.01)
    ...train...
    print(state.stats())   # {'dense_bytes': ..., 'sent_bytes': ..., 'saved_bytes': ..., 'compression': ...}

Bytes are counted per process and step: the dense payload is what an all-reduce would carry
(``numel * element size``), the sparse one is ``k * (element size + 4)``.

    >>> TopKState(0.01).stats()["compression"]
    1.0
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from slimtorch.errors import ConfigError

__all__ = ["TopKState", "register_topk_hook_", "topk_hook"]


class TopKState:
    """What the hook keeps between steps: the ratio, each parameter's residual and the byte counters.

    Residuals are kept per parameter (by name), not per bucket, because DDP regroups its buckets after
    the first step, and a resumed run builds new buckets again.
    """

    def __init__(self, ratio: float, *, names: Mapping[int, str] | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"top-k ratio must be in (0, 1], got {ratio}; 0.01 sends 1% of each gradient")
        self.ratio = ratio
        self.names = dict(names or {})
        self.process_group = process_group
        self.residuals: dict[str, torch.Tensor] = {}
        self.dense_bytes = 0
        self.sent_bytes = 0

    def stats(self) -> dict[str, float]:
        """Bytes an all-reduce would have sent, bytes sent, bytes saved, and their ratio (dense / sent)."""
        ratio = self.dense_bytes / self.sent_bytes if self.sent_bytes else 1.0
        return {"dense_bytes": self.dense_bytes, "sent_bytes": self.sent_bytes,
                "saved_bytes": self.dense_bytes - self.sent_bytes, "compression": ratio}

    def _key(self, param: torch.Tensor) -> str:
        return self.names.get(id(param), str(id(param)))

    def residual(self, params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The bucket's residual, flattened in the bucket's parameter order (zeros the first time)."""
        parts = [self.residuals.get(self._key(p), torch.zeros(p.numel(), dtype=like.dtype)) for p in params]
        return torch.cat(parts).to(like.device) if parts else torch.zeros_like(like)

    def keep(self, params: list[torch.Tensor], residual: torch.Tensor) -> None:
        """Store a bucket's new residual, split back per parameter."""
        for p, part in zip(params, residual.split([p.numel() for p in params]), strict=True):
            self.residuals[self._key(p)] = part.clone()


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: exchange the top ``state.ratio`` of each bucket with error feedback."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    flat = bucket.buffer()  # (n,) this process's mean gradient over its share of the batch
    params = bucket.parameters()
    corrected = flat + state.residual(params, flat)
    k = max(1, math.ceil(state.ratio * flat.numel()))
    index = corrected.abs().topk(k, sorted=False).indices
    values = corrected[index]
    residual = corrected.clone()
    residual[index] = 0
    state.keep(params, residual)
    state.dense_bytes += flat.numel() * flat.element_size()
    state.sent_bytes += k * (flat.element_size() + 4)
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_index = [torch.empty(k, dtype=torch.int32) for _ in range(world)]
    futures = [
        dist.all_gather(all_values, values, group=group, async_op=True).get_future(),
        dist.all_gather(all_index, index.to(torch.int32), group=group, async_op=True).get_future(),
    ]

    def combine(_: torch.futures.Future) -> torch.Tensor:
        dense = torch.zeros_like(flat)
        for v, i in zip(all_values, all_index, strict=True):
            dense.index_add_(0, i.long(), v)  # indices chosen by different processes may coincide
        return dense.div_(world)

    return torch.futures.collect_all(futures).then(combine)


def register_topk_hook_(ddp_model: nn.parallel.DistributedDataParallel, ratio: float) -> TopKState:
    """Install :func:`topk_hook` on a DDP model; returns its state (byte counters, residuals)."""
    names = {id(p): n for n, p in ddp_model.module.named_parameters()}
    state = TopKState(ratio, names=names, process_group=ddp_model.process_group)
    ddp_model.register_comm_hook(state, topk_hook)
    return state
