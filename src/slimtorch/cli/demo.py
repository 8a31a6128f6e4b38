"""The offline demo: the whole workflow on scikit-learn's digits, with before/after figures.

Train a small CNN, prune half of its convolution channels (L1 norm), compact it into a really smaller
model, recover the accuracy by distillation from the unpruned model, and report size, speed and
accuracy after every step. Runs in about a minute on two CPU cores and writes ``report.md``,
``report.json``, ``demo.png`` (after each step) and ``layers.png`` (what pruning kept).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from slimtorch.recipes.outputs import stages_markdown, write_outputs
from slimtorch.recipes.plots import plot_layers, plot_stages
from slimtorch.recipes.runner import MEASURE_BATCH, StageResult, run_recipe
from slimtorch.recipes.schema import Recipe
from slimtorch.report import sparsity_table

__all__ = ["before_after_markdown", "demo_recipe", "run_demo"]

CONFIG_LIST = [
    {"op_types": ["Conv2d"], "sparse_ratio": 0.5},
    {"op_names": ["stem.0"], "exclude": True},
]


def demo_recipe(*, epochs: int = 8, finetune_epochs: int = 4, seed: int = 0) -> Recipe:
    """The demo's workflow as a recipe (``slimtorch recipe`` runs the same thing from YAML)."""
    steps: list[dict[str, Any]] = [
        {"train": {"epochs": epochs, "lr": 3e-3, "batch_size": 64, "seed": seed}},
        {"prune": {"config_list": CONFIG_LIST, "criterion": "l1"}},
        {"compact": {}},
    ]
    steps.append({"distill": {"epochs": finetune_epochs, "lr": 1e-3, "batch_size": 64, "seed": seed,
                              "temperature": 4.0, "alpha": 0.7}})
    return Recipe.from_dict({"model": "DigitsCNN", "data": {"dataset": "digits"}, "steps": steps, "seed": seed})


def before_after_markdown(before: StageResult, after: StageResult) -> str:
    """A Markdown table: the trained dense model against the final one, with the ratio after/before."""
    rows = [("parameters", before.params, after.params, "{:,}"), ("FLOPs per batch", before.flops, after.flops, "{:,}"),
            ("size", before.size_bytes / 1e3, after.size_bytes / 1e3, "{:.1f} kB"),
            ("latency per batch", (before.latency_s or 0) * 1e3, (after.latency_s or 0) * 1e3, "{:.2f} ms"),
            ("test accuracy", 100 * before.accuracy, 100 * after.accuracy, "{:.2f}%")]
    lines = [f"| | before ({before.state}) | after ({after.state}) | after / before |", "|---|---:|---:|---:|"]
    for label, old, new, fmt in rows:
        ratio = f"{new / old:.2f}" if old else "-"
        lines.append(f"| {label} | {fmt.format(old)} | {fmt.format(new)} | {ratio} |")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", *, epochs: int = 8, finetune_epochs: int = 4, seed: int = 0) -> dict:
    """Run the demo; returns what ``report.json`` holds."""
    out = Path(out_dir)
    recipe = demo_recipe(epochs=epochs, finetune_epochs=finetune_epochs, seed=seed)
    result = run_recipe(recipe, out, resume=False)
    stages = {s.stage.split(" ", 1)[-1]: s for s in result.stages}
    dense, final = stages["train"], result.stages[-1]
    accuracy = {"dense": dense.accuracy, "pruned": stages["prune"].accuracy, "recovered": final.accuracy}
    summary = {"accuracy": accuracy, "recipe": recipe.to_dict()}
    table = before_after_markdown(dense, final)
    batch = f"batch of {MEASURE_BATCH} test images, {torch.get_num_threads()} thread(s)"
    text = (f"Before: the trained dense model. After: pruned (half the channels of every convolution but the "
            f"first, L1 norm), compacted and recovered by distillation from the dense model. FLOPs and latency "
            f"per {batch}.\n\n{table}")
    figures = {
        "demo.png": lambda path: plot_stages([asdict(s) for s in result.stages], path, title="digits CNN"),
        # kept fractions come from the masks alone, so they read the same for a masked and a compacted model
        "layers.png": lambda path: plot_layers(sparsity_table(result.model, result.masks), path,
                                               title="what pruning kept (per layer)"),
    }
    write_outputs(result, out, title="slimtorch demo: digits CNN", extra=summary, summary=text, more=figures)
    print(f"\n{stages_markdown(result.stages)}\n\n{table}\n\n"
          f"wrote {out}/report.md, report.json, demo.png, layers.png, stages.png, model.safetensors")
    return {**summary, "stages": [asdict(s) for s in result.stages]}
