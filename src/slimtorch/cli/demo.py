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

from slimtorch.models.modelfile import compaction_available
from slimtorch.recipes.outputs import stages_markdown, write_outputs
from slimtorch.recipes.plots import plot_layers, plot_stages
from slimtorch.recipes.runner import run_recipe
from slimtorch.recipes.schema import Recipe
from slimtorch.report import sparsity_table

__all__ = ["demo_recipe", "run_demo"]

CONFIG_LIST = [
    {"op_types": ["Conv2d"], "sparse_ratio": 0.5},
    {"op_names": ["stem.0"], "exclude": True},
]


def demo_recipe(*, epochs: int = 8, finetune_epochs: int = 4, seed: int = 0) -> Recipe:
    """The demo's workflow as a recipe (``slimtorch recipe`` runs the same thing from YAML)."""
    steps: list[dict[str, Any]] = [
        {"train": {"epochs": epochs, "lr": 3e-3, "batch_size": 64, "seed": seed}},
        {"prune": {"config_list": CONFIG_LIST, "criterion": "l1"}},
    ]
    if compaction_available():
        steps.append({"compact": {}})
    steps.append({"distill": {"epochs": finetune_epochs, "lr": 1e-3, "batch_size": 64, "seed": seed,
                              "temperature": 4.0, "alpha": 0.7}})
    return Recipe.from_dict({"model": "DigitsCNN", "data": {"dataset": "digits"}, "steps": steps, "seed": seed})


def run_demo(out_dir: str | Path = "runs/demo", *, epochs: int = 8, finetune_epochs: int = 4, seed: int = 0) -> dict:
    """Run the demo; returns what ``report.json`` holds."""
    out = Path(out_dir)
    recipe = demo_recipe(epochs=epochs, finetune_epochs=finetune_epochs, seed=seed)
    if not compaction_available():
        print("note: this build has no compaction stage; the pruned model stays masked (same size)")
    result = run_recipe(recipe, out, resume=False)
    stages = {s.stage.split(" ", 1)[-1]: s for s in result.stages}
    accuracy = {"dense": stages["train"].accuracy, "pruned": stages["prune"].accuracy,
                "recovered": result.stages[-1].accuracy}
    summary = {"accuracy": accuracy, "recipe": recipe.to_dict()}
    write_outputs(result, out, title="slimtorch demo: digits CNN", extra=summary)
    plot_stages([asdict(s) for s in result.stages], out / "demo.png", title="digits CNN")
    # kept fractions come from the masks alone, so they read the same for a masked and a compacted model
    plot_layers(sparsity_table(result.model, result.masks), out / "layers.png", title="what pruning kept (per layer)")
    dense, final = stages["train"], result.stages[-1]
    print(f"\n{stages_markdown(result.stages)}\n\n"
          f"dense {dense.accuracy:.1%} with {dense.params:,} params -> {final.state} {final.accuracy:.1%} with "
          f"{final.nonzero_params:,} non-zero params ({final.params / dense.params:.0%} of the parameters, "
          f"{(final.latency_s or 0) / (dense.latency_s or 1):.0%} of the latency)\n"
          f"wrote {out}/report.md, report.json, demo.png, layers.png, model.safetensors")
    return {**summary, "stages": [asdict(s) for s in result.stages]}

