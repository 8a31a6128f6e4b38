"""Granularity: how a weight tensor is cut into *units* that are scored and kept or pruned as a whole.

A :class:`UnitView` turns any tensor shaped like the weight into a ``(num_units, unit_size)`` matrix
(what criteria score) and turns a per-unit keep vector back into a weight-shaped mask::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.config import Granularity
    >>> conv = nn.Conv2d(2, 4, 3)
    >>> view = unit_view(conv, conv.weight.shape, Granularity(kind="out_channel"))
    >>> view.units(conv.weight).shape          # 4 filters of 2*3*3 weights
    torch.Size([4, 18])
    >>> view.expand(torch.tensor([True, False, True, True])).shape
    torch.Size([4, 2, 3, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.config import Granularity
from slimtorch.errors import ConfigError

__all__ = ["WEIGHT_DIMS", "UnitView", "channel_dims", "register_granularity", "unit_view"]

#: (output-channel dim, input-channel dim) of the weight of layer classes whose weight is not stored (out, in)
#: (and their subclasses): an integration adds its own (Hugging Face's ``Conv1D`` stores (in, out))
WEIGHT_DIMS: dict[type, tuple[int, int]] = {}


def channel_dims(module: nn.Module) -> tuple[int, int]:
    """(output-channel dim, input-channel dim) of ``module.weight``.

    Conv/Linear weights are (out, in, ...); transposed convs store (in, out/groups, ...); an Embedding's
    (num_embeddings, dim) has its features on dim 1.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1, 0
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return 1, 0
    for cls in type(module).__mro__:
        if cls in WEIGHT_DIMS:
            return WEIGHT_DIMS[cls]
    return 0, 1


@dataclass(frozen=True)
class UnitView:
    """Reshapes weight-shaped tensors to ``(num_units, unit_size)`` and unit masks back.

    ``to_units`` maps a weight-shaped tensor to a units matrix and ``from_units`` is its exact inverse
    (both are permutations of the elements). ``group_size`` > 0 means units are ranked in consecutive
    groups of that many (N:M), keeping ``keep_per_group`` in each.
    """

    shape: tuple[int, ...]
    granularity: Granularity
    to_units: Callable[[torch.Tensor], torch.Tensor]
    from_units: Callable[[torch.Tensor], torch.Tensor]
    num_units: int
    group_size: int = 0
    keep_per_group: int = 0

    @property
    def unit_size(self) -> int:
        return math.prod(self.shape) // self.num_units

    @property
    def structured(self) -> bool:
        return self.granularity.structured

    def units(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (weight-shaped) as a ``(num_units, unit_size)`` matrix."""
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"expected a tensor of shape {self.shape}, got {tuple(tensor.shape)}")
        return self.to_units(tensor)

    def expand(self, unit_keep: torch.Tensor) -> torch.Tensor:
        """Per-unit bool vector (True = keep) -> weight-shaped bool mask."""
        if unit_keep.shape != (self.num_units,):
            raise ValueError(f"expected {self.num_units} unit flags, got shape {tuple(unit_keep.shape)}")
        cols = unit_keep.bool()[:, None].expand(self.num_units, self.unit_size)  # (num_units, unit_size)
        return self.from_units(cols.contiguous())


ViewBuilder = Callable[[nn.Module, tuple[int, ...], Granularity], UnitView]
_BUILDERS: dict[str, ViewBuilder] = {}


def register_granularity(kind: str) -> Callable[[ViewBuilder], ViewBuilder]:
    """Register the :class:`UnitView` builder of a granularity kind (one function per kind)."""

    def deco(fn: ViewBuilder) -> ViewBuilder:
        _BUILDERS[kind] = fn
        return fn

    return deco


def unit_view(module: nn.Module, shape: torch.Size | tuple[int, ...], granularity: Granularity) -> UnitView:
    """The :class:`UnitView` of a weight of ``shape`` held by ``module`` at ``granularity``."""
    builder = _BUILDERS.get(granularity.kind)
    if builder is None:
        raise ConfigError(
            f"granularity {granularity.to_value()!r} is not available for pruning masks; "
            f"available: {sorted(_BUILDERS)}"
        )
    return builder(module, tuple(shape), granularity)


def _dim_view(shape: tuple[int, ...], dim: int, granularity: Granularity) -> UnitView:
    """Units are the slices along ``dim`` (a channel): ``movedim(dim, 0)`` then flatten the rest."""
    moved = (shape[dim], *shape[:dim], *shape[dim + 1 :])

    def to_units(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(dim, 0).reshape(shape[dim], -1)  # (channels, rest)

    def from_units(u: torch.Tensor) -> torch.Tensor:
        return u.reshape(moved).movedim(0, dim)

    return UnitView(shape, granularity, to_units, from_units, shape[dim])


@register_granularity("fine")
def _fine(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    numel = math.prod(shape)
    return UnitView(shape, g, lambda t: t.reshape(numel, 1), lambda u: u.reshape(shape), numel)


@register_granularity("out_channel")
def _out_channel(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    return _dim_view(shape, channel_dims(module)[0] if len(shape) > 1 else 0, g)


@register_granularity("in_channel")
def _in_channel(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    if len(shape) < 2:
        raise ConfigError(f"in_channel granularity needs a weight with an input dim; {type(module).__name__} "
                          f"has shape {shape}")
    return _dim_view(shape, channel_dims(module)[1], g)


@register_granularity("vector")
def _vector(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    last = shape[-1]
    numel = math.prod(shape)
    return UnitView(shape, g, lambda t: t.reshape(-1, last), lambda u: u.reshape(shape), numel // last)


@register_granularity("kernel")
def _kernel(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    if len(shape) < 3:
        raise ConfigError(
            f"kernel granularity needs a conv weight (out, in, k...); {type(module).__name__} has shape {shape}. "
            "Use 'fine', 'vector' or 'out_channel' for it, or select only convs with op_types"
        )
    kernels = shape[0] * shape[1]
    return UnitView(shape, g, lambda t: t.reshape(kernels, -1), lambda u: u.reshape(shape), kernels)


def _matrix_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(out dim, rows, cols) of the weight seen as an (out, fan-in) matrix."""
    out_dim = channel_dims(module)[0] if len(shape) > 1 else 0
    rows = shape[out_dim]
    return out_dim, rows, math.prod(shape) // rows


@register_granularity("block")
def _block(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    out_dim, rows, cols = _matrix_shape(module, shape)
    if len(g.block) != 2:
        raise ConfigError(f"block granularity takes two sizes (rows, cols) of the (out, fan-in) matrix, got {g.block}")
    bh, bw = (rows if g.block[0] == -1 else g.block[0]), (cols if g.block[1] == -1 else g.block[1])
    if rows % bh or cols % bw:
        raise ConfigError(
            f"block {g.block} does not tile the {rows}x{cols} weight of {type(module).__name__}; "
            f"choose block sizes that divide {rows} and {cols}"
        )
    moved = (shape[out_dim], *shape[:out_dim], *shape[out_dim + 1 :])

    def to_units(t: torch.Tensor) -> torch.Tensor:
        mat = t.movedim(out_dim, 0).reshape(rows // bh, bh, cols // bw, bw)  # (R, bh, C, bw)
        return mat.permute(0, 2, 1, 3).reshape(-1, bh * bw)  # (R*C, bh*bw)

    def from_units(u: torch.Tensor) -> torch.Tensor:
        mat = u.reshape(rows // bh, cols // bw, bh, bw).permute(0, 2, 1, 3)  # (R, bh, C, bw)
        return mat.reshape(moved).movedim(0, out_dim)

    return UnitView(shape, g, to_units, from_units, (rows // bh) * (cols // bw))


@register_granularity("n:m")
def _n_m(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    # Groups of M run along the input channels at each kernel position (channels-last order), which is
    # the layout 2:4 sparse kernels expect; for a Linear that is simply along each row.
    if len(shape) < 2:
        raise ConfigError(f"N:M granularity needs a 2-D or conv weight; {type(module).__name__} has shape {shape}")
    out_dim, in_dim = channel_dims(module)
    order = [out_dim, *[d for d in range(len(shape)) if d not in (out_dim, in_dim)], in_dim]
    inverse = [order.index(d) for d in range(len(shape))]
    permuted = tuple(shape[d] for d in order)
    if shape[in_dim] % g.m:
        raise ConfigError(
            f"{g.n}:{g.m} sparsity needs the input channels ({shape[in_dim]}) of {type(module).__name__} "
            f"to be a multiple of {g.m}; exclude this layer or use another granularity"
        )
    numel = math.prod(shape)

    def to_units(t: torch.Tensor) -> torch.Tensor:
        return t.permute(order).reshape(numel, 1)  # (numel, 1) in (out, k..., in) order

    def from_units(u: torch.Tensor) -> torch.Tensor:
        return u.reshape(permuted).permute(inverse)

    return UnitView(shape, g, to_units, from_units, numel, group_size=g.m, keep_per_group=g.n)


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


def _head_count(module: nn.Module, g: Granularity) -> int:
    if g.heads:
        return g.heads
    for attr in _HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ConfigError(
        f"head granularity needs the number of heads of this {type(module).__name__}, which has no "
        f"{'/'.join(_HEAD_ATTRS)} attribute; give it in the granularity, e.g. 'head(8)'"
    )


@register_granularity("head")
def _head(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    """Units are attention heads: the projection's output rows cut into ``heads`` consecutive groups.

    ``nn.MultiheadAttention`` stacks the q, k and v projections in ``in_proj_weight`` (3E, E); a head
    is then its rows in all three, so pruning it removes the head's queries, keys and values together.
    """
    heads = _head_count(module, g)
    projections = 3 if isinstance(module, nn.MultiheadAttention) else 1
    out_dim = channel_dims(module)[0] if len(shape) > 1 else 0
    rows = shape[out_dim]
    if rows % (projections * heads):
        raise ConfigError(
            f"{type(module).__name__} has {rows} output rows, which do not split into {heads} heads"
            f"{' x 3 projections' if projections == 3 else ''}; give the right count, e.g. 'head(H)'"
        )
    head_dim = rows // (projections * heads)
    moved = (rows, *shape[:out_dim], *shape[out_dim + 1 :])

    def to_units(t: torch.Tensor) -> torch.Tensor:
        grouped = t.movedim(out_dim, 0).reshape(projections, heads, head_dim, -1)  # (proj, H, head_dim, fan_in)
        return grouped.transpose(0, 1).reshape(heads, -1)  # (H, proj * head_dim * fan_in)

    def from_units(u: torch.Tensor) -> torch.Tensor:
        grouped = u.reshape(heads, projections, head_dim, -1).transpose(0, 1)  # (proj, H, head_dim, fan_in)
        return grouped.reshape(moved).movedim(0, out_dim)

    return UnitView(shape, g, to_units, from_units, heads)


@register_granularity("layer")
def _layer(module: nn.Module, shape: tuple[int, ...], g: Granularity) -> UnitView:
    raise ConfigError(
        "whole layers or blocks are not pruned with masks: rank them with "
        "slimtorch.prune.depth.plan_block_drop and remove them with drop_blocks_"
    )
