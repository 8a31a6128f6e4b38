"""The book's Table 6.1 in one command: the chapter's CIFAR-10 CNN pruned at 10% .. 80% per layer.

The book's protocol: build :class:`~slimtorch.models.BookCNN` (2,122,186 parameters), train one warm-up
epoch, prune both convolutions by L1 norm (``sparse_ratio`` per layer), compact, then train each model
for 10 epochs with Adam (lr 1e-5, weight decay 5e-3, batch 64, pixels scaled to [0, 1]) and report
parameters, training time and test accuracy. The dense row is the warm-up model trained the same 10
epochs. The same sweep then runs with our recipe, each row for fewer epochs than the book's
(:data:`OURS_EPOCH_SHARE`): normalised inputs, AdamW (lr 1e-3, weight decay 0.05) with a cosine schedule,
random flips, and distillation (T = 4, alpha 0.7) from the dense model of the same recipe (the unpruned
teacher), whose logits are computed once (:mod:`slimtorch.recipes.table61_teacher`)::

    slimtorch table61 --data-dir ../shared/data              # the full run (hours on 2 cores)
    slimtorch table61 --data-dir ../shared/data --limit 512 --epochs 1 --sparsities 0.5   # a smoke run

Each row's training time is measured in process CPU seconds as well as wall-clock seconds (evaluation
excluded). Every training run is checkpointed every epoch and every :data:`CHECKPOINT_EVERY` steps, so
``--resume`` continues a killed sweep where it stopped, with the same result and the time of the work done
before the kill.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.compact import compact_
from slimtorch.data.datasets import TensorSplit, load_cifar10
from slimtorch.errors import ConfigError
from slimtorch.models import BookCNN
from slimtorch.prune import apply_masks_, compute_masks
from slimtorch.recipes.table61_report import BOOK_FIGURES, write_table61
from slimtorch.recipes.table61_teacher import TableDistiller, TeacherTable, teacher_table
from slimtorch.recover.distill import DistillConfig
from slimtorch.recover.identity import digest
from slimtorch.recover.trainer import FitResult, TrainConfig, fit
from slimtorch.report import count_nonzero, count_params, model_state

__all__ = ["BOOK_FIGURES", "CHECKPOINT_EVERY", "OURS_EPOCH_SHARE", "RECIPES", "Row", "SweepRecipe", "Table61Config",
           "run_table61"]

#: our recipe's epochs per row as a share of the book's, by sparsity (interpolated): fewer than the book's,
#: so that a row, its share of the teacher table included, costs less CPU time than the book's row
OURS_EPOCH_SHARE = ((0.0, 0.8), (0.5, 0.6), (0.8, 0.3))

#: steps between checkpoints inside an epoch: a killed sweep loses at most this many steps of one row
CHECKPOINT_EVERY = 250


@dataclass(frozen=True, kw_only=True)
class SweepRecipe:
    """How one sweep trains: input normalisation, the training settings, (optionally) distillation from the
    dense row through a teacher table (:mod:`slimtorch.recipes.table61_teacher`), and each row's epochs as a
    share of ``Table61Config.epochs``: ``epoch_share`` holds (sparsity, share) points, interpolated linearly."""

    name: str
    normalize: bool
    train: TrainConfig
    distill: DistillConfig | None = None
    epoch_share: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def epochs(self, sparsity: float) -> int:
        """The row's epochs: its share of ``train.epochs``, rounded, at least one."""
        xs, shares = zip(*sorted(self.epoch_share), strict=True)
        return max(1, round(float(np.interp(sparsity, xs, shares)) * self.train.epochs))


def _recipes(epochs: int, seed: int) -> dict[str, SweepRecipe]:
    book = TrainConfig(epochs=epochs, batch_size=64, lr=1e-5, weight_decay=5e-3, optimizer="adam", seed=seed,
                       checkpoint_every=CHECKPOINT_EVERY)
    # chosen on a 10k-image subset, 5 epochs: flips beat flips + shifts at this short budget (63% vs 60%)
    ours = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, weight_decay=0.05, optimizer="adamw",
                       schedule="cosine", augment="flip", seed=seed, checkpoint_every=CHECKPOINT_EVERY)
    return {"book": SweepRecipe(name="book", normalize=False, train=book),
            "ours": SweepRecipe(name="ours", normalize=True, train=ours,
                                distill=DistillConfig(temperature=4.0, alpha=0.7), epoch_share=OURS_EPOCH_SHARE)}


RECIPES = tuple(_recipes(10, 0))


@dataclass(frozen=True, kw_only=True)
class Table61Config:
    """What to run: ``data_dir`` holds ``cifar10_jpeg.npz``; ``limit`` keeps the first N images of each
    split; ``epochs`` per row of the book's recipe after ``warmup_epochs`` (the book: 10 after 1); our recipe
    trains each row for its share of them (:attr:`SweepRecipe.epoch_share`)."""

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
    """One trained model. ``seconds`` and ``cpu_seconds`` are the row's training time (wall-clock and process
    CPU, evaluation excluded), the teacher table's included where the row distils from one (``teacher_*``)."""

    recipe: str
    sparsity: float
    state: str
    params: int
    nonzero_params: int
    epochs: int
    seconds: float
    cpu_seconds: float | None
    teacher_seconds: float
    teacher_cpu_seconds: float
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


def _warmup_record(result: FitResult) -> dict[str, Any]:
    return {"epochs": len(result.epochs), "seconds": result.train_seconds, "cpu_seconds": result.train_cpu_seconds,
            "accuracy": result.accuracy}


class _Sweep:
    """One recipe's sweep: warm-up, the dense row, (the teacher table), then one row per sparsity."""

    def __init__(self, recipe: SweepRecipe, config: Table61Config, data: TensorSplit, out: Path) -> None:
        self.recipe, self.config, self.checkpoints = recipe, config, out / "checkpoints"
        self.x_train, self.y_train = data.x_train, data.y_train
        self.train_set = TensorDataset(data.x_train, data.y_train)
        self.test_set = TensorDataset(data.x_test, data.y_test)
        self.example = data.x_test[:2]
        self.meta: dict[str, Any] = {}

    def _fit(self, model: nn.Module, name: str, epochs: int, resume: bool, *, schedule: str | None = None,
             loss_fn: TableDistiller | None = None) -> FitResult:
        train = {**self.recipe.train.to_dict(), "epochs": epochs, **({"schedule": schedule} if schedule else {})}
        # the row and its starting weights: a checkpoint of another recipe or warm-up is refused on resume
        context = {"table61": {"recipe": self.recipe.name, "row": name, "start": digest(model.state_dict())}}
        train_set = self.train_set
        if loss_fn is not None:  # the loss looks labels and teacher logits up by sample index
            train_set = TensorDataset(self.x_train, torch.arange(len(self.x_train)))
        return fit(model, train_set, TrainConfig.from_dict(train), loss_fn=loss_fn, eval_data=self.test_set,
                   checkpoint=self.checkpoints / f"{self.recipe.name}-{name}.safetensors", resume=resume,
                   context=context)

    def row(self, model: nn.Module, sparsity: float, result: FitResult, table: TeacherTable | None = None) -> Row:
        t_wall, t_cpu = (table.seconds, table.cpu_seconds) if table is not None else (0.0, 0.0)
        cpu = result.train_cpu_seconds
        return Row(self.recipe.name, sparsity, model_state(model), count_params(model), count_nonzero(model),
                   len(result.epochs), result.train_seconds + t_wall, None if cpu is None else cpu + t_cpu,
                   t_wall, t_cpu, result.accuracy or 0.0, [asdict(e) for e in result.epochs])

    def run(self, resume: bool, report: Callable[[Row], None]) -> list[Row]:
        torch.manual_seed(self.config.seed)
        warm = BookCNN()
        # the warm-up trains at a constant rate (a schedule belongs to each row's own training)
        warmup = self._fit(warm, "warmup", self.config.warmup_epochs, resume, schedule="constant")
        self.meta["warmup"] = _warmup_record(warmup)
        dense = copy.deepcopy(warm)
        rows = [self.row(dense, 0.0, self._fit(dense, "dense", self.recipe.epochs(0.0), resume))]
        report(rows[-1])
        table, loss_fn = None, None
        if self.recipe.distill is not None:
            table = teacher_table(dense, self.x_train, self.checkpoints / f"{self.recipe.name}-teacher.safetensors")
            loss_fn = TableDistiller(table, self.y_train, self.recipe.distill)
            self.meta["teacher_table"] = {"seconds": table.seconds, "cpu_seconds": table.cpu_seconds}
        for sparsity in self.config.sparsities:
            model = copy.deepcopy(warm)
            _prune(model, sparsity, self.example)
            result = self._fit(model, f"s{sparsity:.2f}", self.recipe.epochs(sparsity), resume, loss_fn=loss_fn)
            rows.append(self.row(model, sparsity, result, table))
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

    meta: dict[str, Any] = {"machine": _machine(), "date": datetime.date.today().isoformat(),
                            "config": asdict(config)}

    def report(row: Row) -> None:
        rows.append(row)
        cpu = "-" if row.cpu_seconds is None else f"{row.cpu_seconds:.1f}"
        print(f"{row.recipe:>4} sparsity {row.sparsity:.0%}: {row.params:,} params ({row.state}), {row.epochs} "
              f"epochs, {cpu} CPU s ({row.seconds:.1f} s wall), accuracy {row.accuracy:.2%}", flush=True)
        meta["date"] = datetime.date.today().isoformat()
        write_table61([asdict(r) for r in rows], meta, out)  # after every row: a partial table survives

    for name in config.recipes:
        recipe = recipes[name]
        data = load_cifar10(config.data_dir, limit=config.limit, normalize=recipe.normalize)
        meta[f"{name}_recipe"] = {"normalize": recipe.normalize, "train": recipe.train.to_dict(),
                                  "distill": recipe.distill.to_dict() if recipe.distill else None,
                                  "epoch_share": [list(p) for p in recipe.epoch_share]}
        meta["train_images"], meta["test_images"] = len(data.y_train), len(data.y_test)
        sweep = _Sweep(recipe, config, data, out)
        meta[f"{name}_sweep"] = sweep.meta  # (filled as the sweep goes: warm-up, teacher table)
        sweep.run(resume, report)
    return rows


def load_rows(path: str | Path) -> Sequence[dict[str, Any]]:
    """Rows of a finished run, from its ``table61.json``."""
    return json.loads(Path(path).read_text())["rows"]
