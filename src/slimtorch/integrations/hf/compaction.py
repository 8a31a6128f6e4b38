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

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.compact import compact_
from slimtorch.compact.compact import AFTER_COMPACTION
from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.integrations.hf.rules import attention_layout, slice_params_
from slimtorch.integrations.hf.units import BlockSpec, Slice, find_blocks
from slimtorch.masks import COMPACTION_ATTR, apply_masks_, get_masks, is_masked

__all__ = [
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

#: Config attribute holding the kept sizes of every compacted block (read back by the loader).
CONFIG_KEY = "slimtorch_blocks"


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


def _positions(s: Slice, unit: int) -> slice:
    start = s.offset + unit * s.width
    return slice(start, start + s.width)


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


def _sync_config_(model: nn.Module, specs: Mapping[str, BlockSpec], record: dict[str, dict]) -> None:
    """Record every block's current sizes in the config, and set the config's own size keys where every
    block of a kind agrees (then plain ``from_pretrained`` rebuilds the right shapes)."""
    config = model.config
    for name, spec in specs.items():
        record.setdefault(name, {}).update(units=spec.units, kv_units=spec.kv_units)
    setattr(config, CONFIG_KEY, record)
    for kind in ("attention", "ffn"):
        kind_specs = [s for s in specs.values() if s.kind == kind]
        keys = kind_specs[0].config_keys if kind_specs else {}
        sizes = {(s.units, s.kv_units) for s in kind_specs}
        if not keys or len(sizes) != 1:
            continue
        units, kv_units = sizes.pop()
        update = {keys["units"]: units}
        if "kv_units" in keys:
            update[keys["kv_units"]] = kv_units or units
        if "width" in keys:
            update[keys["width"]] = kind_specs[0].module.head_dim
        try:  # the config class validates itself (e.g. hidden size a multiple of the head count)
            type(config).from_dict({**config.to_dict(), **update})
        except Exception:  # any refusal: the sizes stay recorded in slimtorch_blocks only
            continue
        for key, value in update.items():
            setattr(config, key, value)


def _block_of(module_name: str, specs: Mapping[str, BlockSpec]) -> str:
    """The block a compacted module belongs to (BERT's heads live in ``<block>.self``)."""
    parent = module_name.rpartition(".")[0]
    return module_name if module_name in specs or parent not in specs else parent


def _kept_heads(module: nn.Module, keeps: Mapping[str, list[int]]) -> list[int] | None:
    """Heads (indices before this compaction) whose query rows the engine kept; None if it kept all."""
    lay = attention_layout(module)
    rows = next((v for k, v in keeps.items() if k.startswith(f"{lay.q.layer}.weight:out:")), None)
    if rows is None:
        return None
    if lay.q.layer == "c_attn":  # fused: every kept head keeps its query, key and value columns, in order
        rows = rows[: len(rows) // 3]
    return sorted({r // lay.head_dim for r in rows})


def after_compaction_(model: nn.Module) -> None:
    """Run by :func:`slimtorch.compact_` after it compacted a model: for a Hugging Face model, record the
    pruned heads (by their original numbers) and the kept sizes in ``model.config`` (``slimtorch_blocks``
    and the config's size keys) and in ``model.slimtorch_compaction["pruned_heads"]``."""
    config = getattr(model, "config", None)
    if config is None:  # (not a Hugging Face model: looking for its blocks would walk every module for nothing)
        return
    specs = find_blocks(model)
    if not specs:
        return
    saved = dict(vars(config))  # (values are replaced, never written into: a shallow copy undoes a failure)
    try:
        _record_blocks_(model, config, specs)
    except BaseException:
        vars(config).clear()
        vars(config).update(saved)
        raise


def _record_blocks_(model: nn.Module, config: Any, specs: Mapping[str, BlockSpec]) -> None:
    info = getattr(model, COMPACTION_ATTR, None) or {}
    record = {k: dict(v) for k, v in (getattr(config, CONFIG_KEY, None) or {}).items()}
    step = (info.get("steps") or [{}])[-1]
    for name, change in step.get("modules", {}).items():
        kept = _kept_heads(model.get_submodule(name), change["keeps"]) if change["kind"] == "hf_attention" else None
        if kept is None:
            continue
        entry = record.setdefault(_block_of(name, specs), {})
        original = entry.setdefault("original", int(config.num_attention_heads))
        alive = [h for h in range(original) if h not in entry.get("pruned", [])]
        entry["pruned"] = sorted(set(entry.get("pruned", [])) | {h for i, h in enumerate(alive) if i not in kept})
    for name, spec in specs.items():
        if spec.kind == "attention":
            record.setdefault(name, {}).setdefault("original", spec.units + len(record[name].get("pruned", [])))
    _sync_config_(model, specs, record)
    info["pruned_heads"] = {n: list(r["pruned"]) for n, r in record.items() if r.get("pruned")}
    setattr(model, COMPACTION_ATTR, info)


def example_inputs_for(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A small batch a Hugging Face model accepts, made from its config: ``pixel_values`` for a vision
    model, else ``input_ids`` (token ids from 1, below the vocabulary size) and an attention mask."""
    config = model.config
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size)}
    ids = torch.arange(batch * length).reshape(batch, length) % (config.vocab_size - 1) + 1  # (batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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
        return None if mask is None else mask.movedim(s.dim, 0)[_positions(s, unit // spec.group if s.kv else unit)]

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
        view = masks[key].movedim(s.dim, 0)  # (units * width, rest...) shares memory with the mask
        for unit in sorted({u // spec.group for u in units} if s.kv else set(units)):
            view[_positions(s, unit)] = True


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


AFTER_COMPACTION.append(after_compaction_)
