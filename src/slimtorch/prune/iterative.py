"""Gradual pruning on a schedule, inside your training loop or driven by an :class:`Evaluator`.

One-shot, iterative (linear, AGP) and "pruning with regrowth" are the same object with different
settings. Each pruning step ranks the units again with the criterion and reaches the schedule's
sparsity for that step::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.iterative import GradualPruner
    >>> from slimtorch.prune.schedule import Schedule
    >>> net = nn.Sequential(nn.Linear(10, 10))
    >>> pruner = GradualPruner(net, [{"op_types": ["Linear"], "sparse_ratio": 0.8}],
    ...                        schedule=Schedule(kind="agp", start=0, end=4), criterion="magnitude")
    >>> for step in range(5):
    ...     pass                     # forward, backward, optimizer.step() of your loop
    ...     pruner.step()            # after the optimizer step
    >>> int((net[0].weight == 0).sum())
    80

``regrow=False`` (default): pruned weights stay pruned (masks with hooks, each step prunes more).
``regrow=True``: each step only zeroes the currently least important weights; the optimizer may grow
them back and the next step ranks all weights again (the seeds' "pruning with rewinding", also known
as soft pruning); :meth:`GradualPruner.finish_` applies the final masks for good.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_example_finite
from slimtorch.config import PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.masks import Masks, apply_masks_, get_masks
from slimtorch.prune.criteria import Criterion, criteria_needs, get_criterion
from slimtorch.prune.layer_plan import LayerPlan
from slimtorch.prune.loop import Callback, Evaluator
from slimtorch.prune.pruner import masks_from_keep, plan_layers, unit_keep, units_to_prune
from slimtorch.prune.schedule import Schedule
from slimtorch.prune.stats import Stats, StatsTracker, collect_stats
from slimtorch.select import select_modules

__all__ = ["CALIBRATION_BATCHES", "GradualPruner", "force_pruned", "relative_to_origin", "scale_targets",
           "weight_sparsity"]

#: Batches of training data used for a criterion's statistics when the library drives and none are given.
CALIBRATION_BATCHES = 16

StatsSource = StatsTracker | Callable[[], Stats] | None
#: Compaction between rounds, called as ``compact(model, masks, example_inputs=...)``: :func:`slimtorch.compact_`
#: (pruning sits below compaction, so the caller hands it in).
Compactor = Callable[..., None]


def scale_targets(
    targets: Sequence[PruneTarget], fn: Callable[[float], float]
) -> tuple[PruneTarget, ...]:
    """Targets with every amount ``s`` (``sparse_ratio`` or ``total_sparsity``) replaced by ``fn(s)``.

    Thresholds and N:M patterns fix their sparsity and cannot be reached gradually: a ConfigError.
    """
    out = []
    for t in targets:
        if t.exclude:
            out.append(t)
        elif t.thresholded or (t.granularity and t.granularity.implied_sparsity is not None):
            raise ConfigError(
                "gradual methods need 'sparse_ratio' or 'total_sparsity' entries; a threshold or an N:M "
                f"pattern fixes the sparsity at once (entry selecting {t.op_types or t.op_names or t.op_partial_names})"
            )
        elif t.sparse_ratio is not None:
            out.append(dataclasses.replace(t, sparse_ratio=min(fn(t.sparse_ratio), t.sparse_ratio)))
        else:
            assert t.total_sparsity is not None
            out.append(dataclasses.replace(t, total_sparsity=min(fn(t.total_sparsity), t.total_sparsity)))
    return tuple(out)


def weight_sparsity(masks: Mapping[str, torch.Tensor], plans: Sequence[LayerPlan]) -> float:
    """Share of pruned weights over the planned layers' weights (biases not counted)."""
    names = [p.weight_name for p in plans]
    total = sum(masks[n].numel() for n in names if n in masks)
    kept = sum(int(masks[n].sum()) for n in names if n in masks)
    return 1.0 - kept / total if total else 0.0


def force_pruned(plan: LayerPlan, masks: Mapping[str, torch.Tensor]) -> LayerPlan:
    """Units already fully pruned score -inf, so they stay pruned and count towards the new target."""
    mask = masks.get(plan.weight_name)
    if mask is None:
        return plan
    pruned = ~plan.view.units(mask.cpu()).any(dim=1)  # (num_units,)
    return dataclasses.replace(plan, scores=plan.scores.masked_fill(pruned, float("-inf")))


def _take(data: Any, count: int) -> list[Any]:
    return list(itertools.islice(iter(data), count))


def _check_settings(schedule: Any, stats: Any, regrow: Any, example_inputs: Any) -> None:
    """What :class:`GradualPruner` is given must work at every later step: checked when it is made."""
    if not isinstance(schedule, Schedule):
        fix = "Schedule.from_dict(...)" if isinstance(schedule, Mapping) else "Schedule(kind='agp', start=0, end=10)"
        raise ConfigError(f"schedule must be a Schedule, got {type(schedule).__name__} {schedule!r}; pass {fix}")
    if stats is not None and not isinstance(stats, StatsTracker) and not callable(stats):
        raise ConfigError(f"stats must be a StatsTracker or a function returning {{layer: {{key: tensor}}}}, got "
                          f"{type(stats).__name__} {stats!r}")
    if not isinstance(regrow, bool):
        raise ConfigError(f"regrow must be True or False, got {regrow!r}")
    if example_inputs is not None:
        check_example_finite(example_inputs, "GradualPruner")


class GradualPruner(Callback):
    """Prunes the layers ``config_list`` selects towards its sparsities on a :class:`Schedule`.

    Args:
        model: pruned in place (masks with hooks, see :func:`slimtorch.apply_masks_`).
        config_list: the *final* sparsities; each pruning step reaches the schedule's share of them.
        schedule: when to prune. With :meth:`step` its steps are your training steps; with :meth:`run_`
            they are rounds of fine-tuning.
        criterion: any registered criterion. Data-driven ones read ``stats``.
        stats: where statistics come from at each pruning step: a :class:`StatsTracker` (read, then reset)
            or a function returning ``{layer: {key: tensor}}``. :meth:`run_` collects them itself if absent.
        regrow: let pruned weights grow back between steps (soft pruning); see the module docs.
        example_inputs: a batch for the dependency graph, so structured masks stay consistent.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any] | PruneTarget],
        *,
        schedule: Schedule,
        criterion: str | Criterion = "magnitude",
        stats: StatsSource = None,
        regrow: bool = False,
        example_inputs: Any = None,
    ) -> None:
        _check_settings(schedule, stats, regrow, example_inputs)
        self.model = model
        self.targets = parse_config_list(config_list)
        scale_targets(self.targets, lambda s: s)  # reject thresholds and N:M now
        select_modules(model, self.targets)  # a bad selector fails here, not mid-training
        self.criterion = get_criterion(criterion)
        self.needs = criteria_needs(self.targets, self.criterion)  # every entry's criterion, not only the default
        self.schedule = schedule
        self.stats = stats
        self.regrow = regrow
        self.example_inputs = example_inputs
        self.steps = 0
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.history: list[dict[str, float]] = []
        # Per layer, (units, weights) before the first round: with compaction between rounds, each round's
        # sparsity is reached against these sizes, not the compacted ones.
        self.origin: dict[str, tuple[int, int]] = {}

    def step(self) -> None:
        """Count one training step (call it after ``optimizer.step()``); prune when the schedule says so."""
        self.steps += 1
        if self.schedule.is_pruning_step(self.steps):
            self.prune_to_(self.steps)

    def after_step(self, batch: Any) -> None:
        self.step()

    def prune_to_(self, step: int, *, stats: Stats | None = None) -> None:
        """Prune to the schedule's sparsity at ``step`` now (statistics from ``stats`` or the source)."""
        targets = scale_targets(self.targets, lambda s: self.schedule.sparsity(step, s))
        if stats is None and self.needs:
            stats = self._read_stats()
        plans = plan_layers(self.model, targets, self.criterion, stats=stats, seed=step)
        if not self.origin:
            self.origin = {p.name: (p.view.num_units, p.module._parameters[p.param].numel()) for p in plans}
        plans = relative_to_origin(plans, self.origin)
        if not self.regrow and self.masks:
            plans = [force_pruned(p, self.masks) for p in plans]
        masks = masks_from_keep(self.model, plans, unit_keep(plans), example_inputs=self.example_inputs)
        if self.regrow:
            _zero_(self.model, masks)
        else:
            apply_masks_(self.model, masks)
        self.masks = masks
        self.sparsity = _origin_sparsity(masks, plans, self.origin)

    def _read_stats(self) -> Stats:
        if self.stats is None:
            raise ConfigError(
                f"criterion {self.criterion.name!r} (with the entries' own criteria) needs statistics "
                f"{list(self.needs)}; pass "
                "stats=StatsTracker(model, keys=...) (or a function returning them), or use run_()"
            )
        if isinstance(self.stats, StatsTracker):
            stats = self.stats.stats()
            self.stats.reset()
            return stats
        return self.stats()

    def finish_(self) -> None:
        """Prune to the final sparsities and keep them for good (masks with hooks, also after regrowth)."""
        regrow, self.regrow = self.regrow, False
        self.masks = {} if regrow else self.masks
        self.prune_to_(max(self.schedule.end, self.steps))

    def run_(self, evaluator: Evaluator, *, finetune_epochs: int = 1, warmup_epochs: int = 0,
             compact: Compactor | None = None) -> None:
        """Let the library drive: train ``warmup_epochs`` first (for an untrained model), then for each
        round 0..``schedule.end`` where the schedule prunes something, prune and fine-tune
        ``finetune_epochs``. ``self.history`` gets one row per round (sparsity, metric with eval data).

        ``compact=slimtorch.compact_`` compacts the model after each round's pruning, so that fine-tuning
        and the next round run on the smaller model (NNI's scheduled pruners with ``speedup=True``); each
        round still reaches the schedule's sparsity of the layers' sizes before the first round, and the
        history's rows add the parameter count."""
        self._check_compact(compact)
        evaluator.train_(self.model, epochs=warmup_epochs)
        for round_ in range(self.schedule.end + 1):
            if not self.schedule.is_pruning_step(round_) or self.schedule.sparsity(round_, 1.0) == 0.0:
                continue
            self.prune_to_(round_, stats=self._round_stats(evaluator))
            row = {"round": float(round_), "sparsity": self.sparsity}
            if compact is not None:
                merged = Masks({**get_masks(self.model), **self.masks}, trace=getattr(self.masks, "trace", None))
                compact(self.model, merged, example_inputs=self.example_inputs)
                self.masks = get_masks(self.model)  # what the compacted model keeps masked, at its size
                row["params"] = float(sum(p.numel() for p in self.model.parameters()))
            evaluator.train_(self.model, epochs=finetune_epochs)
            if evaluator.eval_data is not None:
                row["metric"] = evaluator.evaluate(self.model)
            self.history.append(row)
        if self.regrow:
            self.finish_()
            if evaluator.eval_data is not None:
                self.history.append({"round": float(self.schedule.end), "sparsity": self.sparsity,
                                     "metric": evaluator.evaluate(self.model)})

    def _check_compact(self, compact: Compactor | None) -> None:
        if compact is None:
            return
        if not callable(compact):
            raise ConfigError(f"compact must be a function such as slimtorch.compact_, got {type(compact).__name__}")
        if self.example_inputs is None:
            raise ConfigError("compacting between rounds traces the model: give GradualPruner example_inputs=...")
        if self.regrow:
            raise ConfigError("regrow=True lets pruned weights grow back, which a compacted model cannot: use "
                              "regrow=False to compact between rounds")
        if isinstance(self.stats, StatsTracker):
            raise ConfigError("a StatsTracker keeps statistics at the sizes before compaction; leave stats=None "
                              "so that run_ collects them on the compacted model each round")

    def _round_stats(self, evaluator: Evaluator) -> Stats | None:
        if not self.needs:
            return None
        if self.stats is not None:
            return self._read_stats()
        batches = _take(evaluator.train_data, CALIBRATION_BATCHES)
        return collect_stats(
            self.model, batches, keys=self.needs, loss_fn=evaluator.loss_fn, config_list=self.targets
        )


def relative_to_origin(plans: Sequence[LayerPlan], origin: Mapping[str, tuple[int, int]]) -> list[LayerPlan]:
    """``plans`` whose targets reach their sparsity against the layers' sizes in ``origin`` (units, weights)
    rather than their current ones: what compaction already removed counts as pruned. Unchanged layers keep
    their plans. A ``sparse_ratio`` becomes the share of the current units still to prune; a
    ``total_sparsity`` the share of the current weights of its entry's layers still to prune."""
    out = list(plans)
    shrunk = {p.name for p in plans if p.name in origin and p.view.num_units != origin[p.name][0]}
    shrunk |= {p.name for p in plans if p.name in origin and p.module._parameters[p.param].numel() != origin[p.name][1]}
    if not shrunk:
        return out
    pools: dict[int, list[int]] = {}
    for i, plan in enumerate(out):
        target = plan.target
        if target.sparse_ratio is not None and plan.name in shrunk:
            units, now = origin[plan.name][0], plan.view.num_units
            count = max(0, units_to_prune(units, target.sparse_ratio, structured=plan.view.structured) - (units - now))
            out[i] = dataclasses.replace(plan, target=dataclasses.replace(target, sparse_ratio=count / now))
        elif target.total_sparsity is not None:
            pools.setdefault(plan.entry, []).append(i)
    for members in pools.values():
        before = sum(origin[out[i].name][1] for i in members if out[i].name in origin)
        now = sum(out[i].module._parameters[out[i].param].numel() for i in members)
        target = out[members[0]].target
        wanted = max(0.0, 1.0 - (1.0 - (target.total_sparsity or 0.0)) * before / now) if now else 0.0
        for i in members:
            out[i] = dataclasses.replace(out[i], target=dataclasses.replace(target, total_sparsity=wanted))
    return out


def _origin_sparsity(masks: Mapping[str, torch.Tensor], plans: Sequence[LayerPlan],
                     origin: Mapping[str, tuple[int, int]]) -> float:
    """Share of the planned layers' weights pruned, against their sizes before the first round."""
    before = sum(origin[p.name][1] for p in plans if p.name in origin)
    if not before:
        return weight_sparsity(masks, plans)
    kept = sum(int(masks[p.weight_name].sum()) if p.weight_name in masks else p.module._parameters[p.param].numel()
               for p in plans)
    return 1.0 - kept / before


@torch.no_grad()
def _zero_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked entries once, without hooks: the optimizer may move them again."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
