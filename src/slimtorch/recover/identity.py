"""What decides a training run's result, recorded in its checkpoints so that a resume continues the same run
or refuses: the settings, the data (size and content), the model (architecture and masks), the loss (its
kind, settings and teacher) and whatever the caller adds (a recipe's model, data and steps so far).

The weights a model or a loss module starts with are not compared: a resume replaces them with the
checkpoint's (a resumed process builds its model afresh, often from another random state). What made those
weights is the caller's to record (a recipe records its steps).

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    >>> a = run_identity(nn.Linear(2, 2), data, {"lr": 0.1})
    >>> b = run_identity(nn.Linear(2, 2), TensorDataset(torch.ones(4, 2), torch.zeros(4, dtype=torch.long)),
    ...                  {"lr": 0.2})
    >>> for difference in differences(a, b):
    ...     print(difference)
    settings.lr (0.1 in the checkpoint, 0.2 now)
    the training data (8 samples in the checkpoint, 4 now)

Tensors are compared by a BLAKE2 digest of their bytes (with names, dtypes and shapes). A
``TensorDataset`` is digested whole; another dataset by its size, type and 16 samples spread over it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from slimtorch.masks import get_masks

__all__ = ["dataset_identity", "differences", "digest", "run_identity"]

#: samples digested of a dataset that is not a TensorDataset
SAMPLES = 16


def _update(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        t = t.int_repr() if t.is_quantized else t
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        # (n,) bytes of the values: a 1-d view of any dtype as uint8
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, (tuple, list)):
        for v in value:
            _update(h, v)
    elif isinstance(value, (int, float, str, bool, type(None))):
        h.update(repr(value).encode())
    elif callable(getattr(value, "tobytes", None)):  # NumPy arrays, PIL images: their bytes
        h.update(f"{type(value).__name__}{getattr(value, 'shape', getattr(value, 'size', ''))};".encode())
        h.update(value.tobytes())
    else:  # (an object without a byte form: its type, never its repr, which may hold a memory address)
        h.update(type(value).__qualname__.encode())


def digest(tensors: Mapping[str, Any]) -> str:
    """A hex digest of named tensors (or tuples of them, or plain values): names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(f"{name}:".encode())
        _update(h, tensors[name])
    return h.hexdigest()


def dataset_identity(data: Dataset) -> dict[str, Any]:
    """The size of ``data`` and a digest of its content (all of a TensorDataset, else 16 samples)."""
    size = len(data)  # type: ignore[arg-type]
    if isinstance(data, TensorDataset):
        content = digest({str(i): t for i, t in enumerate(data.tensors)})
    else:
        picks = sorted({round(i * (size - 1) / max(SAMPLES - 1, 1)) for i in range(min(SAMPLES, size))})
        content = digest({str(i): data[i] for i in picks})
    return {"type": f"{type(data).__module__}.{type(data).__qualname__}", "size": size, "content": content}


def _loss_identity(loss_fn: Callable[..., Any] | None) -> dict[str, Any]:
    if loss_fn is None:
        return {"kind": "cross-entropy"}
    kind = f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__qualname__)}"
    if isinstance(loss_fn, nn.Module):
        kind = f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}"
    out: dict[str, Any] = {"kind": kind}
    config = getattr(loss_fn, "config", None)
    if hasattr(config, "to_dict"):
        out["settings"] = config.to_dict()
    teacher = getattr(loss_fn, "teacher", None)
    if isinstance(teacher, nn.Module):
        out["teacher"] = digest(teacher.state_dict())
    return out


def run_identity(
    model: nn.Module, train_data: Dataset, settings: Mapping[str, Any], *, loss_fn: Callable[..., Any] | None = None,
    eval_data: Dataset | None = None, world_size: int = 1, context: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Everything that decides what a training run of ``model`` ends with, as it reads back from JSON (tuples
    become lists) so that a record read from a checkpoint compares equal to a fresh one. The kinds of the
    ``callbacks`` acting during training are recorded when there are any (a record without them is a run
    without them)."""
    state = model.state_dict()
    identity = {
        "settings": dict(settings),
        "world_size": world_size,
        "train_data": dataset_identity(train_data),
        "eval_data": dataset_identity(eval_data) if eval_data is not None else None,
        "architecture": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                         "shapes": digest({k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()})},
        "masks": digest(get_masks(model)),
        "loss": _loss_identity(loss_fn),
        "context": dict(context or {}),
    }
    if callbacks:
        identity["callbacks"] = [f"{type(c).__module__}.{type(c).__qualname__}" for c in callbacks]
    return json.loads(json.dumps(identity, default=str))


_NAMES = {
    "architecture": "the model's architecture (class or parameter shapes)",
    "masks": "the model's masks (it was pruned differently)",
    "loss": "the loss (its kind, settings or teacher)",
    "world_size": "the number of processes",
    "callbacks": "the callbacks acting during training (pruning methods)",
}


def _data_difference(what: str, saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str:
    if saved is None or now is None:
        given = ("none" if saved is None else "given", "none" if now is None else "given")
        return f"{what} ({given[0]} in the checkpoint, {given[1]} now)"
    if saved.get("size") != now.get("size"):
        return f"{what} ({saved.get('size')} samples in the checkpoint, {now.get('size')} now)"
    return f"{what} (same size, other samples or order)"


def _paths(saved: Any, now: Any, path: str) -> list[str]:
    """Where two JSON values differ: dotted paths with both values."""
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _paths(saved.get(key), now.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [d for i, (a, b) in enumerate(zip(saved, now, strict=True)) for d in _paths(a, b, f"{path}[{i}]")]
    return [] if saved == now else [f"{path} ({saved!r} in the checkpoint, {now!r} now)"]


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`run_identity` records, each named in words."""
    out = _paths(saved.get("settings"), now.get("settings"), "settings")
    for key, what in (("train_data", "the training data"), ("eval_data", "the evaluation data")):
        if saved.get(key) != now.get(key):
            out.append(_data_difference(what, saved.get(key), now.get(key)))
    for key, what in _NAMES.items():
        if saved.get(key) != now.get(key):
            out.append(what)
    return out + _paths(saved.get("context"), now.get("context"), "")
