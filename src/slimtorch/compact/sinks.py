"""What the masks ask compaction to remove, and what the measured values allow.

A channel (a unit of the dependency graph) is *requested* when the masks zero every weight slice that produces it
(or every weight slice that reads it). It may go, as far as its values are concerned, when wherever it is
consumed the consuming slice is masked, or its value is exactly zero there, or (eval mode, a Linear or an unpadded
conv with a bias) a constant that is folded into the bias (see :mod:`slimtorch.compact.plan`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimtorch.graph import DependencyGraph, Member
from slimtorch.graph.graph import Sink, label_table

__all__ = ["Fold", "check_sinks", "dead_slices", "fold_deltas", "reads_values", "requests"]


def dead_slices(member: Member, mask: torch.Tensor | None,
          alive: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> torch.Tensor:
    """Per label of ``member``: is the weight slice it indexes entirely masked? ``alive``: the live rows and
    columns of masks, found already (:class:`~slimtorch.graph.live.LiveBlocks`). (In numpy: on a layer's
    mask its reductions take a fraction of torch's fixed cost per call, and a model has a hundred of them.)"""
    size = member.labels.numel()
    if mask is None:
        return torch.zeros(size, dtype=torch.bool)
    if member.groups == 1 and member.dim in (0, 1) and alive and (found := alive.get(member.name)) is not None \
            and found[member.dim].size == size:
        return torch.from_numpy(~found[member.dim])
    keep = mask.detach().bool().cpu().numpy()
    if keep.size == 0:
        return torch.ones(size, dtype=torch.bool)
    if member.groups > 1:
        moved = np.moveaxis(keep, (member.other_dim, member.dim), (0, 1))  # (other, dim, rest...)
        g = member.groups
        alive = moved.reshape(g, moved.shape[0] // g, moved.shape[1], -1).any(axis=(1, 3))  # (groups, dim)
        return torch.from_numpy(~alive.reshape(-1))
    others = tuple(d for d in range(keep.ndim) if d != member.dim)
    return torch.from_numpy(~(keep.any(axis=others) if others else keep))


def requests(
    graph: DependencyGraph, masks: Mapping[str, torch.Tensor], params: dict[str, torch.Tensor],
    alive: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, dict[tuple, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(roots, dead, requested, independent)``: the root of every label; per member key, which of its
    slices are masked (:func:`_dead`, for :func:`check_sinks`); and per unit, whether the masks ask to
    remove it, and whether every weight slice producing it is masked (its values do not depend on the input)."""
    roots = graph.uf.roots()
    dead: dict[tuple, torch.Tensor] = {}
    n = roots.numel()
    all_ = {r: torch.ones(n, dtype=torch.int8) for r in ("out", "in")}
    any_ = {r: torch.zeros(n, dtype=torch.bool) for r in ("out", "in")}
    found: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"out": ([], []), "in": ([], [])}
    for m in graph.members.values():
        if m.role not in all_ or m.is_buffer or m.name not in params or params[m.name].dim() < 2:
            continue
        dead[m.key] = dead_slices(m, masks.get(m.name), alive)
        found[m.role][0].append(m.labels.reshape(-1))
        found[m.role][1].append(dead[m.key])
    for role, (labels, flags) in found.items():  # every member of a role at once
        if labels:
            flat = torch.cat(labels)
            valid = flat >= 0
            units = roots[flat[valid]]
            any_[role][units] = True
            all_[role].scatter_reduce_(0, units, torch.cat(flags)[valid].to(torch.int8), "amin")
    independent = any_["out"] & all_["out"].bool()
    return roots, dead, independent | (any_["in"] & all_["in"].bool()), independent


@dataclass
class Fold:
    member: tuple
    position: int
    value: float
    unit: int


#: why a requested channel stays, by the kind of sink that keeps it
_SINK_REASONS = {
    "zero": "a normalisation or a sum over the channels reads their values, which are not zero there",
    "pair": "a product pairs them with channels that are not zero either",
}


def _consumer_reason(sink: Sink, training: bool) -> str:
    reader = repr(sink.member[0])
    if sink.foldable and not training:
        return f"{reader} reads their values, which are neither zero nor constant there"
    return (f"{reader} reads their values, which are not zero there, and cannot take them into its bias (it has "
            "none, pads its input with zeros, or the model trains)")


def check_sinks(graph: DependencyGraph, roots: torch.Tensor, requested: torch.Tensor, independent: torch.Tensor,
                 masks: Mapping[str, torch.Tensor], dead_of: dict[tuple, torch.Tensor],
                 why: dict[int, str]) -> tuple[torch.Tensor, list[Fold]]:
    """Per unit: may it go as far as its sinks are concerned; and the constants to fold if it does. ``why`` gets
    the reason of each unit that may not (unit -> text)."""
    allowed = torch.ones(roots.numel(), dtype=torch.bool)
    requested_at, independent_at = label_table(requested, roots), label_table(independent, roots)
    consumers = [s for s in graph.sinks if s.kind == "consumer"]
    folds: list[Fold] = []
    if consumers:  # all at once (a model has one per layer): a few ops instead of a dozen per sink
        labels, dead = _consumed(graph, consumers, masks, dead_of)
        owner = torch.repeat_interleave(torch.tensor([s.labels.numel() for s in consumers]))
        asked, independent_here = requested_at[labels], independent_at[labels]
        units = roots[labels.clamp(min=0)]
        zero = (torch.cat([s.absmax.reshape(-1) for s in consumers]) == 0) & independent_here
        vmin = torch.cat([s.vmin.reshape(-1) for s in consumers])
        foldable = torch.tensor([s.foldable and not graph.training for s in consumers])[owner]
        const = (vmin == torch.cat([s.vmax.reshape(-1) for s in consumers])) & vmin.isfinite() & independent_here \
            & foldable
        refused = asked & ~(dead | zero | const)
        allowed[units[refused]] = False
        for p, i in zip(*[t.tolist() for t in _where(refused, owner)], strict=True):
            why.setdefault(int(units[p]), _consumer_reason(consumers[i], graph.training))
        starts = torch.cumsum(torch.tensor([0] + [s.labels.numel() for s in consumers]), 0)
        folds = [Fold(consumers[i].member, p - int(starts[i]), float(vmin[p]), int(units[p]))
                 for p, i in zip(*[t.tolist() for t in _where(asked & ~dead & ~zero & const, owner)], strict=True)]
    for sink in graph.sinks:
        if sink.kind == "consumer":
            continue
        labels = sink.labels.reshape(-1)
        asked = requested_at[labels]
        if not bool(asked.any()):
            continue
        units = roots[labels.clamp(min=0)]
        zero = (sink.absmax.reshape(-1) == 0) & independent_at[labels]
        if sink.kind == "pair":
            other = sink.other
            other_units = roots[other.labels.reshape(-1).clamp(min=0)]
            zero_a = torch.ones_like(allowed).scatter_reduce_(0, units, zero, "amin")
            other_zero = (other.absmax.reshape(-1) == 0) & independent[other_units]
            zero_b = torch.ones_like(allowed).scatter_reduce_(0, other_units, other_zero, "amin")
            ok = (zero_a | zero_b)[units]
        else:
            ok = zero
        allowed[units[asked & ~ok]] = False
        for unit in units[asked & ~ok].unique().tolist():
            why.setdefault(unit, _SINK_REASONS.get(sink.kind, "their values are not zero where they are used"))
    return allowed, folds


def _consumed(graph: DependencyGraph, consumers: list[Sink], masks: Mapping[str, torch.Tensor],
              dead_of: dict[tuple, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of every consumer sink, concatenated, and whether the weight slice reading each is masked."""
    labels = torch.cat([s.labels.reshape(-1) for s in consumers])
    return labels, torch.cat([dead_at(graph.members[s.member], masks, dead_of) for s in consumers])


def reads_values(graph: DependencyGraph, sinks: list[Sink], roots: torch.Tensor, requested: torch.Tensor,
                  masks: Mapping[str, torch.Tensor], dead_of: dict[tuple, torch.Tensor]) -> bool:
    """Would :func:`check_sinks` read a measured value of ``sinks``? Only where a requested channel is
    consumed by a weight slice that is not masked, or reaches a sink of another kind."""
    requested_at = label_table(requested, roots)
    consumers = [s for s in sinks if s.kind == "consumer"]
    if consumers:
        labels, dead = _consumed(graph, consumers, masks, dead_of)
        if bool((requested_at[labels] & ~dead).any()):
            return True
    others = [one for s in sinks if s.kind != "consumer" for one in (s, s.other) if one is not None]
    return any(bool(requested_at[one.labels.reshape(-1)].any()) for one in others)


def _where(flags: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``flags`` holds, and the owner of each."""
    positions = torch.nonzero(flags).flatten()
    return positions, owner[positions]


def dead_at(member: Member, masks: Mapping[str, torch.Tensor], dead_of: dict[tuple, torch.Tensor]) -> torch.Tensor:
    found = dead_of.get(member.key)
    return found if found is not None else dead_slices(member, masks.get(member.name))


def fold_deltas(model: nn.Module, folds: list[Fold], removed: torch.Tensor,
                 params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bias changes that carry removed constant channels: bias += sum over the kernel of W[:, c] * value."""
    deltas: dict[str, torch.Tensor] = {}
    for fold in folds:
        if not bool(removed[fold.unit]):
            continue
        weight_name = fold.member[0]
        bias_name = weight_name.rsplit(".", 1)[0] + ".bias" if "." in weight_name else "bias"
        column = params[weight_name].detach().select(1, fold.position)  # (out, *kernel)
        delta = column.reshape(column.shape[0], -1).sum(dim=1) * fold.value
        deltas[bias_name] = deltas.get(bias_name, 0) + delta
    return deltas
