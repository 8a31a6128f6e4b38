"""The quantization entry points: :func:`quantize` (pure), :func:`quantize_` (in place), :func:`convert_qat`.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, quant_info, quantize, sqnr
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    >>> x = torch.randn(16, 64)
    >>> q = quantize(model, QuantConfig(method="dynamic_int8"))
    >>> quant_info(q).describe()
    'dynamic_int8 (w8a8): real kernels (torch.ao dynamic (fbgemm/x86)), 2 layers'
    >>> sqnr(model(x), q(x)) > 25        # signal-to-quantization-noise ratio in dB
    True
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_materialized, check_module, model_devices
from slimtorch.errors import ConfigError
from slimtorch.masks import COMPACTION_ATTR, apply_masks_, get_masks, remove_masks_
from slimtorch.quant.batches import model_inputs
from slimtorch.quant.config import QUANT_ATTR, QuantConfig, QuantInfo, QuantMethod, get_method, quant_info
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear
from slimtorch.quant.methods import quiet_torch_ao
from slimtorch.quant.targets import plan_quant_layers
from slimtorch.select import select_layers as select_layers_by
from slimtorch.select import type_names

__all__ = ["convert_qat", "quantize", "quantize_", "select_layers", "sqnr"]


def select_layers(model: nn.Module, config: QuantConfig) -> tuple[str, ...]:
    """Names of the layers ``config`` quantizes, in model order (pure). A selector that matches nothing,
    or a selected layer the method cannot quantize, is an error; nothing is skipped silently."""
    spec = config.spec
    if spec.defaults is not None:
        return tuple(plan_quant_layers(model, config.quant_targets()))
    chosen = select_layers_by(
        model,
        op_types=config.op_types or spec.default_op_types,
        op_names=config.op_names,
        exclude_op_names=config.exclude_op_names,
    )
    for name, layer in chosen.items():
        if not type_names(layer) & set(spec.layer_types):
            raise ConfigError(
                f"{config.method} cannot quantize layer {name!r} ({type(layer).__name__}); it handles "
                f"{list(spec.layer_types)}: exclude the layer with exclude_op_names or choose op_types"
            )
    if not chosen:
        raise ConfigError(f"the config selects no layer of the model for {config.method}: {config.to_dict()}")
    return tuple(chosen)


def _check_call(model: nn.Module, config: QuantConfig, what: str) -> None:
    """A float nn.Module with real weights on a device the method runs on, and a QuantConfig."""
    check_module(model, what)
    if not isinstance(config, QuantConfig):
        fix = "QuantConfig.from_dict(config)" if isinstance(config, Mapping) else "QuantConfig(method='dynamic_int8')"
        raise ConfigError(f"{what} takes a QuantConfig, got a {type(config).__name__} ({config!r}); pass {fix}")
    check_materialized(model, what)
    devices = sorted({d.type for d in model_devices(model)} - {"cpu"})
    if config.spec.cpu_only and devices:
        raise ConfigError(f"{config.method} runs on torch.ao's CPU kernels only, but the model is on {devices}; "
                          "move it with model.cpu() first (or use fp16/bf16/int4_weight on an accelerator)")
    info = quant_info(model)
    if info is not None:
        raise ConfigError(
            f"the model is already quantized ({info.describe()}); quantize the float model instead"
        )


def _check_weights(model: nn.Module, layers: tuple[str, ...]) -> None:
    """Non-finite weights would give NaN scales: every quantized value of the layer would be garbage."""
    for name in layers:
        for key, param in model.get_submodule(name).named_parameters(recurse=False):
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise ConfigError(f"layer {name!r} holds NaN or infinite values in {key!r}; quantization would "
                                  "turn them into garbage scales: fix or re-train the model, or exclude the layer")


def _apply_keeping_masks(model: nn.Module, spec: QuantMethod, config: QuantConfig, layers: tuple[str, ...],
                         batches: Any) -> nn.Module:
    """``spec.apply`` on a model whose selected layers may carry masks. The methods replace those layers
    (torch.ao copies a layer's hooks but not its mask buffers, so the replacement could not even run): the
    masks are baked into the weights first, then put back wherever the result still holds the same float
    parameter (fp16, bf16, the layers of quantization-aware training), so that training keeps the pruned
    weights at zero. A failure puts them back on ``model``."""
    masks = {n: m for n, m in get_masks(model).items() if n.rpartition(".")[0] in layers}
    for name in {n.rpartition(".")[0] for n in masks}:
        remove_masks_(model.get_submodule(name))
    try:
        result = spec.apply(model, config, layers, batches)
    except BaseException:
        apply_masks_(model, masks)
        raise
    params = dict(result.named_parameters())
    kept = {n: m for n, m in masks.items()
            if n in params and params[n].is_floating_point() and params[n].shape == m.shape}
    if kept:
        apply_masks_(result, kept)
    return result


def _bits(spec: QuantMethod, config: QuantConfig) -> tuple[int, int | None]:
    """(weight bits, activation bits or None) the model really has: from the config list where there is one
    (the widest setting; float weights count as 32 bits)."""
    if spec.defaults is None:
        return spec.weight_bits, spec.activation_bits
    targets = [t for t in config.quant_targets() if not t.exclude]
    weights = [t.weight.bits for t in targets if t.weight is not None]
    activations = [s.bits for t in targets for s in (t.input, t.output) if s is not None]
    return max(weights, default=32), max(activations, default=None)


def _attach(model: nn.Module, spec: QuantMethod, config: QuantConfig, layers: tuple[str, ...],
            source: nn.Module) -> None:
    weight_bits, activation_bits = _bits(spec, config)
    info = QuantInfo(spec.name, spec.backend, spec.kernels, weight_bits, activation_bits, layers, spec.note)
    # The config travels with the record: saving and loading (slimtorch.quant.saving) rebuild the layers from it.
    setattr(model, QUANT_ATTR, {**info.to_dict(), "config": config.to_dict()})
    # Graph-rebuilding methods return a new module: what compaction recorded must survive quantization.
    compaction = getattr(source, COMPACTION_ATTR, None)
    if compaction and model is not source:
        setattr(model, COMPACTION_ATTR, copy.deepcopy(compaction))


def quantize(
    model: nn.Module,
    config: QuantConfig,
    *,
    calibration: Iterable[Any] | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """A quantized copy of ``model``; ``model`` itself is not touched.

    ``calibration`` is an iterable of model inputs (a tensor, a tuple of positional inputs or a dict of
    keyword inputs per batch), e.g. ``(x for x, _ in loader)``; ``static_int8`` needs it. For a model that
    takes one input, ``(input, label)`` batches straight from a data loader are taken as the input alone;
    a batch of the wrong shape, with NaN or infinite values, or that is not made of tensors is an error. ``qat_int8``
    needs ``example_inputs`` to trace the model. The result carries a :class:`QuantInfo`
    (:func:`quant_info`) saying which backend runs it and whether its low-bit kernels are real.
    """
    _check_call(model, config, "quantize")
    spec = config.spec
    layers = select_layers(model, config)
    _check_weights(model, layers)
    batches = calibration if calibration is not None else (None if example_inputs is None else [example_inputs])
    if batches is not None:
        batches = model_inputs(model, batches, "calibration" if calibration is not None else "example_inputs")
    was_training = model.training
    result = _apply_keeping_masks(copy.deepcopy(model), spec, config, layers, batches)
    if spec.in_place:
        result.train(was_training)
    _attach(result, spec, config, layers, model)
    return result


def quantize_(model: nn.Module, config: QuantConfig, *, calibration: Iterable[Any] | None = None) -> None:
    """Quantize ``model`` in place (methods that swap layers: dynamic_int8, fp16, bf16, int4_weight,
    binary_weight, and the fake-quantization methods). Every replacement is planned before any is made, so a
    failure leaves the model intact. ``calibration`` (model inputs, as for :func:`quantize`) is what
    ``ptq_minmax`` sets its ranges from; the other fake-quantization methods start from its first batch.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, quantize_
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> quantize_(model, QuantConfig(method="int4_weight", group_size=64))
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: layer '2': rows of 32 weights (fan-in) are not a multiple of group_size=64; ...
    >>> type(model[0]).__name__          # the failure changed nothing
    'Linear'
    >>> quantize_(model, QuantConfig(method="int4_weight", group_size=32))
    >>> type(model[0]).__name__, type(model[2]).__name__
    ('LowBitLinear', 'LowBitLinear')
    """
    _check_call(model, config, "quantize_")
    spec = config.spec
    if not spec.in_place:
        raise ConfigError(
            f"{config.method} rebuilds the model's graph, so it cannot change the model in place; "
            f"use model = slimtorch.quantize(model, QuantConfig(method={config.method!r}), calibration=...)"
        )
    layers = select_layers(model, config)
    _check_weights(model, layers)
    batches = None if calibration is None else model_inputs(model, calibration, "calibration")
    _apply_keeping_masks(model, spec, config, layers, batches)
    _attach(model, spec, config, layers, model)


_CONVERTED = {"qat_int8": "static_int8", "qat_int4_weight": "int4_weight", "qat_binary_weight": "binary_weight"}


def convert_qat(model: nn.Module) -> nn.Module:
    """The deployable model of a quantization-aware-trained one (pure; returns the converted copy, in eval
    mode): ``qat_int8`` becomes real int8 (``static_int8``), ``qat_int4_weight`` / ``qat_binary_weight``
    become packed 4-/1-bit layers computing exactly what training simulated.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, convert_qat, quant_info, quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    >>> qat = quantize(net, QuantConfig(method="qat_int8"), example_inputs=torch.randn(2, 3, 8, 8))
    >>> # ... train qat like any model: fake quantization, straight-through gradients ...
    >>> quant_info(convert_qat(qat)).kernels
    'real'
    """
    info = quant_info(model)
    if info is None or info.method not in _CONVERTED:
        got = info.method if info else "a float model"
        raise ConfigError(f"convert_qat takes a model quantized with one of {sorted(_CONVERTED)}, got {got}")
    target = get_method(_CONVERTED[info.method])
    work = copy.deepcopy(model).eval()
    if info.method == "qat_int8":
        from torch.ao.quantization.quantize_fx import convert_fx

        with quiet_torch_ao():
            work = convert_fx(work)
    else:
        # The fake-quantized layers are still Linear/Conv2d: pack them with the post-training method.
        codec = "int4" if info.method == "qat_int4_weight" else "binary"
        for name in info.layers:
            layer = work.get_submodule(name)
            packed = (LowBitConv2d if isinstance(layer, nn.Conv2d) else LowBitLinear)(
                layer, codec=codec, group_size=layer.group_size)
            work.set_submodule(name, packed)
    trained = getattr(model, QUANT_ATTR).get("config") or {"method": info.method, "op_names": list(info.layers)}
    config = QuantConfig.from_dict({**trained, "method": target.name})
    _attach(work, dataclasses.replace(target, note=f"{target.note}; after quantization-aware training"), config,
            info.layers, model)
    return work


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(|ref| / |ref - approx|)`` (inf when equal).
    Each 6 dB is about one bit: 8-bit weights and activations give roughly 30-40 dB on a small MLP.

    >>> import torch
    >>> round(sqnr(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.0])), 1)
    20.0
    """
    ref = reference.detach().float()
    noise = (ref - approximation.detach().float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
