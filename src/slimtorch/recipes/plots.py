"""PNG figures for recipes, the demo and the experiments (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimtorch.atomic import save_figure
from slimtorch.report.plots import pyplot

__all__ = ["plot_layers", "plot_stages"]


def plot_layers(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "kept per layer") -> None:
    """Bar chart of the fraction of output units and of weights kept per pruned weight
    (``rows`` from :func:`slimtorch.report.sparsity_table`)."""
    plt = pyplot()
    weights = [r for r in rows if str(r["param"]).endswith("weight")]
    names = [str(r["param"]).removesuffix(".weight") for r in weights]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.8))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["units_kept"] / r["units"] for r in weights], 0.4, label="output units kept")
    ax.bar([x + 0.2 for x in xs], [r["kept"] / r["total"] for r in weights], 0.4, label="weights kept")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _ratios(ax, stages: Sequence[Mapping[str, Any]]) -> None:
    """Grouped bars: parameters, FLOPs, size and latency of every stage relative to the first trained one."""
    base = next((s for s in stages if s["history"]), stages[0])
    metrics = [("params", "params"), ("non-zero", "nonzero_params"), ("FLOPs", "flops"), ("size", "size_bytes"),
               ("latency", "latency_s")]
    width = 0.8 / len(metrics)
    for j, (label, key) in enumerate(metrics):
        values = [(s.get(key) or 0) / base[key] if base.get(key) else 0.0 for s in stages]
        # bar j of each group sits at its stage's index, offset so that the group is centred on it
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(stages))], values, width, label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(stages)), [s["stage"] for s in stages], rotation=20)
    ax.set_ylabel(f"relative to '{base['stage']}'")
    ax.set_title("size and speed (lower is better)")
    ax.legend(fontsize=8)


def _curves(ax, stages: Sequence[Mapping[str, Any]]) -> None:
    epoch = 0
    for s in stages:
        if not s["history"]:
            continue
        xs = [epoch + h["epoch"] + 1 for h in s["history"]]
        ax.plot(xs, [100 * (h["accuracy"] or 0.0) for h in s["history"]], marker="o", label=s["stage"])
        epoch = xs[-1]
    ax.set_xlabel("epoch (all training steps in order)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy while training")
    if epoch:
        ax.legend()


def plot_stages(stages: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "workflow") -> None:
    """Three panels: test accuracy after every stage; parameters, FLOPs, size and latency relative to the trained
    dense model; test accuracy per training epoch."""
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    acc = [100 * s["accuracy"] for s in stages]
    left.bar([s["stage"] for s in stages], acc, color="tab:blue")
    for i, s in enumerate(stages):
        left.text(i, acc[i] + 1, f"{acc[i]:.1f}%\n{s['nonzero_params']:,} nz\n{s['state']}", ha="center", fontsize=8)
    left.set_ylim(0, 125)
    left.set_ylabel("test accuracy (%)")
    left.set_title(f"{title}: after each step")
    left.tick_params(axis="x", rotation=20)
    _ratios(middle, stages)
    _curves(right, stages)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
