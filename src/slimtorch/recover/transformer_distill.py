"""Distillation of a Hugging Face encoder from its unpruned self: sentence embedding plus every layer's states.

What a pruned sentence-embedding model must keep is its mean-pooled embedding; matching only that gives the
student one vector per sentence to learn from. :class:`EncoderDistiller` also matches the hidden states of
every student layer to those of the teacher layer it stands for (``layer_map``: the same index when the depth
is unchanged, the original index of each kept layer after layers were dropped), as TinyBERT and
sentence-transformers' layer-drop distillation do, and optionally the head-averaged attention maps.

The teacher runs once per sentence: its outputs are kept (hidden states in float16, each sentence trimmed to
its own length) by :class:`TeacherCache`, so that later epochs, and other students distilled from the same
teacher on the same sentences, cost only the student's steps. Batches are ``(x, y)`` as
:func:`~slimtorch.recover.fit` takes them: ``x`` the ``(B, 2, T)`` stack of token ids and attention mask,
``y`` the ``(B,)`` sentence indices (the cache's keys)::

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                             intermediate_size=32, vocab_size=50)).eval()
    >>> x = pack_tokens({"input_ids": torch.randint(1, 50, (3, 5)), "attention_mask": torch.ones(3, 5)})
    >>> loss = EncoderDistiller(TeacherCache(bert))
    >>> round(float(loss(bert, x, torch.arange(3)).detach()), 4)   # the teacher is its own perfect student
    0.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.checks import check_module, check_number
from slimtorch.errors import ConfigError
from slimtorch.recover.distill import distill_loss

__all__ = ["DistilWeights", "EncoderDistiller", "LabelLoss", "TeacherCache", "mean_pool", "pack_tokens",
           "unpack_tokens"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states ``(B, T, D)`` over the tokens the mask ``(B, T)`` keeps -> ``(B, D)``."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def pack_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A tokenised batch as one ``(B, 2, T)`` long tensor (token ids, attention mask): what a ``TensorDataset``
    holds and :func:`~slimtorch.recover.fit` batches without copying."""
    return torch.stack([batch["input_ids"].long(), batch["attention_mask"].long()], dim=1)


def unpack_tokens(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model inputs of a packed ``(B, 2, T)`` batch, cut to its longest sentence (padding after it costs
    time and changes nothing)."""
    if x.dim() != 3 or x.shape[1] != 2:
        raise ConfigError(f"need a packed (batch, 2, tokens) tensor of ids and mask, got {tuple(x.shape)}")
    length = max(int(x[:, 1].sum(dim=1).max()), 1)
    return {"input_ids": x[:, 0, :length], "attention_mask": x[:, 1, :length]}


def _forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], attentions: bool) -> Any:
    out = model(**inputs, output_hidden_states=True, output_attentions=attentions)
    if attentions and not out.attentions:
        raise ConfigError(f"{type(model).__name__} returned no attention maps (fused attention computes none); "
                          "switch it to eager attention first: model.set_attn_implementation('eager')")
    return out


class TeacherCache:
    """The teacher's outputs per sentence index, computed on first use: mean-pooled embedding (float32), every
    layer's hidden states (float16, trimmed to the sentence's tokens), a classifier's logits (float32) when the
    teacher returns them and, when ``attentions``, each layer's head-averaged attention map."""

    def __init__(self, teacher: nn.Module, *, attentions: bool = False) -> None:
        check_module(teacher, "the distillation teacher")
        self.teacher, self.attentions = teacher.eval(), attentions
        self._items: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._items)

    @torch.no_grad()
    def _fill(self, inputs: Mapping[str, torch.Tensor], keys: list[int]) -> None:
        out = _forward(self.teacher, inputs, self.attentions)
        mask = inputs["attention_mask"]
        pooled = mean_pool(out.hidden_states[-1], mask)  # (B, D)
        logits = getattr(out, "logits", None)  # (B, classes) of a sequence classifier, else None
        for row, key in enumerate(keys):
            n = int(mask[row].sum())
            item = {"pooled": pooled[row].float(),
                    "hidden": torch.stack([h[row, :n] for h in out.hidden_states[1:]]).half()}  # (L, n, D)
            if logits is not None:
                item["logits"] = logits[row].float()
            if self.attentions:
                item["attn"] = torch.stack([a[row].mean(dim=0)[:n, :n] for a in out.attentions]).half()  # (L, n, n)
            self._items[key] = item

    def targets(self, inputs: Mapping[str, torch.Tensor], keys: torch.Tensor) -> list[dict[str, Any]]:
        """The cached outputs of the sentences ``keys`` (computing those not seen yet)."""
        wanted = [int(k) for k in keys]
        missing = [i for i, k in enumerate(wanted) if k not in self._items]
        if missing:
            index = torch.tensor(missing)
            sub = {name: t[index] for name, t in inputs.items()}
            length = max(int(sub["attention_mask"].sum(dim=1).max()), 1)
            self._fill({name: t[:, :length] for name, t in sub.items()}, [wanted[i] for i in missing])
        return [self._items[k] for k in wanted]


@dataclass(frozen=True, kw_only=True)
class DistilWeights:
    """Weights of the loss terms: ``embedding`` (squared error of the mean-pooled embedding relative to the
    teacher's norm), ``cosine`` (1 - cosine of the two embeddings), ``hidden`` (each mapped layer's squared
    error relative to the teacher's, averaged over layers), ``attention`` (squared error of the
    head-averaged attention maps; needs attention maps from the model, 0 turns it off) and ``logits`` (a
    classifier's softened class distribution: :func:`~slimtorch.recover.distill.distill_loss`, KL divergence
    at a temperature, mixed with the labels' cross-entropy as the distiller's ``alpha`` says) and ``similarity``
    (squared error of the batch's sentence-to-sentence cosine similarities: the relations that nearest-neighbour
    search reads, as in relational distillation, Park et al. 2019)."""

    embedding: float = 1.0
    cosine: float = 1.0
    hidden: float = 1.0
    attention: float = 0.0
    logits: float = 0.0
    similarity: float = 0.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"distillation weight {key!r} must be a number >= 0, got {value!r}")
        if not any(asdict(self).values()):
            raise ConfigError("at least one distillation weight must be > 0")


def _similarity_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two ``(B, D)`` batches' cosine-similarity matrices ``(B, B)``, off the
    diagonal (a batch of one has no pair: zero)."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher.to(student.dtype), dim=1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)  # (B, B)
    if not off.any():
        return s.new_zeros(())
    return (s @ s.T - t @ t.T)[off].pow(2).mean()


def _padded(items: Sequence[torch.Tensor], length: int, *, square: bool = False) -> torch.Tensor:
    """Stack ``(L, n_i, D)`` items into ``(L, B, length, D)``, or with ``square`` ``(L, n_i, n_i)`` maps into
    ``(L, B, length, length)`` (zeros past each sentence's end)."""
    tail = (length,) if square else tuple(items[0].shape[2:])
    out = items[0].new_zeros((items[0].shape[0], len(items), length, *tail))
    for row, item in enumerate(items):
        n = item.shape[1]
        if square:
            out[:, row, :n, :n] = item
        else:
            out[:, row, :n] = item
    return out


class EncoderDistiller:
    """``loss(student, x, y)`` for :func:`~slimtorch.recover.fit`: the student's embedding, hidden states and
    (optionally) attention maps regressed on the teacher's cached ones (see the module docstring).

    Args:
        cache: the teacher and its outputs.
        layer_map: the teacher layer (0-based) each student layer matches; None: the same index (equal depth).
        weights: the loss terms' weights.
        temperature: softens both class distributions of the ``logits`` term (Hinton et al. 2015).
        alpha: share of the ``logits`` term that is the KL divergence; the rest is the cross-entropy with
            ``labels[y]`` (``labels``: the class of every sentence index; needed when ``alpha < 1``).
    """

    def __init__(self, cache: TeacherCache, *, layer_map: Sequence[int] | None = None,
                 weights: DistilWeights | None = None, temperature: float = 2.0, alpha: float = 1.0,
                 labels: torch.Tensor | None = None) -> None:
        self.cache, self.weights = cache, weights or DistilWeights()
        self.layer_map = None if layer_map is None else [int(i) for i in layer_map]
        if self.weights.attention > 0 and not cache.attentions:
            raise ConfigError("an attention-map loss needs TeacherCache(teacher, attentions=True)")
        check_number(temperature, "temperature (1 to 8 is usual)", low=0.0, low_open=True)
        check_number(alpha, "alpha (the KL share of the logits term)", low=0.0, high=1.0)
        if self.weights.logits > 0 and alpha < 1.0 and labels is None:
            raise ConfigError(f"alpha={alpha} mixes in the labels' cross-entropy: pass labels (the class of every "
                              "sentence index), or alpha=1.0 for the teacher's distribution alone")
        self.temperature, self.alpha = temperature, alpha
        self.labels = None if labels is None else LabelLoss(labels)

    def _hidden(self, student_states: Sequence[torch.Tensor], targets: list[dict[str, Any]],
                mask: torch.Tensor) -> torch.Tensor:
        teacher = _padded([t["hidden"] for t in targets], mask.shape[1]).float()  # (Lt, B, T, D)
        layer_map = self.layer_map if self.layer_map is not None else list(range(len(student_states)))
        if len(layer_map) != len(student_states) or max(layer_map) >= teacher.shape[0]:
            raise ConfigError(f"layer_map {layer_map} does not fit a student of {len(student_states)} layers and "
                              f"a teacher of {teacher.shape[0]}")
        m = mask[None, :, :, None].float()  # (1, B, T, 1)
        s = torch.stack(list(student_states))  # (Ls, B, T, D)
        t = teacher[layer_map]  # (Ls, B, T, D)
        err = ((s - t).pow(2) * m).sum(dim=(1, 2, 3)) / (t.pow(2) * m).sum(dim=(1, 2, 3)).clamp_min(1e-9)
        return err.mean()

    def _attention(self, maps: Sequence[torch.Tensor], targets: list[dict[str, Any]],
                   mask: torch.Tensor) -> torch.Tensor:
        teacher = _padded([t["attn"] for t in targets], mask.shape[1], square=True).float()  # (Lt, B, T, T)
        layer_map = self.layer_map if self.layer_map is not None else list(range(len(maps)))
        s = torch.stack([a.mean(dim=1) for a in maps])  # (Ls, B, T, T) head-averaged
        pair = (mask[:, :, None] * mask[:, None, :]).float()[None]  # (1, B, T, T)
        return ((s - teacher[layer_map]).pow(2) * pair).sum() / pair.sum().clamp_min(1.0) / len(maps)

    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inputs = unpack_tokens(x)
        targets = self.cache.targets(inputs, y)
        w = self.weights
        out = _forward(student, inputs, w.attention > 0)
        mask = inputs["attention_mask"]
        loss = out.hidden_states[-1].new_zeros(())
        if w.embedding > 0 or w.cosine > 0:
            pooled = mean_pool(out.hidden_states[-1], mask)  # (B, D)
            target = torch.stack([t["pooled"] for t in targets])  # (B, D)
            relative = (pooled - target).pow(2).sum(dim=1) / target.pow(2).sum(dim=1).clamp_min(1e-9)  # (B,)
            loss = loss + w.embedding * relative.mean()
            loss = loss + w.cosine * (1.0 - F.cosine_similarity(pooled, target, dim=1)).mean()
        if w.similarity > 0:
            loss = loss + w.similarity * _similarity_error(mean_pool(out.hidden_states[-1], mask),
                                                           torch.stack([t["pooled"] for t in targets]))
        if w.hidden > 0:
            loss = loss + w.hidden * self._hidden(out.hidden_states[1:], targets, mask)
        if w.attention > 0:
            loss = loss + w.attention * self._attention(out.attentions, targets, mask)
        if w.logits > 0:
            loss = loss + w.logits * self._logits(out, targets, y)
        return loss

    def _logits(self, out: Any, targets: list[dict[str, Any]], keys: torch.Tensor) -> torch.Tensor:
        if getattr(out, "logits", None) is None or any("logits" not in t for t in targets):
            raise ConfigError("a logits loss needs a sequence classifier (a model that returns logits) as student "
                              "and as teacher; set the logits weight to 0 for an encoder")
        teacher = torch.stack([t["logits"] for t in targets])  # (B, classes)
        # (B,) the labels' cross-entropy is weighed by 1 - alpha: with alpha = 1 they are never read
        labels = self.labels.of(keys) if self.labels is not None else teacher.argmax(dim=-1)
        return distill_loss(out.logits, teacher, labels, temperature=self.temperature, alpha=self.alpha)


class LabelLoss:
    """``loss(model, x, y)`` for :func:`~slimtorch.recover.fit`: the cross-entropy of a sequence classifier's
    logits on the packed batch ``x`` against ``labels[y]`` (``y``: sentence indices, as the distillers take
    them), so that the same data trains a classifier with or without a teacher.

    >>> import torch
    >>> LabelLoss(torch.tensor([0, 2, 1])).labels.tolist()
    [0, 2, 1]
    """

    def __init__(self, labels: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.numel() == 0:
            raise ConfigError(f"labels must be a non-empty 1-D integer tensor (the class of every sentence index), "
                              f"got {labels!r:.80}")
        if int(labels.min()) < 0:
            raise ConfigError(f"labels must be class indices >= 0, got {int(labels.min())}")
        self.labels = labels.long()

    def of(self, keys: torch.Tensor) -> torch.Tensor:
        """The labels of the sentence indices ``keys``."""
        if keys.numel() and not 0 <= int(keys.min()) <= int(keys.max()) < len(self.labels):
            raise ConfigError(f"sentence indices {int(keys.min())}..{int(keys.max())} do not all have a label "
                              f"(labels for 0..{len(self.labels) - 1}); the data and the labels must match")
        return self.labels[keys.long()]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(**unpack_tokens(x)).logits  # (B, classes)
        labels = self.of(y)  # (B,)
        if int(labels.max()) >= logits.shape[-1]:
            raise ConfigError(f"label {int(labels.max())} is not one of the {logits.shape[-1]} classes the model "
                              "scores; check the labels against the classifier's num_labels")
        return F.cross_entropy(logits, labels)
