"""Layers that a compacted model may need and torch does not have.

* Zero-padded norms. A LayerNorm (or RMSNorm) over channels of which some were masked computes its
  statistics over *all* channels, the masked ones being zeros. The compacted layer must divide by the
  original count to compute the same thing; a plain LayerNorm over the kept channels would not (the
  outputs would differ by several percent). ``ZeroPaddedLayerNorm`` does that with ``full_size``, the
  number of normalised elements before compaction.
* ``SlimMultiheadAttention``: ``nn.MultiheadAttention`` requires the query width, the attention width
  (heads x head size) and the output width to be one number, and scales logits by
  ``1/sqrt(head size)``. Once channels of the residual stream or of the heads are removed these differ,
  and the scale must stay the original one.

    >>> import torch
    >>> from torch import nn
    >>> ln = nn.LayerNorm(4)
    >>> x = torch.tensor([[1.0, 2.0, 0.0, 0.0]])          # channels 2 and 3 were masked to zero
    >>> make_zero_padded_(ln, full_size=4)
    >>> ln.weight, ln.bias = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(2))
    >>> ln.normalized_shape = (2,)
    >>> torch.allclose(ln(x[:, :2]), nn.LayerNorm(4, elementwise_affine=False)(x)[:, :2])
    True
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["SlimMultiheadAttention", "ZeroPaddedLayerNorm", "make_zero_padded_", "padded_norm", "zero_padded_class"]


def padded_norm(
    x: torch.Tensor, ndim: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float | None,
    full_size: int, rms: bool = False,
) -> torch.Tensor:
    """Layer (or RMS) norm over the last ``ndim`` dims as if ``full_size - n`` more elements were zeros."""
    dims = tuple(range(-ndim, 0))
    n = math.prod(x.shape[-ndim:])
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    if rms:
        y = x * torch.rsqrt(x.square().sum(dims, keepdim=True) / full_size + eps)
    else:
        mean = x.sum(dims, keepdim=True) / full_size
        centered = x - mean
        # the missing elements are zeros: each adds mean**2 to the sum of squared deviations
        var = (centered.square().sum(dims, keepdim=True) + (full_size - n) * mean.square()) / full_size
        y = centered * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


class _PadNorms(TorchFunctionMode):
    """Inside a norm subclass's own forward, turn its layer_norm / rms_norm call into the padded one."""

    def __init__(self, full_size: int) -> None:
        super().__init__()
        self.full_size = full_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, F.rms_norm):
            rms = func is F.rms_norm
            names = ("weight", "eps") if rms else ("weight", "bias", "eps")
            defaults = (None, None) if rms else (None, None, 1e-5)
            values = dict(zip(names, defaults, strict=True))
            values.update(zip(names, args[2:], strict=False))
            values.update(kwargs)
            return padded_norm(args[0], len(args[1]), values["weight"], values.get("bias"), values["eps"],
                               self.full_size, rms)
        return func(*args, **kwargs)


class _ZeroPaddedMixin:
    """Added in front of a norm class: same parameters, statistics over ``full_size`` elements."""

    full_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _PadNorms(self.full_size):
            return super().forward(x)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_size={self.full_size}"  # type: ignore[misc]


class ZeroPaddedLayerNorm(_ZeroPaddedMixin, nn.LayerNorm):
    """``nn.LayerNorm`` whose statistics count ``full_size`` elements (the missing ones as zeros)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_norm(x, len(self.normalized_shape), self.weight, self.bias, self.eps, self.full_size)


_CLASSES: dict[type, type] = {nn.LayerNorm: ZeroPaddedLayerNorm}


def zero_padded_class(cls: type) -> type:
    """The zero-padded version of a norm class (created once, importable from this module by name)."""
    if issubclass(cls, _ZeroPaddedMixin):
        return cls
    if cls not in _CLASSES:
        name = f"ZeroPadded_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        made = type(name, (_ZeroPaddedMixin, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, made)
        _CLASSES[cls] = made
    return _CLASSES[cls]


def make_zero_padded_(norm: nn.Module, full_size: int) -> None:
    """Turn ``norm`` (in place) into its zero-padded version counting ``full_size`` normalised elements."""
    norm.__class__ = zero_padded_class(type(norm))
    norm.full_size = int(getattr(norm, "full_size", full_size))  # a second compaction keeps the first size


class SlimMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose query width, attention width (``num_heads * head_dim``) and output
    width may differ, with a fixed logit scale. Same parameter names as the original."""

    head_dim: int
    scaling: float

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        packed = query is key and key is value and self.in_proj_weight is not None  # self-attention
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, packed)  # (N, heads, L or S, head_dim)
        logits = q @ k.transpose(-2, -1) * self.scaling  # (N, heads, L, S)
        logits = logits + self._mask(attn_mask, key_padding_mask, is_causal, logits)
        attn = F.softmax(logits, dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).flatten(2)  # (N, L, heads * head_dim)
        out = self.out_proj(out)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 packed: bool = False) -> list[torch.Tensor]:
        inner = self.num_heads * self.head_dim
        if packed:  # one matrix product for q, k and v
            y = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (N, T, 3 * heads * head_dim)
            return [p.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for p in y.split(inner, dim=-1)]
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.split(inner)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        out = []
        for x, w, b in zip((query, key, value), weights, biases, strict=True):
            y = F.linear(x, w, b)  # (N, T, heads * head_dim)
            out.append(y.view(y.shape[0], y.shape[1], self.num_heads, self.head_dim).transpose(1, 2))
        return out

    def _mask(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """Additive mask broadcastable to (N, heads, L, S); True in a bool mask means "may not attend"."""
        n, heads, length, source = logits.shape
        total = torch.zeros((), dtype=logits.dtype, device=logits.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=logits.device).triu(1)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (n, 1, 1, source))):
            if mask is None:
                continue
            if mask.dtype == torch.bool:
                zeros = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device)
                mask = zeros.masked_fill(mask, float("-inf"))
            if shape is None and mask.dim() == 3:  # (N * heads, L, S)
                shape = (n, heads, length, source)
            total = total + (mask.reshape(shape) if shape is not None else mask)
        return total
