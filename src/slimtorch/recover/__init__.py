"""Recovery after pruning: the one training loop (fine-tuning, distillation, with checkpoints, exact resume and
DDP) and the step runner workflows run their stages on."""

from slimtorch.recover.distill import CausalLMDistiller, DistillConfig, Distiller, distill_loss
from slimtorch.recover.stages import prune_and_distill_
from slimtorch.recover.trainer import EpochStats, FitResult, TrainConfig, evaluate_accuracy, fit

__all__ = [
    "CausalLMDistiller",
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
