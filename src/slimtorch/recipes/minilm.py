"""The seeds' transformer workflow on a sentence-embedding BERT (all-MiniLM-L6-v2): attention heads first,
recover by distillation, then FFN neurons, recover again, sparsity raised over several steps.

1. Heads: each head is scored as the block of its output-projection columns (``granularity [-1, head
   width]``), ranked across all layers (``total_sparsity``), so layers lose different numbers of heads;
   fully masked heads are physically removed (:func:`~slimtorch.integrations.hf.compaction.compact_hf_`).
2. Distillation from the original model between steps.
3. FFN: whole neurons of the first FFN layer (output channels of ``intermediate.dense``) per layer;
   removing them removes the second layer's inputs.

The criterion is any registered one (``"l1"``; gradient-based ones such as ``"taylor"`` take their
statistics through ``stats_fn``)::

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64))
    >>> head_config(bert, 0.25)[0]["granularity"], ffn_config(bert, 0.5)[0]["op_names"]
    ([-1, 8], ['encoder.layer.0.intermediate.dense', 'encoder.layer.1.intermediate.dense'])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.compaction import compact_hf_, format_pruned_heads
from slimtorch.integrations.hf.units import find_blocks
from slimtorch.models.minilm import embed
from slimtorch.prune.pruner import compute_masks
from slimtorch.recover.loop import Loop, StepModule
from slimtorch.recover.losses import EmbeddingDistiller

__all__ = ["WorkflowConfig", "distil_embeddings_", "ffn_config", "head_config", "prune_workflow_"]

StatsFn = Callable[[nn.Module, list[dict[str, Any]]], Mapping[str, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True, kw_only=True)
class WorkflowConfig:
    """Targets (fractions of the original heads and FFN neurons), steps, and distillation budget."""

    head_sparsity: float = 0.5
    ffn_sparsity: float = 0.5
    steps: int = 3
    distil_steps: int = 100
    lr: float = 1e-4
    criterion: str = "l1"

    def __post_init__(self) -> None:
        for key in ("head_sparsity", "ffn_sparsity"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.steps < 1 or self.distil_steps < 0 or not self.lr > 0:
            raise ConfigError(f"need steps >= 1, distil_steps >= 0 and lr > 0, got {self.steps}, "
                              f"{self.distil_steps}, {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown workflow keys {unknown}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**data)


def _attention(model: nn.Module) -> list[Any]:
    return [s for s in find_blocks(model).values() if s.kind == "attention"]


def head_config(model: nn.Module, fraction: float) -> list[dict[str, Any]]:
    """Config list pruning ``fraction`` of all remaining heads, ranked across layers, as blocks of the
    output projection's columns (one block per head)."""
    specs = _attention(model)
    if not specs:
        raise ConfigError(f"{type(model).__name__} has no recognised attention block")
    consumer = specs[0].consumers[0]
    names = [f"{s.name}.{s.consumers[0].param.rpartition('.')[0]}" for s in specs]
    return [{"op_names": names, "total_sparsity": fraction, "granularity": [-1, consumer.width]}]


def ffn_config(model: nn.Module, fraction: float) -> list[dict[str, Any]]:
    """Config list pruning ``fraction`` of each FFN's neurons (output channels of its first layer)."""
    names = [f"{s.name}.{s.producers[0].param.rpartition('.')[0]}" for s in find_blocks(model).values()
             if s.kind == "ffn"]
    return [{"op_names": names, "sparse_ratio": fraction, "granularity": "out_channel"}]


def distil_embeddings_(student: nn.Module, teacher: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *,
                       steps: int, lr: float) -> None:
    """Train ``student`` to reproduce ``teacher``'s normalised sentence embeddings (mean squared error,
    AdamW), cycling over ``batches``, on the library's training loop with its embedding-distillation loss
    (:class:`slimtorch.recover.losses.EmbeddingDistiller`; the classification distiller matches softened class
    distributions, which an embedding model does not have). The student is left in eval mode."""
    if steps <= 0:
        return
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    loop = Loop(StepModule(student, EmbeddingDistiller(teacher, embed)), opt)
    loop.run((batches[step % len(batches)] for step in range(steps)), desc="distil embeddings")
    student.eval()


def _fraction_of_remaining(target: float, original: int, remaining: int) -> float:
    """Sparsity to apply to the ``remaining`` units so that ``target`` of the ``original`` ones are gone."""
    return max(0.0, min(1.0, (remaining - original * (1.0 - target)) / remaining)) if remaining else 0.0


def _stage_(model: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]], cfg: WorkflowConfig,
            kind: str, stats_fn: StatsFn | None) -> None:
    """Raise one kind's sparsity over ``cfg.steps`` steps, compacting and distilling after each."""
    target = cfg.head_sparsity if kind == "attention" else cfg.ffn_sparsity
    original = sum(s.units for s in find_blocks(model).values() if s.kind == kind)
    for step in range(1, cfg.steps + 1):
        remaining = sum(s.units for s in find_blocks(model).values() if s.kind == kind)
        fraction = _fraction_of_remaining(target * step / cfg.steps, original, remaining)
        if fraction <= 0:
            continue
        config = head_config(model, fraction) if kind == "attention" else ffn_config(model, fraction)
        stats = stats_fn(model, batches) if stats_fn is not None else None
        compact_hf_(model, compute_masks(model, config, criterion=cfg.criterion, stats=stats))
        distil_embeddings_(model, teacher, batches, steps=cfg.distil_steps, lr=cfg.lr)


def prune_workflow_(model: nn.Module, batches: list[dict[str, torch.Tensor]], cfg: WorkflowConfig, *,
                    teacher: nn.Module | None = None, stats_fn: StatsFn | None = None) -> list[str]:
    """Prune heads, then FFN neurons, of ``model`` in place, distilling from ``teacher`` (default: a copy
    of the model as it is now) on tokenised ``batches``. Returns the per-layer pruned-head lines."""
    if not batches:
        raise ConfigError("the workflow needs at least one tokenised batch of sentences")
    teacher = teacher if teacher is not None else copy.deepcopy(model).eval()
    layers = [s.name for s in _attention(model)]
    _stage_(model, teacher, batches, cfg, "attention", stats_fn)
    _stage_(model, teacher, batches, cfg, "ffn", stats_fn)
    model.eval()
    return format_pruned_heads(model.slimtorch_compaction.get("pruned_heads", {}), layers)
