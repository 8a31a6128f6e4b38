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


def _cpu(row: Mapping[str, Any]) -> float | None:
    return row.get("cpu_seconds")


def _cells(row: Mapping[str, Any] | None) -> list[str]:
    if row is None:
        return ["-"] * 4
    cpu = _cpu(row)
    return [str(row.get("epochs", "-")), "-" if cpu is None else _seconds(cpu), _seconds(row["seconds"]),
            f"{row['accuracy']:.2%}"]


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 100 else f"{value:.1f} s"


def _ratio(ours: Mapping[str, Any] | None, book: Mapping[str, Any] | None) -> str:
    if ours is None or book is None or not _cpu(ours) or not _cpu(book):
        return "-"
    return f"{_cpu(ours) / _cpu(book):.2f}"


def table61_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """One line per sparsity: parameters, then epochs, CPU seconds, wall-clock seconds and accuracy per recipe
    (with our CPU time over the book recipe's when both ran), then the book's published time and accuracy."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    by_key = {(r["recipe"], round(r["sparsity"], 4)): r for r in rows}
    sparsities = sorted({round(r["sparsity"], 4) for r in rows})
    both = "book" in recipes and "ours" in recipes
    head = ["sparsity per layer", "params"]
    for n in recipes:
        head += [f"{n}: epochs", f"{n}: CPU time", f"{n}: wall time", f"{n}: accuracy"]
    head += ["ours / book CPU time"] * both + ["book's table: time", "book's table: accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for s in sparsities:
        first = next(by_key[(n, s)] for n in recipes if (n, s) in by_key)
        params = f"{first['params']:,}" + ("" if first["state"] != "masked" else f" ({first['nonzero_params']:,} nz)")
        cells = [f"{'dense' if s == 0 else f'{s:.0%}'}", params]
        for n in recipes:
            cells += _cells(by_key.get((n, s)))
        if both:
            cells.append(_ratio(by_key.get(("ours", s)), by_key.get(("book", s))))
        book = _book(s)
        cells += [f"{book[0]:.0f} s", f"{book[1]:.2%}"] if book else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(meta: Mapping[str, Any]) -> str:
    """The warm-up and the teacher table of each sweep: their time is not in any row's (the table's is, in
    every row that distils from it)."""
    notes = []
    for name in ("book", "ours"):
        sweep = meta.get(f"{name}_sweep") or {}
        warm, table = sweep.get("warmup"), sweep.get("teacher_table")
        if warm:
            cpu = "-" if warm.get("cpu_seconds") is None else f"{warm['cpu_seconds']:.0f}"
            acc = "" if warm.get("accuracy") is None else f", accuracy {warm['accuracy']:.2%}"
            notes.append(f"{name} recipe warm-up: {warm['epochs']} epoch(s), {cpu} CPU s ({warm['seconds']:.0f} s "
                         f"wall){acc}")
        if table:
            notes.append(f"{name} recipe teacher table: {table['cpu_seconds']:.0f} CPU s ({table['seconds']:.0f} s "
                         "wall), counted in every distilled row's time")
    return "".join(f"- {n}.\n" for n in notes)


def _plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        own = sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in own]
        acc_ax.plot(xs, [100 * r["accuracy"] for r in own], marker="o", label=f"{name} recipe (measured)")
        time_ax.plot(xs, [_cpu(r) or r["seconds"] for r in own], marker="o", label=f"{name} recipe (CPU s, measured)")
    book = sorted(BOOK_FIGURES.items())
    acc_ax.plot([100 * s for s, _ in book], [100 * a for _, (_, a) in book], "k--", marker="x", label="book's table")
    time_ax.plot([100 * s for s, _ in book], [t for _, (t, _) in book], "k--", marker="x",
                 label="book's table (its own machine)")
    acc_ax.set(xlabel="sparsity per conv layer (%)", ylabel="test accuracy (%)", title="CIFAR-10 accuracy")
    time_ax.set(xlabel="sparsity per conv layer (%)", ylabel="training time per row (s)", title="training time")
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
            f"{meta['config']['warmup_epochs']} warm-up epoch(s), then each row's epochs ({meta['config']['epochs']} "
            "for the book's recipe). Times are the row's training (evaluation excluded): process CPU seconds and "
            "wall-clock seconds.\n\n" + _notes(meta))
    with atomic_folder(out) as staging:  # the three files together (the folder's checkpoints stay)
        (staging / names[0]).write_text(text)
        (staging / names[1]).write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2))
        _plot(rows, staging / names[2])
    return [out / name for name in names]
