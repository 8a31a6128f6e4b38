"""Lottery tickets: iterative magnitude pruning with rewinding of the surviving weights.

Frankle & Carbin (2019) train, prune the smallest weights, reset the survivors to their *initial*
values and train again, over several rounds; Frankle et al. (2020) rewind to the weights of an early
training step instead, which holds up on larger networks. Round ``r`` of ``R`` reaches the sparsity
``1 - (1 - final)^(r/R)`` (the same share of the remaining weights each round)::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.lottery import LotteryTicket
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> ticket = LotteryTicket(net, [{"op_types": ["Linear"], "sparse_ratio": 0.75}], rounds=2)
    >>> init = net[0].weight.detach().clone()
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(3.0)      # stands for training
    >>> ticket.next_round_()                 # prune 50% and rewind the rest
    >>> kept = net[0].weight != 0
    >>> int(kept.sum()), torch.equal(net[0].weight[kept], init[kept])
    (32, True)

The optimizer should be rebuilt after each rewind (its moments belong to the weights before it);
:meth:`LotteryTicket.run_` does that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_example_finite
from slimtorch.config import PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.masks import MASK_SUFFIX, apply_masks_, get_masks
from slimtorch.prune.criteria import Criterion, criteria_needs, get_criterion
from slimtorch.prune.iterative import force_pruned, scale_targets, weight_sparsity
from slimtorch.prune.loop import Callback, Evaluator
from slimtorch.prune.pruner import masks_from_keep, plan_layers, unit_keep
from slimtorch.prune.schedule import exponential
from slimtorch.select import select_modules

__all__ = ["LotteryTicket"]


class LotteryTicket(Callback):
    """Finds a sparse subnetwork that trains well from its rewind point.

    Args:
        model: pruned and rewound in place.
        config_list: the final sparsities, reached after ``rounds`` rounds.
        rounds: pruning rounds (each followed by rewinding and retraining).
        criterion: the pruning criterion (magnitude in the original work; any weight criterion works).
        rewind_step: 0 rewinds to the weights as they are now (initialisation); k > 0 records them after
            the k-th training step (count steps with :meth:`step` / ``after_step``).
        example_inputs: a batch for the dependency graph when pruning whole channels.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any] | PruneTarget],
        *,
        rounds: int,
        criterion: str | Criterion = "magnitude",
        rewind_step: int = 0,
        example_inputs: Any = None,
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ConfigError(f"rewind_step must be an integer >= 0, got {rewind_step!r}")
        self.model = model
        self.targets = scale_targets(parse_config_list(config_list), lambda s: s)
        select_modules(model, self.targets)
        self.criterion = get_criterion(criterion)
        if needs := criteria_needs(self.targets, self.criterion):
            raise ConfigError(
                f"lottery tickets rank the trained weights; the criteria of this config list need statistics "
                f"{list(needs)}: use weight criteria such as 'magnitude' or 'l1'"
            )
        if example_inputs is not None:
            check_example_finite(example_inputs, "LotteryTicket")
        self.rounds = rounds
        self.rewind_step = rewind_step
        self.example_inputs = example_inputs
        self.steps = 0
        self.round = 0
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.history: list[dict[str, float]] = []
        self.rewind_state: dict[str, torch.Tensor] | None = None
        if rewind_step == 0:
            self.save_rewind_point_()

    def save_rewind_point_(self) -> None:
        """Record the current parameters and buffers (mask buffers aside) as the rewind point."""
        masks = {name + MASK_SUFFIX for name in get_masks(self.model)}
        self.rewind_state = {
            k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in masks
        }

    def step(self) -> None:
        """Count one training step; records the rewind point after step ``rewind_step``."""
        self.steps += 1
        if self.steps == self.rewind_step:
            self.save_rewind_point_()

    def after_step(self, batch: Any) -> None:
        self.step()

    def next_round_(self) -> None:
        """Prune to the next round's sparsity (pruned weights stay pruned), then rewind the survivors."""
        if self.rewind_state is None:
            raise ConfigError(f"no rewind point yet: train {self.rewind_step} steps (calling step()) first")
        if self.round >= self.rounds:
            raise ConfigError(f"all {self.rounds} rounds are done; the ticket is at its final sparsity")
        self._check_unchanged()
        self.round += 1
        progress = self.round / self.rounds
        targets = scale_targets(self.targets, lambda s: exponential(progress, s))
        plans = plan_layers(self.model, targets, self.criterion)
        plans = [force_pruned(p, self.masks) for p in plans]
        masks = masks_from_keep(self.model, plans, unit_keep(plans), example_inputs=self.example_inputs)
        self._rewind_()
        apply_masks_(self.model, masks)
        self.masks = masks
        self.sparsity = weight_sparsity(masks, plans)

    def _check_unchanged(self) -> None:
        """The rewind point must fit the model (same tensors, same shapes): a model compacted or changed in
        between cannot be rewound, and the masks of the last round would no longer fit it either."""
        assert self.rewind_state is not None
        state = self.model.state_dict()
        for key, value in self.rewind_state.items():
            now = state.get(key)
            if now is None or now.shape != value.shape:
                shown = "is gone" if now is None else f"is {tuple(now.shape)} now, {tuple(value.shape)} then"
                raise ConfigError(f"the model changed since the rewind point: {key!r} {shown}. A lottery ticket "
                                  "rewinds the same weights each round; compact the final ticket, after the last "
                                  "round, not between rounds")

    @torch.no_grad()
    def _rewind_(self) -> None:
        assert self.rewind_state is not None
        state = self.model.state_dict(keep_vars=True)
        for key, value in self.rewind_state.items():
            state[key].copy_(value)  # in place: parameter objects (and optimizers holding them) survive

    def run_(self, evaluator: Evaluator, *, epochs_per_round: int = 1) -> None:
        """Train, prune and rewind for every round, then train the final ticket; each training uses a
        fresh optimizer. ``self.history`` gets the sparsity (and metric, with eval data) per training."""
        for round_ in range(self.rounds + 1):
            evaluator.train_(self.model, epochs=epochs_per_round, callbacks=[self] if round_ == 0 else ())
            if self.rewind_state is None:
                raise ConfigError(
                    f"rewind_step={self.rewind_step} was not reached in the first {epochs_per_round} epoch(s); "
                    "choose a smaller rewind_step"
                )
            row = {"round": float(round_), "sparsity": self.sparsity}
            if evaluator.eval_data is not None:
                row["metric"] = evaluator.evaluate(self.model)
            self.history.append(row)
            if round_ < self.rounds:
                self.next_round_()
