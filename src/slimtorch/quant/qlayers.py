"""Layers computed through fake quantizers: :class:`QuantLinear` and :class:`QuantConv1d` / ``2d`` / ``3d``,
and input/output quantizers on any other module (an activation, a pooling layer).

A quantized Linear or convolution keeps the float parameter objects of the layer it replaces (same
state-dict keys ``weight``/``bias``, an optimizer built on the old layer still updates them) and adds
``weight_quantizer``, ``input_quantizer`` and ``output_quantizer`` submodules; other modules get the
input/output quantizers as submodules called by forward hooks. :func:`fake_quantize_layers_` plans every
replacement before making any, so a failure leaves the model as it was.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant.targets import TensorQuant
    >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    >>> plan = {"0": {"weight": TensorQuant(bits=4, symmetric=True)}, "1": {"output": TensorQuant(signed=False)}}
    >>> fake_quantize_layers_(net, plan, "minmax")
    >>> type(net[0]).__name__, sorted(n for n, _ in net[1].named_children())
    ('QuantLinear', ['output_quantizer'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.quant.fakequant import make_quantizer
from slimtorch.quant.targets import TensorQuant

__all__ = ["QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "fake_quantize_layers_", "quantizers_of"]


class _QuantizedLayer:
    """The forward pass shared by the quantized layers: input, weight and output through their quantizers."""

    weight: nn.Parameter
    input_quantizer: nn.Module | None
    weight_quantizer: nn.Module | None
    output_quantizer: nn.Module | None

    def _adopt(self, layer: nn.Module, quantizers: Mapping[str, nn.Module]) -> None:
        self.weight, self.bias = layer.weight, layer.bias  # the same parameters: optimizers and masks keep working
        for kind in ("weight", "input", "output"):
            setattr(self, f"{kind}_quantizer", quantizers.get(kind))
        self.train(layer.training)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        out = self._compute(x, weight)
        return out if self.output_quantizer is None else self.output_quantizer(out)


class QuantLinear(_QuantizedLayer, nn.Linear):
    """A Linear computed through fake quantizers (see the module docstring)."""

    def __init__(self, layer: nn.Linear, quantizers: Mapping[str, nn.Module]) -> None:
        nn.Linear.__init__(self, layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self._adopt(layer, quantizers)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)


def _conv_args(layer: nn.modules.conv._ConvNd) -> tuple[Any, ...]:
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, layer.bias is not None, layer.padding_mode)


class QuantConv1d(_QuantizedLayer, nn.Conv1d):
    """A Conv1d computed through fake quantizers."""

    def __init__(self, layer: nn.Conv1d, quantizers: Mapping[str, nn.Module]) -> None:
        nn.Conv1d.__init__(self, *_conv_args(layer), device="meta")
        self._adopt(layer, quantizers)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """A Conv2d computed through fake quantizers."""

    def __init__(self, layer: nn.Conv2d, quantizers: Mapping[str, nn.Module]) -> None:
        nn.Conv2d.__init__(self, *_conv_args(layer), device="meta")
        self._adopt(layer, quantizers)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv3d(_QuantizedLayer, nn.Conv3d):
    """A Conv3d computed through fake quantizers."""

    def __init__(self, layer: nn.Conv3d, quantizers: Mapping[str, nn.Module]) -> None:
        nn.Conv3d.__init__(self, *_conv_args(layer), device="meta")
        self._adopt(layer, quantizers)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


# Subclasses first: a Conv2d is matched by its own class, never by a base.
_LAYERS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Linear, QuantLinear), (nn.Conv1d, QuantConv1d), (nn.Conv2d, QuantConv2d), (nn.Conv3d, QuantConv3d),
)


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (module.input_quantizer(args[0]), *args[1:])
    return args


def _quantize_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return module.output_quantizer(output)
    return output


def _replacement(layer: nn.Module, quantizers: dict[str, nn.Module]) -> nn.Module | None:
    """The quantized layer replacing ``layer``, or None when hooks on ``layer`` itself do the work."""
    for base, cls in _LAYERS:
        if type(layer) is base:
            return cls(layer, quantizers)
    return None


def fake_quantize_layers_(model: nn.Module, plan: Mapping[str, Mapping[str, TensorQuant]], algorithm: str) -> None:
    """Quantize the tensors ``plan`` names (``{layer: {"weight" | "input" | "output": TensorQuant}}``, from
    :func:`~slimtorch.quant.targets.plan_quant_layers`) with ``algorithm``'s quantizers, in place. Every
    quantizer and replacement is built first: a setting the algorithm refuses leaves the model untouched."""
    built: dict[str, tuple[nn.Module, dict[str, nn.Module], nn.Module | None]] = {}
    for name, specs in plan.items():
        layer = model.get_submodule(name)
        quantizers = {kind: make_quantizer(algorithm, spec, kind=kind) for kind, spec in specs.items()}
        new = _replacement(layer, quantizers)
        if new is None and "weight" in quantizers:
            raise ConfigError(f"layer {name!r} is a {type(layer).__name__}, a subclass of a Linear or convolution with "
                              "its own forward; its weight cannot be quantized without changing what it computes: "
                              "exclude it, or quantize its 'input' / 'output' only")
        built[name] = (layer, quantizers, new)
    for name, (layer, quantizers, new) in built.items():
        device = next(iter(layer.parameters()), torch.empty(0)).device
        for q in quantizers.values():
            q.to(device)
        if new is not None:
            model.set_submodule(name, new)
            continue
        for kind in ("input", "output"):
            if kind in quantizers:
                layer.add_module(f"{kind}_quantizer", quantizers[kind])
        if "input" in quantizers:
            layer.register_forward_pre_hook(_quantize_input)
        if "output" in quantizers:
            layer.register_forward_hook(_quantize_output)


def quantizers_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every fake quantizer of ``model`` by its qualified name (``"fc1.weight_quantizer"``)."""
    suffixes = ("weight_quantizer", "input_quantizer", "output_quantizer")
    return {n: m for n, m in model.named_modules() if n.rpartition(".")[2] in suffixes}
