"""LoRA adapters through PEFT: fine-tune a compressed model through two small matrices per layer, then merge
them back.

PEFT (``pip install slimtorch[peft]``) does the work: :func:`add_lora_` checks the targets and hands exactly
those layers to ``peft.inject_adapter_in_model``, so a wrapped layer is PEFT's LoRA layer, computing
``base(x) + scaling * B(A(dropout(x)))`` with ``A: in -> r`` (Kaiming init), ``B: r -> out`` (zeros, so
training starts from the base model) and ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
The base layer is frozen; it may be a plain ``Linear``/``Conv2d`` of any size (compacted or factorized models,
masks kept) or a 4-/1-bit :class:`~slimtorch.quant.LowBitLinear` / ``LowBitConv2d`` (QLoRA-style fine-tuning
on int4 weights), for which slimtorch registers its own LoRA layers with PEFT (:mod:`slimtorch.lora.custom`).
:func:`merge_lora_` folds ``scaling * B @ A`` into the weight and leaves plain float layers, ready to be
compacted or quantized.

Adapters are saved in PEFT's layout, so either library reads the other's files:
``adapter_model.safetensors`` with keys ``base_model.model.<layer>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), and ``adapter_config.json`` as PEFT writes it (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...).

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

from typing import Any

from slimtorch.lora.config import LoRAConfig, require_peft
from slimtorch.lora.layers import add_lora_, merge_lora_
from slimtorch.lora.peft import load_lora_, lora_state_dict, save_lora

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


def __getattr__(name: str) -> Any:
    """``LoRALinear`` / ``LoRAConv2d``: PEFT's LoRA layer classes (imported on first use: PEFT is optional)."""
    if name in ("LoRALinear", "LoRAConv2d"):
        layers = require_peft(f"slimtorch.lora.{name}").tuners.lora
        return layers.Linear if name == "LoRALinear" else layers.Conv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
