"""Table 6.1's outputs: a Markdown table side by side with the book's figures, JSON, and a plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimtorch.atomic import atomic_folder, save_figure
from slimtorch.recipes.plots import pyplot

__all__ = ["BOOK_FIGURES", "table61_markdown", "write_table61"]

#: The book's Table 6.1 (sparsity per layer -> training seconds, test accuracy); 0.0 is its dense model.
BOOK_FIGURES: dict[float, tuple[float, float]] = {
    0.0: (122, 0.4710), 0.1: (118, 0.4726), 0.2: (113, 0.4584), 0.3: (107, 0.4466), 0.4: (100, 0.4518),
    0.5: (89, 0.4271), 0.6: (84, 0.4190), 0.7: (81, 0.4084), 0.8: (76, 0.3887),
}


def _book(sparsity: float) -> tuple[float, float] | None:
    return BOOK_FIGURES.get(round(sparsity, 2))


def table61_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """One line per sparsity: parameters, then training time and accuracy per recipe, then the book's."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    by_key = {(r["recipe"], round(r["sparsity"], 4)): r for r in rows}
    sparsities = sorted({round(r["sparsity"], 4) for r in rows})
    head = "| sparsity per layer | params | " + " | ".join(f"{n} recipe: time | {n} recipe: accuracy" for n in recipes)
    lines = [head + " | book's table: time | book's table: accuracy |",
             "|---:|---:|" + "---:|---:|" * len(recipes) + "---:|---:|"]
    for s in sparsities:
        first = next(by_key[(n, s)] for n in recipes if (n, s) in by_key)
        params = f"{first['params']:,}" + ("" if first["state"] != "masked" else f" ({first['nonzero_params']:,} nz)")
        cells = [f"{'dense' if s == 0 else f'{s:.0%}'}", params]
        for n in recipes:
            r = by_key.get((n, s))
            cells += [f"{r['train_seconds']:.0f} s", f"{r['accuracy']:.2%}"] if r else ["-", "-"]
        book = _book(s)
        cells += [f"{book[0]:.0f} s", f"{book[1]:.2%}"] if book else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        own = sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in own]
        acc_ax.plot(xs, [100 * r["accuracy"] for r in own], marker="o", label=f"{name} recipe (measured)")
        time_ax.plot(xs, [r["train_seconds"] for r in own], marker="o", label=f"{name} recipe (measured)")
    book = sorted(BOOK_FIGURES.items())
    acc_ax.plot([100 * s for s, _ in book], [100 * a for _, (_, a) in book], "k--", marker="x", label="book's table")
    time_ax.plot([100 * s for s, _ in book], [t for _, (t, _) in book], "k--", marker="x", label="book's table")
    acc_ax.set(xlabel="sparsity per conv layer (%)", ylabel="test accuracy (%)", title="CIFAR-10 accuracy")
    time_ax.set(xlabel="sparsity per conv layer (%)", ylabel="training time (s)", title="training time")
    for ax in (acc_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_table61(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``table61.md``, ``table61.json`` and ``table61.png``; returns their paths."""
    out = Path(out_dir)
    names = ["table61.md", "table61.json", "table61.png"]
    limit = meta["config"].get("limit")
    text = (f"# Table 6.1: BookCNN on CIFAR-10, pruned per layer\n\n{table61_markdown(rows, meta)}\n\n"
            f"Machine: {meta['machine']}. Date: {meta['date']}. Data: {meta.get('train_images')} training and "
            f"{meta.get('test_images')} test images{' (subset)' if limit else ''}; "
            f"{meta['config']['warmup_epochs']} warm-up epoch(s), then {meta['config']['epochs']} epochs per row. "
            "Times are training seconds (evaluation excluded).\n")
    with atomic_folder(out) as staging:  # the three files together (the folder's checkpoints stay)
        (staging / names[0]).write_text(text)
        (staging / names[1]).write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2))
        _plot(rows, staging / names[2])
    return [out / name for name in names]
