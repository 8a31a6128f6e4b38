"""The shapes-only (meta) trace: floating-point tensors on the ``meta`` device, output shapes computed here.

See :mod:`slimtorch.graph.tracer`: the channel structure does not depend on values, so it is first traced with
every floating-point parameter, buffer and input on the ``meta`` device. What needs a value raises
``slimtorch.graph.context.NeedsValues`` there, and the model is traced for real instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from slimtorch.graph.context import NeedsValues
from slimtorch.graph.rules import op_name

__all__ = ["check_meta", "shape_of", "to_meta"]


# Ops whose output shape the shapes-only trace computes itself. On meta tensors torch computes it through
# Python reference implementations (about 1 ms a call for batch_norm, hardtanh or linear: more than the
# real op on a small input). The checks torch would make are repeated; whatever they do not cover (other
# argument forms, dtypes) returns None and runs torch's own meta kernel, which raises as the real op would.
_ACTIVATIONS = {
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "mish", "dropout",
}
_SHAPED = _ACTIVATIONS | {"batch_norm", "layer_norm", "linear", "conv1d", "conv2d", "conv3d"}


def _per_dim(value: Any, default: int, k: int) -> list[int] | None:
    """A conv's stride, padding or dilation as one int per spatial dim; None for other forms ("same")."""
    value = default if value is None else value
    if isinstance(value, int):
        return [value] * k
    if isinstance(value, (tuple, list)) and len(value) == k and all(isinstance(i, int) for i in value):
        return list(value)
    return None


def _conv_shape(x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The output shape of conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups) for numeric
    arguments that torch would accept; None for anything else (torch's own kernel then decides)."""
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype:
        return None
    k = weight.dim() - 2
    groups = _arg(args, kwargs, 6, "groups")
    groups = 1 if groups is None else groups
    if x.dim() != k + 2 or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups \
            or x.shape[1] != weight.shape[1] * groups or (bias is not None and bias.shape != weight.shape[:1]):
        return None
    stride = _per_dim(_arg(args, kwargs, 3, "stride"), 1, k)
    padding = _per_dim(_arg(args, kwargs, 4, "padding"), 0, k)
    dilation = _per_dim(_arg(args, kwargs, 5, "dilation"), 1, k)
    if stride is None or padding is None or dilation is None:
        return None  # e.g. padding="same": let torch work it out
    spatial = [(n + 2 * p - d * (w - 1) - 1) // s + 1
               for n, p, d, w, s in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride, strict=True)]
    if min(spatial) < 1 or min(stride) < 1:
        return None
    return (x.shape[0], weight.shape[0], *spatial)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


_BINARY = {"add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
           "__truediv__", "__rtruediv__"}
_BINARY_INPLACE = {"add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def _same_layout_operand(x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """The other operand of ``x + other`` is a Python number or a meta tensor of x's dtype, shape and
    strides (a residual sum), and nothing else is asked (``alpha`` aside): the result is laid out as x."""
    other = _arg(args, kwargs, 1, "other")
    extra = set(kwargs) - {"other", "alpha"}
    if len(args) > 2 or extra or not isinstance(_arg(args, kwargs, 2, "alpha") or 1, (int, float)):
        return False
    if type(other) in (int, float):
        return True
    return isinstance(other, torch.Tensor) and other.is_meta and other.dtype == x.dtype \
        and other.shape == x.shape and other.stride() == x.stride()


def _attention_shape(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The outputs of ``F.multi_head_attention_forward`` for batched self- or cross-attention with one packed
    input projection and no masks or extra biases (what ``nn.MultiheadAttention`` runs, e.g. in torchvision's
    ViT); None for anything else. On meta tensors torch runs its dozen inner ops through Python reference
    code, about 4 ms a call."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
    if len(args) > len(names) + 1:
        return None  # (training is the 14th; the rest come as keywords from nn.MultiheadAttention)
    q, k, v, heads, w, b = a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"]
    tensors = (q, k, v, w, a["out_proj_weight"])
    if not all(isinstance(t, torch.Tensor) and t.is_meta and t.dtype == q.dtype for t in tensors) or q.dim() != 3 \
            or k.shape != v.shape or k.dim() != 3 or k.shape[1] != q.shape[1]:
        return None
    plain = {"key_padding_mask": None, "attn_mask": None, "use_separate_proj_weight": False, "q_proj_weight": None,
             "k_proj_weight": None, "v_proj_weight": None, "static_k": None, "static_v": None, "is_causal": False}
    if any(kwargs.get(n, default) is not default for n, default in plain.items()) \
            or set(kwargs) - set(names) - set(plain) - {"training", "need_weights", "average_attn_weights"}:
        return None
    length, batch, embed = q.shape
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or embed != a["embed_dim_to_check"] \
            or k.shape[2] != embed or not isinstance(heads, int) or heads < 1 or embed % heads \
            or w.shape != (3 * embed, embed) or (b is not None and b.shape != (3 * embed,)) \
            or a["out_proj_weight"].shape != (embed, embed) \
            or (a["out_proj_bias"] is not None and a["out_proj_bias"].shape != (embed,)):
        return None
    out = torch.empty((length, batch, embed), dtype=q.dtype, device="meta")
    if not kwargs.get("need_weights", True):
        return out, None
    source = k.shape[0]
    shape = (batch, length, source) if kwargs.get("average_attn_weights", True) else (batch, heads, length, source)
    return out, torch.empty(shape, dtype=q.dtype, device="meta")


def shape_of(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_meta or not x.is_floating_point():
        return None
    name = op_name(func)
    if name.endswith("_") and name[:-1] in _ACTIVATIONS:
        return x  # in place
    if name in _BINARY_INPLACE and _same_layout_operand(x, args, kwargs):
        return x
    if name in _BINARY and _same_layout_operand(x, args, kwargs):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if name == "multi_head_attention_forward":
        return _attention_shape(args, kwargs)
    if name not in _SHAPED or any(isinstance(t, torch.Tensor) and not t.is_meta for t in (*args, *kwargs.values())):
        return None
    if name == "batch_norm":
        stats = _arg(args, kwargs, 1, "running_mean")
        if _arg(args, kwargs, 5, "training") or not isinstance(stats, torch.Tensor) or x.dim() < 2 \
                or stats.shape != (x.shape[1],):
            return None
    elif name == "layer_norm":
        shape, weight = tuple(_arg(args, kwargs, 1, "normalized_shape")), _arg(args, kwargs, 2, "weight")
        if tuple(x.shape[x.dim() - len(shape):]) != shape or (weight is not None and tuple(weight.shape) != shape):
            return None
    elif name in ("conv1d", "conv2d", "conv3d"):
        shape = _conv_shape(x, args, kwargs)
        return None if shape is None else torch.empty(shape, dtype=x.dtype, device="meta")
    elif name == "linear":
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != x.dtype or x.dim() < 1 \
                or weight.shape[1] != x.shape[-1] or (bias is not None and bias.shape != weight.shape[:1]):
            return None
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")
    # empty_like on meta goes through Python reference code (~40 us); empty_strided is ~2 us
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def check_meta(values: list[Any], op: str) -> None:
    """A meta tensor that is not floating point (a mask or index computed from data) has no values a
    rule could read: indexing a real tensor with it would give garbage, so trace for real instead.
    (Not called for elementwise ops, whose rules read labels and shapes only: a computed mask in
    ``masked_fill`` or ``where`` is harmless there.)"""
    for t in values:
        if isinstance(t, torch.Tensor) and t.is_meta and not (t.is_floating_point() or t.is_complex()):
            raise NeedsValues(f"{op!r} takes a {t.dtype} tensor computed from data")


def to_meta(tree: Any, memo: dict[int, torch.Tensor]) -> Any:
    """Floating-point tensors of ``tree`` as meta tensors (one per distinct tensor: tied weights stay tied)."""

    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            return t
        if id(t) not in memo:  # (not empty_like: ~20x slower on meta, and this runs for every parameter)
            memo[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return memo[id(t)]

    return tree_map(convert, tree)
