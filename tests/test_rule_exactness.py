"""Every channel rule is exact or keeps the channels it touches: a property test per rule.

Each case puts one op between a layer that produces channels (a conv on images, a Linear on tokens) and a
Linear head that reads every position of its result. Random channel masks (a random half of the producer's
units with every parameter they touch masked, as a pruner makes them, and the producer's rows alone, as NNI
makes them) on two seeds, each with its own input shape; the compacted model must compute what the masked
model computes on *fresh* inputs, with and without the check (``verify=False`` must never give a wrong
model). An op whose result depends on the number or the positions of channels is either rewritten
(``exact``: some channels go) or keeps them (``blocked``: none goes).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from slimtorch import apply_masks_, compact_
from slimtorch.graph import build_graph

#: example input shapes, one per seed: (batch, channels, height, width) images and (batch, tokens, features) tokens
SHAPES = {"image": [(2, 3, 5, 6), (3, 3, 6, 4)], "tokens": [(2, 5, 4), (3, 7, 4)]}
#: cases whose op is built for the first shape only
FIXED_SHAPE = {"layers/layer_norm_dims"}


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


class _Probe(nn.Module):
    """producer -> op -> flatten -> Linear head (one weight per output position: a misplaced channel shows)."""

    def __init__(self, op, layout: str, x: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Conv2d(x.shape[1], 8, 3, padding=1) if layout == "image" else nn.Linear(x.shape[-1], 8)
        self.op = op if isinstance(op, nn.Module) else _Fn(op)
        with torch.no_grad():
            width = self._body(x).shape[1]
        self.head = nn.Linear(width, 3)

    def _body(self, x):
        out = self.op(self.a(x))
        return (out[0] if isinstance(out, tuple) else out).flatten(1)

    def forward(self, x):
        return self.head(self._body(x))


class _SetScalar(nn.Module):
    def forward(self, y):
        y = y.clone()
        y[:, 0] = 0.5
        return y


class _SetSlice(nn.Module):
    def forward(self, y):
        y = y.clone()
        y[:, 2:4] = y[:, 4:6] * 2
        return y


class _SetPositions(nn.Module):
    def forward(self, y):  # (B, T, C): a row of values bound to channel positions
        y = y.clone()
        y[:, 0, :] = torch.arange(y.shape[2], dtype=y.dtype)
        return y


class _Copy(nn.Module):
    def forward(self, y):
        out = torch.empty_like(y)
        out.copy_(y)
        return out


class _Heads(nn.Module):
    """Manual attention over two heads of the channels, scaled per head by a constant."""

    def forward(self, y):
        b, t, c = y.shape
        q = y.view(b, t, 2, c // 2).transpose(1, 2)  # (B, heads, T, head size)
        att = (q @ q.transpose(-1, -2) * 0.3).softmax(-1)
        out = (att @ q) * torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
        return out.transpose(1, 2).reshape(b, t, c)


class _LayerNormComputed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, y):
        return F.layer_norm(y, y.shape[-1:], self.w, self.b)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, y):
        return self.mha(y, y, y)[0]


def _arange(y, dim=1):
    shape = [1] * y.dim()
    shape[dim] = y.shape[dim]
    return torch.arange(y.shape[dim], dtype=y.dtype).view(shape)


# (rule, case) -> (op, layout, expected): "exact" (some channels go), "blocked" (none goes), "either"
CASES = {
    # rules.py: elementwise
    "unary/relu": (torch.relu, "image", "exact"),
    "unary/nan_to_num": (lambda y: torch.nan_to_num(y.exp()), "image", "exact"),
    "nary/add_self": (lambda y: y + y.flip(1), "image", "exact"),
    "nary/arange": (lambda y: y + _arange(y), "image", "blocked"),
    "nary/linspace_tokens": (lambda y: y * torch.linspace(0.5, 1, y.shape[-1]), "tokens", "blocked"),
    "nary/where_positions": (lambda y: torch.where(_arange(y) > 3, y, -y), "image", "blocked"),
    "nary/masked_fill": (lambda y: y.masked_fill(y > 0.5, 0.0), "image", "exact"),
    "nary/clamp_tensor": (lambda y: y.clamp(min=_arange(y) / 10), "image", "blocked"),
    "nary/clamp_numbers": (lambda y: y.clamp(-0.1, 0.2), "image", "exact"),
    "nary/per_head_constant": (lambda y: (y.view(*y.shape[:2], 2, 4) * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1))
                               .flatten(2), "tokens", "either"),
    "triangle/tril_channels": (torch.tril, "tokens", "blocked"),
    "triangle/tril_spatial": (lambda y: torch.tril(y.transpose(1, 2)).transpose(1, 2), "tokens", "either"),
    "copy/copy_": (_Copy(), "image", "exact"),
    "numbers/tensor_of_channel_count": (lambda y: y / torch.sqrt(torch.tensor(y.shape[1])), "image", "exact"),
    "uniform/zeros_like": (lambda y: y + torch.zeros_like(y), "image", "exact"),
    "uniform/new_ones": (lambda y: y * y.new_ones(y.shape), "image", "exact"),
    # rules.py: data movement (moves.py: what each records)
    "move/view_grid": (lambda y: y.view(y.shape[0], 2, -1, *y.shape[2:]).sum(1), "image", "exact"),
    "move/reshape_rows": (lambda y: y.reshape(y.shape[0], 2, -1) * torch.tensor([1.0, 2.0]).view(1, 2, 1), "image",
                          "either"),
    "move/flatten": (lambda y: y.flatten(2), "image", "exact"),
    "move/unflatten": (lambda y: y.unflatten(1, (2, -1)).sum(1), "image", "exact"),
    "move/unflatten_rows": (lambda y: y.unflatten(1, (-1, 4)).sum(2), "image", "either"),
    "move/squeeze_all": (lambda y: y.mean((2, 3), keepdim=True).squeeze(), "image", "exact"),
    "move/squeeze_channels": (lambda y: y.amax(-1, keepdim=True).squeeze(1), "image", "exact"),
    "move/unsqueeze": (lambda y: y.unsqueeze(2), "image", "exact"),
    "move/expand": (lambda y: y[:, :, :1].expand(-1, -1, 3, -1), "image", "exact"),
    "move/broadcast_to": (lambda y: y.mean(2, keepdim=True).broadcast_to(y.shape), "image", "exact"),
    "move/repeat": (lambda y: y.repeat(1, 2, 1, 1), "image", "exact"),
    "move/tile": (lambda y: y.tile(1, 2, 1, 1), "image", "exact"),
    "move/narrow": (lambda y: y.narrow(1, 2, 4), "image", "either"),
    "move/narrow_negative": (lambda y: y.narrow(1, -5, 4), "image", "either"),
    "move/select": (lambda y: y.select(1, 3).unsqueeze(1) + y, "image", "either"),
    "move/select_negative": (lambda y: torch.cat([y.select(1, -1), y.select(1, 2)], 1), "image", "either"),
    "move/index_int": (lambda y: torch.cat([y[:, -1], y[:, 0]], 2), "image", "either"),
    "move/index_slice": (lambda y: y[:, 1:-2], "image", "either"),
    "move/index_tensor": (lambda y: y[:, torch.tensor([0, 2, 5])], "image", "blocked"),
    "move/index_bool_mask": (lambda y: y[y > 0].sum().reshape(1, 1).expand(y.shape[0], 1), "image", "either"),
    "move/index_ellipsis": (lambda y: y[..., 1:], "tokens", "blocked"),
    "move/setitem_number": (_SetScalar(), "image", "either"),
    "move/setitem_channels": (_SetSlice(), "image", "either"),
    "move/setitem_positions": (_SetPositions(), "tokens", "blocked"),
    "move/split": (lambda y: torch.cat([p * (i + 1) for i, p in enumerate(y.split(4, 1))], 1), "image", "exact"),
    "move/split_sizes": (lambda y: torch.cat([p * (i + 1) for i, p in enumerate(y.split([3, 5], 1))], 1), "image",
                         "exact"),
    "move/tensor_split_channels": (lambda y: torch.cat([p * (i + 1) for i, p in enumerate(torch.tensor_split(y, [3],
                                                                                                            1))], 1),
                                   "image", "blocked"),
    "move/tensor_split_spatial": (lambda y: torch.cat(torch.tensor_split(y, [2], 2)[::-1], 2), "image", "exact"),
    "move/chunk": (lambda y: torch.cat([p * (i + 1) for i, p in enumerate(y.chunk(2, 1))], 1), "image", "exact"),
    "move/unbind": (lambda y: sum(p * (i + 1) for i, p in enumerate(y.unbind(1))), "image", "blocked"),
    "move/cat": (lambda y: torch.cat([y, y.flip(1)], 1), "image", "exact"),
    "move/cat_positions": (lambda y: torch.cat([y, _arange(y).expand(y.shape[0], -1, 1, y.shape[3])], 2), "image",
                           "blocked"),
    "move/cat_zeros": (lambda y: torch.cat([y, torch.zeros(y.shape[0], 2, *y.shape[2:])], 1), "image", "exact"),
    "move/stack": (lambda y: torch.stack([y, y * 2], 1), "image", "exact"),
    "move/hstack": (lambda y: torch.hstack([y, y]), "image", "exact"),
    "move/roll": (lambda y: torch.roll(y, 1, dims=1), "image", "exact"),
    "move/roll_two_dims": (lambda y: torch.roll(y, (3, 1), (1, 2)), "image", "exact"),
    "move/roll_negative": (lambda y: y.roll(-2, -1), "tokens", "exact"),
    "move/roll_cat": (lambda y: torch.cat([y, torch.roll(y, 2, 1)], 1), "image", "exact"),
    "move/roll_flat": (lambda y: torch.roll(y, 3), "image", "blocked"),
    "move/flip": (lambda y: y.flip(1), "image", "exact"),
    "move/rot90": (lambda y: torch.rot90(y, 1, (1, 2)), "image", "exact"),
    "move/pad_channels": (lambda y: F.pad(y, (0, 0, 0, 0, 1, 2)), "image", "exact"),
    "move/pad_crop": (lambda y: F.pad(y, (0, 0, 0, 0, 0, -2)), "image", "blocked"),
    "move/pad_reflect": (lambda y: F.pad(y, (2, 1), mode="reflect"), "tokens", "blocked"),
    "move/pad_circular": (lambda y: F.pad(y, (2, 1), mode="circular"), "tokens", "blocked"),
    "move/pad_spatial": (lambda y: F.pad(y, (1, 1, 1, 1), mode="replicate"), "image", "exact"),
    "move/pixel_unshuffle": (lambda y: F.pixel_unshuffle(y[:, :, :4, :4], 2), "image", "exact"),
    "move/index_select": (lambda y: y.index_select(1, torch.tensor([1, 0, 3])), "image", "blocked"),
    "move/gather": (lambda y: y.gather(1, torch.ones(y.shape[0], 2, *y.shape[2:], dtype=torch.long)), "image",
                    "blocked"),
    "move/take_along_dim": (lambda y: torch.take_along_dim(y, y.argmax(2, keepdim=True), 2), "image", "either"),
    "move/repeat_interleave": (lambda y: y.repeat_interleave(2, 1), "image", "exact"),
    "move/repeat_interleave_counts": (lambda y: y.repeat_interleave(torch.arange(8) % 3, 1), "image", "blocked"),
    "move/unfold_channels": (lambda y: y.unfold(1, 3, 2), "image", "blocked"),
    "move/unfold_spatial": (lambda y: y.unfold(2, 2, 1), "image", "exact"),
    "move/diagonal": (lambda y: torch.diagonal(y, 0, 1, 2), "image", "blocked"),
    "move/atleast_3d": (torch.atleast_3d, "image", "exact"),
    "move/view_dtype": (lambda y: (y > 0).view(torch.uint8).float() * y, "image", "exact"),
    "permute/permute": (lambda y: y.permute(0, 2, 3, 1), "image", "exact"),
    "permute/shuffle": (lambda y: y.view(y.shape[0], 2, -1, *y.shape[2:]).transpose(1, 2).reshape(y.shape), "image",
                        "either"),
    # layers.py
    "layers/conv": (nn.Conv2d(8, 6, 3), "image", "exact"),
    "layers/conv_grouped": (nn.Conv2d(8, 8, 3, groups=2), "image", "either"),
    "layers/conv_depthwise": (nn.Conv2d(8, 16, 3, groups=8), "image", "exact"),
    "layers/conv_transpose": (nn.ConvTranspose2d(8, 4, 2, stride=2), "image", "exact"),
    "layers/conv_transpose_grouped": (nn.ConvTranspose2d(8, 4, 2, groups=2), "image", "either"),
    "layers/linear": (nn.Linear(8, 5), "tokens", "exact"),
    "layers/position_embedding": (lambda y: y + nn.functional.embedding(torch.arange(y.shape[1]),
                                                                        torch.ones(10, 8)), "tokens", "blocked"),
    "layers/batch_norm": (nn.BatchNorm2d(8), "image", "exact"),
    "layers/batch_norm_functional": (lambda y: F.batch_norm(y, None, None, training=True), "image", "exact"),
    "layers/instance_norm": (nn.InstanceNorm2d(8, affine=True), "image", "exact"),
    "layers/group_norm": (nn.GroupNorm(4, 8), "image", "either"),
    "layers/group_norm_functional": (lambda y: F.group_norm(y, 2), "image", "either"),
    "layers/layer_norm": (nn.LayerNorm(8), "tokens", "exact"),
    "layers/layer_norm_functional": (_LayerNormComputed(), "tokens", "blocked"),
    "layers/layer_norm_dims": (nn.LayerNorm([8, 5, 6]), "image", "blocked"),
    "layers/rms_norm": (nn.RMSNorm(8), "tokens", "exact"),
    "layers/prelu": (nn.PReLU(8), "image", "exact"),
    "layers/max_pool": (nn.MaxPool2d(2), "image", "exact"),
    "layers/adaptive_pool": (nn.AdaptiveAvgPool2d(2), "image", "exact"),
    "layers/interpolate": (lambda y: F.interpolate(y, scale_factor=2), "image", "exact"),
    "layers/pool_over_channels": (lambda y: F.avg_pool1d(y, 2), "tokens", "blocked"),
    "layers/interpolate_channels": (lambda y: F.interpolate(y, scale_factor=2), "tokens", "blocked"),
    "layers/local_response_norm": (nn.LocalResponseNorm(3), "image", "blocked"),
    "layers/channel_shuffle": (lambda y: F.channel_shuffle(y, 2), "image", "either"),
    "layers/pixel_shuffle": (lambda y: F.pixel_shuffle(y, 2), "image", "either"),
    "layers/glu": (lambda y: F.glu(y, 1), "image", "either"),
    "layers/im2col": (lambda y: F.unfold(y, 2, padding=1), "image", "exact"),
    # reductions.py
    "reductions/sum_channels": (lambda y: y.sum(1, keepdim=True) + y, "image", "either"),
    "reductions/mean_channels": (lambda y: y.mean(1), "image", "blocked"),
    "reductions/amax_spatial": (lambda y: y.amax((2, 3)), "image", "exact"),
    "reductions/max_dim": (lambda y: y.max(2).values, "image", "exact"),
    "reductions/cumsum_channels": (lambda y: y.cumsum(1), "image", "blocked"),
    "reductions/norm_negative": (lambda y: torch.linalg.vector_norm(y, ord=-1, dim=1), "image", "blocked"),
    "reductions/softmax_channels": (lambda y: y.softmax(1), "image", "blocked"),
    "reductions/softmax_spatial": (lambda y: y.softmax(-1), "image", "exact"),
    "reductions/normalize": (lambda y: F.normalize(y, dim=1), "image", "either"),
    # selection.py
    "selection/topk_channels": (lambda y: y.topk(3, dim=1).values, "image", "blocked"),
    "selection/topk_spatial": (lambda y: y.flatten(2).topk(4, dim=2).values, "image", "exact"),
    "selection/sort_tokens": (lambda y: y.sort(dim=1).values, "tokens", "exact"),
    "selection/argsort_gather": (lambda y: y.gather(1, y.argsort(1)), "tokens", "exact"),
    "selection/kthvalue_spatial": (lambda y: y.kthvalue(2, dim=-1).values, "image", "exact"),
    "selection/nonzero_positions": (lambda y: y + y.flatten(1).gt(0).nonzero()[:, 1].float().mean(), "image",
                                    "blocked"),
    "selection/where_positions": (lambda y: y + torch.where(y.flatten(1) > 0)[1].float().mean(), "image", "blocked"),
    "selection/where_values": (lambda y: torch.where(y > 0, y, y * 0.1), "image", "exact"),
    "selection/nms_boxes": (lambda y: y * torchvision.ops.nms(y[:, :4].mean((2, 3)).abs().cumsum(1),
                                                              y[:, 4].mean((1, 2)), 0.5).numel(), "image", "either"),
    "selection/roi_align": (lambda y: torchvision.ops.roi_align(y, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])] * y.shape[0],
                                                                2), "image", "exact"),
    # products.py
    "products/matmul_self": (lambda y: y @ y.transpose(-1, -2), "tokens", "either"),
    "products/matmul_constant": (lambda y: y @ torch.eye(8), "tokens", "blocked"),
    "products/manual_attention": (_Heads(), "tokens", "either"),
    "products/einsum": (lambda y: torch.einsum("btc,bsc->bts", y, y), "tokens", "either"),
    "products/sdpa": (lambda y: F.scaled_dot_product_attention(y, y, y, scale=0.3), "tokens", "either"),
    # modules.py
    "modules/multihead_attention": (_Attention(), "tokens", "exact"),
    "modules/lstm": (nn.LSTM(8, 6, batch_first=True), "tokens", "exact"),
    "modules/gru": (nn.GRU(8, 6, batch_first=True, bidirectional=True), "tokens", "exact"),
    "modules/rnn": (nn.RNN(8, 6, num_layers=2, nonlinearity="relu", batch_first=True), "tokens", "exact"),
}


def _unit_masks(model: nn.Module, x: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A random half of the producer's units, every parameter they touch masked; one unit the head reads stays."""
    graph = build_graph(model, x)
    units = graph.unit_of(graph.member("a.weight").labels).unique()
    read = set(graph.unit_of(graph.member("head.weight", "in").labels).tolist())
    stay = [u for u in units.tolist() if u in read] or units.tolist()
    keep = stay[int(torch.randint(len(stay), (1,), generator=g))]
    pool = units[units != keep]
    removed = torch.zeros(graph.uf.size, dtype=torch.bool)
    removed[pool[torch.randperm(pool.numel(), generator=g)[: (pool.numel() + 1) // 2]]] = True
    return graph.masks(removed, dict(model.named_parameters()))


def _row_masks(model: nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The producer's rows alone, a random half of them (NNI-style: the values decide what can go)."""
    w = model.a.weight
    keep = torch.rand(w.shape[0], generator=g) < 0.5
    keep[int(torch.randint(w.shape[0], (1,), generator=g))] = True
    return {"a.weight": keep.reshape(-1, *[1] * (w.dim() - 1)).expand_as(w).clone(), "a.bias": keep.clone()}


def _compacted_equals_masked(base: nn.Module, masks: dict, x: torch.Tensor, fresh: torch.Tensor,
                             verify: bool) -> int:
    """Compact a copy of ``base``; returns how many producer channels went."""
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    apply_masks_(ref, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (channels kept are reported; the outputs are what is checked)
        compact_(model, masks, example_inputs=x, verify=verify)
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), ref(fresh), rtol=1e-4, atol=1e-5)
    return base.a.weight.shape[0] - model.a.weight.shape[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_compacted_equals_masked_on_fresh_inputs(case):
    op, layout, expected = CASES[case]
    removed = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(SHAPES[layout][0 if case in FIXED_SHAPE else seed])
        base = _Probe(copy.deepcopy(op), layout, x).eval()
        fresh = torch.randn_like(x) * 2
        for masks in (_unit_masks(base, x, g), _row_masks(base, g)):
            for verify in (True, False):
                removed.append(_compacted_equals_masked(base, masks, x, fresh, verify))
    if expected == "exact":
        assert max(removed) > 0, f"{case}: an exact rule should let channels go"
    elif expected == "blocked":
        assert max(removed) == 0, f"{case}: channels went through an op that depends on their number or place"
