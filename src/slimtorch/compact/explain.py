"""Masked channels that compaction keeps: which parameters, how many channels, and why.

A channel the masks zero whole (a weight's output row, or its input column) stays when removing it could change
what the model computes, or when the graph does not know it as a channel at all. ``compact_`` says so in a
:class:`~slimtorch.errors.SlimWarning` and records it (``model.slimtorch_compaction["masked_channels_kept"]``),
so that masks that compact to nothing, or to less than they ask, never pass without a word:

    >>> import warnings
    >>> import torch
    >>> from torch import nn
    >>> import slimtorch
    >>> class Residual(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.c(y + self.b(y))
    >>> net = Residual().eval()
    >>> keep = torch.arange(8) >= 3  # the first 3 output channels of b, whose sum with a's channels stays
    >>> masks = {"b.weight": keep[:, None, None, None].expand(8, 8, 1, 1), "b.bias": keep}
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     slimtorch.compact_(net, masks, example_inputs=torch.randn(2, 3, 4, 4))
    >>> [(k["parameter"], k["side"], k["channels"]) for k in net.slimtorch_compaction["masked_channels_kept"]]
    [('b.weight', 'output', 3)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimtorch.compact.plan import CompactionPlan
from slimtorch.graph import DependencyGraph

__all__ = ["KeptChannels", "describe_kept", "kept_channels"]

#: how many parameters a warning names before it counts the rest
_NAMED = 8


@dataclass(frozen=True)
class KeptChannels:
    """``channels`` whole slices of ``parameter`` (its ``"output"`` or ``"input"`` channels) that the masks zero
    but compaction keeps, and why."""

    parameter: str
    side: str
    channels: int
    reason: str

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


def kept_channels(model: nn.Module, plan: CompactionPlan, masks: Mapping[str, torch.Tensor]) -> list[KeptChannels]:
    """Every parameter with channels that the masks zero whole and ``plan`` keeps, with the number and the reason
    (``masks``: canonical, as the plan read them)."""
    requests = plan.requests
    if requests is None:
        return []
    counts: Counter[tuple[str, str, str]] = Counter()
    coupled: dict[tuple[str, str], list[int]] = {}  # (parameter, side) -> units it zeroes that were not asked for
    for key, flags in requests.dead.items():
        member = plan.graph.members[key]
        labels = member.labels.reshape(-1)
        units = torch.where(labels >= 0, requests.roots[labels.clamp(min=0)], labels)
        stay = flags & (labels >= 0) & ~plan.removed[units.clamp(min=0)]
        side = "output" if member.role == "out" else "input"
        for unit in units[stay].tolist():
            if bool(requests.asked[unit]):
                counts[member.name, side, requests.why.get(unit, "the channel constraints of the graph")] += 1
            else:
                coupled.setdefault((member.name, side), []).append(unit)
    found = [KeptChannels(name, side, n, reason) for (name, side, reason), n in counts.items()]
    found += _coupled(plan, requests.dead, coupled)
    found += _unknown_to_graph(model, plan.graph, masks)
    return sorted(found, key=lambda k: (k.parameter, k.side, k.reason))


def _coupled(plan: CompactionPlan, dead: dict[tuple, torch.Tensor],
             zeroed: dict[tuple[str, str], list[int]]) -> list[KeptChannels]:
    """Channels zeroed in one parameter but tied (a residual add, a concatenation) to channels other parameters'
    masks keep: the reason names those parameters."""
    if not zeroed:
        return []
    wanted = {u for units in zeroed.values() for u in units}
    keeping: dict[int, set[str]] = {}  # unit -> parameters whose slices of it the masks keep
    for key, flags in dead.items():
        labels = plan.graph.members[key].labels.reshape(-1)
        live = (labels >= 0) & ~flags
        for unit in plan.requests.roots[labels[live]].tolist():
            if unit in wanted:
                keeping.setdefault(unit, set()).add(key[0])
    found = []
    for (name, side), units in zeroed.items():
        others = sorted(set().union(*(keeping.get(u, set()) for u in units)) - {name})
        by = f" to channels that {', '.join(map(repr, others[:4]))}{' ...' if len(others) > 4 else ''} keep" \
            if others else " to channels other layers keep"
        found.append(KeptChannels(name, side, len(units), "coupled, by a residual add, a concatenation or another "
                                  f"op that ties channels across layers,{by}"))
    return found


def _unknown_to_graph(model: nn.Module, graph: DependencyGraph,
                      masks: Mapping[str, torch.Tensor]) -> list[KeptChannels]:
    """Weights whose masks zero whole output rows but which the graph knows as no layer's weight."""
    known = {m.name for m in graph.members.values() if m.role != "element"}
    elements = {m.name for m in graph.members.values() if m.role == "element"}
    found = []
    for name, mask in masks.items():
        if mask.dim() < 2 or name in known or bool(mask.all()):
            continue
        if name in elements and not _computed_weight(graph, name):  # (its entries go with the channels they meet)
            continue
        rows = int((~mask.reshape(mask.shape[0], -1).any(dim=1)).sum())
        if rows:
            found.append(KeptChannels(name, "output", rows, _why_unknown(graph, name)))
    return found


def _computed_weight(graph: DependencyGraph, name: str) -> str | None:
    """The op of ``name``'s module that ran with a weight computed in forward, if one did."""
    module = name.rpartition(".")[0]
    return next((op for op, where, _ in graph.unknown if where == module and "computed in forward" in op), None)


def _why_unknown(graph: DependencyGraph, name: str) -> str:
    module = name.rpartition(".")[0]
    computed = _computed_weight(graph, name)
    if computed:
        return (f"its layer computes the weight it applies in forward ({computed}: a weight standardisation such "
                "as timm's ScaledStdConv2d, or another reparametrisation), so the graph knows no channels of it")
    if module in graph.unreached:
        return "its layer does not run on the example inputs"
    if name not in graph.used:
        return "the model's forward does not use it on the example inputs"
    return "an op without a channel rule reads it, so the graph knows no channels of it"


def describe_kept(kept: list[KeptChannels]) -> str:
    """The kept channels in one sentence per parameter (the first few; the rest counted)."""
    parts = [f"{k.channels} {k.side} channels of {k.parameter!r} ({k.reason})" for k in kept[:_NAMED]]
    if len(kept) > _NAMED:
        rest = sum(k.channels for k in kept[_NAMED:])
        parts.append(f"and {rest} channels of {len(kept) - _NAMED} more entries (model.slimtorch_compaction"
                     "['masked_channels_kept'] lists them all)")
    return "; ".join(parts)

