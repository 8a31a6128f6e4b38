"""LoRA layers: a frozen base layer plus a trainable low-rank update; adding and merging them."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.errors import ConfigError, NoMatchError, SlimWarning, closest
from slimtorch.lora.config import LoRAConfig
from slimtorch.masks import is_masked
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear

__all__ = ["LORA_ATTR", "LoRAConv2d", "LoRALinear", "adapters", "add_lora_", "lora_targets", "merge_lora_"]

#: Attribute a model with adapters carries: the :class:`LoRAConfig` they were added with, as a dict.
LORA_ATTR = "slimtorch_lora"
LINEAR = (nn.Linear, LowBitLinear)
CONV = (nn.Conv2d, LowBitConv2d)


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _LoRA(nn.Module):
    def __init__(self, base: nn.Module, lora_a: nn.Module, lora_b: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B = base, lora_a, lora_b
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling = config.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts exactly at the base model
        self.to(_device(base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def base_weight(self) -> torch.Tensor:
        base = self.base_layer
        return base.dequantized_weight() if isinstance(base, (LowBitLinear, LowBitConv2d)) else base.weight.detach()


class LoRALinear(_LoRA):
    """A frozen Linear (float or low-bit) plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        a = nn.Linear(base.in_features, config.r, bias=False)
        b = nn.Linear(config.r, base.out_features, bias=False)
        super().__init__(base, a, b, config)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in)

    def merged(self) -> nn.Linear:
        base = self.base_layer
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base_weight() + self.delta_weight())
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.to(self.lora_A.weight.device)


class LoRAConv2d(_LoRA):
    """A frozen Conv2d plus a rank-``r`` update: a conv with the base's kernel to ``r`` channels, then 1x1."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        w = base.weight_shape if isinstance(base, LowBitConv2d) else tuple(base.weight.shape)
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        a = nn.Conv2d(w[1], config.r, w[2:], base.stride, base.padding, base.dilation, bias=False)
        b = nn.Conv2d(config.r, w[0], 1, bias=False)
        super().__init__(base, a, b, config)

    def delta_weight(self) -> torch.Tensor:
        # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return torch.einsum("or,rikl->oikl", self.lora_B.weight.flatten(1), self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Conv2d:
        base, w = self.base_layer, self.lora_A.weight
        layer = nn.Conv2d(w.shape[1], self.lora_B.weight.shape[0], w.shape[2:], base.stride, base.padding,
                          base.dilation, bias=base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base_weight() + self.delta_weight())
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.to(w.device)


def _matches(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    check_module(model, "LoRA")
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"LoRA takes a LoRAConfig, got a {type(config).__name__} ({config!r}); pass "
                          "LoRAConfig.from_dict(config)")
    names = [n for n, _ in model.named_modules() if n]
    for key in (*config.target_modules, *config.exclude_modules):
        if not any(_matches(n, (key,)) for n in names):
            raise NoMatchError(f"LoRA target {key!r} matches no module name; {closest(key, names)}")
    chosen = {n: m for n, m in model.named_modules()
              if n and _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)}
    for name, module in chosen.items():
        if not isinstance(module, LINEAR + CONV) or isinstance(module, _LoRA):
            raise ConfigError(f"LoRA target {name!r} is a {type(module).__name__}; targets must be Linear or "
                              "Conv2d layers (float or low-bit) without an adapter yet")
    return chosen


def add_lora_(model: nn.Module, config: LoRAConfig) -> None:
    """Wrap each target layer with a LoRA adapter and freeze every other parameter (in place). Targets are
    checked before any layer is wrapped."""
    targets = lora_targets(model, config)
    wrapped = {n: (LoRAConv2d if isinstance(m, CONV) else LoRALinear)(m, config) for n, m in targets.items()}
    model.requires_grad_(False)
    for name, layer in wrapped.items():
        model.set_submodule(name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    setattr(model, LORA_ATTR, config.to_dict())


def adapters(model: nn.Module) -> dict[str, _LoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRA)}


def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and drop the adapters (in place). A low-bit base becomes a
    float layer holding its dequantized weight plus the update (quantize again afterwards if wanted)."""
    check_module(model, "merge_lora_")
    found = adapters(model)
    if not found:
        raise ConfigError("the model has no LoRA adapters to merge; add them with add_lora_ first")
    masked = [name for name, layer in found.items() if is_masked(layer.base_layer)]
    if masked:
        warnings.warn(f"merging adds the dense low-rank update to the masked weights of {masked[:5]}: the merged "
                      "layers compute what the adapted model does, but they are no longer sparse and carry no "
                      "masks. To keep the sparsity, keep the adapters unmerged, or apply the masks again "
                      "(apply_masks_) and fine-tune", SlimWarning, stacklevel=2)
    merged = {name: layer.merged() for name, layer in found.items()}
    for name, layer in merged.items():
        model.set_submodule(name, layer)
    if hasattr(model, LORA_ATTR):
        delattr(model, LORA_ATTR)

