"""What data-movement ops record besides moving labels: fix sites, blocks and equal counts.

The data-movement rule (:func:`slimtorch.graph.rules._move`) runs each op on label tensors, which moves every
channel where the op moves its values. That alone is exact only when the op treats every channel alike
whatever their number (a flip, a concatenation, a reshape whose sizes are rewritten). Every argument that
names a *position* or a *count* along a channel dim must either be rewritten for the compacted model (a
fix site: ``narrow``'s start, ``roll``'s shift, a split's sizes) or keep the channels it touches (a block):

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.graph import build_graph
    >>> class Rolled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         return self.b(torch.roll(self.a(x), 3, dims=1))  # channel c moves to (c + 3) % 8
    >>> graph = build_graph(Rolled(), torch.randn(1, 3, 4, 4))
    >>> [(site.kind, site.data["shifts"]) for site in graph.fix_sites]  # the shift, recounted once compacted
    [('roll', [3])]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slimtorch.graph.callsites import SHAPE_OPS, FixSite, shape_args
from slimtorch.graph.labels import collapse, union_rows, varying_dims
from slimtorch.graph.rules import after_move, bind_positions

if TYPE_CHECKING:
    from slimtorch.graph.context import OpContext

__all__: list[str] = []


def _dim_arg(ctx: OpContext, index: int, default: int = 0) -> int:
    dim = ctx.arg(index, "dim", default)
    rank = ctx.args[0].dim()
    return dim + rank if dim < 0 else dim


def _row(labels: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    """The labels at ``index`` along ``dim`` (a dim along which they vary)."""
    return labels.narrow(dim, index, 1)


@after_move("split", "split_with_sizes")
def _after_split(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    dim = _dim_arg(ctx, 2)
    if dim not in varying_dims(source):
        return
    size = ctx.arg(1, "split_size_or_sections", ctx.kwargs.get("split_size", ctx.kwargs.get("sizes")))
    total = ctx.args[0].shape[dim]
    as_list = not isinstance(size, int)
    sizes = list(size) if as_list else [min(size, total - i) for i in range(0, total, size)]
    row_labels = union_rows(ctx.uf, source, [dim])
    if not as_list:
        if total % size:
            ctx.block(row_labels, "split into unequal parts along channels")
            return
        ctx.graph.equal_count(row_labels.reshape(-1, size))
    ctx.graph.fix_sites.append(FixSite(ctx.site, "split", source, {"dim": dim, "sizes": sizes, "as_list": as_list}))


@after_move("tensor_split")
def _after_tensor_split(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """Split at positions (or into sections whose sizes depend on the count): along channels, blocked."""
    if _dim_arg(ctx, 2) in varying_dims(source):
        ctx.block(source, "tensor_split along channels (it splits at positions of the full tensor)")


@after_move("chunk")
def _after_chunk(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    dim = _dim_arg(ctx, 2)
    if dim not in varying_dims(source):
        return
    row_labels = union_rows(ctx.uf, source, [dim])
    parts = ctx.arg(1, "chunks")
    if row_labels.numel() % parts:
        ctx.block(row_labels, "chunk into unequal parts along channels")
    else:
        ctx.graph.equal_count(row_labels.reshape(parts, -1))


@after_move("unbind")
def _after_unbind(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    vary = varying_dims(source)
    if vary == [dim]:
        ctx.block(source, "unbind along channels (each channel becomes its own tensor)")
    elif dim in vary:  # one tensor per row: none may vanish, or the others would take its place
        ctx.graph.equal_count(source.movedim(dim, 0).reshape(source.shape[dim], -1))


@after_move(*SHAPE_OPS)
def _after_shape(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    out = labels[0] if labels else None
    if out is None or not varying_dims(out):
        return
    found = shape_args(ctx.name, ctx.args)
    if found is None:  # (sizes given by keyword: nothing to rewrite them with)
        ctx.block(out, f"{ctx.name} to sizes given by keyword over channels")
        return
    data: dict[str, Any] = {"sizes": found[0]}
    if ctx.name == "unflatten":  # the sizes replace one dim: output dims from that one on
        data["offset"] = _dim_arg(ctx, 1)
    ctx.graph.fix_sites.append(FixSite(ctx.site, "shape", out, data))


@after_move("squeeze", "squeeze_")
def _after_squeeze(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """``squeeze()`` drops every dim of size 1: a channel dim that kept one channel would go too. The call is
    rewritten to drop exactly the dims it dropped when traced."""
    vary = varying_dims(source)
    if not vary:
        return
    x, rank = ctx.args[0], ctx.args[0].dim()
    asked = ctx.arg(1, "dim", None)
    asked = list(range(rank)) if asked is None else [asked] if isinstance(asked, int) else list(asked)
    asked = [d + rank if d < 0 else d for d in asked]
    if not any(d in vary for d in asked):
        return
    dropped = [d for d in asked if x.shape[d] == 1]
    ctx.graph.fix_sites.append(FixSite(ctx.site, "squeeze", None, {"dims": dropped}))


@after_move("narrow")
def _after_narrow(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    if dim not in varying_dims(source):
        return
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    if not isinstance(start, int):  # (a tensor start: a position computed at run time)
        ctx.block(source, "narrow over channels from a computed start")
        return
    start += ctx.args[0].shape[dim] if start < 0 else 0
    ctx.graph.fix_sites.append(FixSite(ctx.site, "narrow", source, {"dim": dim, "start": start, "length": length}))


@after_move("select")
def _after_select(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    if dim not in varying_dims(source):
        return
    index = ctx.arg(2, "index")
    index += ctx.args[0].shape[dim] if index < 0 else 0
    # the channel picked by its position must stay there: the compacted call would pick the next one
    ctx.block(_row(source, dim, index), "one channel picked by its position")
    ctx.graph.fix_sites.append(FixSite(ctx.site, "select", source, {"dim": dim, "index": index}))


def _items(index: Any, rank: int) -> tuple[list[Any], bool]:
    """The items of an index, each with the dims it consumes; whether positions still match the call's tuple."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not any(it is Ellipsis for it in items):
        return items, True
    at = items.index(Ellipsis)
    consumed = sum(_width(it) for it in items if it is not Ellipsis)
    return items[:at] + [slice(None)] * (rank - consumed) + items[at + 1 :], False


def _width(item: Any) -> int:
    """How many dims of the indexed tensor an index item consumes (a bool mask: as many as it has)."""
    if item is None:
        return 0
    if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8):
        return max(item.dim(), 1)
    return 1


@after_move("__getitem__", "__setitem__")
def _after_index(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    vary = varying_dims(source)
    if not vary:
        return
    items, exact_positions = _items(ctx.args[1], ctx.args[0].dim())
    dim, fixes = 0, []
    for pos, item in enumerate(items):
        covered = range(dim, dim + _width(item))
        dim += len(covered)
        if not any(d in vary for d in covered):
            continue
        d = covered[0]
        if isinstance(item, (torch.Tensor, list, bool)):
            ctx.block(source, "indexing channels with a tensor or list")
            return
        if isinstance(item, slice) and item.step not in (None, 1):
            ctx.block(source, "slicing channels with a step")
            return
        if not exact_positions and not (isinstance(item, slice) and item == slice(None)):
            ctx.block(source, "indexing channels after an ellipsis")
            return
        if isinstance(item, int):
            size = ctx.args[0].shape[d]
            ctx.block(_row(source, d, item + size if item < 0 else item), "one channel picked by its position")
            fixes.append({"pos": pos, "dim": d, "int": item})
        elif item != slice(None):
            fixes.append({"pos": pos, "dim": d, "slice": [item.start, item.stop]})
    if fixes:
        ctx.graph.fix_sites.append(FixSite(ctx.site, "index", source, {"items": fixes}))
    if ctx.name == "__setitem__" and isinstance(value := ctx.args[2], torch.Tensor):
        _written(ctx, source, value)


def _written(ctx: OpContext, source: torch.Tensor, value: torch.Tensor) -> None:
    """``x[index] = value``: the compacted call writes the kept part of ``value`` over the kept part of the
    region, so both must keep the same positions: the channels written over are tied to those written (or,
    for a value that carries none, bound to their positions)."""
    region = collapse(ctx.uf, source.expand(ctx.args[0].shape)[ctx.args[1]])  # the labels written over
    if region is None:
        return
    written = ctx.labels(value)
    if written is None:
        bind_positions(ctx, region, [value.shape])
        return
    try:
        left, right = torch.broadcast_tensors(region, written)  # (as the write broadcasts the value)
    except RuntimeError:  # (a value of another layout, e.g. with extra leading dims of size 1)
        ctx.block(region, "a write over channels of a value laid out otherwise")
        ctx.block(written, "a write over channels of a value laid out otherwise")
        return
    ctx.uf.union(left.contiguous(), right.contiguous())


@after_move("roll")
def _after_roll(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """A roll along channels moves channel c to (c + shift) % C: it depends on C. The compacted roll keeps the
    kept channels' cyclic order if its shift is the number of kept channels among the last ``shift`` ones
    (recounted by the fix site); a roll of the flattened tensor (no dims) keeps its channels."""
    vary = varying_dims(source)
    if not vary:
        return
    shifts, dims = ctx.arg(1, "shifts"), ctx.arg(2, "dims", None)
    packed = isinstance(shifts, (tuple, list))
    shifts = list(shifts) if packed else [shifts]
    dims = [] if dims is None or dims == () else list(dims) if isinstance(dims, (tuple, list)) else [dims]
    rank = ctx.args[0].dim()
    dims = [d + rank if d < 0 else d for d in dims]
    if not dims or len(set(dims)) < len(dims) or not all(isinstance(s, int) for s in shifts):
        ctx.block(source, "roll of channels by a shift that compaction cannot recount")
        return
    if any(d in vary for d in dims):
        sizes = [ctx.args[0].shape[d] for d in dims]
        data = {"dims": dims, "shifts": shifts, "sizes": sizes, "packed": packed}
        ctx.graph.fix_sites.append(FixSite(ctx.site, "roll", source, data))


@after_move("pad")
def _after_pad(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """Constant padding along channels adds positions that hold no channel (exact); cropping (a negative pad)
    or reflecting, replicating or wrapping channels depends on which channels are at the ends."""
    vary = varying_dims(source)
    if not vary:
        return
    pads, mode = ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant")
    rank = ctx.args[0].dim()
    touched = {rank - 1 - i // 2: p for i, p in enumerate(pads) if p}
    if any(d in vary and (p < 0 or mode != "constant") for d, p in touched.items()):
        ctx.block(source, f"{mode} padding or cropping along channels")


@after_move("index_select", "gather", "take_along_dim")
def _after_gather(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """Indices along channels name positions of the full tensor (and, computed at run time, may name any)."""
    vary = varying_dims(source)
    if not vary:
        return
    along = ctx.name == "take_along_dim"  # take_along_dim(x, indices, dim=None); the others (x, dim, index)
    dim = ctx.arg(2, "dim", None) if along else ctx.arg(1, "dim")
    if dim is None:
        ctx.block(source, f"{ctx.name} of the flattened channels")
        return
    rank = ctx.args[0].dim()
    dim = dim + rank if dim < 0 else dim
    index = ctx.arg(1, "indices") if along else ctx.arg(2, "index")
    smaller = ctx.name != "index_select" and isinstance(index, torch.Tensor) and index.dim() == rank and any(
        index.shape[d] < ctx.args[0].shape[d] for d in vary)  # (the first positions only, along a channel dim)
    if dim in vary or smaller:
        ctx.block(source, f"{ctx.name} over channels (indices name positions of the full tensor)")


@after_move("repeat_interleave")
def _after_repeat_interleave(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """Repeating every channel the same number of times is exact; per-channel counts (a tensor) or a total
    output size name the full channel count."""
    vary = varying_dims(source)
    dim = ctx.arg(2, "dim", None)
    if not vary or dim is None:
        return
    rank = ctx.args[0].dim()
    if (dim + rank if dim < 0 else dim) in vary:
        repeats = ctx.arg(1, "repeats")
        if (isinstance(repeats, torch.Tensor) and repeats.numel() > 1) or ctx.arg(3, "output_size") is not None:
            ctx.block(source, "repeat_interleave over channels with per-channel counts or a total size")


@after_move("unfold")
def _after_unfold(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    """``Tensor.unfold(dim, size, step)``: windows of ``size`` channels, every ``step``: which channels share a
    window depends on where they are."""
    dim = ctx.arg(1, "dimension")
    if (dim + ctx.args[0].dim() if dim < 0 else dim) in varying_dims(source):
        ctx.block(source, "sliding windows over channels")


@after_move("diagonal")
def _after_diagonal(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    rank = ctx.args[0].dim()
    dims = [ctx.arg(2, "dim1", 0), ctx.arg(3, "dim2", 1)]
    if any((d + rank if d < 0 else d) in varying_dims(source) for d in dims):
        ctx.block(source, "a diagonal across channels (it pairs channel i with position i)")


@after_move("cat", "concat", "concatenate")
def _after_cat(ctx: OpContext, source: torch.Tensor | None, labels: list) -> None:
    out = labels[0] if labels else None
    tensors = ctx.arg(0, "tensors")
    if out is None or not isinstance(tensors, (tuple, list)):
        return
    unlabeled = [t.shape for t in tensors if isinstance(t, torch.Tensor) and ctx.labels(t) is None and t.dim()]
    if unlabeled:
        dim = ctx.arg(1, "dim", 0)
        bind_positions(ctx, out, unlabeled, skip=dim + out.dim() if dim < 0 else dim)
