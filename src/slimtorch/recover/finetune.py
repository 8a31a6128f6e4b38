"""Fine-tuning at its simplest: Adam over ``(x, y)`` batches you batch yourself (a DataLoader), on the loop
every training runs (:mod:`slimtorch.recover.loop`). :func:`~slimtorch.recover.fit` adds seeded batching,
checkpoints, exact resume and DDP.

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
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.prune.loop import accuracy
from slimtorch.recover.loop import Loop, LoopState, StepModule
from slimtorch.recover.losses import pair_loss

__all__ = ["evaluate", "train", "train_epoch"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn | None = None,
    desc: str = "train",
) -> float:
    """One pass over ``loader`` in train mode; returns the mean loss per sample. ``loss_fn(model, x, y)``
    defaults to cross-entropy."""
    model.train()
    state = LoopState()
    Loop(StepModule(model, pair_loss(loss_fn)), optimizer).run_epoch(loader, state, desc=desc)
    return state.loss_sum / max(state.loss_count, 1)


def train(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
) -> list[float]:
    """Train with Adam for ``epochs`` (the model is left in train mode); returns the mean loss of each epoch."""
    if epochs < 0 or lr <= 0:
        raise ConfigError(f"need epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loop = Loop(StepModule(model, pair_loss(loss_fn)), optimizer)
    return loop.run(loader, epochs=epochs, desc="epoch {epoch}/{epochs}").epoch_losses


#: top-1 accuracy over ``(x, y)`` batches, eval mode, the previous mode restored (the pruning loop's metric)
evaluate = accuracy
