"""PNG figures of what :mod:`slimtorch.report.observe` measured (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimtorch.atomic import save_figure
from slimtorch.report.observe import ActivationSparsity, WeightHistogram

__all__ = ["plot_activation_sparsity", "plot_weight_histograms", "pyplot"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; an ImportError naming the extra to install without it."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PNG plots need matplotlib: pip install 'slimtorch[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, h: WeightHistogram, label: str, color: str) -> None:
    widths = [b - a for a, b in zip(h.edges[:-1], h.edges[1:], strict=True)]
    ax.bar(h.edges[:-1], h.counts, width=widths, align="edge", alpha=0.55, color=color,
           label=f"{label}: {h.zero_share:.0%} zeros")


def plot_weight_histograms(before: Mapping[str, WeightHistogram], path: str | Path, *,
                           after: Mapping[str, WeightHistogram] | None = None, title: str = "weights") -> None:
    """One panel per weight: the histogram of its values (log counts: pruning's spike at zero and the tails
    both show), with ``after`` laid over ``before`` on the same bins (:func:`compare_weight_histograms`)."""
    plt = pyplot()
    names = list(before)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        _bars(ax, before[name], "before" if after is not None else "values", "tab:blue")
        if after is not None:
            _bars(ax, after[name], "after", "tab:orange")
        ax.set_yscale("log")
        ax.set_title(name.removesuffix(".weight"), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_activation_sparsity(rows: Sequence[ActivationSparsity], path: str | Path, *,
                             after: Sequence[ActivationSparsity] | None = None,
                             title: str = "activation sparsity") -> None:
    """Bars: the share of zeros in each ReLU-like op's outputs (with ``after``: both models', by op)."""
    plt = pyplot()
    later = {r.op: r for r in after or ()}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2), 3.8))
    width = 0.4 if after is not None else 0.8
    xs = range(len(rows))
    ax.bar([x - width / 2 if after is not None else x for x in xs], [r.sparsity for r in rows], width,
           label="before" if after is not None else "zeros")
    if after is not None:
        ax.bar([x + width / 2 for x in xs], [later[r.op].sparsity if r.op in later else 0.0 for r in rows], width,
               label="after")
    ax.set_xticks(list(xs), [r.op for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of zeros in the outputs")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
