"""The fake-quantization methods, configured by NNI-style config lists: ``qat_minmax``, ``ptq_minmax``,
``dorefa``, ``bnn`` and ``lsq``.

Each computes in float what its low-bit model would compute (``kernels="simulated"``): the point is to
train (or calibrate) a model that keeps its accuracy at few bits. Only 8-bit models have a fast CPU
kernel to run on afterwards (``static_int8``/``qat_int8``, torch.ao; or ONNX Runtime after export);
``docs/quantization.md`` says which.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, quant_info, quantize
    >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    >>> cfg = QuantConfig(method="lsq", targets=[{"op_types": ["Linear"], "quant_types": ["weight", "input"],
    ...                                           "quant_bits": 4}])
    >>> q = quantize(net, cfg, example_inputs=torch.randn(32, 16))   # the first batch sets the step sizes
    >>> quant_info(q).describe()
    'lsq (w4a4): simulated kernels (slimtorch fake quant), 2 layers'
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimtorch.checks import run_model
from slimtorch.errors import ConfigError
from slimtorch.quant.config import QuantConfig, register_quant_method
from slimtorch.quant.fakequant import calibrating
from slimtorch.quant.qlayers import fake_quantize_layers_
from slimtorch.quant.targets import TensorQuant, plan_quant_layers

__all__: list[str] = []

_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_DEFAULT_OP_TYPES = ("Linear", "Conv2d")
_BACKEND = "slimtorch fake quant"
# Weights symmetric (zero stays exactly zero: pruned weights stay pruned), activations affine.
_INT8 = {"weight": TensorQuant(bits=8, symmetric=True), "input": TensorQuant(bits=8), "output": TensorQuant(bits=8)}
_SYMMETRIC8 = {k: TensorQuant(bits=8, symmetric=True) for k in ("weight", "input", "output")}
_BINARY = {k: TensorQuant(bits=1, symmetric=True) for k in ("weight", "input", "output")}
_DOREFA = {"weight": TensorQuant(bits=8, symmetric=True), "input": TensorQuant(bits=8, signed=False),
           "output": TensorQuant(bits=8, signed=False)}


def _initialise(model: nn.Module, batches: Iterable[Any] | None, what: str) -> None:
    """Run the batches through ``model`` without gradients, in eval mode (BatchNorm statistics untouched): the
    first one sets the ranges and step sizes the quantizers start from."""
    if batches is None:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                run_model(model, batch, f"{what} batch {index}")
    finally:
        model.train(was_training)


def _fake(algorithm: str) -> Any:
    def apply(model: nn.Module, config: QuantConfig, layers: tuple[str, ...],
              batches: Iterable[Any] | None) -> nn.Module:
        plan = plan_quant_layers(model, config.quant_targets())
        if algorithm == "minmax_ptq":
            it = iter(batches) if batches is not None else iter(())
            first = next(it, None)
            if first is None:
                raise ConfigError("ptq_minmax sets the activation ranges from calibration batches: pass "
                                  "calibration=<iterable of model inputs> (quantize or quantize_)")
            fake_quantize_layers_(model, plan, algorithm)
            with calibrating(model):
                _initialise(model, itertools.chain([first], it), "ptq_minmax calibration")
            return model
        fake_quantize_layers_(model, plan, algorithm)
        _initialise(model, batches, config.method)
        return model

    return apply


_COMMON: dict[str, Any] = {"backend": _BACKEND, "kernels": "simulated", "in_place": True, "layer_types": _LAYERS,
                           "default_op_types": _DEFAULT_OP_TYPES}

register_quant_method(
    "qat_minmax", bits=(8, 8), defaults=_INT8, **_COMMON,
    note="weights and activations fake-quantized while training, activation ranges a moving average of batch "
         "ranges (NNI's QATQuantizer); float arithmetic",
)(_fake("minmax"))
register_quant_method(
    "ptq_minmax", bits=(8, 8), defaults=_INT8, **_COMMON,
    note="activation ranges the extremes over calibration batches (NNI's PtqQuantizer); float arithmetic",
)(_fake("minmax_ptq"))
register_quant_method(
    "dorefa", bits=(8, 8), defaults=_DOREFA, **_COMMON,
    note="DoReFa-Net: weights through tanh to [-1, 1], activations clipped to [0, 1]; for training; float arithmetic",
)(_fake("dorefa"))
register_quant_method(
    "bnn", bits=(1, 1), defaults=_BINARY, **_COMMON,
    note="binarised weights (±mean |w| per output channel) and activations (±1), straight-through gradients; "
         "for training; float arithmetic",
)(_fake("bnn"))
register_quant_method(
    "lsq", bits=(8, 8), defaults=_SYMMETRIC8, **_COMMON,
    note="learned step sizes (symmetric), trained with the weights; float arithmetic",
)(_fake("lsq"))
