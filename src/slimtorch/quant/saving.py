"""Saving and loading quantized models: one safetensors file (integer values, scales, zero points) plus
the quantization record as JSON metadata; never pickle.

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

import json
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.io import atomic_write, load_plain_state_, plain_state
from slimtorch.quant.api import quantize
from slimtorch.quant.config import QUANT_ATTR, QuantConfig, quant_info

__all__ = ["FORMAT", "load_quantized", "save_quantized"]

FORMAT = "slimtorch-quantized-v1"
_NEEDS_INPUTS = ("static_int8", "qat_int8")  # their graph is rebuilt by tracing the model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Save a model quantized by slimtorch, atomically: what :func:`load_quantized` reads back."""
    from safetensors.torch import save_file

    if quant_info(model) is None:
        raise ConfigError("the model is not quantized by slimtorch; save a float model with safetensors "
                          "(safetensors.torch.save_model) or slimtorch.models.save_model")
    record = dict(getattr(model, QUANT_ATTR))
    if "config" not in record:
        record["config"] = {"method": record["method"], "op_names": list(record["layers"])}
    # Copies: safetensors refuses tensors sharing storage, and quantized values come out as views.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in plain_state(model).items()}
    metadata = {"format": FORMAT, "quantization": json.dumps(record)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"quantized model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a quantized slimtorch model (format {metadata.get('format')!r}); "
                              "save it with slimtorch.quant.saving.save_quantized")
    return json.loads(metadata["quantization"]), tensors


def load_quantized(model: nn.Module, path: str | Path, *, example_inputs: Any = None) -> nn.Module:
    """The quantized model saved at ``path``, rebuilt on ``model`` (the float model it was quantized from,
    or any model of that architecture: its weights are not used). Pure: ``model`` is not changed.
    ``static_int8`` and ``qat_int8`` need ``example_inputs`` to trace the model again. A file that does
    not fit the model is a :class:`~slimtorch.errors.CheckpointError`."""
    record, tensors = _read(Path(path))
    config = QuantConfig.from_dict(record["config"])
    if config.method in _NEEDS_INPUTS and example_inputs is None:
        raise ConfigError(f"{config.method} rebuilds its graph by tracing the model: load_quantized(model, path, "
                          "example_inputs=<one batch>) (the file's values then replace the traced ones)")
    try:
        q = quantize(model, config, example_inputs=example_inputs)
    except ConfigError as err:
        raise CheckpointError(f"{str(path)!r} does not fit this model: {err}") from None
    load_plain_state_(q, tensors)
    return q
