"""Rules for layers: convolutions, Linear, normalisations, embeddings, pooling and channel rearrangements.

A layer with a weight *produces* channels (fresh labels on its output dim, shared with its bias) and
*consumes* the channels of its input (its input dim is tied to them, and a sink records the input's
values there so that compaction can check a removed channel is zero or fold its constant value). A
per-channel layer (BatchNorm, PReLU, pooling) passes channels through and ties its own parameters to them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from slimtorch.graph.callsites import FixSite
from slimtorch.graph.graph import Sink
from slimtorch.graph.labels import union_rows, varying_dims
from slimtorch.graph.reductions import zero_sink
from slimtorch.graph.rules import register_rule

if TYPE_CHECKING:
    from slimtorch.graph.context import OpContext

__all__ = ["channel_labels", "consumer_sink", "placed"]


def channel_labels(ctx: OpContext, x: torch.Tensor, dim: int) -> torch.Tensor:
    """One label per index of ``x``'s ``dim`` (-1 where none), tying labels that share a channel index."""
    labels = ctx.labels(x)
    n = x.shape[dim]
    if labels is None:
        return torch.full((n,), -1, dtype=torch.long)
    if labels.numel() == labels.shape[dim]:  # already one label per channel (the common case): no ties to make
        vec = labels.reshape(-1)
        return vec.contiguous() if vec.numel() == n else vec.expand(n).contiguous()
    return union_rows(ctx.uf, labels, [dim]).expand(n).contiguous()


def placed(vec: torch.Tensor | None, rank: int, dim: int) -> torch.Tensor | None:
    """A per-channel label vector as the labels of a rank-``rank`` tensor with channels on ``dim``."""
    if vec is None or vec.numel() == 0 or vec.numpy().max() < 0:  # (no channel at all; numpy: a third of torch's time)
        return None
    shape = [1] * rank
    shape[dim] = vec.numel()
    return vec.reshape(shape)


def consumer_sink(ctx: OpContext, x: torch.Tensor, dim: int, vec: torch.Tensor, member: tuple, foldable: bool) -> None:
    if vec.numel() and vec.numpy().max() >= 0:  # (any channel at all)
        absmax, vmin, vmax = ctx.stats(x, [dim])
        ctx.graph.sinks.append(Sink("consumer", vec, absmax, vmin, vmax, member=member, foldable=foldable))


def _attach_bias(ctx: OpContext, bias: Any, labels: torch.Tensor) -> None:
    name = ctx.param_name(bias)
    if name is not None:
        ctx.graph.attach(name, 0, "out", labels)


def _computed_weight(ctx: OpContext, *tensors: Any) -> None:
    ctx.graph.unknown.append((f"{ctx.name} with a weight computed in forward", ctx.site[0],
                              [ctx.labels(t) for t in tensors]))


def _no_padding(padding: Any) -> bool:
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else [padding]))


def _conv(ctx: OpContext, transposed: bool) -> None:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    name = ctx.param_name(w)
    if name is None:
        _computed_weight(ctx, x, w)
        return
    out = ctx.outputs[0]
    ch = x.dim() - (w.dim() - 2) - 1  # channels dim: 1 when batched, 0 for an unbatched input
    # conv(x, w, b, stride, padding, dilation, groups); conv_transpose(x, w, b, stride, padding,
    # output_padding, groups, dilation): groups is argument 6 of both
    groups = ctx.arg(6, "groups", 1)
    c_in, c_out = x.shape[ch], out.shape[ch]
    vec = channel_labels(ctx, x, ch)
    if transposed:  # weight (C_in, C_out / groups, *k)
        produced = ctx.graph.fresh(name, 1, "out", c_out, groups=groups, other_dim=0)
        ctx.graph.attach(name, 0, "in", vec)
    else:  # weight (C_out, C_in / groups, *k)
        produced = ctx.graph.fresh(name, 0, "out", c_out)
        ctx.graph.attach(name, 1, "in", vec, groups=groups, other_dim=0)
    _attach_bias(ctx, bias, produced)
    if groups > 1:
        if c_in == groups:  # depthwise: input channel j alone makes output block j
            ctx.uf.adopt(produced, vec if c_out == groups else vec.repeat_interleave(c_out // groups))
        else:  # every group must keep as many channels as the others, on both sides
            ctx.graph.equal_count(vec.reshape(groups, -1))
            ctx.graph.equal_count(produced.reshape(groups, -1))
    foldable = not transposed and groups == 1 and bias is not None and _no_padding(ctx.arg(4, "padding", 0))
    consumer_sink(ctx, x, ch, vec, (name, 0 if transposed else 1, "in"), foldable)
    ctx.set_output(placed(produced, out.dim(), ch))


@register_rule(F.conv1d, F.conv2d, F.conv3d, "conv1d", "conv2d", "conv3d")
def _conv_rule(ctx: OpContext) -> None:
    _conv(ctx, transposed=False)


@register_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, "conv_transpose1d", "conv_transpose2d",
               "conv_transpose3d")
def _conv_transpose_rule(ctx: OpContext) -> None:
    _conv(ctx, transposed=True)


@register_rule(F.linear, "linear")
def _linear(ctx: OpContext) -> None:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    name = ctx.param_name(w)
    if name is None:
        _computed_weight(ctx, x, w)
        return
    vec = channel_labels(ctx, x, x.dim() - 1)
    ctx.graph.attach(name, 1, "in", vec)
    produced = ctx.graph.fresh(name, 0, "out", w.shape[0])
    _attach_bias(ctx, bias, produced)
    consumer_sink(ctx, x, x.dim() - 1, vec, (name, 1, "in"), bias is not None)
    ctx.set_output(placed(produced, ctx.outputs[0].dim(), ctx.outputs[0].dim() - 1))


@register_rule(F.embedding, F.embedding_bag, "embedding", "embedding_bag")
def _embedding(ctx: OpContext) -> None:
    w = ctx.arg(1, "weight")
    name = ctx.param_name(w)
    if name is None:
        _computed_weight(ctx, w)
        return
    produced = ctx.graph.fresh(name, 1, "out", w.shape[1])
    out = ctx.outputs[0]
    ctx.set_labels(out, placed(produced, out.dim(), out.dim() - 1))


def _per_channel(ctx: OpContext, params: list[tuple[int, str]], dim: int = 1) -> torch.Tensor | None:
    """A per-channel op: its parameters and buffers are tied to the input's channels along ``dim``."""
    x = ctx.args[0]
    if ctx.labels(x) is None:
        ctx.set_output(None)
        return None
    vec = channel_labels(ctx, x, dim)
    for index, key in params:
        name = ctx.param_name(ctx.arg(index, key))
        if name is not None:
            ctx.graph.attach(name, 0, "norm", vec, is_buffer=name in ctx.tracer.buffers)
    return vec


@register_rule(F.batch_norm, F.instance_norm, "batch_norm", "instance_norm")
def _batch_norm(ctx: OpContext) -> None:
    vec = _per_channel(ctx, [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")])
    if vec is not None:
        ctx.set_output(placed(vec, ctx.args[0].dim(), 1))


@register_rule(F.group_norm, "group_norm")
def _group_norm(ctx: OpContext) -> None:
    x, groups = ctx.args[0], ctx.arg(1, "num_groups")
    if ctx.labels(x) is not None:
        vec = channel_labels(ctx, x, 1)
        rows = vec.reshape(groups, -1)  # (groups, channels per group): statistics are per group
        ctx.uf.union(rows[:, :1].expand_as(rows), rows)  # so a group goes as a whole
    vec = _per_channel(ctx, [(2, "weight"), (3, "bias")])
    if vec is not None:
        # the number of groups changes with whole groups removed: rewritten where the call does not follow
        # (nn.GroupNorm passes its own, which its shrink function updates)
        ctx.graph.fix_sites.append(FixSite(ctx.site, "groups", vec, {"groups": groups}))
        ctx.set_output(placed(vec, x.dim(), 1))


@register_rule(F.layer_norm, F.rms_norm, "layer_norm", "rms_norm")
def _layer_norm(ctx: OpContext) -> None:
    x = ctx.args[0]
    labels = ctx.labels(x)
    if labels is None:
        ctx.set_output(None)
        return
    k = len(ctx.arg(1, "normalized_shape"))
    dims = list(range(x.dim() - k, x.dim()))
    grid = union_rows(ctx.uf, labels, dims)  # labels over the normalised dims
    grid = grid.expand(x.shape[x.dim() - k :]).contiguous()
    params = [(2, "weight"), (3, "bias")] if ctx.name != "rms_norm" else [(2, "weight")]
    for index, key in params:
        name = ctx.param_name(ctx.arg(index, key))
        if name is not None:
            if k == 1:
                ctx.graph.attach(name, 0, "norm", grid)
            else:
                ctx.graph.attach(name, None, "element", grid)
    # Statistics are taken over every normalised channel: a removed one must be zero there (a padded
    # norm then divides by the original count).
    full = grid.reshape([1] * (x.dim() - k) + list(grid.shape))
    if varying_dims(full):
        zero_sink(ctx, x, full)
        # Only a LayerNorm or RMSNorm module's own call over one dim is made zero-padded by compaction (its
        # statistics still count the removed channels); any other call would count fewer.
        module = ctx.module_type
        if k > 1 or module is None or not issubclass(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            ctx.block(full, f"{ctx.name} over channels outside a LayerNorm or RMSNorm layer of one dim (its "
                            "statistics count the channels)")
    ctx.set_output(full)


@register_rule(F.prelu, "prelu")
def _prelu(ctx: OpContext) -> None:
    x, w = ctx.args[0], ctx.arg(1, "weight")
    labels = ctx.labels(x)
    if w.numel() > 1 and labels is not None:
        _per_channel(ctx, [(1, "weight")], dim=1 if x.dim() > 1 else 0)
    ctx.set_output(labels)


_POOL_FUNCS = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
               F.adaptive_max_pool3d, F.fractional_max_pool2d, F.fractional_max_pool3d]
_SPATIAL = ["interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "max_unpool1d",
            "max_unpool2d", "max_unpool3d"]


def _spatial(ctx: OpContext) -> None:
    x = ctx.args[0]
    match = re.search(r"(\d)d", ctx.name)
    spatial = int(match.group(1)) if match else x.dim() - 2  # F.max_pool2d & co. are named "fn"
    ch = x.dim() - spatial - 1
    labels = ctx.labels(x)
    if labels is None:
        ctx.set_output(None)
        return
    if any(d != ch for d in varying_dims(labels)):  # channels along a pooled or resized dim: they would mix
        ctx.block(labels, f"{ctx.name} along a dim that carries channels")
    vec = channel_labels(ctx, x, ch)
    for out in ctx.outputs:
        ctx.set_labels(out, placed(vec, out.dim(), ch))


register_rule(*_POOL_FUNCS, *_SPATIAL)(_spatial)
register_rule(*[f"{a}{k}_pool{n}d{s}" for a in ("", "adaptive_", "_", "_adaptive_") for k in ("max", "avg", "lp")
                for n in (1, 2, 3) for s in ("", "_with_indices")])(_spatial)


@register_rule(F.local_response_norm, "local_response_norm")
def _lrn(ctx: OpContext) -> None:
    labels = ctx.labels(ctx.args[0])
    ctx.block(labels, "local response norm mixes neighbouring channels")
    ctx.set_output(labels)


@register_rule(F.channel_shuffle, "channel_shuffle", "native_channel_shuffle")
def _channel_shuffle(ctx: OpContext) -> None:
    x, groups = ctx.args[0], ctx.arg(1, "groups")
    if ctx.labels(x) is None:
        ctx.set_output(None)
        return
    rows = channel_labels(ctx, x, 1).reshape(groups, -1)  # (groups, channels per group)
    # Channel j of every group lands next to the others: keep them together so that the shuffled
    # order of a compacted tensor is the compacted shuffled order.
    columns = union_rows(ctx.uf, rows, [1])
    ctx.set_output(placed(columns.repeat_interleave(groups), x.dim(), 1))  # output j*groups + i is (i, j)


@register_rule(F.pixel_shuffle, "pixel_shuffle")
def _pixel_shuffle(ctx: OpContext) -> None:
    x, r = ctx.args[0], ctx.arg(1, "upscale_factor")
    if ctx.labels(x) is None:
        ctx.set_output(None)
        return
    ch = x.dim() - 3
    blocks = channel_labels(ctx, x, ch).reshape(-1, r * r)  # (C_out, r*r): one output channel each
    ctx.set_output(placed(union_rows(ctx.uf, blocks, [0]), x.dim(), ch))


@register_rule(F.unfold)
def _im2col(ctx: OpContext) -> None:
    """``F.unfold`` (im2col): (N, C, *spatial) -> (N, C * k, L), row c * k + j holding channel c (padding too)."""
    x, out = ctx.args[0], ctx.outputs[0]
    labels = ctx.labels(x)
    if labels is None:
        ctx.set_output(None)
        return
    ch = x.dim() - 3  # (batched (N, C, H, W) or unbatched (C, H, W))
    if any(d != ch for d in varying_dims(labels)):
        ctx.block(labels, "unfold along a dim that carries channels")
    vec = channel_labels(ctx, x, ch)
    ctx.set_output(placed(vec.repeat_interleave(out.shape[-2] // x.shape[ch]), out.dim(), out.dim() - 2))


@register_rule(F.glu, "glu")
def _glu(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = ctx.arg(1, "dim", -1) % x.dim()
    if ctx.labels(x) is None:
        ctx.set_output(None)
        return
    halves = channel_labels(ctx, x, dim).reshape(2, -1)  # (value half, gate half)
    ctx.uf.union(halves[0], halves[1])
    ctx.set_output(placed(halves[0], x.dim(), dim))
