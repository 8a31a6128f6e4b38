"""Saved slimtorch models: one safetensors file, never pickle.

A model file holds how to build the architecture (a :class:`~slimtorch.models.registry.ModelSpec`, as
JSON metadata), the state dict, and for a pruned model its masks. A compacted model also records what
compaction did (``model.slimtorch_compaction``, JSON): loading replays those steps on a fresh model
(:func:`slimtorch.compact.replay_`, no tracing), then loads the weights::

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

from slimtorch.compact import replay_
from slimtorch.errors import CheckpointError, CompactionError
from slimtorch.io import atomic_write
from slimtorch.models.registry import REFERENCE_MODELS, ModelSpec, build_model
from slimtorch.prune.masks import apply_masks_, get_masks
from slimtorch.report import COMPACTION_ATTR, model_state

__all__ = ["LoadedModel", "load_model", "save_model"]

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
    """Save ``model`` (dense, masked or compacted) atomically. A masked model carries its own masks; give
    a compacted one the ``masks`` it was compacted with to keep them in the file (for reports)."""
    from safetensors.torch import save_file

    if getattr(model, "slimtorch_quantization", None):
        raise CheckpointError("save_model stores float models (dense, masked or compacted); save a quantized model "
                              "with slimtorch.quant.saving.save_quantized")
    state = model_state(model)
    if state == "masked":
        masks = get_masks(model)
    tensors = {f"state::{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask::{k}": v.to(torch.bool) for k, v in (masks or {}).items()})
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


def _read_spec(header: Mapping[str, str], path: Path) -> ModelSpec:
    """The file's model spec, validated (sizes bounded, no downloading arguments) before anything is built."""
    try:
        return ModelSpec.from_dict(json.loads(header["spec"]))
    except (KeyError, ValueError, TypeError, AttributeError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{str(path)!r} holds a bad model spec ({err}); re-save the model with "
                              "slimtorch.models.save_model") from None


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
    from slimtorch.io import DESCRIPTION, load_compacted_

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
    return LoadedModel(model, spec, "compacted", {})


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild a model saved by :func:`save_model`, or a folder :func:`slimtorch.io.save_compacted` wrote
    from a reference model (default arguments). A foreign or corrupt file is a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        return _load_compacted_folder(path)
    header, tensors = _read(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a slimtorch model file (format {header.get('format')!r}); "
                              "save models with `slimtorch prune/compact --out` or slimtorch.models.save_model")
    spec = _read_spec(header, path)
    masks = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("mask::")}
    state_dict = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("state::")}
    model = build_model(spec)
    if header["state"] == "masked":
        apply_masks_(model, masks)
    elif header["state"] == "compacted":
        _replay_(model, header, path)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{str(path)!r} does not fit a {spec.name}: {first}") from None
    return LoadedModel(model, spec, header["state"], masks)
