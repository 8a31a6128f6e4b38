"""NNI's quantizers on :mod:`slimtorch.quant`: ``QATQuantizer``, ``PtqQuantizer``, ``DoReFaQuantizer``,
``BNNQuantizer`` and ``LsqQuantizer``, with NNI's config lists (``quant_types`` / ``target_names``,
``quant_bits``, ``quant_dtype``, ``quant_scheme``, ``granularity``; :mod:`slimtorch.quant.targets`).

NNI 3's call pattern, with a slimtorch :class:`~slimtorch.prune.loop.Evaluator` where NNI takes a
``TorchEvaluator``::

    from slimtorch.compat.nni.compression.quantization import QATQuantizer   # was: nni.compression.quantization
    quantizer = QATQuantizer(model, config_list, evaluator)
    model, calibration_config = quantizer.compress(max_steps=None, max_epochs=1)   # trains, fake-quantized

NNI 2's, with the training loop's own optimizer (the quantizers' new parameters, LSQ's step sizes, are
added to it)::

    quantizer = QAT_Quantizer(model, config_list, optimizer, dummy_input)
    quantizer.compress()             # then train as before

The result is a fake-quantized model (``quant_info(model).kernels == "simulated"``), as NNI's: it computes
in float what the low-bit model computes. For real int8 kernels, quantize the float model with
``slimtorch.quantize(model, QuantConfig(method="static_int8"), calibration=...)`` (or ``qat_int8``), or
export it and quantize with ONNX Runtime; docs/quantization.md has the table.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.errors import ConfigError
from slimtorch.prune.iterative import CALIBRATION_BATCHES
from slimtorch.prune.loop import Evaluator
from slimtorch.quant import QuantConfig, fakequant, quantize_
from slimtorch.quant.qlayers import quantizers_of
from slimtorch.quant.saving import save_quantized
from slimtorch.quant.targets import plan_quant_layers

__all__ = [
    "BNNQuantizer",
    "DoReFaQuantizer",
    "LsqQuantizer",
    "PtqQuantizer",
    "QATQuantizer",
    "QAT_Quantizer",
]


def _first_inputs(data: Any, count: int) -> list[Any]:
    """The first ``count`` batches of a data source (a DataLoader or a list of batches)."""
    return list(itertools.islice(iter(data), count))


def _describe(quantizer: nn.Module, weight: torch.Tensor | None) -> dict[str, Any]:
    """What NNI's calibration config holds for one tensor: bits, and the scale / zero point where they exist."""
    info: dict[str, Any] = {"bits": getattr(getattr(quantizer, "spec", None), "bits", 1)}
    if isinstance(quantizer, fakequant.RangeQuantizer):
        if quantizer.kind == "weight" and weight is not None:
            low, high = quantizer.ranges(weight)  # weights: ranges of the current weight
        else:
            low, high = quantizer.min_val, quantizer.max_val
        scale, zero = quantizer.scale_zero_point(low, high)
        info.update(tracked_min=low.tolist(), tracked_max=high.tolist(), scale=scale.tolist(), zero_point=zero.tolist())
    elif isinstance(quantizer, fakequant.LsqQuantizer):
        info["scale"], info["zero_point"] = quantizer.scale.detach().abs().tolist(), 0
    return info


class _Quantizer:
    """Shared shape of the NNI quantizers: validate on construction, quantize (and train) on ``compress()``."""

    method = "qat_minmax"
    trains = True

    def __init__(self, model: nn.Module, config_list: Sequence[Mapping[str, Any]], evaluator: Any = None,
                 dummy_input: Any = None) -> None:
        check_module(model, type(self).__name__)
        self.model = model
        self.config = QuantConfig(method=self.method, targets=tuple(config_list))
        plan_quant_layers(model, self.config.targets)  # a bad selector fails now, not at compress()
        self.optimizer: torch.optim.Optimizer | None = None
        self.evaluator: Evaluator | None = None
        if isinstance(evaluator, torch.optim.Optimizer):
            self.optimizer = evaluator  # NNI 2: the caller's loop trains, with this optimizer
        elif isinstance(evaluator, Evaluator):
            self.evaluator = evaluator
        else:
            raise ConfigError(f"{type(self).__name__} takes a slimtorch Evaluator (training data, loss, optimizer "
                              "settings; NNI 3) or the training loop's torch optimizer (NNI 2), got "
                              f"{type(evaluator).__name__}; pass Evaluator(train_data=loader)")
        self.dummy_input = dummy_input

    def _calibration(self, max_steps: int | None) -> list[Any] | None:
        """The batches the quantizers start from: the dummy input, else the first training batch(es)."""
        if self.dummy_input is not None:
            return [self.dummy_input]
        if self.evaluator is None:
            return None
        return _first_inputs(self.evaluator.train_data, 1)

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None) -> Any:
        """Quantize the model in place and, given an Evaluator, train it for ``max_steps`` steps or
        ``max_epochs`` epochs (NNI 3: returns ``(model, calibration_config)``). Given an optimizer (NNI 2),
        only quantize, add the quantizers' parameters to the optimizer, and return the model."""
        if self.evaluator is not None and self.trains and max_steps is None and max_epochs is None:
            raise ConfigError(f"{type(self).__name__}.compress trains the fake-quantized model: give max_steps or "
                              "max_epochs (e.g. compress(None, 1))")
        quantize_(self.model, self.config, calibration=self._calibration(max_steps))
        self._extend_optimizer()
        if self.evaluator is None:
            return self.model
        if self.trains:
            self._train(max_steps, max_epochs)
        return self.model, self.calibration_config()

    def _extend_optimizer(self) -> None:
        if self.optimizer is None:
            return
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        new = [p for p in self.model.parameters() if p.requires_grad and id(p) not in known]
        if new:
            self.optimizer.add_param_group({"params": new})

    def _train(self, max_steps: int | None, max_epochs: int | None) -> None:
        assert self.evaluator is not None
        epochs = max_epochs
        if epochs is None:  # as many passes as max_steps needs (train_ stops at max_steps)
            size = len(self.evaluator.train_data) if hasattr(self.evaluator.train_data, "__len__") else 1
            epochs = math.ceil(max_steps / max(size, 1)) if max_steps else 0
        self.evaluator.train_(self.model, epochs=epochs, max_steps=max_steps)

    def calibration_config(self) -> dict[str, dict[str, Any]]:
        """Per quantized layer and tensor: bits, and scale / zero point / tracked range where the method has
        them (NNI's ``calibration_config``), as plain Python values."""
        out: dict[str, dict[str, Any]] = {}
        for name, quantizer in quantizers_of(self.model).items():
            layer_name, _, attr = name.rpartition(".")
            layer = self.model.get_submodule(layer_name)
            weight = layer.weight if attr == "weight_quantizer" else None
            out.setdefault(layer_name, {})[attr.removesuffix("_quantizer")] = _describe(quantizer, weight)
        return out

    def export_model(self, model_path: str, calibration_path: str | None = None) -> dict[str, dict[str, Any]]:
        """NNI 2's export: the quantized model to ``model_path`` (safetensors, read back with
        ``slimtorch.quant.saving.load_quantized``), the calibration config as JSON to ``calibration_path``."""
        save_quantized(self.model, model_path)
        config = self.calibration_config()
        if calibration_path is not None:
            Path(calibration_path).write_text(json.dumps(config, indent=1))
        return config


class QATQuantizer(_Quantizer):
    """Quantization-aware training (Jacob et al. 2018): weights and activations fake-quantized while
    training, activation ranges a moving average of the batches' ranges. Method ``qat_minmax``."""

    method = "qat_minmax"


#: NNI 2's name.
QAT_Quantizer = QATQuantizer


class PtqQuantizer(_Quantizer):
    """Post-training quantization: activation ranges from calibration batches (``max_steps`` batches of the
    evaluator's training data, 16 when not given), no training. Method ``ptq_minmax``."""

    method = "ptq_minmax"
    trains = False

    def _calibration(self, max_steps: int | None) -> list[Any] | None:
        if self.evaluator is None:
            raise ConfigError("PtqQuantizer calibrates on the evaluator's training data: pass an Evaluator")
        return _first_inputs(self.evaluator.train_data, max_steps or CALIBRATION_BATCHES)


class DoReFaQuantizer(_Quantizer):
    """DoReFa-Net (Zhou et al. 2016): k-bit weights through tanh, activations clipped to [0, 1]. Method
    ``dorefa``."""

    method = "dorefa"


class BNNQuantizer(_Quantizer):
    """Binarised neural networks (Hubara et al. 2016): weights and activations to ±1 with straight-through
    gradients (the gradient of an activation is cancelled where |x| > 1). Method ``bnn``."""

    method = "bnn"


class LsqQuantizer(_Quantizer):
    """Learned step size quantization (Esser et al. 2020): symmetric, the step sizes trained with the weights.
    Method ``lsq``."""

    method = "lsq"
