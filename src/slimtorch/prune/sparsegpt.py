"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer's weight to a sparsity or an N:M pattern
and update the weights that stay so that the layer's output on calibration inputs changes least.

The layer-wise problem is ``min ||W X - W' X||^2`` over ``W'`` with the chosen zeros, where ``X`` holds
the calibration inputs. Its curvature is the Hessian ``H = 2 X X^T / n`` (shared by every output row).
Columns are processed left to right: when column ``j`` is pruned in a row, the optimal brain surgeon
update spreads its error ``w_j / [H^-1]_jj`` over the columns not yet processed through row ``j`` of the
upper Cholesky factor of ``H^-1`` (which is the inverse Hessian of the remaining columns, so no matrix is
re-inverted). Which weights go is decided per block of ``block_size`` columns from the saliency
``w^2 / [H^-1]_jj^2`` of the weights as already updated ("adaptive mask selection"); for N:M the choice
is made per group of M columns.

    >>> import torch
    >>> x = torch.randn(256, 8)                 # 256 calibration inputs of 8 features
    >>> w = torch.randn(4, 8)
    >>> new_w, mask = sparsegpt_solve(w, 2 * x.T @ x / 256, sparsity=0.5)
    >>> int(mask.sum()), bool((new_w[~mask] == 0).all())
    (16, True)
"""

from __future__ import annotations

import torch

from slimtorch.errors import ConfigError

__all__ = ["damped_inverse", "sparsegpt_solve"]


def damped_inverse(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``(H + damp * mean(diag H) * I)^-1`` in float64 (the dampening keeps a Hessian of few or correlated
    calibration inputs invertible; an all-zero Hessian is damped by ``damp`` alone)."""
    h = hessian.double().clone()
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * (float(h.diagonal().mean()) or 1.0)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))  # (in, in)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``U^T U = H^-1``), float64."""
    return torch.linalg.cholesky(damped_inverse(hessian, damp), upper=True)


def _block_mask(w: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune flags (True = prune) of one column block: the ``sparsity`` fraction with the lowest saliency."""
    saliency = w.pow(2) / hinv_diag.pow(2)[None]  # (rows, block)
    count = int(saliency.numel() * sparsity + 0.5)
    flags = torch.zeros_like(saliency, dtype=torch.bool)
    if count:
        flags.view(-1)[torch.topk(saliency.flatten(), count, largest=False).indices] = True
    return flags


def _group_mask(w: torch.Tensor, hinv_diag: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune flags of one group of ``m`` columns: the ``m - n`` lowest-saliency weights of every row."""
    saliency = w.pow(2) / hinv_diag.pow(2)[None]  # (rows, m)
    flags = torch.zeros_like(saliency, dtype=torch.bool)
    return flags.scatter_(1, torch.topk(saliency, m - n, dim=1, largest=False).indices, True)


def _prune_block(
    block: torch.Tensor, hinv: torch.Tensor, flags: torch.Tensor | None, nm: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune one column block (``block``: (rows, cols), ``hinv``: its (cols, cols) slice of the factor).

    Returns the pruned and updated block, its prune flags and the scaled errors (rows, cols) that the
    columns after the block must absorb."""
    n, m = nm
    w = block.clone()
    errors = torch.zeros_like(w)
    prune = flags.clone() if flags is not None else torch.zeros_like(w, dtype=torch.bool)
    for j in range(w.shape[1]):
        if m and j % m == 0:
            prune[:, j : j + m] = _group_mask(w[:, j : j + m], hinv.diagonal()[j : j + m], n, m)
        col = w[:, j].clone()
        kept = torch.where(prune[:, j], torch.zeros_like(col), col)
        err = (col - kept) / hinv[j, j]  # (rows,): the OBS step of each row
        w[:, j:] -= err[:, None] * hinv[j, j:][None]  # spread over the block's columns not yet done
        w[:, j] = kept
        errors[:, j] = err
    return w, prune, errors


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New weight and keep mask (True = kept) of a ``(out, in)`` weight given the ``(in, in)`` Hessian of
    its inputs. Pure: ``weight`` is not changed.

    Args:
        sparsity: fraction of weights pruned in each block of columns (ignored when ``pattern`` or ``keep``
            is set).
        keep: a given ``(out, in)`` keep mask: only the updates of the weights it keeps are computed (the
            optimal brain surgeon step for a mask chosen by any criterion).
        pattern: ``(n, m)`` to keep ``n`` of every ``m`` consecutive input weights of each row (2:4).
        block_size: columns processed together (lazy batched updates; also the mask-selection block).
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (numerical stability).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ConfigError(f"need a (out, in) weight and an (in, in) Hessian, got {tuple(weight.shape)} and "
                          f"{tuple(hessian.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    n, m = pattern or (0, 0)
    if keep is not None and (keep.shape != weight.shape or pattern is not None):
        raise ConfigError(f"keep must be a {tuple(weight.shape)} mask and excludes pattern; got {tuple(keep.shape)}")
    if pattern is not None and (not 0 < n < m or weight.shape[1] % m or block_size % m):
        raise ConfigError(f"pattern {n}:{m} needs 0 < n < m with m dividing the {weight.shape[1]} inputs and the "
                          f"block size {block_size}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    factor = _inverse_hessian_factor(h, damp)
    given = keep
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        hinv = factor[start:end, start:end]
        if given is not None:
            flags = ~given[:, start:end].to(device=w.device, dtype=torch.bool)
        else:
            flags = None if m else _block_mask(w[:, start:end], hinv.diagonal(), sparsity)
        block, prune, errors = _prune_block(w[:, start:end], hinv, flags, (n, m))
        w[:, start:end] = block
        w[:, end:] -= errors @ factor[start:end, end:]  # lazy update of every later column at once
        keep[:, start:end] = ~prune
    return w.to(weight.dtype), keep
