"""NNI's ``speedup`` module: :class:`ModelSpeedup` makes a masked model really smaller.

    from slimtorch.compat.nni import speedup     # was: from nni.compression.pytorch import speedup
    speedup.ModelSpeedup(model, input_sample, masks).speedup_model()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.compact import compact_
from slimtorch.compat.nni.common import NNIMasks
from slimtorch.errors import ConfigError
from slimtorch.io import load_masks

__all__ = ["ModelSpeedup", "flat_masks"]


def flat_masks(model: nn.Module, masks: Any) -> dict[str, torch.Tensor]:
    """slimtorch's flat masks from flat ones, NNI's nested ``{module or name: {param: mask}}``, or a file."""
    if isinstance(masks, (str, bytes)) or hasattr(masks, "__fspath__"):
        return load_masks(masks)
    if not isinstance(masks, Mapping):
        raise ConfigError(f"masks must be a dict or a safetensors file path, got {type(masks).__name__}")
    if isinstance(masks, NNIMasks) or not all(isinstance(v, Mapping) for v in masks.values()):
        return dict(masks.items())
    names = {id(m): n for n, m in model.named_modules()}
    flat = {}
    for module, params in masks.items():
        prefix = names.get(id(module), module) if isinstance(module, nn.Module) else module
        if isinstance(module, nn.Module) and id(module) not in names:
            raise ConfigError(f"a mask key is a {type(module).__name__} that is not part of the model; key the masks "
                              "by the model's own modules or their names")
        for param, mask in params.items():
            flat[f"{prefix}.{param}" if prefix else param] = mask
    return flat


class ModelSpeedup:
    """NNI's ``ModelSpeedup``: make the masked model really smaller (:func:`slimtorch.compact_`).

    ``masks`` may be slimtorch's flat ``{"conv1.weight": mask}``, NNI's nested ``{"conv1": {"weight": mask}}``
    (keys may also be the modules themselves) or the path of a safetensors mask file. Unlike NNI, masked
    BatchNorm offsets are folded or kept (outputs stay the same), the result is left in the mode it was in,
    and hard-coded shapes in ``forward`` (``x.view(-1, 4 * 4 * 50)``) are rewritten so the model runs.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, masks: Any) -> None:
        check_module(model, "ModelSpeedup")
        self.model = model
        self.dummy_input = dummy_input
        self.masks = flat_masks(model, masks)

    def speedup_model(self) -> nn.Module:
        """Compact the model in place; returns it for convenience."""
        compact_(self.model, self.masks, example_inputs=self.dummy_input)
        return self.model
