"""LoRA settings; the ``peft.LoraConfig`` they become, and their translation to and from PEFT's
``adapter_config.json``.

PEFT is an optional dependency: this module imports without it, and everything that needs it asks
:func:`require_peft`, which raises a ConfigError naming the extra to install.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from slimtorch.config import fields_from_dict, fields_to_dict
from slimtorch.errors import CheckpointError, ConfigError

__all__ = ["ADAPTER", "LoRAConfig", "require_peft"]

#: The name of the one adapter a model of ours carries (PEFT's default; files do not store it).
ADAPTER = "default"

#: Keys of ``adapter_config.json`` that say where an adapter came from or how PEFT should treat it, not what
#: it computes; loading ignores them. (``megatron_core`` and ``qalora_group_size`` have non-empty defaults and
#: only matter with ``megatron_config`` / ``use_qalora``, which are refused.)
_PROVENANCE = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "megatron_core", "qalora_group_size", "layers_pattern", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "astra_config",
})
#: Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA and the like
#: change them, so their adapters only fit the base model they saved beside them).
_PLAIN_INITS = (True, False, "gaussian", "eva")


def require_peft(what: str) -> ModuleType:
    """The ``peft`` module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ConfigError(f"{what} runs on PEFT, which is not installed ({err}): pip install slimtorch[peft]") \
            from None
    return peft


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Where to put adapters and how big: ``target_modules`` are module names or name suffixes, matched as
    PEFT does (``"query"`` matches ``encoder.layer.0.attention.self.query``); Linear and Conv2d layers
    (float or low-bit) can be targeted."""

    target_modules: tuple[str, ...]
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    exclude_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key!r} must be a tuple of module names, got {value!r}")
        if not self.target_modules:
            raise ConfigError("'target_modules' is empty; name the layers to adapt, e.g. ('query', 'value')")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"'r' (the adapter rank) must be an integer >= 1, got {self.r!r}")
        if not _positive(self.lora_alpha):
            raise ConfigError(f"'lora_alpha' must be a number > 0, got {self.lora_alpha!r}")
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ConfigError(f"'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        return fields_from_dict(cls, data, what="LoRA")

    def peft_config(self, layers: tuple[str, ...] | None = None) -> Any:
        """These settings as a ``peft.LoraConfig``. With ``layers`` (full module names), it targets exactly those
        layers (one anchored pattern) instead of matching ``target_modules`` again."""
        peft = require_peft("LoRA")
        targets: Any = list(self.target_modules)
        exclude = list(self.exclude_modules) or None
        if layers is not None:
            targets, exclude = "|".join(re.escape(name) for name in layers), None  # PEFT full-matches a string
        return peft.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               use_rslora=self.use_rslora, target_modules=targets, exclude_modules=exclude,
                               bias="none")

    def to_peft(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: what PEFT writes for these settings (every field of its
        ``LoraConfig``, sorted), with the target names in their given order."""
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in self.peft_config().to_dict().items()}
        data.update(target_modules=list(self.target_modules), exclude_modules=list(self.exclude_modules) or None,
                    inference_mode=True, peft_type="LORA")  # as PeftModel.save_pretrained writes them
        return dict(sorted(data.items()))

    @classmethod
    def from_peft(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Parse a PEFT ``adapter_config.json``; a setting that changes what the adapter computes and that this
        class does not have is a CheckpointError naming it."""
        if not isinstance(data, Mapping) or data.get("peft_type") != "LORA":
            kind = data.get("peft_type") if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointError(f"adapter config is peft_type={kind!r}, not 'LORA'")
        unsupported = _unsupported(data)
        if unsupported:
            raise CheckpointError(f"adapter settings not supported here: {unsupported!r}; merge the adapter with "
                                  "PEFT (merge_and_unload) instead")
        return cls(
            target_modules=tuple(data["target_modules"]), r=int(data.get("r", 8)),
            lora_alpha=data.get("lora_alpha", 8), lora_dropout=float(data.get("lora_dropout", 0.0)),
            use_rslora=bool(data.get("use_rslora", False)), exclude_modules=tuple(data.get("exclude_modules") or ()),
        )


_OURS = frozenset({"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                   "exclude_modules", "bias", "init_lora_weights"})


def _unsupported(data: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a PEFT adapter config that :class:`LoRAConfig` cannot represent: any key (known to this
    version of PEFT or not) set away from its empty default, targets given as one regular expression (or none),
    a bias, an initialisation that changed the base weights."""
    found = {k: v for k, v in data.items() if k not in _OURS | _PROVENANCE and v not in (None, False, {}, [], "")}
    if not isinstance(data.get("target_modules"), list):  # a regular expression, or parameters targeted instead
        found["target_modules"] = data.get("target_modules")
    if isinstance(data.get("exclude_modules"), str):
        found["exclude_modules"] = data["exclude_modules"]
    if data.get("bias", "none") != "none":
        found["bias"] = data["bias"]
    if data.get("init_lora_weights", True) not in _PLAIN_INITS:
        found["init_lora_weights"] = data["init_lora_weights"]
    return found


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
