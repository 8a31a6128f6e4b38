"""Training checkpoints without pickle: one safetensors file of slimtorch's container (kind ``checkpoint``),
written atomically.

Tensors (model and loss-module state, optimizer moments, torch RNG states) are safetensors entries;
everything else (optimizer hyper-parameters, scheduler state, Python and NumPy RNG states, progress)
is JSON in the file's header. The file is written to a temporary name and renamed over the old one,
so a run killed mid-write leaves the previous checkpoint intact::

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from slimtorch.recover.checkpoint import load_checkpoint, save_checkpoint
    >>> net = nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(net.parameters(), lr=0.01)
    >>> net(torch.randn(4, 3)).sum().backward(); opt.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "last.safetensors")
    >>> save_checkpoint(path, modules={"model": net}, optimizer=opt, extra={"epoch": 1})
    >>> net2 = nn.Linear(3, 2)
    >>> opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    >>> extra, _ = load_checkpoint(path, modules={"model": net2}, optimizer=opt2)
    >>> extra["epoch"], torch.equal(net.weight, net2.weight), opt2.param_groups[0]["lr"]
    (1, True, 0.01)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.container import DescriptionError, Field, Kind, TensorInfo, read_file, register_kind, write_file
from slimtorch.errors import CheckpointError

__all__ = ["CHECKPOINT", "load_checkpoint", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state",
           "write_checkpoint"]

_OPTIMIZER_TENSOR = re.compile(r"optim\.\d+\..+")  # optim.<parameter id>.<state key>


def _check_meta(description: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """What loading reads, with its type: the modules' names, ``extra``, the optimizer's groups and state,
    the scheduler's state; and every tensor under a name that says whose it is."""
    meta = description["meta"]
    modules = meta.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise DescriptionError("'modules' must list the names of the saved modules")
    for key in ("extra", "optimizer", "scheduler"):
        if key in meta and not isinstance(meta[key], dict):
            raise DescriptionError(f"{key!r} must be a mapping, got {type(meta[key]).__name__}")
    optimizer = meta.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer.get("plain"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)
                                      and all(isinstance(g, dict) for g in optimizer["param_groups"])):
        raise DescriptionError("'optimizer' needs a 'plain' mapping and a list of 'param_groups'")
    owners = tuple(f"{m}::" for m in [*modules, "extra"])
    odd = sorted(n for n in tensors if ("::" in n and not n.startswith(owners))
                 or (n.startswith("optim.") and not _OPTIMIZER_TENSOR.fullmatch(n)))
    if odd:
        raise DescriptionError(f"tensors {odd[:3]} belong to no saved module and to no optimizer state")


CHECKPOINT = register_kind(Kind(
    name="checkpoint", version=1, title="slimtorch checkpoint", readable="checkpoint",
    fix="delete it, or run without --resume (resume=False) to start afresh", fields=(Field("meta", dict),),
    check=_check_meta))


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors and JSON-able ``meta`` to one safetensors file, atomically."""
    write_file(path, CHECKPOINT, {"meta": meta}, tensors)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_checkpoint`; a missing, corrupt or foreign file is a CheckpointError."""
    contents = read_file(path, CHECKPOINT)
    return contents.tensors, contents.description["meta"]


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors keyed ``optim.<param id>.<key>``, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"plain": plain, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[torch.Tensor, dict[str, Any]]:
    """This process's RNG states: the torch CPU generator (a uint8 tensor) and Python's and NumPy's (JSON)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return torch.get_rng_state(), plain


def set_rng_state(torch_state: torch.Tensor, plain: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(torch_state)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save modules' state dicts, optimizer and scheduler state and ``extra`` (JSON) atomically to ``path``.
    A module or the optimizer may be given as its state dict already (a sharded model's, gathered whole)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        state = module if isinstance(module, Mapping) else module.state_dict()
        tensors.update({f"{prefix}::{k}": v for k, v in state.items()})
    meta: dict[str, Any] = {"modules": list(modules), "extra": dict(extra or {})}
    if optimizer is not None:
        optim_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optim_state)
        tensors.update(optim_tensors)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    tensors.update({f"extra::{k}": v for k, v in (extra_tensors or {}).items()})
    try:
        write_checkpoint(path, tensors, meta)
    except TypeError as err:  # json refuses an object: name what could not be saved
        raise CheckpointError(f"cannot save checkpoint {str(path)!r}: {err}") from None


def _check_modules(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                   modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Every module's saved state, checked against the module (keys and shapes)."""
    missing = sorted(set(modules) - set(meta.get("modules", [])))
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {missing}: it was written by another run")
    states = {p: {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{p}::")} for p in modules}
    for prefix, module in modules.items():
        own = module.state_dict()
        bad = sorted(k for k in set(own) | set(states[prefix])
                     if k not in own or k not in states[prefix] or own[k].shape != states[prefix][k].shape)
        if bad:
            raise CheckpointError(
                f"{str(path)!r} does not match the {prefix}: {len(bad)} entries differ (first {bad[:3]}); "
                "it was written for another model or config: run without --resume to start afresh"
            )
    return states


def _check_optimizer(path: Path, meta: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The saved optimizer state has this optimizer's parameter groups (torch checks this too, but only
    after the modules would have been loaded)."""
    saved = meta.get("optimizer")
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    sizes = [len(g.get("params", [])) for g in groups] if isinstance(groups, list) else None
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"{str(path)!r} holds optimizer state for other parameters ({sizes} per group, the "
                              f"optimizer has {[len(g['params']) for g in optimizer.param_groups]}): it was written "
                              "by another run")


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    check: Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load what :func:`save_checkpoint` wrote into ``modules`` / ``optimizer`` / ``scheduler`` (in place).

    Returns ``(extra, extra_tensors)``. Everything is read and checked before anything is loaded:
    ``check(extra, extra_tensors)`` runs first (it raises to refuse the file), then keys, shapes and
    optimizer groups are compared; a refused file leaves every module and the optimizer as they were.
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    extra_tensors = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("extra::")}
    if check is not None:
        check(extra, extra_tensors)
    states = _check_modules(path, tensors, meta, modules)
    if optimizer is not None:
        _check_optimizer(path, meta, optimizer)
    for prefix, module in modules.items():
        module.load_state_dict(states[prefix])
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    return extra, extra_tensors
