"""What the NNI-style pruners, quantizers and speed-up share: NNI's nested view of slimtorch's flat masks,
and the one check of the evaluator that stands where NNI takes a trainer."""

from __future__ import annotations

from typing import Any

import torch

from slimtorch.errors import ConfigError
from slimtorch.prune.loop import Evaluator

__all__ = ["NNIMasks", "check_evaluator"]


class NNIMasks(dict):
    """Flat masks ``{"fc1.weight": mask}`` that also answer NNI's nested lookup ``masks["fc1"]["weight"]``."""

    def _nested(self, module_name: str) -> dict[str, torch.Tensor]:
        prefix = module_name + "."
        return {k[len(prefix) :]: v for k, v in super().items() if k.startswith(prefix) and "." not in k[len(prefix) :]}

    def __getitem__(self, key: str) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        nested = self._nested(key)
        if nested:
            return nested
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and bool(self._nested(key)))


def check_evaluator(evaluator: Any) -> Evaluator:
    """Where NNI takes a trainer (or a ``TorchEvaluator``), slimtorch's NNI names take one
    :class:`~slimtorch.prune.loop.Evaluator`; checked when the pruner or quantizer is made."""
    if not isinstance(evaluator, Evaluator):
        raise ConfigError(f"evaluator must be a slimtorch Evaluator (training data, loss, optimizer settings), got "
                          f"{type(evaluator).__name__}; pass Evaluator(train_data=loader)")
    return evaluator
