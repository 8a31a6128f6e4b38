"""Saved slimtorch models: one safetensors file, never pickle.

A model file holds how to build the architecture (a :class:`~slimtorch.models.registry.ModelSpec`, as
JSON metadata), the state dict and the masks the model carries (a masked model's; those a compacted one
keeps inside the channels that stay, at its size). A compacted model also records what compaction did
(``model.slimtorch_compaction``, JSON): loading replays those steps on a fresh model
(:func:`slimtorch.compact.replay_`, no tracing), masks it again, then loads the weights::

    >>> import os, tempfile, torch
    >>> from slimtorch import apply_masks_, compute_masks
    >>> from slimtorch.models.registry import REFERENCE_MODELS, ModelSpec, build_model
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

from slimtorch.atomic import atomic_write
from slimtorch.checks import check_path
from slimtorch.compact import replay_
from slimtorch.errors import CheckpointError, CompactionError, SlimError
from slimtorch.io import DESCRIPTION, load_compacted_
from slimtorch.masks import COMPACTION_ATTR, MASK_SUFFIX, apply_masks_, get_masks, model_state
from slimtorch.models.registry import REFERENCE_MODELS, ModelSpec, build_model

__all__ = ["LoadedModel", "load_model", "save_model"]

FORMAT = "slimtorch-model-v1"
STATES = ("dense", "masked", "compacted")


@dataclass
class LoadedModel:
    """A model read from a file, with how it was built, its state and the masks it carries (a masked
    model's; those a compacted one keeps, at its size; empty when there are none)."""

    model: nn.Module
    spec: ModelSpec
    state: str
    masks: dict[str, torch.Tensor]


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec) -> None:
    """Save ``model`` (dense, masked or compacted) atomically, with the masks it carries: a masked model's,
    or the compacted-size masks a compacted model keeps (each mask once, as bool)."""
    from safetensors.torch import save_file

    if getattr(model, "slimtorch_quantization", None):
        raise CheckpointError("save_model stores float models (dense, masked or compacted); save a quantized model "
                              "with slimtorch.quant.saving.save_quantized")
    state = model_state(model)
    masks = get_masks(model)
    buffers = {name + MASK_SUFFIX for name in masks}  # the masks again, as buffers: stored once, as masks
    tensors = {f"state::{k}": v for k, v in model.state_dict().items() if k not in buffers}
    tensors.update({f"mask::{k}": v.to(torch.bool) for k, v in masks.items()})
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": FORMAT, "spec": json.dumps(spec.to_dict()), "state": state}
    if state == "compacted":
        header["compaction"] = json.dumps(getattr(model, COMPACTION_ATTR))  # the steps that rebuild its shapes
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


def _replay_(model: nn.Module, header: Mapping[str, str], path: Path) -> None:
    """Give a fresh ``model`` the shapes of the compacted one saved in ``path``."""
    try:
        compaction = json.loads(header["compaction"])
        replay_(model, compaction["steps"])
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError, CompactionError) as err:
        raise CheckpointError(f"{str(path)!r} says the model was compacted but its compaction record is missing "
                              f"or does not fit a {type(model).__name__} ({type(err).__name__}: {err})") from None
    setattr(model, COMPACTION_ATTR, compaction)


def _load_compacted_folder(path: Path) -> LoadedModel:
    """A folder written by :func:`slimtorch.io.save_compacted` from one of the reference models."""
    if not (path / DESCRIPTION).is_file():
        raise CheckpointError(f"{str(path)!r} is a folder without {DESCRIPTION}; give a model file or a folder "
                              "written by slimtorch.io.save_compacted")
    try:
        saved_class = json.loads((path / DESCRIPTION).read_text()).get("class")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{str(path / DESCRIPTION)!r} is not a readable compaction record ({err})") from None
    names = [n for n, (cls, _) in REFERENCE_MODELS.items() if f"{cls.__module__}.{cls.__qualname__}" == saved_class]
    if not names:
        raise CheckpointError(f"{str(path)!r} holds a compacted {saved_class}; the command line rebuilds only the "
                              f"reference models {list(REFERENCE_MODELS)} from such a folder (load it in Python "
                              "with slimtorch.io.load_compacted_)")
    spec = ModelSpec(name=names[0])
    model = build_model(spec)
    load_compacted_(model, path)  # replays the recorded steps, then loads the weights; CheckpointError if not
    return LoadedModel(model, spec, "compacted", get_masks(model))


def _spec_and_state(header: Mapping[str, str], path: Path) -> tuple[ModelSpec, str]:
    try:
        spec, state = ModelSpec.from_dict(json.loads(header["spec"])), header["state"]
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{str(path)!r} has a missing or corrupt model description, a bad model spec "
                              f"({type(err).__name__}: {err}); save the model again with "
                              "slimtorch.models.save_model") from None
    if state not in STATES:
        raise CheckpointError(f"{str(path)!r} says its model is {state!r}; expected one of {list(STATES)}")
    return spec, state


def _build(spec: ModelSpec, path: Path) -> nn.Module:
    try:
        return build_model(spec)
    except (SlimError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} describes a model that cannot be built ({err})") from None


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild a model saved by :func:`save_model`, or a folder :func:`slimtorch.io.save_compacted` wrote
    from a reference model (default arguments). A foreign or corrupt file is a CheckpointError."""
    path = check_path(path, "load_model's path")
    if path.is_dir():
        return _load_compacted_folder(path)
    header, tensors = _read(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a slimtorch model file (format {header.get('format')!r}); "
                              "save models with `slimtorch prune/compact --out` or slimtorch.models.save_model")
    spec, state = _spec_and_state(header, path)
    masks = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("mask::")}
    state_dict = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("state::")}
    model = _build(spec, path)
    if state == "compacted":
        _replay_(model, header, path)
    try:
        if masks:
            apply_masks_(model, masks)
        # (the mask buffers are stored once, as the masks)
        model.load_state_dict({**{k + MASK_SUFFIX: m for k, m in masks.items()}, **state_dict})
    except (RuntimeError, SlimError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{str(path)!r} does not fit a {spec.name}: {first}") from None
    return LoadedModel(model, spec, state, masks)
