"""Linear layers and convolutions of a masked model, computed on their live block.

Running a masked model (compaction's measured pass, :mod:`slimtorch.graph.replay`, or the forward pass
that its check compares with, :class:`BlockMode`) computes at full size, although a structured mask zeros
whole output rows and input columns of most weights. Such an op is computed here on the block that is
left: the live input columns of the input times the live block of the weight, scattered into a full-size
output whose masked rows hold their bias (a grouped convolution runs the groups that have a live row).
The values are the masked op's: a masked row gives its bias, a masked column adds exact zeros (for
finite inputs: an infinite or NaN input there, which the masked op would spread, is dropped, as the
compacted layer drops it), and only the summation order of the live terms may differ, as between any two
matrix-multiply kernels. The cost is the compacted layer's arithmetic: on a CNN or ViT pruned by half,
about a quarter of the full layer's. The full-size output keeps everything downstream (the other ops, the
measurements) as it was. A weight whose mask keeps exactly its live block may even run unmasked: its
block is the masked one's, and any op that reads it whole is given its masked values (``unmasked``).

Torch has no structured-sparse kernel that takes this layout on CPU (its semi-structured sparsity is 2:4
and CUDA-only), hence this.

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(64, 8)
    >>> mask = torch.ones(8, 64, dtype=torch.bool)
    >>> mask[1], mask[:, ::2] = False, False  # the second output row and every other input column
    >>> weight = layer.weight.detach() * mask
    >>> blocks = BlockOps(live_blocks({"weight": mask}), {id(weight): "weight"})
    >>> x = torch.randn(2, 64)
    >>> torch.allclose(blocks.run(torch._C._nn.linear, (x, weight, layer.bias), {}), x @ weight.T + layer.bias)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Block", "BlockMode", "BlockOps", "Cut", "LiveBlocks", "live_blocks", "masked", "take_block"]

#: (live output rows, live input columns) of a weight; None where all are live
Block = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass
class Cut:
    """A weight's live block as a run of the masked model cut it: ``source[rows][:, cols]`` (``version``: the source's
    version counter then, so that a later in-place change shows)."""

    source: torch.Tensor
    version: int
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    block: torch.Tensor

    def matches(self, weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> bool:
        """Is ``weight[rows][:, cols]`` (None: all) this block? ``weight`` may be another tensor on the same memory."""
        src = self.source
        return (weight.data_ptr() == src.data_ptr() and weight.shape == src.shape and weight.stride() == src.stride()
                and weight.dtype == src.dtype and weight.device == src.device and weight._version == self.version
                and _same(rows, self.rows, src.shape[0]) and _same(cols, self.cols, src.shape[1]))


def _same(a: torch.Tensor | None, b: torch.Tensor | None, size: int) -> bool:
    if a is None or b is None:
        other = b if a is None else a
        return other is None or (other.numel() == size and bool((other.cpu() == torch.arange(size)).all()))
    return a.shape == b.shape and bool((a.cpu() == b.cpu()).all())


class LiveBlocks(dict):
    """Live blocks by parameter name (:func:`live_blocks`). ``alive``: for every mask of 2 dims or more, which
    rows and which columns hold a kept entry (numpy bools); ``exact``: the names of those masks that keep every
    entry of their live rows and columns (a structured mask: rows times columns), so that on its live block
    the masked weight is the weight itself; ``cuts``: the blocks a run of the masked model cut, by the
    address of their weight's memory, for whoever cuts the same blocks next (compaction's surgery)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.alive: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.exact: set[str] = set()
        self.cuts: dict[int, Cut] = {}


_LINEAR = torch._C._nn.linear
_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}  # conv -> number of spatial dims
# functions that read a tensor's metadata, never its values (an unmasked tensor needs no masked values for them)
_METADATA = frozenset([*(getattr(torch.Tensor, a).__get__ for a in (
    "shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "is_cuda", "is_meta", "is_sparse")),
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.is_floating_point,
    torch.Tensor.is_complex, torch.Tensor.is_contiguous, torch.Tensor.element_size])


def masked(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros where ``keep`` (bool, or 0/1 of any dtype) is False, whatever ``t`` holds there. A product
    by the mask as bytes (on CPU about five times faster than a select), unless the result holds a NaN or an
    infinity (its sum is then not finite), which a product by zero would keep in masked positions: then a
    select, so that masking zeroes and never spreads a NaN."""
    out = t * (keep.view(torch.uint8) if keep.dtype == torch.bool else keep)
    if out.is_floating_point() and not bool(out.sum().isfinite()):
        out = torch.where(keep.bool(), t, torch.zeros((), dtype=t.dtype, device=t.device))
    return out


def take_block(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``weight[rows][:, cols]`` (None: all of them), a new tensor unless nothing is cut."""
    weight = weight if rows is None else weight.index_select(0, rows.to(weight.device))
    return weight if cols is None else weight.index_select(1, cols.to(weight.device))


def live_blocks(masks: Mapping[str, torch.Tensor]) -> LiveBlocks:
    """The live block of every weight (2 dims or more) whose mask zeros whole rows (dim 0) or columns (dim 1)."""
    blocks = LiveBlocks()
    for name, mask in masks.items():
        if mask.dim() < 2 or mask.numel() == 0:
            continue
        rows, cols, kept = _alive(mask)
        blocks.alive[name] = rows, cols
        # (every kept entry lies in a live row and a live column: as many as the block holds means all of them)
        if kept == int(rows.sum()) * int(cols.sum()) * (mask.numel() // (mask.shape[0] * mask.shape[1])):
            blocks.exact.add(name)
        if rows.all() and cols.all():
            continue
        blocks[name] = (None if rows.all() else torch.from_numpy(np.flatnonzero(rows)),
                        None if cols.all() else torch.from_numpy(np.flatnonzero(cols)))
    return blocks


def _alive(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Which rows (dim 0) and which columns (dim 1) of ``mask`` hold a kept entry, and how many entries it
    keeps. A large kernel's entries are folded first by torch (as bytes: its reduction over a short last dim
    is several times numpy's speed), the rest in numpy (a tenth of torch's fixed cost per call, which
    dominates on small masks)."""
    keep = mask.detach().reshape(mask.shape[0], mask.shape[1], -1)
    if keep.shape[2] > 1 and keep.numel() >= 1 << 16:
        kept = int(torch.count_nonzero(keep))
        plane = (keep.view(torch.uint8) if keep.dtype == torch.bool else (keep != 0).view(torch.uint8)).amax(dim=2)
        plane = plane.cpu().numpy()
    else:
        plane = keep.cpu().numpy()
        kept = int(np.count_nonzero(plane))
        plane = plane.any(axis=2) if plane.shape[2] > 1 else plane[:, :, 0]
    return plane.any(axis=1), plane.any(axis=0), kept


#: the multiply-adds a cut must save per element it copies (see _pays)
MACS_PER_COPY = 4


def _pays(weight: torch.Tensor, block: Block, groups: int) -> bool:
    """Does computing this layer on its block save more than the copies it adds? Per output position, the
    block saves ``full - block`` multiply-adds and copies the live input channels (gathered) and the
    output channels (the full-size output filled, the live rows written into it). A matrix-multiply
    kernel does tens of multiply-adds in the time of one indexed copy; a depthwise convolution (a handful
    of multiply-adds per output) never gains. (On MobileNetV2 at batch 1, most of whose layers are
    depthwise or small, cutting every layer makes the measured pass slower: see ``benchmarks/stages.py
    --measured --cut-every-layer``.)"""
    rows, cols = block
    out, per_in = weight.shape[0], weight.shape[1]
    if groups > 1 and per_in == 1:  # depthwise: cut groups are whole, nothing to gain per output
        return False
    kernel = math.prod(weight.shape[2:])
    live_out = out if rows is None else rows.numel()
    live_in = per_in if cols is None else cols.numel()
    saved = (out * per_in - live_out * live_in) * kernel
    copied = (0 if cols is None else live_in * groups) + (0 if rows is None else out + live_out)
    return saved >= MACS_PER_COPY * copied


@dataclass
class _Prepared:
    """How one (weight, bias, groups) runs on its block: ``func(x[:, inputs], block, bias, ..., groups)``,
    scattered to ``rows`` of the full output (None: no cut on that side)."""

    block: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor | None
    inputs: torch.Tensor | None
    groups: int


class BlockOps:
    """Computes linear and convolution ops whose weight has a live block on that block (a grouped
    convolution on its groups with a live row: whole groups go, none is cut inside).

    ``blocks``: by parameter name (:func:`live_blocks`); ``names``: tensor id -> parameter name, for the
    tensors the model runs with (whose values must be zero outside their block: masked ones).

    ``unmasked``: parameter name -> mask (0/1: bool, or the faster multiplier ``slimtorch.masks.mask_factor``
    makes) for tensors the model runs with as they are, although masked: masks that keep exactly their live
    block (:attr:`LiveBlocks.exact`), whose block is then the masked weight's. Every other read of such a
    tensor, by any op (:meth:`call`), gets its masked values, made on first use: a masked copy of a large
    weight costs a pass over memory that a run which cuts the weight never needs."""

    def __init__(self, blocks: Mapping[str, Block], names: Mapping[int, str],
                 unmasked: Mapping[str, torch.Tensor] | None = None) -> None:
        self.blocks, self.names = blocks, names
        self.cuts: dict[int, Cut] | None = blocks.cuts if isinstance(blocks, LiveBlocks) else None
        self._prepared: dict[tuple[int, int, int], _Prepared | None] = {}  # (weight, bias) ids, groups -> how
        # tensor id -> its mask, for the unmasked tensors; ``made``: their masked values made so far, by the same id
        self.unmasked = {i: unmasked[n] for i, n in names.items() if n in unmasked} if unmasked else {}
        self.made: dict[int, torch.Tensor] = {}
        if self.unmasked:
            self.names = dict(names)  # (masked values made here are named too, for the linear calls of composites)

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """The op's output: on its live block where :meth:`run` computes it, else the op itself, given the
        masked values of every unmasked tensor it reads."""
        out = self.run(func, args, kwargs)
        if out is None:
            if self.unmasked and func not in _METADATA:
                args, kwargs = self._resolve(args), self._resolve(kwargs)
            out = func(*args, **kwargs)
        return out

    def _resolve(self, value: Any) -> Any:
        """``value`` (an op's argument, walked through tuples, lists and dicts) with every unmasked tensor
        replaced by its masked values."""
        kind = type(value)
        if kind is tuple or kind is list:
            return kind(self._resolve(v) for v in value)
        if kind is dict:
            return {k: self._resolve(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and id(value) in self.unmasked:
            return self._masked_values(value)
        return value

    def _masked_values(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.made:
            values = self.made[id(t)] = masked(t.detach(), self.unmasked[id(t)].to(t.device))
            self.names[id(values)] = self.names[id(t)]
        return self.made[id(t)]

    def run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """The op's output computed on the live block, or None when this op is not one to do so."""
        if func is _LINEAR:
            spatial = 0
        elif func in _CONVS:
            spatial = _CONVS[func]
        elif func is F.multi_head_attention_forward:
            return self._composite(func, args, kwargs)
        else:
            return None
        if kwargs or len(args) < 2 or (block := self.blocks.get(self.names.get(id(args[1]), ""))) is None:
            return None
        x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
        groups = args[6] if spatial and len(args) > 6 else 1
        dim = 1 if spatial else -1
        if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and (not spatial or x.dim() == spatial + 2)
                and weight.dim() == spatial + 2 and type(groups) is int and groups >= 1
                and weight.shape[0] % groups == 0 and x.shape[dim] == weight.shape[1] * groups
                and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1]))):
            return None  # (the full op raises what it should)
        key = (id(weight), id(bias), groups)
        if key not in self._prepared:
            self._prepared[key] = self._prepare(weight, bias, block, groups)
        how = self._prepared[key]
        if how is None:
            return None
        if self.unmasked and id(x) in self.unmasked:  # (the weight's cut block is exact; an input is read whole)
            x = self._masked_values(x)
        rest = (*args[3:6], how.groups) if spatial else args[3:]
        part = func(x if how.inputs is None else x.index_select(dim, how.inputs), how.block, how.bias, *rest)
        if how.rows is None:
            return part
        shape = list(part.shape)
        shape[dim] = weight.shape[0]
        if bias is None:
            full = part.new_zeros(shape)
        else:
            view = [1] * len(shape)
            view[dim] = -1
            full = bias.reshape(view).expand(shape).contiguous()
        return full.index_copy_(dim % len(shape), how.rows, part)

    def _composite(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run a composite op (``nn.MultiheadAttention``'s function) with its projections on their live
        blocks. Torch dispatches a composite to a function mode as one call and runs its body with the
        modes off, so its ``linear`` calls cannot be caught there; the body looks ``linear`` up in
        ``torch.nn.functional`` at call time, and that name is swapped for the call's duration. (The
        replacement gives the same values for every call, from any thread: other weights go to torch's.)"""
        real = F.linear
        if self.unmasked:  # (the body's reads of them cannot be caught)
            args, kwargs = self._resolve(args), self._resolve(kwargs)

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            out = self.run(_LINEAR, (x, weight, bias), {})
            return real(x, weight, bias) if out is None else out

        F.linear = linear
        try:
            return func(*args, **kwargs)
        finally:
            F.linear = real

    def _prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, block: Block, groups: int) -> _Prepared | None:
        if not _pays(weight, block, groups):
            return None
        rows, cols = (None if t is None else t.to(weight.device) for t in block)
        if groups > 1:  # whole groups: those with a live row, every row and input channel of each
            if rows is None:
                return None
            per_out, per_in = weight.shape[0] // groups, weight.shape[1]
            live = torch.unique(rows // per_out)
            if live.numel() == groups:
                return None
            rows = (live[:, None] * per_out + torch.arange(per_out, device=weight.device)).reshape(-1)
            inputs = (live[:, None] * per_in + torch.arange(per_in, device=weight.device)).reshape(-1)
            cols, groups = None, live.numel()
            if id(weight) in self.unmasked:  # (whole groups hold masked entries: cut the masked values)
                weight = self._masked_values(weight)
        else:
            inputs = cols
        if (rows is not None and rows.numel() == 0) or (cols is not None and cols.numel() == 0):
            return None  # (a fully masked layer: its output shape is the full op's business)
        cut = take_block(weight, rows, cols)
        if self.cuts is not None:
            self.cuts[weight.data_ptr()] = Cut(weight, weight._version, rows, cols, cut)
        return _Prepared(cut, bias if bias is None or rows is None else bias.index_select(0, rows.to(bias.device)),
                         rows, inputs, groups)


class BlockMode(TorchFunctionMode):
    """Within it, every op :class:`BlockOps` takes runs on its live block, and every other op as usual: a plain
    forward pass of a masked model at about the compacted model's arithmetic (what compaction's check of
    the result runs as its reference when no value needs measuring)."""

    def __init__(self, ops: BlockOps) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return self.ops.call(func, args, kwargs or {})
