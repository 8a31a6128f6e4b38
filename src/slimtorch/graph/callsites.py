"""Fix sites: calls whose size or index arguments refer to channels (``x.view(-1, 4 * 4 * 50)``,
``x.split([64, 64], 1)``, ``x[:, :128]``). Once channels are removed these numbers must change; a fix
site records where the call happens (innermost module, op name, occurrence in that module's forward),
computes the compacted numbers, and rewrites the call's arguments at run time.

    >>> import torch
    >>> fix = {"op": "view", "kind": "shape", "sizes": {"1": 400}}
    >>> args, kwargs = apply_fix(fix, (torch.zeros(2, 25, 4, 4), -1, 800), {})
    >>> args[1:]
    (-1, 400)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FixSite", "apply_fix", "canonical_ok", "compacted_sizes", "shape_args"]

# Ops whose arguments are a target shape, and where in the call that shape starts.
SHAPE_OPS = {"view": 1, "reshape": 1, "expand": 1, "broadcast_to": 1, "unflatten": 2}


def compacted_sizes(kept: torch.Tensor) -> dict[int, int]:
    """Size along each varying dim of a tensor once the positions where ``kept`` is False are removed.

    Dims are taken outermost first: an outer dim keeps its indices that still hold something, an inner
    dim keeps as many indices as its fullest row (rows must agree; see :func:`canonical_ok`)."""
    vary = [d for d in range(kept.dim()) if kept.shape[d] > 1]
    sizes = {}
    for j, d in enumerate(vary):
        later = vary[j + 1 :]
        present = kept.any(dim=later, keepdim=True) if later else kept  # (..., d, ...) with later dims reduced
        sizes[d] = int(present.sum(dim=d).max())
    return sizes


def canonical_ok(kept: torch.Tensor) -> bool:
    """True when the kept positions form a dense tensor: along every varying dim, every row that keeps
    anything keeps the same number of indices (e.g. every attention head keeps the same head size)."""
    vary = [d for d in range(kept.dim()) if kept.shape[d] > 1]
    for j, d in enumerate(vary):
        later = vary[j + 1 :]
        present = kept.any(dim=later, keepdim=True) if later else kept
        counts = present.sum(dim=d)
        counts = counts[counts > 0]
        if counts.numel() and not bool((counts == counts[0]).all()):
            return False
    return True


def shape_args(op: str, args: tuple) -> tuple[list[Any], bool] | None:
    """The target shape of a shape op as a list, and whether it was passed as one sequence argument."""
    start = SHAPE_OPS.get(op)
    if start is None or len(args) <= start:
        return None
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0]), True
    if all(isinstance(v, int) for v in rest):
        return list(rest), False
    return None


def _kept_before(kept_rows: torch.Tensor, index: int) -> int:
    return int(kept_rows[: max(index, 0)].sum())


def _norm(index: int | None, size: int, default: int) -> int:
    if index is None:
        return default
    return min(max(index + size if index < 0 else index, 0), size)


@dataclass
class FixSite:
    """One call to rewrite. ``labels`` are the labels its numbers depend on: the output's for a shape
    op, the input's for splits and indexing; ``data`` holds the original arguments that matter."""

    key: tuple[str, str, int]
    kind: str
    labels: torch.Tensor | None
    data: dict[str, Any]

    def compacted(self, kept: torch.Tensor) -> dict[str, Any] | None:
        """The rewrite (JSON-able) given ``kept`` (bool, shaped like ``labels``): the numbers the call must
        see in the compacted model (None when it has none to see)."""
        fn = getattr(self, f"_{self.kind}")
        new = fn(kept)
        return None if not new else {"op": self.key[1], "kind": self.kind, **new}

    def _scalar(self, kept: torch.Tensor | None) -> dict[str, Any]:
        return {"values": self.data["values"]}  # the values as traced

    def _shape(self, kept: torch.Tensor) -> dict[str, Any]:
        sizes = compacted_sizes(kept)
        offset = self.data.get("offset", 0)
        original = self.data["sizes"]
        changed = {}
        for dim, size in sizes.items():
            pos = dim - offset
            # Recorded even when unchanged: the code may compute it from a dim that shrank (Swin's C // heads);
            # a probe run drops the rewrites that the model's own code already gets right.
            if 0 <= pos < len(original) and original[pos] != -1:
                changed[str(pos)] = size
        return {"sizes": changed} if changed else {}

    def _rows(self, kept: torch.Tensor) -> torch.Tensor:
        dim = self.data["dim"]
        return kept.movedim(dim, 0).reshape(kept.shape[dim], -1).any(dim=1)

    def _split(self, kept: torch.Tensor) -> dict[str, Any]:
        rows = self._rows(kept)
        parts = torch.split(rows, self.data["sizes"])
        new = [int(p.sum()) for p in parts]
        return {"sizes": new} if self.data["as_list"] else {"size": new[0]}

    def _narrow(self, kept: torch.Tensor) -> dict[str, Any]:
        rows = self._rows(kept)
        start, length = self.data["start"], self.data["length"]
        return {"start": _kept_before(rows, start), "length": int(rows[start : start + length].sum())}

    def _select(self, kept: torch.Tensor) -> dict[str, Any]:
        rows = self._rows(kept)
        return {"index": _kept_before(rows, self.data["index"])}

    def _roll(self, kept: torch.Tensor) -> dict[str, Any]:
        # Rolling C channels by s puts the last s first; with channels gone, the kept ones keep their cyclic
        # order if the shift is the number of kept channels among those last s.
        shifts = []
        for dim, shift, size in zip(self.data["dims"], self.data["shifts"], self.data["sizes"], strict=True):
            rows = kept.movedim(dim, 0).reshape(kept.shape[dim], -1).any(dim=1) if kept.shape[dim] > 1 else None
            shifts.append(shift if rows is None else int(rows[size - shift % size :].sum()) if shift % size else 0)
        return {"shifts": shifts, "packed": self.data["packed"]}

    def _groups(self, kept: torch.Tensor) -> dict[str, Any]:
        groups = self.data["groups"]
        return {"groups": int(kept.reshape(groups, -1).any(dim=1).sum())}  # (groups, channels per group)

    def _squeeze(self, kept: torch.Tensor | None) -> dict[str, Any]:
        return {"dims": self.data["dims"]}  # the dims dropped as traced (a channel dim left with one stays)

    def _index(self, kept: torch.Tensor) -> dict[str, Any]:
        changed = {}
        for item in self.data["items"]:  # {"pos": index-tuple position, "dim": input dim, "slice"|"int": ...}
            rows = kept.movedim(item["dim"], 0).reshape(kept.shape[item["dim"]], -1).any(dim=1)
            size = rows.numel()
            if "int" in item:
                changed[str(item["pos"])] = {"int": _kept_before(rows, _norm(item["int"], size, 0))}
                continue
            start, stop = item["slice"]
            lo, hi = _norm(start, size, 0), _norm(stop, size, size)
            changed[str(item["pos"])] = {"slice": [_kept_before(rows, lo), _kept_before(rows, hi)]}
        return {"items": changed} if changed else {}


def apply_fix(fix: dict[str, Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Rewrite one call's arguments as ``fix`` (from :meth:`FixSite.compacted`) says."""
    kind = fix["kind"]
    if kind == "shape":
        found = shape_args(fix["op"], args)
        if found is None:
            return args, kwargs
        shape, packed = found
        for pos, size in fix["sizes"].items():
            if shape[int(pos)] != -1:
                shape[int(pos)] = size
        start = SHAPE_OPS[fix["op"]]
        return (*args[:start], tuple(shape)) if packed else (*args[:start], *shape), kwargs
    if kind == "split":
        value = fix["sizes"] if "sizes" in fix else fix["size"]
        return (args[0], value, *args[2:]), {k: v for k, v in kwargs.items() if k not in ("split_size", "sizes")}
    if kind == "narrow":
        return (args[0], args[1], fix["start"], fix["length"]), kwargs
    if kind == "select":
        return (args[0], args[1], fix["index"]), kwargs
    if kind == "index":
        items = list(args[1]) if isinstance(args[1], tuple) else [args[1]]
        for pos, change in fix["items"].items():
            items[int(pos)] = change["int"] if "int" in change else slice(*change["slice"])
        index = tuple(items) if isinstance(args[1], tuple) else items[0]
        return (args[0], index, *args[2:]), kwargs
    if kind == "roll":
        shifts = list(fix["shifts"]) if fix["packed"] else fix["shifts"][0]
        if len(args) > 1:
            return (args[0], shifts, *args[2:]), kwargs
        return args, {**kwargs, "shifts": shifts}
    if kind == "groups":
        if len(args) > 1:
            return (args[0], fix["groups"], *args[2:]), kwargs
        return args, {**kwargs, "num_groups": fix["groups"]}
    if kind == "squeeze":
        return (args[0], tuple(fix["dims"])), {k: v for k, v in kwargs.items() if k != "dim"}
    if kind == "scalar":
        new = list(args)
        for pos, value in fix["values"].items():  # (a float in arithmetic, a number made a tensor)
            if int(pos) < len(new) and type(new[int(pos)]) in (int, float):
                new[int(pos)] = value
        return tuple(new), kwargs
    raise ValueError(f"unknown fix kind {kind!r}")
