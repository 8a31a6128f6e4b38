"""Argument checks the public entry points share: a typed error naming the value and the fix, raised before
anything is changed or written.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.checks import check_module, describe_inputs, run_model
    >>> check_module({"fc": 1}, "quantize")
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: quantize takes a torch.nn.Module, got dict {'fc': 1}; ...
    >>> describe_inputs((torch.zeros(2, 3), {"mask": torch.ones(2, dtype=torch.bool)}))
    '(float32[2, 3], {mask: bool[2]})'
    >>> run_model(nn.Linear(4, 2), torch.zeros(1, 3), "report")
    Traceback (most recent call last):
    ...
    slimtorch.errors.TraceError: report: the model cannot run on float32[1, 3] (RuntimeError: mat1 and mat2 ...
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from slimtorch.atomic import check_path
from slimtorch.errors import ConfigError, SlimError, TraceError
from slimtorch.graph.run import call_model

__all__ = [
    "MAX_PARAMETERS",
    "check_example_finite",
    "check_finite_inputs",
    "check_materialized",
    "check_module",
    "check_not_quantized",
    "check_number",
    "check_output_file",
    "check_path",
    "describe_inputs",
    "model_devices",
    "model_errors",
    "run_model",
    "tensors_in",
]

#: The most parameters a model built from sizes read in a file or an argument may have (checked before it is
#: allocated: a corrupt or hostile size must not exhaust memory).
MAX_PARAMETERS = 1 << 33


def check_module(model: Any, what: str) -> None:
    """``model`` must be an ``nn.Module`` (not a state dict, a path or a class)."""
    if not isinstance(model, nn.Module):
        shown = reprlib.repr(model)
        kind = f"the class {model.__name__}" if isinstance(model, type) else f"{type(model).__name__} {shown}"
        raise ConfigError(f"{what} takes a torch.nn.Module, got {kind}; pass the model object itself "
                          "(build it and load its weights first)")


def model_devices(model: nn.Module) -> set[torch.device]:
    """Devices of the model's parameters and buffers."""
    return {t.device for t in (*model.parameters(), *model.buffers())}


def check_materialized(model: nn.Module, what: str) -> None:
    """Refuse a model whose weights are on the meta device: they hold no values to compute with."""
    if torch.device("meta") in model_devices(model):
        raise ConfigError(f"{what}: the model's weights are on the meta device (shapes only, no values); "
                          "materialize it first, e.g. model.to_empty(device='cpu') then load_state_dict")


#: Quantization methods that keep float layers (same parameters, another float dtype): they can still be pruned.
_FLOAT_QUANT = ("fp16", "bf16")


def check_not_quantized(model: nn.Module, what: str) -> None:
    """Refuse a model quantized to integer or packed layers (pruning and compaction need float weights)."""
    info = getattr(model, "slimtorch_quantization", None)
    if isinstance(info, Mapping) and info.get("method") not in _FLOAT_QUANT:
        raise ConfigError(f"{what}: the model is quantized ({info.get('method')}); its layers hold integer or packed "
                          f"weights, which cannot be pruned or compacted. Prune and compact the float model, then "
                          "quantize the result")


def check_number(value: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
    """A finite int/float (an int when ``integer``) within [low, high], each end open when asked."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if math.isinf(high):
            bounds = f"{'>' if low_open else '>='} {low}"
        else:
            bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be {kind} {bounds}, got {value!r}")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)


def describe_inputs(value: Any) -> str:
    """Shapes and dtypes of model inputs, for messages: ``float32[2, 3]``, tuples and dicts of them."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(d) for d in value.shape)}]" + ("" if value.device.type == "cpu" else
                                                                         f" on {value.device}")
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe_inputs(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__


def check_finite_inputs(value: Any, what: str) -> None:
    """Floating-point inputs must hold no NaN or infinity (what a check or a calibration compares is then
    meaningless)."""
    for t in tensors_in(value):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{what} hold NaN or infinite values ({describe_inputs(value)}); give real data")


def check_example_finite(example_inputs: Any, what: str) -> None:
    """Every floating-point leaf of ``example_inputs`` (nested tuples, lists, dicts) must be finite; the error
    names the leaf (``example_inputs[1]['mask']``), as :func:`slimtorch.compact_`'s does."""
    for path, leaf in tree_flatten_with_path(example_inputs)[0]:
        if not isinstance(leaf, torch.Tensor) or leaf.is_meta or not (leaf.is_floating_point() or leaf.is_complex()):
            continue
        bad = int((~torch.isfinite(leaf)).sum())
        if bad:
            nan = int(torch.isnan(leaf).sum())
            raise ConfigError(
                f"{what}: example_inputs{keystr(path)} holds {nan} NaN and {bad - nan} infinite values; the model is "
                "traced and measured on the example inputs, where a non-finite value makes every comparison "
                "meaningless. Pass a batch of finite inputs (an infinite attention-mask value can be "
                "torch.finfo(dtype).min instead)"
            )


@contextmanager
def model_errors(inputs: Any, what: str) -> Iterator[None]:
    """Within the block, anything but a slimtorch error (raised by the user's model on ``inputs``) becomes a
    TraceError naming the inputs."""
    try:
        yield
    except SlimError:
        raise
    except Exception as err:  # the user's model may raise anything: all mean "not these inputs"
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise TraceError(f"{what}: the model cannot run on {describe_inputs(inputs)} ({type(err).__name__}: "
                         f"{first}); give inputs shaped like the data it was built for") from err


def run_model(model: nn.Module, inputs: Any, what: str) -> Any:
    """``model`` called on ``inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs);
    anything the model raises becomes a TraceError naming the inputs."""
    with model_errors(inputs, what):
        return call_model(model, inputs)


def check_output_file(path: str | Path, what: str) -> Path:
    """An output file path must not be a folder and its parent, if present, must be a folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {str(path)!r} is a folder; give a file path inside it, e.g. "
                          f"{str(path / 'model.onnx')!r}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{what}: {str(parent)!r} is a file, so {str(path)!r} cannot be created; choose another "
                          "output path")
    return path
