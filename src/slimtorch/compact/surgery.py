"""Surgery: small per-layer functions that keep some channels of a layer, in place.

Each ``shrink_*_`` function takes the layer and the indices to keep (``None``: keep all), replaces the
parameters and buffers by their slices (new tensors; dtype, device and ``requires_grad`` kept) and
updates the attributes that describe sizes. They are registered by layer type for
:func:`~slimtorch.compact_`, which calls them with what the plan computed::

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 3)
    >>> shrink_linear_(layer, keep_in=torch.tensor([0, 2]), keep_out=torch.tensor([1]))
    >>> layer
    Linear(in_features=2, out_features=1, bias=True)

A registered shrink function has the signature ``fn(module, keeps, options)``: ``keeps`` maps
``"<attr>:<role>"`` keys (``"weight:in"``, ``"weight:out"``, ``"running_mean:norm"``...) or
``"<attr>:dim<d>"`` keys (a plain slice along dim d) to sorted index tensors, ``options`` holds what the
plan recorded (e.g. ``full_size`` for a norm). Register one with ``@register_shrink("kind", MyLayer)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from slimtorch.compact.layers import SlimMultiheadAttention, make_zero_padded_
from slimtorch.errors import CompactionError
from slimtorch.graph.live import Cut, take_block

__all__ = [
    "SHRINKS",
    "register_shrink",
    "shrink_batchnorm_",
    "shrink_conv_",
    "shrink_embedding_",
    "shrink_groupnorm_",
    "shrink_kind",
    "shrink_layernorm_",
    "shrink_linear_",
    "shrink_multihead_attention_",
    "shrink_prelu_",
    "shrink_recurrent_",
    "shrink_tensors_",
]

Keeps = dict[str, torch.Tensor]
ShrinkFn = Callable[[nn.Module, Keeps, dict[str, Any]], None]
SHRINKS: dict[str, ShrinkFn] = {}
_KIND_BY_TYPE: dict[type, str] = {}
#: kinds whose function also handles the parameters of the module's children (e.g. out_proj of MHA)
CLAIMS_CHILDREN: set[str] = set()


def register_shrink(kind: str, *types: type, claims_children: bool = False) -> Callable[[ShrinkFn], ShrinkFn]:
    """Register the shrink function of ``kind`` for ``types`` (and their subclasses)."""

    def deco(fn: ShrinkFn) -> ShrinkFn:
        SHRINKS[kind] = fn
        for t in types:
            _KIND_BY_TYPE[t] = kind
        if claims_children:
            CLAIMS_CHILDREN.add(kind)
        return fn

    return deco


def shrink_kind(module: nn.Module) -> str:
    """The registered kind of ``module`` (by its class or a base class), ``"tensors"`` if none."""
    for cls in type(module).__mro__:
        if cls in _KIND_BY_TYPE:
            return _KIND_BY_TYPE[cls]
    return "tensors"


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    # a registered parameter or buffer is replaced in its dict: setattr would register it again, with
    # checks that cost more than the slicing
    value = value.detach().contiguous()
    if attr in module._parameters and module._parameters[attr] is not None:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    elif isinstance(old := getattr(module, attr), nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)


def _take(module: nn.Module, attr: str, dim: int, keep: torch.Tensor | None) -> None:
    value = getattr(module, attr, None)
    if keep is not None and isinstance(value, torch.Tensor):
        _set(module, attr, value.index_select(dim, keep.to(value.device)))


# Blocks that a measured run of the masked model already cut (see slimtorch.graph.live), by the address
# of their weight's memory: taken instead of cut again while ``reusing`` is active.
_REUSABLE: ContextVar[Mapping[int, Cut] | None] = ContextVar("reusable_cuts", default=None)


@contextmanager
def reusing(cuts: Mapping[int, Cut]) -> Iterator[None]:
    """Within the block, the shrink functions take a weight's rows and columns from ``cuts`` when one of
    them is that very block of that very weight (same memory, unchanged since), instead of cutting it."""
    token = _REUSABLE.set(cuts)
    try:
        yield
    finally:
        _REUSABLE.reset(token)


def _cut2d(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``weight[rows][:, cols]`` (None: all)."""
    cuts = _REUSABLE.get()
    if cuts and (cut := cuts.get(weight.data_ptr())) is not None and cut.matches(weight, rows, cols):
        return cut.block
    return take_block(weight, rows, cols)


def shrink_linear_(layer: nn.Linear, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> None:
    """Keep input features ``keep_in`` and output features ``keep_out`` of a Linear layer.

    >>> layer = nn.Linear(3, 2)
    >>> shrink_linear_(layer, None, torch.tensor([0]))
    >>> tuple(layer.weight.shape), tuple(layer.bias.shape)
    ((1, 3), (1,))
    """
    if keep_in is not None or keep_out is not None:
        _set(layer, "weight", _cut2d(layer.weight.detach(), keep_out, keep_in))
    _take(layer, "bias", 0, keep_out)
    layer.out_features, layer.in_features = layer.weight.shape


def _group_locals(keep: torch.Tensor, size: int, groups: int) -> list[torch.Tensor]:
    per = size // groups
    return [keep[(keep // per) == j] - j * per for j in range(groups)]


def _grouped_weight(weight: torch.Tensor, keep_rows: torch.Tensor, locals_: list[torch.Tensor]) -> torch.Tensor:
    """Rows (dim 0) of a grouped weight, then per group its own local columns (dim 1)."""
    groups = len(locals_)
    per_rows = weight.shape[0] // groups
    parts = []
    for j, cols in enumerate(locals_):
        rows = keep_rows[(keep_rows // per_rows) == j]
        parts.append(weight.index_select(0, rows).index_select(1, cols.to(weight.device)))
    return torch.cat(parts)


def shrink_conv_(conv: nn.modules.conv._ConvNd, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> None:
    """Keep input channels ``keep_in`` and output channels ``keep_out`` of a (grouped, depthwise or
    transposed) convolution. Every group must keep the same number of channels on each side; a
    depthwise conv (one input channel per group) loses whole groups.

    >>> conv = nn.Conv2d(4, 4, 3, groups=4)                          # depthwise
    >>> shrink_conv_(conv, torch.tensor([1, 3]), torch.tensor([1, 3]))
    >>> conv
    Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), groups=2)
    """
    transposed = conv.transposed
    c_in, c_out, groups = conv.in_channels, conv.out_channels, conv.groups
    keep_in = torch.arange(c_in) if keep_in is None else keep_in
    keep_out = torch.arange(c_out) if keep_out is None else keep_out
    # A weight is (rows, cols / groups, *k): rows are output channels, or input channels when transposed.
    rows, cols, n_rows, n_cols = (keep_in, keep_out, c_in, c_out) if transposed else (keep_out, keep_in, c_out, c_in)
    weight = conv.weight.detach()
    if groups == 1:
        new, new_groups = _cut2d(weight, rows, cols), 1
    elif c_in == groups:  # depthwise: input channel j alone makes output block j, whole groups go
        kept_groups = torch.unique(keep_in)
        if not torch.equal(kept_groups, torch.unique(keep_out // (c_out // groups))):
            raise CompactionError(f"depthwise {conv}: kept input channels and output groups differ")
        new, new_groups = _cut2d(weight, rows, None), kept_groups.numel()
    else:
        locals_ = _group_locals(cols, n_cols, groups)
        row_counts = {int(((rows // (n_rows // groups)) == j).sum()) for j in range(groups)}
        col_counts = {len(c) for c in locals_}
        if len(row_counts) != 1 or len(col_counts) != 1 or 0 in row_counts | col_counts:
            raise CompactionError(f"{conv}: every group must keep the same number of channels on each side")
        new, new_groups = _grouped_weight(weight, rows.to(weight.device), locals_), groups
    _set(conv, "weight", new)
    _take(conv, "bias", 0, keep_out)
    conv.in_channels, conv.out_channels, conv.groups = len(keep_in), len(keep_out), new_groups


def shrink_batchnorm_(norm: nn.modules.batchnorm._NormBase, keep: torch.Tensor | None) -> None:
    """Keep channels ``keep`` of a BatchNorm or InstanceNorm (affine parameters and running statistics).

    >>> bn = nn.BatchNorm2d(3)
    >>> shrink_batchnorm_(bn, torch.tensor([0, 2]))
    >>> bn.num_features, tuple(bn.running_mean.shape)
    (2, (2,))
    """
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _take(norm, attr, 0, keep)
    if keep is not None:
        norm.num_features = len(keep)


def shrink_layernorm_(norm: nn.Module, keep: torch.Tensor | None, full_size: int | None = None) -> None:
    """Keep channels ``keep`` of the last normalised dim of a LayerNorm or RMSNorm. When channels are
    removed, the layer becomes zero-padded: its statistics still count ``full_size`` elements, as the
    masked model's did.

    >>> ln = nn.LayerNorm(4)
    >>> shrink_layernorm_(ln, torch.tensor([0, 1]), full_size=4)
    >>> type(ln).__name__, ln.normalized_shape, ln.full_size
    ('ZeroPaddedLayerNorm', (2,), 4)
    """
    if keep is None:
        return
    shape = tuple(norm.normalized_shape)
    full = full_size if full_size is not None else int(torch.tensor(shape).prod())
    _take(norm, "weight", len(shape) - 1 if norm.weight is not None and norm.weight.dim() > 1 else 0, keep)
    _take(norm, "bias", 0, keep)
    norm.normalized_shape = (*shape[:-1], len(keep))
    if len(keep) < shape[-1] or hasattr(norm, "full_size"):
        make_zero_padded_(norm, full)


def shrink_groupnorm_(norm: nn.GroupNorm, keep: torch.Tensor | None) -> None:
    """Keep channels ``keep`` of a GroupNorm; they must form whole groups (statistics are per group).

    >>> gn = nn.GroupNorm(2, 4)
    >>> shrink_groupnorm_(gn, torch.tensor([2, 3]))
    >>> gn.num_groups, gn.num_channels, tuple(gn.weight.shape)
    (1, 2, (2,))
    """
    if keep is None:
        return
    per = norm.num_channels // norm.num_groups
    if len(keep) % per:
        raise CompactionError(f"{norm}: keeping {len(keep)} channels breaks its groups of {per}")
    _take(norm, "weight", 0, keep)
    _take(norm, "bias", 0, keep)
    norm.num_channels, norm.num_groups = len(keep), len(keep) // per


def shrink_embedding_(embedding: nn.Embedding, keep: torch.Tensor | None) -> None:
    """Keep features ``keep`` (columns) of an Embedding or EmbeddingBag.

    >>> emb = nn.Embedding(10, 4)
    >>> shrink_embedding_(emb, torch.tensor([0, 3]))
    >>> emb
    Embedding(10, 2)
    """
    _take(embedding, "weight", 1, keep)
    embedding.embedding_dim = embedding.weight.shape[1]


def shrink_prelu_(prelu: nn.PReLU, keep: torch.Tensor | None) -> None:
    """Keep channels ``keep`` of a per-channel PReLU.

    >>> act = nn.PReLU(3)
    >>> shrink_prelu_(act, torch.tensor([2]))
    >>> act.num_parameters
    1
    """
    _take(prelu, "weight", 0, keep)
    prelu.num_parameters = prelu.weight.numel()


def shrink_tensors_(module: nn.Module, keeps: dict[str, dict[int, torch.Tensor]]) -> None:
    """Slice a module's own parameters or buffers: ``{attr: {dim: indices}}``.

    >>> m = nn.Module(); m.scale = nn.Parameter(torch.ones(1, 4))
    >>> shrink_tensors_(m, {"scale": {1: torch.tensor([0, 1])}})
    >>> tuple(m.scale.shape)
    (1, 2)
    """
    for attr, dims in keeps.items():
        for dim, keep in dims.items():
            _take(module, attr, dim, keep)


def shrink_multihead_attention_(
    mha: nn.MultiheadAttention, keep_in: torch.Tensor | None, keep_inner: torch.Tensor | None,
    keep_out: torch.Tensor | None,
) -> None:
    """Keep input channels ``keep_in`` (query = key = value width when packed), attention channels
    ``keep_inner`` (indices into the 3 * inner rows of q, k and v; every head keeps the same number) and
    output channels ``keep_out``. The layer becomes a :class:`SlimMultiheadAttention`, logits keep their
    original scale.

    >>> mha = nn.MultiheadAttention(4, 2)
    >>> shrink_multihead_attention_(mha, torch.tensor([0, 1, 2]), None, torch.tensor([0, 1]))
    >>> mha.embed_dim, mha.out_proj.out_features, mha.head_dim
    (3, 2, 2)
    """
    heads = mha.num_heads
    inner = (mha.in_proj_weight.shape[0] if mha.in_proj_weight is not None else mha.q_proj_weight.shape[0] * 3) // 3
    scaling = getattr(mha, "scaling", (inner // heads) ** -0.5)
    keep_inner = torch.arange(3 * inner) if keep_inner is None else keep_inner
    per_head = len(keep_inner) // (3 * heads)
    if len(keep_inner) % (3 * heads):
        raise CompactionError(f"{mha}: every head of q, k and v must keep the same size")
    if mha.in_proj_weight is not None:
        _set(mha, "in_proj_weight", _cut2d(mha.in_proj_weight.detach(), keep_inner, keep_in))
    else:
        for i, attr in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            part = keep_inner[(keep_inner >= i * inner) & (keep_inner < (i + 1) * inner)] - i * inner
            _take(mha, attr, 0, part)
        _take(mha, "q_proj_weight", 1, keep_in)
    _take(mha, "in_proj_bias", 0, keep_inner)
    v_rows = keep_inner[keep_inner >= 2 * inner] - 2 * inner
    shrink_linear_(mha.out_proj, v_rows, keep_out)
    mha.__class__ = SlimMultiheadAttention
    mha.head_dim, mha.scaling = per_head, float(scaling)
    width = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
    mha.embed_dim = width.shape[1]
    if mha.in_proj_weight is not None:
        mha.kdim = mha.vdim = mha.embed_dim


def shrink_recurrent_(rnn: nn.RNNBase, keep_in: torch.Tensor | None, keep_hidden: list[torch.Tensor] | None) -> None:
    """Keep input features ``keep_in`` and, per layer and direction (forward first), the hidden units
    ``keep_hidden[i]`` of an LSTM, GRU or RNN; every entry must keep the same number (``hidden_size``).

    >>> lstm = nn.LSTM(3, 4)
    >>> shrink_recurrent_(lstm, torch.tensor([0, 2]), [torch.tensor([1, 3])])
    >>> lstm
    LSTM(2, 2)
    """
    dirs = 2 if rnn.bidirectional else 1
    hidden = rnn.hidden_size
    gates = rnn.weight_ih_l0.shape[0] // hidden
    keeps = keep_hidden or [torch.arange(hidden)] * (rnn.num_layers * dirs)
    if len({len(k) for k in keeps}) != 1:
        raise CompactionError(f"{rnn}: every layer and direction must keep the same number of hidden units")
    previous = keep_in
    for layer in range(rnn.num_layers):
        outputs = []
        for d in range(dirs):
            tag = f"_l{layer}{'_reverse' if d else ''}"
            own = keeps[layer * dirs + d]
            rows = torch.cat([g * hidden + own for g in range(gates)])  # the same units in every gate block
            for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                _take(rnn, f"{attr}{tag}", 0, rows)
            _take(rnn, f"weight_ih{tag}", 1, previous)
            _take(rnn, f"weight_hh{tag}", 1, own)
            outputs.append(own + d * hidden)
        previous = torch.cat(outputs)
    rnn.input_size, rnn.hidden_size = rnn.weight_ih_l0.shape[1], len(keeps[0])
    if hasattr(rnn, "_init_flat_weights"):
        rnn._init_flat_weights()


# -- the registry: adapters from the plan's keeps to the functions above ----------------------------------


def _get(keeps: Keeps, attr: str, role: str) -> torch.Tensor | None:
    for key, value in keeps.items():
        a, r, _ = key.split(":")
        if a == attr and r == role:
            return value
    return None


def _first(keeps: Keeps, *candidates: tuple[str, str]) -> torch.Tensor | None:
    for attr, role in candidates:
        if (found := _get(keeps, attr, role)) is not None:
            return found
    return None


@register_shrink("linear", nn.Linear)
def _linear(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_linear_(m, _get(keeps, "weight", "in"), _first(keeps, ("weight", "out"), ("bias", "out")))


@register_shrink("conv", nn.modules.conv._ConvNd)
def _conv(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_conv_(m, _get(keeps, "weight", "in"), _first(keeps, ("weight", "out"), ("bias", "out")))


_NORM = (("weight", "norm"), ("bias", "norm"), ("running_mean", "norm"), ("running_var", "norm"))


@register_shrink("batchnorm", nn.modules.batchnorm._NormBase)
def _batchnorm(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_batchnorm_(m, _first(keeps, *_NORM))


@register_shrink("layernorm", nn.LayerNorm, nn.RMSNorm)
def _layernorm(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_layernorm_(m, _first(keeps, *_NORM), options.get("full_size"))


@register_shrink("groupnorm", nn.GroupNorm)
def _groupnorm(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_groupnorm_(m, _first(keeps, *_NORM))


@register_shrink("embedding", nn.Embedding, nn.EmbeddingBag)
def _embedding(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_embedding_(m, _get(keeps, "weight", "out"))


@register_shrink("prelu", nn.PReLU)
def _prelu(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    shrink_prelu_(m, _get(keeps, "weight", "norm"))


@register_shrink("mha", nn.MultiheadAttention, claims_children=True)
def _mha(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    keep_in = _first(keeps, ("in_proj_weight", "in"), ("q_proj_weight", "in"))
    inner = _first(keeps, ("in_proj_weight", "out"), ("in_proj_bias", "out"))
    if inner is None and m.in_proj_weight is None:
        size = m.q_proj_weight.shape[0]
        parts = [_get(keeps, f"{x}_proj_weight", "out") for x in "qkv"]
        if any(p is not None for p in parts):
            inner = torch.cat([(p if p is not None else torch.arange(size)) + i * size for i, p in enumerate(parts)])
    keep_out = _first(keeps, ("out_proj.weight", "out"), ("out_proj.bias", "out"))
    shrink_multihead_attention_(m, keep_in, inner, keep_out)


@register_shrink("recurrent", nn.RNNBase)
def _recurrent(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    dirs = 2 if m.bidirectional else 1
    tags = [f"_l{k}{'_reverse' if d else ''}" for k in range(m.num_layers) for d in range(dirs)]
    hidden = [_get(keeps, f"weight_hh{t}", "in") for t in tags]
    full = torch.arange(m.hidden_size)
    keep_hidden = None if all(h is None for h in hidden) else [h if h is not None else full for h in hidden]
    shrink_recurrent_(m, _get(keeps, "weight_ih_l0", "in"), keep_hidden)


@register_shrink("tensors")
def _tensors(m: nn.Module, keeps: Keeps, options: dict[str, Any]) -> None:
    by_attr: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in keeps.items():
        attr, _, dim = key.split(":")
        by_attr.setdefault(attr, {})[int(dim)] = value
    shrink_tensors_(m, by_attr)
