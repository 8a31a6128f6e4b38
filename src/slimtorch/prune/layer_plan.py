"""One selected layer, cut into units and scored (:class:`LayerPlan`), and the masks its keep flags make.

What :func:`~slimtorch.prune.pruner.plan_layers` produces and both mask builders read: the per-layer one
(:func:`~slimtorch.prune.pruner.masks_from_keep`) and the graph-consistent one
(:func:`~slimtorch.prune.coupled.coupled_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.config import PruneTarget
from slimtorch.prune.granularity import UnitView, channel_dims
from slimtorch.select import bias_param_name

__all__ = ["LayerPlan", "layer_masks"]


@dataclass(frozen=True)
class LayerPlan:
    """One selected layer, cut into units and scored. ``scores`` is float64 on the CPU, one per unit.

    ``param`` is the scored parameter (``"weight"``, or ``"in_proj_weight"`` of a MultiheadAttention);
    ``size_power`` is the criterion's (how its scores grow with the unit size, for global ranking).
    """

    name: str
    module: nn.Module
    target: PruneTarget
    entry: int
    view: UnitView
    scores: torch.Tensor
    param: str = "weight"
    size_power: float = 1.0

    @property
    def weight_name(self) -> str:
        return f"{self.name}.{self.param}"


def layer_masks(plan: LayerPlan, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight mask of one layer, and its bias mask when whole output rows (channels, heads) go."""
    weight = plan.module._parameters[plan.param]
    mask = plan.view.expand(keep).to(weight.device)
    masks = {plan.weight_name: mask}
    bias_name = bias_param_name(plan.module)
    bias = plan.module._parameters.get(bias_name)
    if plan.view.granularity.kind in ("out_channel", "head") and isinstance(bias, torch.Tensor):
        out_dim = channel_dims(plan.module)[0] if mask.dim() > 1 else 0
        rows = mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1).any(dim=1)  # (out,): row kept or not
        if bias.shape == rows.shape:
            masks[f"{plan.name}.{bias_name}"] = rows
    return masks
