"""Sparsity schedules: a registered function from training progress to the share of the final sparsity.

A :class:`Schedule` says *when* to prune: nothing before ``start`` (a warm-up for untrained models),
then a pruning step every ``every`` steps until ``end``, where the final sparsity is reached::

    >>> from slimtorch.prune.schedule import Schedule
    >>> agp = Schedule(kind="agp", start=0, end=4)
    >>> [round(agp.sparsity(step, 0.8), 4) for step in range(6)]
    [0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8]
    >>> [Schedule(kind="linear", start=2, end=6, every=2).sparsity(s, 0.8) for s in range(8)]
    [0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.8, 0.8]

Registered kinds (``fn(progress) -> fraction``, both in [0, 1]): ``one_shot`` (all at ``start``),
``linear``, ``agp`` (Zhu & Gupta 2017's cubic: fast at first, slow near the end; alias ``cubic``),
``exponential`` (keep ratio shrinks geometrically, as lottery-ticket rounds do). Register your own
with ``@register_schedule("name")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from slimtorch.errors import ConfigError

__all__ = ["SCHEDULES", "Schedule", "register_schedule"]

#: ``fn(progress, final) -> sparsity``: the sparsity reached at ``progress`` in [0, 1] towards ``final``.
ScheduleFn = Callable[[float, float], float]
SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[ScheduleFn], ScheduleFn]:
    """Register ``fn(progress, final) -> sparsity`` (0 at progress 0, ``final`` at progress 1)."""

    def deco(fn: ScheduleFn) -> ScheduleFn:
        for key in (name, *aliases):
            SCHEDULES[key] = fn
        return fn

    return deco


@register_schedule("one_shot", aliases=("oneshot", "constant"))
def one_shot(progress: float, final: float) -> float:
    """Everything at once."""
    return final


@register_schedule("linear")
def linear(progress: float, final: float) -> float:
    """Equal steps (NNI's LinearPruner)."""
    return final * progress


@register_schedule("agp", aliases=("cubic",))
def agp(progress: float, final: float) -> float:
    """Automated gradual pruning: ``final * (1 - (1 - progress)^3)``."""
    return final * (1.0 - (1.0 - progress) ** 3)


@register_schedule("exponential", aliases=("geometric",))
def exponential(progress: float, final: float) -> float:
    """The kept share shrinks by the same factor each step: ``1 - (1 - final)^progress``."""
    return 1.0 - (1.0 - final) ** progress


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When to prune and how much. Steps are whatever you count (batches, epochs, rounds).

    Before ``start``: nothing is pruned (warm-up). At ``start + k * every`` up to ``end``: a pruning step
    reaching ``fn((step - start) / (end - start), final)``; from ``end`` on, the final sparsity. A
    ``one_shot`` schedule prunes everything at ``start`` (``end`` may equal ``start``).
    """

    kind: str = "agp"
    start: int = 0
    end: int = 1
    every: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.kind!r}; available: {sorted(SCHEDULES)}")
        for name in ("start", "end", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"schedule {name!r} must be an integer >= 0, got {value!r}")
        if self.every < 1:
            raise ConfigError(f"schedule 'every' must be >= 1, got {self.every}")
        if self.end < self.start or (self.end == self.start and SCHEDULES[self.kind] is not one_shot):
            raise ConfigError(
                f"schedule needs end > start, got start={self.start}, end={self.end}; "
                "use kind='one_shot' to prune everything at once"
            )

    def progress(self, step: int) -> float:
        """Progress in [0, 1] reached at ``step`` (it moves only on pruning steps)."""
        if step < self.start:
            return 0.0
        if self.end == self.start:
            return 1.0
        done = (min(step, self.end) - self.start) // self.every * self.every
        return 1.0 if step >= self.end else done / (self.end - self.start)

    def sparsity(self, step: int, final: float) -> float:
        """The sparsity to have at ``step`` on the way to ``final``."""
        if not (0.0 <= final <= 1.0) or math.isnan(final):
            raise ConfigError(f"final sparsity must be in [0, 1], got {final!r}")
        if step < self.start:
            return 0.0
        return SCHEDULES[self.kind](self.progress(step), final)

    def is_pruning_step(self, step: int) -> bool:
        """True at ``start``, every ``every`` steps after it, and at ``end``."""
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.every == 0

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "start": self.start, "end": self.end, "every": self.every}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Schedule:
        unknown = set(data) - {"kind", "start", "end", "every"}
        if unknown:
            raise ConfigError(f"unknown schedule keys {sorted(unknown)}; allowed: kind, start, end, every")
        return cls(**data)  # type: ignore[arg-type]
