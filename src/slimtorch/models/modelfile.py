"""Saved slimtorch models: one safetensors file, never pickle.

A model file holds how to build the architecture (a :class:`~slimtorch.models.registry.ModelSpec`, as
JSON metadata), the state dict, and for a pruned model its masks. A compacted model is rebuilt by
compacting a fresh model with the same masks (compaction is deterministic), then loading the weights::

    >>> import os, tempfile, torch
    >>> from slimtorch import apply_masks_, compute_masks
    >>> from slimtorch.models.registry import ModelSpec, build_model
    >>> from slimtorch.models.modelfile import load_model, save_model
    >>> spec = ModelSpec(name="MnistNet")
    >>> net = build_model(spec)
    >>> apply_masks_(net, compute_masks(net, [{"op_names": ["conv1"], "sparse_ratio": 0.5}]))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> save_model(path, net, spec)
    >>> loaded = load_model(path)
    >>> loaded.state, torch.equal(loaded.model.conv1.weight, net.conv1.weight)
    ('masked', True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtorch.compact import compact_
from slimtorch.errors import CheckpointError, CompactionError
from slimtorch.io import atomic_write
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.prune.masks import apply_masks_, get_masks
from slimtorch.report import model_state

__all__ = ["LoadedModel", "compact_like_", "example_batch", "load_model", "save_model"]

FORMAT = "slimtorch-model-v1"


@dataclass
class LoadedModel:
    """A model read from a file, with how it was built, its state and its masks (empty when dense)."""

    model: nn.Module
    spec: ModelSpec
    state: str
    masks: dict[str, torch.Tensor]


def save_model(
    path: str | Path, model: nn.Module, spec: ModelSpec, *, masks: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Save ``model`` (dense, masked or compacted) atomically. A compacted model needs the ``masks`` it was
    compacted with (so that loading can rebuild its shapes); a masked one carries its own."""
    from safetensors.torch import save_file

    state = model_state(model)
    if state == "masked":
        masks = get_masks(model)
    if state == "compacted" and not masks:
        raise CompactionError("saving a compacted model needs the masks it was compacted with: save_model(..., masks=)")
    tensors = {f"state::{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask::{k}": v.to(torch.bool) for k, v in (masks or {}).items()})
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": FORMAT, "spec": json.dumps(spec.to_dict()), "state": state}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors model file ({err})") from None


def example_batch(input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A seeded random batch ``(batch, *input_shape)`` for tracing and verifying a model whose data is not
    at hand (a zero batch would hide wrong weights behind zero activations). Pure and deterministic."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape, generator=generator)


def compact_like_(model: nn.Module, masks: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]) -> None:
    """Compact ``model`` with ``masks`` (:func:`slimtorch.compact_`, traced and verified on
    :func:`example_batch`). Compaction is deterministic, so a fresh model compacted with the masks a saved
    model was compacted with has that model's shapes."""
    if not input_shape:
        raise CompactionError("compacting needs the model's input shape; build it with ModelSpec(input_shape=...)")
    compact_(model, dict(masks), example_inputs=example_batch(tuple(input_shape)))


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild a model saved by :func:`save_model`. A foreign or corrupt file is a CheckpointError."""
    path = Path(path)
    header, tensors = _read(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a slimtorch model file (format {header.get('format')!r}); "
                              "save models with `slimtorch prune/compact --out` or slimtorch.models.save_model")
    spec = ModelSpec.from_dict(json.loads(header["spec"]))
    masks = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("mask::")}
    state_dict = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("state::")}
    model = build_model(spec)
    if header["state"] == "masked":
        apply_masks_(model, masks)
    elif header["state"] == "compacted":
        compact_like_(model, masks, spec.input_shape or ())
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{str(path)!r} does not fit a {spec.name}: {first}") from None
    return LoadedModel(model, spec, header["state"], masks)
