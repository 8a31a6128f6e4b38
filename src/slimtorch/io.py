"""Saving and loading without pickle: safetensors for tensors, JSON for descriptions.

    >>> import torch, tempfile, os
    >>> from slimtorch.io import save_masks, load_masks
    >>> path = os.path.join(tempfile.mkdtemp(), "masks.safetensors")
    >>> save_masks({"fc.weight": torch.tensor([[True, False]])}, path)
    >>> load_masks(path)["fc.weight"]
    tensor([[ True, False]])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from slimtorch.errors import CheckpointError

__all__ = ["atomic_write", "load_masks", "plain_state", "save_masks"]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _plain_tensors(name: str, value: object) -> dict[str, torch.Tensor]:
    if isinstance(value, (tuple, list)):  # torch.ao packs (int8 weight, bias) into one state entry
        return {k: t for i, v in enumerate(value) for k, t in _plain_tensors(f"{name}.{i}", v).items()}
    if not isinstance(value, torch.Tensor):
        return {}  # e.g. the dtype torch.ao stores beside packed weights: metadata, not data
    if not value.is_quantized:
        return {name: value.detach()}
    if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale, zero = torch.tensor([value.q_scale()]), torch.tensor([value.q_zero_point()])
    else:  # per channel (also the float-qparams scheme of quantized embeddings)
        scale, zero = value.q_per_channel_scales(), value.q_per_channel_zero_points()
    # torch keeps per-channel scales in float64 and zero points in int64; a deployed file needs 32 bits.
    return {name: value.int_repr(), f"{name}.scale": scale.float(), f"{name}.zero_point": zero.int()}


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as plain tensors safetensors can hold: a quantized tensor becomes its integer
    values plus its scales and zero points; packed (weight, bias) tuples are flattened. Pure.

    >>> from torch import nn
    >>> sorted(plain_state(nn.Linear(2, 1)))
    ['bias', 'weight']
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        out.update(_plain_tensors(name, value))
    return out


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save masks as a safetensors file (bool tensors), atomically."""
    from safetensors.torch import save_file

    tensors = {name: m.detach().to("cpu", torch.bool).contiguous() for name, m in masks.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "slimtorch-masks-v1"}))


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Load masks saved by :func:`save_masks`. A missing, corrupt or foreign file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mask file {str(path)!r} does not exist")
    try:
        masks = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors mask file ({err}); re-save it with save_masks"
        ) from None
    bad = [name for name, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise CheckpointError(f"{str(path)!r} holds non-bool tensors {bad[:3]}: it is not a mask file")
    return masks
