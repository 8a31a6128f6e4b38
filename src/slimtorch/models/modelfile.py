"""Saved slimtorch models: one safetensors file of slimtorch's container (kind ``model``), never pickle.

A model file holds how to build the architecture (a :class:`~slimtorch.models.registry.ModelSpec`, in
its JSON header), the state dict and the masks the model carries (a masked model's; those a compacted one
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

With ``sparse=`` the masked weights are stored as their kept values and their positions (version 2 of the
kind; :mod:`slimtorch.sparse.storage`), which load back as the same weights and masks::

    >>> save_model(path, net, spec, sparse="auto")
    >>> torch.equal(load_model(path).masks["conv1.weight"], net.conv1.weight_mask)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_path
from slimtorch.compact import replay_
from slimtorch.container import (
    DescriptionError,
    Field,
    Kind,
    TensorInfo,
    read_description,
    read_file,
    register_kind,
    write_file,
)
from slimtorch.errors import CheckpointError, CompactionError, SlimError
from slimtorch.io import COMPACTED, DESCRIPTION, check_compaction_steps, load_compacted_
from slimtorch.masks import COMPACTION_ATTR, MASK_SUFFIX, apply_masks_, get_masks, model_state
from slimtorch.models.registry import REFERENCE_MODELS, ModelSpec, build_model
from slimtorch.sparse import SparseFormatError, check_sparse_entry, decode_sparse, split_state

__all__ = ["MODEL", "LoadedModel", "load_model", "save_model"]

STATES = ("dense", "masked", "compacted")


def _check_description(description: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """The state, the spec (parsed: its sizes are bounded), the compaction record of a compacted model, and
    the tensors: ``state::<state dict key>`` and ``mask::<parameter>`` (bool) only."""
    state = description["state"]
    if state not in STATES:
        raise DescriptionError(f"the model is said to be {state!r}; expected one of {list(STATES)}")
    try:
        ModelSpec.from_dict(description["spec"])
    except (SlimError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise DescriptionError(f"a bad model spec ({type(err).__name__}: {err})") from None
    if state == "compacted":
        try:
            check_compaction_steps((description.get("compaction") or {}).get("steps"))
        except DescriptionError as err:
            raise DescriptionError(f"the model was compacted but its compaction record is missing or invalid: "
                                   f"{err}") from None
    odd = sorted(n for n, t in tensors.items() if not n.startswith(("state::", "mask::", "sparse::"))
                 or (n.startswith("mask::") and t.dtype != "BOOL"))
    if odd:
        raise DescriptionError(f"tensors {odd[:3]} are neither 'state::<key>', bool 'mask::<parameter>' nor "
                               "'sparse::<parameter>::<part>'")
    _check_sparse(description.get("sparse", {}), tensors)


def _check_sparse(entries: Any, tensors: Mapping[str, TensorInfo]) -> None:
    """Every sparse parameter the header lists has exactly its layout's parts (shapes and dtypes), and
    every ``sparse::`` tensor belongs to one; none is also stored dense or with a separate mask."""
    if not isinstance(entries, dict):
        raise DescriptionError(f"'sparse' must map parameter names to their layout, got {type(entries).__name__}")
    parts: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {name: {} for name in entries}
    for key, info in tensors.items():
        if key.startswith("sparse::"):
            name, _, part = key[len("sparse::"):].rpartition("::")
            if name not in parts:
                raise DescriptionError(f"tensor {key!r} belongs to no sparse parameter the header lists")
            parts[name][part] = (info.shape, info.dtype)
    for name, entry in entries.items():
        if f"state::{name}" in tensors or f"mask::{name}" in tensors:
            raise DescriptionError(f"{name!r} is stored both sparse and dense")
        try:
            check_sparse_entry(name, entry, parts[name])
        except SparseFormatError as err:
            raise DescriptionError(str(err)) from None


# Version 2 stores masked weights sparse (the ``sparse`` field and ``sparse::`` tensors); a file without
# them is still written as version 1, which every slimtorch reads.
MODEL = register_kind(Kind(
    name="model", version=2, title="slimtorch model file", readable="safetensors model file",
    described="model description",
    fix="save models with slimtorch.models.modelfile.save_model (or `slimtorch prune/compact --out`)",
    fields=(Field("spec", dict), Field("state", str), Field("compaction", dict, required=False),
            Field("sparse", dict, required=False)),
    check=_check_description))
_DENSE_MODEL = dataclasses.replace(MODEL, version=1)


@dataclass
class LoadedModel:
    """A model read from a file, with how it was built, its state and the masks it carries (a masked
    model's; those a compacted one keeps, at its size; empty when there are none)."""

    model: nn.Module
    spec: ModelSpec
    state: str
    masks: dict[str, torch.Tensor]


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, *, sparse: str | None = None) -> None:
    """Save ``model`` (dense, masked or compacted) atomically, with the masks it carries: a masked model's,
    or the compacted-size masks a compacted model keeps (each mask once, as bool).

    ``sparse`` (``"bitmask"``, ``"csr"`` or ``"auto"``) stores every masked weight as its kept values and their
    positions (:mod:`slimtorch.sparse.storage`), which are its mask: a 90%-masked float32 weight takes about
    0.53 bytes an entry instead of 5. Loading gives back the same weights and masks exactly."""
    if getattr(model, "slimtorch_quantization", None):
        raise CheckpointError("save_model stores float models (dense, masked or compacted); save a quantized model "
                              "with slimtorch.quant.saving.save_quantized")
    state = model_state(model)
    dense, masks, stored = split_state(model.state_dict(), get_masks(model), sparse, mask_suffix=MASK_SUFFIX)
    tensors = {f"state::{k}": v for k, v in dense.items()}
    tensors.update({f"mask::{k}": v for k, v in masks.items()})
    tensors.update({f"sparse::{k}::{part}": t for k, (parts, _) in stored.items() for part, t in parts.items()})
    description: dict[str, Any] = {"spec": spec.to_dict(), "state": state}
    if state == "compacted":
        description["compaction"] = getattr(model, COMPACTION_ATTR)  # the steps that rebuild its shapes
    if stored:
        description["sparse"] = {k: entry for k, (_, entry) in stored.items()}
    write_file(path, MODEL if stored else _DENSE_MODEL, description, tensors)


def _replay_(model: nn.Module, compaction: Mapping[str, Any], path: Path) -> None:
    """Give a fresh ``model`` the shapes of the compacted one saved in ``path``."""
    try:
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
    saved_class = read_description(path / DESCRIPTION, COMPACTED)["class"]
    names = [n for n, (cls, _) in REFERENCE_MODELS.items() if f"{cls.__module__}.{cls.__qualname__}" == saved_class]
    if not names:
        raise CheckpointError(f"{str(path)!r} holds a compacted {saved_class}; the command line rebuilds only the "
                              f"reference models {list(REFERENCE_MODELS)} from such a folder (load it in Python "
                              "with slimtorch.io.load_compacted_)")
    spec = ModelSpec(name=names[0])
    model = build_model(spec)
    load_compacted_(model, path)  # replays the recorded steps, then loads the weights; CheckpointError if not
    return LoadedModel(model, spec, "compacted", get_masks(model))


def _build(spec: ModelSpec, path: Path) -> nn.Module:
    try:
        return build_model(spec)
    except (SlimError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} describes a model that cannot be built ({err})") from None


def _check_sparse_shapes(path: Path, model: nn.Module, entries: Mapping[str, Any]) -> None:
    own = dict(model.named_parameters())
    for name, entry in entries.items():
        if name not in own or list(own[name].shape) != entry["shape"]:
            found = list(own[name].shape) if name in own else "no such parameter"
            raise CheckpointError(f"{str(path)!r} does not fit its model: sparse weight {name!r} is "
                                  f"{entry['shape']} in the file, {found} in the model; {MODEL.fix}")


def _decoded(path: Path, entries: Mapping[str, Any],
             tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The weights and masks stored sparse, decoded (before a model is built: a bad one changes nothing)."""
    out = {}
    for name, entry in entries.items():
        prefix = f"sparse::{name}::"
        parts = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        try:
            out[name] = decode_sparse(parts, entry)
        except SparseFormatError as err:
            raise CheckpointError(f"{str(path)!r} has a corrupt sparse weight {name!r}: {err}; the file was edited or "
                                  f"is corrupt: {MODEL.fix}") from None
    return out


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild a model saved by :func:`save_model`, or a folder :func:`slimtorch.io.save_compacted` wrote
    from a reference model (default arguments). A foreign or corrupt file is a CheckpointError."""
    path = check_path(path, "load_model's path")
    if path.is_dir():
        return _load_compacted_folder(path)
    contents = read_file(path, MODEL)  # header, description and tensor names checked
    spec, state = ModelSpec.from_dict(contents.description["spec"]), contents.description["state"]
    masks = {k.split("::", 1)[1]: v for k, v in contents.tensors.items() if k.startswith("mask::")}
    state_dict = {k.split("::", 1)[1]: v for k, v in contents.tensors.items() if k.startswith("state::")}
    model = _build(spec, path)
    if state == "compacted":
        _replay_(model, contents.description["compaction"], path)
    entries = contents.description.get("sparse", {})
    _check_sparse_shapes(path, model, entries)  # (decoding allocates the declared shape: the model's own)
    for name, (weight, mask) in _decoded(path, entries, contents.tensors).items():
        state_dict[name], masks[name] = weight, mask
    try:
        if masks:
            apply_masks_(model, masks)
        # (the mask buffers are stored once, as the masks)
        model.load_state_dict({**{k + MASK_SUFFIX: m for k, m in masks.items()}, **state_dict})
    except (RuntimeError, SlimError) as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{str(path)!r} does not fit a {spec.name}: {first}") from None
    return LoadedModel(model, spec, state, masks)
