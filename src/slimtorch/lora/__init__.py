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

from slimtorch.lora.config import LoRAConfig
from slimtorch.lora.layers import LoRAConv2d, LoRALinear, add_lora_, merge_lora_
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
