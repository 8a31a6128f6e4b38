"""Sensitivity analysis: prune one layer at a time over a range of sparsities and measure the metric.

The result is a table (and a plot) of how much each layer tolerates, and turns into per-layer
sparsities for a target: layers are pruned further, least harmful step first, until the target is
met::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.sensitivity import sensitivity_analysis
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(32, 4)
    >>> ref = net(x).detach()
    >>> @torch.no_grad()
    ... def closeness(model):                      # higher is better
    ...     return -float((model(x) - ref).pow(2).mean())
    >>> result = sensitivity_analysis(net, closeness, sparsities=(0.25, 0.5, 0.75))
    >>> sorted(result.layers), len(result.rows)
    (['0', '2'], 6)
    >>> result.drop("0", 0.75) >= result.drop("0", 0.25) >= 0
    True

The seeds' experiment (pruning AlexNet's layers one at a time) found convolutions, the first one most
of all, far more sensitive than fully-connected layers; ``benchmarks/sensitivity.py`` reproduces it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.atomic import save_figure
from slimtorch.checks import check_module
from slimtorch.config import PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.prune.criteria import Criterion
from slimtorch.prune.pruner import compute_masks
from slimtorch.select import select_modules

__all__ = ["SensitivityResult", "SensitivityRow", "sensitivity_analysis"]

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    sparsity: float
    metric: float
    drop: float  # baseline - metric (or metric - baseline when lower is better): > 0 is worse
    weights: int  # weights in the layer's pruned parameter


@dataclass(frozen=True)
class SensitivityResult:
    """Metric of the model with one layer pruned at a time, for every layer and sparsity."""

    baseline: float
    rows: tuple[SensitivityRow, ...]
    higher_is_better: bool = True

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def drop(self, layer: str, sparsity: float) -> float:
        """The metric drop with ``layer`` alone pruned at ``sparsity`` (one of the analysed sparsities)."""
        for row in self.rows:
            if row.layer == layer and abs(row.sparsity - sparsity) < 1e-9:
                return row.drop
        raise ConfigError(f"no result for layer {layer!r} at sparsity {sparsity}; analysed: {self.layers}")

    def to_markdown(self) -> str:
        """One row per layer, one column per sparsity, cells are metric drops (positive = worse)."""
        sparsities = sorted({r.sparsity for r in self.rows})
        head = "| layer | weights | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
        lines = [f"baseline metric: {self.baseline:.4f}", "", head, "|---|---:|" + "---:|" * len(sparsities)]
        for layer in self.layers:
            rows = {r.sparsity: r for r in self.rows if r.layer == layer}
            cells = " | ".join(f"{rows[s].drop:+.4f}" if s in rows else "" for s in sparsities)
            lines.append(f"| {layer} | {next(iter(rows.values())).weights} | {cells} |")
        return "\n".join(lines)

    def save_plot(
        self, path: str | Path, *, title: str = "Sensitivity of each layer to pruning", ylabel: str = "metric"
    ) -> None:
        """Metric against sparsity, one line per layer, baseline dashed; written as an image (PNG)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("plots need matplotlib: pip install 'slimtorch[plot]'") from err
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for layer in self.layers:
            rows = sorted((r for r in self.rows if r.layer == layer), key=lambda r: r.sparsity)
            ax.plot([0.0] + [r.sparsity for r in rows], [self.baseline] + [r.metric for r in rows], "o-", label=layer)
        ax.axhline(self.baseline, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="sparsity of the one pruned layer", ylabel=ylabel, title=title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
        plt.close(fig)

    def allocate(self, total_sparsity: float) -> dict[str, float]:
        """Per-layer sparsities pruning at least ``total_sparsity`` of the analysed weights while keeping the
        largest single-layer drop as small as possible.

        Every (layer, sparsity) point is ranked by its drop (the largest drop at this or any smaller
        sparsity of the layer, so a layer's points come in order); points are taken from the least harmful
        up until the target is met, so the result overshoots by at most one step of one layer. Raises when
        even the largest analysed sparsities fall short.
        """
        if not 0.0 <= total_sparsity < 1.0:
            raise ConfigError(f"total_sparsity must be in [0, 1), got {total_sparsity!r}")
        weights = {r.layer: r.weights for r in self.rows}
        total = sum(weights.values())
        chosen = dict.fromkeys(self.layers, 0.0)
        points = sorted((d, s, i, layer) for i, (layer, curve) in enumerate(self._worst_drop_curves().items())
                        for s, d in curve)
        for _, sparsity, _, layer in [(float("-inf"), 0.0, 0, self.layers[0]), *points]:
            chosen[layer] = max(chosen[layer], sparsity)
            if sum(chosen[n] * weights[n] for n in chosen) >= total_sparsity * total - 1e-9:
                return chosen
        raise ConfigError(
            f"total_sparsity {total_sparsity} is beyond the analysed range; analyse larger sparsities (up to "
            f"{max(r.sparsity for r in self.rows)} now)"
        )

    def _worst_drop_curves(self) -> dict[str, list[tuple[float, float]]]:
        """Per layer: (sparsity, the largest drop at this or any smaller sparsity), so curves only rise."""
        curves = {}
        for layer in self.layers:
            worst, curve = float("-inf"), []
            for row in sorted((r for r in self.rows if r.layer == layer), key=lambda r: r.sparsity):
                worst = max(worst, row.drop)
                curve.append((row.sparsity, worst))
            curves[layer] = curve
        return curves

    def config_list(self, total_sparsity: float) -> list[dict[str, Any]]:
        """:meth:`allocate` as a config list, one entry per layer that gets pruned."""
        return [
            {"op_names": [layer], "sparse_ratio": s} for layer, s in self.allocate(total_sparsity).items() if s > 0
        ]


def _layer_target(target: PruneTarget, name: str, module: nn.Module, sparsity: float) -> PruneTarget:
    """The entry's granularity, applied to this one layer at ``sparsity``."""
    return dataclasses.replace(
        target, op_types=(type(module).__name__,), op_names=(name,), op_partial_names=(), exclude_op_names=(),
        sparse_ratio=sparsity, total_sparsity=None, max_sparse_ratio=None, sparse_threshold=None, weight_threshold=None,
        gradient_threshold=None,
    )


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def _measure(metric: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    """``metric(model)`` as a finite float; anything else would turn every drop into NaN or garbage."""
    value = metric(model)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise ConfigError(f"metric returned {value!r} for {what}; it must return a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"metric returned {number} for {what}; it must return a finite number (check for "
                          "NaN losses or empty evaluation data)")
    return number


def sensitivity_analysis(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    *,
    config_list: Sequence[Mapping[str, Any] | PruneTarget] | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    criterion: str | Criterion = "magnitude",
    stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    higher_is_better: bool = True,
) -> SensitivityResult:
    """Prune each selected layer alone at each sparsity and measure ``metric(model)``.

    ``config_list`` selects the layers and their granularity (default: every Conv and Linear layer, single
    weights). Works on a copy: the model is not changed.
    """
    check_module(model, "sensitivity_analysis")
    if not callable(metric):
        raise ConfigError(f"metric must be a function of the model returning a number, got {metric!r}")
    numbers = isinstance(sparsities, Sequence) and not isinstance(sparsities, str)
    if not numbers or not sparsities or not all(_fraction(s) for s in sparsities):
        raise ConfigError(f"sparsities must be a non-empty list of values in [0, 1), got {sparsities!r}")
    default = [{"op_types": ["Conv1d", "Conv2d", "Conv3d", "Linear"], "sparsity": 0.5}]
    targets = parse_config_list(default if config_list is None else config_list)
    work = copy.deepcopy(model)
    baseline = _measure(metric, work, "the unpruned model")
    rows = []
    for name, sel in select_modules(work, targets).items():
        params = dict(work.named_parameters())
        for sparsity in sparsities:
            cfg = [_layer_target(sel.target, name, sel.module, sparsity)]
            masks = compute_masks(work, cfg, criterion=criterion, stats=stats)
            saved = {k: params[k].detach().clone() for k in masks}
            with torch.no_grad():
                for key, mask in masks.items():
                    params[key].mul_(mask.to(params[key].dtype))
            try:
                value = _measure(metric, work, f"{name} at sparsity {sparsity}")
            finally:
                with torch.no_grad():
                    for key, original in saved.items():
                        params[key].copy_(original)
            drop = baseline - value if higher_is_better else value - baseline
            weight_key = next(k for k in masks if k.rpartition(".")[0] == name)
            rows.append(SensitivityRow(name, float(sparsity), value, drop, params[weight_key].numel()))
    return SensitivityResult(baseline, tuple(rows), higher_is_better)

