"""``nni.compression.pruning`` (NNI 3): the same pruners as :mod:`slimtorch.compat.nni.pruning`."""

from slimtorch.compat.nni.pruning import (
    ActivationAPoZRankPruner,
    ActivationMeanRankPruner,
    AGPPruner,
    FPGMPruner,
    L1NormPruner,
    L2NormPruner,
    LevelPruner,
    LinearPruner,
    LotteryTicketPruner,
    MovementPruner,
    SlimPruner,
    TaylorFOWeightPruner,
    TaylorPruner,
    TaylorWeightPruner,
)

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
    "SlimPruner",
    "TaylorFOWeightPruner",
    "TaylorPruner",
    "TaylorWeightPruner",
]
