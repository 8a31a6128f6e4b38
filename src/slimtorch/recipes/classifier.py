"""The seeds' BERT workflow on a task: a sequence classifier fine-tuned, then pruned while distilling from itself.

As the seeds do with BERT on MNLI: the pre-trained encoder is fine-tuned on the task first (the fine-tuned model
is also the teacher), then pruned by :func:`~slimtorch.recipes.minilm.prune_workflow_`'s recipe (layers dropped
by their influence; heads by movement and FFN neurons by Taylor scores, raised along a cubic schedule; compacted,
trained on). What changes is the loss (:class:`TaskConfig`):

* with ``distil`` (the default), the student matches the fine-tuned teacher: its softened class distribution
  (KL divergence at ``temperature``, Hinton et al. 2015; ``alpha`` < 1 mixes in the labels' cross-entropy) and
  every layer's hidden states (:class:`~slimtorch.recover.transformer_distill.EncoderDistiller`), as NNI's BERT
  pruning example and TinyBERT do;
* without, it is trained on the task's labels alone for the same steps (the baseline distillation must beat).

Data are packed token tensors (:func:`~slimtorch.recipes.minilm.pack_sentences`) and one label per sentence::

    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                                                 intermediate_size=32, vocab_size=50, num_labels=3))
    >>> tokens = torch.stack([torch.randint(1, 50, (8, 6)), torch.ones(8, 6, dtype=torch.long)], dim=1)
    >>> labels = torch.arange(8) % 3
    >>> _ = prune_classifier_(bert, tokens, labels, TaskConfig(head_sparsity=0.5, ffn_sparsity=0.5, steps=4,
    ...                                                        batch_size=4, prune_every=1))
    >>> bert.config.intermediate_size, 0.0 <= accuracy(bert, tokens, labels) <= 1.0
    (16, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.checks import check_module, check_number
from slimtorch.errors import ConfigError
from slimtorch.recipes.minilm import LossFactory, WorkflowConfig, prune_workflow_, teacher_cache
from slimtorch.recover.trainer import TrainConfig, fit
from slimtorch.recover.transformer_distill import (
    DistilWeights,
    EncoderDistiller,
    LabelLoss,
    TeacherCache,
    unpack_tokens,
)

__all__ = ["TaskConfig", "accuracy", "finetune_classifier_", "predict", "prune_classifier_", "task_loss"]


@dataclass(frozen=True, kw_only=True)
class TaskConfig(WorkflowConfig):
    """The workflow's settings (:class:`~slimtorch.recipes.minilm.WorkflowConfig`) plus the task's loss:
    ``distil`` from the fine-tuned teacher (logits at ``temperature``, weighed ``logit_weight``; hidden states,
    ``hidden_weight``; ``alpha``: the KL share of the logits term, the rest the labels' cross-entropy) or, when
    False, the labels' cross-entropy alone."""

    distil: bool = True
    temperature: float = 2.0
    alpha: float = 1.0
    logit_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distil, bool):
            raise ConfigError(f"distil must be True or False, got {self.distil!r}")
        check_number(self.temperature, "temperature (1 to 8 is usual)", low=0.0, low_open=True)
        check_number(self.alpha, "alpha (the KL share of the logits term)", low=0.0, high=1.0)
        check_number(self.logit_weight, "logit_weight", low=0.0)
        if self.distil:
            DistilWeights(embedding=0.0, cosine=0.0, hidden=self.hidden_weight, attention=self.attention_weight,
                          logits=self.logit_weight)  # at least one term


def _check_labels(tokens: torch.Tensor, labels: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """The labels as a long tensor, once they fit the packed ``tokens`` and ``model``'s classes (checked before
    anything changes the model)."""
    loss = LabelLoss(labels)  # checks the labels' type and values
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1] != 2 \
            or len(tokens) != len(labels):
        raise ConfigError(f"need packed tokens (sentences, 2, tokens) and one label per sentence, got tokens "
                          f"{tuple(getattr(tokens, 'shape', ()))} and {len(labels)} labels")
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes is not None and int(loss.labels.max()) >= classes:
        raise ConfigError(f"label {int(loss.labels.max())} is not one of the {classes} classes the classifier "
                          "scores (config.num_labels); check the labels against the model")
    return loss.labels


def task_loss(cfg: TaskConfig, labels: torch.Tensor, cache: TeacherCache | None) -> LossFactory:
    """The workflow's loss for ``cfg``: distillation from ``cache``'s teacher (its layers mapped as the workflow
    says) or the labels' cross-entropy."""
    if not cfg.distil:
        plain = LabelLoss(labels)
        return lambda layer_map: plain
    if cache is None:
        raise ConfigError("distillation needs the fine-tuned teacher's cache (or TaskConfig(distil=False))")
    weights = DistilWeights(embedding=0.0, cosine=0.0, hidden=cfg.hidden_weight, attention=cfg.attention_weight,
                            logits=cfg.logit_weight)
    return lambda layer_map: EncoderDistiller(cache, layer_map=layer_map, weights=weights,
                                              temperature=cfg.temperature, alpha=cfg.alpha, labels=labels)


def finetune_classifier_(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, steps: int,
                         batch_size: int = 32, lr: float = 1e-4, seed: int = 0) -> None:
    """Fine-tune a sequence classifier on the labelled sentences (cross-entropy, AdamW, cosine decay;
    ``steps`` batches, cycling over the data in a fixed shuffle), in place; left in eval mode."""
    labels = _check_labels(tokens, labels, model)
    check_number(steps, "steps", low=1, integer=True)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))  # (N,)
    index = order[torch.arange(steps * batch_size) % len(tokens)]  # (steps * batch_size,)
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, optimizer="adamw", schedule="cosine", seed=seed)
    fit(model, TensorDataset(tokens[index], index), config, loss_fn=LabelLoss(labels))
    model.eval()


def prune_classifier_(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, cfg: TaskConfig, *,
                      teacher: nn.Module | None = None, cache: TeacherCache | None = None,
                      checkpoint: str | Path | None = None) -> list[str]:
    """Prune a fine-tuned sequence classifier in place with the workflow of
    :func:`~slimtorch.recipes.minilm.prune_workflow_`, trained as ``cfg`` says on the labelled sentences
    (``tokens``: packed, ``labels``: one class each). ``teacher``: the fine-tuned model (default: a copy of
    ``model`` as it is now); ``cache``: its outputs, to share between runs on the same sentences. Returns the
    per-layer pruned-head lines."""
    check_module(model, "prune_classifier_")
    labels = _check_labels(tokens, labels, model)
    if cfg.distil and cache is None:
        cache = teacher_cache(teacher if teacher is not None else copy.deepcopy(model).eval(), cfg)
    return prune_workflow_(model, tokens, cfg, cache=cache, checkpoint=checkpoint,
                           loss=task_loss(cfg, labels, cache))


@torch.no_grad()
def predict(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """The class a sequence classifier gives each of the packed sentences ``tokens`` -> ``(N,)`` (eval mode
    meanwhile)."""
    was_training = model.training
    model.eval()
    # sentences of similar lengths batched together: each batch is cut to its longest, so less padding runs
    order = torch.argsort(tokens[:, 1].sum(dim=1), stable=True)  # (N,)
    try:
        out = [model(**unpack_tokens(tokens[order[i : i + batch_size]])).logits.argmax(dim=-1)
               for i in range(0, len(tokens), batch_size)]
    finally:
        model.train(was_training)
    return torch.empty_like(order).scatter_(0, order, torch.cat(out))


def accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64) -> float:
    """Share of the packed sentences ``tokens`` that the classifier puts in their ``labels``' class."""
    labels = _check_labels(tokens, labels, model)
    return float((predict(model, tokens, batch_size=batch_size) == labels).double().mean())
