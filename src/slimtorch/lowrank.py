"""Low-rank factorization: each selected Linear or Conv2d becomes two thinner layers from a truncated SVD.

``W (out, in) ~= U_r S_r V_r^T`` becomes ``Linear(in, r, bias=False)`` then ``Linear(r, out)``; a conv's
weight is flattened to ``(out, in*kh*kw)`` and becomes a ``kh x kw`` conv to ``r`` channels (same stride,
padding, dilation) then a 1x1 conv. The rank is chosen per layer by kept energy (the fraction of
``sum(S^2)`` kept, so the relative squared reconstruction error is exactly ``1 - energy``), by a parameter
budget, by a fixed rank, or per layer from :func:`lowrank_sensitivity`. Plain torch layers come out, so
the result fine-tunes, quantizes and exports like any model.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.lowrank import LowRankConfig, factorize_, plan_lowrank
    >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> plans = plan_lowrank(model, LowRankConfig(param_ratio=0.25, op_names=("0",)))
    >>> plans["0"].rank, plans["0"].params_after <= 0.25 * plans["0"].params_before
    (31, True)
    >>> factorize_(model, LowRankConfig(param_ratio=0.25, op_names=("0",)))
    >>> model[0]
    Sequential(
      (0): Linear(in_features=256, out_features=31, bias=False)
      (1): Linear(in_features=31, out_features=256, bias=True)
    )
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_finite_inputs, check_materialized, check_module, check_number, run_model
from slimtorch.config import fields_from_dict, fields_to_dict
from slimtorch.errors import ConfigError
from slimtorch.graph.run import call_model
from slimtorch.select import select_layers

__all__ = [
    "LOWRANK_ATTR",
    "LowRankConfig",
    "LowRankPlan",
    "factorize_",
    "factorized_layers",
    "lowrank_sensitivity",
    "plan_lowrank",
    "ranks_for_tolerance",
]

#: Attribute a factorized model carries: ``{layer name: rank}``.
LOWRANK_ATTR = "slimtorch_factorization"


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Which layers to factorize and how to choose each rank: exactly one of ``energy`` (keep this fraction
    of the squared singular values, in (0, 1]), ``param_ratio`` (the two layers hold at most this fraction
    of the original's parameters, in (0, 1)) or ``rank`` (a fixed rank, capped at the full rank).

    A layer whose chosen rank would not make it smaller is left alone when ``only_if_smaller`` (the default),
    and listed as skipped by :func:`plan_lowrank`.
    """

    energy: float | None = None
    param_ratio: float | None = None
    rank: int | None = None
    op_types: tuple[str, ...] = ("Linear", "Conv2d")
    op_names: tuple[str, ...] = ()
    exclude_op_names: tuple[str, ...] = ()
    only_if_smaller: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("energy", "param_ratio", "rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of 'energy', 'param_ratio' or 'rank', got {given or 'none'}")
        if self.energy is not None and not (_number(self.energy) and 0 < self.energy <= 1):
            raise ConfigError(f"'energy' must be in (0, 1] (e.g. 0.9 keeps 90% of sum(S^2)), got {self.energy!r}")
        if self.param_ratio is not None and not (_number(self.param_ratio) and 0 < self.param_ratio < 1):
            raise ConfigError(f"'param_ratio' must be in (0, 1), got {self.param_ratio!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"'rank' must be an integer >= 1, got {self.rank!r}")
        for key in ("op_types", "op_names", "exclude_op_names"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key!r} must be a tuple of non-empty strings, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LowRankConfig:
        return fields_from_dict(cls, data, what="low-rank")


def _check_call(model: nn.Module, config: LowRankConfig, what: str) -> None:
    check_module(model, what)
    if not isinstance(config, LowRankConfig):
        raise ConfigError(f"{what} takes a LowRankConfig, got a {type(config).__name__} ({config!r}); pass "
                          "LowRankConfig.from_dict(config)")
    check_materialized(model, what)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LowRankPlan:
    """What factorizing one layer does: its rank, the energy kept and the parameters before and after."""

    name: str
    rank: int
    full_rank: int
    kept_energy: float
    params_before: int
    params_after: int
    skipped: str = ""  # why the layer is left alone ("" when it is factorized)


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as a 2-D (out, fan_in) matrix: a conv filter is flattened over (in, kh, kw)."""
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        raise ConfigError(
            f"low-rank factorization handles Conv2d with groups=1 and zero padding, got groups={layer.groups}, "
            f"padding_mode={layer.padding_mode!r}; exclude the layer with exclude_op_names"
        )
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ConfigError(f"low-rank factorization handles Linear and Conv2d, got {type(layer).__name__}")
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64: the rank choice and the exactness of the factors should not depend on fp32 round-off.
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose kept fraction of sum(S^2) reaches ``energy`` (1e-12 absorbs round-off)."""
    kept = torch.cumsum(s.square(), 0) / s.square().sum().clamp(min=torch.finfo(torch.float64).tiny)
    target = torch.tensor(energy - 1e-12, dtype=kept.dtype)
    return min(s.numel(), int(torch.searchsorted(kept, target)) + 1)


def _choose_rank(config: LowRankConfig, s: torch.Tensor, shape: tuple[int, int], bias: int, rank: int | None) -> int:
    full = s.numel()
    if rank is not None:
        return min(rank, full)
    if config.rank is not None:
        return min(config.rank, full)
    if config.param_ratio is not None:
        out_f, fan_in = shape
        budget = config.param_ratio * (out_f * fan_in + bias) - bias  # the bias stays, whole
        return max(1, min(full, int(budget // (out_f + fan_in))))
    return _energy_rank(s, config.energy)


def _plan_one(name: str, layer: nn.Module, config: LowRankConfig, rank: int | None) -> LowRankPlan:
    matrix = _matrix(layer)
    out_f, fan_in = matrix.shape
    s = torch.linalg.svdvals(matrix.double())
    bias = 0 if layer.bias is None else layer.bias.numel()
    r = _choose_rank(config, s, (out_f, fan_in), bias, rank)
    kept = float(s[:r].square().sum() / s.square().sum()) if s.square().sum() > 0 else 1.0
    before, after = out_f * fan_in + bias, r * (out_f + fan_in) + bias
    skipped = "would not be smaller" if config.only_if_smaller and after >= before else ""
    return LowRankPlan(name, r, s.numel(), kept, before, after, skipped)


def plan_lowrank(
    model: nn.Module, config: LowRankConfig, *, ranks: Mapping[str, int] | None = None
) -> dict[str, LowRankPlan]:
    """Per selected layer, the rank ``config`` (or ``ranks[name]``, which overrides it) gives. Pure."""
    _check_call(model, config, "plan_lowrank")
    layers = select_layers(
        model, op_types=config.op_types, op_names=config.op_names, exclude_op_names=config.exclude_op_names
    )
    if ranks is not None and not isinstance(ranks, Mapping):
        raise ConfigError(f"ranks must map layer names to ranks, e.g. {{'fc1': 16}}, got {ranks!r}")
    ranks = dict(ranks or {})
    for name, rank in ranks.items():
        check_number(rank, f"ranks[{name!r}]", low=1, integer=True)
    for name, layer in layers.items():
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
            raise ConfigError(f"layer {name!r} holds NaN or infinite weights, which have no SVD; fix the model or "
                              "exclude the layer with exclude_op_names")
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise ConfigError(f"ranks given for layers the config does not select: {unknown}; selected: {list(layers)}")
    return {name: _plan_one(name, layer, config, ranks.get(name)) for name, layer in layers.items()}


def _factor_layers(layer: nn.Module, rank: int, svd: tuple[torch.Tensor, ...] | None = None) -> nn.Sequential:
    u, s, vh = svd if svd is not None else _svd(_matrix(layer))
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).to(layer.weight.dtype)  # (r, fan_in): sqrt(S) V^T
    second_w = (u[:, :rank] * root[None, :]).to(layer.weight.dtype)  # (out, r): U sqrt(S)
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, has_bias)
    else:
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=has_bias)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))  # (r, in, kh, kw) for a conv
        second.weight.copy_(second_w.reshape(second.weight.shape))  # (out, r, 1, 1) for a conv
        if has_bias:
            second.bias.copy_(layer.bias)
    pair = nn.Sequential(first, second).to(layer.weight.device)
    return pair.train(layer.training)


def factorize_(model: nn.Module, config: LowRankConfig, *, ranks: Mapping[str, int] | None = None) -> None:
    """Replace each selected layer by its two low-rank factors (in place; skipped layers stay as they are).
    Every factor pair is computed before any layer is replaced."""
    plans = plan_lowrank(model, config, ranks=ranks)
    new = {n: _factor_layers(model.get_submodule(n), p.rank) for n, p in plans.items() if not p.skipped}
    for name, pair in new.items():
        model.set_submodule(name, pair)
    done = dict(getattr(model, LOWRANK_ATTR, None) or {})
    done.update({name: plans[name].rank for name in new})
    setattr(model, LOWRANK_ATTR, done)


def factorized_layers(model: nn.Module) -> dict[str, int]:
    """``{layer name: rank}`` of the layers :func:`factorize_` replaced (empty for other models)."""
    return dict(getattr(model, LOWRANK_ATTR, None) or {})


def _relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).norm() / ref.norm().clamp(min=1e-12))


def lowrank_sensitivity(
    model: nn.Module,
    example_inputs: Any,
    config: LowRankConfig,
    *,
    energies: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
) -> dict[str, list[tuple[int, float]]]:
    """For each layer ``config`` selects and each kept energy: ``(rank, relative output error)`` when only
    that layer is factorized, in order of increasing rank, ending with the full rank. Pure (works on a copy,
    in eval mode).

    The error is ``|f(x) - f_layer(x)| / |f(x)|`` on ``example_inputs``; :func:`ranks_for_tolerance` turns
    the table into per-layer ranks for ``factorize_(model, config, ranks=...)``.
    """
    _check_call(model, config, "lowrank_sensitivity")
    if isinstance(energies, (str, bytes)) or not all(_number(e) and 0 < e <= 1 for e in energies):
        raise ConfigError(f"energies must be kept fractions of sum(S^2) in (0, 1], e.g. (0.8, 0.9), got {energies!r}")
    check_finite_inputs(example_inputs, "lowrank_sensitivity's example_inputs")
    work = copy.deepcopy(model).eval()
    table: dict[str, list[tuple[int, float]]] = {}
    with torch.no_grad():
        ref = run_model(work, example_inputs, "lowrank_sensitivity")
        for name in plan_lowrank(work, config):
            original = work.get_submodule(name)
            svd = _svd(_matrix(original))  # one SVD per layer, sliced for every rank
            ranks = sorted({_energy_rank(svd[1], e) for e in energies} | {svd[1].numel()})
            rows = []
            for rank in ranks:
                work.set_submodule(name, _factor_layers(original, rank, svd))
                rows.append((rank, _relative_error(ref, call_model(work, example_inputs))))
            work.set_submodule(name, original)
            table[name] = rows
    return table


def ranks_for_tolerance(table: Mapping[str, list[tuple[int, float]]], tolerance: float) -> dict[str, int]:
    """The smallest measured rank per layer whose output error is at most ``tolerance``. A layer that needs
    its full rank gets it, and ``factorize_`` then leaves it dense (factorizing would not make it smaller).

    >>> ranks_for_tolerance({"fc": [(4, 0.3), (8, 0.05), (16, 0.0)]}, 0.1)
    {'fc': 8}
    """
    if not (_number(tolerance) and tolerance > 0):
        raise ConfigError(f"tolerance must be a relative error > 0 (e.g. 0.05), got {tolerance!r}")
    return {name: min((r for r, err in rows if err <= tolerance), default=max(r for r, _ in rows))
            for name, rows in table.items()}
