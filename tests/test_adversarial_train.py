"""Adversarial table for training: ``fit`` and its settings, and distillation. A bad setting, bad data or a
training that diverges is a typed error naming it, and the model, the loss module and the files on disk are as
they were before the call (:func:`adversarial.fails_cleanly`): a diverged run never hands back a model full of
NaN. Resuming has its own table (``test_adversarial_resume.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adversarial import fails_cleanly
from slimtorch.errors import ConfigError, TraceError
from slimtorch.recover import DistillConfig, Distiller, TrainConfig, distill_loss, fit

NAN, INF = float("nan"), float("inf")


class Ctx:
    """A student MLP, a teacher, 32 samples of 6 features in 3 classes, and a scratch folder."""

    def __init__(self, tmp: Path) -> None:
        torch.manual_seed(0)
        self.tmp = tmp
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        self.data = TensorDataset(self.x, self.y)
        self.arg: Any = None
        (tmp / "ck").mkdir()

    def models(self) -> list[nn.Module]:
        return [self.net, self.teacher]


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    fragment: str
    setup: Callable[[Ctx], Any] | None = None  # what the user did before (part of the state compared)


def _config(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, **kw})


def _data(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x, y)


class _Pairs:
    """A dataset whose samples are single tensors, not (x, y) pairs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(6)


def _nan_teacher(ctx: Ctx) -> Distiller:
    with torch.no_grad():
        ctx.teacher[2].bias.fill_(NAN)
    return Distiller(ctx.teacher, ctx.net)


FIT = [
    Case("fit: a learning rate that diverges", lambda c: fit(c.net, c.data, _config(lr=1e30, optimizer="sgd")),
         ConfigError, "the training diverged: lower the learning rate (lr=1e+30)"),
    Case("fit: NaN in the training data", lambda c: fit(c.net, _data(c.x.clone().fill_(NAN), c.y), _config()),
         ConfigError, "the batch's inputs hold NaN or infinite values"),
    Case("fit: one infinite sample among finite ones", lambda c: fit(
        c.net, _data(torch.cat([c.x[:31], torch.full((1, 6), INF)]), c.y), _config(batch_size=32)), ConfigError,
         "at step 1 of epoch 1; the batch's inputs hold NaN or infinite values"),
    Case("fit: a label beyond the model's classes", lambda c: fit(c.net, _data(c.x, c.y.clone().fill_(7)), _config()),
         TraceError, "Target 7 is out of bounds"),
    Case("fit: samples that are not (x, y) pairs", lambda c: fit(c.net, _Pairs(8), _config()), TraceError,
         "values to unpack"),
    Case("fit: samples of the wrong width", lambda c: fit(c.net, _data(torch.randn(8, 5), c.y[:8]), _config()),
         TraceError, "mat1 and mat2 shapes cannot be multiplied"),
    Case("fit: a generator instead of a dataset", lambda c: fit(c.net, (s for s in c.data), _config()), ConfigError,
         "map-style dataset"),
    Case("fit: the settings as a dict", lambda c: fit(c.net, c.data, {"epochs": 1}), ConfigError,
         "TrainConfig.from_dict"),
    Case("fit: a model with nothing to train", lambda c: fit(c.net, c.data, _config()), ConfigError,
         "no trainable parameter", setup=lambda c: c.net.requires_grad_(False)),
    Case("fit: a checkpoint path that is a folder (nothing trained)", lambda c: fit(
        c.net, c.data, _config(), checkpoint=c.tmp / "ck"), ConfigError, "is a folder"),
    Case("fit: a checkpoint under a file (nothing trained)", lambda c: fit(
        c.net, c.data, _config(), checkpoint=c.tmp / "a_file" / "ck.safetensors"), ConfigError,
         "exists and is not a folder"),
    Case("fit: a loss that is not a scalar", lambda c: fit(c.net, c.data, _config(), loss_fn=lambda m, x, y: m(x)),
         TraceError, "grad can be implicitly created only for scalar outputs"),
    Case("fit: a distillation teacher with NaN outputs", lambda c: fit(c.net, c.data, _config(), loss_fn=c.arg),
         ConfigError, "a distillation teacher's NaN outputs", setup=_nan_teacher),
]

SETTINGS = [
    Case("TrainConfig: fractional epochs", lambda c: _config(epochs=1.5), ConfigError, "epochs must be an integer"),
    Case("TrainConfig: infinite learning rate", lambda c: _config(lr=INF), ConfigError, "lr must be a finite number"),
    Case("TrainConfig: learning rate as text", lambda c: _config(lr="0.1"), ConfigError, "got '0.1'"),
    Case("TrainConfig: negative seed", lambda c: _config(seed=-1), ConfigError, "seed must be an integer"),
    Case("TrainConfig: batch size as a float", lambda c: _config(batch_size=8.0), ConfigError,
         "batch_size must be an integer"),
    Case("TrainConfig: NaN momentum", lambda c: _config(momentum=NAN), ConfigError, "momentum"),
]

DISTILL = [
    Case("distill: the student is its own teacher", lambda c: Distiller(c.net, c.net), ConfigError,
         "the teacher and the student are the same model object"),
    Case("distill: a teacher scoring other classes", lambda c: fit(
        c.net, c.data, _config(), loss_fn=Distiller(nn.Linear(6, 5), c.net)), ConfigError,
         "the student's logits are (8, 3) but the teacher's (8, 5)"),
    Case("distill_loss: logits of two batch sizes", lambda c: distill_loss(
        torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1])), ConfigError, "(2, 3) but the teacher's (3, 3)"),
    Case("distill_loss: a label beyond the classes", lambda c: distill_loss(
        torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 9])), ConfigError, "label 9 is not one of the 3"),
    Case("distill_loss: logits as lists", lambda c: distill_loss([[1.0, 2.0]], torch.randn(1, 2), torch.tensor([0])),
         ConfigError, "the student gave list"),
    Case("distill: a NaN temperature in the config", lambda c: DistillConfig(temperature=NAN), ConfigError,
         "temperature"),
]

CASES = FIT + SETTINGS + DISTILL


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adversarial_training(case: Case, tmp_path: Path) -> None:
    ctx = Ctx(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    ctx.arg = case.setup(ctx) if case.setup is not None else None
    fails_cleanly(lambda: case.call(ctx), case.error, case.fragment, models=ctx.models(), paths=[tmp_path])


def test_the_table_covers_enough_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 25


def test_an_ignored_label_is_not_out_of_range() -> None:
    """cross_entropy's ignore_index (-100) is a valid label for distillation's task term."""
    loss = distill_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, -100]))
    assert torch.isfinite(loss)
