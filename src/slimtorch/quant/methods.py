"""The built-in quantization methods, one registered function each.

Backends were picked by what ran fastest on a 2-core AVX2 CPU with torch 2.14 and torchao 0.18
(``benchmarks/quantize.py`` prints the comparison):

* int8 (dynamic, static, QAT) uses torch's own ``torch.ao`` quantized modules, which call fbgemm/x86
  int8 kernels in eager mode (2.2-2.7x over fp32 here). torchao 0.18's ``Int8DynamicActivationInt8Weight``
  ran ~25x *slower* than fp32 in eager mode on this CPU and its PT2E flow is only fast after
  ``torch.compile``; ``torch.ao`` is deprecated upstream but is still the fast eager path, so it is
  pinned here and its deprecation warnings are silenced only around our own calls.
* fp16/bf16 use torch's native half-precision kernels (real, but slower than fp32 on CPUs without
  AVX512-FP16/BF16: reported, not hidden).
* int4 and 1-bit weights are simulated (see :mod:`slimtorch.quant.lowbit`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from slimtorch.checks import run_model
from slimtorch.errors import ConfigError, TraceError
from slimtorch.quant.config import QuantConfig, register_quant_method
from slimtorch.quant.lowbit import FakeLowBitConv2d, FakeLowBitLinear, LowBitConv2d, LowBitLinear

__all__ = ["quiet_torch_ao"]

_CONV_LINEAR = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """torch.ao warns on every call that it is deprecated (see the module docstring for why we pin it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        yield


def _engine() -> str:
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm", "qnnpack", "onednn"):
        raise ConfigError(
            f"torch's quantized engine is {engine!r}; int8 needs one of {torch.backends.quantized.supported_engines} "
            "(set torch.backends.quantized.engine = 'x86' on x86, 'qnnpack' on ARM)"
        )
    return engine


@register_quant_method(
    "dynamic_int8", backend="torch.ao dynamic (fbgemm/x86)", kernels="real", bits=(8, 8), in_place=True, cpu_only=True,
    layer_types=("Linear", "Embedding"),
    note="Linear: activations quantized on each call (7-bit range on x86 to avoid int16 overflow); "
         "Embedding: int8 rows with a scale each (weight-only lookup)",
)
def _dynamic_int8(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    _engine()
    linear = per_channel_dynamic_qconfig if config.per_channel else default_dynamic_qconfig
    spec = {name: float_qparams_weight_only_qconfig if isinstance(model.get_submodule(name), nn.Embedding)
            else linear for name in layers}
    with quiet_torch_ao():
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    for name in layers:
        layer = model.get_submodule(name)
        if "Embedding" in type(layer).__name__:
            layer.register_forward_pre_hook(_contiguous_indices)
    return model


def _contiguous_indices(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """torch.ao's int8 embedding lookup refuses strided indices, which float nn.Embedding takes (Hugging
    Face models slice their position and token-type ids out of a buffer)."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def _qconfig_mapping(config: QuantConfig, layers: tuple[str, ...], *, qat: bool) -> Any:
    """Whole graph (fusions, quantized ReLU/pooling) unless the config names layers; exclusions stay float."""
    from torch.ao.quantization import QConfigMapping, get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    engine = _engine()
    if not (config.op_types or config.op_names):
        mapping = get_default_qat_qconfig_mapping(engine) if qat else get_default_qconfig_mapping(engine)
        for name in config.exclude_op_names:
            mapping.set_module_name(name, None)
        return mapping
    qconfig = get_default_qat_qconfig_mapping(engine) if qat else get_default_qconfig_mapping(engine)
    mapping = QConfigMapping()
    for name in layers:
        mapping.set_module_name(name, qconfig.global_qconfig)
    return mapping


def _as_args(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, dict):
        raise TraceError(
            "static/QAT int8 traces the model with torch.fx from positional inputs, got keyword inputs "
            f"{sorted(batch)}; use method='dynamic_int8' (no tracing) or export to ONNX and quantize_onnx"
        )
    return batch if isinstance(batch, tuple) else (batch,)


def _trace(prepare: Any, model: nn.Module, mapping: Any, example: tuple[Any, ...]) -> nn.Module:
    try:
        with quiet_torch_ao():
            return prepare(model, mapping, example)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as err:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} for static int8 ({type(err).__name__}: {err}); "
            "use method='dynamic_int8' (no tracing needed), or export the float model with export_onnx and "
            "quantize it with quantize_onnx(..., QuantConfig(method='static_int8'), calibration=...)"
        ) from None


@register_quant_method(
    "static_int8", backend="torch.ao FX (fbgemm/x86)", kernels="real", bits=(8, 8), in_place=False, cpu_only=True,
    layer_types=_CONV_LINEAR,
    note="activation scales fixed from calibration batches; conv/linear fused with ReLU",
)
def _static_int8(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Iterable[Any]) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    first, rest = _peek(batches, "static_int8 needs calibration=<iterable of model inputs>")
    with torch.no_grad():
        run_model(model.eval(), first, "static_int8 calibration batch 0")  # the float model first: a clear error
    prepared = _trace(prepare_fx, model, _qconfig_mapping(config, layers, qat=False), _as_args(first))
    with torch.no_grad():
        for index, batch in enumerate(itertools.chain([first], rest)):
            run_model(prepared, batch, f"static_int8 calibration batch {index}")  # observers record ranges
    with quiet_torch_ao():
        return convert_fx(prepared)


@register_quant_method(
    "qat_int8", backend="torch.ao FX fake quant (fbgemm/x86 after convert_qat)", kernels="simulated", cpu_only=True,
    bits=(8, 8), in_place=False, layer_types=_CONV_LINEAR,
    note="fake-quantized for training (straight-through gradients); convert_qat makes it real int8",
)
def _qat_int8(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Iterable[Any]) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    first, _ = _peek(batches, "qat_int8 traces the model: pass example_inputs=")
    with torch.no_grad():
        run_model(model.eval(), first, "qat_int8 example_inputs")
    return _trace(prepare_qat_fx, model.train(), _qconfig_mapping(config, layers, qat=True), _as_args(first))


def _peek(batches: Iterable[Any] | None, need: str) -> tuple[Any, Iterator[Any]]:
    it = iter(batches if batches is not None else ())
    try:
        return next(it), it
    except StopIteration:
        raise ConfigError(f"no input batches given (or an empty iterable): {need}") from None


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], *, dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _cast_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    # Neighbouring float32 layers (norms, activations, the caller) keep receiving float32.
    return output.float() if isinstance(output, torch.Tensor) and output.is_floating_point() else output


def _cast(model: nn.Module, layers: tuple[str, ...], dtype: torch.dtype) -> nn.Module:
    for name in layers:
        layer = model.get_submodule(name)
        layer.to(dtype)
        layer.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=dtype))
        layer.register_forward_hook(_cast_output)
    return model


_HALF_NOTE = "torch's native {} kernels; CPUs without AVX512-{}/AMX run them slower than fp32"


@register_quant_method(
    "fp16", backend="torch native float16", kernels="real", bits=(16, 16), in_place=True,
    layer_types=_CONV_LINEAR, note=_HALF_NOTE.format("float16", "FP16"),
)
def _fp16(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _cast(model, layers, torch.float16)


@register_quant_method(
    "bf16", backend="torch native bfloat16", kernels="real", bits=(16, 16), in_place=True,
    layer_types=_CONV_LINEAR, note=_HALF_NOTE.format("bfloat16", "BF16"),
)
def _bf16(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _cast(model, layers, torch.bfloat16)


def _swap_low_bit(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], codec: str, *,
                  fake: bool = False) -> nn.Module:
    # Build every replacement before swapping any, so a layer that cannot be packed leaves the model intact.
    new = {}
    for name in layers:
        layer = model.get_submodule(name)
        conv = isinstance(layer, nn.Conv2d)
        cls = (FakeLowBitConv2d if conv else FakeLowBitLinear) if fake else (LowBitConv2d if conv else LowBitLinear)
        try:
            new[name] = cls(layer, codec=codec, group_size=config.group_size)
        except ConfigError as err:
            raise ConfigError(f"layer {name!r}: {err}; pick a group_size dividing it or exclude the layer") from None
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return model


@register_quant_method(
    "int4_weight", backend="slimtorch packed int4 (dequantized per call)", kernels="simulated", bits=(4, None),
    in_place=True, layer_types=("Linear", "Conv2d"), default_op_types=("Linear",),
    note="4-bit storage; the matmul runs in fp32 after unpacking, so it is slower than fp32",
)
def _int4_weight(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _swap_low_bit(model, config, layers, "int4")


@register_quant_method(
    "binary_weight", backend="slimtorch packed 1-bit (dequantized per call)", kernels="simulated", bits=(1, None),
    in_place=True, layer_types=("Linear", "Conv2d"),
    note="1-bit storage (sign x per-channel mean |w|); needs training to keep accuracy; fp32 compute",
)
def _binary_weight(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _swap_low_bit(model, config, layers, "binary")



_QAT_NOTE = "float weights train through {} fake quantization (straight-through gradients); convert_qat packs them"


@register_quant_method(
    "qat_int4_weight", backend="slimtorch fake quant", kernels="simulated", bits=(4, None), in_place=True,
    layer_types=("Linear", "Conv2d"), default_op_types=("Linear",), note=_QAT_NOTE.format("int4"),
)
def _qat_int4_weight(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _swap_low_bit(model, config, layers, "int4", fake=True)


@register_quant_method(
    "qat_binary_weight", backend="slimtorch fake quant", kernels="simulated", bits=(1, None), in_place=True,
    layer_types=("Linear", "Conv2d"), note=_QAT_NOTE.format("1-bit"),
)
def _qat_binary_weight(model: nn.Module, config: QuantConfig, layers: tuple[str, ...], batches: Any) -> nn.Module:
    return _swap_low_bit(model, config, layers, "binary", fake=True)
