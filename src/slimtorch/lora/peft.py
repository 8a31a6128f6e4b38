"""Adapters on disk in PEFT's layout, so that PEFT and slimtorch read each other's files:
``adapter_model.safetensors`` (keys ``base_model.model.<layer>.lora_A.weight``, as PEFT's
``get_peft_model_state_dict`` names them under a ``PeftModel``) and ``adapter_config.json`` (what PEFT writes
for the settings). The layout is PEFT's; its files are read by slimtorch's container (kind ``lora``: bounded
JSON, safetensors only, the same errors), and a file is checked against the model before the model is changed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.atomic import atomic_folder
from slimtorch.checks import check_module, check_output_file
from slimtorch.container import DescriptionError, Kind, TensorInfo, read_description, read_tensors, register_kind
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.lora.config import ADAPTER, LoRAConfig, require_peft
from slimtorch.lora.layers import CONV, LORA_ATTR, adapters, add_lora_, lora_targets
from slimtorch.quant.lowbit import LowBitConv2d

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_lora_", "lora_state_dict", "save_lora"]

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
_PREFIX = "base_model.model."  # a PeftModel wraps the model twice; its saved keys carry this prefix


def _check_config(description: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    try:
        LoRAConfig.from_peft(dict(description))
    except (ConfigError, KeyError, TypeError) as err:
        raise DescriptionError(str(err)) from None


LORA = register_kind(Kind(
    name="lora", version=1, title="LoRA adapter folder", readable="safetensors file of a LoRA adapter",
    described="adapter config", header=False, check=_check_config,
    fix="save the adapter with slimtorch.lora.save_lora (or PEFT's save_pretrained)"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under PEFT's key names (``base_model.model.<layer>.lora_A.weight``)."""
    peft = require_peft("lora_state_dict")
    check_module(model, "lora_state_dict")
    if not adapters(model):
        return {}
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    return {_PREFIX + key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's layout) into ``directory``."""
    from safetensors.torch import save_file

    require_peft("save_lora")
    check_module(model, "save_lora")
    if not getattr(model, LORA_ATTR, None) or not adapters(model):
        raise ConfigError("the model has no LoRA adapters to save; add them with add_lora_ first")
    config = LoRAConfig.from_dict(getattr(model, LORA_ATTR))
    directory = Path(directory)
    check_output_file(directory / WEIGHTS_NAME, "save_lora")  # the folder must not be a file
    tensors = lora_state_dict(model)
    text = json.dumps(config.to_peft(), indent=2, sort_keys=True)
    with atomic_folder(directory) as staging:  # both files or neither
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(text)


def _read_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    if (directory / "adapter_model.bin").is_file() and not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{str(directory)!r} holds adapter_model.bin, a pickle, which is never read: save the "
                              "adapter again with PEFT's safe_serialization=True (the default)")
    try:
        config = LoRAConfig.from_peft(read_description(directory / CONFIG_NAME, LORA))
        return config, read_tensors(directory / WEIGHTS_NAME, LORA)[1]
    except CheckpointError as err:
        raise CheckpointError(f"{str(directory)!r} is not a readable LoRA adapter folder: {err}") from None


def _adapter_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of lora_A and lora_B for a target layer (what PEFT stores, too)."""
    if isinstance(module, CONV):
        w = module.weight_shape if isinstance(module, LowBitConv2d) else tuple(module.weight.shape)
        return (r, w[1], *w[2:]), (w[0], r, 1, 1)  # A: (r, in, kh, kw), B: (out, r, 1, 1)
    return (r, module.in_features), (module.out_features, r)


def _check_fits(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor]) -> None:
    expected = {}
    for name, module in lora_targets(model, config).items():
        a_shape, b_shape = _adapter_shapes(module, config.r)
        expected[f"{_PREFIX}{name}.lora_A.weight"] = a_shape
        expected[f"{_PREFIX}{name}.lora_B.weight"] = b_shape
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    not_float = [k for k in expected if k in tensors and not tensors[k].is_floating_point()]
    if missing or unexpected or wrong or not_float:
        raise CheckpointError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"wrong shapes {wrong[:3]}, not floating point {not_float[:3]}")


def load_lora_(model: nn.Module, directory: str | Path) -> None:
    """Add the adapters saved in ``directory`` (by :func:`save_lora` or PEFT) to ``model`` and load their
    weights. Keys or shapes that do not match raise CheckpointError before the model is changed."""
    peft = require_peft("load_lora_")
    config, tensors = _read_adapter(Path(directory))
    _check_fits(model, config, tensors)
    add_lora_(model, config)
    result = peft.set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
    assert not result.unexpected_keys, f"PEFT did not place {result.unexpected_keys[:3]}"
