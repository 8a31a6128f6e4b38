"""Recovery after pruning: fine-tuning and distillation, with checkpoints, exact resume and DDP."""

from slimtorch.recover.distill import DistillConfig, Distiller, distill_loss, prune_and_distill_
from slimtorch.recover.trainer import EpochStats, FitResult, TrainConfig, evaluate_accuracy, fit

__all__ = [
    "DistillConfig",
    "Distiller",
    "EpochStats",
    "FitResult",
    "TrainConfig",
    "distill_loss",
    "evaluate_accuracy",
    "fit",
    "prune_and_distill_",
]
