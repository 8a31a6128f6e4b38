"""Training-loop glue: the callbacks pruning methods plug into a training loop (yours or the library's), and an
:class:`Evaluator` for callers who would rather let the library drive. The library's one loop lives above
pruning (:mod:`slimtorch.recover.loop`) and registers itself here (:func:`register_training_loop`).

Every method in :mod:`slimtorch.prune` that acts during training (gradual pruning, lottery tickets,
sparse training, network slimming) is a :class:`Callback`. In a plain loop, call its two hooks::

    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        method.after_backward(batch)      # e.g. network slimming's L1 push on BatchNorm scales
        optimizer.step()
        method.after_step(batch)          # e.g. prune on schedule, regrow, record the rewind point

or hand them to the library's one training loop, which calls them exactly there:
``slimtorch.recover.fit(..., callbacks=[method])``, or :meth:`Evaluator.train_`, which runs that loop on your
batches::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.loop import Evaluator
    >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    >>> evaluator = Evaluator(train_data=data, eval_data=data, lr=0.1)
    >>> net = nn.Linear(4, 2)
    >>> evaluator.train_(net, epochs=2)
    >>> 0.0 <= evaluator.evaluate(net) <= 1.0
    True

A batch is a ``(inputs, targets)`` pair, a dict of keyword inputs, or a bare input tensor; a loss
function takes ``(model, batch)`` and returns a scalar tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.checks import check_number
from slimtorch.errors import ConfigError, SlimError

__all__ = [
    "Callback",
    "Evaluator",
    "TrainingLoop",
    "accuracy",
    "cross_entropy_loss",
    "forward_batch",
    "register_training_loop",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
MetricFn = Callable[[nn.Module, Iterable[Any]], float]


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: the first item of a tuple/list, the keywords of a dict, or the tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y`` for a batch ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy over ``(x, y)`` batches, in eval mode (the previous mode is restored)."""
    was_training = model.training
    model.eval()
    correct, count = 0, 0
    try:
        for x, y in data:
            correct += int((model(x).argmax(dim=1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    return correct / max(count, 1)


class Callback:
    """What a training loop tells a pruning method. Every hook is optional (a no-op here)."""

    def after_backward(self, batch: Any) -> None:
        """Called after ``loss.backward()``, before ``optimizer.step()``: gradients are in ``.grad``."""

    def after_step(self, batch: Any) -> None:
        """Called after ``optimizer.step()``: one training step is done."""

    def after_epoch(self, epoch: int) -> None:
        """Called after each pass over the training data (``epoch`` counts from 0)."""


class TrainingLoop(Protocol):
    """The loop :meth:`Evaluator.train_` hands its model, batches, loss, optimizer and callbacks to."""

    def __call__(self, model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 epochs: int, max_steps: int | None, callbacks: Sequence[Callback]) -> object: ...


#: the one training loop, filled by :mod:`slimtorch.recover.loop` when it is imported (the package imports it):
#: pruning sits below the training tools and may not import them, so the loop registers itself here
_TRAINING_LOOP: list[TrainingLoop] = []


def register_training_loop(loop: TrainingLoop) -> TrainingLoop:
    """Make ``loop`` the one :meth:`Evaluator.train_` runs (``slimtorch.recover.loop.train_`` is)."""
    _TRAINING_LOOP[:] = [loop]
    return loop


_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class Evaluator:
    """How to train and how to score a model, for methods that fine-tune between pruning steps.

    ``loss_fn(model, batch)`` is the training loss; ``metric(model, eval_data)`` the score (higher is
    better; accuracy by default). The optimizer is built fresh for each call of :meth:`train_`.
    """

    train_data: Iterable[Any]
    eval_data: Iterable[Any] | None = None
    loss_fn: LossFn = cross_entropy_loss
    metric: MetricFn = accuracy
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.train_data, Iterable) or isinstance(self.train_data, (str, bytes)):
            raise ConfigError(f"train_data must be an iterable of batches (a DataLoader or a list), got "
                              f"{type(self.train_data).__name__}")
        for name in ("loss_fn", "metric"):
            if not callable(getattr(self, name)):
                raise ConfigError(f"{name} must be a function, got {getattr(self, name)!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        check_number(self.lr, "lr", low=0.0, low_open=True)
        check_number(self.weight_decay, "weight_decay", low=0.0)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer over the trainable parameters of ``model``."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def train_(
        self,
        model: nn.Module,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        callbacks: Sequence[Callback] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Train ``model`` in place for ``epochs`` passes (or ``max_steps`` steps, whichever ends first),
        calling every callback's hooks; the model's train/eval mode is restored afterwards. The steps are
        those of :func:`slimtorch.recover.fit` (:mod:`slimtorch.recover.loop`): a NaN loss or a step the model
        cannot run is an error naming the step."""
        if epochs < 0 or (max_steps is not None and max_steps < 0):
            raise ConfigError(f"need epochs >= 0 and max_steps >= 0, got epochs={epochs}, max_steps={max_steps}")
        if not _TRAINING_LOOP:  # (the package imports slimtorch.recover, which registers it)
            raise SlimError("no training loop is registered: import slimtorch.recover")
        opt = optimizer if optimizer is not None else self.make_optimizer(model)
        _TRAINING_LOOP[0](model, self.train_data, loss_fn=self.loss_fn, optimizer=opt, epochs=epochs,
                          max_steps=max_steps, callbacks=callbacks)

    def evaluate(self, model: nn.Module) -> float:
        """``metric(model, eval_data)``."""
        if self.eval_data is None:
            raise ConfigError("this Evaluator has no eval_data; give eval_data=... to evaluate")
        return float(self.metric(model, self.eval_data))
