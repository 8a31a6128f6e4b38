"""The data side of training: which samples each step takes, batching, augmentation, evaluation.

    >>> import torch
    >>> from slimtorch.recover import TrainConfig
    >>> from slimtorch.recover.batches import batch_indices
    >>> from slimtorch.recover.distributed import DistInfo
    >>> [len(b) for b in batch_indices(10, TrainConfig(epochs=1, batch_size=4), 0, DistInfo(0, 1))]
    [4, 4, 2]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from slimtorch.recover.config import TrainConfig
from slimtorch.recover.distributed import DistInfo, all_reduce_sum, dist_info

__all__ = ["augment", "batch_indices", "evaluate_accuracy", "fetch"]


def batch_indices(n: int, config: TrainConfig, epoch: int, info: DistInfo) -> list[torch.Tensor]:
    """This process's sample indices for every step of ``epoch``: a permutation seeded by (seed, epoch),
    cut into global batches, each cut into ``world_size`` nearly equal shares."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    batches = torch.randperm(n, generator=generator).split(config.batch_size)
    if not info.distributed:
        return list(batches)
    # a final batch smaller than the world cannot give every process a sample: it is dropped
    return [b.tensor_split(info.world_size)[info.rank] for b in batches if len(b) >= info.world_size]


def fetch(data: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorDataset):
        x, y = data.tensors[0][index], data.tensors[1][index]  # fast path: one gather per tensor
    else:
        x, y = default_collate([data[int(i)] for i in index])
    return x, y


def augment(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Random left-right flips, and with ``"flip-crop"`` random shifts of up to 4 pixels (zero padded),
    of a (B, C, H, W) image batch."""
    if kind == "none" or x.dim() != 4:
        return x
    flip = torch.rand(len(x)) < 0.5  # (B,) which images to mirror
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "flip-crop":
        pad = 4
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 8, W + 8)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, len(x))).tolist()
        h, w = x.shape[-2:]
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])
    return x


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy over ``data`` (eval mode, restored after). Under DDP each process scores a share
    and the counts are summed."""
    info = dist_info()
    was_training = model.training
    model.eval()
    correct, count = 0, 0
    try:
        shard = torch.arange(len(data))[info.rank :: info.world_size]  # (n / world,) this process's samples
        for index in shard.split(batch_size):
            x, y = fetch(data, index)
            correct += int((model(x).argmax(dim=1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    correct, count = all_reduce_sum([correct, count])
    return correct / max(count, 1)
