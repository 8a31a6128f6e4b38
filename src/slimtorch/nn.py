"""Dropout's sibling DropConnect, the regulariser the seeds contrast with pruning.

Dropout (``torch.nn.Dropout``, Srivastava et al. 2014) zeroes random *outputs* of a layer during
training; DropConnect (Wan et al. 2013) zeroes random *weights*, a fresh mask each forward pass. Both
act only in training and leave the weights in place, where pruning removes weights for good::

    >>> import torch
    >>> from slimtorch.nn import DropConnectLinear
    >>> layer = DropConnectLinear(8, 4, p=0.5)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(layer.eval()(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    True

Kept weights are scaled by ``1 / (1 - p)`` during training so that the expected pre-activation equals
the evaluation-time one (the "inverted" form torch's Dropout uses; Wan et al. instead sample a Gaussian
at inference, which costs far more and is rarely done).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.select import type_names

__all__ = ["DropConnectConv2d", "DropConnectLinear", "add_dropconnect_", "drop_connect"]


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"drop probability p must be in [0, 1), got {p!r}")
    return float(p)


def drop_connect(
    weight: torch.Tensor, p: float, *, training: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``weight`` with each entry zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``
    when ``training``; ``weight`` itself otherwise. Differentiable (the gradient flows to kept entries)."""
    p = _check_p(p)
    if not training or p == 0.0:
        return weight
    keep = torch.rand(weight.shape, generator=generator, device="cpu" if generator else weight.device) >= p
    return weight * keep.to(device=weight.device, dtype=weight.dtype) / (1.0 - p)


class DropConnectLinear(nn.Linear):
    """``nn.Linear`` whose weights are dropped at random during training (same parameters and keys)."""

    p: float = 0.5

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, p: float = 0.5) -> None:
        super().__init__(in_features, out_features, bias)
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, drop_connect(self.weight, self.p, training=self.training), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class DropConnectConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weights are dropped at random during training (same parameters and keys)."""

    p: float = 0.5

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        p: float = 0.5,
    ) -> None:
        # Other Conv2d options (groups, dilation, padding modes): build an nn.Conv2d, then add_dropconnect_.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, drop_connect(self.weight, self.p, training=self.training), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


_DROPCONNECT = {nn.Linear: DropConnectLinear, nn.Conv2d: DropConnectConv2d}


def add_dropconnect_(model: nn.Module, p: float, *, op_types: Sequence[str] = ("Linear",)) -> None:
    """Turn every ``nn.Linear`` / ``nn.Conv2d`` of the given types into its DropConnect version, in place.

    The modules change class only (``__class__``), so parameters, masks, hooks and state-dict keys all
    stay; a subclass of Linear/Conv2d with its own forward is refused rather than silently changed.
    """
    p = _check_p(p)
    chosen = [(n, m) for n, m in model.named_modules() if n and type_names(m) & set(op_types)]
    for name, module in chosen:
        if type(module) not in _DROPCONNECT and type(module) not in _DROPCONNECT.values():
            raise ConfigError(
                f"{name!r} is a {type(module).__name__}; DropConnect replaces plain nn.Linear and nn.Conv2d only"
            )
    if not chosen:
        raise ConfigError(f"no module of types {list(op_types)} in the model; DropConnect supports Linear and Conv2d")
    for _, module in chosen:
        module.__class__ = _DROPCONNECT.get(type(module), type(module))
        module.p = p
