"""Which modules a config list selects. A selector that matches nothing is an error, never a silent no-op.

    >>> import torch.nn as nn
    >>> from slimtorch.select import select_modules
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sorted(select_modules(net, [{"op_types": ["Linear"], "sparse_ratio": 0.5},
    ...                              {"op_names": ["2"], "exclude": True}]))
    ['0']
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.config import PruneTarget, parse_config_list
from slimtorch.errors import ConfigError, NoMatchError, closest

__all__ = [
    "Selected",
    "bias_param_name",
    "prunable_modules",
    "select_layers",
    "select_modules",
    "type_names",
    "weight_param_name",
]


@dataclass(frozen=True)
class Selected:
    """A module chosen for pruning and the config entry that governs it (the last one that matched)."""

    name: str
    module: nn.Module
    target: PruneTarget
    entry: int


def type_names(module: nn.Module) -> frozenset[str]:
    """The class name of ``module`` and of its bases, so ``'Linear'`` also selects subclasses of Linear."""
    return _class_names(type(module))


@functools.cache
def _class_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__ if c not in (nn.Module, object))


def weight_param_name(module: nn.Module) -> str | None:
    """The name of the parameter a config list prunes in ``module``: ``"weight"``, or ``"in_proj_weight"``
    (the stacked q, k, v projections) of an ``nn.MultiheadAttention``; None when it has neither."""
    for name in ("weight", "in_proj_weight"):
        if isinstance(module._parameters.get(name), torch.Tensor):
            return name
    return None


def bias_param_name(module: nn.Module) -> str:
    """The name of the bias that goes with :func:`weight_param_name` (it may be absent or None)."""
    return "in_proj_bias" if weight_param_name(module) == "in_proj_weight" else "bias"


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a weight directly (see :func:`weight_param_name`): what a config list can prune."""
    return _prunable(model.named_modules())


def _prunable(named: Iterable[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    return {name: mod for name, mod in named if name and weight_param_name(mod) is not None}


@functools.cache
def _torch_module_types() -> frozenset[str]:
    return frozenset(n for n, obj in vars(nn).items() if isinstance(obj, type) and issubclass(obj, nn.Module))


def _known_module_types(modules: Iterable[nn.Module]) -> set[str]:
    known = set(_torch_module_types())
    for cls in {type(m) for m in modules}:  # each class once
        known |= _class_names(cls)
    return known


def _check_selectors(target: PruneTarget, names: list[str], known_types: set[str]) -> None:
    for op_type in target.op_types:
        if op_type not in known_types:
            raise ConfigError(
                f"op type {op_type!r} is not a module class (neither in torch.nn nor in this model); "
                f"use a class name such as 'Conv2d' or 'Linear' ({closest(op_type, known_types)})"
            )
    for key in ("op_names", "exclude_op_names"):
        for name in getattr(target, key):
            if name not in names:
                raise NoMatchError(f"{key} entry {name!r} matches no module of the model; {closest(name, names)}")
    for part in target.op_partial_names:
        if not any(part in n for n in names):
            raise NoMatchError(
                f"op_partial_names entry {part!r} is part of no module name; {closest(part, names)}"
            )


def _within(name: str, roots: tuple[str, ...]) -> bool:
    """``name`` is one of ``roots`` or inside one of them (naming a block selects the layers in it)."""
    return any(name == r or name.startswith(r + ".") for r in roots)


def _matches(target: PruneTarget, name: str, module: nn.Module) -> bool:
    if target.op_types and not (type_names(module) & set(target.op_types)):
        return False
    if target.op_names and not _within(name, target.op_names):
        return False
    if target.op_partial_names and not any(p in name for p in target.op_partial_names):
        return False
    return not _within(name, target.exclude_op_names)


def _describe(target: PruneTarget) -> str:
    keys = ("op_types", "op_names", "op_partial_names")
    return ", ".join(f"{k}={list(getattr(target, k))}" for k in keys if getattr(target, k))


def select_modules(
    model: nn.Module, config_list: Sequence[Mapping[str, Any] | PruneTarget]
) -> dict[str, Selected]:
    """Resolve a config list against ``model``: module name -> :class:`Selected`, in model order.

    A name in ``op_names`` / ``exclude_op_names`` that is a block (``"layer2"``) stands for every
    prunable layer inside it.

    Raises :class:`~slimtorch.errors.NoMatchError` when a name, partial name or whole entry matches no
    module, and :class:`~slimtorch.errors.ConfigError` when an op type is not a module class.
    Pure: the model is not touched.
    """
    targets = parse_config_list(config_list)
    named = list(model.named_modules())  # (one walk over the modules for all three)
    all_names = [n for n, _ in named if n]
    known_types = _known_module_types(m for _, m in named)
    candidates = _prunable(named)
    chosen: dict[str, Selected] = {}
    for index, target in enumerate(targets):
        _check_selectors(target, all_names, known_types)
        matched = [n for n, m in candidates.items() if _matches(target, n, m)]
        if not matched:
            raise NoMatchError(
                f"config list entry {index} ({_describe(target)}) matches no prunable module; "
                f"prunable modules: {list(candidates)[:12]}{' ...' if len(candidates) > 12 else ''}"
                f"{_why_not_prunable(target, named)}"
            )
        for name in matched:
            if target.exclude:
                chosen.pop(name, None)
            else:
                chosen[name] = Selected(name, candidates[name], target, index)
    if not chosen and any(not t.exclude for t in targets):
        excluded = [i for i, t in enumerate(targets) if t.exclude]
        raise NoMatchError(f"the config list selects no layer: its exclude entries {excluded} remove every layer the "
                           "other entries select, so nothing would be pruned; exclude fewer layers")
    order = {n: i for i, n in enumerate(candidates)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def _why_not_prunable(target: PruneTarget, named: list[tuple[str, nn.Module]]) -> str:
    """Why modules of the requested types are not prunable, for the error message (recurrent layers
    especially: a config list cannot select their hidden units)."""
    own = [(n, m) for n, m in named if n and type_names(m) & set(target.op_types) and weight_param_name(m) is None]
    if not own:
        return ""
    name, module = own[0]
    if isinstance(module, nn.RNNBase):
        return (f". {type(module).__name__} layers such as {name!r} have one weight per gate and layer "
                "(weight_ih_l0, weight_hh_l0, ...), which a config list cannot select: slimtorch does not prune "
                "recurrent hidden units from a config list. Prune the layer that feeds it (compact_ then shrinks "
                "its input size), or mask whole hidden units yourself (a unit's rows in every gate of "
                "weight_ih_l*, weight_hh_l* and the biases, and its column of weight_hh_l*): compact_ removes them")
    return f". {type(module).__name__} layers such as {name!r} own no 'weight' parameter to prune"


def select_layers(
    model: nn.Module,
    *,
    op_types: tuple[str, ...],
    op_names: tuple[str, ...] = (),
    exclude_op_names: tuple[str, ...] = (),
) -> dict[str, nn.Module]:
    """The layers of ``op_types`` (inside ``op_names`` when given, outside ``exclude_op_names``), with the
    same matching and errors as a config list; for stages that transform layers rather than prune them.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> list(select_layers(net, op_types=("Linear",), exclude_op_names=("2",)))
    ['0']
    """
    entries = [PruneTarget(op_types=op_types, op_names=op_names, sparse_ratio=0.0)]
    if exclude_op_names:
        entries.append(PruneTarget(op_names=exclude_op_names, exclude=True))
    return {name: sel.module for name, sel in select_modules(model, entries).items()}
