"""NNI's compression names, so code written for NNI runs with its import changed.

Replace the ``nni`` package in the import by ``slimtorch.compat.nni``:

* NNI 2 (the book): ``from nni.compression.pytorch import pruning, speedup`` becomes
  ``from slimtorch.compat.nni import pruning, speedup``; ``nni.compression.pytorch.pruning`` becomes
  ``slimtorch.compat.nni.pruning`` (and ``.speedup``).
* NNI 3: ``from nni.compression.pruning import L1NormPruner`` becomes
  ``from slimtorch.compat.nni.compression.pruning import L1NormPruner``; the same for
  ``nni.compression.speedup`` (``ModelSpeedup``) and ``nni.compression.quantization`` (``QATQuantizer``, ...).

Every name is also importable from ``slimtorch.compat.nni`` itself.
"""

from slimtorch.compat.nni import pruning, quantization, speedup
from slimtorch.compat.nni.common import NNIMasks
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
from slimtorch.compat.nni.quantization import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    PtqQuantizer,
    QATQuantizer,
)
from slimtorch.compat.nni.speedup import ModelSpeedup

__all__ = [
    "AGPPruner",
    "ActivationAPoZRankPruner",
    "ActivationMeanRankPruner",
    "BNNQuantizer",
    "DoReFaQuantizer",
    "FPGMPruner",
    "L1NormPruner",
    "L2NormPruner",
    "LevelPruner",
    "LinearPruner",
    "LotteryTicketPruner",
    "LsqQuantizer",
    "ModelSpeedup",
    "MovementPruner",
    "NNIMasks",
    "PtqQuantizer",
    "QATQuantizer",
    "SlimPruner",
    "TaylorFOWeightPruner",
    "TaylorPruner",
    "TaylorWeightPruner",
    "pruning",
    "quantization",
    "speedup",
]
