"""A plain, readable training loop and evaluation: what recovery after pruning needs at its simplest.

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from slimtorch.recover.finetune import evaluate, train
    >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=16)
    >>> net = nn.Linear(4, 2)
    >>> history = train(net, data, epochs=2, lr=0.1)
    >>> len(history), 0.0 <= evaluate(net, data) <= 1.0
    (2, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.progress import progress
from slimtorch.prune.loop import accuracy

__all__ = ["evaluate", "train", "train_epoch"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn = _cross_entropy,
    desc: str = "train",
) -> float:
    """One pass over ``loader``; returns the mean loss. ``loss_fn(model, x, y)`` defaults to cross-entropy."""
    model.train()
    total, count = 0.0, 0
    for x, y in progress(loader, desc=desc):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


def train(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: LossFn = _cross_entropy,
) -> list[float]:
    """Train with Adam for ``epochs``; returns the mean loss of each epoch."""
    if epochs < 0 or lr <= 0:
        raise ConfigError(f"need epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return [
        train_epoch(model, loader, optimizer, loss_fn=loss_fn, desc=f"epoch {epoch + 1}/{epochs}")
        for epoch in range(epochs)
    ]


#: top-1 accuracy over ``(x, y)`` batches, eval mode, the previous mode restored (the pruning loop's metric)
evaluate = accuracy
