"""Recipes: a whole workflow (train, prune, compact, distil, fine-tune) as one YAML file.

    >>> from slimtorch.recipes.schema import Recipe
    >>> recipe = Recipe.from_dict({
    ...     "model": "DigitsCNN",
    ...     "data": {"dataset": "digits"},
    ...     "steps": [
    ...         {"train": {"epochs": 4, "lr": 0.003}},
    ...         {"prune": {"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]}},
    ...         {"compact": {}},
    ...         {"distill": {"epochs": 2, "temperature": 4.0}},
    ...     ],
    ... })
    >>> [s.kind for s in recipe.steps], recipe.steps[3].distill.temperature
    (['train', 'prune', 'compact', 'distill'], 4.0)

Every step is a mapping with one key, its kind: ``train`` / ``finetune`` (keys of
:class:`~slimtorch.recover.TrainConfig`), ``prune`` (``config_list``, ``criterion``), ``compact`` (no
keys), ``distill`` (training keys plus ``temperature``, ``alpha``, ``features``, ``feature_weight`` and
``teacher``: ``"dense"``, the model as it was before the first prune step, or a saved model file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtorch.checks import check_number
from slimtorch.config import parse_config_list, read_yaml
from slimtorch.data.sources import DATASETS
from slimtorch.errors import ConfigError, closest
from slimtorch.prune.criteria import get_criterion
from slimtorch.recover.distill import DistillConfig
from slimtorch.recover.trainer import TrainConfig

__all__ = ["STEP_KINDS", "DataSpec", "Recipe", "Step", "load_recipe"]

STEP_KINDS = ("train", "finetune", "prune", "compact", "distill")
_DISTILL_KEYS = {"temperature", "alpha", "features", "feature_weight"}
#: Larger images than this are surely a typo (a 4096 x 4096 RGB batch of 64 takes 12 GB).
_MAX_IMAGE_SIZE = 4096


def _check_keys(data: Any, allowed: set[str], what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}: {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {unknown}; allowed: {sorted(allowed)}")
    return data


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Which dataset: one of ``digits``, ``mnist``, ``cifar10``, ``imagefolder`` (the last three read from
    ``data_dir``, which the command line's ``--data-dir`` overrides)."""

    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    normalize: bool = True
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; {closest(str(self.dataset), DATASETS)}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError(f"data.data_dir must be a folder path, got {self.data_dir!r}")
        if self.limit is not None:
            check_number(self.limit, "data.limit (samples per split)", low=1, integer=True)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"data.normalize must be true or false, got {self.normalize!r}")
        if self.image_size is not None:
            check_number(self.image_size, "data.image_size (pixels)", low=1, high=_MAX_IMAGE_SIZE, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        return cls(**_check_keys(data, set(cls.__dataclass_fields__), "data"))


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a recipe; only the fields of its ``kind`` are set."""

    kind: str
    train: TrainConfig | None = None
    distill: DistillConfig | None = None
    config_list: tuple[dict[str, Any], ...] = ()
    criterion: str = "l1"
    teacher: str = "dense"

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ConfigError(f"unknown step {self.kind!r}; {closest(self.kind, STEP_KINDS)}")
        if self.kind in ("train", "finetune", "distill") and self.train is None:
            raise ConfigError(f"a {self.kind} step needs training settings (at least epochs)")
        if self.kind == "prune":
            if not self.config_list:
                raise ConfigError("a prune step needs a config_list, e.g. [{op_types: [Conv2d], sparse_ratio: 0.5}]")
            parse_config_list(self.config_list)  # validate now, not in the middle of a run

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.train is not None:
            body.update(self.train.to_dict())
        if self.kind == "distill":
            body.update({**(self.distill or DistillConfig()).to_dict(), "teacher": self.teacher})
        if self.kind == "prune":
            body.update({"config_list": [dict(e) for e in self.config_list], "criterion": self.criterion})
        return {self.kind: body}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        if not isinstance(data, Mapping) or len(data) != 1:
            raise ConfigError(f"a step is a mapping with one key, its kind (one of {list(STEP_KINDS)}); got {data!r}")
        ((kind, body),) = data.items()
        if kind not in STEP_KINDS:
            raise ConfigError(f"unknown step {kind!r}; {closest(str(kind), STEP_KINDS)}")
        if body is not None and not isinstance(body, Mapping):
            example = "{config_list: [{op_types: [Conv2d], sparse_ratio: 0.5}]}" if kind == "prune" else "{epochs: 1}"
            raise ConfigError(f"the {kind} step's settings must be a mapping (e.g. {example}), got {body!r}")
        body = dict(body or {})
        if kind == "prune":
            body = dict(_check_keys(body, {"config_list", "criterion"}, "prune step"))
            entries = body.get("config_list") or ()
            if not isinstance(entries, Sequence) or isinstance(entries, str):
                raise ConfigError(f"config_list must be a list of entries, got {entries!r}")
            for i, entry in enumerate(entries):
                if not isinstance(entry, Mapping):
                    raise ConfigError(f"config_list entry {i} must be a mapping such as {{op_types: [Conv2d], "
                                      f"sparse_ratio: 0.5}}, got {entry!r}")
            criterion = body.get("criterion", "l1")
            if not isinstance(criterion, str):
                raise ConfigError(f"a prune step's criterion must be a name such as l1, got {criterion!r}")
            get_criterion(criterion)  # an unknown criterion fails now, not after the training steps before it
            return cls(kind=kind, config_list=tuple(dict(e) for e in entries), criterion=criterion)
        if kind == "compact":
            _check_keys(body, set(), "compact step")
            return cls(kind=kind)
        if kind not in STEP_KINDS:
            raise ConfigError(f"unknown step {kind!r}; {closest(str(kind), STEP_KINDS)}")
        train_keys = set(TrainConfig.__dataclass_fields__)
        extra = _DISTILL_KEYS | {"teacher"} if kind == "distill" else set()
        _check_keys(body, train_keys | extra, f"{kind} step")
        train = TrainConfig.from_dict({k: v for k, v in body.items() if k in train_keys})
        if kind != "distill":
            return cls(kind=kind, train=train)
        distill = DistillConfig.from_dict({k: v for k, v in body.items() if k in _DISTILL_KEYS})
        teacher = body.get("teacher", "dense")
        if not isinstance(teacher, str) or (teacher != "dense" and not Path(teacher).is_file()):
            raise ConfigError(f"a distill step's teacher must be 'dense' (the model before the first prune step) or "
                              f"a saved slimtorch model file; {teacher!r} is neither")
        return cls(kind=kind, train=train, distill=distill, teacher=teacher)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A model, a dataset and the steps to run on it. ``model`` is a reference model name,
    ``torchvision:<name>`` or a saved slimtorch model file."""

    model: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    steps: tuple[Step, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("a recipe needs at least one step (train, prune, compact, distill, finetune)")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_kwargs": dict(self.model_kwargs), "data": self.data.to_dict(),
                "steps": [s.to_dict() for s in self.steps], "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        data = _check_keys(data, {"model", "model_kwargs", "data", "steps", "seed"}, "recipe")
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise ConfigError("a recipe needs a model: a reference name (DigitsCNN), torchvision:<name> or a file; got "
                              f"{data.get('model')!r}")
        kwargs = data.get("model_kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ConfigError(f"model_kwargs must be a mapping of argument names to values, got {kwargs!r}")
        steps = data.get("steps") or []
        if not isinstance(steps, Sequence) or isinstance(steps, str):
            raise ConfigError(f"steps must be a list, got {steps!r}")
        seed = data.get("seed", 0)
        check_number(seed, "seed", low=0, high=2**31 - 1, integer=True)
        return cls(model=data["model"], model_kwargs=dict(kwargs), data=DataSpec.from_dict(data.get("data") or {}),
                   steps=tuple(Step.from_dict(s) for s in steps), seed=seed)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    data = read_yaml(path, "recipe file")
    if not isinstance(data, Mapping):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping with model, data and steps")
    return Recipe.from_dict(data)
