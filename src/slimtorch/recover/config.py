"""``TrainConfig``: the hyper-parameters of :func:`~slimtorch.recover.fit`, checked when it is made.

    >>> from slimtorch.recover import TrainConfig
    >>> TrainConfig(epochs=2, lr=0.1).to_dict()["batch_size"]
    64
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimtorch.checks import check_number
from slimtorch.config import check_fields, recorded_fields
from slimtorch.errors import ConfigError

__all__ = ["AUGMENTS", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
AUGMENTS = ("none", "flip", "flip-crop")


#: fields of TrainConfig added after the last release, with their defaults (see ``TrainConfig.to_dict``)
_ADDED_SINCE_RELEASE: dict[str, Any] = {"fsdp": False}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of :func:`~slimtorch.recover.fit`. ``batch_size`` is the global batch (split across processes);
    ``checkpoint_every`` counts steps (0: at the end of each epoch only); ``grad_topk`` is the fraction
    of each gradient sent under DDP (0: dense all-reduce); ``fsdp`` shards parameters, gradients and optimizer
    state over the processes of a ``torchrun`` launch instead of replicating them (FSDP2, for a model one
    process cannot hold; :mod:`slimtorch.recover.distributed`); ``augment`` flips images left-right
    (``"flip"``) and also shifts them by up to 4 pixels (``"flip-crop"``), drawn from torch's global RNG."""

    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "constant"
    seed: int = 0
    checkpoint_every: int = 0
    grad_topk: float = 0.0
    augment: str = "none"
    fsdp: bool = False

    def __post_init__(self) -> None:
        # numbers first, each of its type (a string "0.1" or a float epoch count would fail mid-training)
        check_number(self.epochs, "epochs", low=0, integer=True)
        check_number(self.batch_size, "batch_size", low=1, integer=True)
        check_number(self.lr, "lr", low=0.0, low_open=True)
        check_number(self.weight_decay, "weight_decay", low=0.0)
        check_number(self.momentum, "momentum", low=0.0)
        check_number(self.seed, "seed", low=0, high=2**31 - 1, integer=True)
        check_number(self.checkpoint_every, "checkpoint_every (steps)", low=0, integer=True)
        check_number(self.grad_topk, "grad_topk (0 = off)", low=0.0, high=1.0)
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}, got {self.augment!r}"),
            (isinstance(self.fsdp, bool), f"fsdp must be True or False, got {self.fsdp!r}"),
            (not (self.fsdp and self.grad_topk), "grad_topk compresses DDP's gradient all-reduce; FSDP reduces "
             "gradient shards instead: set grad_topk=0 with fsdp=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return recorded_fields(self, _ADDED_SINCE_RELEASE)  # (a run's identity: what resume compares)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        check_fields(cls, data, what="training")
        return cls(**data)
