"""The seeds' transformer workflow on a sentence-embedding BERT (all-MiniLM-L6-v2), distilling all along.

One run of ``steps`` distillation steps from the unpruned model (:class:`~slimtorch.recover.transformer_distill.
EncoderDistiller`: the sentence embedding and every layer's hidden states, the teacher's outputs cached):

1. Depth (optional, ``drop_layers``): the layers that change their input least (``1 - cos(in, out)``,
   :func:`~slimtorch.integrations.hf.importance.layer_influence`) are removed first; each kept layer is then
   distilled towards the teacher layer it was.
2. Width, gradually: while distilling, every head and FFN neuron accumulates an importance score
   (:class:`~slimtorch.integrations.hf.importance.UnitScores`: movement for heads and first-order Taylor for FFN
   neurons by default, as the seeds use them; gradient head importance and L1 selectable). Every
   ``prune_every`` steps the sparsity rises along a cubic schedule (Zhu & Gupta 2017) and the lowest-scoring
   units are masked (heads ranked across layers, neurons in each layer), until ``prune_until`` of the steps.
3. The masked heads and neurons are then removed (:func:`~slimtorch.integrations.hf.compaction.compact_hf_`) and
   the smaller model is distilled for the remaining steps, through :func:`~slimtorch.recover.fit`, whose
   checkpoints make this phase resumable.

The config lists of the one-shot path stay available (``head_config`` ranks heads as blocks of the output
projection's columns, ``ffn_config`` the first FFN layer's output channels)::

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64))
    >>> head_config(bert, 0.25)[0]["granularity"], ffn_config(bert, 0.5)[0]["op_names"]
    ([-1, 8], ['encoder.layer.0.intermediate.dense', 'encoder.layer.1.intermediate.dense'])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.config import check_fields, recorded_fields
from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.compaction import compact_hf_, format_pruned_heads, unit_masks
from slimtorch.integrations.hf.importance import UNIT_CRITERIA, UnitScores, choose_units, drop_layers_, layer_influence
from slimtorch.integrations.hf.units import find_blocks
from slimtorch.masks import COMPACTION_ATTR, apply_masks_
from slimtorch.models.minilm import embed
from slimtorch.prune.loop import Callback
from slimtorch.prune.schedule import Schedule
from slimtorch.recover.loop import Loop, StepModule
from slimtorch.recover.losses import EmbeddingDistiller
from slimtorch.recover.trainer import TrainConfig, fit
from slimtorch.recover.transformer_distill import (
    DistilWeights,
    EncoderDistiller,
    TeacherCache,
    pack_tokens,
    unpack_tokens,
)

__all__ = [
    "LossFactory",
    "WorkflowConfig",
    "distil_embeddings_",
    "distil_phase_",
    "drop_least_influential_",
    "ffn_config",
    "head_config",
    "pack_sentences",
    "prune_phase_",
    "prune_workflow_",
    "teacher_cache",
]


@dataclass(frozen=True, kw_only=True)
class WorkflowConfig:
    """The workflow's settings.

    ``head_sparsity`` / ``ffn_sparsity``: shares of the original heads and FFN neurons removed; ``drop_layers``:
    whole layers removed first. ``steps`` distillation steps of ``batch_size`` sentences in all; the sparsity
    rises every ``prune_every`` steps until ``prune_until`` of the steps (then the model is compacted and
    distilled on). ``head_criterion`` / ``ffn_criterion``: ``movement``, ``taylor``, ``gradient`` or ``l1``.
    ``hidden_weight`` / ``attention_weight`` / ``similarity_weight``: weights of the hidden-state, attention-map
    and batch-similarity losses (the embedding's squared error and cosine weigh 1)."""

    head_sparsity: float = 0.5
    ffn_sparsity: float = 0.5
    drop_layers: int = 0
    steps: int = 400
    batch_size: int = 32
    prune_every: int = 10
    prune_until: float = 0.6
    lr: float = 3e-4
    head_criterion: str = "movement"
    ffn_criterion: str = "taylor"
    hidden_weight: float = 1.0
    attention_weight: float = 0.0
    similarity_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("head_sparsity", "ffn_sparsity"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        for key in ("head_criterion", "ffn_criterion"):
            if getattr(self, key) not in UNIT_CRITERIA:
                raise ConfigError(f"{key} must be one of {list(UNIT_CRITERIA)}, got {getattr(self, key)!r}")
        if self.steps < 1 or self.batch_size < 1 or self.prune_every < 1 or self.drop_layers < 0 or not self.lr > 0:
            raise ConfigError(f"need steps, batch_size, prune_every >= 1, drop_layers >= 0 and lr > 0, got "
                              f"{self.steps}, {self.batch_size}, {self.prune_every}, {self.drop_layers}, {self.lr}")
        if not 0.0 < self.prune_until <= 1.0:
            raise ConfigError(f"prune_until must be in (0, 1] (a share of the steps), got {self.prune_until}")
        DistilWeights(hidden=self.hidden_weight, attention=self.attention_weight,
                      similarity=self.similarity_weight)  # checks all three

    @property
    def pruning_steps(self) -> int:
        """Steps of the gradual phase (0 when no head or neuron goes)."""
        if not (self.head_sparsity or self.ffn_sparsity):
            return 0
        return max(1, round(self.steps * self.prune_until))

    def to_dict(self) -> dict[str, Any]:
        return recorded_fields(self, {"similarity_weight": 0.0})  # (added since the release)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowConfig:
        check_fields(cls, data, what="workflow")
        return cls(**data)


#: the training loss ``loss(model, x, y)`` of a workflow phase, made from the teacher layer each student layer
#: stands for (None: the depth is unchanged); the default distils the encoder (:class:`EncoderDistiller`)
LossFactory = Callable[[Sequence[int] | None], Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]


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


def pack_sentences(tokenizer: Any, sentences: Sequence[str], *, max_length: int = 64) -> torch.Tensor:
    """Tokenise ``sentences`` into one packed ``(N, 2, max_length)`` tensor of ids and attention masks
    (:func:`~slimtorch.recover.transformer_distill.pack_tokens`)."""
    if not sentences:
        raise ConfigError("the workflow needs at least one sentence to distil on")
    batch = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return pack_tokens(batch)


def _packed(data: torch.Tensor | Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Packed tokens from a packed tensor or a list of tokenised batches (padded to the longest)."""
    if isinstance(data, torch.Tensor):
        return data
    if not data:
        raise ConfigError("the workflow needs at least one tokenised batch of sentences")
    packs = [pack_tokens(b) for b in data]
    length = max(p.shape[2] for p in packs)
    return torch.cat([nn.functional.pad(p, (0, length - p.shape[2])) for p in packs])


def _slice(tokens: torch.Tensor, start: int, stop: int) -> TensorDataset:
    """Sentences ``start..stop`` of the stream that cycles over ``tokens``, with their indices (the teacher
    cache's keys) as targets."""
    index = torch.arange(start, stop) % len(tokens)  # (stop - start,)
    return TensorDataset(tokens[index], index)


class _Gradual(Callback):
    """Masks the lowest-scoring heads and neurons every ``prune_every`` steps, along a cubic schedule."""

    def __init__(self, model: nn.Module, cfg: WorkflowConfig) -> None:
        self.model, self.step = model, 0
        self.schedule = Schedule(kind="agp", start=0, end=cfg.pruning_steps, every=min(cfg.prune_every,
                                                                                         cfg.pruning_steps))
        self.trackers = {kind: UnitScores(model, crit, kinds=(kind,)) for kind, crit, share in
                         (("attention", cfg.head_criterion, cfg.head_sparsity),
                          ("ffn", cfg.ffn_criterion, cfg.ffn_sparsity)) if share > 0}
        self.targets = {"attention": cfg.head_sparsity, "ffn": cfg.ffn_sparsity}
        self.removed: dict[str, list[int]] = {}

    def after_backward(self, batch: Any) -> None:
        for tracker in self.trackers.values():
            tracker.after_backward(batch)

    def after_step(self, batch: Any) -> None:
        self.step += 1
        if self.schedule.is_pruning_step(self.step):
            self.prune_(self.schedule.sparsity(self.step, 1.0))

    def prune_(self, progress: float) -> None:
        """Mask the units that ``progress`` (share of the final sparsities) asks for."""
        for kind, tracker in self.trackers.items():
            specs = tracker.specs.values()
            per_layer = kind == "ffn"
            total = next(iter(specs)).units if per_layer else sum(s.units for s in specs)
            count = int(self.targets[kind] * progress * total + 1e-9)
            self.removed.update(choose_units(tracker.scores(), count, per_layer=per_layer, removed=self.removed))
        apply_masks_(self.model, unit_masks(self.model, self.removed))


def _train(model: nn.Module, data: TensorDataset, cfg: WorkflowConfig, loss: EncoderDistiller, *,
           callbacks: Sequence[Callback] = (), checkpoint: Path | None = None, schedule: str = "constant") -> None:
    if len(data) == 0:
        return
    config = TrainConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adamw", schedule=schedule,
                         seed=cfg.seed, checkpoint_every=50 if checkpoint is not None else 0)
    fit(model, data, config, loss_fn=loss, callbacks=callbacks, checkpoint=checkpoint,
        resume=checkpoint is not None, context={"workflow": cfg.to_dict()})


def drop_least_influential_(model: nn.Module, tokens: torch.Tensor, count: int, *, sample: int = 256) -> list[int]:
    """Remove the ``count`` layers that change their input least on the first ``sample`` sentences; returns
    the original indices of the layers kept."""
    batches = [unpack_tokens(tokens[i : i + 32]) for i in range(0, min(sample, len(tokens)), 32)]
    influence = layer_influence(model, batches)
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return drop_layers_(model, order[:count])


def _eager_attention_(model: nn.Module) -> None:
    """Attention computed as softmax(QK^T) explicitly, so that the model can return its attention maps (the
    fused kernel computes none)."""
    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError(f"{type(model).__name__} cannot switch to eager attention; set attention_weight=0")
    model.set_attn_implementation("eager")


def teacher_cache(teacher: nn.Module, cfg: WorkflowConfig) -> TeacherCache:
    """The teacher's cache for ``cfg`` (with attention maps when ``cfg.attention_weight`` > 0)."""
    if cfg.attention_weight > 0:
        _eager_attention_(teacher)
    return TeacherCache(teacher, attentions=cfg.attention_weight > 0)


def _loss(cache: TeacherCache | None, cfg: WorkflowConfig, layer_map: Sequence[int] | None,
          loss: LossFactory | None) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss is not None:
        return loss(layer_map)
    if cache is None:
        raise ConfigError("the workflow trains with a loss: pass the teacher's cache (distillation of the encoder) "
                          "or a loss factory")
    return EncoderDistiller(cache, layer_map=layer_map, weights=DistilWeights(
        hidden=cfg.hidden_weight, attention=cfg.attention_weight, similarity=cfg.similarity_weight))


def prune_phase_(model: nn.Module, tokens: torch.Tensor, cfg: WorkflowConfig, cache: TeacherCache | None, *,
                 loss: LossFactory | None = None) -> list[int] | None:
    """Steps 1 and 2 of the workflow, then compaction: drop layers, prune heads and neurons gradually while
    distilling (the first ``cfg.pruning_steps`` steps) from ``cache``'s teacher, or training with ``loss``.
    Returns the teacher layer each remaining layer stands for (None: the depth is unchanged)."""
    layer_map = drop_least_influential_(model, tokens, cfg.drop_layers) if cfg.drop_layers else None
    done = cfg.pruning_steps * cfg.batch_size
    if done:
        gradual = _Gradual(model, cfg)
        _train(model, _slice(tokens, 0, done), cfg, _loss(cache, cfg, layer_map, loss), callbacks=[gradual])
        gradual.prune_(1.0)  # the final sparsities, whatever the schedule's last step was
        compact_hf_(model)
    model.eval()
    return layer_map


def distil_phase_(model: nn.Module, tokens: torch.Tensor, cfg: WorkflowConfig, cache: TeacherCache | None,
                  layer_map: Sequence[int] | None, *, checkpoint: str | Path | None = None,
                  loss: LossFactory | None = None) -> None:
    """Step 3: distil the compacted model (or train it with ``loss``) for the steps left after the pruning
    phase, through :func:`~slimtorch.recover.fit` (resumed from ``checkpoint`` when it exists)."""
    path = Path(checkpoint) if checkpoint is not None else None
    start = cfg.pruning_steps * cfg.batch_size
    _train(model, _slice(tokens, start, cfg.steps * cfg.batch_size), cfg, _loss(cache, cfg, layer_map, loss),
           checkpoint=path, schedule="cosine")
    model.eval()


def prune_workflow_(model: nn.Module, data: torch.Tensor | Sequence[Mapping[str, torch.Tensor]],
                    cfg: WorkflowConfig, *, teacher: nn.Module | None = None, cache: TeacherCache | None = None,
                    checkpoint: str | Path | None = None, loss: LossFactory | None = None) -> list[str]:
    """Drop layers, then prune heads and FFN neurons of ``model`` gradually while distilling it from
    ``teacher`` (default: a copy of the model as it is now), then compact it and distil on, in place, on the
    sentences ``data`` (packed tokens, see :func:`pack_sentences`, or tokenised batches). ``cache``: a
    :class:`TeacherCache` to share between runs on the same sentences. ``checkpoint``: file through which the
    last phase resumes. ``loss``: trains with the loss it makes instead of the encoder distiller (no teacher is
    then needed; a task's classifier, :mod:`slimtorch.recipes.classifier`). Returns the per-layer pruned-head
    lines."""
    tokens = _packed(data)
    if cache is None and loss is None:
        cache = teacher_cache(teacher if teacher is not None else copy.deepcopy(model).eval(), cfg)
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if cfg.attention_weight > 0:
        _eager_attention_(model)
    layer_map = prune_phase_(model, tokens, cfg, cache, loss=loss)
    layers = [s.name for s in find_blocks(model).values() if s.kind == "attention"]
    distil_phase_(model, tokens, cfg, cache, layer_map, checkpoint=checkpoint, loss=loss)
    if cfg.attention_weight > 0 and previous is not None:
        model.set_attn_implementation(previous)  # the kernel it had (eager only to return the maps)
    return format_pruned_heads((getattr(model, COMPACTION_ATTR, None) or {}).get("pruned_heads", {}), layers)
