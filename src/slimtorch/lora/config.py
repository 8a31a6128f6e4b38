"""LoRA settings, and their translation to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimtorch.config import fields_from_dict, fields_to_dict
from slimtorch.errors import CheckpointError, ConfigError

__all__ = ["LoRAConfig"]


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

    def to_peft(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT reads."""
        return {
            "peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules), "exclude_modules": list(self.exclude_modules) or None,
            "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "task_type": None,
            "inference_mode": True, "base_model_name_or_path": None,
        }

    @classmethod
    def from_peft(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Parse a PEFT ``adapter_config.json``; settings this implementation does not have are an error."""
        if data.get("peft_type") != "LORA":
            raise CheckpointError(f"adapter config is peft_type={data.get('peft_type')!r}, not 'LORA'")
        unsupported = {k: data[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if data.get(k)}
        unsupported |= {k: data[k] for k in ("use_dora", "fan_in_fan_out") if data.get(k)}
        if data.get("bias", "none") != "none":
            unsupported["bias"] = data["bias"]
        if unsupported or isinstance(data.get("target_modules"), str):
            raise CheckpointError(f"adapter settings not supported here: {unsupported or data['target_modules']!r}; "
                                  "merge the adapter with PEFT (merge_and_unload) instead")
        return cls(
            target_modules=tuple(data["target_modules"]), r=int(data.get("r", 8)),
            lora_alpha=data.get("lora_alpha", 8), lora_dropout=float(data.get("lora_dropout", 0.0)),
            use_rslora=bool(data.get("use_rslora", False)), exclude_modules=tuple(data.get("exclude_modules") or ()),
        )



def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
