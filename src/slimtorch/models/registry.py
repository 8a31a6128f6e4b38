"""Models by name: the reference models, torchvision's architectures, and what one expects as input.

    >>> from slimtorch.models.registry import ModelSpec, build_model
    >>> spec = ModelSpec(name="BookCNN")
    >>> type(build_model(spec)).__name__, spec.input_shape
    ('BookCNN', (3, 32, 32))
    >>> ModelSpec.parse("torchvision:resnet18").source
    'torchvision'

Torchvision models are built without pretrained weights (nothing is downloaded, ever).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from slimtorch.errors import ConfigError, closest
from slimtorch.models.reference import BookCNN, DigitsCNN, MnistNet

__all__ = ["REFERENCE_MODELS", "ModelSpec", "build_model", "model_names"]

#: name -> (class, input shape without the batch dimension)
REFERENCE_MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "BookCNN": (BookCNN, (3, 32, 32)),
    "DigitsCNN": (DigitsCNN, (1, 8, 8)),
    "MnistNet": (MnistNet, (1, 28, 28)),
}
_TORCHVISION_SHAPE = (3, 224, 224)


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def model_names() -> list[str]:
    """Every name :func:`build_model` accepts: reference models, then ``torchvision:<name>``."""
    return list(REFERENCE_MODELS) + [f"torchvision:{n}" for n in _torchvision_names()]


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
        shape = tuple(int(d) for d in self.input_shape)
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"input_shape must be positive sizes of one sample, e.g. (3, 32, 32); got {shape}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "kwargs", dict(self.kwargs))

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
        return cls(**{**data, "input_shape": tuple(data["input_shape"]) if data.get("input_shape") else None})


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model (torchvision ones without pretrained weights)."""
    if spec.source == "reference":
        cls = REFERENCE_MODELS[spec.name][0]
        try:
            return cls(**spec.kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments {dict(spec.kwargs)} for {spec.name}: {err}") from None
    names = _torchvision_names()
    if spec.name not in names:
        raise ConfigError(f"unknown torchvision model {spec.name!r}; {closest(spec.name, names)}")
    import torchvision

    try:
        return torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad arguments {dict(spec.kwargs)} for torchvision model {spec.name}: {err}") from None
