"""Group-consistent structured masks: channels that the dependency graph ties together are pruned together.

:func:`~slimtorch.compute_masks` calls :func:`coupled_masks` for structured layer plans when it is given
``example_inputs``. Each coupled group (say, the residual stream of a ResNet stage: every conv writing
to it, every BatchNorm normalising it, every conv reading it) is ranked as a whole: a channel's score is
the mean of its planned layers' scores (each layer's scores divided by their mean, so that layers of
different scale weigh the same), and the requested fraction of the group's channels is pruned, respecting
the graph's constraints (conv groups and heads keep equal sizes, channels that reach the output stay).
Every parameter that produces, normalises or reads a pruned channel is masked, so the masked model
computes exactly what the compacted one will::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import compute_masks
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> masks = compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=torch.randn(1, 3, 8, 8))
    >>> sorted(masks), int(masks["3.weight"].any(dim=(0, 2, 3)).sum())     # conv 3 reads 4 channels
    (['0.bias', '0.weight', '1.bias', '1.weight', '3.weight'], 4)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.errors import NoMatchError, SlimWarning
from slimtorch.graph import DependencyGraph, Member, build_graph
from slimtorch.masks import Masks
from slimtorch.prune.granularity import channel_dims
from slimtorch.prune.layer_plan import LayerPlan, layer_masks

__all__ = ["coupled_masks", "implied_param_count"]


def implied_param_count(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Parameters of ``model`` once compacted, as group-consistent masks imply: every masked entry goes,
    every kept one stays (true for masks from :func:`coupled_masks`, which mask whole slices everywhere).

    >>> net = nn.Linear(4, 2)
    >>> implied_param_count(net, {"weight": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]).bool()})
    6
    """
    return sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in model.named_parameters())


def _channel_units(graph: DependencyGraph, plan: LayerPlan) -> tuple[Member, torch.Tensor] | None:
    """The graph member a plan's units cut (output or input channels) and each channel's plan unit."""
    view = plan.view
    out_dim, in_dim = channel_dims(plan.module)
    if view.granularity.kind == "out_channel":
        # a norm layer's channels (network slimming prunes BatchNorm scales) are "norm" members of the graph
        candidates = [(role, out_dim, torch.arange(view.num_units)) for role in ("out", "norm")]
    else:
        ids = torch.arange(view.num_units)[:, None].expand(view.num_units, view.unit_size).contiguous()
        grid = view.from_units(ids)  # weight-shaped: the plan unit of every weight
        candidates = []
        for role, dim in (("out", out_dim), ("in", in_dim)):
            per = grid.movedim(dim, 0).reshape(grid.shape[dim], -1)  # (channels, rest)
            if bool((per == per[:, :1]).all()):
                candidates.append((role, dim, per[:, 0]))
    for role, dim, units in candidates:
        try:
            member = graph.member(plan.weight_name, role, dim)
        except NoMatchError:
            continue
        if member.labels.numel() == units.numel():
            return member, units
        if member.groups > 1 and member.labels.numel() == units.numel() * member.groups:
            return member, units.repeat(member.groups)  # a grouped dim: local index l of every group
    return None


def _balance(graph: DependencyGraph, roots: torch.Tensor, removed: torch.Tensor, score: torch.Tensor,
             free: torch.Tensor) -> None:
    """Make every equal-count constraint hold: rows keep the same number of channels (in place)."""
    for rows in graph.constraints:
        for _ in range(4):
            units = roots[rows.clamp(min=0)]
            gone = removed[units] & (rows >= 0)
            counts = gone.sum(dim=1)
            if bool((counts == counts[0]).all()):
                break
            target = round(float(counts.float().mean()))
            for r in range(rows.shape[0]):
                row_units = units[r][rows[r] >= 0]
                extra = int(counts[r]) - target
                if extra > 0:  # give back the best-scored removed channels of this row
                    back = row_units[removed[row_units]]
                    removed[back[torch.argsort(score[back], descending=True, stable=True)[:extra]]] = False
                elif extra < 0:  # remove the worst-scored free channels of this row
                    more = row_units[~removed[row_units] & free[row_units]]
                    removed[more[torch.argsort(score[more], stable=True)[:-extra]]] = True
        else:
            units = roots[rows.clamp(min=0)]
            removed[units[rows >= 0]] = False  # could not balance: this structure stays whole


def _keep_one(graph: DependencyGraph, roots: torch.Tensor, removed: torch.Tensor, score: torch.Tensor) -> None:
    """Never empty a layer: give back its best-scored channel when all would go (in place)."""
    members, _, counts = graph.removed_per_member(removed)
    for m, n in zip(members, counts, strict=True):
        if n and n == m.labels.numel() and m.role in ("out", "in") and not m.is_buffer:  # every channel gone
            units = roots[m.labels]
            if bool(removed[units].all()):  # (an earlier member's give-back may have saved it already)
                removed[units[torch.argmax(score[units])]] = False


def _tied_units(model: nn.Module, graph: DependencyGraph, roots: torch.Tensor) -> torch.Tensor:
    """The units of parameters known under several names (an embedding tied to the output layer): compaction
    cannot shrink a tied parameter, so pruning leaves its channels alone."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for found in names.values() if len(found) > 1 for n in found}
    labels = [m.labels.reshape(-1) for m in graph.members.values() if m.name in tied]
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return roots[labels[labels >= 0]]


def _select(groups: list[Any], plans: list[tuple[LayerPlan, Member, torch.Tensor]], keep: Mapping[str, torch.Tensor],
            roots: torch.Tensor, score: torch.Tensor, planned: torch.Tensor, free: torch.Tensor,
            removed: torch.Tensor) -> list[str]:
    """Per group, remove the requested fraction of its planned channels, lowest scores first (in place).
    Every group at once: units sorted by (group, score), each group's first ``target`` usable ones go."""
    if not groups or not plans:
        return []
    group_of = torch.full((roots.numel(),), -1, dtype=torch.long)
    group_of[torch.cat([g.units for g in groups])] = torch.repeat_interleave(
        torch.tensor([g.index for g in groups]), torch.tensor([g.units.numel() for g in groups]))
    labels = torch.cat([member.labels for _, member, _ in plans])
    which = torch.repeat_interleave(torch.tensor([member.labels.numel() for _, member, _ in plans]))
    at = torch.where(labels >= 0, group_of[roots[labels.clamp(min=0)]], -1)  # group of every plan label
    pairs = torch.unique(which[at >= 0] * len(groups) + at[at >= 0]).tolist()  # (plan, group) pairs
    in_group: dict[int, list[int]] = {}
    for pair in pairs:
        in_group.setdefault(pair % len(groups), []).append(pair // len(groups))
    pruned = [int((~keep[plan.name]).sum()) for plan, _, _ in plans]
    sizes = [keep[plan.name].numel() for plan, _, _ in plans]
    ids = torch.nonzero(planned).flatten()  # ascending
    ids = ids[group_of[ids] >= 0]  # (a planned unit in no group has no coupled layer to go with)
    candidates = torch.bincount(group_of[ids], minlength=len(groups)).tolist()
    target = torch.zeros(len(groups), dtype=torch.long)
    for index, here in in_group.items():
        fraction = sum(pruned[i] for i in here) / sum(sizes[i] for i in here)
        target[index] = math.floor(fraction * candidates[index] + 0.5)
    usable = ids[free[ids]]
    usable = usable[torch.argsort(score[usable], stable=True)]  # by score (ties: the lower id first) ...
    usable = usable[torch.argsort(group_of[usable], stable=True)]  # ... within each group
    g = group_of[usable]
    first = torch.searchsorted(g, torch.arange(len(groups)))  # where each group starts
    chosen = usable[(torch.arange(usable.numel()) - first[g]) < target[g]]
    removed[chosen] = True
    short = (target - torch.bincount(group_of[chosen], minlength=len(groups))).tolist()
    return [f"{plans[in_group[i][0]][0].name} and coupled layers: {int(target[i]) - n} of the {int(target[i])} "
            f"channels asked ({n} reach the output, an op that needs all channels or a weight tied between layers)"
            for i, n in enumerate(short) if n > 0]


def coupled_masks(
    model: nn.Module, example_inputs: Any, plans: list[LayerPlan], keep: Mapping[str, torch.Tensor]
) -> Masks:
    """Masks for structured ``plans`` made consistent across coupled layers (see the module docstring).

    ``keep`` holds each plan's per-unit keep flags as the per-layer selection made them: their fraction is
    the fraction of the coupled group pruned. A layer that never runs on ``example_inputs`` (in eval or
    train mode) is not pruned; a plan whose units the graph cannot map (e.g. a grouped conv's input
    channels) gets its per-layer mask unchanged. The masks carry the graph's shapes-only trace.
    """
    graph = build_graph(model, example_inputs, cover=True, values=False)
    masks = Masks(trace=graph.trace)
    mapped = []
    for plan in plans:
        if plan.name in graph.unreached:
            warnings.warn(f"{plan.name!r} does not run on the example inputs; it is not pruned", SlimWarning,
                          stacklevel=3)
            continue
        found = _channel_units(graph, plan)
        if found is None:
            masks.update(layer_masks(plan, keep[plan.name]))
        else:
            mapped.append((plan, *found))
    for _plan, member, units in mapped:  # a unit of several channels (a head) goes as a whole
        if torch.unique(units).numel() == units.numel():
            continue
        one = torch.full((int(units.max()) + 1,), -1, dtype=torch.long)
        one.scatter_reduce_(0, units, member.labels, "amax", include_self=False)  # one label per plan unit
        graph.couple(one[units], member.labels)
    roots = graph.uf.roots()
    score = torch.full((roots.numel(),), -1.0, dtype=torch.float64)
    total, count = torch.zeros_like(score), torch.zeros_like(score)
    if mapped:  # every plan at once: its scores over their mean, added up per unit
        s = torch.cat([plan.scores[units] for plan, _, units in mapped])
        labels = torch.cat([member.labels for _, member, _ in mapped])
        lengths = torch.tensor([units.numel() for _, _, units in mapped])
        which = torch.repeat_interleave(lengths)
        means = torch.zeros(len(mapped), dtype=s.dtype).index_add_(0, which, s) / lengths
        s = s / torch.where(means > 0, means, 1.0)[which]
        valid = labels >= 0
        total.index_add_(0, roots[labels[valid]], s[valid])
        count.index_add_(0, roots[labels[valid]], torch.ones_like(s[valid]))
    score = torch.where(count > 0, total / count.clamp(min=1), score)
    planned = count > 0
    free = planned.clone()
    free[torch.tensor(sorted(graph.blocked_units()), dtype=torch.long)] = False
    free[_tied_units(model, graph, roots)] = False
    removed = torch.zeros(roots.numel(), dtype=torch.bool)
    notes = _select(graph.groups, mapped, keep, roots, score, planned, free, removed)
    selected = removed.clone()
    _balance(graph, roots, removed, score, free)
    if back := int((selected & ~removed).sum()):
        notes.append(f"{back} of the {int(selected.sum())} units selected (a channel, or a head taken whole) stay so "
                     "that every attention head or conv group keeps the same number of channels (whole heads of "
                     "nn.MultiheadAttention cannot go)")
    _keep_one(graph, roots, removed, score)
    if notes:
        warnings.warn("coupled pruning could not prune as much as asked: " + "; ".join(notes), SlimWarning,
                      stacklevel=3)
    params = dict(model.named_parameters())
    masks.update(graph.masks(removed, params))
    return masks
