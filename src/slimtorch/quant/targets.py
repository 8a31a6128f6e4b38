"""Quantization config lists in NNI's format: which layers, which of their tensors, how many bits.

One entry selects layers (``op_types``, ``op_names``, ``op_partial_names``, ``exclude_op_names``, or
``exclude: True``) and says how to quantize their tensors. Both of NNI's spellings are read:

* NNI 2: ``quant_types`` (``["weight", "input", "output"]``), ``quant_bits`` (a number, or one per type:
  ``{"weight": 8, "input": 8}``), ``quant_dtype`` (``"int"`` / ``"uint"``) and ``quant_scheme``
  (``"per_tensor_affine"``, ``"per_channel_symmetric"``, ...);
* NNI 3: ``target_names`` (``["weight", "_input_", "_output_"]``), ``quant_dtype`` (``"int8"``,
  ``"uint4"``: sign and bits together), ``quant_scheme`` (``"affine"`` / ``"symmetric"``) and
  ``granularity`` (``"default"`` / ``"per_tensor"`` / ``"per_channel"``).

``quant_bits``, ``quant_dtype``, ``quant_scheme`` and ``granularity`` may also be given per tensor as a
dict. What an entry leaves out takes the quantization method's defaults. Later entries override earlier
ones for the tensors they name (NNI's rule); a selector that matches nothing is an error.

    >>> from slimtorch.quant.targets import parse_quant_targets
    >>> (t,) = parse_quant_targets([{"op_types": ["Linear"], "quant_types": ["weight", "input"],
    ...                              "quant_bits": {"weight": 4, "input": 8}}])
    >>> t.weight.bits, t.input.bits, t.output
    (4, 8, None)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.select import type_names

__all__ = [
    "KINDS",
    "QUANT_KEYS",
    "QuantTarget",
    "TensorQuant",
    "parse_quant_targets",
    "plan_quant_layers",
]

#: The tensors of a layer a config entry may quantize.
KINDS = ("weight", "input", "output")
_KIND_NAMES = {"weight": "weight", "input": "input", "output": "output", "_input_": "input", "_output_": "output",
               "_input_0": "input", "_output_0": "output"}
_SELECTORS = ("op_types", "op_names", "op_partial_names", "exclude_op_names")
#: The keys of NNI's quantization config lists (besides the selectors); a pruning config list refuses them.
QUANT_KEYS = ("quant_types", "target_names", "quant_bits", "quant_dtype", "quant_scheme", "granularity")
_PRUNE_KEYS = ("sparse_ratio", "sparsity", "sparsity_per_layer", "total_sparsity", "max_sparse_ratio",
               "max_sparsity_per_layer", "sparse_threshold", "criterion", "weight_threshold", "gradient_threshold")
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one tensor is quantized: ``bits``, signed or not, symmetric (zero point fixed) or affine, and
    one scale per output channel (weights only) or per tensor."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    per_channel: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ConfigError(f"quantization bits must be an integer from 1 to 16, got {self.bits!r}")
        for name in ("signed", "symmetric", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name!r} must be True or False, got {getattr(self, name)!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer range: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.signed else (0, 2**self.bits - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class QuantTarget:
    """One parsed config entry: the layers it selects and how each of their tensors is quantized (None:
    left in float). ``exclude`` entries take layers out of quantization."""

    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    op_partial_names: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    exclude: bool = False
    weight: TensorQuant | None = None
    input: TensorQuant | None = None
    output: TensorQuant | None = None

    def __post_init__(self) -> None:
        for key in _SELECTORS:
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key!r} must be a list of non-empty strings, got {value!r}")
        if not (self.op_types or self.op_names or self.op_partial_names):
            raise ConfigError("a quantization config entry needs 'op_types', 'op_names' or 'op_partial_names'")
        kinds = [k for k in KINDS if getattr(self, k) is not None]
        if self.exclude and kinds:
            raise ConfigError(f"an 'exclude: True' entry quantizes nothing; remove its settings for {kinds}")
        if not self.exclude and not kinds:
            raise ConfigError("a quantization config entry must name what to quantize: 'quant_types' (NNI 2) or "
                              "'target_names' (NNI 3), e.g. ['weight', 'input']")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if getattr(self, k) is not None)

    def to_dict(self) -> dict[str, Any]:
        """NNI 2 keys with every per-tensor setting spelled out, which :func:`parse_quant_targets` reads back
        exactly (whatever the method's defaults)."""
        out: dict[str, Any] = {k: list(getattr(self, k)) for k in _SELECTORS if getattr(self, k)}
        if self.exclude:
            return {**out, "exclude": True}
        specs = {k: getattr(self, k) for k in self.kinds}
        out["quant_types"] = list(specs)
        out["quant_bits"] = {k: s.bits for k, s in specs.items()}
        out["quant_dtype"] = {k: "int" if s.signed else "uint" for k, s in specs.items()}
        out["quant_scheme"] = {k: "symmetric" if s.symmetric else "affine" for k, s in specs.items()}
        out["granularity"] = {k: "per_channel" if s.per_channel else "per_tensor" for k, s in specs.items()}
        return out


def _per_kind(entry: Mapping[str, Any], key: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """A setting given once for the entry or as ``{kind: value}``, as ``{kind: value}`` (absent kinds left out)."""
    if key not in entry:
        return {}
    value = entry[key]
    if not isinstance(value, Mapping):
        return dict.fromkeys(kinds, value)
    unknown = sorted(set(value) - set(_KIND_NAMES))
    if unknown:
        raise ConfigError(f"{key!r} names unknown tensors {unknown}; use {list(KINDS)}")
    return {_KIND_NAMES[k]: v for k, v in value.items() if _KIND_NAMES[k] in kinds}


def _dtype(value: Any) -> tuple[bool, int | None]:
    """``"int"``/``"uint"`` (NNI 2) or ``"int8"``/``"uint4"`` (NNI 3): (signed, bits or None)."""
    match = re.fullmatch(r"(u?)int(\d*)", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"quant_dtype must be 'int' or 'uint', optionally with the bits ('int8', 'uint4'), got "
                          f"{value!r}")
    return not match[1], int(match[2]) if match[2] else None


def _scheme(value: Any) -> tuple[bool, bool | None]:
    """``"affine"``/``"symmetric"`` (NNI 3) or ``"per_tensor_affine"``... (NNI 2): (symmetric, per_channel or None)."""
    match = re.fullmatch(r"(?:(per_tensor|per_channel)_)?(affine|symmetric)", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"quant_scheme must be 'affine' or 'symmetric' (NNI 3) or 'per_tensor_affine', "
                          "'per_tensor_symmetric', 'per_channel_affine', 'per_channel_symmetric' (NNI 2), got "
                          f"{value!r}")
    return match[2] == "symmetric", None if match[1] is None else match[1] == "per_channel"


def _granularity(value: Any, kind: str) -> bool:
    if value in ("default", "per_tensor"):
        return False
    if value == "per_channel":
        if kind != "weight":
            raise ConfigError(f"granularity 'per_channel' is for weights (one scale per output channel); the {kind} "
                              "is quantized per tensor: set it per tensor, e.g. {'weight': 'per_channel'}")
        return True
    raise ConfigError(f"granularity must be 'default', 'per_tensor' or 'per_channel', got {value!r}")


def _bits(value: Any, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"quant_bits for the {kind} must be an integer (e.g. 8), got {value!r}")
    return value


def _tensor(entry: Mapping[str, Any], kind: str, kinds: tuple[str, ...], default: TensorQuant) -> TensorQuant:
    """The settings of one tensor: the entry's where it gives them, the method's defaults elsewhere."""
    fields: dict[str, Any] = {}
    if (bits := _per_kind(entry, "quant_bits", kinds).get(kind)) is not None:
        fields["bits"] = _bits(bits, kind)
    if (dtype := _per_kind(entry, "quant_dtype", kinds).get(kind)) is not None:
        fields["signed"], dtype_bits = _dtype(dtype)
        if dtype_bits is not None:
            if fields.get("bits", dtype_bits) != dtype_bits:
                raise ConfigError(f"quant_dtype {dtype!r} says {dtype_bits} bits but quant_bits says {fields['bits']} "
                                  f"for the {kind}; give one of them")
            fields["bits"] = dtype_bits
    if (scheme := _per_kind(entry, "quant_scheme", kinds).get(kind)) is not None:
        fields["symmetric"], per_channel = _scheme(scheme)
        if per_channel is not None:
            fields["per_channel"] = _granularity("per_channel" if per_channel else "per_tensor", kind)
    if (gran := _per_kind(entry, "granularity", kinds).get(kind)) is not None:
        fields["per_channel"] = _granularity(gran, kind)
    return dataclasses.replace(default, **fields)


def _kinds(entry: Mapping[str, Any]) -> tuple[str, ...]:
    if "quant_types" in entry and "target_names" in entry:
        raise ConfigError("give 'quant_types' (NNI 2) or 'target_names' (NNI 3), not both")
    names = entry.get("quant_types", entry.get("target_names", ()))
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"'quant_types' / 'target_names' must be a list such as ['weight', 'input'], got {names!r}")
    unknown = [n for n in names if n not in _KIND_NAMES]
    if unknown:
        raise ConfigError(f"cannot quantize {unknown}: a config entry names 'weight', 'input' / '_input_' or "
                          "'output' / '_output_' (biases stay in float)")
    return tuple(k for k in KINDS if k in {_KIND_NAMES[n] for n in names})


def _check_keys(entry: Mapping[str, Any], index: int) -> None:
    allowed = (*_SELECTORS, "exclude", *QUANT_KEYS)
    for key in entry:
        if key in _PRUNE_KEYS:
            raise ConfigError(f"config entry {index}: {key!r} is a pruning key, and this is a quantization config "
                              "list; prune with a pruner (slimtorch.compute_masks, slimtorch.compat.nni.L1NormPruner, "
                              "...) first, then quantize with a config list of quantization keys only")
        if key not in allowed:
            raise ConfigError(f"config entry {index}: unknown quantization key {key!r}; allowed keys: "
                              f"{sorted(allowed)}")


def _selector(entry: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = entry.get(key, ())
    if isinstance(value, str):
        raise ConfigError(f"{key!r} must be a list of strings, got the string {value!r}; write [{value!r}]")
    return tuple(value)


def parse_quant_targets(
    config_list: Sequence[Mapping[str, Any] | QuantTarget], *, default: TensorQuant | None = None,
    defaults: Mapping[str, TensorQuant] | None = None,
) -> tuple[QuantTarget, ...]:
    """Parse a quantization config list (NNI 2 or NNI 3 keys) into :class:`QuantTarget` entries.

    ``default`` (or ``defaults`` per tensor kind) fills in what an entry leaves out: the quantization
    method's own settings. An entry that is already a :class:`QuantTarget` is kept as it is.
    """
    if isinstance(config_list, (Mapping, str)) or not isinstance(config_list, Sequence) or not config_list:
        raise ConfigError(f"a quantization config list is a non-empty list of dicts, got {config_list!r}")
    base = default or TensorQuant()
    per_kind = {k: (defaults or {}).get(k, base) for k in KINDS}
    targets = []
    for index, entry in enumerate(config_list):
        if isinstance(entry, QuantTarget):
            targets.append(entry)
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config entry {index} must be a dict, got {type(entry).__name__}: {entry!r}")
        _check_keys(entry, index)
        exclude = entry.get("exclude", False)
        if not isinstance(exclude, bool):
            raise ConfigError(f"config entry {index}: 'exclude' must be True or False, got {exclude!r}")
        kinds = () if exclude else _kinds(entry)
        specs = {k: _tensor(entry, k, kinds, per_kind[k]) for k in kinds}
        try:
            targets.append(QuantTarget(**{k: _selector(entry, k) for k in _SELECTORS}, exclude=exclude, **specs))
        except ConfigError as err:
            raise ConfigError(f"config entry {index}: {err}") from None
    if all(t.exclude for t in targets):
        raise ConfigError("every quantization config entry is 'exclude: True', so nothing would be quantized")
    return tuple(targets)


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _matches(target: QuantTarget, name: str, module: nn.Module) -> bool:
    if target.op_types and not type_names(module) & set(target.op_types):
        return False
    if target.op_names and not _within(name, target.op_names):
        return False
    if target.op_partial_names and not any(p in name for p in target.op_partial_names):
        return False
    return not _within(name, target.exclude_op_names)


def _check_names(target: QuantTarget, index: int, names: list[str]) -> None:
    for key in ("op_names", "exclude_op_names"):
        for name in getattr(target, key):
            if name not in names:
                raise NoMatchError(f"quantization config entry {index}: {key} entry {name!r} matches no module of the "
                                   f"model; {closest(name, names)}")
    for part in target.op_partial_names:
        if not any(part in n for n in names):
            raise NoMatchError(f"quantization config entry {index}: op_partial_names entry {part!r} is part of no "
                               f"module name; {closest(part, names)}")


def plan_quant_layers(model: nn.Module, targets: Sequence[QuantTarget]) -> dict[str, dict[str, TensorQuant]]:
    """Which layers ``targets`` quantize and how: ``{layer name: {kind: TensorQuant}}`` in model order (pure).

    Layers are modules without children (or Linear/Conv layers). A later entry overrides earlier ones for
    the tensors it names; ``exclude`` entries remove layers. A selector that matches nothing, or a weight
    setting on a layer other than Linear/Conv1d/2d/3d, is an error.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    leaves = [(n, m) for n, m in named if isinstance(m, WEIGHT_LAYERS) or not any(True for _ in m.children())]
    plan: dict[str, dict[str, TensorQuant]] = {}
    for index, target in enumerate(targets):
        _check_names(target, index, names)
        matched = [(n, m) for n, m in leaves if _matches(target, n, m)]
        if not matched:
            raise NoMatchError(f"quantization config entry {index} ({target.to_dict()}) matches no layer of the model")
        for name, module in matched:
            if target.exclude:
                plan.pop(name, None)
                continue
            if target.weight is not None and not isinstance(module, WEIGHT_LAYERS):
                raise ConfigError(f"quantization config entry {index} quantizes the weight of {name!r} "
                                  f"({type(module).__name__}), but weights are quantized in Linear and Conv1d/2d/3d "
                                  "layers only: narrow op_types, or quantize its 'input' / 'output' instead")
            plan.setdefault(name, {}).update({k: getattr(target, k) for k in target.kinds})
    if not plan:
        raise NoMatchError("the quantization config list selects no layer: its exclude entries remove every layer")
    order = {n: i for i, n in enumerate(names)}
    return {n: {k: plan[n][k] for k in KINDS if k in plan[n]} for n in sorted(plan, key=order.__getitem__)}
