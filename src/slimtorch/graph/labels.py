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

import numpy as np
import torch

__all__ = ["UnionFind", "broadcast_merge", "collapse", "components", "union_rows", "varying_dims"]

_NONE = -1


class UnionFind:
    """Vectorised union-find over integer labels; -1 (no label) passes through untouched.

    Labels come and go as torch tensors; the parent array is a numpy array. Why: the unions a trace makes
    are small (a layer's channels), where the fixed cost of each array operation dominates, and numpy's
    (about 1 us) is a quarter of torch's; a model's trace makes hundreds of them."""

    def __init__(self) -> None:
        self._parent = np.empty(1024, dtype=np.int64)
        self.size = 0

    def new(self, n: int) -> torch.Tensor:
        """``n`` fresh labels, each its own class."""
        if self.size + n > self._parent.size:
            grown = np.empty(max(2 * self._parent.size, self.size + n), dtype=np.int64)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        labels = np.arange(self.size, self.size + n)
        self._parent[self.size : self.size + n] = labels
        self.size += n
        return torch.from_numpy(labels)  # (the parent array holds a copy; these are the caller's)

    def find(self, labels: torch.Tensor) -> torch.Tensor:
        """The class representative (root) of every label, same shape; -1 stays -1."""
        # Every union ends by pointing each label at its root, so one lookup is enough here.
        lab = labels.numpy()
        return torch.from_numpy(np.where(lab >= 0, self._parent[: self.size][np.maximum(lab, 0)], lab))

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie ``a[i]`` to ``b[i]`` for every position where both are labels (shapes must broadcast)."""
        a, b = a.numpy(), b.numpy()
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        if min(a.min(initial=0), b.min(initial=0)) < 0:  # (the common case, every position a label, skips this)
            valid = (a >= 0) & (b >= 0)
            a, b = a[valid], b[valid]
        parent = self._parent[: self.size]
        ra, rb = parent[a], parent[b]  # roots: every label points at its root
        low, high = np.minimum(ra, rb), np.maximum(ra, rb)
        differ = low != high
        if not differ.any():
            return
        low, high = low[differ], high[differ]
        lowest = self.size  # the smallest root that gets linked
        while True:
            # Roots only ever point to a smaller id, so there is no cycle; several links from one root
            # keep the smallest and the rest are made on the next pass.
            lowest = min(lowest, int(high.min()))
            np.minimum.at(parent, high, low)
            # a root just linked may point at another one just linked: the pairs' roots again, in full
            ra, rb = _root(parent, low), _root(parent, high)
            low, high = np.minimum(ra, rb), np.maximum(ra, rb)
            differ = low != high
            if not differ.any():
                break
            low, high = low[differ], high[differ]
        # Restore "every label points at its root", so that find() needs one lookup. A label never
        # points above its own id, so only labels from the smallest linked root on can be affected.
        tail = parent[lowest:]
        tail[:] = _root(parent, tail)

    def adopt(self, fresh: torch.Tensor, labels: torch.Tensor) -> None:
        """``union(fresh, labels)`` for labels just issued by :meth:`new`, each still its own class and newer
        than every label of ``labels`` (a layer's output channels tied one to one to its inputs): each is
        pointed straight at its partner's root, with no search. Anything else goes to :meth:`union`."""
        f, lab = fresh.numpy().reshape(-1), labels.numpy()
        if lab.shape != fresh.shape:
            lab = np.broadcast_to(lab, fresh.shape)
        lab = lab.reshape(-1)
        parent, first = self._parent[: self.size], self.size - f.size
        # the newest labels, in order, each its own root, tied to older ones only: nothing else points at
        # them, so pointing them at their partners' roots keeps "every label points at its root"
        if not (np.array_equal(f, np.arange(first, self.size)) and np.array_equal(parent[first:], f)
                and lab.max(initial=-1) < first):
            self.union(fresh, labels)
            return
        parent[first:] = np.where(lab >= 0, parent[np.maximum(lab, 0)], f)

    def copy(self) -> UnionFind:
        """An independent copy (later unions on either leave the other as it is)."""
        other = UnionFind()
        other._parent, other.size = self._parent[: max(self.size, 1)].copy(), self.size
        return other

    def roots(self) -> torch.Tensor:
        """Root of every label issued so far, indexed by label (a copy)."""
        return torch.from_numpy(self._parent[: self.size].copy())


def _root(parent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The root of each of ``ids``, following parents to the end (pointer jumping: chains halve each pass)."""
    found = parent[ids]
    while True:
        up = parent[found]
        if np.array_equal(up, found):
            return found
        found = up


def components(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Connected components of the graph on ids ``0..n-1`` with edges ``a[i] - b[i]``: per id, the smallest
    id of its component. For one large batch of edges (100k on a small CNN) min-label propagation with
    pointer jumping takes a few passes and beats :class:`UnionFind`, whose strength is the many small
    unions of a trace. In numpy: its gathers and ``minimum.at`` take half the time of torch's on CPU."""
    ends_a, ends_b = a.numpy(), b.numpy()
    comp = np.arange(n)
    while True:
        low = np.minimum(comp[ends_a], comp[ends_b])
        new = comp.copy()
        np.minimum.at(new, ends_a, low)
        np.minimum.at(new, ends_b, low)
        new = new[new]  # each id only ever points at a smaller one of its component: jumping is safe
        if np.array_equal(new, comp):
            return torch.from_numpy(comp)  # every edge's ends agree: one label per component, its smallest id
        comp = new


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
