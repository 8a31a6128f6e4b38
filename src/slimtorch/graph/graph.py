"""The dependency graph: which channels of which parameters are kept or removed together.

A :class:`DependencyGraph` is what :func:`~slimtorch.graph.build_graph` returns after one real forward
pass. Its vocabulary:

* a **member** is one parameter (or buffer) dim whose indices are channels: a conv weight's output dim
  (``role="out"``), its input dim (``"in"``), a BatchNorm weight (``"norm"``), or, for a parameter used
  directly in arithmetic such as a position embedding, every element (``"element"``);
* a **unit** is a set of channels that must go together (a residual add ties channel i of both
  branches); units are identified by an integer, the root of their union-find class;
* a **group** is the set of units that share members (all channels of one residual stream), the thing
  a pruner ranks and cuts as a whole;
* a unit is **blocked** when removing it would change what the model computes in a way compaction
  cannot reproduce (it reaches the model output, a softmax over channels, an unknown op...);
* an **equal-count constraint** says that some blocks of channels must keep the same number of channels
  each (a grouped conv's groups, attention heads, the halves of a ``chunk``);
* a **sink** records the values measured where channels are consumed, so that compaction can check
  that a removed channel is really zero there (or fold its constant value into a bias);
* a **fix site** is a call with hard-coded sizes or indices (``x.view(-1, 800)``) that must see other
  numbers once the model is smaller.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.graph import build_graph
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = build_graph(net, torch.randn(1, 3, 8, 8))
    >>> group = graph.group_of("0.weight")
    >>> len(group.units), sorted({m.name for m in group.members})
    (8, ['0.bias', '0.weight', '1.bias', '1.running_mean', '1.running_var', '1.weight', '3.weight'])
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slimtorch.errors import NoMatchError, closest
from slimtorch.graph.labels import UnionFind, components

__all__ = ["ChannelGroup", "DependencyGraph", "Member", "PerMember", "Sink", "label_table"]

ROLES = ("out", "in", "norm", "element")


def label_table(per_unit: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """``per_unit`` (one value per unit id) per label, plus a False at the end that label -1 (no channel)
    reads: a lookup at label positions is then one gather, ``table[labels]``."""
    return torch.cat([per_unit[roots], per_unit.new_zeros(1)])


@dataclass
class Member:
    """One parameter or buffer dim indexed by channels. ``labels`` has one label per index of ``dim``
    (for ``role="element"``: one per element, shaped like the tensor); -1 where no channel lives.
    ``groups`` > 1 marks a grouped conv's dim that holds one group's channels: ``labels`` then covers all
    ``groups * shape[dim]`` channels, and block j of them pairs with block j of ``other_dim`` (a conv's
    input dim holds ``C_in / groups`` channels, read by the j-th block of output channels)."""

    name: str
    dim: int | None
    role: str
    labels: torch.Tensor
    is_buffer: bool = False
    groups: int = 1
    other_dim: int = 0

    @property
    def key(self) -> tuple[str, int | None, str]:
        return (self.name, self.dim, self.role)

    def broadcastable(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Per-label keep flags (``keep`` shaped like ``labels``) placed in a tensor of ``shape``: broadcastable
        to it, with size 1 on every dim they do not vary along."""
        if self.dim is None:
            return keep.reshape(shape)
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        if self.groups > 1:
            per_group = keep.reshape(self.groups, -1)  # (groups, shape[dim])
            # Each index of other_dim belongs to one group and sees that group's row of flags.
            rows = per_group.repeat_interleave(shape[self.other_dim] // self.groups, dim=0)  # (other, dim)
            if self.other_dim > self.dim:
                rows = rows.transpose(0, 1)
            view[self.other_dim] = shape[self.other_dim]
            return rows.reshape(view)
        return keep.reshape(view)


def _full_mask(flags: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One fresh bool tensor of ``shape``: the product of broadcastable keep flags (a weight's rows times its
    columns). Multiplied as bytes on their small broadcast shape, then spread once: ``logical_and`` of
    full-size broadcast views is ten times slower, element by element."""
    product = functools.reduce(torch.mul, [f.view(torch.uint8) for f in flags])  # 0/1 bytes: valid bools
    if product.shape != shape:
        product = product.expand(shape)
    return (product if product.is_contiguous() else product.contiguous()).view(torch.bool)


class PerMember(Sequence):
    """One flat tensor read as consecutive pieces of the given sizes (one per member), each cut when it is
    read: a model has hundreds of members, and cutting them all (``torch.split``) costs more than the work
    done with the few that lose a channel. ``flat`` is the whole tensor."""

    def __init__(self, flat: torch.Tensor, sizes: list[int]) -> None:
        self.flat = flat
        self._ends = list(itertools.accumulate(sizes, initial=0))

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.flat[self._ends[index] : self._ends[index + 1]]


@dataclass
class Sink:
    """Values measured where channels are consumed (per label position, over every other dim).

    ``kind``: ``"consumer"`` (a layer's weight reads them; ``member`` names it), ``"zero"`` (they must be
    exactly zero to be removed: normalisation statistics, sums over channels) or ``"pair"`` (a dot
    product: removable when either side is zero; ``other`` holds the second side's statistics)."""

    kind: str
    labels: torch.Tensor
    absmax: torch.Tensor
    vmin: torch.Tensor
    vmax: torch.Tensor
    member: tuple[str, int | None, str] | None = None
    foldable: bool = False
    other: Sink | None = None


@dataclass
class ChannelGroup:
    """Units that share members: pruning any of them touches every member listed."""

    index: int
    units: torch.Tensor
    members: list[Member]

    @property
    def params(self) -> list[str]:
        return sorted({m.name for m in self.members if not m.is_buffer})


@dataclass
class DependencyGraph:
    """Result of tracing a model: members, units, groups, constraints, sinks and fix sites."""

    uf: UnionFind = field(default_factory=UnionFind)
    members: dict[tuple[str, int | None, str], Member] = field(default_factory=dict)
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    constraints: list[torch.Tensor] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    fix_sites: list[Any] = field(default_factory=list)
    unknown: list[tuple[str, str, list[torch.Tensor]]] = field(default_factory=list)
    output: Any = None
    training: bool = False
    measured: bool = True
    replayed: bool = False
    called: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)
    unreached: list[str] = field(default_factory=list)
    # where a value computed from channels became a Python value (a data-dependent branch): "'op' in module 'm'"
    branches: list[str] = field(default_factory=list)
    # a shapes-only graph's slimtorch.graph.replay.Trace: what a later build with values replays (None otherwise)
    trace: Any = field(default=None, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    # what depends on the members alone (not on the union-find): shared with copies made by
    # ``dataclasses.replace``, which share the members too (a replayed graph, the trace it replays)
    _member_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- recording (used by rules while tracing) -------------------------------------------------

    def fresh(self, name: str, dim: int | None, role: str, size: int | tuple[int, ...], **extra: Any) -> torch.Tensor:
        """The labels of a member that creates channels (memoised: a shared weight reuses them); ``size`` is
        a shape for an element member."""
        key = (name, dim, role)
        if key not in self.members:
            size = size if isinstance(size, int) else tuple(size)
            labels = self.uf.new(size) if isinstance(size, int) else self.uf.new(math.prod(size)).reshape(size)
            self.members[key] = Member(name, dim, role, labels, **extra)
            self._same_dim(self.members[key])
        return self.members[key].labels

    def attach(self, name: str, dim: int | None, role: str, labels: torch.Tensor, **extra: Any) -> None:
        """Record that ``name``'s ``dim`` is indexed by ``labels`` (tied to earlier uses of it)."""
        key = (name, dim, role)
        old = self.members.get(key)
        if old is None:
            # (label tensors are never changed in place: the member may share the caller's)
            self.members[key] = Member(name, dim, role, labels.contiguous(), **extra)
            self._same_dim(self.members[key])
            return
        if old.labels.shape != labels.shape:
            raise RuntimeError(f"{name} dim {dim} is used with {labels.shape} and {old.labels.shape} channels")
        self._tie_uses(name, old.labels, labels)
        old.labels = torch.where(old.labels >= 0, old.labels, labels)

    def _tie_uses(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Two uses of one parameter dim (tied weights, a layer called twice): index i is channel a[i] and channel
        b[i], tied; where one use reads no channel (a model input), the other's channel cannot go."""
        self.uf.union(a, b)
        fixed = (a < 0) ^ (b < 0)
        if bool(fixed.any()):
            self.block(torch.where(a >= 0, a, b)[fixed], f"{name} is shared by layers one of which reads an input "
                                                         "without channels there (tied weights)")

    def _same_dim(self, member: Member) -> None:
        """A parameter dim indexed under two roles (a weight tied between an embedding, whose columns are its
        output features, and a Linear, whose columns are its inputs) holds one index per position for both."""
        if member.dim is None or member.groups > 1:
            return
        for role in ROLES:
            other = self.members.get((member.name, member.dim, role))
            if other is not None and other is not member and other.groups == 1 \
                    and other.labels.shape == member.labels.shape:
                self._tie_uses(member.name, other.labels, member.labels)

    def block(self, labels: torch.Tensor | None, reason: str) -> None:
        if labels is not None and bool((labels >= 0).any()):
            self.blocks.append((labels[labels >= 0].unique(), reason))

    def equal_count(self, blocks: torch.Tensor) -> None:
        """Rows of ``blocks`` (num_blocks, block_len) must each keep the same number of channels."""
        if blocks.dim() == 2 and blocks.shape[0] > 1 and bool((blocks >= 0).any()):
            self.constraints.append(blocks)

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie more channels together after the trace (e.g. a pruner's head = a block of channels)."""
        self.uf.union(a, b)
        self._cache.clear()

    # -- queries ------------------------------------------------------------------------------------

    def flat_labels(self) -> tuple[list[Member], torch.Tensor, torch.Tensor]:
        """Every member's labels in one flat tensor: ``(members, labels, owner)``, ``owner`` giving the
        index in ``members`` of each label's member. Per-member questions (is any channel of it removed?)
        are then a gather and a ``bincount`` instead of a few tensor ops per member."""
        cache = self._member_cache
        if cache.get("members") is not self.members or len(cache["flat"][0]) != len(self.members):
            members = list(self.members.values())
            sizes = [m.labels.numel() for m in members]
            flat = torch.cat([m.labels.reshape(-1) for m in members]) if members else torch.empty(0, dtype=torch.long)
            cache.update(members=self.members, sizes=sizes,
                         flat=(members, flat, torch.repeat_interleave(torch.tensor(sizes, dtype=torch.long))))
        return cache["flat"]

    def flat_units(self) -> torch.Tensor:
        """The unit of every label of :meth:`flat_labels` (-1 where no channel lives)."""
        if "flat_units" not in self._cache:
            self._cache["flat_units"] = self.uf.find(self.flat_labels()[1])
        return self._cache["flat_units"]

    def removed_per_member(self, removed: torch.Tensor) -> tuple[list[Member], PerMember, list[int]]:
        """Given ``removed`` (bool per unit id): every member (``flat_labels`` order), its removed flags (one
        per label, flat; False where no channel lives) and how many of them are set."""
        members, _, owner = self.flat_labels()
        table = np.append(removed.numpy(), False)  # unit -1 (no channel) reads the False at the end
        gone = torch.from_numpy(table[self.flat_units().numpy()])  # (numpy: a third of torch's gather time)
        counts = torch.bincount(owner[gone], minlength=len(members)).tolist()
        return members, PerMember(gone, self._member_cache["sizes"]), counts

    def unit_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Unit id (union-find root) of each label; -1 stays -1."""
        return self.uf.find(labels)

    def member(self, name: str, role: str = "out", dim: int | None = None) -> Member:
        """The member of parameter ``name`` with ``role`` (and ``dim`` when several match)."""
        if "by_name" not in self._cache:
            by_name: dict[tuple[str, str], list[Member]] = {}
            for m in self.members.values():
                by_name.setdefault((m.name, m.role), []).append(m)
            self._cache["by_name"] = by_name
        found = [m for m in self._cache["by_name"].get((name, role), []) if dim in (None, m.dim)]
        if not found:
            known = sorted({m.name for m in self.members.values()})
            raise NoMatchError(f"no {role!r} channels of {name!r} in the graph; {closest(name, known)}")
        return found[0]

    @property
    def groups(self) -> list[ChannelGroup]:
        if "groups" not in self._cache:
            self._cache["groups"] = self._make_groups()
        return self._cache["groups"]

    def group_of(self, name: str, role: str = "out") -> ChannelGroup:
        units = self.unit_of(self.member(name, role).labels)
        unit = int(units[units >= 0][0])
        return next(g for g in self.groups if bool((g.units == unit).any()))

    def blocked_units(self) -> dict[int, str]:
        """Unit id -> first reason it cannot be removed."""
        if "blocked" not in self._cache:
            out: dict[int, str] = {}
            for labels, reason in self.blocks:
                for unit in self.unit_of(labels).tolist():
                    out.setdefault(unit, reason)
            self._cache["blocked"] = out
        return self._cache["blocked"]

    def _make_groups(self) -> list[ChannelGroup]:
        members, _, owner = self.flat_labels()
        if not members:
            return []
        # Every member's units in one array (``owner``: which member), so that the work is a few
        # vectorised ops instead of several per member (numpy: these gathers are a third of torch's time).
        flat_units = self.flat_units().numpy()
        valid = flat_units >= 0
        units, owner_np = flat_units[valid], owner.numpy()[valid]
        none = np.iinfo(np.int64).max
        one = np.full(len(members), none)  # one unit of each member (-1: none)
        np.minimum.at(one, owner_np, units)
        one[one == none] = -1
        # Units sharing a member are one family: each is tied to that one unit of its member.
        fam = components(torch.from_numpy(one[owner_np]), torch.from_numpy(units), self.uf.size).numpy()
        by_family: dict[int, list[Member]] = {}
        for m, u, f in zip(members, one.tolist(), fam[np.maximum(one, 0)].tolist(), strict=True):
            if u >= 0:
                by_family.setdefault(f, []).append(m)
        roots = self.uf.roots().numpy()
        unit_ids = np.nonzero(roots == np.arange(roots.size))[0]  # ascending
        order = np.argsort(fam[unit_ids], kind="stable")
        families, starts = np.unique(fam[unit_ids][order], return_index=True)
        units_of = dict(zip(families.tolist(), np.split(unit_ids[order], starts[1:]), strict=True))
        return [ChannelGroup(i, torch.from_numpy(units_of[f]), ms)
                for i, (f, ms) in enumerate(sorted(by_family.items()))]

    def masks(self, removed: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter masks that zero every removed channel (``tensors``: name -> parameter)."""
        flags: dict[str, list[torch.Tensor]] = {}  # per parameter, its members' keep flags, broadcastable
        members, gone, counts = self.removed_per_member(removed)
        for i, (m, n) in enumerate(zip(members, counts, strict=True)):
            if n and not m.is_buffer and m.name in tensors:
                keep = ~gone[i].reshape(m.labels.shape)
                flags.setdefault(m.name, []).append(m.broadcastable(keep, tensors[m.name].shape))
        return {name: _full_mask(found, tensors[name].shape) for name, found in flags.items()}

    def describe(self, names: Iterable[str] | None = None) -> str:
        """One line per group: units, blocked units, members (for reports and debugging)."""
        blocked = self.blocked_units()
        lines = []
        for g in self.groups:
            params = g.params if names is None else [p for p in g.params if p in set(names)]
            nb = sum(int(u) in blocked for u in g.units.tolist())
            lines.append(f"group {g.index}: {len(g.units)} units ({nb} blocked): {', '.join(params[:6])}"
                         + (" ..." if len(params) > 6 else ""))
        return "\n".join(lines)
