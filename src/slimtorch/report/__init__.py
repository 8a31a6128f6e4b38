"""Measurements: parameters, non-zeros, MACs/FLOPs, saved size, CPU latency and throughput; and observation:
weight histograms and activation sparsity per layer (:mod:`slimtorch.report.observe`, figures in
:mod:`slimtorch.report.plots`).

Every report says what it looked at: a *dense* model, a *masked* one (pruned values are zero but the
model is exactly as large and as slow as before) or a *compacted* one (really smaller)::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import report
    >>> r = report(nn.Linear(8, 4), torch.randn(2, 8), runs=3)
    >>> r.params, r.macs, r.state
    (36, 64, 'dense')
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from slimtorch.checks import check_materialized, check_module, check_number, model_errors
from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.graph.run import call_model, temporary_mode
from slimtorch.io import plain_state
from slimtorch.masks import COMPACTION_ATTR, MASK_SUFFIX, check_mask_values, get_masks, model_state
from slimtorch.quant.config import quant_info
from slimtorch.report.observe import (
    ActivationSparsity,
    WeightHistogram,
    activation_sparsity,
    activation_table,
    compare_weight_histograms,
    weight_histograms,
    weight_table,
)
from slimtorch.sparse import split_state

__all__ = [
    "COMPACTION_ATTR",
    "ActivationSparsity",
    "Report",
    "WeightHistogram",
    "activation_sparsity",
    "activation_table",
    "compare_markdown",
    "compare_weight_histograms",
    "count_flops",
    "count_nonzero",
    "count_params",
    "measure_latency",
    "model_state",
    "quantization",
    "report",
    "saved_size",
    "sparsity_table",
    "weight_histograms",
    "weight_table",
]

def _cpu_sdpa_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, so on CPU a transformer's
# attention would count as zero FLOPs. Same formula as torch's own for the other kernels.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


def _packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The float value of a weight a quantized layer keeps outside its parameters: torch.ao's int8 layers
    pack it (``weight()`` is a method), slimtorch's 4-/1-bit layers keep it in buffers."""
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        value = weight()
        return value.dequantize() if value.is_quantized else value
    dequantized = getattr(module, "dequantized_weight", None)
    return dequantized() if callable(dequantized) else None


def _stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters (shared ones once) plus the packed weights and biases of quantized layers."""
    tensors = [p.detach() for p in model.parameters()]
    for module in model.modules():
        weight = _packed_weight(module)
        if weight is None:
            continue
        tensors.append(weight)
        bias = getattr(module, "bias", None)
        if callable(bias) and not isinstance(bias, torch.Tensor) and bias() is not None:
            tensors.append(bias().detach())  # torch.ao packs the bias with the weight
    return tensors


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once); the weights of quantized layers count as
    parameters too, whatever their storage."""
    return sum(t.numel() for t in _stored_tensors(model))


def count_nonzero(model: nn.Module) -> int:
    """Number of parameters (quantized weights included) that are not exactly zero."""
    return sum(int(torch.count_nonzero(t)) for t in _stored_tensors(model))


def _quantized_flop_hooks(model: nn.Module, total: list[int]) -> list[Any]:
    """FlopCounterMode has no formula for torch.ao's int8 linear and conv kernels: count them here, as
    ``2 * output elements * fan-in`` (the float layer's count)."""
    handles = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not callable(weight) or isinstance(weight, torch.Tensor) or "Embedding" in type(module).__name__:
            continue
        fan_in = weight().shape[1:].numel()  # (out, in) or (out, in / groups, kh, kw)

        def hook(_module: nn.Module, _args: Any, out: torch.Tensor, fan_in: int = fan_in) -> None:
            total[0] += 2 * out.numel() * fan_in

        handles.append(module.register_forward_hook(hook))
    return handles


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs of one call on ``example_inputs`` (a multiply-add counts 2), attention and torch.ao
    int8 layers included.

    >>> from slimtorch.quant import QuantConfig, quantize
    >>> net, x = nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 8)
    >>> count_flops(net, x) == count_flops(quantize(net, QuantConfig(method="dynamic_int8")), x) == 128
    True
    """
    quantized = [0]
    handles = _quantized_flop_hooks(model, quantized)
    try:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as fc:
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return int(fc.get_total_flops()) + quantized[0]


def saved_size(model: nn.Module, *, sparse: bool = True) -> int:
    """Bytes of the model's weights saved as safetensors (buffers included; quantized weights as their
    integers plus scales). A masked weight counts as stored sparse: its kept values and their positions (a
    bitmask or CSR indices, whichever is smaller: :mod:`slimtorch.sparse.storage`, as
    ``save_model(..., sparse="auto")`` writes it). ``sparse=False``: every weight dense and no masks, the
    size of the same model unpruned."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in plain_state(model).items():
        # safetensors refuses shared storage; a tied weight is saved once.
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().cpu().contiguous()
    masks = get_masks(model)
    dense, kept, stored = split_state(tensors, masks if sparse else {}, "auto", mask_suffix=MASK_SUFFIX)
    dense = {k: v for k, v in dense.items() if not (k.endswith(MASK_SUFFIX) and k[:-len(MASK_SUFFIX)] in masks)}
    dense.update({f"{k}::{part}": t for k, (parts, _) in stored.items() for part, t in parts.items()})
    return len(save({**dense, **{f"{k}::mask": v for k, v in kept.items()}}))


def measure_latency(
    model: nn.Module, example_inputs: Any, *, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> float:
    """Median wall time (seconds) of one forward call under ``torch.inference_mode``."""
    check_number(runs, "runs", low=1, integer=True)
    check_number(warmup, "warmup", low=0, integer=True)
    if threads is not None:
        check_number(threads, "threads", low=1, integer=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                start = time.perf_counter()
                call_model(model, example_inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old_threads)


def quantization(model: nn.Module) -> str | None:
    """How a quantized model is stored and run (``"static_int8 (w8a8): real kernels (...)"``), or None."""
    info = quant_info(model)
    return info.describe() if info is not None else None


def _batch_size(example_inputs: Any) -> int:
    first = example_inputs
    while not isinstance(first, torch.Tensor):
        if isinstance(first, Mapping) and first:
            first = next(iter(first.values()))
        elif isinstance(first, Sequence) and first:
            first = first[0]
        else:
            return 1
    return int(first.shape[0]) if first.dim() else 1


@dataclass(frozen=True)
class Report:
    """What :func:`report` measured. ``latency_s`` is the median of ``runs`` calls. ``size_bytes`` is the
    size of the weights as stored (masked weights sparse), ``dense_size_bytes`` that of the same weights
    unpruned (dense, without masks)."""

    state: str
    params: int
    nonzero_params: int
    flops: int
    size_bytes: int
    latency_s: float | None
    throughput: float | None
    batch_size: int
    threads: int
    quantization: str | None = None
    dense_size_bytes: int | None = None  # the same weights unpruned (size_bytes: as stored, masked ones sparse)

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs": self.macs, "sparsity": self.sparsity}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self, title: str = "model") -> str:
        return compare_markdown({title: self})


def report(
    model: nn.Module, example_inputs: Any, *, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> Report:
    """Measure ``model`` on ``example_inputs`` (the model is put in eval mode for the measurement and
    restored after). ``runs=0`` skips the latency measurement. A model that cannot run on the inputs is a
    :class:`~slimtorch.errors.TraceError`."""
    check_module(model, "report")
    check_number(runs, "runs", low=0, integer=True)
    check_number(warmup, "warmup", low=0, integer=True)
    if threads is not None:
        check_number(threads, "threads", low=1, integer=True)
    check_materialized(model, "report")
    with temporary_mode(model, training=False):  # each module gets its own mode back afterwards
        with model_errors(example_inputs, "report"):
            flops = count_flops(model, example_inputs)  # the first call: a model that cannot run fails here
            latency = (measure_latency(model, example_inputs, runs=runs, warmup=warmup, threads=threads)
                       if runs else None)
        batch = _batch_size(example_inputs)
        return Report(
            state=model_state(model),
            params=count_params(model),
            nonzero_params=count_nonzero(model),
            flops=flops,
            size_bytes=saved_size(model),
            dense_size_bytes=saved_size(model, sparse=False),
            latency_s=latency,
            throughput=batch / latency if latency else None,
            batch_size=batch,
            threads=threads or torch.get_num_threads(),
            quantization=quantization(model),
        )


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.4g}{unit}"


def _size(r: Report) -> str:
    """The stored size, and the dense one beside it when masked weights stored sparse make them differ."""
    stored = _fmt(r.size_bytes, "B")
    if r.dense_size_bytes is None or r.dense_size_bytes == r.size_bytes:
        return stored
    return f"{stored} (dense {_fmt(r.dense_size_bytes, 'B')})"


def compare_markdown(reports: Mapping[str, Report]) -> str:
    """A Markdown table of several reports side by side; ratios are against the first one."""
    names = list(reports)
    base = reports[names[0]]
    lines = [
        "| model | state | params | non-zero | MACs | size | latency | throughput | params ratio | MACs ratio "
        "| speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = reports[name]
        speedup = f"{base.latency_s / r.latency_s:.2f}x" if base.latency_s and r.latency_s else "-"
        state = f"{r.state}, {r.quantization.split(':')[0]}" if r.quantization else r.state
        lines.append(
            f"| {name} | {state} | {_fmt(r.params)} | {_fmt(r.nonzero_params)} | {_fmt(r.macs)} | "
            f"{_size(r)} | {_fmt(r.latency_s * 1e3 if r.latency_s else None, ' ms')} | "
            f"{_fmt(r.throughput, '/s')} | {r.params / base.params:.3f} | "
            f"{(r.macs / base.macs) if base.macs else float('nan'):.3f} | {speedup} |"
        )
    return "\n".join(lines)


def sparsity_table(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per masked parameter: shape, kept and total entries, sparsity, and whole output units kept
    (rows along dim 0 with at least one kept entry) — what a pruner actually achieved. The masks of a model
    compacted since (a pruning round's masks) describe each layer as it was pruned: their shapes are shown."""
    check_module(model, "sparsity_table")
    check_mask_values(masks)
    params = dict(model.named_parameters())
    compacted = model_state(model) == "compacted"
    for name, mask in masks.items():
        if name not in params:
            raise NoMatchError(f"mask {name!r} names no parameter of the model; {closest(name, params)}")
        if tuple(mask.shape) != tuple(params[name].shape) and not compacted:
            raise ConfigError(f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                              f"{tuple(params[name].shape)}; give the masks of this model")
    rows = []
    for name, mask in masks.items():
        mask = mask.bool()
        units = mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() else mask.reshape(1)
        rows.append(
            {
                "param": name,
                "shape": list(mask.shape),
                "kept": int(mask.sum()),
                "total": mask.numel(),
                "sparsity": 1.0 - float(mask.float().mean()) if mask.numel() else 0.0,
                "units_kept": int(units.sum()),
                "units": int(units.numel()),
            }
        )
    return rows
