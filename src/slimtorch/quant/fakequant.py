"""Simulated ("fake") quantization for training and calibration: tensor quantizers and the layers that use them.

Each quantizer is a module that maps a float tensor to the float values of its quantized form, with a
gradient that lets training go on (straight-through estimators). Their state (observed ranges, learned
step sizes) lives in buffers and parameters, so it is saved with the model's state dict. The
algorithms (``algorithm`` of :func:`make_quantizer`):

``minmax``  ranges observed from the data: the current tensor for weights, for activations an exponential
            moving average of batch ranges while training (Jacob et al. 2018, NNI's QAT) or the extremes
            over calibration batches (post-training: :func:`calibrating` collects, then ranges are frozen)
``dorefa``  weights through ``tanh``, normalised to [0, 1] and quantized, then mapped to [-1, 1]; activations
            clipped to [0, 1] (Zhou et al. 2016, "DoReFa-Net"); 1-bit weights are sign x mean |w|
``bnn``     ±1 by sign: activations with the straight-through gradient cancelled where |x| > 1, weights
            with one scale per output channel (mean |w|, as XNOR-Net), which a following BatchNorm would
            absorb (Hubara et al. 2016, "Binarized Neural Networks")
``lsq``     a step size learned by gradient descent, with the gradient scaled by 1 / sqrt(n q_max)
            (Esser et al. 2020, "Learned Step Size Quantization")

    >>> import torch
    >>> from slimtorch.quant.targets import TensorQuant
    >>> q = make_quantizer("minmax", TensorQuant(bits=4, symmetric=True), kind="weight")
    >>> w = torch.tensor([-1.0, -0.3, 0.1, 0.7])
    >>> torch.round(q(w) * 7).tolist()                    # 4-bit symmetric: steps of max|w| / 7
    [-7.0, -2.0, 1.0, 5.0]
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from slimtorch.errors import ConfigError, SlimWarning
from slimtorch.quant.lowbit import fake_quantize
from slimtorch.quant.targets import TensorQuant

__all__ = [
    "ALGORITHMS",
    "BinaryQuantizer",
    "DoReFaQuantizer",
    "LsqQuantizer",
    "RangeQuantizer",
    "calibrating",
    "make_quantizer",
]

ALGORITHMS = ("minmax", "minmax_ptq", "dorefa", "bnn", "lsq")
_EPS = torch.finfo(torch.float32).eps


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


class RangeQuantizer(nn.Module):
    """Affine or symmetric k-bit quantization with ranges observed from the data.

    ``kind`` is ``"weight"`` (ranges of the tensor itself, on every call) or an activation (``"input"`` /
    ``"output"``: ranges kept in buffers). With ``calibrate=True`` (post-training) the activation ranges
    are the extremes over the batches run inside :func:`calibrating`, and nothing is quantized there;
    otherwise (training) they follow an exponential moving average of each training batch's range, and a
    model in eval mode uses them as they are (the first batch ever seen sets them).
    """

    def __init__(self, spec: TensorQuant, *, kind: str, calibrate: bool = False, momentum: float = 0.01) -> None:
        super().__init__()
        if spec.bits < 2:
            raise ConfigError(f"min/max quantization needs at least 2 bits, got {spec.bits} for the {kind}; use the "
                              "'bnn' or 'dorefa' method for 1 bit")
        self.spec, self.kind, self.calibrate, self.momentum = spec, kind, calibrate, momentum
        self.observing = False
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def ranges(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of ``x``: per output channel (dim 0) for a per-channel spec, else of the whole tensor."""
        if self.spec.per_channel:
            rows = x.detach().reshape(x.shape[0], -1)  # (out channels, fan-in)
            return rows.amin(dim=1), rows.amax(dim=1)
        return x.detach().amin(), x.detach().amax()

    def _observe(self, x: torch.Tensor) -> None:
        low, high = self.ranges(x)
        if not bool(self.observed):
            self.min_val, self.max_val = low.float().clone(), high.float().clone()
        elif self.calibrate:
            self.min_val, self.max_val = torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)
        else:
            self.min_val = self.min_val + self.momentum * (low - self.min_val)
            self.max_val = self.max_val + self.momentum * (high - self.max_val)
        self.observed.fill_(True)

    def scale_zero_point(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero point of a range (widened to hold 0, so that zero is exact)."""
        qmin, qmax = self.spec.qrange
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        if self.spec.symmetric:
            scale = torch.maximum(-low, high) / ((qmax - qmin) / 2)
            zero = torch.full_like(scale, 0 if self.spec.signed else (qmin + qmax + 1) // 2)
        else:
            scale = (high - low) / (qmax - qmin)
            zero = qmin - torch.round(low / scale.clamp(min=_EPS))
        return scale.clamp(min=_EPS), zero.clamp(qmin, qmax).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            low, high = self.ranges(x)
        else:
            if self.observing or (self.training and not self.calibrate) or not bool(self.observed):
                self._observe(x)
            if self.observing:
                return x  # calibration: record ranges only (the float model's activations)
            low, high = self.min_val, self.max_val
        scale, zero = self.scale_zero_point(low, high)
        qmin, qmax = self.spec.qrange
        if scale.dim():  # one scale per output channel (dim 0)
            return torch.fake_quantize_per_channel_affine(x, scale.float(), zero, 0, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero, qmin, qmax)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.spec}"


class DoReFaQuantizer(nn.Module):
    """DoReFa-Net's k-bit quantization of weights (through tanh) or of activations (clipped to [0, 1])."""

    def __init__(self, spec: TensorQuant, *, kind: str) -> None:
        super().__init__()
        self.spec, self.kind = spec, kind
        if kind != "weight" and spec.bits < 2:
            raise ConfigError(f"DoReFa quantizes activations to at least 2 bits, got {spec.bits} for the {kind}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.spec.bits - 1
        if self.kind != "weight":
            return round_ste(torch.clamp(x, 0.0, 1.0) * levels) / levels
        if self.spec.bits == 1:
            return x + (torch.sign(x) * x.abs().mean() - x).detach()
        t = torch.tanh(x)
        unit = t / (2 * t.abs().max().detach().clamp(min=_EPS)) + 0.5  # in [0, 1]
        return 2 * round_ste(unit * levels) / levels - 1

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.spec.bits} bits"


class _SignSTE(torch.autograd.Function):
    """sign (0 -> +1) forward; the gradient passes where |x| <= 1 and is cancelled elsewhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class BinaryQuantizer(nn.Module):
    """Binarised Neural Networks: activations to ±1, weights to ±(mean |w| of their output channel)."""

    def __init__(self, spec: TensorQuant, *, kind: str) -> None:
        super().__init__()
        if spec.bits != 1:
            raise ConfigError(f"BNN binarises to ±1 (1 bit), got {spec.bits} bits for the {kind}: drop quant_bits / "
                              "quant_dtype from the entry, or use another method for more bits")
        self.kind = kind
        self.checked = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            return fake_quantize(x, codec="binary")
        if not self.checked:
            self.checked = True
            if bool((x >= 0).all()):
                warnings.warn(f"the {self.kind} binarised here is never negative (on the first batch), so its sign is "
                              "+1 everywhere and carries no information: centre it first, with a BatchNorm before "
                              "the binarised activation (as binarised networks do) rather than a ReLU",
                              SlimWarning, stacklevel=2)
        return _SignSTE.apply(x)

    def extra_repr(self) -> str:
        return self.kind


class LsqQuantizer(nn.Module):
    """Learned step size: symmetric k-bit quantization whose step (per tensor, or per output channel for
    weights) is a parameter, set on the first batch to 2 mean|x| / sqrt(q_max) and then trained."""

    def __init__(self, spec: TensorQuant, *, kind: str) -> None:
        super().__init__()
        if not spec.symmetric or spec.bits < 2:
            raise ConfigError(f"LSQ learns a step size without a zero point: it needs quant_scheme 'symmetric' and at "
                              f"least 2 bits, got {spec} for the {kind}")
        self.spec, self.kind = spec, kind
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _init(self, x: torch.Tensor) -> None:
        qmax = self.spec.qrange[1]
        with torch.no_grad():
            if self.spec.per_channel:
                step = x.detach().reshape(x.shape[0], -1).abs().mean(dim=1) * 2 / math.sqrt(qmax)  # (out,)
                self.scale.data = step.clamp(min=_EPS)
            else:
                self.scale.fill_(float(x.detach().abs().mean() * 2 / math.sqrt(qmax)) or _EPS)
            self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._init(x)
        qmin, qmax = self.spec.qrange
        per_scale = x.numel() // max(self.scale.numel(), 1)
        step = scale_grad(self.scale, 1.0 / math.sqrt(per_scale * qmax)).abs().clamp(min=_EPS)
        if step.dim():
            step = step.reshape(-1, *[1] * (x.dim() - 1))  # (out, 1, ...): one step per output channel
        return round_ste(torch.clamp(x / step, qmin, qmax)) * step

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.spec}"


def make_quantizer(algorithm: str, spec: TensorQuant, *, kind: str) -> nn.Module:
    """The quantizer module of ``algorithm`` (see :data:`ALGORITHMS`) for one tensor ``kind``."""
    if algorithm in ("minmax", "minmax_ptq"):
        return RangeQuantizer(spec, kind=kind, calibrate=algorithm == "minmax_ptq")
    if algorithm == "dorefa":
        return DoReFaQuantizer(spec, kind=kind)
    if algorithm == "bnn":
        return BinaryQuantizer(spec, kind=kind)
    if algorithm == "lsq":
        return LsqQuantizer(spec, kind=kind)
    raise ConfigError(f"unknown fake-quantization algorithm {algorithm!r}; available: {list(ALGORITHMS)}")


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Inside: the post-training quantizers of ``model`` record activation ranges and pass values through
    unchanged (run calibration batches here); afterwards they quantize with the ranges seen."""
    quantizers = [m for m in model.modules() if isinstance(m, RangeQuantizer) and m.calibrate]
    for q in quantizers:
        q.observing = True
    try:
        yield
    finally:
        for q in quantizers:
            q.observing = False
