"""How much each attention head and FFN neuron matters, accumulated over training steps, and whole layers.

:class:`UnitScores` is a training callback (:class:`slimtorch.prune.Callback`): after every backward pass it
adds each unit's score, computed from the weights and gradients of the slices that make up the unit
(:class:`~slimtorch.integrations.hf.units.BlockSpec`), to a running total. Criteria:

* ``"movement"`` (Sanh et al. 2020): ``-sum(w * dL/dw)`` over every weight of the unit (query, key, value rows
  and output columns of a head; the two FFN layers' row and column of a neuron); a unit that training pushes
  towards zero scores low. Summed over steps.
* ``"taylor"`` (Molchanov et al. 2019, first order): ``(dL/dg)^2`` for a gate ``g`` on the unit's output, which
  is ``sum(w * dL/dw)`` over the consumer's columns of the unit; the squared loss change of removing it.
  Averaged over steps.
* ``"gradient"`` (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): ``|dL/dg|``, averaged.
* ``"l1"``: the L1 norm of the unit's weights (no training needed; the workflow's previous default).

:func:`choose_units` turns scores into the units to remove: heads ranked across layers (each layer's scores
divided by their L2 norm, as Michel et al. do, and at least one head left per layer), FFN neurons ranked in
each layer (the same share everywhere, so the FFN width stays one config value)::

    >>> import torch
    >>> scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([5.0, 4.0, 0.5])}
    >>> choose_units(scores, 3, per_layer=False)   # a's 1 and 2 rank below b's 1 once divided by the norms
    {'a': [1, 2], 'b': [2]}
    >>> choose_units(scores, 1, per_layer=True)
    {'a': [1], 'b': [2]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.compaction import CONFIG_KEY
from slimtorch.integrations.hf.units import BlockSpec, Slice, find_blocks
from slimtorch.prune.loop import Callback

__all__ = ["UNIT_CRITERIA", "UnitScores", "choose_units", "drop_layers_", "layer_influence", "layer_list"]

UNIT_CRITERIA = ("movement", "taylor", "gradient", "l1")


def _per_unit(t: torch.Tensor, s: Slice, units: int) -> torch.Tensor:
    """Sum of ``t`` over each unit's positions along the slice's dim -> ``(units,)``."""
    view = t.movedim(s.dim, 0)[s.offset : s.offset + units * s.width]  # (units * width, rest...)
    return view.reshape(units, -1).sum(dim=1)


def _slice_units(spec: BlockSpec, s: Slice) -> int:
    return spec.kv_units if s.kv else spec.units


def _to_query_units(spec: BlockSpec, s: Slice, values: torch.Tensor) -> torch.Tensor:
    """Key/value-head values shared out among the query heads that use them (grouped-query attention)."""
    return values.repeat_interleave(spec.group) / spec.group if s.kv else values


class UnitScores(Callback):
    """Running per-unit scores of the ``kinds`` of blocks of ``model`` (see the module docstring), keyed by
    block name, indexed by unit. The model's parameters must stay the same objects while it tracks (masks
    may be applied; compact afterwards)."""

    def __init__(self, model: nn.Module, criterion: str, *, kinds: Sequence[str] = ("attention", "ffn")) -> None:
        if criterion not in UNIT_CRITERIA:
            raise ConfigError(f"unknown unit criterion {criterion!r}; available: {list(UNIT_CRITERIA)}")
        self.criterion = criterion
        self.specs = {n: s for n, s in find_blocks(model).items() if s.kind in kinds}
        if not self.specs:
            raise ConfigError(f"{type(model).__name__} has no recognised {' or '.join(kinds)} block to score")
        self.totals = {n: torch.zeros(s.units, dtype=torch.float64) for n, s in self.specs.items()}
        self.steps = 0

    def _param(self, spec: BlockSpec, s: Slice) -> nn.Parameter:
        return spec.module.get_parameter(s.param)

    def _sum_wg(self, spec: BlockSpec, slices: Sequence[Slice]) -> torch.Tensor:
        out = torch.zeros(spec.units, dtype=torch.float64)
        for s in slices:
            p = self._param(spec, s)
            if p.grad is not None:
                wg = (p.detach() * p.grad.detach()).double()
                out += _to_query_units(spec, s, _per_unit(wg, s, _slice_units(spec, s)))
        return out

    @torch.no_grad()
    def after_backward(self, batch: Any) -> None:
        if self.criterion == "l1":
            return
        self.steps += 1
        for name, spec in self.specs.items():
            if self.criterion == "movement":
                self.totals[name] -= self._sum_wg(spec, (*spec.producers, *spec.consumers))
            else:
                gate = self._sum_wg(spec, spec.consumers)  # dL/dg of a gate on each unit's output
                self.totals[name] += gate.pow(2) if self.criterion == "taylor" else gate.abs()

    @torch.no_grad()
    def scores(self, kind: str | None = None) -> dict[str, torch.Tensor]:
        """Each block's scores so far (higher: more important), of one ``kind`` or all."""
        out = {}
        for name, spec in self.specs.items():
            if kind is not None and spec.kind != kind:
                continue
            if self.criterion == "l1":
                total = torch.zeros(spec.units, dtype=torch.float64)
                for s in (*spec.producers, *spec.consumers):
                    values = _per_unit(self._param(spec, s).detach().abs().double(), s, _slice_units(spec, s))
                    total += _to_query_units(spec, s, values)
                out[name] = total
            else:
                out[name] = self.totals[name] / max(self.steps, 1) if self.criterion != "movement" else \
                    self.totals[name].clone()
        return out


def choose_units(scores: Mapping[str, torch.Tensor], count: int, *, per_layer: bool,
                 removed: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The units to have removed: ``count`` in all (``per_layer=False``: ranked across blocks, scores divided
    by each block's L2 norm, one unit kept per block at least) or ``count`` in each block (``per_layer``).
    Units in ``removed`` stay removed (they go first). Returns ``{block: sorted unit indices}``."""
    removed = removed or {}
    ranked: list[tuple[float, str, int]] = []
    chosen: dict[str, list[int]] = {}
    for name, s in scores.items():
        s = s.double().clone()
        gone = list(removed.get(name, []))
        if not per_layer:
            s = s / torch.linalg.vector_norm(s).clamp_min(1e-30)
        s[gone] = float("-inf")
        order = torch.argsort(s, stable=True).tolist()
        if per_layer:
            if not 0 <= count < len(order):
                raise ConfigError(f"cannot remove {count} of the {len(order)} units of block {name!r}")
            chosen[name] = sorted(order[: max(count, len(gone))])
        else:
            ranked.extend((float(s[i]), name, i) for i in order[:-1])  # the best unit of a block always stays
    if not per_layer:
        if count > len(ranked):
            raise ConfigError(f"cannot remove {count} units: only {len(ranked)} can go (one stays per block)")
        chosen = {name: [] for name in scores}
        for _, name, i in sorted(ranked, key=lambda r: r[0])[:count]:
            chosen[name].append(i)
        chosen = {name: sorted(v) for name, v in chosen.items()}
    return chosen


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ``ModuleList`` of a Hugging Face encoder's or decoder's layers (the longest list of
    blocks: ``encoder.layer``, ``model.layers``, ``h``...)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(type(x) is type(m[0]) for x in m)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of layers to drop from")
    return max(lists, key=lambda nm: (len(nm[1]), -nm[0].count(".")))


@torch.no_grad()
def layer_influence(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """How much each layer changes its input, ``1 - cos(input, output)`` per token averaged over the batches'
    real tokens (Men et al. 2024's block influence; ShortGPT drops the lowest)."""
    _, layers = layer_list(model)
    sums = [0.0] * len(layers)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            states = model(**batch, output_hidden_states=True).hidden_states  # (layers + 1) x (B, T, D)
            keep = batch["attention_mask"].bool()  # (B, T)
            for i in range(len(layers)):
                cos = F.cosine_similarity(states[i][keep].float(), states[i + 1][keep].float(), dim=-1)  # (tokens,)
                sums[i] += float((1.0 - cos).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("layer_influence needs at least one batch with a real token")
    return [v / count for v in sums]


def drop_layers_(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove the layers ``drop`` (0-based) from the model's layer list and set ``num_hidden_layers`` in its
    config, so that the model saves and ``from_pretrained`` rebuilds it. Returns the original indices of the
    layers kept (the teacher layers the student's now stand for)."""
    config = getattr(model, "config", None)
    if getattr(config, CONFIG_KEY, None):
        raise ConfigError("drop layers before compacting heads or FFN neurons: the config records the kept sizes "
                          "by layer name, which dropping a layer would shift")
    name, layers = layer_list(model)
    drop_set = {int(i) for i in drop}
    if any(not 0 <= i < len(layers) for i in drop_set) or len(drop_set) >= len(layers):
        raise ConfigError(f"layers to drop must be distinct indices in 0..{len(layers) - 1}, keeping at least one; "
                          f"got {sorted(drop)}")
    kept = [i for i in range(len(layers)) if i not in drop_set]
    model.get_submodule(name.rpartition(".")[0]).register_module(name.rpartition(".")[2], nn.ModuleList(
        [layers[i] for i in kept]))
    for new, layer in enumerate(model.get_submodule(name)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new  # caches are indexed by position in the list
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
    return kept
