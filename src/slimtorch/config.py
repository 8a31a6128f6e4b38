"""Config lists: what to prune and how much, parsed at the boundary into frozen, validated dataclasses.

A config list is a list of entries, each selecting modules and saying how sparse to make them. The keys
are NNI's, so a config list from the NNI docs or the book works unchanged::

    >>> from slimtorch.config import parse_config_list
    >>> cfg = parse_config_list([
    ...     {"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5},
    ...     {"op_names": ["fc2"], "exclude": True},
    ... ])
    >>> cfg[0].sparse_ratio, cfg[1].exclude
    (0.5, True)

Later entries override earlier ones for the modules they match (NNI's rule); ``exclude: True`` removes
the modules it matches from pruning. Aliases accepted: ``sparsity`` and ``sparsity_per_layer`` for
``sparse_ratio``; ``max_sparsity_per_layer`` for ``max_sparse_ratio``. An entry may name its own
``criterion`` (one config list can score convolutions by gradient and linears by magnitude). NNI's
quantization keys (``quant_types``, ``quant_bits``, ...) belong to a quantizer's config list, not here::

    >>> parse_config_list([{"op_types": ["Linear"], "quant_bits": 8}])
    Traceback (most recent call last):
    ...
    slimtorch.errors.ConfigError: config list entry 0: 'quant_bits' is a quantization key, and this is a pruning ...
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtorch.errors import ConfigError

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "PruneTarget",
    "check_fields",
    "fields_from_dict",
    "fields_to_dict",
    "load_config_list",
    "parse_config_list",
    "parse_yaml",
    "read_yaml",
    "recorded_fields",
]

#: Named granularities (the unit that is kept or pruned as a whole). Besides these, ``"N:M"`` strings
#: (keep N of every M consecutive weights) and ``"block(h,w)"`` / lists of block sizes are accepted.
GRANULARITIES = {
    "fine": "single weights (unstructured)",
    "vector": "rows of the last weight dimension (a kernel row of a conv, a row of a Linear)",
    "kernel": "whole k x k kernels of a conv (one input channel of one filter)",
    "out_channel": "whole output channels: conv filters, Linear output neurons (structured)",
    "in_channel": "whole input channels of a layer (structured)",
    "head": "whole attention heads of a projection (structured); 'head(H)' gives the head count",
    "layer": "a whole layer or block (dropped with slimtorch.prune.depth, not with masks)",
}
_ALIASES = {
    "default": None,
    "element": "fine",
    "unstructured": "fine",
    "filter": "out_channel",
    "channel": "out_channel",
    "neuron": "out_channel",
    "row": "vector",
}
_STRUCTURED = frozenset({"out_channel", "in_channel", "head", "layer"})


@dataclass(frozen=True, kw_only=True)
class Granularity:
    """The unit of pruning. ``kind`` is a key of :data:`GRANULARITIES`, ``"block"`` or ``"n:m"``.

    ``heads`` is the number of attention heads a ``"head"`` granularity cuts a projection into; 0 means
    "read it from the module" (``num_heads`` of ``nn.MultiheadAttention``).
    """

    kind: str
    block: tuple[int, ...] = ()
    n: int = 0
    m: int = 0
    heads: int = 0

    def __post_init__(self) -> None:
        if self.heads and (self.kind != "head" or self.heads < 0):
            raise ConfigError(f"a head count ({self.heads}) only goes with the 'head' granularity, e.g. 'head(8)'")
        if self.kind == "block":
            if not self.block or any(b == 0 or b < -1 for b in self.block):
                raise ConfigError(f"block granularity needs positive sizes (or -1 for a whole dim), got {self.block}")
        elif self.kind == "n:m":
            if not (0 < self.n < self.m):
                raise ConfigError(f"N:M granularity needs 0 < N < M, got {self.n}:{self.m}; e.g. '2:4'")
        elif self.kind not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.kind!r}; allowed: {_allowed_granularities()}")

    @property
    def structured(self) -> bool:
        """True when whole channels/heads/layers go, so the model can be physically compacted."""
        return self.kind in _STRUCTURED

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (1 - N/M); None for other granularities."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else None

    @classmethod
    def parse(cls, value: Any) -> Granularity | None:
        """Parse ``"fine"``, ``"filter"``, ``"2:4"``, ``"block(4,4)"`` or ``[4, 4]`` (NNI block sizes)."""
        if value is None or isinstance(value, Granularity):
            return value
        if isinstance(value, (list, tuple)):
            return cls(kind="block", block=tuple(_as_int(v, "granularity block size") for v in value))
        if not isinstance(value, str):
            raise ConfigError(f"granularity must be a string or a list of block sizes, got {value!r}")
        text = value.strip().lower()
        if (match := re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)) is not None:
            return cls(kind="n:m", n=int(match[1]), m=int(match[2]))
        if (match := re.fullmatch(r"heads?\(\s*(\d+)\s*\)", text)) is not None:
            return cls(kind="head", heads=int(match[1]))
        if (match := re.fullmatch(r"block\(([-\d,\s]+)\)", text)) is not None:
            return cls(kind="block", block=tuple(int(v) for v in match[1].split(",") if v.strip()))
        kind = _ALIASES.get(text, text)
        return None if kind is None else cls(kind=kind)

    def to_value(self) -> str | list[int]:
        """The plain value ``parse`` accepts back."""
        if self.kind == "block":
            return list(self.block)
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "head" and self.heads:
            return f"head({self.heads})"
        return self.kind


def _allowed_granularities() -> str:
    return ", ".join([*GRANULARITIES, "'N:M' (e.g. '2:4')", "'block(h,w)' or [h, w]", "'head(H)'", *_ALIASES])


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PruneTarget:
    """One config-list entry: which modules, and how sparse. Validated on construction.

    Exactly one of ``sparse_ratio`` (each matched layer), ``total_sparsity`` (across all the layers this
    entry matches, ranked globally, each capped by ``max_sparse_ratio``), ``sparse_threshold`` (prune
    every unit scoring below it) or the pair ``weight_threshold`` + ``gradient_threshold`` (the hybrid
    criterion's: keep a unit only where |w| and |dL/dw| both reach their threshold) is set, unless
    ``exclude`` is true or the granularity is N:M. ``criterion`` scores this entry's layers (default: the
    caller's criterion); its name is checked when the layers are scored.
    """

    op_types: tuple[str, ...] = ()
    op_names: tuple[str, ...] = ()
    op_partial_names: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    exclude: bool = False
    sparse_ratio: float | None = None
    total_sparsity: float | None = None
    max_sparse_ratio: float | None = None
    sparse_threshold: float | None = None
    weight_threshold: float | None = None
    gradient_threshold: float | None = None
    granularity: Granularity | None = None
    criterion: str | None = None

    def __post_init__(self) -> None:
        for name in ("op_types", "op_names", "op_partial_names", "exclude_op_names"):
            _check_names(name, getattr(self, name))
        if not (self.op_types or self.op_names or self.op_partial_names):
            raise ConfigError(
                "a config entry needs at least one selector: 'op_types', 'op_names' or 'op_partial_names'"
            )
        for name in ("sparse_ratio", "total_sparsity"):
            _check_fraction(name, getattr(self, name), upper_closed=False)
        _check_fraction("max_sparse_ratio", self.max_sparse_ratio, upper_closed=True)
        for name in ("sparse_threshold", "weight_threshold", "gradient_threshold"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ConfigError(f"{name!r} must be a number >= 0, got {value!r}")
        if self.criterion is not None and (not isinstance(self.criterion, str) or not self.criterion):
            raise ConfigError(f"'criterion' must be a criterion's name such as 'magnitude', got {self.criterion!r}")
        self._check_amounts()

    def _check_amounts(self) -> None:
        amounts = [k for k in ("sparse_ratio", "total_sparsity", "sparse_threshold") if getattr(self, k) is not None]
        pair = [k for k in ("weight_threshold", "gradient_threshold") if getattr(self, k) is not None]
        if len(pair) == 1:
            raise ConfigError(f"{pair[0]!r} goes with its partner: the hybrid criterion keeps a weight when |w| >= "
                              "'weight_threshold' and |dL/dw| >= 'gradient_threshold'; give both (0 leaves one free)")
        if pair:
            amounts.append("weight_threshold + gradient_threshold")
        if self.exclude:
            if amounts:
                raise ConfigError(f"an 'exclude: True' entry prunes nothing; remove {amounts} from it")
            return
        implied = self.granularity.implied_sparsity if self.granularity else None
        if implied is not None:
            given = self.sparse_ratio
            if self.total_sparsity is not None or self.sparse_threshold is not None or (
                given is not None and not math.isclose(given, implied)
            ):
                raise ConfigError(
                    f"granularity {self.granularity.to_value()!r} fixes the sparsity at {implied:g}; "
                    f"drop {amounts} or set 'sparse_ratio': {implied:g}"
                )
            return
        if len(amounts) != 1:
            raise ConfigError(
                "a config entry needs exactly one of 'sparse_ratio' (alias 'sparsity_per_layer', 'sparsity'), "
                "'total_sparsity', 'sparse_threshold' or 'weight_threshold' + 'gradient_threshold'; got "
                f"{amounts or 'none'}"
            )
        if self.max_sparse_ratio is not None and self.total_sparsity is None:
            raise ConfigError("'max_sparse_ratio' caps layers under 'total_sparsity'; use it with 'total_sparsity'")

    @property
    def hybrid_thresholds(self) -> bool:
        """True when the entry prunes by the hybrid criterion's two thresholds (weight and gradient)."""
        return self.weight_threshold is not None

    @property
    def thresholded(self) -> bool:
        """True when the entry prunes by a threshold (one score threshold, or the hybrid pair) rather than by
        a sparsity: such an entry cannot be reached gradually."""
        return self.sparse_threshold is not None or self.hybrid_thresholds

    @property
    def sparsity(self) -> float | None:
        """The requested fraction pruned (per layer, or in total); None for threshold entries."""
        if self.granularity is not None and self.granularity.implied_sparsity is not None:
            return self.granularity.implied_sparsity
        return self.sparse_ratio if self.sparse_ratio is not None else self.total_sparsity

    def to_dict(self) -> dict[str, Any]:
        """The plain dict (NNI keys) that :meth:`from_dict` accepts back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "granularity":
                if value is not None:
                    out[f.name] = value.to_value()
            elif value not in (None, (), False):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> PruneTarget:
        """Parse one config-list dict, with NNI's keys and aliases. Unknown keys are an error."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"each config-list entry must be a dict, got {type(entry).__name__}: {entry!r}")
        kwargs: dict[str, Any] = {}
        for key, value in entry.items():
            canon = _KEY_ALIASES.get(key, key)
            if canon in QUANT_KEYS:
                raise ConfigError(
                    f"{key!r} is a quantization key, and this is a pruning config list; give quantization settings "
                    "to a quantizer: slimtorch.quantize(model, QuantConfig(method=..., targets=[...])) or NNI's "
                    "quantizers in slimtorch.compat.nni.quantization (QATQuantizer, PtqQuantizer, LsqQuantizer, ...)"
                )
            if canon not in _FIELD_NAMES:
                raise ConfigError(f"unknown config key {key!r}; allowed keys: {sorted(ALLOWED_KEYS)}")
            if canon in kwargs:
                raise ConfigError(f"config key {key!r} given twice (directly and through an alias)")
            kwargs[canon] = _coerce(canon, value)
        return cls(**kwargs)


_FIELD_NAMES = {f.name for f in dataclasses.fields(PruneTarget)}
_KEY_ALIASES = {
    "sparsity": "sparse_ratio",
    "sparsity_per_layer": "sparse_ratio",
    "max_sparsity_per_layer": "max_sparse_ratio",
}
#: Keys of NNI's quantization config lists (NNI 2 and 3): refused here with a pointer to the quantizers.
QUANT_KEYS = frozenset({"quant_types", "target_names", "quant_bits", "quant_dtype", "quant_scheme", "quant_start_step"})
ALLOWED_KEYS = _FIELD_NAMES | set(_KEY_ALIASES)


def _coerce(key: str, value: Any) -> Any:
    if key in ("op_types", "op_names", "op_partial_names", "exclude_op_names"):
        if isinstance(value, str):
            raise ConfigError(f"{key!r} must be a list of strings, got the string {value!r}; write [{value!r}]")
        if not isinstance(value, Iterable):
            raise ConfigError(f"{key!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if key == "exclude":
        if not isinstance(value, bool):
            raise ConfigError(f"'exclude' must be True or False, got {value!r}")
        return value
    if key == "granularity":
        return Granularity.parse(value)
    return value


def _check_names(key: str, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key!r} must hold non-empty strings, got {name!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(key: str, value: Any, *, upper_closed: bool) -> None:
    if value is None:
        return
    ok = _is_number(value) and value >= 0 and (value <= 1 if upper_closed else value < 1)
    if not ok:
        interval = "[0, 1]" if upper_closed else "[0, 1)"
        raise ConfigError(
            f"{key!r} must be a number in {interval}, got {value!r}; "
            "it is the fraction of weights to remove (0.5 removes half)"
        )


def parse_config_list(config_list: Sequence[Mapping[str, Any] | PruneTarget]) -> tuple[PruneTarget, ...]:
    """Parse and validate a whole config list (dicts or :class:`PruneTarget`) into frozen targets."""
    if isinstance(config_list, (Mapping, str)) or not isinstance(config_list, Sequence):
        raise ConfigError(
            f"a config list must be a list of dicts, got {type(config_list).__name__}; wrap a single entry in [...]"
        )
    if not config_list:
        raise ConfigError("the config list is empty; give at least one entry such as "
                          "{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}")
    targets = []
    for i, entry in enumerate(config_list):
        try:
            targets.append(entry if isinstance(entry, PruneTarget) else PruneTarget.from_dict(entry))
        except ConfigError as err:
            raise type(err)(f"config list entry {i}: {err}") from None
    if all(t.exclude for t in targets):
        raise ConfigError("every config-list entry is 'exclude: True', so nothing would be pruned")
    return tuple(targets)


def parse_yaml(text: str, what: str) -> Any:
    """The YAML document ``text`` as plain data (safe loading: no Python objects). A key given twice in one
    mapping is a ConfigError naming it (YAML would silently keep the last one)."""
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading YAML needs PyYAML: pip install 'slimtorch[yaml]'") from err

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # (an unhashable key: the loader itself refuses it)
                if key in seen:
                    raise ConfigError(f"{what}: the key {key!r} appears twice in one mapping (line "
                                      f"{key_node.start_mark.line + 1}); YAML would keep only the last: remove one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeys)  # (a SafeLoader: plain data only)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{what} is not valid YAML ({first}); check its indentation and quoting") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document of the file ``path`` (see :func:`parse_yaml`); a missing file, a folder or a file that
    is not UTF-8 text is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); give a YAML "
                          "file saved as UTF-8") from None
    return parse_yaml(text, f"{what} {str(path)!r}")


def load_config_list(source: str | Path) -> tuple[PruneTarget, ...]:
    """Read a config list from a YAML (or JSON) file, or from YAML text, and parse it.

    The file may hold the list itself or a mapping with a ``config_list`` key.
    """
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"load_config_list takes a file path or YAML text, got {type(source).__name__}")
    if isinstance(source, str) and "\n" in source:
        data = parse_yaml(source, "the config")
    else:
        data = read_yaml(source, "config file")
    if isinstance(data, Mapping) and "config_list" in data:
        data = data["config_list"]
    return parse_config_list(data)


def fields_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a plain dict (tuples as lists, for JSON and YAML)."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config)}


def check_fields(cls: type, data: Mapping[str, Any], *, what: str) -> None:
    """A ConfigError naming the allowed keys when ``data`` has a key that is not a field of the config
    dataclass ``cls`` (``what`` names the config in the message)."""
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {unknown}; allowed keys: {allowed}")


def recorded_fields(config: Any, added: Mapping[str, Any]) -> dict[str, Any]:
    """The config dataclass ``config`` as a plain dict, as a run's checkpoint records it, leaving out each
    field of ``added`` (fields added since a release, with their defaults) that is at its default: a run
    recorded before the field existed then still matches, and resumes.

        >>> @dataclass
        ... class C:
        ...     lr: float = 0.1
        ...     new: bool = False
        >>> recorded_fields(C(), {"new": False}), recorded_fields(C(new=True), {"new": False})
        ({'lr': 0.1}, {'lr': 0.1, 'new': True})
    """
    data = dataclasses.asdict(config)
    return {k: v for k, v in data.items() if k not in added or v != added[k]}


def fields_from_dict(cls: type, data: Mapping[str, Any], *, what: str) -> Any:
    """Build the config dataclass ``cls`` from a plain dict (lists back to tuples); an unknown key is a
    ConfigError naming the allowed ones (:func:`check_fields`)."""
    check_fields(cls, data, what=what)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
