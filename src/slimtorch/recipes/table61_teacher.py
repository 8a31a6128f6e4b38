"""Our recipe's teacher for Table 6.1, run once: the dense model's logits on every training image.

Distilling the way :class:`~slimtorch.recover.distill.Distiller` does runs the teacher at every step of every
pruned row, which costs more than the pruned student's own step (a dense forward pass is about a third of a
dense training step, and a student at 50% takes about a third of one). Here the teacher runs over the training
set once, on each image and on its mirror image, and the two outputs are averaged: the training flips
images left-right at random, and the average is the same target for an image and for its mirror, so the table
holds for either. Each pruned row then distils from the table; its time column is charged the table's
time in full (as if the row had computed it alone).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x = torch.randn(5, 3, 2, 2)
    >>> table = teacher_table(net, x)
    >>> table.logits.shape, torch.allclose(table.logits, (net(x) + net(x.flip(-1))).detach() / 2)
    (torch.Size([5, 3]), True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.graph.run import temporary_mode
from slimtorch.recover.checkpoint import read_checkpoint, write_checkpoint
from slimtorch.recover.distill import DistillConfig, distill_loss
from slimtorch.recover.identity import digest

__all__ = ["TableDistiller", "TeacherTable", "teacher_table"]


@dataclass(frozen=True)
class TeacherTable:
    """The teacher's flip-averaged logits, (N, classes), and what computing them cost."""

    logits: torch.Tensor
    seconds: float
    cpu_seconds: float
    key: str  # digest of the teacher's weights and the images: names the table in a resumed run's checks


@torch.no_grad()
def _logits(teacher: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with temporary_mode(teacher, training=False):
        # (B, classes) per chunk: mean of the image's and its mirror's logits
        return torch.cat([(teacher(c) + teacher(c.flip(-1))) / 2 for c in x.split(batch_size)])


def teacher_table(teacher: nn.Module, x: torch.Tensor, path: str | Path | None = None, *,
                  batch_size: int = 256) -> TeacherTable:
    """The table for ``teacher`` on images ``x`` (N, C, H, W). With ``path``, a table saved there for the same
    teacher and images is reused (with the time it cost then); otherwise it is computed and saved there."""
    key = digest({"teacher": teacher.state_dict(), "images": x})
    if path is not None and Path(path).is_file():
        try:
            tensors, meta = read_checkpoint(path)
        except CheckpointError:
            meta = {}
        if meta.get("key") == key and "logits" in tensors:
            return TeacherTable(tensors["logits"], float(meta["seconds"]), float(meta["cpu_seconds"]), key)
    start, start_cpu = time.perf_counter(), time.process_time()
    logits = _logits(teacher, x, batch_size)
    table = TeacherTable(logits, time.perf_counter() - start, time.process_time() - start_cpu, key)
    if path is not None:
        write_checkpoint(path, {"logits": logits}, {"key": key, "seconds": table.seconds,
                                                    "cpu_seconds": table.cpu_seconds})
    return table


@dataclass(frozen=True)
class _Settings:
    """What decides this loss (the checkpoint of a row records it, so a resume with another table refuses)."""

    distill: DistillConfig
    table: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.distill.to_dict(), "teacher_table": self.table}


class TableDistiller:
    """``loss_fn(model, x, index)``: the distillation loss of :func:`~slimtorch.recover.distill.distill_loss`
    against the table's rows ``index``, with the labels ``labels[index]``. The training data hands over
    sample indices as its targets (``TensorDataset(x, torch.arange(len(x)))``)."""

    def __init__(self, table: TeacherTable, labels: torch.Tensor, config: DistillConfig) -> None:
        if len(labels) != len(table.logits):
            raise ConfigError(f"the teacher table has {len(table.logits)} rows for {len(labels)} labels; "
                                  "delete the saved table to compute it afresh")
        self.logits, self.labels = table.logits, labels
        self.config = _Settings(config, table.key)

    def __call__(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        cfg = self.config.distill
        return distill_loss(model(x), self.logits[index], self.labels[index], temperature=cfg.temperature,
                            alpha=cfg.alpha)
