"""Rules for ops that pick entries by their values: ranking (``topk``, ``sort``), positions of what holds
(``nonzero``, one-argument ``where``), non-maximum suppression and pooling of regions given by boxes.

What such an op picks depends on the values it reads. Along a dim that carries no channels (tokens ranked by a
score, anchors kept by a threshold), every channel is ranked or kept on its own values, and the compacted model
picks the same entries as the masked one. Over channels (a router's top experts, the best class of a detector),
or where the result is a position in a flattened tensor that holds channels, which entry is picked, or the
position it is at, depends on which channels there are: those channels are blocked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimtorch.graph.labels import varying_dims
from slimtorch.graph.layer_rules import channel_labels, placed
from slimtorch.graph.rules import nary, register_rule

if TYPE_CHECKING:
    from slimtorch.graph.context import OpContext

__all__: list[str] = []

#: op name -> (position of its ``dim`` argument, None: it has none; the default dim)
_RANKING = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "msort": (None, 0), "kthvalue": (2, -1)}


@register_rule(*_RANKING)
def _rank(ctx: OpContext) -> None:
    """Over channels: blocked; along another dim, values and indices keep the input's channels (each channel is
    ranked on its own values)."""
    x = ctx.args[0]
    labels = ctx.labels(x)
    index, default = _RANKING[ctx.name]
    dim = default if index is None else ctx.arg(index, "dim", default)
    if labels is None or not isinstance(dim, int):
        ctx.block(labels, f"{ctx.name} over a dim given by name")
        ctx.set_output(None)
        return
    dim = dim + x.dim() if dim < 0 else dim
    if dim in varying_dims(labels):
        ctx.block(labels, f"{ctx.name} over channels (which entries it picks depends on every channel)")
        ctx.set_output(None)
        return
    for out in ctx.outputs:  # (the labels do not vary along ``dim``: size 1 there, whatever k)
        ctx.set_labels(out, labels if out.dim() == labels.dim() else labels.squeeze(dim))


def _positions(ctx: OpContext) -> None:
    """Indices of the entries that hold: positions in the full tensor, which move when channels go."""
    labels = ctx.labels(ctx.args[0])
    if varying_dims(labels):
        ctx.block(labels, f"{ctx.name} of a tensor that carries channels (its results are positions among them)")
    ctx.set_output(None)


register_rule("nonzero", "argwhere", "nonzero_static")(_positions)


@register_rule("where")
def _where(ctx: OpContext) -> None:
    """``where(condition)`` is ``nonzero(condition, as_tuple=True)``; with three arguments it is elementwise."""
    if len(ctx.args) + len(ctx.kwargs) == 1:
        _positions(ctx)
    else:
        nary(ctx)


@register_rule("nms", "batched_nms", "box_iou", "generalized_box_iou", "masks_to_boxes")
def _boxes(ctx: OpContext) -> None:
    """Box operations (torchvision): which boxes survive, or how much two overlap, depends on every coordinate
    and score; the boxes' channels (a regression head's outputs) are blocked, the result carries none."""
    for t in ctx.args:
        ctx.block(ctx.labels(t), f"{ctx.name} reads them as box coordinates or scores")
    ctx.set_output(None)


@register_rule("roi_align", "roi_pool")
def _regions(ctx: OpContext) -> None:
    """``roi_align(features, rois, ...)``: (boxes, C, h, w), each channel pooled on its own over each box; the
    boxes' coordinates are values that pick positions (blocked)."""
    x, rois = ctx.args[0], ctx.args[1]
    ctx.block(ctx.labels(rois), f"{ctx.name} reads them as box coordinates")
    labels = ctx.labels(x)
    if labels is None:
        ctx.set_output(None)
        return
    if any(d != 1 for d in varying_dims(labels)):
        ctx.block(labels, f"{ctx.name} over a tensor with channels along its spatial dims")
    out = ctx.outputs[0]
    ctx.set_labels(out, placed(channel_labels(ctx, x, 1), out.dim(), 1))


@register_rule("ps_roi_align", "ps_roi_pool")
def _position_sensitive(ctx: OpContext) -> None:
    """Position-sensitive pooling reads channel group k at bin k: channels are bound to their positions."""
    for t in ctx.args[:2]:
        ctx.block(ctx.labels(t), f"{ctx.name} binds channels to output bins")
    ctx.set_output(None)
