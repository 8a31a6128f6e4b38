"""What to quantize and how: a frozen, validated :class:`QuantConfig`, the method registry, and the
:class:`QuantInfo` every quantized model carries (which backend runs it and whether its low-bit kernels
are real or only simulated).

    >>> from slimtorch.quant import QuantConfig
    >>> cfg = QuantConfig(method="dynamic_int8", exclude_op_names=("fc2",))
    >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> QuantConfig(method="int4")
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: unknown quantization method 'int4'; closest real names: ['int4_weight', ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtorch.config import fields_from_dict, fields_to_dict
from slimtorch.errors import ConfigError, closest
from slimtorch.quant.targets import QuantTarget, TensorQuant, parse_quant_targets

__all__ = [
    "QUANT_ATTR",
    "QuantConfig",
    "QuantInfo",
    "QuantMethod",
    "quant_info",
    "quant_methods",
    "register_quant_method",
]

#: Attribute a quantized model carries: the :class:`QuantInfo` of how it was quantized, as a plain dict.
QUANT_ATTR = "slimtorch_quantization"

#: ``(model, config, layer names, batches) -> quantized model`` (the same object when in place). ``batches``
#: are model inputs (calibration data, or the example inputs alone), None when the caller gave neither.
ApplyFn = Callable[[nn.Module, "QuantConfig", tuple[str, ...], "Iterable[Any] | None"], nn.Module]


@dataclass(frozen=True)
class QuantMethod:
    """A registered quantization method and the honest facts about how it runs."""

    name: str
    apply: ApplyFn
    backend: str
    kernels: str  # "real": low-bit kernels do the arithmetic; "simulated": values are expanded to float
    weight_bits: int
    activation_bits: int | None
    in_place: bool  # swaps layers inside the model (quantize_ works) rather than rebuilding its graph
    layer_types: tuple[str, ...]  # classes it can quantize; a selected layer of another class is an error
    default_op_types: tuple[str, ...]
    note: str
    cpu_only: bool = False  # its kernels exist on CPU alone (torch.ao's int8)
    #: the settings of each tensor kind a config-list entry leaves out; None: the method takes no ``targets``
    defaults: Mapping[str, TensorQuant] | None = None


_METHODS: dict[str, QuantMethod] = {}


def register_quant_method(
    name: str,
    *,
    backend: str,
    kernels: str,
    bits: tuple[int, int | None],
    in_place: bool,
    layer_types: tuple[str, ...] = ("Linear",),
    default_op_types: tuple[str, ...] | None = None,
    note: str = "",
    cpu_only: bool = False,
    defaults: Mapping[str, TensorQuant] | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``fn(model, config, layer_names, batches) -> model`` as quantization method ``name``.

    ``bits`` is (weight bits, activation bits or None for weight-only); ``kernels`` is ``"real"`` or
    ``"simulated"`` and ends up in every :class:`QuantInfo` of a model quantized this way. The layers a
    config selects by default are ``default_op_types`` (all of ``layer_types`` when None); ``cpu_only``
    methods refuse a model on another device. A method with ``defaults`` (the settings of ``"weight"``,
    ``"input"`` and ``"output"`` tensors) takes NNI-style ``targets`` (:mod:`slimtorch.quant.targets`).
    """
    if kernels not in ("real", "simulated"):
        raise ConfigError(f"kernels must be 'real' or 'simulated', got {kernels!r}")

    def deco(fn: ApplyFn) -> ApplyFn:
        _METHODS[name] = QuantMethod(
            name, fn, backend, kernels, bits[0], bits[1], in_place, layer_types,
            layer_types if default_op_types is None else default_op_types, note, cpu_only, defaults,
        )
        return fn

    return deco


def quant_methods() -> dict[str, QuantMethod]:
    """The registered methods by name (importing :mod:`slimtorch.quant` registers the built-in ones)."""
    return dict(_METHODS)


def get_method(name: str) -> QuantMethod:
    if name not in _METHODS:
        raise ConfigError(f"unknown quantization method {name!r}; {closest(name, sorted(_METHODS))}")
    return _METHODS[name]


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize. ``method`` is a key of :func:`quant_methods`:

    ``dynamic_int8``   int8 weights, activations quantized per call (torch's fbgemm/x86 kernels; Linear),
                       and int8 Embedding tables (weight-only)
    ``static_int8``    int8 weights and activations, scales from calibration batches (FX graph, real kernels)
    ``qat_int8``       like static_int8, but fake-quantized for training first (see :func:`convert_qat`)
    ``fp16``/``bf16``  layers computed in half precision
    ``int4_weight``    4-bit weights in groups of ``group_size``, expanded to float per call (simulated)
    ``binary_weight``  1-bit weights (sign x per-channel mean magnitude), expanded per call (simulated)
    ``qat_int4_weight``/``qat_binary_weight``  float weights trained through 4-/1-bit fake quantization
                       (straight-through gradients); :func:`convert_qat` packs them

    ``qat_minmax``     k-bit weights and activations, ranges observed while training (NNI's QAT)
    ``ptq_minmax``     k-bit weights and activations, ranges from calibration batches (NNI's PTQ)
    ``dorefa``/``bnn``/``lsq``  DoReFa-Net, binarised networks (±1 weights and activations), learned step
                       sizes: fake-quantized for training (see :mod:`slimtorch.quant.fakequant`)

    ``op_types``/``op_names`` restrict the layers (empty: the method's default), ``exclude_op_names``
    keeps layers in float. ``per_channel=False`` (one scale per tensor) is for ``dynamic_int8`` only; static
    and QAT int8 always use per-channel weights. ``group_size`` is the int4 group along each weight row.
    ``targets`` (the last five methods) is an NNI quantization config list (dicts with ``quant_types``,
    ``quant_bits``, ``quant_dtype``, ``quant_scheme``, ``granularity``, or :class:`QuantTarget`), parsed
    on construction; without it the method quantizes the weights and inputs of the selected layers.
    """

    method: str
    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    per_channel: bool = True
    group_size: int = 32
    targets: tuple[QuantTarget, ...] = ()

    def __post_init__(self) -> None:
        get_method(self.method)
        for key in ("op_types", "op_names", "exclude_op_names"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key!r} must be a tuple of non-empty strings, got {value!r}")
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"'per_channel' must be True or False, got {self.per_channel!r}")
        if not self.per_channel and self.method != "dynamic_int8":
            raise ConfigError(f"per_channel=False is only supported by 'dynamic_int8', not {self.method!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise ConfigError(f"'group_size' must be an even integer >= 2 (e.g. 32 or 128), got {g!r}")
        if self.targets:
            defaults = self.spec.defaults
            if defaults is None:
                takers = sorted(n for n, m in _METHODS.items() if m.defaults)
                raise ConfigError(f"{self.method} takes no 'targets' (a quantization config list); use its op_types / "
                                  f"op_names, or a method that does: {takers}")
            if self.op_types or self.op_names or self.exclude_op_names:
                raise ConfigError("give the layers either in 'targets' (their op_types / op_names) or in op_types / "
                                  "op_names / exclude_op_names, not both")
            object.__setattr__(self, "targets", parse_quant_targets(self.targets, defaults=defaults))

    def quant_targets(self) -> tuple[QuantTarget, ...]:
        """The config list the method applies: ``targets``, or the weights and inputs of the selected layers."""
        defaults = self.spec.defaults
        if defaults is None:
            raise ConfigError(f"{self.method} is not configured by a quantization config list")
        if self.targets:
            return self.targets
        return (QuantTarget(op_types=self.op_types or self.spec.default_op_types, op_names=self.op_names,
                            exclude_op_names=self.exclude_op_names, weight=defaults["weight"],
                            input=defaults["input"]),)

    @property
    def spec(self) -> QuantMethod:
        """The registered method this config names."""
        return get_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) that :meth:`from_dict` accepts back."""
        out = fields_to_dict(self)
        out["targets"] = [t.to_dict() for t in self.targets]
        if not self.targets:
            del out["targets"]  # (the methods without config lists: the dict they always had)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Parse a dict (e.g. from YAML); unknown keys are an error naming the allowed ones."""
        return fields_from_dict(cls, data, what="quantization")


@dataclass(frozen=True)
class QuantInfo:
    """How a model was quantized: what runs it and whether its low-bit arithmetic is real or simulated."""

    method: str
    backend: str
    kernels: str
    weight_bits: int
    activation_bits: int | None
    layers: tuple[str, ...]
    note: str

    def to_dict(self) -> dict[str, Any]:
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantInfo:
        names = {f.name for f in dataclasses.fields(cls)}  # the model's record also holds its QuantConfig
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """One line for tables: ``dynamic_int8: real int8 kernels (torch.ao x86), 4 layers``."""
        bits = f"w{self.weight_bits}" + (f"a{self.activation_bits}" if self.activation_bits else "")
        return f"{self.method} ({bits}): {self.kernels} kernels ({self.backend}), {len(self.layers)} layers"


def quant_info(model: nn.Module) -> QuantInfo | None:
    """The :class:`QuantInfo` a quantized model carries, or None for a model slimtorch did not quantize.

    >>> from torch import nn
    >>> quant_info(nn.Linear(2, 2)) is None
    True
    """
    data = getattr(model, QUANT_ATTR, None)
    return QuantInfo.from_dict(data) if data else None
