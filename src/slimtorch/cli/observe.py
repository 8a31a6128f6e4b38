"""``--observe`` of ``slimtorch prune`` and ``report``: weight histograms (before and after when there is a
before) and activation sparsity on data, as Markdown tables, JSON and two figures."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.cli.common import positive_int
from slimtorch.report import (
    activation_sparsity,
    activation_table,
    compare_weight_histograms,
    weight_histograms,
    weight_table,
)

__all__ = ["OBSERVE_OUTPUTS", "Observation", "add_observe_args", "dataset_batches", "observe"]

#: the figures ``--observe`` writes into ``--out``
OBSERVE_OUTPUTS = ("weights.png", "activations.png")


def add_observe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--observe", action="store_true",
                        help="add per-layer weight histograms (before/after) and activation sparsity (share of "
                             "zeros after ReLU-like ops) as tables, JSON and weights.png / activations.png")
    parser.add_argument("--bins", type=positive_int, default=51, help="histogram bins per layer (with --observe)")


@dataclass
class Observation:
    """What ``--observe`` measured, ready to print, save and draw."""

    text: str
    data: dict[str, Any]
    weights: tuple[dict, dict | None]
    activations: tuple[list, list | None]
    title: str = field(default="")

    def write_figures(self, out: Path) -> None:
        from slimtorch.report.plots import plot_activation_sparsity, plot_weight_histograms

        before, after = self.weights
        plot_weight_histograms(before, out / "weights.png", after=after, title=f"{self.title}: weights")
        rows, later = self.activations
        plot_activation_sparsity(rows, out / "activations.png", after=later,
                                 title=f"{self.title}: share of zeros after ReLU-like ops")


def observe(model: nn.Module, batches: Sequence[Any], *, before: nn.Module | None = None, data_label: str,
            bins: int = 51, title: str = "model") -> Observation:
    """Weight histograms of ``model`` (beside ``before``'s on the same bins, when given) and its activation
    sparsity on ``batches`` (and ``before``'s), described by ``data_label``."""
    if before is not None:
        first, second = compare_weight_histograms(before, model, bins=bins)
        rows, later = activation_sparsity(before, batches), activation_sparsity(model, batches)
    else:
        first, second = weight_histograms(model, bins=bins), None
        rows, later = activation_sparsity(model, batches), None
    heading = "before and after" if before is not None else "of this model"
    text = (f"## Weights, {heading}\n\n{weight_table(first, second)}\n\n"
            f"## Activation sparsity ({data_label}), {heading}\n\n{activation_table(rows, later)}")
    data = {"weights": {n: h.to_dict() for n, h in first.items()},
            "activations": [r.to_dict() for r in rows], "activation_data": data_label}
    if before is not None:
        data = {"before": data, "after": {"weights": {n: h.to_dict() for n, h in (second or {}).items()},
                                          "activations": [r.to_dict() for r in later or []],
                                          "activation_data": data_label}}
    return Observation(text, data, (first, second), (rows, later), title)


def dataset_batches(x: torch.Tensor, batch_size: int = 256, count: int = 8) -> list[torch.Tensor]:
    """The first ``count`` batches of ``x`` (test images): enough for stable shares, quick on a CPU."""
    return [x[i:i + batch_size] for i in range(0, min(len(x), batch_size * count), batch_size)]
