"""LoRA adapters: fine-tune a compressed model through two small matrices per layer, then merge them back.

A wrapped layer computes ``base(x) + scaling * B(A(dropout(x)))`` with ``A: in -> r`` (Kaiming init),
``B: r -> out`` (zeros, so training starts from the base model) and ``scaling = lora_alpha / r``
(``/ sqrt(r)`` with ``use_rslora``). The base layer is frozen; it may be a plain ``Linear``/``Conv2d``
(compacted or factorized models) or a 4-/1-bit :class:`~slimtorch.quant.LowBitLinear` (QLoRA-style
fine-tuning on int4 weights). :func:`merge_lora_` folds ``scaling * B @ A`` into the weight and
leaves plain float layers.

Adapters are saved in PEFT's layout, so either library can read the other's files:
``adapter_model.safetensors`` with keys ``base_model.model.<layer>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), and ``adapter_config.json`` with ``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora``, ``bias: "none"``.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.lora import LoRAConfig, add_lora_, merge_lora_
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> add_lora_(model, LoRAConfig(r=4, target_modules=("0",)))
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)    # only A and B train
    128
    >>> merge_lora_(model)
    >>> type(model[0]).__name__
    'Linear'
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.errors import CheckpointError, ConfigError, NoMatchError, closest
from slimtorch.io import atomic_write
from slimtorch.quant.lowbit import LowBitConv2d, LowBitLinear

__all__ = [
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALinear",
    "add_lora_",
    "load_lora_",
    "lora_state_dict",
    "merge_lora_",
    "save_lora",
]

LORA_ATTR = "slimtorch_lora"
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT wraps the model twice; its saved keys carry this prefix
_LINEAR = (nn.Linear, LowBitLinear)
_CONV = (nn.Conv2d, LowBitConv2d)


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
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ConfigError(f"unknown LoRA config keys {unknown}; allowed keys: {allowed}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

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


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class _LoRA(nn.Module):
    def __init__(self, base: nn.Module, lora_a: nn.Module, lora_b: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B = base, lora_a, lora_b
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling = config.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts exactly at the base model
        self.to(_device(base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def base_weight(self) -> torch.Tensor:
        base = self.base_layer
        return base.dequantized_weight() if isinstance(base, (LowBitLinear, LowBitConv2d)) else base.weight.detach()


class LoRALinear(_LoRA):
    """A frozen Linear (float or low-bit) plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        a = nn.Linear(base.in_features, config.r, bias=False)
        b = nn.Linear(config.r, base.out_features, bias=False)
        super().__init__(base, a, b, config)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in)

    def merged(self) -> nn.Linear:
        base = self.base_layer
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base_weight() + self.delta_weight())
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.to(self.lora_A.weight.device)


class LoRAConv2d(_LoRA):
    """A frozen Conv2d plus a rank-``r`` update: a conv with the base's kernel to ``r`` channels, then 1x1."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        w = base.weight_shape if isinstance(base, LowBitConv2d) else tuple(base.weight.shape)
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        a = nn.Conv2d(w[1], config.r, w[2:], base.stride, base.padding, base.dilation, bias=False)
        b = nn.Conv2d(config.r, w[0], 1, bias=False)
        super().__init__(base, a, b, config)

    def delta_weight(self) -> torch.Tensor:
        # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return torch.einsum("or,rikl->oikl", self.lora_B.weight.flatten(1), self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Conv2d:
        base, w = self.base_layer, self.lora_A.weight
        layer = nn.Conv2d(w.shape[1], self.lora_B.weight.shape[0], w.shape[2:], base.stride, base.padding,
                          base.dilation, bias=base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base_weight() + self.delta_weight())
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.to(w.device)


def _matches(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    names = [n for n, _ in model.named_modules() if n]
    for key in (*config.target_modules, *config.exclude_modules):
        if not any(_matches(n, (key,)) for n in names):
            raise NoMatchError(f"LoRA target {key!r} matches no module name; {closest(key, names)}")
    chosen = {n: m for n, m in model.named_modules()
              if n and _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)}
    for name, module in chosen.items():
        if not isinstance(module, _LINEAR + _CONV) or isinstance(module, _LoRA):
            raise ConfigError(f"LoRA target {name!r} is a {type(module).__name__}; targets must be Linear or "
                              "Conv2d layers (float or low-bit) without an adapter yet")
    return chosen


def add_lora_(model: nn.Module, config: LoRAConfig) -> None:
    """Wrap each target layer with a LoRA adapter and freeze every other parameter (in place). Targets are
    checked before any layer is wrapped."""
    targets = _targets(model, config)
    wrapped = {n: (LoRAConv2d if isinstance(m, _CONV) else LoRALinear)(m, config) for n, m in targets.items()}
    model.requires_grad_(False)
    for name, layer in wrapped.items():
        model.set_submodule(name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    setattr(model, LORA_ATTR, config.to_dict())


def _adapters(model: nn.Module) -> dict[str, _LoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRA)}


def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and drop the adapters (in place). A low-bit base becomes a
    float layer holding its dequantized weight plus the update (quantize again afterwards if wanted)."""
    adapters = _adapters(model)
    if not adapters:
        raise ConfigError("the model has no LoRA adapters to merge; add them with add_lora_ first")
    merged = {name: layer.merged() for name, layer in adapters.items()}
    for name, layer in merged.items():
        model.set_submodule(name, layer)
    if hasattr(model, LORA_ATTR):
        delattr(model, LORA_ATTR)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under PEFT's key names (``base_model.model.<layer>.lora_A.weight``)."""
    return {f"{_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach().cpu().contiguous()
            for name, layer in _adapters(model).items() for part in ("lora_A", "lora_B")}


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's layout) into ``directory``."""
    from safetensors.torch import save_file

    if not getattr(model, LORA_ATTR, None):
        raise ConfigError("the model has no LoRA adapters to save; add them with add_lora_ first")
    config = LoRAConfig.from_dict(getattr(model, LORA_ATTR))
    directory = Path(directory)
    tensors = lora_state_dict(model)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft(), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def _read_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = LoRAConfig.from_peft(json.loads((directory / CONFIG_NAME).read_text()))
        return config, load_file(str(directory / WEIGHTS_NAME))
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ConfigError) as err:
        raise CheckpointError(f"{str(directory)!r} is not a readable LoRA adapter folder: {err}") from None


def _adapter_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of lora_A and lora_B for a target layer (what PEFT stores, too)."""
    if isinstance(module, _CONV):
        w = module.weight_shape if isinstance(module, LowBitConv2d) else tuple(module.weight.shape)
        return (r, w[1], *w[2:]), (w[0], r, 1, 1)  # A: (r, in, kh, kw), B: (out, r, 1, 1)
    return (r, module.in_features), (module.out_features, r)


def load_lora_(model: nn.Module, directory: str | Path) -> None:
    """Add the adapters saved in ``directory`` (by :func:`save_lora` or PEFT) to ``model`` and load their
    weights. Keys or shapes that do not match raise CheckpointError before the model is changed."""
    config, tensors = _read_adapter(Path(directory))
    expected = {}
    for name, module in _targets(model, config).items():
        a_shape, b_shape = _adapter_shapes(module, config.r)
        expected[f"{_PREFIX}{name}.lora_A.weight"] = a_shape
        expected[f"{_PREFIX}{name}.lora_B.weight"] = b_shape
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"wrong shapes {wrong[:3]}")
    add_lora_(model, config)
    with torch.no_grad():
        for name, layer in _adapters(model).items():
            layer.lora_A.weight.copy_(tensors[f"{_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{_PREFIX}{name}.lora_B.weight"])
