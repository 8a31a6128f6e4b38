"""Criteria: what makes a unit of weights important. One registered function per criterion.

A criterion maps the weights of one layer, cut into units by the granularity (a ``(num_units,
unit_size)`` matrix), and a :class:`ScoreContext` to one score per unit; the lowest scores are pruned::

    >>> import torch
    >>> from slimtorch.prune.criteria import get_criterion
    >>> l1 = get_criterion("l1")
    >>> l1.fn(torch.tensor([[1.0, -2.0], [0.5, 0.5]]), None)
    tensor([3., 1.])

Register a new one with ``@register_criterion("name", default_granularity="fine")``.

Weight criteria need only the weights: ``l1``, ``l2``, ``magnitude`` (alias ``level``), ``fpgm``,
``random``. Data-driven criteria read per-layer statistics (``ctx.stats``, collected by
:mod:`slimtorch.prune.stats`): ``gradient``, ``hybrid``, ``taylor``, ``movement``, ``wanda``, ``apoz``,
``mean_activation``; ``bn_scale`` (alias ``slim``) reads a normalisation layer's scales.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtorch.config import Granularity, PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.prune.granularity import UnitView
from slimtorch.prune.stats import expand_input_stat

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "criteria_needs", "get_criterion", "register_criterion"]


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may look at besides the weights.

    ``stats`` holds per-layer statistics collected from data (e.g. ``"grad"``: the weight's gradient,
    weight-shaped); ``view.units(t)`` cuts any weight-shaped tensor the same way as the weights.
    """

    name: str
    module: nn.Module
    view: UnitView
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    target: PruneTarget | None = None  # the config entry governing the layer (its thresholds, say)

    def stat(self, key: str, criterion: str) -> torch.Tensor:
        """A statistic by name, or a clear error saying how to provide it."""
        if key not in self.stats:
            raise ConfigError(
                f"criterion {criterion!r} needs the {key!r} statistic of layer {self.name!r}; "
                "collect it from data first (see slimtorch.prune.stats) and pass it as stats=..."
            )
        return self.stats[key]


CriterionFn = Callable[[torch.Tensor, ScoreContext], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: CriterionFn
    default_granularity: Granularity
    needs: tuple[str, ...] = ()
    doc: str = ""
    size_power: float = 1.0
    thresholds: bool = False  # reads an entry's weight_threshold + gradient_threshold (scores >= 1 are kept)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str,
    *,
    default_granularity: str = "fine",
    needs: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    size_power: float = 1.0,
    thresholds: bool = False,
) -> Callable[[CriterionFn], CriterionFn]:
    """Register ``fn(units, ctx) -> scores`` under ``name`` (and aliases).

    ``needs`` names the statistics the criterion reads from ``ctx.stats``. ``size_power`` says how a
    score grows with the unit size (1: a sum over the unit's weights, 0: a mean or a per-unit quantity,
    0.5: a Euclidean norm); global ranking divides scores by ``unit_size ** size_power`` so that units
    of different sizes in different layers compare fairly. ``thresholds``: the criterion reads an entry's
    ``weight_threshold`` and ``gradient_threshold`` (``ctx.target``) and scores a unit >= 1 exactly when
    it is to be kept (the hybrid criterion); other criteria refuse such an entry.
    """

    def deco(fn: CriterionFn) -> CriterionFn:
        gran = Granularity.parse(default_granularity)
        assert gran is not None
        doc = next(iter((fn.__doc__ or "").strip().splitlines()), "")  # first line; functions may have none
        crit = Criterion(name, fn, gran, needs, doc, size_power, thresholds)
        for key in (name, *aliases):
            CRITERIA[key] = crit
        return fn

    return deco


def get_criterion(name: str | Criterion) -> Criterion:
    """Look a criterion up by name; an unknown name is a :class:`~slimtorch.errors.ConfigError`."""
    if isinstance(name, Criterion):
        return name
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; available: {sorted(CRITERIA)}")
    return CRITERIA[name]


def criteria_needs(config_list: Sequence[Mapping[str, Any] | PruneTarget], default: str | Criterion) -> tuple[str, ...]:
    """The statistics that scoring ``config_list`` needs: those of each entry's own ``criterion`` and of
    ``default`` for the entries without one (what to pass as ``keys=`` to ``collect_stats``).

    >>> criteria_needs([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "criterion": "taylor"},
    ...                 {"op_types": ["Linear"], "sparse_ratio": 0.5}], "wanda")
    ('grad_sq', 'input_norm')
    """
    names = [t.criterion or default for t in parse_config_list(config_list) if not t.exclude]
    return tuple(dict.fromkeys(k for n in names for k in get_criterion(n).needs))


@register_criterion("l1", default_granularity="out_channel", aliases=("l1_norm",))
def l1(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """L1 norm of each unit (sum of absolute weights); as a channel criterion this is NNI's L1NormPruner."""
    return units.abs().sum(dim=1)


@register_criterion("l2", default_granularity="out_channel", aliases=("l2_norm",), size_power=0.5)
def l2(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """L2 norm of each unit."""
    return torch.linalg.vector_norm(units, ord=2, dim=1)


@register_criterion("magnitude", default_granularity="fine", aliases=("level",), size_power=0.0)
def magnitude(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Mean absolute weight of each unit (a single weight's magnitude at fine granularity): level pruning."""
    return units.abs().mean(dim=1)


@register_criterion("fpgm", default_granularity="out_channel", size_power=0.5)
def fpgm(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Sum of L2 distances from each unit to all others (He et al. 2019, "Filter Pruning via Geometric
    Median"): units near the geometric median are the most replaceable and score lowest."""
    flat = units.double()
    return torch.cdist(flat[None], flat[None])[0].sum(dim=1).to(units.dtype)


@register_criterion("random", default_granularity="fine", size_power=0.0)
def random(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Uniform random scores: the baseline every other criterion must beat."""
    gen = ctx.generator if ctx is not None else None
    return torch.rand(units.shape[0], generator=gen, dtype=torch.float64).to(units.dtype)


# Data-driven criteria. Statistics are weight-shaped (cut into units by ``ctx.view.units``) or
# per-channel vectors; see slimtorch.prune.stats for how each is collected.

_TINY = 1e-12


def _unit_stat(ctx: ScoreContext, key: str, criterion: str) -> torch.Tensor:
    """A weight-shaped statistic cut into the same units as the weights: (num_units, unit_size)."""
    return ctx.view.units(ctx.stat(key, criterion).to(torch.float32))


def _channel_stat(ctx: ScoreContext, key: str, criterion: str) -> torch.Tensor:
    """A per-output-channel statistic, checked to line up one-to-one with the units."""
    stat = ctx.stat(key, criterion).to(torch.float32)
    if ctx.view.granularity.kind != "out_channel" or stat.shape != (ctx.view.num_units,):
        raise ConfigError(
            f"criterion {criterion!r} scores whole output channels, but layer {ctx.name!r} is cut into "
            f"{ctx.view.num_units} {ctx.view.granularity.to_value()!r} units for {stat.numel()} channels; "
            "use granularity 'out_channel'"
        )
    return stat


@register_criterion("gradient", default_granularity="fine", needs=("grad_sq",), size_power=0.0, aliases=("grad",))
def gradient(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Gradient magnitude: mean over the unit of each weight's root-mean-square gradient over the batches
    (with one batch, the mean |dL/dw|); weights the loss barely reacts to go first."""
    return _unit_stat(ctx, "grad_sq", "gradient").sqrt().mean(dim=1)


def _over(value: torch.Tensor, threshold: float) -> torch.Tensor:
    """``value / threshold``, with a threshold of 0 passing everything (+inf)."""
    return value / threshold if threshold > 0 else torch.full_like(value, float("inf"))


@register_criterion("hybrid", default_granularity="fine", needs=("grad_sq",), size_power=0.0, thresholds=True)
def hybrid(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Weight and gradient magnitude together, as the seeds define it: a weight is kept only where
    |w| >= ``weight_threshold`` and |dL/dw| >= ``gradient_threshold`` (two thresholds of the entry; the
    gradient is the RMS over the batches, |dL/dw| for one batch; a unit's values are its means). With a
    sparsity instead, units are ranked by the smaller of mean |w| and gradient, each relative to its layer
    mean, so a unit survives only if large in both."""
    weight = units.abs().mean(dim=1)
    grad = _unit_stat(ctx, "grad_sq", "hybrid").sqrt().mean(dim=1)
    target = ctx.target
    if target is not None and target.hybrid_thresholds:
        assert target.weight_threshold is not None and target.gradient_threshold is not None
        # (float64: value / threshold >= 1 exactly where value >= threshold)
        return torch.minimum(_over(weight.double(), target.weight_threshold),
                             _over(grad.double(), target.gradient_threshold))
    return torch.minimum(weight / weight.mean().clamp_min(_TINY), grad / grad.mean().clamp_min(_TINY))


@register_criterion("taylor", default_granularity="out_channel", needs=("grad_sq",), aliases=("taylor_fo", "taylorfo"))
def taylor(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor importance: sum over the unit of (w * dL/dw)^2, averaged over the batches (the
    squared loss change of zeroing each weight; Molchanov et al. 2019, NNI's TaylorFOWeightPruner)."""
    return (units.pow(2) * _unit_stat(ctx, "grad_sq", "taylor")).sum(dim=1)


@register_criterion("movement", default_granularity="fine", needs=("movement",))
def movement(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Movement (Sanh et al. 2020): -sum over training steps of w * dL/dw, summed over the unit; weights
    that fine-tuning moves towards zero score lowest. Track it during fine-tuning with a StatsTracker."""
    return _unit_stat(ctx, "movement", "movement").sum(dim=1)


@register_criterion("wanda", default_granularity="fine", needs=("input_norm",))
def wanda(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |w| times the L2 norm of the input feature it multiplies, over the
    calibration data; summed over the unit."""
    norm = expand_input_stat(ctx.module, ctx.stat("input_norm", "wanda").to(torch.float32), ctx.view.shape)
    return (units.abs() * ctx.view.units(norm)).sum(dim=1)


@register_criterion("apoz", default_granularity="out_channel", needs=("apoz",), size_power=0.0)
def apoz(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """1 - APoZ (Hu et al. 2016): the share of non-zero activations of each output channel over the
    calibration batches; channels whose activations are mostly zero go first."""
    return 1.0 - _channel_stat(ctx, "apoz", "apoz")


@register_criterion("mean_activation", default_granularity="out_channel", needs=("mean_activation",), size_power=0.0)
def mean_activation(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Mean activation of each output channel over the calibration batches (Molchanov et al. 2017)."""
    return _channel_stat(ctx, "mean_activation", "mean_activation")


@register_criterion("bn_scale", default_granularity="out_channel", size_power=0.0, aliases=("slim",))
def bn_scale(units: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of each channel of a normalisation layer (network slimming, Liu et al. 2017). Train with
    :func:`slimtorch.prune.regularize.bn_l1_penalty` first so that unneeded channels' scales shrink."""
    if ctx is not None and len(ctx.view.shape) != 1:
        raise ConfigError(
            f"criterion 'bn_scale' scores the per-channel scales of normalisation layers, but layer {ctx.name!r} "
            f"({type(ctx.module).__name__}) has a {len(ctx.view.shape)}-D weight; select BatchNorm layers, "
            "e.g. op_types ['BatchNorm2d']"
        )
    return units.abs().sum(dim=1)
