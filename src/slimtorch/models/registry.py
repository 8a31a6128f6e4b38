"""Models by name: the reference models, torchvision's architectures, and what one expects as input.

    >>> from slimtorch.models.registry import ModelSpec, build_model
    >>> spec = ModelSpec(name="BookCNN")
    >>> type(build_model(spec)).__name__, spec.input_shape
    ('BookCNN', (3, 32, 32))
    >>> ModelSpec.parse("torchvision:resnet18").source
    'torchvision'

Torchvision models are built without pretrained weights, their backbones' included (nothing is downloaded,
ever). Sizes that come from a file or the command line are bounded before anything is allocated:

    >>> ModelSpec(name="MnistNet", input_shape=(1, 100_000, 100_000))
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: input_shape (1, 100000, 100000) holds 10,000,000,000 values per sample; ...
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimtorch.checks import MAX_PARAMETERS
from slimtorch.errors import ConfigError, closest
from slimtorch.models.reference import BookCNN, DigitsCNN, MnistNet

__all__ = ["MAX_PARAMETERS", "MAX_SAMPLE_VALUES", "REFERENCE_MODELS", "ModelSpec", "build_model", "check_sample_shape",
           "model_names"]

#: name -> (class, input shape without the batch dimension)
REFERENCE_MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "BookCNN": (BookCNN, (3, 32, 32)),
    "DigitsCNN": (DigitsCNN, (1, 8, 8)),
    "MnistNet": (MnistNet, (1, 28, 28)),
}
_TORCHVISION_SHAPE = (3, 224, 224)
#: Bounds on sizes read from files and arguments, checked before allocating: one sample's values, one
#: integer constructor argument (a width, a class count); a built model's parameters: MAX_PARAMETERS.
MAX_SAMPLE_VALUES = 1 << 28
MAX_KWARG_INT = 1 << 24
#: Builder arguments that would fetch weights from the internet; builds always pass None for them.
_DOWNLOADING_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def model_names() -> list[str]:
    """Every name :func:`build_model` accepts: reference models, then ``torchvision:<name>``."""
    return list(REFERENCE_MODELS) + [f"torchvision:{n}" for n in _torchvision_names()]


def check_sample_shape(shape: Any) -> tuple[int, ...]:
    """One sample's shape as a tuple of positive ints, at most :data:`MAX_SAMPLE_VALUES` values in all.

    >>> check_sample_shape([3, 32, 32])
    (3, 32, 32)
    """
    try:
        if isinstance(shape, (str, bytes)) or any(isinstance(d, bool) for d in shape):
            raise TypeError
        shape = tuple(operator.index(d) for d in shape)  # ints, numpy ints, torch.Size
    except TypeError:
        raise ConfigError(f"input_shape must be a list of positive sizes of one sample, e.g. (3, 32, 32); "
                          f"got {shape!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"input_shape must be positive sizes of one sample, e.g. (3, 32, 32); got {shape}")
    values = math.prod(shape)
    if values > MAX_SAMPLE_VALUES:
        raise ConfigError(f"input_shape {tuple(shape)} holds {values:,} values per sample; at most "
                          f"{MAX_SAMPLE_VALUES:,} are accepted: give one sample's real shape, e.g. (3, 224, 224)")
    return tuple(shape)


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse arguments that would download weights, and absurd integers, before any model is built."""
    fetching = sorted(k for k in _DOWNLOADING_KWARGS if kwargs.get(k) not in (None, False))
    if fetching:
        raise ConfigError(f"model {name!r}: {fetching} would download pretrained weights; slimtorch builds "
                          "untrained models and never downloads: drop the argument and load weights from a local "
                          "safetensors file")
    for key, value in kwargs.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        big = [v for v in numbers if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_KWARG_INT]
        if big:
            raise ConfigError(f"model {name!r}: argument {key}={value!r} is out of range (at most {MAX_KWARG_INT:,}); "
                              "give the size the model really has")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """How to build a model: ``source`` ``"reference"`` or ``"torchvision"``, its ``name``, constructor
    ``kwargs`` (such as ``num_classes``) and the ``input_shape`` of one sample (default: the model's own)."""

    name: str
    source: str = "reference"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.source not in ("reference", "torchvision"):
            raise ConfigError(f"model source must be 'reference' or 'torchvision', got {self.source!r}")
        canonical = {n.lower(): n for n in REFERENCE_MODELS}
        if self.source == "reference":
            if self.name.lower() not in canonical:
                raise ConfigError(
                    f"unknown model {self.name!r}; {closest(self.name, list(REFERENCE_MODELS) + _torchvision_names())} "
                    "(or give the path of a saved slimtorch model)"
                )
            object.__setattr__(self, "name", canonical[self.name.lower()])
        if self.input_shape is None:
            default = REFERENCE_MODELS[self.name][1] if self.source == "reference" else _TORCHVISION_SHAPE
            object.__setattr__(self, "input_shape", default)
        object.__setattr__(self, "input_shape", check_sample_shape(self.input_shape))
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(f"model kwargs must be a mapping of argument names to values, got {self.kwargs!r}")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        _check_kwargs(self.name, self.kwargs)

    @classmethod
    def parse(cls, text: str, *, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
        """``"BookCNN"``, ``"torchvision:resnet18"`` or a bare torchvision name such as ``"resnet18"``."""
        source, _, name = text.rpartition(":")
        if source and source != "torchvision":
            raise ConfigError(f"bad model {text!r}: the only prefix is 'torchvision:' (e.g. torchvision:resnet18)")
        if not source and name.lower() not in {n.lower() for n in REFERENCE_MODELS} and name in _torchvision_names():
            source = "torchvision"
        return cls(name=name, source=source or "reference", kwargs=kwargs or {})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape or ())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        allowed = {"name", "source", "kwargs", "input_shape"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown model key(s) {unknown}; allowed: {sorted(allowed)}")
        if not isinstance(data.get("name"), str) or not isinstance(data.get("source", "reference"), str):
            raise ConfigError(f"a model spec needs a 'name' (and 'source') string, got {dict(data)!r}")
        shape = data.get("input_shape")
        return cls(**{**data, "input_shape": check_sample_shape(shape) if shape else None})


def _torchvision_builder(name: str) -> Any:
    import torchvision

    names = _torchvision_names()
    if name not in names:
        raise ConfigError(f"unknown torchvision model {name!r}; {closest(name, names)}")
    return torchvision.models.get_model_builder(name)


def _offline_kwargs(builder: Any) -> dict[str, None]:
    """``weights=None`` and, for detection and segmentation models, ``weights_backbone=None``: their
    builders default to an ImageNet backbone, which torchvision would download."""
    accepted = inspect.signature(builder).parameters
    return {k: None for k in ("weights", "weights_backbone") if k in accepted}


def _construct(spec: ModelSpec) -> nn.Module:
    if spec.source == "reference":
        cls = REFERENCE_MODELS[spec.name][0]
        try:
            return cls(**spec.kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments {dict(spec.kwargs)} for {spec.name}: {err}") from None
    builder = _torchvision_builder(spec.name)
    try:
        return builder(**spec.kwargs, **_offline_kwargs(builder))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad arguments {dict(spec.kwargs)} for torchvision model {spec.name}: {err}") from None


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model (torchvision ones without pretrained weights, nothing downloaded).
    With constructor arguments the model is first built on the meta device (no memory) and refused when
    it would hold more than :data:`MAX_PARAMETERS` parameters."""
    if spec.kwargs:
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in _construct(spec).parameters())
        except (RuntimeError, NotImplementedError, ConfigError):  # it reads tensor values: the real build decides
            params = 0
        if params > MAX_PARAMETERS:
            raise ConfigError(f"model {spec.name} with {dict(spec.kwargs)} would hold {params:,} parameters (at most "
                              f"{MAX_PARAMETERS:,}); give the sizes the model really has")
    return _construct(spec)
