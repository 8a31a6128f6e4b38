"""The losses the training loop plugs in: ``loss(model, batch) -> scalar tensor``, one per kind of training.

* classification: :func:`cross_entropy` on ``(x, y)`` batches (``fit``'s default);
* distillation from a teacher: :class:`~slimtorch.recover.distill.Distiller`, a ``loss_fn(model, x, y)``, as
  :func:`pair_loss` makes it (any ``loss_fn(model, x, y)``: what :func:`~slimtorch.recover.fit` takes);
* a causal language model's next-token loss: :func:`causal_lm_loss` on batches of token ids, and its
  distillation from the unpruned model: :class:`~slimtorch.recover.distill.CausalLMDistiller`;
* embedding distillation: :class:`EmbeddingDistiller`, the student's embeddings regressed on the teacher's.

    >>> import torch
    >>> from torch import nn
    >>> teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> loss = EmbeddingDistiller(teacher, lambda model, batch: model(batch))
    >>> x = torch.randn(5, 4)
    >>> float(loss(teacher, x).detach()), bool(loss(student, x) > 0)
    (0.0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_module
from slimtorch.errors import ConfigError
from slimtorch.prune.loop import cross_entropy_loss

__all__ = ["EmbeddingDistiller", "PairLoss", "causal_lm_loss", "cross_entropy", "pair_loss"]

#: cross-entropy of ``model(x)`` against ``y`` for a batch ``(x, y)``
cross_entropy = cross_entropy_loss

Embed = Callable[[nn.Module, Any], torch.Tensor]


class PairLoss(nn.Module):
    """``loss(model, (x, y))`` from a ``loss_fn(model, x, y)`` that is a module: registered as a child, so that
    its parameters (a distiller's projections) train with the model."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(model, x, y)


def pair_loss(loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None,
              ) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The loop's ``loss(model, batch)`` from a ``loss_fn(model, x, y)`` (None: cross-entropy)."""
    if loss_fn is None:
        return cross_entropy
    if isinstance(loss_fn, nn.Module):
        return PairLoss(loss_fn)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return loss_fn(model, x, y)

    return loss


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM on a ``(B, T)`` batch of token ids (the model
    shifts the labels: position ``t`` predicts token ``t + 1``)."""
    return model(input_ids=batch, labels=batch).loss


class EmbeddingDistiller:
    """``loss(student, batch)``: squared distance between the student's and the teacher's embeddings of the
    batch, summed over the embedding and averaged over the batch (regression on the teacher's embeddings:
    sentence-transformers' own distillation recipe; an embedding model has no class distribution to soften).

    Args:
        teacher: kept fixed (eval mode, no gradients).
        embed: ``embed(model, batch) -> (B, D)`` embeddings, differentiable for the student.
    """

    def __init__(self, teacher: nn.Module, embed: Embed) -> None:
        check_module(teacher, "EmbeddingDistiller's teacher")
        if not callable(embed):
            raise ConfigError(f"embed must be a function embed(model, batch) -> (batch, dim) tensor, got {embed!r}")
        self.teacher, self.embed = teacher, embed
        teacher.eval()

    def __call__(self, student: nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            target = self.embed(self.teacher, batch)  # (B, D)
        return (self.embed(student, batch) - target).pow(2).sum(dim=1).mean()
