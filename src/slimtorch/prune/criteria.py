"""Criteria: what makes a unit of weights important. One registered function per criterion.

A criterion maps the weights of one layer, cut into units by the granularity (a ``(num_units,
unit_size)`` matrix), and a :class:`ScoreContext` to one score per unit; the lowest scores are pruned::

    >>> import torch
    >>> from slimtorch.prune.criteria import get_criterion
    >>> l1 = get_criterion("l1")
    >>> l1.fn(torch.tensor([[1.0, -2.0], [0.5, 0.5]]), None)
    tensor([3., 1.])

Register a new one with ``@register_criterion("name", default_granularity="fine")``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtorch.config import Granularity
from slimtorch.errors import ConfigError
from slimtorch.prune.granularity import UnitView

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "get_criterion", "register_criterion"]


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


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str, *, default_granularity: str = "fine", needs: tuple[str, ...] = (), aliases: tuple[str, ...] = ()
) -> Callable[[CriterionFn], CriterionFn]:
    """Register ``fn(units, ctx) -> scores`` under ``name`` (and aliases)."""

    def deco(fn: CriterionFn) -> CriterionFn:
        gran = Granularity.parse(default_granularity)
        assert gran is not None
        crit = Criterion(name, fn, gran, needs, (fn.__doc__ or "").strip().splitlines()[0])
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


@register_criterion("l1", default_granularity="out_channel", aliases=("l1_norm",))
def l1(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """L1 norm of each unit (sum of absolute weights); as a channel criterion this is NNI's L1NormPruner."""
    return units.abs().sum(dim=1)


@register_criterion("l2", default_granularity="out_channel", aliases=("l2_norm",))
def l2(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """L2 norm of each unit."""
    return torch.linalg.vector_norm(units, ord=2, dim=1)


@register_criterion("magnitude", default_granularity="fine", aliases=("level",))
def magnitude(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Mean absolute weight of each unit (a single weight's magnitude at fine granularity): level pruning."""
    return units.abs().mean(dim=1)


@register_criterion("fpgm", default_granularity="out_channel")
def fpgm(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Sum of L2 distances from each unit to all others (He et al. 2019, "Filter Pruning via Geometric
    Median"): units near the geometric median are the most replaceable and score lowest."""
    flat = units.double()
    return torch.cdist(flat[None], flat[None])[0].sum(dim=1).to(units.dtype)


@register_criterion("random", default_granularity="fine")
def random(units: torch.Tensor, ctx: ScoreContext | None) -> torch.Tensor:
    """Uniform random scores: the baseline every other criterion must beat."""
    gen = ctx.generator if ctx is not None else None
    return torch.rand(units.shape[0], generator=gen, dtype=torch.float64).to(units.dtype)
