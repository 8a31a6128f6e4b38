"""Rules for reductions and normalisations over dims (sum, mean, softmax, ...).

A reduction over dims that carry no channels keeps the channels of the other dims. A reduction *over*
channels is where removing a channel may change the result: a sum (or a norm) is unchanged when the
removed channel is exactly zero (a sink that compaction checks), while a mean, a max or a softmax over
channels changes whatever the removed values are, so those channels are blocked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimtorch.graph.graph import Sink
from slimtorch.graph.labels import union_rows, varying_dims
from slimtorch.graph.rules import nary, register_rule

if TYPE_CHECKING:
    from slimtorch.graph.context import OpContext

__all__ = ["zero_sink"]

_SUM_LIKE = {"sum", "nansum", "norm", "any", "count_nonzero", "linalg_vector_norm", "vector_norm"}
_BLOCKING = [
    "mean", "nanmean", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "median", "nanmedian",
    "mode", "all", "argmax", "argmin", "var_mean", "std_mean", "cumsum", "cumprod", "cummax", "cummin",
    "logcumsumexp",
]
_SOFTMAX = ["softmax", "log_softmax", "softmin", "_softmax", "_log_softmax"]


def zero_sink(ctx: OpContext, t: torch.Tensor, labels: torch.Tensor) -> None:
    """Record that the channels in ``labels`` are consumed where only zeros may be removed."""
    keep = varying_dims(labels)
    absmax, vmin, vmax = ctx.stats(t, keep)
    flat = labels.reshape([labels.shape[d] for d in keep])  # labels over the varying dims only
    ctx.graph.sinks.append(Sink("zero", flat, absmax, vmin, vmax))


def _dims(ctx: OpContext, rank: int) -> list[int]:
    # norm(x, p, dim) and vector_norm(x, ord, dim) take the order first
    dim = ctx.arg(2, "dim", None) if ctx.name in ("norm", "linalg_vector_norm", "vector_norm") else ctx.arg(1, "dim")
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return list(range(rank))
    if isinstance(dim, int):
        dim = [dim]
    if not all(isinstance(d, int) for d in dim):
        return list(range(rank))  # a named or odd dim argument: treat as a full reduction
    return sorted(d + rank if d < 0 else d for d in dim)


def _negative_order(ctx: OpContext) -> bool:
    """A norm of negative order (``-inf``: the smallest magnitude) is changed by a zero: it blocks, like a min."""
    if ctx.name not in ("norm", "linalg_vector_norm", "vector_norm", "normalize"):
        return False
    order = ctx.arg(1, "ord" if "vector" in ctx.name else "p", 2)
    return isinstance(order, (int, float)) and order < 0


@register_rule(*_SUM_LIKE, *_BLOCKING)
def _reduce(ctx: OpContext) -> None:
    x = ctx.args[0]
    labels = ctx.labels(x)
    outs = ctx.outputs
    if labels is None or not outs:
        ctx.set_output(None)
        return
    rank = x.dim()
    if ctx.name in ("max", "min") and len(ctx.args) > 1 and isinstance(ctx.args[1], torch.Tensor):
        nary(ctx)  # max(a, b) is elementwise
        return
    dims = _dims(ctx, rank)
    reduced = [d for d in dims if d in varying_dims(labels)]
    if reduced:
        if ctx.name in _SUM_LIKE and not _negative_order(ctx):
            zero_sink(ctx, x, labels)
        else:
            ctx.block(labels, f"{ctx.name} over channels (its result depends on how many there are)")
    kept = [d for d in range(rank) if d not in dims]
    out_labels = None
    if any(d in varying_dims(labels) for d in kept):
        rows = union_rows(ctx.uf, labels, kept) if reduced else labels.squeeze(dims) if dims else labels
        out_labels = rows.reshape([labels.shape[d] for d in kept])  # dims of the kept axes
    for out in outs:
        lab = out_labels
        if lab is not None and out.dim() == rank:  # keepdim=True: the reduced dims stay, as size 1
            shape = [labels.shape[d] if d in kept else 1 for d in range(rank)]
            lab = lab.reshape(shape)
        ctx.set_labels(out, lab if lab is not None and lab.dim() == out.dim() else None)


@register_rule(*_SOFTMAX)
def _softmax(ctx: OpContext) -> None:
    x = ctx.args[0]
    labels = ctx.labels(x)
    dim = ctx.arg(1, "dim", None)
    if labels is not None and dim is not None:
        dim = dim + x.dim() if dim < 0 else dim
        if dim in varying_dims(labels):
            ctx.block(labels, f"{ctx.name} over channels")
    ctx.set_output(labels)


@register_rule("normalize")
def _normalize(ctx: OpContext) -> None:
    x = ctx.args[0]
    labels = ctx.labels(x)
    dim = ctx.arg(2, "dim", 1)
    if labels is not None:
        dim = dim + x.dim() if dim < 0 else dim
        if dim in varying_dims(labels) and _negative_order(ctx):
            ctx.block(labels, "normalize over channels with a negative order")
        elif dim in varying_dims(labels):
            zero_sink(ctx, x, labels)  # a p-norm over channels ignores channels that are zero
    ctx.set_output(labels)
