"""The pruning phase: decide which parameters go (masks), without changing any shape.

Criteria say what to cut, granularities which unit, schedules and methods when: one-shot
(:func:`compute_masks`), gradual (:class:`GradualPruner`), lottery tickets (:class:`LotteryTicket`),
sparse training (:class:`DynamicSparsity`), network slimming (:class:`SlimmingRegularizer`), whole
blocks (:mod:`slimtorch.prune.depth`: depth pruning); :func:`sensitivity_analysis` measures what each layer tolerates.
Second-order criteria (``obd``, ``obs``) and the OBS weight update (:func:`apply_obs_`) are in
:mod:`slimtorch.prune.second_order`.
"""

from slimtorch.masks import apply_masks_, get_masks, is_masked, mask_sparsity, remove_masks_
from slimtorch.prune.criteria import (
    CRITERIA,
    Criterion,
    ScoreContext,
    criteria_needs,
    get_criterion,
    register_criterion,
)
from slimtorch.prune.depth import block_drop_loss, block_influence, chain_layers, drop_blocks_, plan_block_drop
from slimtorch.prune.iterative import GradualPruner
from slimtorch.prune.layer_plan import LayerPlan
from slimtorch.prune.loop import Callback, Evaluator
from slimtorch.prune.lottery import LotteryTicket
from slimtorch.prune.pruner import compute_masks, masks_from_keep, plan_layers, unit_keep
from slimtorch.prune.regularize import SlimmingRegularizer, bn_l1_penalty
from slimtorch.prune.schedule import SCHEDULES, Schedule, register_schedule
from slimtorch.prune.second_order import apply_obs_, obs_weights
from slimtorch.prune.sensitivity import SensitivityResult, sensitivity_analysis
from slimtorch.prune.sparse_training import DynamicSparsity
from slimtorch.prune.stats import STAT_KEYS, StatsTracker, collect_stats

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "STAT_KEYS",
    "Callback",
    "Criterion",
    "DynamicSparsity",
    "Evaluator",
    "GradualPruner",
    "LayerPlan",
    "LotteryTicket",
    "Schedule",
    "ScoreContext",
    "SensitivityResult",
    "SlimmingRegularizer",
    "StatsTracker",
    "apply_masks_",
    "apply_obs_",
    "block_drop_loss",
    "block_influence",
    "bn_l1_penalty",
    "chain_layers",
    "collect_stats",
    "compute_masks",
    "criteria_needs",
    "drop_blocks_",
    "get_criterion",
    "get_masks",
    "is_masked",
    "mask_sparsity",
    "masks_from_keep",
    "obs_weights",
    "plan_block_drop",
    "plan_layers",
    "register_criterion",
    "register_schedule",
    "remove_masks_",
    "sensitivity_analysis",
    "unit_keep",
]
