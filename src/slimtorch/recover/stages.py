"""The step runner: steps run on a model in order, measured after each. Recipes (and so the demo), the combined
pipeline and :func:`prune_and_distill_` all run their stages here, and share the steps themselves.

A step is a function of the :class:`Work` (the model being transformed and what the steps share) that changes
it in place and returns what it reports (a :class:`~slimtorch.recover.FitResult`, a note...). The steps every
workflow has: :func:`prune_step_` (apply masks; the first one keeps the unpruned model as the teacher),
:func:`compact_step_` and :func:`distill_` (a :class:`~slimtorch.recover.Distiller` from the teacher plugged into
:func:`~slimtorch.recover.fit`).

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import compute_masks
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> x = torch.randn(3, 4)
    >>> masks = compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)
    >>> seen = []
    >>> work = Work(model=net, example_inputs=x)
    >>> _ = run_steps(work, [("prune", lambda w: prune_step_(w, masks)), ("compact", compact_step_)],
    ...               measure=lambda name, w, out: seen.append((name, w.model[0].out_features)), initial="dense")
    >>> seen, work.teacher[0].out_features
    ([('dense', 8), ('prune', 8), ('compact', 4)], 8)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from slimtorch.compact import compact_
from slimtorch.masks import apply_masks_, get_masks
from slimtorch.recover.config import TrainConfig
from slimtorch.recover.distill import DistillConfig, Distiller
from slimtorch.recover.trainer import FitResult, fit

__all__ = ["Step", "Work", "compact_step_", "distill_", "prune_and_distill_", "prune_step_", "run_steps"]


@dataclass(kw_only=True)
class Work:
    """What the steps share: the model being transformed and what is known about it."""

    model: nn.Module
    example_inputs: Any = None  # one batch: tracing, compaction's check
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the last prune step's
    teacher: nn.Module | None = None  # the model before the first prune step (the default teacher)


Step = Callable[[Work], Any]
Measure = Callable[[str, Work, Any], None]


def run_steps(work: Work, steps: Iterable[tuple[str, Step]], *, measure: Measure | None = None,
              initial: str | None = None, copies: bool = False) -> list[Any]:
    """Run every ``(name, step)`` on ``work`` in order and return what each returned. ``measure(name, work,
    returned)`` runs after each, and first on the model as given with ``initial`` as its name (returned: None).
    ``copies``: each step works on a copy of the model, so that the model measured after every step stays as
    it was."""
    if measure is not None and initial is not None:
        measure(initial, work, None)
    outcomes = []
    for name, step in steps:
        if copies:
            work.model = copy.deepcopy(work.model)
        outcomes.append(step(work))
        if measure is not None:
            measure(name, work, outcomes[-1])
    return outcomes


def prune_step_(work: Work, masks: Mapping[str, torch.Tensor]) -> None:
    """Apply ``masks`` to the model (masked: same size, zeros); the first prune step keeps a copy of the model as
    it was, the default teacher."""
    if work.teacher is None:
        work.teacher = copy.deepcopy(work.model)
    apply_masks_(work.model, masks)
    work.masks = masks  # (a Masks from compute_masks keeps its trace for compaction)


def compact_step_(work: Work, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Compact the model (really smaller), checked on ``work.example_inputs``; ``masks``: those on the model now
    (after a compaction, a second round's are at the compacted size)."""
    compact_(work.model, masks if masks is not None else get_masks(work.model), example_inputs=work.example_inputs)


def distill_(
    model: nn.Module,
    teacher: nn.Module,
    train_data: Dataset,
    config: TrainConfig,
    *,
    distill: DistillConfig | None = None,
    example_inputs: Any = None,
    eval_data: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    context: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` with :func:`~slimtorch.recover.fit` on a :class:`~slimtorch.recover.Distiller` from
    ``teacher`` (``example_inputs`` sizes its feature projections); the other arguments are ``fit``'s. The
    distiller's hooks are removed afterwards."""
    distiller = Distiller(teacher, model, distill, example_inputs=example_inputs)
    try:
        return fit(model, train_data, config, loss_fn=distiller, eval_data=eval_data, checkpoint=checkpoint,
                   resume=resume, context=context)
    finally:
        distiller.close()


def prune_and_distill_(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    train_data: Dataset,
    config: TrainConfig,
    *,
    distill: DistillConfig | None = None,
    eval_data: Dataset | None = None,
    example_inputs: torch.Tensor | None = None,
) -> FitResult:
    """Prune ``model`` with ``masks`` and recover it by distillation from its unpruned self (the seeds'
    recipe: the unpruned model is the teacher). With ``example_inputs`` the model is also compacted
    (really made smaller) before training. Returns the :class:`~slimtorch.recover.FitResult`.

        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> from slimtorch import compute_masks
        >>> from slimtorch.recover import TrainConfig
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> masks = compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}])
        >>> result = prune_and_distill_(net, masks, data, TrainConfig(epochs=1, batch_size=8))
        >>> int((net[0].weight.abs().sum(dim=1) == 0).sum()), result.steps
        (8, 4)
    """
    work = Work(model=model, example_inputs=example_inputs)
    steps: list[tuple[str, Step]] = [("prune", lambda w: prune_step_(w, masks))]
    if example_inputs is not None:
        steps.append(("compact", lambda w: compact_step_(w, masks)))
    steps.append(("distill", lambda w: _distill_teacher(w, train_data, config, distill, eval_data)))
    return run_steps(work, steps)[-1]


def _distill_teacher(work: Work, train_data: Dataset, config: TrainConfig, distill: DistillConfig | None,
                     eval_data: Dataset | None) -> FitResult:
    assert work.teacher is not None  # (kept by the prune step)
    return distill_(work.model, work.teacher, train_data, config, distill=distill,
                    example_inputs=work.example_inputs, eval_data=eval_data)

