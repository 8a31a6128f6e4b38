"""Calibration batches as model inputs: checked one by one, with ``(input, label)`` pairs from a data loader
taken as the input alone when the model takes one input.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant.batches import model_inputs
    >>> net = nn.Linear(4, 2)
    >>> batches = [(torch.randn(3, 4), torch.tensor([0, 1, 1]))]      # what a DataLoader yields
    >>> [tuple(x.shape) for x in model_inputs(net, batches, "calibration")]
    [(3, 4)]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_finite_inputs, describe_inputs
from slimtorch.errors import ConfigError

__all__ = ["checked_batches", "model_inputs", "positional_inputs"]


def positional_inputs(model: nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` takes (None: any number, ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to read
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _one(batch: Any, index: int, takes: int | None, what: str) -> Any:
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch
    if not isinstance(batch, (tuple, list)) or not all(isinstance(b, torch.Tensor) for b in batch):
        raise ConfigError(f"{what} batch {index} is {describe_inputs(batch)}; each batch must be the model's "
                          "input: a tensor, a tuple of tensors (positional inputs) or a dict (keyword inputs)")
    if takes is not None and len(batch) > takes:
        if takes == 1 and len(batch) == 2:  # (input, label) from a DataLoader: the label is not a model input
            return batch[0]
        raise ConfigError(f"{what} batch {index} holds {len(batch)} tensors {describe_inputs(batch)} but the model "
                          f"takes {takes} positional input(s); give only the model's inputs, e.g. "
                          "(x for x, _ in loader)")
    return tuple(batch)


def model_inputs(model: nn.Module, batches: Iterable[Any], what: str) -> Iterator[Any]:
    """The batches as model inputs (lazily), each checked: tensors only, finite values, no more positional
    inputs than ``model`` takes (a 2-tuple for a one-input model is an ``(input, label)`` pair)."""
    return checked_batches(batches, positional_inputs(model), what)


def checked_batches(batches: Iterable[Any], takes: int | None, what: str) -> Iterator[Any]:
    """:func:`model_inputs` for a model that takes ``takes`` positional inputs (None: any number)."""
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)):
        raise ConfigError(f"{what} must be an iterable of batches, got one {describe_inputs(batches)}; pass a list "
                          "such as [x] or a generator such as (x for x, _ in loader)")
    try:
        iterator = iter(batches)
    except TypeError:
        raise ConfigError(f"{what} must be an iterable of batches, got {type(batches).__name__} {batches!r}; pass "
                          "a list such as [x]") from None
    return _checked(iterator, takes, what)


def _checked(iterator: Iterator[Any], takes: int | None, what: str) -> Iterator[Any]:
    for index, batch in enumerate(iterator):
        batch = _one(batch, index, takes, what)
        check_finite_inputs(batch, f"{what} batch {index}")
        yield batch
