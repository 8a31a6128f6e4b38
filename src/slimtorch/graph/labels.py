"""Channel labels: how the dependency graph knows which channels must go together.

Every channel that a layer produces (a conv filter, a Linear neuron, an embedding feature) gets an integer
*label*. Each traced tensor carries a label tensor of the same rank, broadcastable to the tensor (a dim of
size 1 means "the labels do not change along this dim"), with -1 where no producer channel lives. Ops move
label tensors exactly as they move values, and ops that tie channels together (a residual add, a shared
weight, a dot product) *union* labels. After the trace, each union-find class is one *unit*: a set of
channels, in many parameters, that is kept or removed as a whole.

    >>> import torch
    >>> uf = UnionFind()
    >>> a, b = uf.new(3), uf.new(3)
    >>> uf.union(a, b)                                 # a residual add ties channel i of a to channel i of b
    >>> bool((uf.find(a) == uf.find(b)).all())
    True
"""

from __future__ import annotations

import torch

__all__ = ["UnionFind", "broadcast_merge", "collapse", "union_rows", "varying_dims"]

_NONE = -1


class UnionFind:
    """Vectorised union-find over integer labels; -1 (no label) passes through untouched."""

    def __init__(self) -> None:
        self._parent = torch.empty(1024, dtype=torch.long)
        self.size = 0

    def new(self, n: int) -> torch.Tensor:
        """``n`` fresh labels, each its own class."""
        if self.size + n > self._parent.numel():
            grown = torch.empty(max(2 * self._parent.numel(), self.size + n), dtype=torch.long)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        ids = torch.arange(self.size, self.size + n, dtype=torch.long)
        self._parent[self.size : self.size + n] = ids
        self.size += n
        return ids

    def find(self, labels: torch.Tensor) -> torch.Tensor:
        """The class representative (root) of every label, same shape; -1 stays -1."""
        # Every union ends by pointing each label at its root, so one lookup is enough here.
        parent = self._parent[: self.size]
        return torch.where(labels >= 0, parent[labels.clamp(min=0)], labels)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie ``a[i]`` to ``b[i]`` for every position where both are labels (shapes must broadcast)."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        valid = (a >= 0) & (b >= 0)
        ra, rb = self.find(a[valid]), self.find(b[valid])
        differ = ra != rb
        if not bool(differ.any()):
            return
        parent = self._parent[: self.size]
        ra, rb = ra[differ], rb[differ]
        while ra.numel():
            low, high = torch.minimum(ra, rb), torch.maximum(ra, rb)
            # Roots only ever point to a smaller id, so this converges; conflicting links to the same
            # root keep the smallest and the rest are linked on the next pass.
            parent.scatter_reduce_(0, high, low, reduce="amin")
            self._compress()
            ra, rb = parent[ra], parent[rb]
            keep = ra != rb
            ra, rb = ra[keep], rb[keep]

    def _compress(self) -> None:
        parent = self._parent[: self.size]
        while True:
            up = parent[parent]
            if torch.equal(up, parent):
                return
            parent.copy_(up)

    def roots(self) -> torch.Tensor:
        """Root of every label issued so far, indexed by label."""
        return self.find(torch.arange(self.size, dtype=torch.long))


def varying_dims(labels: torch.Tensor | None) -> list[int]:
    """Dims along which a label tensor is not broadcast."""
    return [] if labels is None else [d for d, n in enumerate(labels.shape) if n > 1]


def collapse(uf: UnionFind, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Canonical form: labels replaced by roots, dims along which nothing changes reduced to size 1, and
    ``None`` when no position holds a label."""
    if labels is None:
        return None
    if not bool((labels >= 0).any()):
        return None
    labels = uf.find(labels)
    for dim, n in enumerate(labels.shape):
        if n > 1:
            first = labels.narrow(dim, 0, 1)
            if torch.equal(labels, first.expand_as(labels)):
                labels = first
    return labels.contiguous()


def broadcast_merge(uf: UnionFind, parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Labels of an elementwise op's output: operands' labels broadcast together, positions labelled in
    several operands are tied (a channel of ``x + y`` is one channel of x and one of y)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    merged = present[0]
    grew = False
    for other in present[1:]:
        left, right = torch.broadcast_tensors(merged, other)
        grew = grew or left.numel() > max(merged.numel(), other.numel())
        uf.union(left, right)
        merged = torch.where(left >= 0, left, right)
    return collapse(uf, merged) if grew or merged.dim() else merged


def union_rows(uf: UnionFind, labels: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Tie together all labels that share their index along the ``keep`` dims (a per-channel parameter
    such as a BatchNorm weight touches channel c at every spatial position) and return one label per
    index of the kept dims, shaped like those dims; -1 where a row holds no label."""
    others = [d for d in range(labels.dim()) if d not in keep]
    moved = labels.permute(*keep, *others)
    rows = moved.reshape(*moved.shape[: len(keep)], -1)  # (*keep dims, everything else)
    flat = rows.reshape(-1, rows.shape[-1])  # (rows, positions in row)
    if flat.shape[1] == 1:
        return rows[..., 0]
    valid = flat >= 0
    first = torch.where(valid, flat, torch.full_like(flat, torch.iinfo(torch.long).max)).amin(dim=1)
    has = valid.any(dim=1)
    first = torch.where(has, first, torch.full_like(first, _NONE))
    uf.union(first[:, None].expand_as(flat), flat)
    return uf.find(first).reshape(rows.shape[:-1])
