"""LoRA layers for the layer types PEFT cannot adapt by itself, written to PEFT's conventions for custom
layers (a ``LoraLayer`` holding ``lora_A[adapter]`` / ``lora_B[adapter]``) and handed to PEFT per call through
``LoraConfig._register_custom_module`` (https://huggingface.co/docs/peft/developer_guides/custom_models):

- :class:`~slimtorch.quant.LowBitLinear` (4-/1-bit weights): PEFT's LoRA ``Linear`` as it is, told the layer's
  sizes and device; only merging into the packed weight is impossible (``merge_lora_`` builds a float layer).
- :class:`~slimtorch.quant.LowBitConv2d` and subclasses of ``nn.Conv2d`` (PEFT builds a conv's adapters with the
  base layer's own class, whose constructor or forward may differ): PEFT's LoRA ``Conv2d`` with adapters built
  as plain ``nn.Conv2d`` from the weight's shape, ``A``: a conv with the base's kernel to ``r`` channels, ``B``:
  a 1x1 conv back to the outputs.

PEFT is optional, so the classes are made the first time they are asked for.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear

__all__ = ["custom_lora_layers", "lora_layer_classes"]


def custom_lora_layers(targets: Iterable[nn.Module]) -> dict[type, type]:
    """PEFT's custom-module mapping (base layer type -> LoRA layer type) for those of ``targets`` that need one."""
    classes = lora_layer_classes()
    found: dict[type, type] = {}
    for module in targets:
        if isinstance(module, LowBitLinear):
            found[type(module)] = classes["low_bit_linear"]
        elif isinstance(module, LowBitConv2d) or (isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d):
            found[type(module)] = classes["conv2d"]
    return found


def _device_and_dtype(base: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Where the adapters go: the device of the base layer's first tensor, packed ones included (PEFT looks
    only at ``weight`` / ``qweight``); its dtype when it is a float tensor."""
    tensor = next(itertools.chain(base.parameters(), base.buffers()), None)
    if tensor is None:
        return None, None
    return tensor.device, tensor.dtype if tensor.is_floating_point() else None


def _no_merge(layer: nn.Module) -> None:
    raise ConfigError(f"the adapter of a {type(layer.base_layer).__name__} cannot be merged into its packed "
                      "weight; slimtorch.lora.merge_lora_(model) replaces the layer by a float one instead")


@functools.cache
def lora_layer_classes() -> dict[str, type]:
    """The LoRA layer classes of :func:`custom_lora_layers` (made once: they subclass PEFT's layers)."""
    from peft.tuners.lora.layer import Conv2d, Linear, LoraLayer

    return {"low_bit_linear": _low_bit_linear(Linear), "conv2d": _shape_conv2d(Conv2d, LoraLayer)}


def _low_bit_linear(linear: type) -> type:
    class LowBitLoRALinear(linear):
        """PEFT's LoRA Linear over a low-bit Linear."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
            return _device_and_dtype(base_layer)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            _no_merge(self)

    return LowBitLoRALinear


def _shape_conv2d(conv2d: type, lora_layer: type) -> type:
    class ShapeLoRAConv2d(conv2d):
        """PEFT's LoRA Conv2d with plain ``nn.Conv2d`` adapters sized from the base weight's shape."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1,
                     **kwargs: Any) -> None:
            nn.Module.__init__(self)
            lora_layer.__init__(self, base_layer)
            self._active_adapter, self._kernel_dim = adapter_name, 4
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            shape = _weight_shape(module)
            return shape[1], shape[0]

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
            return _device_and_dtype(base_layer)

        def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
            _add_conv_adapter(self, adapter_name, r, lora_alpha, config)

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight  # (r, in, kh, kw), (out, r, 1, 1)
            return torch.einsum("or,rikl->oikl", b.flatten(1), a) * self.scaling[adapter]  # (out, in, kh, kw)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            if isinstance(self.base_layer, LowBitConv2d):
                _no_merge(self)
            super().merge(safe_merge, adapter_names)

    return ShapeLoRAConv2d


def _add_conv_adapter(layer: Any, name: str, r: int, lora_alpha: float, config: Any) -> None:
    """What PEFT's ``update_layer`` does for a conv, with the sizes read from the weight's shape."""
    base = layer.get_base_layer()
    out_c, in_c, *kernel = _weight_shape(base)
    layer.r[name], layer.lora_alpha[name] = r, lora_alpha
    layer.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
    layer.lora_A[name] = nn.Conv2d(in_c, r, tuple(kernel), base.stride, base.padding, base.dilation, bias=False,
                                   padding_mode=getattr(base, "padding_mode", "zeros"))
    layer.lora_B[name] = nn.Conv2d(r, out_c, 1, bias=False)
    layer.lora_bias[name] = layer.use_dora[name] = False
    layer.use_rslora[name] = config.use_rslora
    layer.scaling[name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
    layer.reset_lora_parameters(name, config.init_lora_weights)
    layer._move_adapter_to_device_of_base_layer(name)
    layer.set_adapter(layer.active_adapters, inference_mode=config.inference_mode)


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    return module.weight_shape if isinstance(module, LowBitConv2d) else tuple(module.weight.shape)
