"""Quantization behind one API: int8 (dynamic, static, QAT), fp16/bf16, int4 and 1-bit weights, and
fake-quantized training at any bit width (min/max QAT and PTQ, DoReFa, BNN, LSQ) from NNI-style config lists.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, quantize
    >>> q = quantize(nn.Sequential(nn.Linear(8, 4)), QuantConfig(method="dynamic_int8"))
    >>> q.slimtorch_quantization["kernels"]
    'real'

Every quantized model says whether real low-bit kernels compute it or whether the low-bit values are
only stored and expanded to float (:func:`quant_info`); ``benchmarks/quantize.py`` measures each method
against fp32 in one run, slower ones included.
"""

from slimtorch.quant import methods as _methods  # noqa: F401  (registers the built-in methods)
from slimtorch.quant import simulated as _simulated  # noqa: F401  (registers the fake-quantization methods)
from slimtorch.quant.api import convert_qat, quantize, quantize_, select_layers, sqnr
from slimtorch.quant.config import (
    QUANT_ATTR,
    QuantConfig,
    QuantInfo,
    QuantMethod,
    quant_info,
    quant_methods,
    register_quant_method,
)
from slimtorch.quant.fakequant import calibrating
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear
from slimtorch.quant.targets import QuantTarget, TensorQuant, parse_quant_targets

__all__ = [
    "QUANT_ATTR",
    "LowBitConv2d",
    "LowBitLinear",
    "QuantConfig",
    "QuantInfo",
    "QuantMethod",
    "QuantTarget",
    "TensorQuant",
    "calibrating",
    "convert_qat",
    "parse_quant_targets",
    "quant_info",
    "quant_methods",
    "quantize",
    "quantize_",
    "register_quant_method",
    "select_layers",
    "sqnr",
]
