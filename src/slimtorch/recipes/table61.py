"""The book's Table 6.1 in one command: the chapter's CIFAR-10 CNN pruned at 10% .. 80% per layer.

The book's protocol: build :class:`~slimtorch.models.BookCNN` (2,122,186 parameters), train one warm-up
epoch, prune both convolutions by L1 norm (``sparse_ratio`` per layer), compact, then train each model
for 10 epochs with Adam (lr 1e-5, weight decay 5e-3, batch 64, pixels scaled to [0, 1]) and report
parameters, training time and test accuracy. The dense row is the warm-up model trained the same 10
epochs. The same sweep then runs with our recipe at the same epoch budget: normalised inputs, AdamW
(lr 1e-3, weight decay 0.05) with a cosine schedule, random flips, and distillation (T = 4, alpha 0.7)
from the dense model of the same recipe (the unpruned teacher)::

    slimtorch table61 --data-dir ../shared/data              # the full run (hours on 2 cores)
    slimtorch table61 --data-dir ../shared/data --limit 512 --epochs 1 --sparsities 0.5   # a smoke run

Every training run is checkpointed, so ``--resume`` continues a killed sweep where it stopped.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.compact import compact_
from slimtorch.data.datasets import TensorSplit, load_cifar10
from slimtorch.errors import ConfigError
from slimtorch.models import BookCNN
from slimtorch.prune import apply_masks_, compute_masks
from slimtorch.recipes.table61_report import BOOK_FIGURES, write_table61
from slimtorch.recover.distill import DistillConfig
from slimtorch.recover.stages import distill_
from slimtorch.recover.trainer import FitResult, TrainConfig, fit
from slimtorch.report import count_nonzero, count_params, model_state

__all__ = ["BOOK_FIGURES", "RECIPES", "SweepRecipe", "Table61Config", "run_table61"]

@dataclass(frozen=True, kw_only=True)
class SweepRecipe:
    """How one sweep trains: input normalisation, the training settings and (optionally) distillation."""

    name: str
    normalize: bool
    train: TrainConfig
    distill: DistillConfig | None = None


def _recipes(epochs: int, seed: int) -> dict[str, SweepRecipe]:
    book = TrainConfig(epochs=epochs, batch_size=64, lr=1e-5, weight_decay=5e-3, optimizer="adam", seed=seed)
    # chosen on a 10k-image subset, 5 epochs: flips beat flips + shifts at this short budget (63% vs 60%)
    ours = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, weight_decay=0.05, optimizer="adamw",
                       schedule="cosine", augment="flip", seed=seed)
    return {"book": SweepRecipe(name="book", normalize=False, train=book),
            "ours": SweepRecipe(name="ours", normalize=True, train=ours,
                                distill=DistillConfig(temperature=4.0, alpha=0.7))}


RECIPES = tuple(_recipes(10, 0))


@dataclass(frozen=True, kw_only=True)
class Table61Config:
    """What to run: ``data_dir`` holds ``cifar10_jpeg.npz``; ``limit`` keeps the first N images of each
    split; ``epochs`` per row after ``warmup_epochs`` (the book: 10 after 1)."""

    data_dir: str
    limit: int | None = None
    epochs: int = 10
    warmup_epochs: int = 1
    sparsities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    recipes: tuple[str, ...] = ("book", "ours")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ConfigError(f"sparsities must be fractions in (0, 1), e.g. 0.1 0.5 0.8; got {list(self.sparsities)}")
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise ConfigError(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
        if self.epochs < 1 or self.warmup_epochs < 0:
            raise ConfigError(f"need epochs >= 1 and warmup_epochs >= 0, got {self.epochs} and {self.warmup_epochs}")


@dataclass(frozen=True)
class Row:
    recipe: str
    sparsity: float
    state: str
    params: int
    nonzero_params: int
    train_seconds: float
    accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _prune(model: nn.Module, sparsity: float, example: torch.Tensor) -> str:
    """Prune both convolutions by L1 norm, then compact: the filters go, and with them conv2's and fc1's
    matching inputs (compaction checks on ``example`` that the result computes what the masked model does).
    Returns the model's state (``"compacted"``)."""
    config_list = [{"op_types": ["Conv2d"], "sparse_ratio": sparsity}]
    masks = compute_masks(model, config_list, criterion="l1")
    apply_masks_(model, masks)
    compact_(model, masks, example_inputs=example)
    return model_state(model)


class _Sweep:
    """One recipe's sweep: warm-up, the dense row, then one row per sparsity."""

    def __init__(self, recipe: SweepRecipe, config: Table61Config, data: TensorSplit, out: Path) -> None:
        self.recipe, self.config, self.out = recipe, config, out
        self.train_set = TensorDataset(data.x_train, data.y_train)
        self.test_set = TensorDataset(data.x_test, data.y_test)
        self.example = data.x_test[:2]

    def _fit(self, model: nn.Module, name: str, resume: bool, teacher: nn.Module | None = None) -> FitResult:
        checkpoint = self.out / "checkpoints" / f"{self.recipe.name}-{name}.safetensors"
        if teacher is not None and self.recipe.distill is not None:
            return distill_(model, teacher, self.train_set, self.recipe.train, distill=self.recipe.distill,
                            eval_data=self.test_set, checkpoint=checkpoint, resume=resume)
        return fit(model, self.train_set, self.recipe.train, eval_data=self.test_set, checkpoint=checkpoint,
                   resume=resume)

    def warm_model(self, resume: bool) -> nn.Module:
        torch.manual_seed(self.config.seed)
        model = BookCNN()
        warm = TrainConfig.from_dict({**self.recipe.train.to_dict(), "epochs": self.config.warmup_epochs,
                                      "schedule": "constant"})
        checkpoint = self.out / "checkpoints" / f"{self.recipe.name}-warmup.safetensors"
        fit(model, self.train_set, warm, checkpoint=checkpoint, resume=resume)
        return model

    def row(self, model: nn.Module, sparsity: float, result: FitResult) -> Row:
        return Row(self.recipe.name, sparsity, model_state(model), count_params(model), count_nonzero(model),
                   result.train_seconds, result.accuracy or 0.0, [asdict(e) for e in result.epochs])

    def run(self, resume: bool, report: Any) -> list[Row]:
        warm = self.warm_model(resume)
        dense = copy.deepcopy(warm)
        rows = [self.row(dense, 0.0, self._fit(dense, "dense", resume))]
        report(rows[-1])
        for sparsity in self.config.sparsities:
            model = copy.deepcopy(warm)
            _prune(model, sparsity, self.example)
            rows.append(self.row(model, sparsity, self._fit(model, f"s{sparsity:.2f}", resume, teacher=dense)))
            report(rows[-1])
        return rows


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}"


def run_table61(config: Table61Config, out_dir: str | Path, *, resume: bool = False) -> list[Row]:
    """Run the sweep(s); writes ``table61.md``, ``table61.json`` and ``table61.png`` into ``out_dir``."""
    out = Path(out_dir)
    recipes = _recipes(config.epochs, config.seed)
    rows: list[Row] = []

    def report(row: Row) -> None:
        rows.append(row)
        print(f"{row.recipe:>4} sparsity {row.sparsity:.0%}: {row.params:,} params ({row.state}), "
              f"{row.train_seconds:.1f} s, accuracy {row.accuracy:.2%}", flush=True)

    meta = {"machine": _machine(), "date": datetime.date.today().isoformat(), "config": asdict(config)}
    for name in config.recipes:
        recipe = recipes[name]
        data = load_cifar10(config.data_dir, limit=config.limit, normalize=recipe.normalize)
        meta[f"{name}_recipe"] = {"normalize": recipe.normalize, "train": recipe.train.to_dict(),
                                  "distill": recipe.distill.to_dict() if recipe.distill else None}
        meta["train_images"], meta["test_images"] = len(data.y_train), len(data.y_test)
        _Sweep(recipe, config, data, out).run(resume, report)
        write_table61([asdict(r) for r in rows], meta, out)  # after every sweep: a partial table survives
    return rows


def load_rows(path: str | Path) -> Sequence[dict[str, Any]]:
    """Rows of a finished run, from its ``table61.json``."""
    return json.loads(Path(path).read_text())["rows"]
