"""What the training loop (:mod:`slimtorch.recover.loop`) and :func:`~slimtorch.recover.fit` check before and
during training: their arguments, what each step raises, each step's loss, the weights after each epoch, and
the state ``fit`` puts back when training fails (the model is left as it was before the call).

    >>> import torch
    >>> check_loss(torch.tensor(float("nan")), torch.ones(2, 3), step=4, epoch=0, lr=10.0)
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: the training loss is nan at step 5 of epoch 1; the training diverged: ...
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.errors import ConfigError, SlimError, TraceError

__all__ = ["Start", "check_dataset", "check_loss", "check_trainable", "check_weights", "step_errors"]


def check_dataset(model: Any, train_data: Any) -> None:
    """A module, and a non-empty map-style dataset (``len`` and indexing)."""
    check_module(model, "fit")
    try:
        size = len(train_data)
    except TypeError:
        raise ConfigError(f"train_data must be a map-style dataset of (x, y) samples (len and indexing), got "
                          f"{type(train_data).__name__}; wrap tensors in TensorDataset(x, y)") from None
    if size == 0:
        raise ConfigError("train_data is empty; give at least one (x, y) sample")


def check_trainable(modules: Iterator[nn.Parameter]) -> None:
    if not any(p.requires_grad for p in modules):
        raise ConfigError("the model has no trainable parameter (requires_grad is False everywhere): unfreeze what "
                          "should train, e.g. model.requires_grad_(True)")


@contextmanager
def step_errors(step: int, epoch: int, index: torch.Tensor | None = None) -> Iterator[None]:
    """What the data, the model or the loss raise on a training step becomes a TraceError naming the step (and
    the first of its samples, given their ``index``)."""
    try:
        yield
    except SlimError:
        raise
    except Exception as err:  # the user's data, model and loss may raise anything
        first = (str(err).strip().splitlines() or [""])[0][:300]
        samples = f" on samples {index[:4].tolist()}..." if index is not None else ""
        raise TraceError(f"training step {step + 1} of epoch {epoch + 1} failed{samples} ({type(err).__name__}: "
                         f"{first}); check the data against the model (sample shapes, (x, y) pairs, labels within "
                         "its classes) and the loss") from err


def _inputs(batch: Any) -> list[torch.Tensor]:
    """The input tensors of a batch: the first item of a tuple, the values of a dict, or the tensor."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    values = batch.values() if isinstance(batch, Mapping) else [batch]
    return [v for v in values if isinstance(v, torch.Tensor)]


def check_loss(loss: Any, batch: Any, *, step: int, epoch: int, lr: float) -> None:
    """A NaN or infinite loss is an error naming the step and its likely cause (``batch``'s inputs are looked at),
    never a silently ruined model."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise ConfigError(f"the loss must be a scalar tensor, got {type(loss).__name__}{shape}")
    if bool(torch.isfinite(loss.detach())):
        return
    if any(x.is_floating_point() and not bool(torch.isfinite(x).all()) for x in _inputs(batch)):
        cause = "the batch's inputs hold NaN or infinite values: clean the training data"
    elif step == 0 and epoch == 0:
        cause = ("the inputs are finite and nothing was trained yet: the model or the loss gives it (NaN weights, a "
                 "distillation teacher's NaN outputs)")
    else:
        cause = f"the training diverged: lower the learning rate (lr={lr:g})"
    raise ConfigError(f"the training loss is {float(loss.detach())} at step {step + 1} of epoch {epoch + 1}; {cause}")


def check_weights(module: nn.Module, *, epoch: int, lr: float) -> None:
    """After an epoch every trained weight must be finite: the last step's update is seen by no loss."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise ConfigError(f"after epoch {epoch + 1} the weight {name!r} holds NaN or infinite values: the training "
                              f"diverged; lower the learning rate (lr={lr:g})")


def _changes(tensor: torch.Tensor) -> bool:
    """Whether training may change ``tensor``: not a frozen parameter."""
    return not (isinstance(tensor, nn.Parameter) and not tensor.requires_grad)


class Start:
    """The trained modules' tensors and train/eval flags when training began, to put back on a failure: a copy
    of every tensor training can change (parameters that require gradients, and buffers), so training needs
    that much memory again; frozen parameters (a LoRA's base weights) are not copied."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.states = {k: {n: t.detach().clone() for n, t in m.state_dict(keep_vars=True).items() if _changes(t)}
                       for k, m in self.modules.items()}
        self.flags = {k: [(sub, sub.training) for sub in m.modules()] for k, m in self.modules.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for key, module in self.modules.items():
            for name, tensor in module.state_dict(keep_vars=True).items():
                if name in self.states[key]:  # in place: the parameter objects (and an optimizer) stay
                    tensor.copy_(self.states[key][name])
            for sub, training in self.flags[key]:
                sub.training = training
