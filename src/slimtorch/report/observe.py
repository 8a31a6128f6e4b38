"""Observation: what the weights and the activations of a model look like, layer by layer.

* :func:`weight_histograms`: per weight matrix or kernel, a histogram of its values with the share of exact
  zeros, mean magnitude and spread; :func:`compare_weight_histograms` gives two models (before and after
  pruning, say) the same bins per layer, so that their histograms can be laid over each other.
* :func:`activation_sparsity`: per ReLU-like op (``relu``, ``relu6`` and ``hardtanh`` with a lower bound of
  0, as modules or as functions), the share of zeros in its outputs on data, and the units (channels) that
  are zero on every sample: candidates for pruning (what APoZ measures).

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.report import activation_sparsity
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> rows = activation_sparsity(net, [torch.randn(16, 4)])
    >>> [(r.op, r.function, r.total) for r in rows]
    [('1', 'relu', 128)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from slimtorch.checks import check_module, check_number, model_errors
from slimtorch.errors import ConfigError
from slimtorch.graph.run import call_model, temporary_mode
from slimtorch.quant.batches import model_inputs

__all__ = [
    "ActivationSparsity",
    "WeightHistogram",
    "activation_sparsity",
    "activation_table",
    "compare_weight_histograms",
    "weight_histograms",
    "weight_table",
]


@dataclass(frozen=True)
class WeightHistogram:
    """One weight's values: ``counts[i]`` of them in ``[edges[i], edges[i + 1])`` (the last bin closed)."""

    param: str
    shape: tuple[int, ...]
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    zeros: int
    numel: int
    mean_abs: float
    std: float

    @property
    def zero_share(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "zero_share": self.zero_share}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices and kernels (parameters named ``weight`` with two or more dimensions): what pruning
    acts on. Norm scales and biases are left out."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.rpartition(".")[2] == "weight" and p.dim() >= 2}


def _largest(weight: torch.Tensor) -> float:
    return float(weight.abs().max()) if weight.numel() else 0.0


def _histogram(name: str, weight: torch.Tensor, bins: int, span: float) -> WeightHistogram:
    values = weight.float().flatten()
    span = span if span > 0 else 1.0  # an all-zero weight still gets bins
    counts = torch.histc(values, bins=bins, min=-span, max=span)
    edges = torch.linspace(-span, span, bins + 1)
    return WeightHistogram(param=name, shape=tuple(weight.shape), edges=tuple(edges.tolist()),
                           counts=tuple(int(c) for c in counts.tolist()), zeros=int((values == 0).sum()),
                           numel=values.numel(), mean_abs=float(values.abs().mean()) if values.numel() else 0.0,
                           std=float(values.std()) if values.numel() > 1 else 0.0)


def weight_histograms(model: nn.Module, *, bins: int = 51,
                      spans: Mapping[str, float] | None = None) -> dict[str, WeightHistogram]:
    """Per weight matrix or kernel, a histogram of its values over ``[-span, span]`` in ``bins`` bins: ``span``
    from ``spans`` (by parameter name), else the largest magnitude of that weight. A masked model's pruned
    weights are its zeros; with an odd number of bins (the default) they fall in the middle bin, not on an
    edge."""
    check_module(model, "weight_histograms")
    check_number(bins, "bins", low=1, integer=True)
    spans = dict(spans or {})
    weights = _weights(model)
    if not weights:
        raise ConfigError("the model has no weight matrix or kernel (a parameter named 'weight' with 2 or more "
                          "dimensions) to take a histogram of")
    return {name: _histogram(name, w, bins, spans.get(name, _largest(w)))
            for name, w in weights.items()}


def compare_weight_histograms(before: nn.Module, after: nn.Module, *,
                              bins: int = 51) -> tuple[dict[str, WeightHistogram], dict[str, WeightHistogram]]:
    """Histograms of the weights both models have (by name; a compacted model keeps its layers' names), each
    layer's two on the same bins: the larger of the two largest magnitudes sets them."""
    check_module(before, "compare_weight_histograms")
    check_module(after, "compare_weight_histograms")
    first, second = _weights(before), _weights(after)
    shared = [name for name in first if name in second]
    if not shared:
        raise ConfigError("the two models share no weight by name; compare a model with its own pruned or compacted "
                          "version")
    spans = {n: max(_largest(first[n]), _largest(second[n])) for n in shared}
    return ({n: _histogram(n, first[n], bins, spans[n]) for n in shared},
            {n: _histogram(n, second[n], bins, spans[n]) for n in shared})


def weight_table(before: Mapping[str, WeightHistogram], after: Mapping[str, WeightHistogram] | None = None) -> str:
    """A Markdown table: per weight, its shape, share of zeros, mean |w| and standard deviation (before and
    after side by side when ``after`` is given)."""
    head = "| weight | shape | zeros | mean \\|w\\| | std |"
    rule = "|---|---|---:|---:|---:|"
    if after is not None:
        head += " shape after | zeros after | mean \\|w\\| after | std after |"
        rule += "---|---:|---:|---:|"
    lines = [head, rule]
    for name, h in before.items():
        line = f"| {name} | {'x'.join(map(str, h.shape))} | {h.zero_share:.1%} | {h.mean_abs:.4g} | {h.std:.4g} |"
        if after is not None:
            a = after[name]
            line += f" {'x'.join(map(str, a.shape))} | {a.zero_share:.1%} | {a.mean_abs:.4g} | {a.std:.4g} |"
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class ActivationSparsity:
    """One ReLU-like op's outputs over the data: ``zeros`` of ``total`` values were exactly 0; ``dead_units``
    of ``units`` units were 0 on every sample and position (units along dim 1 of 2-, 4- and 5-dimensional
    outputs: features and channels; None for other outputs, where dim 1 may be a sequence)."""

    op: str
    function: str
    calls: int
    zeros: int
    total: int
    units: int | None
    dead_units: int | None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity}


def _lower_bound_zero(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """hardtanh is ReLU-like when its lower bound is 0 (``nn.ReLU6`` is ``hardtanh(x, 0, 6)``)."""
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    return float(low) == 0.0


#: the functions whose outputs are counted, by the name the tables give them
_RELU_LIKE: dict[Callable[..., Any], str] = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu", F.relu6: "relu6", F.hardtanh: "relu6", F.hardtanh_: "relu6",
}


class _Tally:
    """Zeros, values and live units per op across the batches."""

    def __init__(self, function: str) -> None:
        self.function, self.calls, self.zeros, self.total = function, 0, 0, 0
        self.alive: torch.Tensor | None = None  # (units,) bool: non-zero somewhere
        self.units_known = True

    def add(self, out: torch.Tensor) -> None:
        zero = out == 0
        self.calls += 1
        self.zeros += int(zero.sum())
        self.total += out.numel()
        if out.dim() not in (2, 4, 5) or not self.units_known:
            self.units_known = False
            return
        alive = (~zero).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)  # (N, C, ...) -> (C, N * ...) -> (C,)
        if self.alive is None:
            self.alive = alive
        elif self.alive.shape == alive.shape:
            self.alive |= alive
        else:  # units that change from call to call: no unit count
            self.units_known = False

    def row(self, op: str) -> ActivationSparsity:
        units = int(self.alive.numel()) if self.units_known and self.alive is not None else None
        dead = units - int(self.alive.sum()) if units is not None and self.alive is not None else None
        return ActivationSparsity(op=op, function=self.function, calls=self.calls, zeros=self.zeros,
                                  total=self.total, units=units, dead_units=dead)


class _Recorder(TorchFunctionMode):
    """Sees every call of a ReLU-like function (``nn.ReLU`` calls ``F.relu``) and files its output under the
    innermost module running: ``features.1`` for a module, ``block: relu 2`` for the second functional ReLU
    that ``block``'s forward calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: dict[str, int] = {}  # per forward of the outermost module: functional calls per module
        self.tallies: dict[str, _Tally] = {}
        self.handles = [h for name, m in model.named_modules() for h in (
            m.register_forward_pre_hook(lambda _m, _a, name=name: self._enter(name)),
            m.register_forward_hook(lambda _m, _a, _o: self._leave()))]
        self.modules = dict(model.named_modules())

    def _enter(self, name: str) -> None:
        if not self.stack:
            self.seen = {}
        self.stack.append(name)

    def _leave(self) -> None:  # (a forward hook that returned a value would replace the module's output)
        self.stack.pop()

    def _label(self, function: str) -> str:
        name = self.stack[-1] if self.stack else ""
        if type(self.modules.get(name)) in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
            return name
        self.seen[name] = self.seen.get(name, 0) + 1
        index = self.seen[name]
        return f"{name or '(model)'}: {function}{f' {index}' if index > 1 else ''}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        function = _RELU_LIKE.get(func)
        if function == "relu6" and func in (F.hardtanh, F.hardtanh_) and not _lower_bound_zero(args, kwargs):
            function = None
        if function is not None and isinstance(out, torch.Tensor):
            label = self._label(function)
            self.tallies.setdefault(label, _Tally(function)).add(out)
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def activation_sparsity(model: nn.Module, batches: Iterable[Any], *,
                        max_batches: int | None = None) -> list[ActivationSparsity]:
    """Per ReLU-like op, in the order first called: the share of exact zeros in its outputs over ``batches``
    (model inputs; ``(input, label)`` pairs of a data loader are taken as the input), and the units that are
    zero on all of them. The model runs in eval mode without gradients; its modes are given back after."""
    check_module(model, "activation_sparsity")
    if max_batches is not None:
        check_number(max_batches, "max_batches", low=1, integer=True)
    recorder = _Recorder(model)
    count = 0
    try:
        with temporary_mode(model, training=False), torch.no_grad():
            for x in model_inputs(model, batches, "activation_sparsity"):
                if max_batches is not None and count >= max_batches:
                    break
                with model_errors(x, "activation_sparsity"), recorder:
                    call_model(model, x)
                count += 1
    finally:
        recorder.close()
    if not count:
        raise ConfigError("activation_sparsity got no batches; give at least one, e.g. [x] or (x for x, _ in loader)")
    if not recorder.tallies:
        raise ConfigError("the model calls no ReLU-like op (relu, relu6, hardtanh from 0) on these inputs: there is "
                          "no activation sparsity to measure")
    return [tally.row(op) for op, tally in recorder.tallies.items()]


def activation_table(rows: Sequence[ActivationSparsity], after: Sequence[ActivationSparsity] | None = None) -> str:
    """A Markdown table: per op, the share of zeros and the dead units (with ``after``: both models', by op)."""
    head, rule = "| op | function | zeros | dead units |", "|---|---|---:|---:|"
    later = {r.op: r for r in after or ()}
    if after is not None:
        head, rule = head + " zeros after | dead units after |", rule + "---:|---:|"

    def dead(r: ActivationSparsity | None) -> str:
        return "-" if r is None or r.units is None else f"{r.dead_units} / {r.units}"

    lines = [head, rule]
    for r in rows:
        line = f"| {r.op} | {r.function} | {r.sparsity:.1%} | {dead(r)} |"
        if after is not None:
            a = later.get(r.op)
            line += f" {'-' if a is None else f'{a.sparsity:.1%}'} | {dead(a)} |"
        lines.append(line)
    return "\n".join(lines)
