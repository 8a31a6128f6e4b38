"""Saving and loading quantized models: one safetensors file of slimtorch's container (kind ``quantized``:
integer values, scales, zero points) with the quantization record in its JSON header; never pickle.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from slimtorch.quant import QuantConfig, quantize
    >>> from slimtorch.quant.saving import load_quantized, save_quantized
    >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    >>> q = quantize(net, QuantConfig(method="dynamic_int8"))
    >>> path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
    >>> save_quantized(q, path)
    >>> fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()  # any float weights
    >>> x = torch.randn(3, 16)
    >>> torch.equal(load_quantized(fresh, path)(x), q(x))
    True

Loading quantizes a float model of the same architecture (compacted or factorized the same way) with
the saved config, which rebuilds the quantized layers, then replaces their values with the file's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.container import DescriptionError, Field, Kind, TensorInfo, read_file, register_kind, write_file
from slimtorch.errors import CheckpointError, ConfigError, SlimError
from slimtorch.io import load_plain_state_, plain_state
from slimtorch.quant.api import quantize
from slimtorch.quant.config import QUANT_ATTR, QuantConfig, quant_info

__all__ = ["FORMAT", "QUANTIZED", "load_quantized", "save_quantized"]

_NEEDS_INPUTS = ("static_int8", "qat_int8")  # their graph is rebuilt by tracing the model


def _check_record(description: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """The record's config must be a valid QuantConfig: loading quantizes the template with it."""
    config = description["quantization"].get("config")
    if not isinstance(config, dict):
        raise DescriptionError(f"'quantization' needs a 'config' mapping, got {type(config).__name__}")
    try:
        QuantConfig.from_dict(config)
    except (SlimError, KeyError, ValueError, TypeError) as err:
        raise DescriptionError(f"its quantization config is invalid ({type(err).__name__}: {err})") from None


QUANTIZED = register_kind(Kind(
    name="quantized", version=1, title="slimtorch quantized model file", described="quantization record",
    readable="safetensors file of a quantized model",
    fix="save the quantized model with slimtorch.quant.saving.save_quantized",
    fields=(Field("quantization", dict),), check=_check_record))
FORMAT = QUANTIZED.format


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Save a model quantized by slimtorch, atomically: what :func:`load_quantized` reads back."""
    if quant_info(model) is None:
        raise ConfigError("the model is not quantized by slimtorch; save a float model with safetensors "
                          "(safetensors.torch.save_model) or slimtorch.models.save_model")
    record = dict(getattr(model, QUANT_ATTR))
    if "config" not in record:
        record["config"] = {"method": record["method"], "op_names": list(record["layers"])}
    # (write_file copies each tensor: quantized values come out as views sharing storage)
    write_file(path, QUANTIZED, {"quantization": record}, plain_state(model))


def load_quantized(model: nn.Module, path: str | Path, *, example_inputs: Any = None) -> nn.Module:
    """The quantized model saved at ``path``, rebuilt on ``model`` (the float model it was quantized from,
    or any model of that architecture: its weights are not used). Pure: ``model`` is not changed.
    ``static_int8`` and ``qat_int8`` need ``example_inputs`` to trace the model again. A file that does
    not fit the model is a :class:`~slimtorch.errors.CheckpointError`."""
    contents = read_file(path, QUANTIZED)  # header, record and config checked
    tensors = contents.tensors
    config = QuantConfig.from_dict(contents.description["quantization"]["config"])
    if config.method in _NEEDS_INPUTS and example_inputs is None:
        raise ConfigError(f"{config.method} rebuilds its graph by tracing the model: load_quantized(model, path, "
                          "example_inputs=<one batch>) (the file's values then replace the traced ones)")
    try:
        q = quantize(model, config, example_inputs=example_inputs)
    except ConfigError as err:
        raise CheckpointError(f"{str(path)!r} does not fit this model: {err}") from None
    load_plain_state_(q, tensors)
    return q
