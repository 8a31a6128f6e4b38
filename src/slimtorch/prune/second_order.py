"""Second-order criteria, from the curvature of the loss around the trained weights: Optimal Brain Damage
(LeCun et al. 1990) and Optimal Brain Surgeon (Hassibi & Stork 1993), and OBS's update of the weights kept.

``obd``: removing weight q costs ``1/2 h_qq w_q^2`` to second order, with ``h_qq`` the diagonal of the loss
Hessian. It is estimated from data (``collect_stats(..., keys=("hessian_diag",), loss_fn=...)``:
Hutchinson's estimator, one random ±1 probe per batch); its magnitude is used, as a noisy estimate can come
out negative where the curvature is small. ``obd_fisher`` takes the Fisher information's diagonal instead
(the mean squared gradient, ``grad_sq``): one backward pass per batch rather than two.

``obs``: layer by layer, as SparseGPT does for language models (Frantar & Alistarh 2023), for any Linear or
Conv1d/2d/3d layer. The loss is the squared change of the layer's outputs on calibration inputs ``X``,
whose Hessian ``H = 2 X^T X / n`` is shared by every output row (``keys=("input_hessian",)``, no labels
needed; a convolution's inputs are its unfolded patches). Removing weight q of a row costs
``w_q^2 / (2 [H^-1]_qq)`` once the row's other weights are moved to make up for it; a unit of several
weights of one row costs ``1/2 w_S^T ([H^-1]_SS)^-1 w_S`` (a whole row: ``1/2 w^T H w``, nothing is left to
compensate), summed over the rows a unit spans. :func:`apply_obs_` then makes the moves, for masks from
any criterion (the sequential update of :func:`~slimtorch.prune.sparsegpt.sparsegpt_solve`).

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune import collect_stats, compute_masks
    >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> x = torch.randn(256, 16)
    >>> cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    >>> stats = collect_stats(net, [x], keys=("input_hessian",), config_list=cfg)
    >>> masks = compute_masks(net, cfg, criterion="obs", stats=stats)
    >>> before = (net[0](x) - nn.functional.linear(x, net[0].weight * masks["0.weight"], net[0].bias)).pow(2).mean()
    >>> dense = net[0](x).detach()
    >>> apply_obs_(net, masks, stats)
    >>> bool((net[0](x) - dense).pow(2).mean() < before)        # the kept weights made up for the pruned ones
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.masks import apply_masks_
from slimtorch.prune.criteria import ScoreContext, register_criterion
from slimtorch.prune.sparsegpt import damped_inverse, sparsegpt_solve

__all__ = ["apply_obs_", "obd", "obd_fisher", "obs", "obs_weights"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DAMP = 0.01  # dampening of H (a fraction of its mean diagonal), as SparseGPT


@register_criterion("obd", default_granularity="fine", needs=("hessian_diag",))
def obd(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Optimal Brain Damage: sum over the unit of 1/2 |h_qq| w_q^2, with h_qq the loss Hessian's diagonal
    estimated from data (statistic ``hessian_diag``)."""
    curvature = ctx.view.units(ctx.stat("hessian_diag", "obd").to(torch.float32)).abs()
    return 0.5 * (curvature * units.pow(2)).sum(dim=1)


@register_criterion("obd_fisher", default_granularity="fine", needs=("grad_sq",))
def obd_fisher(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Optimal Brain Damage with the Fisher information's diagonal in place of the Hessian's: sum over the
    unit of 1/2 F_qq w_q^2, F_qq the mean squared gradient per batch (statistic ``grad_sq``; the empirical
    Fisher, which approaches the Hessian of a log-likelihood loss near a minimum). No second backward pass;
    on single weights it ranks as ``taylor`` does."""
    fisher = ctx.view.units(ctx.stat("grad_sq", "obd_fisher").to(torch.float32))
    return 0.5 * (fisher * units.pow(2)).sum(dim=1)


def _hessians(ctx: ScoreContext, shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's ``input_hessian`` as ``(groups, fan_in, fan_in)`` float64, checked against its weight."""
    h = ctx.stat("input_hessian", "obs").double()
    h = h[None] if h.dim() == 2 else h
    fan_in = math.prod(shape[1:])
    if not isinstance(ctx.module, _LAYERS) or h.shape[1:] != (fan_in, fan_in) or shape[0] % h.shape[0]:
        raise ConfigError(f"criterion 'obs' scores Linear and Conv1d/2d/3d layers from their 'input_hessian' "
                          f"{tuple(h.shape)}; layer {ctx.name!r} ({type(ctx.module).__name__}, weight {shape}) does "
                          "not fit it: collect the statistics on this model again, or exclude the layer")
    return h


def _row_costs(w: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor, group: torch.Tensor, cols: torch.Tensor,
               cache: dict[tuple[int, tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    """1/2 w_S^T ([H^-1]_SS)^-1 w_S for each row of ``w`` ((rows, |S|) weights at columns ``cols``)."""
    costs = torch.empty(w.shape[0], dtype=torch.float64)
    for g in group.unique().tolist():
        rows = group == g
        key = (g, tuple(cols.tolist()))
        if key not in cache:  # whole rows: (H^-1)^-1 = H, no inversion
            cache[key] = h[g] if len(cols) == h.shape[1] else torch.linalg.inv(hinv[g][cols][:, cols])
        m = cache[key]  # (|S|, |S|)
        costs[rows] = 0.5 * torch.einsum("ri,ij,rj->r", w[rows], m, w[rows])
    return costs


@register_criterion("obs", default_granularity="fine", needs=("input_hessian",))
def obs(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Optimal Brain Surgeon, layer-wise (statistic ``input_hessian``): the increase of the layer's squared
    output error when the unit goes and the rest of each row it touches is re-fitted."""
    shape = ctx.view.shape
    h = _hessians(ctx, shape)
    hinv = torch.stack([damped_inverse(g, DAMP) for g in h])  # (groups, fan_in, fan_in)
    out, fan_in = shape[0], math.prod(shape[1:])
    weight = ctx.module.weight.detach().double().reshape(out, fan_in)
    group = torch.arange(out) // (out // h.shape[0])  # (out,): the group of each row
    if ctx.view.unit_size == 1:  # single weights: w^2 / (2 [H^-1]_qq), vectorised
        per_weight = weight.pow(2) / (2 * hinv.diagonal(dim1=1, dim2=2)[group])  # (out, fan_in)
        return ctx.view.units(per_weight.reshape(shape)).sum(dim=1)
    # Where each element of a unit sits: its row and its column of the (out, fan_in) matrix.
    rows = ctx.view.units(torch.arange(out)[:, None].expand(out, fan_in).reshape(shape))  # (units, size)
    cols = ctx.view.units(torch.arange(fan_in)[None, :].expand(out, fan_in).reshape(shape))
    cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    scores = torch.zeros(ctx.view.num_units, dtype=torch.float64)
    for u in range(ctx.view.num_units):
        for r in rows[u].unique():
            s = cols[u][rows[u] == r].sort().values
            scores[u] += _row_costs(weight[r, s][None], h, hinv, group[r][None], s, cache)[0]
    return scores


def obs_weights(model: nn.Module, masks: Mapping[str, torch.Tensor], stats: Mapping[str, Mapping[str, torch.Tensor]],
                *, block_size: int = 128) -> dict[str, torch.Tensor]:
    """New weights of the masked Linear / Conv layers (pure): the pruned weights zero, the kept ones moved to
    make up for them on the calibration inputs of ``stats`` (their ``input_hessian``). Masks of other
    parameters (biases, norms) are left to :func:`apply_obs_` as they are."""
    new = {}
    for name, mask in masks.items():
        layer_name, _, param = name.rpartition(".")
        module = model.get_submodule(layer_name)
        if param != "weight" or not isinstance(module, _LAYERS):
            continue
        if "input_hessian" not in stats.get(layer_name, {}):
            raise ConfigError(f"the OBS update of {layer_name!r} needs its 'input_hessian': collect_stats(model, "
                              "batches, keys=('input_hessian',), config_list=...) before pruning")
        weight = module.weight.detach()
        h = stats[layer_name]["input_hessian"]
        h = h[None] if h.dim() == 2 else h
        w2d, keep = weight.reshape(weight.shape[0], -1), mask.reshape(weight.shape[0], -1).to(weight.device)
        per_group = weight.shape[0] // h.shape[0]
        parts = [sparsegpt_solve(w2d[g * per_group:(g + 1) * per_group], h[g].to(weight.device),
                                 keep=keep[g * per_group:(g + 1) * per_group], block_size=block_size, damp=DAMP)[0]
                 for g in range(h.shape[0])]
        new[name] = torch.cat(parts).reshape(weight.shape)
    return new


def apply_obs_(model: nn.Module, masks: Mapping[str, torch.Tensor], stats: Mapping[str, Mapping[str, torch.Tensor]],
               *, block_size: int = 128) -> None:
    """Write the OBS-updated weights (:func:`obs_weights`, all computed before any is written) and apply the
    masks (:func:`~slimtorch.masks.apply_masks_`)."""
    new = obs_weights(model, masks, stats, block_size=block_size)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in new.items():
            params[name].copy_(weight)
    apply_masks_(model, masks)
