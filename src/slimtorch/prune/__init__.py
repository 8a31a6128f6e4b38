"""The pruning phase: decide which parameters go (masks), without changing any shape."""

from slimtorch.prune.criteria import CRITERIA, Criterion, ScoreContext, get_criterion, register_criterion
from slimtorch.prune.masks import apply_masks_, get_masks, is_masked, mask_sparsity, remove_masks_
from slimtorch.prune.pruner import LayerPlan, compute_masks, plan_layers

__all__ = [
    "CRITERIA",
    "Criterion",
    "LayerPlan",
    "ScoreContext",
    "apply_masks_",
    "compute_masks",
    "get_criterion",
    "get_masks",
    "is_masked",
    "mask_sparsity",
    "plan_layers",
    "register_criterion",
    "remove_masks_",
]
