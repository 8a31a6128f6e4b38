"""Adding adapters (PEFT's ``inject_adapter_in_model`` on the layers we checked) and merging them into plain
float layers (PEFT's ``get_delta_weight`` per layer)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.compact.layers import SlimMultiheadAttention
from slimtorch.errors import ConfigError, NoMatchError, SlimWarning, closest
from slimtorch.lora.config import ADAPTER, LoRAConfig, require_peft
from slimtorch.lora.custom import custom_lora_layers
from slimtorch.masks import is_masked
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear

__all__ = ["LORA_ATTR", "adapters", "add_lora_", "lora_targets", "merge_lora_", "merged_layer"]

#: Attribute a model with adapters carries: the :class:`LoRAConfig` they were added with, as a dict. (PEFT adds
#: its own, ``peft_config``: ``{"default": peft.LoraConfig}``.)
LORA_ATTR = "slimtorch_lora"
PEFT_ATTR = "peft_config"
_MISSING = object()
LOW_BIT = (LowBitLinear, LowBitConv2d)
LINEAR = (nn.Linear, LowBitLinear)
CONV = (nn.Conv2d, LowBitConv2d)


def adapters(model: nn.Module) -> dict[str, Any]:
    """The model's LoRA layers (PEFT's ``LoraLayer``) by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _matches(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _check_target(model: nn.Module, name: str, module: nn.Module) -> None:
    if not isinstance(module, LINEAR + CONV):
        raise ConfigError(f"LoRA target {name!r} is a {type(module).__name__}; targets must be Linear or Conv2d "
                          "layers (float or low-bit) without an adapter yet")
    if isinstance(module, CONV) and module.groups != 1:
        raise ConfigError(f"LoRA target {name!r}: LoRA on grouped convolutions (groups={module.groups}) is not "
                          "supported; exclude it with exclude_modules")
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention) and not isinstance(parent, SlimMultiheadAttention):
        # torch's attention reads out_proj.weight directly and never calls the layer: an adapter would do nothing
        raise ConfigError(f"LoRA target {name!r} is the output projection of an nn.MultiheadAttention, which uses "
                          "its weight without calling it, so an adapter there would change nothing; target other "
                          "layers, or adapt the model before its attention is compacted (SlimMultiheadAttention "
                          "calls it)")


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The layers ``config`` selects, all checked: a key matching nothing is a NoMatchError naming the closest
    module names; a layer that cannot take an adapter, or a model that already has adapters, a ConfigError."""
    check_module(model, "LoRA")
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"LoRA takes a LoRAConfig, got a {type(config).__name__} ({config!r}); pass "
                          "LoRAConfig.from_dict(config)")
    names = [n for n, _ in model.named_modules() if n]
    for key in (*config.target_modules, *config.exclude_modules):
        if not any(_matches(n, (key,)) for n in names):
            raise NoMatchError(f"LoRA target {key!r} matches no module name; {closest(key, names)}")
    existing = list(adapters(model))
    if existing:
        raise ConfigError(f"the model already has LoRA adapters on {existing[:5]}; LoRA takes a model without an "
                          "adapter yet: merge them first (merge_lora_), or add every target in one call")
    chosen = {n: m for n, m in model.named_modules()
              if n and _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)}
    if not chosen:
        raise NoMatchError(f"every module that target_modules={list(config.target_modules)} matches is excluded by "
                           f"exclude_modules={list(config.exclude_modules)}")
    for name, module in chosen.items():
        _check_target(model, name, module)
    return chosen


def add_lora_(model: nn.Module, config: LoRAConfig) -> None:
    """Wrap each target layer with a LoRA adapter and freeze every other parameter (in place). Targets are
    checked before any layer is wrapped; PEFT wraps exactly those."""
    peft = require_peft("add_lora_")
    targets = lora_targets(model, config)
    peft_config = config.peft_config(tuple(targets))
    custom = custom_lora_layers(targets.values())
    if custom:
        peft_config._register_custom_module(custom)  # PEFT's mapping for the layer types it does not know
    flags = {p: p.requires_grad for p in model.parameters()}
    previous = model.__dict__.get(PEFT_ATTR, _MISSING)  # PEFT replaces it
    try:
        peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
        wrapped = set(adapters(model))
        if wrapped != set(targets):
            raise RuntimeError(f"it adapted {sorted(wrapped ^ set(targets))[:5]} differently from the layers checked")
    except Exception as err:  # put the model back as it was, then say what PEFT refused
        for name, layer in adapters(model).items():
            model.set_submodule(name, layer.get_base_layer())
        for name, module in targets.items():
            model.set_submodule(name, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if previous is not _MISSING:
            setattr(model, PEFT_ATTR, previous)
        elif hasattr(model, PEFT_ATTR):
            delattr(model, PEFT_ATTR)
        raise ConfigError(f"PEFT could not add the adapters: {type(err).__name__}: {err}") from err
    setattr(model, LORA_ATTR, config.to_dict())


def merged_layer(layer: Any) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing what the LoRA layer ``layer`` computes: the base weight
    (dequantized for a low-bit base) plus each active adapter's update, the base's bias and trainability."""
    base = layer.get_base_layer()
    weight = base.dequantized_weight() if isinstance(base, LOW_BIT) else base.weight.detach()
    if not layer.merged:  # (PEFT's own merge may have added the updates to the weight already)
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    if isinstance(base, CONV):  # weight: (out, in, kh, kw); groups are 1 (checked when the adapter was added)
        out = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), base.stride, base.padding,
                        base.dilation, bias=False, padding_mode=getattr(base, "padding_mode", "zeros"), device="meta")
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    trainable = any(p.requires_grad for p in base.parameters(recurse=False)) and not isinstance(base, LOW_BIT)
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=trainable)
    out.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=trainable)
    return out


def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and drop the adapters (in place). A low-bit base becomes a
    float layer holding its dequantized weight plus the update (quantize again afterwards if wanted)."""
    require_peft("merge_lora_")
    check_module(model, "merge_lora_")
    found = adapters(model)
    if not found:
        raise ConfigError("the model has no LoRA adapters to merge; add them with add_lora_ first")
    masked = [name for name, layer in found.items() if is_masked(layer.get_base_layer())]
    if masked:
        warnings.warn(f"merging adds the dense low-rank update to the masked weights of {masked[:5]}: the merged "
                      "layers compute what the adapted model does, but they are no longer sparse and carry no "
                      "masks. To keep the sparsity, keep the adapters unmerged, or apply the masks again "
                      "(apply_masks_) and fine-tune", SlimWarning, stacklevel=2)
    with torch.no_grad():
        merged = {name: merged_layer(layer) for name, layer in found.items()}  # all built before one is swapped
    for name, layer in merged.items():
        model.set_submodule(name, layer)
    for attr in (LORA_ATTR, PEFT_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
