"""Sparse CPU kernels for Linear layers: a masked weight as a CSR matrix, multiplied by ``torch.sparse.mm``.

A masked model computes as many multiply-adds as the dense one. A Linear layer whose weight is sparse
enough is faster as CSR (torch's sparse kernels, MKL's on x86), but only from a high sparsity on: below it
the dense GEMM wins, by far at low sparsity. ``benchmarks/sparse_kernels.py`` measures where the two cross;
:data:`BREAK_EVEN_SPARSITY` is the value it measured (see docs/pruning.md#sparse-storage-and-sparse-kernels),
and :func:`sparsify_linear_` converts only the layers at or above it. Semi-structured (2:4) kernels
(``torch.sparse.to_sparse_semi_structured``) run on CUDA only: torch refuses CPU tensors, so 2:4 weights run
here as CSR like any other.

The converted layer computes what the masked one does (the same products, summed in another order)::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import apply_masks_
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> apply_masks_(net, {"0.weight": torch.rand(32, 64) > 0.97})
    >>> x = torch.randn(8, 64)
    >>> expected = net(x)
    >>> sparsify_linear_(net)
    ['0']
    >>> type(net[0]).__name__, torch.allclose(net(x), expected, atol=1e-6)
    ('SparseLinear', True)

The CSR weight is a buffer for inference: train and save the masked model, convert it for serving.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, closest

__all__ = ["BREAK_EVEN_SPARSITY", "SparseLinear", "sparsify_linear_", "weight_sparsity"]

#: Weight sparsity from which a CSR Linear was faster than the dense one in ``benchmarks/sparse_kernels.py`` at
#: every batch size measured (1, 16, 64; one thread) for layers of 1024 and 2048 features: 95% at batch 1,
#: 70-90% at batch 16 and 64. Layers of 256 features gained nothing below 98% (docs/pruning.md has the table).
BREAK_EVEN_SPARSITY = 0.95


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight held as a CSR matrix ``(out_features, in_features)``: ``y = W x + b``
    by ``torch.sparse.mm``. Build it with :meth:`from_linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.layout != torch.sparse_csr or weight.dim() != 2:
            raise ConfigError(f"SparseLinear needs a 2-D CSR weight, got a {weight.layout} of shape "
                              f"{tuple(weight.shape)}; build it with SparseLinear.from_linear(layer)")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> SparseLinear:
        """The layer's weight as CSR (its zeros, masked ones included, are not stored) and its bias."""
        with warnings.catch_warnings():  # torch's notice that CSR support is "beta", on every conversion
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return cls(layer.weight.detach().to_sparse_csr(), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in): every leading dimension as one batch
        out = torch.sparse.mm(self.weight, flat.T).T  # (out, in) @ (in, N) -> (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nonzero={nnz}"


def weight_sparsity(layer: nn.Module) -> float:
    """Share of a layer's weight entries that are exactly zero."""
    weight = layer.weight.detach()
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel() if weight.numel() else 0.0


def _targets(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n}
    if names is None:
        return linears
    if isinstance(names, str):
        raise ConfigError(f"names must be a list of Linear layers' names, got the string {names!r}; write [{names!r}]")
    for name in names:
        if name not in linears:
            raise NoMatchError(f"{name!r} is no nn.Linear of the model; {closest(name, linears)}")
    return {n: linears[n] for n in names}


@torch.no_grad()
def sparsify_linear_(model: nn.Module, *, min_sparsity: float = BREAK_EVEN_SPARSITY,
                     names: Sequence[str] | None = None) -> list[str]:
    """Replace each ``nn.Linear`` of ``model`` (those ``names`` lists, or all) whose weight is at least
    ``min_sparsity`` zeros with a :class:`SparseLinear`; returns the names replaced. A masked layer's masks
    are baked in (its pruned entries are zero): the converted model computes what the masked one did.
    Everything is checked before a layer is replaced."""
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ConfigError(f"min_sparsity must be a share of zeros in [0, 1], got {min_sparsity!r}")
    chosen = {n: m for n, m in _targets(model, names).items() if weight_sparsity(m) >= min_sparsity}
    for name, layer in chosen.items():
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name)._modules[child] = SparseLinear.from_linear(layer)
    return list(chosen)
