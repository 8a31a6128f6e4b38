"""Compaction of Hugging Face transformers: attention heads and FFN neurons whose output the masks make
exactly zero are physically removed, sizes and the config are updated, and the result saves and loads.

A head (FFN neuron) is removed when its masks make its output zero: its value rows or its columns in
the output projection fully masked (an FFN neuron: its column in the second layer, or its row in the
first when the activation maps 0 to 0). A head that is only partly masked stays, with its masked
weights at zero, exactly as the seeds' workflow does, so the compacted model computes what the masked
one does. With grouped-query attention a key/value head goes when all its query heads go, and every
key/value head keeps the same number of query heads (HF computes the group size once per layer); a
head kept only for that reason is reported with a :class:`~slimtorch.errors.SlimWarning`::

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

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, SlimWarning, closest
from slimtorch.prune.masks import check_masks, get_masks, is_masked, remove_masks_
from slimtorch.report import COMPACTION_ATTR
from slimtorch.transformers.blocks import BlockSpec, Slice, find_blocks

__all__ = [
    "BlockPlan",
    "compact_hf_",
    "format_pruned_heads",
    "plan_hf_compaction",
    "shrink_block_",
    "unit_masks",
]

#: Config attribute holding the kept sizes of every compacted block (read back by the loader).
CONFIG_KEY = "slimtorch_blocks"


@dataclass(frozen=True)
class BlockPlan:
    """What compaction does to one block: the query units (heads / neurons) and key/value heads kept,
    and how many units the masks asked to remove but had to stay."""

    name: str
    kind: str
    units: int
    keep: tuple[int, ...]
    keep_kv: tuple[int, ...] = ()
    kept_against_masks: int = 0

    @property
    def removed(self) -> list[int]:
        return sorted(set(range(self.units)) - set(self.keep))


def _positions(s: Slice, unit: int) -> slice:
    start = s.offset + unit * s.width
    return slice(start, start + s.width)


def _slice_masked(spec: BlockSpec, masks: Mapping[str, torch.Tensor], s: Slice, unit: int) -> bool:
    """True when every entry of ``unit``'s positions in ``s`` is masked (a parameter without a mask is kept)."""
    mask = masks.get(f"{spec.name}.{s.param}" if spec.name else s.param)
    if mask is None:
        return False
    part = mask.bool().movedim(s.dim, 0)[_positions(s, unit)]  # (width, rest...) of this unit
    return not bool(part.any())


def removable_units(spec: BlockSpec, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per query unit, True when the masks make its output exactly zero."""
    out = torch.zeros(spec.units, dtype=torch.bool)
    for unit in range(spec.units):
        for option in spec.zeroing:
            if all(_slice_masked(spec, masks, s, unit // spec.group if s.kv else unit) for s in option):
                out[unit] = True
                break
    return out


def _plan_block(spec: BlockSpec, masks: Mapping[str, torch.Tensor]) -> BlockPlan:
    gone = removable_units(spec, masks)
    if not spec.kv_units:
        keep = [u for u in range(spec.units) if not gone[u]] or [0]  # never empty a block: keep one zero unit
        return BlockPlan(spec.name, spec.kind, spec.units, tuple(keep), (), len(keep) - int((~gone).sum()))
    groups = gone.reshape(spec.kv_units, spec.group)  # (kv heads, query heads per kv head)
    keep_kv = [g for g in range(spec.kv_units) if not groups[g].all()] or [0]
    per_group = max(int((~groups[g]).sum()) for g in keep_kv) or 1
    keep = []
    for g in keep_kv:
        needed = [h for h in range(spec.group) if not groups[g, h]]
        extra = [h for h in range(spec.group) if groups[g, h]][: per_group - len(needed)]  # equal group sizes
        keep.extend(g * spec.group + h for h in sorted(needed + extra))
    return BlockPlan(spec.name, spec.kind, spec.units, tuple(keep), tuple(keep_kv), len(keep) - int((~gone).sum()))


def plan_hf_compaction(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[BlockPlan]:
    """Pure: the heads and FFN neurons :func:`compact_hf_` would keep in every recognised block."""
    check_masks(model, masks)
    return [_plan_block(spec, masks) for spec in find_blocks(model).values()]


def _keep_index(spec: BlockSpec, plan: BlockPlan, param: str, dim: int, size: int) -> torch.Tensor | None:
    """Positions kept along ``dim`` of ``param`` (None when no slice of this block touches it)."""
    slices = [s for s in (*spec.producers, *spec.consumers) if s.param == param and s.dim == dim]
    if not slices:
        return None
    keep = torch.ones(size, dtype=torch.bool, device="cpu")  # explicit: HF may build models under a meta device
    for s in slices:
        kept = set(plan.keep_kv if s.kv else plan.keep)
        for unit in range(spec.kv_units if s.kv else spec.units):
            if unit not in kept:
                keep[_positions(s, unit)] = False
    return keep.nonzero().squeeze(1)


def _sync_layer_sizes(layer: nn.Module) -> None:
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    elif type(layer).__name__ == "Conv1D":  # HF's (in, out) linear
        layer.nx, layer.nf = weight.shape


def shrink_block_(spec: BlockSpec, plan: BlockPlan) -> None:
    """Keep only ``plan``'s units in the block's parameters (slicing rows/columns), then update the size
    attributes of its layers and of the block itself."""
    params = {s.param for s in (*spec.producers, *spec.consumers)}
    for param in sorted(params):
        owner_name, _, attr = param.rpartition(".")
        owner = spec.module.get_submodule(owner_name)
        tensor = getattr(owner, attr)
        new = tensor.detach()
        for dim in range(tensor.dim()):
            index = _keep_index(spec, plan, param, dim, tensor.shape[dim])
            if index is not None:
                new = new.index_select(dim, index.to(new.device))
        setattr(owner, attr, nn.Parameter(new.contiguous(), requires_grad=tensor.requires_grad))
        _sync_layer_sizes(owner)
    spec.set_sizes(spec.module, len(plan.keep), len(plan.keep_kv) or len(plan.keep))


def _update_config_(model: nn.Module, specs: Mapping[str, BlockSpec], plans: list[BlockPlan]) -> None:
    """Record every block's kept sizes in the config, and set the config's own size keys where every
    block of a kind agrees (then plain ``from_pretrained`` rebuilds the right shapes)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    record = dict(getattr(config, CONFIG_KEY, None) or {})
    for plan in plans:
        record[plan.name] = {"units": len(plan.keep), "kv_units": len(plan.keep_kv)}
    setattr(config, CONFIG_KEY, record)
    for kind in ("attention", "ffn"):
        kind_plans = [p for p in plans if p.kind == kind]
        keys = specs[kind_plans[0].name].config_keys if kind_plans else {}
        sizes = {(record[p.name]["units"], record[p.name]["kv_units"]) for p in kind_plans}
        if not keys or len(sizes) != 1:
            continue
        units, kv_units = sizes.pop()
        update = {keys["units"]: units}
        if "kv_units" in keys:
            update[keys["kv_units"]] = kv_units or units
        if "width" in keys:
            update[keys["width"]] = specs[kind_plans[0].name].module.head_dim
        try:  # the config class validates itself (e.g. hidden size a multiple of the head count)
            type(config).from_dict({**config.to_dict(), **update})
        except Exception:  # any refusal: the sizes stay recorded in slimtorch_blocks only
            continue
        for key, value in update.items():
            setattr(config, key, value)


def compact_hf_(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Remove every head and FFN neuron of ``model`` that ``masks`` zero out; bake the remaining masked
    weights to zero. Plans first (pure, checks every mask), then changes the model in place.

    With ``masks=None`` the masks applied to the model (``apply_masks_``) are used. Records what was
    removed in ``model.slimtorch_compaction`` and the kept sizes in ``model.config``.
    """
    masks = dict(masks) if masks is not None else {}
    if is_masked(model):
        masks = {**get_masks(model), **masks}
    specs = find_blocks(model)
    plans = plan_hf_compaction(model, masks)
    against = [p for p in plans if p.kept_against_masks]
    if against:
        warnings.warn("kept units the masks removed, so that every key/value head keeps as many query heads (or a "
                      f"block is not emptied): {[(p.name, p.kept_against_masks) for p in against]}", SlimWarning,
                      stacklevel=2)
    if is_masked(model):
        remove_masks_(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
    for plan in plans:
        if len(plan.keep) < plan.units or len(plan.keep_kv) < (specs[plan.name].kv_units or 0):
            shrink_block_(specs[plan.name], plan)
    _update_config_(model, specs, plans)
    _record_(model, plans)


def _record_(model: nn.Module, plans: list[BlockPlan]) -> None:
    """Update ``model.slimtorch_compaction``: units kept and heads pruned, as indices of the original
    model (a block compacted twice reports the heads it lost in both rounds by their first numbers)."""
    info = dict(getattr(model, COMPACTION_ATTR, None) or {})
    kept = dict(info.get("kept_units", {}))
    pruned = {k: list(v) for k, v in info.get("pruned_heads", {}).items()}
    for plan in plans:
        original = kept.get(plan.name, list(range(plan.units)))
        kept[plan.name] = [original[u] for u in plan.keep]
        if plan.kind == "attention" and plan.removed:
            pruned[plan.name] = sorted(pruned.get(plan.name, []) + [original[u] for u in plan.removed])
    info.update(kept_units=kept, pruned_heads=pruned,
                ffn_kept={p.name: len(p.keep) for p in plans if p.kind == "ffn"})
    setattr(model, COMPACTION_ATTR, info)


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
            key = f"{name}.{s.param}" if name else s.param
            mask = masks.setdefault(key, torch.ones_like(params[key], dtype=torch.bool))
            view = mask.movedim(s.dim, 0)  # (units * width, rest...) shares memory with mask
            for unit in (kv_gone if s.kv else chosen):
                view[_positions(s, unit)] = False
    return masks


def format_pruned_heads(pruned: Mapping[str, list[int]], layer_names: Iterable[str]) -> list[str]:
    """Lines ``layer 0 prune 4 head: [2, 4, 9, 11]`` for every attention block, in order (as the seeds
    print them)."""
    return [f"layer {i} prune {len(pruned.get(n, []))} head: {pruned.get(n, [])}" for i, n in enumerate(layer_names)]
