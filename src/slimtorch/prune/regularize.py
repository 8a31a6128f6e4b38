"""Network slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales during training, so that the
channels a network can do without end with scales near zero and the ``bn_scale`` criterion finds them.

Add the penalty to your loss, or let the callback add its subgradient after ``loss.backward()``::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.regularize import bn_l1_penalty
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    >>> round(bn_l1_penalty(net, 1e-2).item(), 6)      # 4 scales of 1.0
    0.04

Then prune, typically globally: ``compute_masks(net, [{"op_types": ["BatchNorm2d"], "total_sparsity":
0.5}], criterion="bn_scale", example_inputs=x)`` (the example inputs carry the BatchNorm masks to the
convolutions that produce those channels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.prune.loop import Callback

__all__ = ["SlimmingRegularizer", "bn_l1_penalty", "scaled_norms"]


def scaled_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm/InstanceNorm/GroupNorm layers of ``model`` that have a learnable per-channel scale."""
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
    return {
        name: m for name, m in model.named_modules() if isinstance(m, kinds) and isinstance(m.weight, torch.Tensor)
    }


def _check(model: nn.Module, strength: float) -> dict[str, nn.Module]:
    if not (isinstance(strength, (int, float)) and strength >= 0):
        raise ConfigError(f"strength must be a number >= 0 (1e-5 to 1e-4 is typical), got {strength!r}")
    norms = scaled_norms(model)
    if not norms:
        raise ConfigError("network slimming needs BatchNorm (or GroupNorm) layers with a scale; the model has none")
    return norms


def bn_l1_penalty(model: nn.Module, strength: float) -> torch.Tensor:
    """``strength * sum(|gamma|)`` over every normalisation scale of ``model``: add it to the loss."""
    norms = _check(model, strength)
    return strength * sum(m.weight.abs().sum() for m in norms.values())


class SlimmingRegularizer(Callback):
    """Adds ``strength * sign(gamma)`` to the scale gradients after each backward pass (the subgradient
    of :func:`bn_l1_penalty`), for loops whose loss you would rather not touch."""

    def __init__(self, model: nn.Module, strength: float = 1e-4) -> None:
        self.norms = _check(model, strength)
        self.strength = strength

    def after_backward(self, batch: Any = None) -> None:
        with torch.no_grad():
            for norm in self.norms.values():
                if norm.weight.grad is not None:
                    norm.weight.grad.add_(norm.weight.sign(), alpha=self.strength)
