"""The one training loop: every training in slimtorch takes its steps here.

:func:`~slimtorch.recover.fit` (checkpoints, exact resume, DDP) runs its epochs on a :class:`Loop`, and so do
:meth:`slimtorch.prune.Evaluator.train_` (which the pruning methods that fine-tune between rounds call), the
fine-tuning helpers of :mod:`slimtorch.recover.finetune`, the tiny LM's training and the MiniLM workflow's
embedding distillation. What differs between them is a plug-in, not another loop:

* the **loss** ``loss(model, batch) -> scalar`` (:mod:`slimtorch.recover.losses`: classification,
  distillation from a teacher, next-token loss of a causal LM, embedding distillation);
* the **callbacks** of pruning methods that act during training (:class:`slimtorch.prune.Callback`:
  gradual pruning, sparse training, movement scores, network slimming), told after every backward pass,
  after every optimizer step and after every epoch;
* the optimizer, the learning-rate scheduler and gradient clipping.

One step: zero the gradients, compute the loss on the batch, backward, check the loss is finite (a NaN is a
:class:`~slimtorch.errors.ConfigError` naming the step, never a silently ruined model), ``after_backward``,
clip, optimizer step, scheduler step, ``after_step``. What the model, the data or the loss raise on a step is a
:class:`~slimtorch.errors.TraceError` naming it; after every epoch every trained weight must be finite.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.recover.loop import Loop, StepModule
    >>> from slimtorch.recover.losses import cross_entropy
    >>> net = nn.Linear(4, 2)
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
    >>> log = Loop(StepModule(net, cross_entropy), torch.optim.SGD(net.parameters(), lr=0.1)).run(batches, epochs=2)
    >>> log.steps, len(log.epoch_losses), len(log.step_losses)
    (6, 2, 6)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtorch.progress import progress
from slimtorch.prune.loop import Callback, LossFn, register_training_loop
from slimtorch.recover.guards import check_loss, check_weights, step_errors

__all__ = ["FunctionLR", "Loop", "LoopLog", "LoopState", "StepModule", "batch_size", "train_"]

#: what a step runs after the model: ``loss(model, batch) -> scalar tensor``
StepLoss = LossFn


class StepModule(nn.Module):
    """The model and its loss as one module, so that DDP synchronises the gradients of both (a distiller's
    projections are trained parameters too). A loss that is a module is registered after the model."""

    def __init__(self, model: nn.Module, loss: StepLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss(self.model, batch)


def batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its inputs (the first item of a tuple, the first value of a dict)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), ())
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else ()
    return len(batch) if isinstance(batch, (torch.Tensor, Sequence)) else 1


@dataclass
class LoopState:
    """Where training stands (:func:`~slimtorch.recover.fit` saves it in every checkpoint)."""

    epoch: int = 0
    step: int = 0  # steps done in the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # over the current epoch's samples
    loss_count: int = 0
    seconds: float = 0.0  # training seconds spent in the current epoch
    cpu_seconds: float | None = 0.0  # CPU seconds of the same steps (None: resumed from a file without them)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LoopLog:
    """What :meth:`Loop.run` did: steps taken, the mean loss of each finished epoch (per sample) and every
    step's loss."""

    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


class FunctionLR(torch.optim.lr_scheduler.LRScheduler):
    """Learning rate ``lr_at(step)`` for step ``step`` (from 0) of every parameter group: a schedule written as
    a function (warm-up then cosine, say), stepped by the loop after every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float]) -> None:
        self.lr_at = lr_at
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]


class Loop:
    """The steps of one training: a :class:`StepModule` (model and loss), its optimizer and what acts around
    each step.

    Args:
        step: the model and its loss.
        optimizer: over the step module's trainable parameters.
        scheduler: stepped after every optimizer step.
        callbacks: pruning methods acting during training (:class:`slimtorch.prune.Callback`).
        max_grad_norm: clip the gradients' global norm to this before each optimizer step.
        net: what computes the loss of a batch when it is not ``step`` itself (``step`` under DDP).
    """

    def __init__(self, step: StepModule, optimizer: torch.optim.Optimizer, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, callbacks: Sequence[Callback] = (),
                 max_grad_norm: float | None = None, net: nn.Module | None = None) -> None:
        self.step_module, self.optimizer, self.scheduler = step, optimizer, scheduler
        self.callbacks, self.max_grad_norm = tuple(callbacks), max_grad_norm
        self.net = net if net is not None else step

    @property
    def model(self) -> nn.Module:
        return self.step_module.model

    @property
    def lr(self) -> float:
        """The learning rate set by the caller (before any schedule), for messages."""
        group = self.optimizer.param_groups[0]
        return float(group.get("initial_lr", group["lr"]))

    def _forward_backward(self, batch: Any) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.net(batch)
        loss.backward()
        return loss

    def _update(self, batch: Any) -> None:
        for callback in self.callbacks:
            callback.after_backward(batch)
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.step_module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for callback in self.callbacks:
            callback.after_step(batch)

    def run_epoch(self, items: Iterable[Any], state: LoopState, *, desc: str | None = None, total: int | None = None,
                  fetch: Callable[[torch.Tensor], Any] | None = None, max_steps: int | None = None,
                  on_step: Callable[[LoopState, float], None] | None = None) -> bool:
        """Train on every batch of ``items`` (or, with ``fetch``, on ``fetch(item)`` of every tensor of sample
        indices), from ``state`` on; ``False`` when it stopped at ``max_steps`` (counted in ``state.global_step``).
        ``desc``: a progress bar's label (None: no bar). ``on_step(state, loss)`` runs after every step."""
        items = progress(items, desc=desc, total=total) if desc is not None else items
        for item in items:
            if max_steps is not None and state.global_step >= max_steps:
                return False
            start, start_cpu = time.perf_counter(), time.process_time()
            with step_errors(state.step, state.epoch, item if fetch is not None else None):
                batch = fetch(item) if fetch is not None else item
                loss = self._forward_backward(batch)
            check_loss(loss, batch, step=state.step, epoch=state.epoch, lr=self.lr)
            self._update(batch)
            value, count = float(loss.detach()), batch_size(batch)
            state.loss_sum += value * count
            state.loss_count += count
            state.step += 1
            state.global_step += 1
            state.seconds += time.perf_counter() - start
            if state.cpu_seconds is not None:
                state.cpu_seconds += time.process_time() - start_cpu
            if on_step is not None:
                on_step(state, value)
        return True

    def end_epoch(self, state: LoopState) -> None:
        """After a full pass: every trained weight is finite, and the callbacks hear of it."""
        check_weights(self.step_module, epoch=state.epoch, lr=self.lr)
        for callback in self.callbacks:
            callback.after_epoch(state.epoch)

    def run(self, batches: Iterable[Any], *, epochs: int = 1, max_steps: int | None = None,
            desc: str = "train {epoch}/{epochs}") -> LoopLog:
        """Train in train mode for ``epochs`` passes over ``batches`` (or ``max_steps`` steps, whichever ends
        first; an epoch cut short gets no mean loss and no ``after_epoch``). ``desc`` labels the progress bar
        (``{epoch}`` and ``{epochs}`` are filled in)."""
        self.model.train()
        state, log = LoopState(), LoopLog()

        def record(_: LoopState, loss: float) -> None:
            log.step_losses.append(loss)

        for epoch in range(epochs):
            state = LoopState(epoch=epoch, global_step=state.global_step)
            label = desc.format(epoch=epoch + 1, epochs=epochs)
            if not self.run_epoch(batches, state, desc=label, max_steps=max_steps, on_step=record):
                break
            self.end_epoch(state)
            log.epoch_losses.append(state.loss_sum / max(state.loss_count, 1))
        log.steps = state.global_step
        return log


def train_(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int = 1,
    max_steps: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> LoopLog:
    """Train ``model`` in place on ``batches`` (passed over once per epoch) with the loop above; its train/eval
    mode is restored afterwards. This is what :meth:`slimtorch.prune.Evaluator.train_` runs."""
    was_training = model.training
    try:
        return Loop(StepModule(model, loss_fn), optimizer, callbacks=callbacks).run(
            batches, epochs=epochs, max_steps=max_steps)
    finally:
        model.train(was_training)


register_training_loop(train_)
