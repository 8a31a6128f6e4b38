"""Weights stored in 4 or 1 bits and expanded to float on every call.

The storage is real (a 4-bit layer's buffers are 1/8 the size of its float weight, a 1-bit layer's
1/32 plus one scale per output channel), the arithmetic is not: each forward unpacks the weight and
runs the float kernel, so these layers are *slower* than float. They are simulated on purpose: on
an AVX2 CPU torch's own int4 kernel (``_weight_int4pack_mm_for_cpu``) ran ~75x slower than fp32 and
torchao's int4 layout needs a GPU library (measured in ``benchmarks/quantize.py``); CPU deployment of
real int4 goes through ONNX Runtime (``quantize_onnx(..., QuantConfig(method="int4_weight"))``).

    >>> import torch
    >>> w = torch.randn(4, 64)
    >>> packed = pack_int4(w, group_size=32)
    >>> packed["qweight"].shape, packed["qweight"].dtype       # two 4-bit values per byte
    (torch.Size([4, 32]), torch.uint8)
    >>> float((unpack_int4(packed, group_size=32) - w).abs().max()) < float(w.abs().max()) / 7
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError

__all__ = [
    "FakeLowBitConv2d",
    "FakeLowBitLinear",
    "LowBitConv2d",
    "LowBitLinear",
    "fake_quantize",
    "pack_binary",
    "pack_int4",
    "unpack_binary",
    "unpack_int4",
]

_INT4_MAX = 7  # symmetric int4: q in [-8, 7], scale = max|w| / 7 so the largest weight is exact


def pack_int4(weight: torch.Tensor, *, group_size: int) -> dict[str, torch.Tensor]:
    """Symmetric 4-bit quantization of a 2-D weight, one scale per ``group_size`` inputs of each row."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ConfigError(f"rows of {in_f} weights (fan-in) are not a multiple of group_size={group_size}")
    groups = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, g)
    scale = groups.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / _INT4_MAX  # (out, groups)
    q = torch.round(groups / scale[..., None]).clamp(-8, _INT4_MAX).to(torch.int16) + 8  # 0..15
    q = q.reshape(out_f, in_f // 2, 2).to(torch.uint8)  # neighbours share a byte: (out, in/2, 2)
    return {"qweight": q[..., 0] | (q[..., 1] << 4), "scale": scale}


def unpack_int4(packed: dict[str, torch.Tensor], *, group_size: int) -> torch.Tensor:
    """The float weight that :func:`pack_int4` stored, shape (out, in)."""
    qweight, scale = packed["qweight"], packed["scale"]
    # Float arithmetic (exact for 0..255) rather than shifts: ONNX has no shift for signed types and the
    # exporter does not keep uint8 through one, so this form also exports.
    byte = qweight.float()
    high = torch.floor(byte / 16)
    q = torch.stack((byte - 16 * high, high), dim=-1)  # (out, in/2, 2): low nibble first
    out_f = q.shape[0]
    q = q.reshape(out_f, -1, group_size) - 8  # (out, groups, g)
    return (q * scale[..., None]).reshape(out_f, -1)


_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)  # bit i of a byte holds element 8k + i


def pack_binary(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """1 bit per weight (its sign) and one scale per output channel (mean magnitude, as XNOR-Net)."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)  # (out, fan_in)
    alpha = rows.abs().mean(dim=1)
    pad = (-rows.shape[1]) % 8
    bits = F.pad(rows >= 0, (0, pad)).reshape(rows.shape[0], -1, 8).to(torch.uint8)  # (out, bytes, 8)
    return {"bits": (bits * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8), "alpha": alpha}


def unpack_binary(packed: dict[str, torch.Tensor], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float weight (+-alpha per output channel) that :func:`pack_binary` stored, shape ``shape``."""
    bits, alpha = packed["bits"], packed["alpha"]
    signs = (bits[..., None] & _BIT_WEIGHTS).ne(0).reshape(bits.shape[0], -1)  # (out, bytes * 8)
    fan_in = int(torch.Size(shape)[1:].numel())
    weight = torch.where(signs[:, :fan_in], 1.0, -1.0) * alpha[:, None]  # drop the padding bits
    return weight.reshape(shape)


class _LowBitWeight(nn.Module):
    """Holds a packed weight as buffers and rebuilds the float weight on each call."""

    def __init__(self, layer: nn.Module, codec: str, group_size: int) -> None:
        super().__init__()
        if codec not in ("int4", "binary"):
            raise ConfigError(f"codec must be 'int4' or 'binary', got {codec!r}")
        self.codec, self.group_size, self.weight_shape = codec, group_size, tuple(layer.weight.shape)
        weight = layer.weight.detach()
        # int4 groups run along a row of the (out, fan_in) matrix: a conv filter is flattened first.
        packed = pack_int4(weight.reshape(weight.shape[0], -1), group_size=group_size) if codec == "int4" \
            else pack_binary(weight)
        for key, tensor in packed.items():
            self.register_buffer(key, tensor)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        if self.codec == "int4":
            packed = {"qweight": self.qweight, "scale": self.scale}
            return unpack_int4(packed, group_size=self.group_size).reshape(self.weight_shape)
        return unpack_binary({"bits": self.bits, "alpha": self.alpha}, self.weight_shape)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, codec={self.codec}, group_size={self.group_size}"


class LowBitLinear(_LowBitWeight):
    """A Linear whose weight is stored in 4 or 1 bits (``codec``: ``"int4"`` or ``"binary"``).

    >>> import torch
    >>> layer = LowBitLinear(torch.nn.Linear(64, 8), codec="int4", group_size=32)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 8])
    """

    def __init__(self, layer: nn.Linear, *, codec: str, group_size: int = 32) -> None:
        super().__init__(layer, codec, group_size)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class LowBitConv2d(_LowBitWeight):
    """A Conv2d (zero padding) whose weight is stored in 4 bits (groups along each flattened filter) or
    1 bit per value plus a per-filter scale.

    >>> import torch
    >>> layer = LowBitConv2d(torch.nn.Conv2d(3, 4, 3, padding=1), codec="binary")
    >>> layer(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(self, layer: nn.Conv2d, *, codec: str, group_size: int = 32) -> None:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ConfigError(
                f"low-bit Conv2d needs numeric zero padding, got padding={layer.padding!r}, "
                f"padding_mode={layer.padding_mode!r}; exclude this layer with exclude_op_names"
            )
        super().__init__(layer, codec, group_size)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def fake_quantize(weight: torch.Tensor, *, codec: str, group_size: int = 32) -> torch.Tensor:
    """``weight`` as it would be stored in ``codec`` (``"int4"`` or ``"binary"``), with a straight-through
    gradient: the forward value is the low-bit one, the gradient reaches the float weight unchanged.

    >>> import torch
    >>> w = torch.randn(2, 8, requires_grad=True)
    >>> fake_quantize(w, codec="binary").sum().backward()
    >>> bool((w.grad == 1).all())       # straight through
    True
    """
    if codec == "int4":
        rows = weight.reshape(weight.shape[0], -1)  # (out, fan_in): groups run along a row
        low = unpack_int4(pack_int4(rows, group_size=group_size), group_size=group_size).reshape(weight.shape)
    elif codec == "binary":
        low = unpack_binary(pack_binary(weight), weight.shape)
    else:
        raise ConfigError(f"codec must be 'int4' or 'binary', got {codec!r}")
    return weight + (low.to(weight.dtype) - weight).detach()


class FakeLowBitLinear(nn.Linear):
    """Quantization-aware training stand-in for a Linear: a float weight that trains (same parameter
    objects and state-dict keys as the layer it replaces), used in its low-bit form on every call."""

    def __init__(self, layer: nn.Linear, *, codec: str, group_size: int = 32) -> None:
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight, self.bias = layer.weight, layer.bias  # share: an optimizer built on the layer still works
        self.codec, self.group_size = codec, group_size
        fake_quantize(self.weight.detach(), codec=codec, group_size=group_size)  # fail now on a bad group size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, codec=self.codec, group_size=self.group_size), self.bias)


class FakeLowBitConv2d(nn.Conv2d):
    """Quantization-aware training stand-in for a Conv2d (see :class:`FakeLowBitLinear`)."""

    def __init__(self, layer: nn.Conv2d, *, codec: str, group_size: int = 32) -> None:
        super().__init__(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self.codec, self.group_size = codec, group_size
        fake_quantize(self.weight.detach(), codec=codec, group_size=group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize(self.weight, codec=self.codec, group_size=self.group_size)
        return self._conv_forward(x, weight, self.bias)
