"""Compaction of Hugging Face transformers: attention heads and FFN neurons that the masks prune are
physically removed by the compaction engine (:func:`slimtorch.compact_`, with the attention rules of
:mod:`slimtorch.integrations.hf.rules`), then the config and the record of pruned heads are updated so
that the result saves and loads (:mod:`slimtorch.integrations.hf.folders`).

:func:`compact_hf_` is ``compact_`` with inputs made from the config and the model's applied masks; a
head that is only partly masked stays, with its masked weights at zero, as the seeds' workflow does.
:func:`unit_masks` masks whole heads or neurons by index::

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                             intermediate_size=64)).eval()
    >>> masks = unit_masks(bert, {"encoder.layer.0.attention": [1, 3]})
    >>> compact_hf_(bert, masks)
    >>> bert.encoder.layer[0].attention.self.query.out_features, bert.slimtorch_compaction["pruned_heads"]
    (16, {'encoder.layer.0.attention': [1, 3]})
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.compact import compact_
from slimtorch.compact.compact import AFTER_COMPACTION
from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.integrations.hf.configs import BEFORE_KEY, CONFIG_KEY, sync_config_
from slimtorch.integrations.hf.moe import compact_expert_neurons_
from slimtorch.integrations.hf.rules import HEADS_ATTR, slice_params_
from slimtorch.integrations.hf.units import BlockSpec, Slice, find_blocks
from slimtorch.masks import COMPACTION_ATTR, apply_masks_, get_masks, is_masked

__all__ = [
    "CONFIG_KEY",
    "PARTIAL_HEADS",
    "BlockPlan",
    "after_compaction_",
    "compact_hf_",
    "example_inputs_for",
    "format_pruned_heads",
    "resolve_partial_heads",
    "shrink_block_",
    "unit_masks",
]


@dataclass(frozen=True)
class BlockPlan:
    """The query units (heads / neurons) and key/value heads of one block to keep (the loader rebuilds
    saved shapes with it)."""

    name: str
    kind: str
    units: int
    keep: tuple[int, ...]
    keep_kv: tuple[int, ...] = ()

    @property
    def removed(self) -> list[int]:
        return sorted(set(range(self.units)) - set(self.keep))


def _keep_index(spec: BlockSpec, plan: BlockPlan, param: str, dim: int, size: int) -> torch.Tensor | None:
    """Positions kept along ``dim`` of ``param`` (None when no slice of this block touches it)."""
    slices = [s for s in (*spec.producers, *spec.consumers) if s.param == param and s.dim == dim]
    if not slices:
        return None
    if any(s.at is not None for s in slices):
        raise ConfigError(f"{spec.name!r} is one expert of a mixture of experts: its neurons are cut by compaction "
                          "(slimtorch.compact_), not block by block")
    keep = torch.ones(size, dtype=torch.bool, device="cpu")  # explicit: HF may build models under a meta device
    for s in slices:
        kept = set(plan.keep_kv if s.kv else plan.keep)
        for unit in range(spec.kv_units if s.kv else spec.units):
            if unit not in kept:
                keep[s.positions(unit)] = False
    return keep.nonzero().squeeze(1)


def _sync_layer_sizes(layer: nn.Module) -> None:
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    elif type(layer).__name__ == "Conv1D":  # HF's (in, out) linear
        layer.nx, layer.nf = weight.shape


def shrink_block_(spec: BlockSpec, plan: BlockPlan) -> None:
    """Keep only ``plan``'s units in the block's parameters (the slicing the engine's shrink functions do,
    :func:`~slimtorch.integrations.hf.rules.slice_params_`), then update the size attributes of its layers
    and of the block itself. Used to rebuild saved shapes; compaction itself runs through the engine."""
    keeps: dict[str, dict[int, torch.Tensor]] = {}
    for s in (*spec.producers, *spec.consumers):
        tensor = spec.module.get_parameter(s.param)
        keeps.setdefault(s.param, {})[s.dim] = _keep_index(spec, plan, s.param, s.dim, tensor.shape[s.dim])
    slice_params_(spec.module, keeps)
    for param in keeps:
        _sync_layer_sizes(spec.module.get_submodule(param.rpartition(".")[0]))
    spec.set_sizes(spec.module, len(plan.keep), len(plan.keep_kv) or len(plan.keep))


def _core(spec: BlockSpec) -> nn.Module:
    """The attention module of an attention block (BERT's heads live in ``<block>.self``)."""
    return spec.module.get_submodule(spec.producers[0].param.partition(".")[0]) \
        if spec.producers[0].param.startswith("self.") else spec.module


def after_compaction_(model: nn.Module) -> None:
    """Run by :func:`slimtorch.compact_` after it compacted a model: for a Hugging Face model, record the
    pruned heads (by their original numbers) and the kept sizes in ``model.config`` (``slimtorch_blocks``
    and the config's size keys) and in ``model.slimtorch_compaction["pruned_heads"]``."""
    config = getattr(model, "config", None)
    if config is None:  # (not a Hugging Face model: looking for its blocks would walk every module for nothing)
        return
    compact_expert_neurons_(model)
    specs = find_blocks(model)
    if not specs:
        return
    saved = dict(vars(config))  # (values are replaced, never written into: a shallow copy undoes a failure)
    try:
        _record_blocks_(model, specs)
    except BaseException:
        vars(config).clear()
        vars(config).update(saved)
        raise


def _record_blocks_(model: nn.Module, specs: Mapping[str, BlockSpec]) -> None:
    info = getattr(model, COMPACTION_ATTR, None) or {}
    record = {k: dict(v) for k, v in (getattr(model.config, CONFIG_KEY, None) or {}).items()}
    for name, spec in specs.items():
        if spec.kind != "attention":
            continue
        entry = record.setdefault(name, {})
        heads = getattr(_core(spec), HEADS_ATTR, None)
        if heads is not None:  # the original head numbers the surgery kept, over every compaction
            entry["original"] = heads["original"]
            entry["pruned"] = sorted(set(range(heads["original"])) - set(heads["kept"]))
        entry.setdefault("original", spec.units + len(entry.get("pruned", [])))
    before = dict(info.get(BEFORE_KEY, {}))
    rewritten = any(step.get("fixes") for step in info.get("steps", []))
    sync_config_(model, specs, record, before, keys=not rewritten)
    info[BEFORE_KEY] = before
    info["pruned_heads"] = {n: list(r["pruned"]) for n, r in record.items() if r.get("pruned")}
    setattr(model, COMPACTION_ATTR, info)


def _vocabulary(config: Any) -> int:
    for c in (config, getattr(config, "text_config", None), getattr(config, "decoder", None)):
        if isinstance(getattr(c, "vocab_size", None), int):
            return c.vocab_size
    return 2


def _image(config: Any, batch: int) -> torch.Tensor:
    vision = getattr(config, "vision_config", None) or config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    return torch.randn(batch, getattr(vision, "num_channels", 3), size, size)


def example_inputs_for(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A small batch a Hugging Face model accepts, made from its config and the arguments its ``forward``
    takes: ``input_ids`` (token ids from 1, below the vocabulary size) and an attention mask, ``pixel_values``
    for a vision model, ``input_features`` for a speech encoder (Whisper), ``input_values`` for raw audio
    (wav2vec2), ``decoder_input_ids`` for an encoder-decoder."""
    config = model.config
    params = inspect.signature(model.forward).parameters
    ids = torch.arange(batch * length).reshape(batch, length) % (_vocabulary(config) - 1) + 1  # (batch, length)
    out: dict[str, torch.Tensor] = {}
    if "input_features" in params and hasattr(config, "input_feat_per_channel"):
        feats = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        # Speech2Text: (batch, frames, features); its two convolutions take the frames down 2x each
        out["input_features"] = torch.randn(batch, 4 * length, feats)
    elif "input_features" in params:
        frames = 2 * getattr(config, "max_source_positions", length)  # (Whisper's convolutions halve the frames)
        out["input_features"] = torch.randn(batch, config.num_mel_bins, frames)
    elif "input_values" in params:  # raw audio (wav2vec2): the convolutions' strides make ``length`` + 2 frames
        out["input_values"] = torch.randn(batch, math.prod(getattr(config, "conv_stride", (320,))) * (length + 2))
    elif "input_ids" in params:
        out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if "pixel_values" in params:
        out["pixel_values"] = _image(config, batch)
        if not getattr(config, "text_config", None):
            out.pop("input_ids", None), out.pop("attention_mask", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        out["decoder_input_ids"] = ids[:, : max(1, length // 2)]
    return out


#: What compaction does with a head its masks prune only in part (the seeds' workflow restores it).
PARTIAL_HEADS = ("keep", "restore", "prune")


def compact_hf_(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, *,
                example_inputs: Any = None, partial_heads: str = "keep",
                original: Mapping[str, torch.Tensor] | None = None) -> None:
    """Remove every head and FFN neuron of a Hugging Face ``model`` that ``masks`` prune, through
    :func:`slimtorch.compact_` (which bakes the remaining masked weights to zero and checks that the
    result computes what the masked model does, restoring the model otherwise).

    With ``masks=None`` the masks applied to the model (``apply_masks_``) are used; ``example_inputs``
    default to :func:`example_inputs_for`. Records the pruned heads in ``model.slimtorch_compaction``
    and the kept sizes in ``model.config``.

    ``partial_heads`` says what becomes of an attention head the masks prune only in part (a head whose
    output they do not zero): ``"keep"`` it with its masked weights at zero, ``"restore"`` it whole (its
    masks dropped, its weights as in ``original``, the state dict from before masking, which a model that
    carries applied masks needs: their zeros are in its weights) or ``"prune"`` it whole
    (:func:`resolve_partial_heads`).
    """
    masks = dict(masks) if masks is not None else {}
    if is_masked(model):
        masks = {**get_masks(model), **masks}
    if partial_heads != "keep":
        resolved = resolve_partial_heads(model, masks, partial_heads)
        with _restored_on_failure(model):
            _restore_weights_(model, masks, resolved, original)
            masks = resolved
            _compact(model, masks, example_inputs)
        return
    _compact(model, masks, example_inputs)


def _compact(model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs: Any) -> None:
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    compact_(model, masks, example_inputs=inputs)


@contextmanager
def _restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Undo the weights and masks a restore wrote when compaction then fails (compaction undoes its own)."""
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_masks = get_masks(model)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in values and param.shape == values[name].shape:
                    param.copy_(values[name])
        if old_masks:
            apply_masks_(model, old_masks)
        raise


def _restore_weights_(model: nn.Module, masks: Mapping[str, torch.Tensor], resolved: Mapping[str, torch.Tensor],
                      original: Mapping[str, torch.Tensor] | None) -> None:
    """Give the entries ``resolved`` keeps but ``masks`` pruned their values from ``original`` (checked whole
    first); a masked model gets the resolved masks."""
    params = dict(model.named_parameters())
    grown = {n: resolved[n].bool() & ~masks[n].to(resolved[n].device).bool() for n in resolved if n in masks}
    grown = {n: g for n, g in grown.items() if bool(g.any())}
    if grown and is_masked(model):
        if original is None:
            raise ConfigError(f"restoring partly masked heads needs their weights from before masking (the applied "
                              f"masks zeroed them, e.g. in {sorted(grown)[0]!r}): pass original=<the unpruned "
                              "model's state_dict()>, or compact with partial_heads='keep' or 'prune'")
        for name in grown:
            if name not in original or tuple(original[name].shape) != tuple(params[name].shape):
                raise ConfigError(f"original has no {name!r} of shape {tuple(params[name].shape)}; pass the "
                                  "state_dict() of this model before it was masked")
        with torch.no_grad():
            for name, mask in grown.items():
                value = original[name].to(device=params[name].device, dtype=params[name].dtype)
                params[name].copy_(torch.where(mask.to(value.device), value, params[name].detach()))
    if is_masked(model):
        apply_masks_(model, {n: m for n, m in resolved.items() if n in get_masks(model)})


def _unit_state(spec: BlockSpec, name: str, masks: Mapping[str, torch.Tensor], unit: int) -> str:
    """``"pruned"`` (one way of zeroing the head is fully masked), ``"partial"`` or ``"whole"``."""
    def kept(s: Slice) -> torch.Tensor | None:
        mask = masks.get(f"{name}.{s.param}" if name else s.param)
        return None if mask is None else _unit_view(mask, s)[s.positions(unit // spec.group if s.kv else unit)]

    if any(all((k := kept(s)) is not None and not bool(k.any()) for s in way) for way in spec.zeroing):
        return "pruned"
    slices = [kept(s) for s in (*spec.producers, *spec.consumers) if not s.kv]
    return "partial" if any(k is not None and not bool(k.all()) for k in slices) else "whole"


def resolve_partial_heads(model: nn.Module, masks: Mapping[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """``masks`` with every attention head they prune only in part restored whole (``mode="restore"``: its
    entries kept) or pruned whole (``"prune"``: as :func:`unit_masks` prunes it), as the seeds' workflow
    does after movement pruning. Heads they prune whole and all other masks stay as they are. Pure.

        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                             intermediate_size=64))
        >>> masks = unit_masks(bert, {"encoder.layer.0.attention": [1]})
        >>> masks["encoder.layer.0.attention.self.query.weight"][16:18] = False   # two rows of head 2
        >>> restored = resolve_partial_heads(bert, masks, "restore")
        >>> bool(restored["encoder.layer.0.attention.self.query.weight"][16:24].all())
        True
        >>> [bool(restored["encoder.layer.0.attention.self.value.weight"][8 * h].any()) for h in range(4)]
        [True, False, True, True]
    """
    if mode not in PARTIAL_HEADS:
        raise ConfigError(f"partial_heads must be one of {list(PARTIAL_HEADS)}, got {mode!r}")
    out = {n: m.bool().clone() for n, m in masks.items()}
    if mode == "keep":
        return out
    for name, spec in find_blocks(model).items():
        if spec.kind != "attention":
            continue
        states = [_unit_state(spec, name, out, unit) for unit in range(spec.units)]
        partial = [u for u, state in enumerate(states) if state == "partial"]
        if mode == "prune" and partial:
            pruned = [u for u, state in enumerate(states) if state == "pruned"]
            whole = unit_masks(model, {name: [*pruned, *partial]})
            out.update({k: out[k] & m if k in out else m for k, m in whole.items()})
        elif partial:
            _restore_units(spec, name, out, partial)
    return out


def _restore_units(spec: BlockSpec, name: str, masks: dict[str, torch.Tensor], units: list[int]) -> None:
    """Keep every entry of ``units`` (and of the key/value heads they read) in ``masks``, in place."""
    for s in (*spec.producers, *spec.consumers):
        key = f"{name}.{s.param}" if name else s.param
        if key not in masks:
            continue
        view = _unit_view(masks[key], s)  # (units * width, rest...) shares memory with the mask
        for unit in sorted({u // spec.group for u in units} if s.kv else set(units)):
            view[s.positions(unit)] = True


def unit_masks(model: nn.Module, units: Mapping[str, Iterable[int]]) -> dict[str, torch.Tensor]:
    """Masks that prune whole units: ``{block name: [unit indices]}`` -> for an attention block, the query,
    key and value rows and output-projection columns of those heads (key/value rows only when their
    whole group goes); for an FFN block, the neurons' rows in the first layer(s) and columns in the last."""
    specs = find_blocks(model)
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name, chosen in units.items():
        if name not in specs:
            raise NoMatchError(f"{name!r} is no attention or FFN block of the model; {closest(name, specs)}")
        spec, chosen = specs[name], sorted(set(chosen))
        if any(not 0 <= u < spec.units for u in chosen):
            raise ConfigError(f"unit indices of {name!r} must be in 0..{spec.units - 1}, got {chosen}")
        kv_gone = [g for g in range(spec.kv_units) if all(g * spec.group + h in chosen for h in range(spec.group))]
        for s in (*spec.producers, *spec.consumers):
            key = f"{spec.prefix}.{s.param}" if spec.prefix else s.param
            mask = masks.setdefault(key, torch.ones_like(params[key], dtype=torch.bool))
            for unit in (kv_gone if s.kv else chosen):
                _unit_view(mask, s)[s.positions(unit)] = False
    return masks


def _unit_view(mask: torch.Tensor, s: Slice) -> torch.Tensor:
    """``mask`` with ``s``'s dim first (for an expert's slice, in that expert's part): a view of it."""
    dim = s.dim
    if s.at is not None:
        mask = mask.select(*s.at)
        dim -= s.at[0] < s.dim
    return mask.movedim(dim, 0)  # (units * width, rest...)


def format_pruned_heads(pruned: Mapping[str, list[int]], layer_names: Iterable[str]) -> list[str]:
    """Lines ``layer 0 prune 4 head: [2, 4, 9, 11]`` for every attention block, in order (as the seeds
    print them)."""
    return [f"layer {i} prune {len(pruned.get(n, []))} head: {pruned.get(n, [])}" for i, n in enumerate(layer_names)]


AFTER_COMPACTION.append(after_compaction_)
