"""Saving and loading masks and compacted models without pickle, in slimtorch's container
(:mod:`slimtorch.container`: safetensors for tensors, a JSON header for descriptions).

Masks are one safetensors file of bool tensors (kind ``masks``). A compacted model is saved as a folder
(kind ``compacted``) with ``model.safetensors`` (its weights) and ``compaction.json`` (the header: the
class it was built from and the compaction steps: what each layer kept, the rewritten calls). It is
loaded onto a freshly built instance of the same class: the steps are replayed on that instance's shapes,
then the weights are loaded, strictly::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from slimtorch.io import load_compacted_, save_compacted
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> from slimtorch import compact_
    >>> compact_(net, {"0.weight": torch.arange(8)[:, None].expand(8, 4) < 5, "0.bias": torch.arange(8) < 5},
    ...          example_inputs=x)
    >>> folder = tempfile.mkdtemp()
    >>> save_compacted(net, folder)
    >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> load_compacted_(fresh, folder)
    >>> fresh[0].out_features, torch.equal(fresh(x), net(x))
    (5, True)

Masks:

    >>> import torch, tempfile, os
    >>> from slimtorch.io import save_masks, load_masks
    >>> path = os.path.join(tempfile.mkdtemp(), "masks.safetensors")
    >>> save_masks({"fc.weight": torch.tensor([[True, False]])}, path)
    >>> load_masks(path)["fc.weight"]
    tensor([[ True, False]])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.atomic import atomic_folder, atomic_write
from slimtorch.checks import check_materialized, check_module, check_path
from slimtorch.compact.compact import Snapshot, replay_
from slimtorch.container import (
    DescriptionError,
    Field,
    Kind,
    TensorInfo,
    description_text,
    file_header,
    read_description,
    read_file,
    read_tensors,
    register_kind,
    write_file,
)
from slimtorch.errors import CheckpointError
from slimtorch.masks import (
    COMPACTION_ATTR,
    apply_masks_,
    check_mask_values,
    get_masks,
    is_masked,
    model_state,
    remove_masks_,
)

__all__ = [
    "COMPACTED",
    "MASKS",
    "atomic_write",
    "check_compaction_steps",
    "load_compacted_",
    "load_masks",
    "load_plain_state_",
    "plain_state",
    "save_compacted",
    "save_masks",
]

WEIGHTS, DESCRIPTION = "model.safetensors", "compaction.json"


def check_compaction_steps(steps: Any) -> None:
    """Every field of a compaction record's steps that replaying reads, with the type it needs (before
    anything is changed); raises :class:`~slimtorch.container.DescriptionError`."""
    if not isinstance(steps, list):
        raise DescriptionError(f"'steps' must be a list, got {type(steps).__name__}")
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("modules"), dict) \
                or not isinstance(step.get("fixes"), list):
            raise DescriptionError(f"step {i} needs a 'modules' mapping and a 'fixes' list")
        for name, change in step["modules"].items():
            if not isinstance(change, dict) or not isinstance(change.get("kind"), str) \
                    or not isinstance(change.get("keeps"), dict) or not isinstance(change.get("options"), dict):
                raise DescriptionError(f"step {i}, module {name!r} needs 'kind', 'keeps' and 'options'")
            for key, keep in change["keeps"].items():
                if not isinstance(keep, list) or not all(type(k) is int and k >= 0 for k in keep):
                    raise DescriptionError(f"step {i}, module {name!r}, keeps {key!r} must be a list of indices >= 0")


def _check_compacted(description: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    check_compaction_steps(description["steps"])
    if not all(isinstance(m, str) for m in description.get("masks", [])):
        raise DescriptionError("'masks' must list parameter names")


MASKS = register_kind(Kind(
    name="masks", version=1, title="mask file", readable="safetensors mask file", dtypes=("BOOL",), foreign=True,
    fix="save the masks with slimtorch.save_masks (a safetensors file of bool tensors keyed by parameter name)"))
COMPACTED = register_kind(Kind(
    name="compacted", version=1, title="compacted model folder", fix="save the model again with save_compacted",
    fields=(Field("class", str), Field("steps", list), Field("summary", dict),
            Field("masks", list, required=False)),  # (no masks: written before compacted models kept theirs)
    check=_check_compacted))


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
    # torch keeps per-channel scales in float64 and zero points in int64 (float for embeddings' float
    # qparams, which must stay float); a deployed file needs 32 bits.
    zero = zero.float() if zero.is_floating_point() else zero.int()
    return {name: value.int_repr(), f"{name}.scale": scale.float(), f"{name}.zero_point": zero}


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


def _from_plain(name: str, like: object, tensors: Mapping[str, torch.Tensor], used: set[str]) -> object:
    """The state-dict value ``like`` (from the target model) rebuilt from :func:`plain_state`'s tensors."""
    if isinstance(like, (tuple, list)):
        return type(like)(_from_plain(f"{name}.{i}", v, tensors, used) for i, v in enumerate(like))
    if not isinstance(like, torch.Tensor):
        return like  # metadata such as torch.ao's packed dtype: the target model's own
    keys = [name, f"{name}.scale", f"{name}.zero_point"] if like.is_quantized else [name]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"the file has no {missing[0]!r}; it was saved from a different model or quantization")
    used.update(keys)
    values = tensors[name]
    if tuple(values.shape) != tuple(like.shape):
        raise CheckpointError(f"{name!r} is {tuple(values.shape)} in the file but {tuple(like.shape)} in the model")
    if not like.is_quantized:
        return values.to(like.dtype)
    scale, zero = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
    if like.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return torch._make_per_tensor_quantized_tensor(values, float(scale), int(zero))
    return torch._make_per_channel_quantized_tensor(values, scale.double(), zero, like.q_per_channel_axis())


def load_plain_state_(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load :func:`plain_state`'s tensors into ``model``, which must be built (and quantized) like the one
    they came from: integer values, scales and zero points become quantized tensors again. Every value is
    checked before any is loaded, so a file that does not fit leaves the model as it was.

    >>> from torch import nn
    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> load_plain_state_(b, plain_state(a))
    >>> torch.equal(a.weight, b.weight)
    True
    """
    used: set[str] = set()
    template = model.state_dict()
    state = OrderedDict((name, _from_plain(name, value, tensors, used)) for name, value in template.items())
    # The per-module format versions: torch.ao's quantized layers read their packed weights by version.
    state._metadata = getattr(template, "_metadata", None)  # type: ignore[attr-defined]
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"the file holds tensors the model does not have, e.g. {extra[:3]}; it was saved "
                              "from a different model or quantization")
    model.load_state_dict(state)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save masks as a safetensors file (bool tensors), atomically. Masks that are not 0/1 tensors keyed by name
    are a ConfigError (a fraction or a NaN would be saved as True)."""
    check_mask_values(masks)
    write_file(path, MASKS, {}, {name: m.detach().to(torch.bool) for name, m in masks.items()})


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Load masks saved by :func:`save_masks` (or any safetensors file of bool tensors). A missing, corrupt
    or foreign file is a CheckpointError (:func:`slimtorch.container.read_file`)."""
    return read_file(check_path(path, "load_masks's path"), MASKS).tensors


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _description(model: nn.Module) -> dict[str, Any]:
    info = dict(getattr(model, COMPACTION_ATTR, None) or {})
    steps = info.pop("steps", [])
    return {"class": _class_name(model), "steps": steps, "summary": info, "masks": sorted(get_masks(model))}


def save_compacted(model: nn.Module, directory: str | Path) -> None:
    """Save ``model`` (compacted or not) as ``directory/model.safetensors`` + ``directory/compaction.json``,
    both at once (a temporary folder renamed into place: see :mod:`slimtorch.atomic`).

    The class is recorded by its import path; :func:`load_compacted_` rebuilds the shapes on a fresh instance.
    The masks a compacted model keeps (compacted size) are saved with it and applied again on loading.
    Masked models must be compacted (or have their masks removed) first: their masks are not yet part of
    the architecture.
    """
    from safetensors.torch import save_model

    check_module(model, "save_compacted")
    if is_masked(model) and model_state(model) != "compacted":
        raise CheckpointError("the model carries pruning masks; compact it (slimtorch.compact_) or remove them "
                              "(slimtorch.remove_masks_) before save_compacted")
    if getattr(model, "slimtorch_quantization", None):
        raise CheckpointError("the model is quantized: save the compacted float model with save_compacted and the "
                              "quantized one with slimtorch.quant.saving.save_quantized (it loads onto the former)")
    description = description_text(COMPACTED, _description(model))
    with atomic_folder(directory) as staging:
        # (safetensors' save_model, not save_file: it drops the aliases of tied weights, which loading accepts)
        save_model(model, str(staging / WEIGHTS), metadata=file_header(COMPACTED, {}))
        (staging / DESCRIPTION).write_text(description)


def _read_description(directory: Path) -> dict[str, Any]:
    if not (directory / DESCRIPTION).is_file() or not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{str(directory)!r} holds no compacted model (expected {DESCRIPTION} and {WEIGHTS})")
    return read_description(directory / DESCRIPTION, COMPACTED)


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    return read_tensors(path, COMPACTED, device=device)[1]


def _load_weights_(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict ``load_state_dict``, every key, shape and dtype checked before anything is copied. Unlike
    ``safetensors.torch.load_model`` it keeps the model's own state-dict metadata (module versions, which
    e.g. torchvision's MNASNet requires), and accepts a missing key only where the model ties it to a loaded
    tensor (``save_model`` drops such aliases)."""
    own = model.state_dict()
    def storage(key: str) -> int | None:  # None for empty tensors, whose data pointers say nothing
        return own[key].untyped_storage().data_ptr() if own[key].numel() else None

    loaded = {storage(k) for k in state if k in own} - {None}
    aliases = [k for k in own if k not in state and storage(k) in loaded]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(aliases))
    if missing or unexpected:
        raise CheckpointError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    wrong = [f"{k!r} is {tuple(v.shape)} {v.dtype} in the file, {tuple(own[k].shape)} {own[k].dtype} in the model"
             for k, v in state.items() if v.shape != own[k].shape or v.dtype != own[k].dtype]
    if wrong:
        raise CheckpointError(f"{len(wrong)} tensors do not fit, e.g. {wrong[0]}")
    ordered = OrderedDict(state)
    ordered._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]  # per-module versions
    model.load_state_dict(ordered, strict=False)


def load_compacted_(model: nn.Module, directory: str | Path) -> None:
    """Load a model saved by :func:`save_compacted` onto ``model``, a freshly built instance of the class it
    was saved from: replay its compaction steps, mask it as it was, then load the weights (strictly, no
    pickle). A missing, corrupt or mismatched file raises :class:`~slimtorch.errors.CheckpointError` and
    leaves ``model`` as it was: everything is read and checked before a value is copied into the model.
    """
    check_module(model, "load_compacted_")
    check_materialized(model, "load_compacted_")
    directory = check_path(directory, "load_compacted_'s folder")
    description = _read_description(directory)
    if description["class"] != _class_name(model):
        raise CheckpointError(f"the checkpoint was saved from {description['class']}; got a {_class_name(model)}. "
                              "Build an instance of the saved class and load onto it")
    if getattr(model, COMPACTION_ATTR, None) or is_masked(model):
        raise CheckpointError("load_compacted_ needs a freshly built model; this one is already compacted or masked")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = _read_weights(directory / WEIGHTS, device)
    snapshot = Snapshot(model)
    try:
        replay_(model, description["steps"])
        params = dict(model.named_parameters())
        apply_masks_(model, {n: torch.ones_like(params[n], dtype=torch.bool) if n in params else torch.ones(0)
                             for n in description.get("masks", [])})
        _load_weights_(model, state)
    except Exception as err:  # shape, replay and mask errors alike: the file does not fit the model
        if is_masked(model):
            remove_masks_(model)  # (also drops the gradient hooks masking put on parameters the steps kept)
        snapshot.restore(model)
        raise CheckpointError(f"{str(directory)!r} does not match this model: {err}") from None
    setattr(model, COMPACTION_ATTR, {**description["summary"], "steps": description["steps"]})
