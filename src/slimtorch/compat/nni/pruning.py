"""NNI's ``pruning`` module: the pruners, with NNI's names and call pattern.

    from slimtorch.compat.nni import pruning     # was: from nni.compression.pytorch import pruning
    pruner = pruning.L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    _, masks = pruner.compress()       # the model now computes as pruned (same shapes)
    pruner._unwrap_model()             # bake the zeros in, drop the masking hooks

Differences from NNI, on purpose: a config entry that matches nothing is an error (NNI ignores it), and
masks are slimtorch's flat ``{"conv1.weight": mask}`` dict; ``masks["conv1"]["weight"]`` (NNI's nested
form) works too. Where NNI takes a trainer, an optimizer and a loss, the data-driven and scheduled pruners
take one :class:`~slimtorch.prune.loop.Evaluator`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module, check_number
from slimtorch.compat.nni.common import NNIMasks, check_evaluator
from slimtorch.config import Granularity, PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.masks import apply_masks_, remove_masks_
from slimtorch.prune.criteria import get_criterion
from slimtorch.prune.iterative import GradualPruner
from slimtorch.prune.loop import Evaluator
from slimtorch.prune.lottery import LotteryTicket
from slimtorch.prune.pruner import compute_masks
from slimtorch.prune.regularize import SlimmingRegularizer
from slimtorch.prune.schedule import Schedule
from slimtorch.prune.stats import StatsTracker, collect_stats
from slimtorch.select import select_modules

__all__ = [
    "AGPPruner",
    "ActivationAPoZRankPruner",
    "ActivationMeanRankPruner",
    "FPGMPruner",
    "L1NormPruner",
    "L2NormPruner",
    "LevelPruner",
    "LinearPruner",
    "LotteryTicketPruner",
    "MovementPruner",
    "NNIMasks",
    "SlimPruner",
    "TaylorFOWeightPruner",
    "TaylorPruner",
    "TaylorWeightPruner",
]


class _Pruner:
    """Shared shape of the NNI pruners: validate at construction, mask on ``compress()``."""

    criterion = "l1"
    granularity = "out_channel"

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        mode: str = "normal",
        dummy_input: Any = None,
    ) -> None:
        check_module(model, type(self).__name__)
        if mode not in ("normal", "dependency_aware"):
            raise ConfigError(f"mode must be 'normal' or 'dependency_aware', got {mode!r}")
        if mode == "dependency_aware" and dummy_input is None:
            raise ConfigError("mode='dependency_aware' needs dummy_input (a batch the model accepts)")
        self.model = model
        self.config_list = self._with_granularity(parse_config_list(config_list))
        select_modules(model, self.config_list)  # fail now, not at compress(), on a bad config
        self.dummy_input = dummy_input if mode == "dependency_aware" else None
        self.masks: NNIMasks | None = None

    def _with_granularity(self, targets: tuple[PruneTarget, ...]) -> tuple[PruneTarget, ...]:
        default = Granularity.parse(self.granularity)
        return tuple(
            t if t.exclude or t.granularity is not None else dataclasses.replace(t, granularity=default)
            for t in targets
        )

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        """Compute the masks and apply them: the model computes as pruned, shapes unchanged."""
        masks = compute_masks(
            self.model, self.config_list, example_inputs=self.dummy_input, criterion=self.criterion,
            stats=self._stats(),
        )
        apply_masks_(self.model, masks)
        self.masks = NNIMasks(masks)
        return self.model, self.masks

    def _stats(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Per-layer statistics for data-driven criteria (none for weight criteria)."""
        return None

    def unwrap_model(self) -> None:
        """Bake the masks into the weights and remove the masking hooks (NNI's ``_unwrap_model``)."""
        remove_masks_(self.model)

    _unwrap_model = unwrap_model

    def show_pruned_weights(self) -> list[str]:
        """One line per masked parameter: kept / total (what NNI prints)."""
        if self.masks is None:
            raise ConfigError("no masks yet: call compress() first")
        return [f"{k}: kept {int(m.sum())} of {m.numel()}" for k, m in self.masks.items()]


class LevelPruner(_Pruner):
    """Unstructured magnitude pruning: the smallest weights of each layer go."""

    criterion = "magnitude"
    granularity = "fine"


class L1NormPruner(_Pruner):
    """Structured: output channels (filters, neurons) with the smallest L1 norm go."""

    criterion = "l1"


class L2NormPruner(_Pruner):
    """Structured: output channels with the smallest L2 norm go."""

    criterion = "l2"


class FPGMPruner(_Pruner):
    """Structured: output channels closest to the geometric median of their layer go."""

    criterion = "fpgm"


# Pruners that learn from data or prune over time. Where NNI takes a trainer, an optimizer and a loss,
# these take one slimtorch Evaluator (training data, loss, optimizer settings, metric).


class _DataPruner(_Pruner):
    """A one-shot pruner whose criterion reads statistics from ``training_batches`` batches of data."""

    keys: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        evaluator: Evaluator,
        training_batches: int = 16,
        mode: str = "normal",
        dummy_input: Any = None,
    ) -> None:
        super().__init__(model, config_list, mode, dummy_input)
        check_number(training_batches, "training_batches", low=1, integer=True)
        self.evaluator = check_evaluator(evaluator)
        self.training_batches = training_batches

    def _stats(self) -> dict[str, dict[str, torch.Tensor]]:
        batches = list(itertools.islice(iter(self.evaluator.train_data), self.training_batches))
        loss_fn = self.evaluator.loss_fn if "grad_sq" in self.keys else None
        return collect_stats(self.model, batches, keys=self.keys, loss_fn=loss_fn, config_list=self.config_list)


class TaylorFOWeightPruner(_DataPruner):
    """Structured: output channels with the smallest first-order Taylor importance (w * grad)^2 go."""

    criterion = "taylor"
    keys = ("grad_sq",)


#: NNI 3's name (``nni.compression.pruning.TaylorPruner``) and the name seed texts use for the same pruner.
TaylorPruner = TaylorWeightPruner = TaylorFOWeightPruner


class ActivationAPoZRankPruner(_DataPruner):
    """Structured: output channels whose ReLU outputs are most often zero go."""

    criterion = "apoz"
    keys = ("apoz",)


class ActivationMeanRankPruner(_DataPruner):
    """Structured: output channels with the smallest mean ReLU output go."""

    criterion = "mean_activation"
    keys = ("mean_activation",)


class SlimPruner(_Pruner):
    """Network slimming: train ``training_epochs`` with an L1 push (``scale``) on BatchNorm scales, then
    prune the channels with the smallest scales (select BatchNorm layers; ``total_sparsity`` ranks them
    across layers, as in NNI)."""

    criterion = "bn_scale"

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        evaluator: Evaluator,
        training_epochs: int = 1,
        scale: float = 1e-4,
        mode: str = "normal",
        dummy_input: Any = None,
    ) -> None:
        super().__init__(model, config_list, mode, dummy_input)
        check_number(training_epochs, "training_epochs", low=0, integer=True)
        self.evaluator, self.training_epochs = check_evaluator(evaluator), training_epochs
        self.regularizer = SlimmingRegularizer(model, scale)

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        self.evaluator.train_(self.model, epochs=self.training_epochs, callbacks=[self.regularizer])
        return super().compress()


class _ScheduledPruner(_Pruner):
    """Prunes over ``total_iteration`` rounds on a schedule, fine-tuning ``finetune_epochs`` after each."""

    schedule = "linear"

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        evaluator: Evaluator,
        total_iteration: int = 10,
        pruning_algorithm: str = "level",
        finetune_epochs: int = 1,
        dummy_input: Any = None,
    ) -> None:
        self.criterion = get_criterion(pruning_algorithm).name
        self.granularity = get_criterion(pruning_algorithm).default_granularity.to_value()
        super().__init__(model, config_list, "normal", None)
        check_number(finetune_epochs, "finetune_epochs", low=0, integer=True)
        self.evaluator, self.finetune_epochs = check_evaluator(evaluator), finetune_epochs
        schedule = Schedule(kind=self.schedule, start=0, end=total_iteration)
        self.pruner = GradualPruner(
            model, self.config_list, schedule=schedule, criterion=self.criterion, example_inputs=dummy_input
        )

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        self.pruner.run_(self.evaluator, finetune_epochs=self.finetune_epochs)
        self.masks = NNIMasks(self.pruner.masks)
        return self.model, self.masks


class LinearPruner(_ScheduledPruner):
    """Iterative: equal sparsity steps, fine-tuning between them."""

    schedule = "linear"


class AGPPruner(_ScheduledPruner):
    """Iterative: automated gradual pruning (cubic: large steps first, small ones near the end)."""

    schedule = "agp"


class LotteryTicketPruner(_Pruner):
    """Lottery ticket: train, prune, rewind the survivors to their initial weights, over
    ``total_iteration`` rounds; each round prunes the same share of the remaining weights."""

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        evaluator: Evaluator,
        total_iteration: int = 5,
        pruning_algorithm: str = "level",
        finetune_epochs: int = 1,
    ) -> None:
        self.criterion = get_criterion(pruning_algorithm).name
        self.granularity = get_criterion(pruning_algorithm).default_granularity.to_value()
        super().__init__(model, config_list, "normal", None)
        check_number(finetune_epochs, "finetune_epochs", low=0, integer=True)
        self.evaluator, self.finetune_epochs = check_evaluator(evaluator), finetune_epochs
        self.ticket = LotteryTicket(model, self.config_list, rounds=total_iteration, criterion=self.criterion)

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        self.ticket.run_(self.evaluator, epochs_per_round=self.finetune_epochs)
        self.masks = NNIMasks(self.ticket.masks)
        return self.model, self.masks


class MovementPruner(_Pruner):
    """Movement pruning while fine-tuning for ``training_epochs``: sparsity rises on a cubic schedule from
    ``warm_up_step`` to ``cool_down_beginning_step`` (training steps), ranking weights by how fine-tuning
    moves them (towards zero: pruned)."""

    criterion = "movement"
    granularity = "fine"

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        evaluator: Evaluator,
        training_epochs: int,
        warm_up_step: int,
        cool_down_beginning_step: int,
    ) -> None:
        super().__init__(model, config_list, "normal", None)
        check_number(training_epochs, "training_epochs", low=0, integer=True)
        self.evaluator, self.training_epochs = check_evaluator(evaluator), training_epochs
        schedule = Schedule(kind="agp", start=warm_up_step, end=cool_down_beginning_step, every=1)
        self.tracker = StatsTracker(model, keys=("movement",), config_list=self.config_list)
        try:
            # A function (not the tracker itself) as the source: movement keeps accumulating over all of fine-tuning.
            self.pruner = GradualPruner(
                model, self.config_list, schedule=schedule, criterion="movement", stats=self.tracker.stats
            )
        except BaseException:
            self.tracker.close()  # a failure leaves no hook on the model
            raise

    def compress(self) -> tuple[nn.Module, NNIMasks]:
        try:
            self.evaluator.train_(self.model, epochs=self.training_epochs, callbacks=[self.pruner])
        finally:
            self.tracker.close()
        self.pruner.finish_()
        self.masks = NNIMasks(self.pruner.masks)
        return self.model, self.masks
