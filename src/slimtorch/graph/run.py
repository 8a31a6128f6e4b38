"""Running a model for the graph and for compaction: calling it on example inputs, with other tensors swapped
in (meta tensors for a shapes-only run), in another mode, with the cyclic garbage collector paused.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtorch.graph.shapes import to_meta

__all__ = [
    "args_kwargs", "attributes_kept", "call_model", "collector_paused", "named_tensors", "run_state", "substituted",
    "temporary_mode",
]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` called on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def args_kwargs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs) as ``(args, kwargs)``."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}


@contextmanager
def substituted(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model`` holds ``values`` (by parameter or buffer name) instead of its own tensors;
    its own are put back after. A tensor known under several names (tied weights) is replaced under all of
    them, so a value given for one name holds for its aliases; different values for two aliases are an error.

    Written here rather than using ``torch.func.functional_call``, which does the same through a generic
    accessor (~7 ms a call on a 200-module model, a fifth of a small CNN's forward pass) and rejects a value
    given for one name of a tied pair."""
    slots = []  # (the dict that holds the tensor, its key, the tensor), each slot once
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and (id(store), key) not in seen:
                    seen.add((id(store), key))
                    slots.append((store, key, t, f"{prefix}.{key}" if prefix else key))
    by_tensor: dict[int, tuple[str, torch.Tensor]] = {}
    for _, _, t, name in slots:
        if name in values:
            first = by_tensor.setdefault(id(t), (name, values[name]))
            if first[1] is not values[name]:
                raise ValueError(f"{first[0]!r} and {name!r} are one tied tensor but were given different values")
    swapped = []
    try:
        for store, key, t, _ in slots:
            if id(t) in by_tensor:
                store[key] = by_tensor[id(t)][1]
                swapped.append((store, key, t))
        yield
    finally:
        for store, key, t in reversed(swapped):
            store[key] = t


_CONTAINERS = (dict, list, set)


@contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as they were before the block, after it: a forward pass that caches what it
    computes (a detector's anchors and strides, kept until the input size changes; an attention bias cache)
    would otherwise keep what a traced run made, meta tensors in a shapes-only one, or values computed from
    masked weights, and a later run would use them. Containers (a cache dict, hook dicts) keep their identity
    and get their items back."""
    saved = []
    for module in model.modules():
        state = module.__dict__
        saved.append((state, dict(state), [(v, v.copy()) for v in state.values() if type(v) in _CONTAINERS or
                                           isinstance(v, _CONTAINERS)]))
    try:
        yield
    finally:
        for state, before, containers in saved:
            _refill(state, before)
            for container, items in containers:
                _refill(container, items)


def _refill(container: Any, items: Any) -> None:
    """``container`` given back ``items`` (a copy of what it held), in place, when it changed."""
    if isinstance(container, dict):
        if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
            container.clear()
            container.update(items)
    elif isinstance(container, list):
        if len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=True)):
            container[:] = items
    elif container != items:  # (a set)
        container.clear()
        container.update(items)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after). Tracing and planning allocate
    many short-lived tuples and lists; each allocation burst starts a collection that walks the objects of
    the whole process (a full one, every few calls, takes 0.2 s in a process holding a few torchvision
    models), to find almost no cyclic garbage: what little there is goes at the next collection after the
    block. Also usable as a decorator."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def temporary_mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """Put every module in train or eval mode for the block, then give each its own mode back (a model
    may mix them, e.g. dropout off while BatchNorm trains; ``model.train(was)`` would flatten that)."""
    modes = [(m, m.training) for m in model.modules()]
    if any(mode != training for _, mode in modes):  # (``train`` recurses through every module: skip a no-op)
        model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``named_parameters`` and ``named_buffers`` (every name of a shared tensor included), in one walk
    over the modules instead of two."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for key, t in module._parameters.items():
            if t is not None:
                params[dot + key] = t
        for key, t in module._buffers.items():
            if t is not None:
                buffers[dot + key] = t
    return params, buffers


def run_state(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None,
              measuring: bool) -> tuple[dict[str, torch.Tensor], set[str], Any, dict[int, str]]:
    """What a traced run swaps into the model: ``(tensors by name, buffer names, inputs, tensor id -> name)``.
    ``params`` replace parameters by name; buffers are copies (BatchNorm updates its statistics in place);
    in a shapes-only run every floating-point tensor, inputs included, is a meta tensor."""
    state, buffers = named_tensors(model)
    if params:  # a value given for one name of tied weights holds for every name of that tensor
        given = {id(state[n]): v for n, v in params.items() if n in state}
        state = {n: given.get(id(t), t) for n, t in state.items()}
    if measuring:
        buffers = {n: b.clone() for n, b in buffers.items()}
    else:
        memo: dict[int, torch.Tensor] = {}
        state, example_inputs = to_meta(state, memo), to_meta(example_inputs, memo)
        # integer buffers stay real (indices), as copies: BatchNorm counts its batches in place
        buffers = {n: b if b.is_meta else b.clone() for n, b in to_meta(buffers, memo).items()}
    names: dict[int, str] = {}
    for n, t in [*state.items(), *buffers.items()]:
        names.setdefault(id(t), n)
    return {**state, **buffers}, set(buffers), example_inputs, names
