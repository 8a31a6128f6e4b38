"""``compute_masks``: config list + criterion -> masks. Pure: the model is read, never changed.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import compute_masks
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> masks = compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], criterion="l1")
    >>> sorted(masks), int(masks["0.weight"].any(dim=(1, 2, 3)).sum())
    (['0.bias', '0.weight'], 2)

Each selected layer's weight is cut into units (its granularity, or the criterion's default), each unit
is scored by the criterion, and the lowest-scoring units are pruned: per layer (``sparse_ratio``),
below a threshold (``sparse_threshold``), ranked across all layers of an entry (``total_sparsity``,
each capped by ``max_sparse_ratio``), or N of every M kept (``"2:4"``). Structured masks (whole output
channels) also mask the bias. With ``example_inputs``, structured masks are made consistent across
coupled layers through the dependency graph, so the masked model computes what the compacted one will.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.checks import (
    check_example_finite,
    check_materialized,
    check_module,
    check_not_quantized,
    check_number,
)
from slimtorch.config import PruneTarget
from slimtorch.errors import ConfigError, SlimWarning
from slimtorch.graph.run import collector_paused
from slimtorch.masks import Masks
from slimtorch.prune.coupled import coupled_masks
from slimtorch.prune.criteria import Criterion, ScoreContext, get_criterion
from slimtorch.prune.granularity import unit_view
from slimtorch.prune.layer_plan import LayerPlan, layer_masks
from slimtorch.select import Selected, select_modules, weight_param_name

__all__ = ["LayerPlan", "compute_masks", "masks_from_keep", "plan_layers", "unit_keep", "units_to_prune"]


def units_to_prune(num_units: int, sparsity: float, *, structured: bool) -> int:
    """How many of ``num_units`` a sparsity removes: rounded half up, never all units of a structured
    layer (an emptied layer cannot compute)."""
    count = math.floor(sparsity * num_units + 0.5)
    return min(count, num_units - 1) if structured else min(count, num_units)


def plan_layers(
    model: nn.Module,
    config_list: Sequence[Mapping[str, Any] | PruneTarget],
    criterion: str | Criterion,
    *,
    stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> list[LayerPlan]:
    """Select layers and score their units (the pure first half of :func:`compute_masks`)."""
    check_module(model, "pruning")
    check_materialized(model, "pruning")
    check_not_quantized(model, "pruning")
    check_number(seed, "seed", low=0, high=2**63 - 1, integer=True)
    default = get_criterion(criterion)
    selected = select_modules(model, config_list)
    generator = torch.Generator().manual_seed(seed)
    plans = []
    with torch.no_grad():
        for name, sel in selected.items():
            crit = get_criterion(sel.target.criterion) if sel.target.criterion else default
            plans.append(_plan_layer(name, sel, crit, (stats or {}).get(name, {}), generator))
    # (one check for every layer: a NaN anywhere is rare, and then the first layer with one is named)
    if plans and bool(torch.cat([p.scores for p in plans]).isnan().any()):
        plan = next(p for p in plans if bool(p.scores.isnan().any()))
        crit = get_criterion(plan.target.criterion) if plan.target.criterion else default
        weight = plan.module._parameters[plan.param]
        if not bool(torch.isfinite(weight).all()):
            raise ConfigError(f"criterion {crit.name!r} gave NaN scores for layer {plan.name!r}: its weight holds "
                              f"{int((~torch.isfinite(weight)).sum())} NaN or infinite values; fix or re-train the "
                              "model, or exclude the layer")
        raise ConfigError(f"criterion {crit.name!r} gave NaN scores for layer {plan.name!r}; check its statistics")
    return plans


def _plan_layer(name: str, sel: Selected, crit: Criterion, stats: Mapping[str, torch.Tensor],
                generator: torch.Generator) -> LayerPlan:
    """One selected layer cut into units and scored by ``crit``."""
    if sel.target.hybrid_thresholds and not crit.thresholds:
        raise ConfigError(f"layer {name!r} is selected by an entry with 'weight_threshold' and 'gradient_threshold', "
                          f"which the hybrid criterion reads, but it is scored by {crit.name!r}: add 'criterion': "
                          "'hybrid' to the entry (or give it a 'sparse_ratio' instead)")
    gran = sel.target.granularity or crit.default_granularity
    param = weight_param_name(sel.module)
    assert param is not None  # select_modules only returns modules that own a weight
    weight = sel.module._parameters[param].detach()
    view = unit_view(sel.module, weight.shape, gran)
    ctx = ScoreContext(name, sel.module, view, stats, generator, sel.target)
    for key in crit.needs:
        ctx.stat(key, crit.name)
    scores = crit.fn(view.units(weight), ctx)
    if not isinstance(scores, torch.Tensor) or scores.shape != (view.num_units,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ConfigError(f"criterion {crit.name!r} returned {got} for layer {name!r}; a criterion returns "
                          f"one score per unit, a tensor of shape ({view.num_units},)")
    return LayerPlan(name, sel.module, sel.target, sel.entry, view, scores.detach().to("cpu", torch.float64), param,
                     crit.size_power)


def _keep_lowest_pruned(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask with the ``count`` lowest scores pruned (ties: the earlier unit goes first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:  # (numpy's stable sort: a tenth of torch's time on a layer's few hundred scores)
        keep[torch.from_numpy(np.argsort(scores.numpy(), kind="stable")[:count])] = False
    return keep


def _n_m_keep(plan: LayerPlan) -> torch.Tensor:
    m, n = plan.view.group_size, plan.view.keep_per_group
    groups = plan.scores.reshape(-1, m)  # (num_groups, M)
    top = torch.topk(groups, n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return keep.reshape(-1)


def _global_counts(plans: list[LayerPlan], total: float, cap: float) -> list[int]:
    """Units to prune per layer so that ``total`` of all their weights go, ranked across layers.

    Scores are compared per weight (score / unit size ** the criterion's size power) so that units of
    different sizes compare fairly. A layer that would exceed its cap is fixed at the cap and the rest
    re-ranked (water-filling), so the total is met whenever the caps allow it (a SlimWarning says so
    when they do not).
    """
    sizes = [p.view.unit_size for p in plans]
    caps = [units_to_prune(p.view.num_units, cap, structured=p.view.structured) for p in plans]
    target = math.floor(total * sum(p.view.num_units * s for p, s in zip(plans, sizes, strict=True)) + 0.5)
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(plans)) if i not in fixed]
        remaining = target - sum(fixed[i] * sizes[i] for i in fixed)
        counts = dict(fixed)
        if free and remaining > 0:
            per_weight = torch.cat([plans[i].scores / sizes[i] ** plans[i].size_power for i in free])
            owner = torch.cat([torch.full((plans[i].view.num_units,), i) for i in free])
            size = torch.tensor([sizes[i] for i in free]).repeat_interleave(
                torch.tensor([plans[i].view.num_units for i in free])
            )
            order = torch.sort(per_weight, stable=True).indices
            cum = torch.cumsum(size[order], 0)
            count = int(torch.searchsorted(cum, torch.tensor(remaining)))  # cum[count] >= remaining
            if count < len(cum) and cum[count] - remaining < remaining - (cum[count - 1] if count else 0):
                count += 1
            chosen = torch.bincount(owner[order[:count]], minlength=len(plans))
            counts.update({i: int(chosen[i]) for i in free})
        else:
            counts.update({i: 0 for i in free})
        over = [i for i in free if counts[i] > caps[i]]
        if not over:
            _warn_if_short(plans, counts, total, sizes)
            return [counts[i] for i in range(len(plans))]
        fixed.update({i: caps[i] for i in over})


def _warn_if_short(plans: list[LayerPlan], counts: dict[int, int], requested: float, sizes: list[int]) -> None:
    """Say with numbers when the caps (or never emptying a structured layer) keep the total below target."""
    pruned = sum(counts[i] * sizes[i] for i in counts)
    total = sum(p.view.num_units * s for p, s in zip(plans, sizes, strict=True))
    if requested * total - pruned > max(sizes) / 2:  # more than rounding to whole units explains
        warnings.warn(
            f"total_sparsity {requested:.3f} cannot be reached within the per-layer caps "
            f"(max_sparse_ratio, never emptying a structured layer); reached {pruned / total:.3f}",
            SlimWarning,
            stacklevel=5,
        )


def unit_keep(plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """Per-unit keep flags of every planned layer, by layer name."""
    keep: dict[str, torch.Tensor] = {}
    pools: dict[int, list[LayerPlan]] = {}
    for plan in plans:
        target, view = plan.target, plan.view
        if view.group_size:
            keep[plan.name] = _n_m_keep(plan)
        elif target.thresholded:
            # the hybrid pair: its criterion scores a unit >= 1 exactly where both thresholds are reached
            keep[plan.name] = plan.scores >= (1.0 if target.hybrid_thresholds else target.sparse_threshold)
            if view.structured and not keep[plan.name].any():
                keep[plan.name][plan.scores.argmax()] = True  # never empty a structured layer
        elif target.total_sparsity is not None:
            pools.setdefault(plan.entry, []).append(plan)
        else:
            count = units_to_prune(view.num_units, target.sparse_ratio or 0.0, structured=view.structured)
            keep[plan.name] = _keep_lowest_pruned(plan.scores, count)
    for pool in pools.values():
        target = pool[0].target
        cap = target.max_sparse_ratio if target.max_sparse_ratio is not None else 1.0
        for plan, count in zip(pool, _global_counts(pool, target.total_sparsity or 0.0, cap), strict=True):
            keep[plan.name] = _keep_lowest_pruned(plan.scores, count)
    return keep


def masks_from_keep(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    keep: Mapping[str, torch.Tensor],
    *,
    example_inputs: Any = None,
) -> Masks:
    """Turn per-unit keep flags (:func:`unit_keep`) into parameter masks (the last step of
    :func:`compute_masks`); with ``example_inputs``, structured masks go through the dependency graph, whose
    trace they carry (:class:`~slimtorch.masks.Masks`)."""
    plans = list(plans)
    if example_inputs is not None and any(p.view.structured for p in plans):
        masks = coupled_masks(model, example_inputs, [p for p in plans if p.view.structured], dict(keep))
        plans = [p for p in plans if not p.view.structured]
    else:
        masks = Masks()
    for plan in plans:
        masks.update(layer_masks(plan, keep[plan.name]))
    return masks


@collector_paused()
def compute_masks(
    model: nn.Module,
    config_list: Sequence[Mapping[str, Any] | PruneTarget],
    *,
    example_inputs: Any = None,
    criterion: str | Criterion = "l1",
    stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> Masks:
    """Masks (``param name -> bool tensor``, True = keep) for the layers ``config_list`` selects.

    Args:
        model: the model to score; it is not changed.
        config_list: NNI-style entries (dicts or :class:`~slimtorch.config.PruneTarget`).
        example_inputs: a batch (tensor, tuple or dict) for the dependency graph: with it, structured
            masks are made consistent across coupled layers and extended to every parameter that
            produces or normalises a pruned channel. Its values must be finite: a NaN or an infinity is a
            ConfigError naming the input (the graph is traced on them, as :func:`~slimtorch.compact_` does).
            The masks then carry the graph's shapes-only trace, which :func:`~slimtorch.compact_` replays
            instead of tracing the model again (:class:`~slimtorch.masks.Masks`).
        criterion: a registered criterion name (``"l1"``, ``"l2"``, ``"fpgm"``, ``"magnitude"``,
            ``"random"``, ...) for the entries that name none (``"criterion"`` in an entry scores its layers).
            Its default granularity applies where an entry gives none: the norm criteria default to whole
            output channels (as NNI's norm pruners), magnitude to single weights.
        stats: per-layer statistics for data-driven criteria, ``{layer_name: {"grad": ...}}``.
        seed: seed of the random criterion.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None:
        check_example_finite(example_inputs, "compute_masks")
    plans = plan_layers(model, config_list, criterion, stats=stats, seed=seed)
    return masks_from_keep(model, plans, unit_keep(plans), example_inputs=example_inputs)
