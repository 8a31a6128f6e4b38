"""NNI-style names, so code written for NNI's compression API runs with a changed import.

    from slimtorch.compat.nni import L1NormPruner          # was: from nni.compression.pytorch.pruning import ...
    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    _, masks = pruner.compress()       # the model now computes as pruned (same shapes)
    pruner._unwrap_model()             # bake the zeros in, drop the masking hooks

Differences from NNI, on purpose: a config entry that matches nothing is an error (NNI ignores it), and
masks are slimtorch's flat ``{"conv1.weight": mask}`` dict; ``masks["conv1"]["weight"]`` (NNI's nested
form) works too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.config import Granularity, PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.prune.masks import apply_masks_, remove_masks_
from slimtorch.prune.pruner import compute_masks
from slimtorch.select import select_modules

__all__ = ["FPGMPruner", "L1NormPruner", "L2NormPruner", "LevelPruner", "ModelSpeedup", "NNIMasks"]


class NNIMasks(dict):
    """Flat masks ``{"fc1.weight": mask}`` that also answer NNI's nested lookup ``masks["fc1"]["weight"]``."""

    def _nested(self, module_name: str) -> dict[str, torch.Tensor]:
        prefix = module_name + "."
        return {k[len(prefix) :]: v for k, v in super().items() if k.startswith(prefix) and "." not in k[len(prefix) :]}

    def __getitem__(self, key: str) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        nested = self._nested(key)
        if nested:
            return nested
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and bool(self._nested(key)))


class _Pruner:
    """Shared shape of the NNI pruners: validate at construction, mask on ``compress()``."""

    criterion = "l1"
    granularity = "out_channel"

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        mode: str = "normal",
        dummy_input: Any = None,
    ) -> None:
        if mode not in ("normal", "dependency_aware"):
            raise ValueError(f"mode must be 'normal' or 'dependency_aware', got {mode!r}")
        if mode == "dependency_aware" and dummy_input is None:
            raise ValueError("mode='dependency_aware' needs dummy_input (a batch the model accepts)")
        self.model = model
        self.config_list = self._with_granularity(parse_config_list(config_list))
        select_modules(model, self.config_list)  # fail now, not at compress(), on a bad config
        self.dummy_input = dummy_input if mode == "dependency_aware" else None
        self.masks: NNIMasks | None = None

    def _with_granularity(self, targets: tuple[PruneTarget, ...]) -> tuple[PruneTarget, ...]:
        default = Granularity.parse(self.granularity)
        return tuple(
            t if t.exclude or t.granularity is not None else dataclasses.replace(t, granularity=default)
            for t in targets
        )

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        """Compute the masks and apply them: the model computes as pruned, shapes unchanged."""
        masks = compute_masks(
            self.model, self.config_list, example_inputs=self.dummy_input, criterion=self.criterion
        )
        apply_masks_(self.model, masks)
        self.masks = NNIMasks(masks)
        return self.model, self.masks

    def unwrap_model(self) -> None:
        """Bake the masks into the weights and remove the masking hooks (NNI's ``_unwrap_model``)."""
        remove_masks_(self.model)

    _unwrap_model = unwrap_model

    def show_pruned_weights(self) -> list[str]:
        """One line per masked parameter: kept / total (what NNI prints)."""
        if self.masks is None:
            raise RuntimeError("call compress() first")
        return [f"{k}: kept {int(m.sum())} of {m.numel()}" for k, m in self.masks.items()]


class LevelPruner(_Pruner):
    """Unstructured magnitude pruning: the smallest weights of each layer go."""

    criterion = "magnitude"
    granularity = "fine"


class L1NormPruner(_Pruner):
    """Structured: output channels (filters, neurons) with the smallest L1 norm go."""

    criterion = "l1"


class L2NormPruner(_Pruner):
    """Structured: output channels with the smallest L2 norm go."""

    criterion = "l2"


class FPGMPruner(_Pruner):
    """Structured: output channels closest to the geometric median of their layer go."""

    criterion = "fpgm"


def _flat_masks(model: nn.Module, masks: Any) -> dict[str, torch.Tensor]:
    """slimtorch's flat masks from flat ones, NNI's nested ``{module or name: {param: mask}}``, or a file."""
    from slimtorch.io import load_masks

    if isinstance(masks, (str, bytes)) or hasattr(masks, "__fspath__"):
        return load_masks(masks)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict or a safetensors file path, got {type(masks).__name__}")
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
        self.model = model
        self.dummy_input = dummy_input
        self.masks = _flat_masks(model, masks)

    def speedup_model(self) -> nn.Module:
        """Compact the model in place; returns it for convenience."""
        from slimtorch.compact import compact_

        compact_(self.model, self.masks, example_inputs=self.dummy_input)
        return self.model
