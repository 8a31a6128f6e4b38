"""Planning a compaction (pure): which channels go, what every layer keeps, what is folded and rewritten.

A channel (a unit of the dependency graph) is *requested* for removal when the masks zero every weight
slice that produces it (or every weight slice that reads it). It is *removed* when, in addition,
removing it cannot change what the masked model computes:

* wherever it is consumed, the consuming weight slice is masked, or the channel's value is exactly zero
  there, or (eval mode, a Linear or unpadded conv with a bias) a constant that is folded into the bias;
* it is not blocked (it does not reach the model output, a softmax over channels, an unknown op...);
* every equal-count constraint (conv groups, attention heads, chunks) still holds, and every parameter
  used directly in arithmetic keeps a rectangular block.

Requested channels that stay are reported with the reason and their number; nothing is silently changed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.compact.checks import check_arguments, check_example_inputs, check_not_tied
from slimtorch.compact.sinks import check_sinks, fold_deltas, reads_values, requests
from slimtorch.compact.surgery import CLAIMS_CHILDREN, shrink_kind
from slimtorch.errors import CompactionError
from slimtorch.graph import DependencyGraph, Member, build_graph
from slimtorch.graph.graph import PerMember, label_table
from slimtorch.graph.live import Cut, LiveBlocks, live_blocks, masked
from slimtorch.graph.replay import known_structure
from slimtorch.masks import Masks, canonical_masks, check_masks, is_masked

__all__ = ["CompactionPlan", "Requests", "plan_compaction"]


@dataclass
class Requests:
    """What the masks ask for: the root of every label (``roots``), per member key which of its slices the masks
    zero whole (``dead``), per unit whether the masks ask to remove it (``asked``), and for each asked unit that
    stays, why (``why``: unit -> text)."""

    roots: torch.Tensor
    dead: dict[tuple, torch.Tensor]
    asked: torch.Tensor
    why: dict[int, str]


@dataclass
class CompactionPlan:
    """Everything :func:`~slimtorch.compact_` needs to change the model, computed without changing it.

    ``modules`` maps a module name to ``{"kind", "keeps", "options"}`` (the registered shrink function and
    what it keeps); ``folds`` maps a bias name to the constant added to it; ``fixes`` lists call sites to
    rewrite; ``kept`` explains, with numbers, each requested channel that stays."""

    graph: DependencyGraph
    removed: torch.Tensor
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    folds: dict[str, torch.Tensor] = field(default_factory=dict)
    fixes: list[dict[str, Any]] = field(default_factory=list)
    requested: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    masked: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # the masks' live blocks (what a run of the masked model may compute on) and the blocks it cut
    live: LiveBlocks = field(default_factory=LiveBlocks, repr=False)
    # masked parameters left out of ``masked`` (name -> mask): every entry the surgery keeps of them is kept
    # by their mask, so the compacted layer takes their own values; a run of the masked model makes their
    # masked values only where it reads more than their live block (slimtorch.graph.live.BlockOps)
    unmasked: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # the masks the surgery cuts down to entries they all keep (nothing of them stays masked afterwards)
    whole: set[str] = field(default_factory=set, repr=False)
    # what the masks asked for, per unit and per member, and why a requested unit stays
    requests: Requests | None = field(default=None, repr=False)

    @property
    def cuts(self) -> dict[int, Cut]:
        return self.live.cuts

    @property
    def removed_count(self) -> int:
        return int(self.removed.sum())

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part: enough to replay the surgery on a fresh instance of the model."""
        modules = {
            name: {"kind": c["kind"], "options": c["options"], "keeps": {k: v.tolist() for k, v in c["keeps"].items()}}
            for name, c in self.modules.items()
        }
        return {"modules": modules, "fixes": self.fixes}


_EQUAL = "to keep equal channel counts (conv groups, heads, chunks, layers)"


def _enforce(graph: DependencyGraph, roots: torch.Tensor, removed: torch.Tensor, kept: dict[str, int],
             why: dict[int, str]) -> None:
    """Give back removed units until every equal-count constraint and rectangular slice holds (in place); ``why``
    gets the reason of each unit given back."""
    for _ in range(50):
        before = int(removed.sum())
        removed_at = label_table(removed, roots)
        for rows in graph.constraints:
            gone = removed_at[rows]
            counts = gone.sum(dim=1)
            if bool((counts == counts[0]).all()):
                continue
            excess = gone & (gone.cumsum(dim=1) > counts.min())  # keep the first min(count) of each row removed
            back = torch.unique(roots[rows[excess]])
            removed[back] = False
            removed_at = label_table(removed, roots)
            kept[_EQUAL] = kept.get(_EQUAL, 0) + back.numel()
            why.update(dict.fromkeys(back.tolist(), _EQUAL))
        for m in graph.members.values():
            if m.role != "element":
                continue
            keep = ~removed_at[m.labels]
            rect = torch.ones_like(keep)
            for d in range(keep.dim()):
                rect &= keep.movedim(d, 0).reshape(keep.shape[d], -1).any(dim=1).reshape(
                    [keep.shape[d] if i == d else 1 for i in range(keep.dim())])
            if not torch.equal(rect, keep):
                back = torch.unique(roots[m.labels[~keep]])
                removed[back] = False
                removed_at = label_table(removed, roots)
                kept[f"so that {m.name} keeps a rectangular block"] = back.numel()
                why.update(dict.fromkeys(back.tolist(), f"so that {m.name} keeps a rectangular block"))
        if int(removed.sum()) == before:
            return
    raise CompactionError("could not satisfy the channel constraints of the graph; please report this model")


def _check_not_emptied(members: list[Member], counts: list[int]) -> None:
    for m, n in zip(members, counts, strict=True):
        if m.role != "element" and not m.is_buffer and n and n == m.labels.numel():  # every index removed
            side = {"out": "output", "in": "input"}.get(m.role, "")
            raise CompactionError(
                f"the masks remove every {side} channel of {m.name!r} ({m.labels.numel()} of them); a layer cannot "
                "be emptied: keep at least one of its channels"
            )


def _owners(model: nn.Module) -> Any:
    """``owner(name)``: (module name, module, attribute path) of a parameter, where a module whose shrink
    function handles its children (e.g. an attention block) owns its children's parameters. Memoised per
    parent module (a model has a few parameters per module)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    kinds: dict[str, str] = {}
    found: dict[str, tuple[str, nn.Module]] = {}

    def kind(prefix: str) -> str:
        if prefix not in kinds:
            kinds[prefix] = shrink_kind(modules[prefix])
        return kinds[prefix]

    def owner(name: str) -> tuple[str, nn.Module, str]:
        parent = name.rpartition(".")[0]
        if parent not in found:
            parts = parent.split(".") if parent else []
            prefixes = [".".join(parts[:i]) for i in range(len(parts) + 1)]
            prefix = next((p for p in prefixes if kind(p) in CLAIMS_CHILDREN), parent)
            found[parent] = (prefix, modules[prefix])
        prefix, module = found[parent]
        return prefix, module, name[len(prefix) + 1:] if prefix else name

    return owner, kind


def _kept(members: list[Member], gone: PerMember, counts: list[int]) -> PerMember:
    """Per member, the (flat) indices of its labels that stay: one ``nonzero`` for every member at once."""
    sizes = [m.labels.numel() for m in members]
    if not sizes:
        return PerMember(torch.empty(0, dtype=torch.long), [])
    kept = torch.nonzero(~gone.flat).flatten()
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    owner = torch.repeat_interleave(torch.tensor(sizes))
    local = kept - starts[owner[kept]]
    return PerMember(local, [size - n for size, n in zip(sizes, counts, strict=True)])


def _module_changes(model: nn.Module, members: list[Member], gone: PerMember,
                    counts: list[int]) -> dict[str, dict[str, Any]]:
    changes: dict[str, dict[str, Any]] = {}
    owner_of, kind = _owners(model)
    kept_of = _kept(members, gone, counts)
    for i, (m, n) in enumerate(zip(members, counts, strict=True)):
        if not n:  # only the members that lose a channel
            continue
        owner, module, attr = owner_of(m.name)
        if owner not in changes:
            changes[owner] = {"kind": kind(owner), "keeps": {}, "options": {}}
        entry = changes[owner]
        if m.role == "element":
            if entry["kind"] != "tensors":
                raise CompactionError(f"{m.name!r} is used directly in arithmetic and also by its {entry['kind']} "
                                      "layer; its channels cannot be removed: exclude that layer from pruning (or "
                                      "drop its masks)")
            keep = ~gone[i].reshape(m.labels.shape)
            for d in range(keep.dim()):
                along = keep.movedim(d, 0).reshape(keep.shape[d], -1).any(dim=1)
                if not bool(along.all()):
                    entry["keeps"][f"{attr}:dim:{d}"] = torch.nonzero(along).flatten()
            continue
        entry["keeps"][f"{attr}:{m.role}:{m.dim}"] = kept_of[i]
        if entry["kind"] == "layernorm":
            shape = tuple(module.normalized_shape)
            entry["options"]["full_size"] = int(getattr(module, "full_size", torch.Size(shape).numel()))
    return changes


def _fixes(graph: DependencyGraph, roots: torch.Tensor, removed: torch.Tensor) -> list[dict[str, Any]]:
    found: dict[tuple, list[Any]] = {}
    removed_at = label_table(removed, roots)
    for site in graph.fix_sites:
        fix = site.compacted(None if site.labels is None else ~removed_at[site.labels])
        found.setdefault(site.key, []).append(fix)
    out = []
    for key, fixes in found.items():
        distinct = {repr(f) for f in fixes}
        if len(distinct) > 1 and fixes[0] is not None and fixes[0]["kind"] == "scalar":
            continue  # a module called with different numbers each time: nothing to pin
        if len(distinct) > 1:
            raise CompactionError(f"{key[1]!r} in module {key[0] or '<root>'!r} runs several times with sizes that "
                                  "would compact differently; leave those channels unpruned")
        if fixes[0] is not None:
            out.append({"module": key[0], "occurrence": key[2], **fixes[0]})
    return out


def plan_compaction(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    example_inputs: Any,
    unknown_ops: str = "error",
    measure: bool = True,
) -> CompactionPlan:
    """Work out, without changing ``model``, how :func:`~slimtorch.compact_` would compact it.

    When ``masks`` carry a shapes-only trace of the model (:class:`~slimtorch.masks.Masks`, as
    :func:`~slimtorch.compute_masks` returns them) that still fits it and these inputs, the values the plan
    needs are measured by replaying that trace (one checked forward pass) instead of tracing again.
    ``measure=False`` lets the plan skip running the model when no value would change it: when the masks
    mask every requested channel wherever it is consumed (as ``compute_masks`` does), the structure is taken
    from that trace (``plan.graph.measured`` is then False). Whoever applies such a plan
    must check the result against the masked model, as ``compact_`` does. Such a plan also leaves the
    weights whose masks keep exactly their live block, and everything the surgery keeps of them, out of
    ``plan.masked`` (``plan.unmasked``: their own values are the compacted layer's).

    Raises :class:`~slimtorch.errors.CompactionError` when the masks would empty a layer.
    """
    check_arguments(model, unknown_ops)
    check_masks(model, masks)
    trace = masks.trace if isinstance(masks, Masks) else None  # (what computing the masks learned of the model)
    masks = canonical_masks(model, masks)
    check_example_inputs(example_inputs)
    params = dict(model.named_parameters())
    # the masked weights are zero outside their live blocks: a run of the masked model (the measured pass, or
    # the forward pass the check compares with) computes on those, and the surgery takes the blocks it cut
    live = live_blocks(masks)
    known = None if measure else known_structure(trace, model, example_inputs, unknown_ops, cover=True)
    if known is not None:
        graph, sinks = known
        roots, dead, requested, independent = requests(graph, masks, params, live.alive)
        if reads_values(graph, sinks, roots, requested, masks, dead):
            known = None  # (a requested channel's values matter somewhere: they must be measured)
    why: dict[int, str] = {}  # unit -> why it stays although requested
    if known is None:
        masked = _masked(params, masks)
        graph = build_graph(model, example_inputs, params=masked, unknown_ops=unknown_ops, cover=True, live=live,
                            trace=trace)
        roots, dead, requested, independent = requests(graph, masks, params, live.alive)
        allowed, folds = check_sinks(graph, roots, requested, independent, masks, dead, why)
    else:  # no sink reads a requested channel: every one is allowed, none is folded
        allowed, folds = torch.ones_like(requested), []
    reasons = graph.blocked_units()
    blocked = torch.zeros_like(requested)
    blocked[torch.tensor(sorted(reasons), dtype=torch.long)] = True
    removed = requested & allowed & ~blocked
    kept: dict[str, int] = {}
    for text, which in (("their values are not zero where they are used and cannot be folded", requested & ~allowed),
                        ("they reach the output or an op that depends on every channel",
                         requested & allowed & blocked)):
        if int(which.sum()):
            kept[text] = int(which.sum())
    why.update((u, reasons[u]) for u in torch.nonzero(requested & allowed & blocked).flatten().tolist())
    _enforce(graph, roots, removed, kept, why)
    members, gone, counts = graph.removed_per_member(removed)
    _check_not_emptied(members, counts)
    check_not_tied(model, members, counts)
    whole = _cut_to_kept(masks, live, members, gone)
    unmasked: dict[str, torch.Tensor] = {}
    if known is not None and not is_masked(model):  # (a measured pass reads every value: it runs on masked ones)
        # Their masked values would be needed only by a run that reads them whole; a masked copy of every
        # weight costs a pass over the model's memory (a fifth of resnet50's compaction time).
        unmasked = {n: masks[n] for n in whole if n in live.exact and masks[n].numel() >= _UNMASKED_MIN}
        masked = _masked(params, masks, unmasked)
    return CompactionPlan(
        graph=graph,
        removed=removed,
        modules=_module_changes(model, members, gone, counts),
        folds=fold_deltas(model, folds, removed, masked | {n: p for n, p in params.items() if n not in masked}),
        fixes=_fixes(graph, roots, removed),
        requested=int(requested.sum()),
        kept=kept,
        masked=masked,
        live=live,
        unmasked=unmasked,
        whole=whole,
        requests=Requests(roots, dead, requested, {u: t for u, t in why.items() if not removed[u]}),
    )


def _masked(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
            skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The masked values of the masked parameters but ``skip``, as apply_masks_ computes them (zeros in masked
    positions, whatever they held: see :func:`~slimtorch.graph.live.masked`)."""
    return {n: masked(params[n].detach(), masks[n].to(params[n].device, torch.bool)) for n in masks
            if n not in skip}


#: below this many entries a masked copy costs less than finding out it is not needed
_UNMASKED_MIN = 1 << 12


def _cut_to_kept(masks: Mapping[str, torch.Tensor], live: LiveBlocks, members: list[Member],
                 gone: PerMember) -> set[str]:
    """The masks of which the surgery keeps only kept entries: a structured mask (of 2 dims or more, every entry
    of its live rows times its live columns; of 1 dim, its kept entries) whose parameter keeps no row or column
    outside it. Cut like their parameters, they keep everything."""
    found = set(live.exact) | {n for n, m in masks.items() if m.dim() == 1}
    kept: dict[tuple[str, int], np.ndarray] = {}  # (name, dim 0 or 1) -> the rows or columns the surgery keeps
    for i, m in enumerate(members):
        if m.name not in found or m.is_buffer:
            continue
        if m.dim not in (0, 1) or m.groups > 1:  # (a grouped or element-wise member: not a row or column set)
            found.discard(m.name)
            continue
        flags = ~gone[i].numpy()
        key = (m.name, m.dim)
        kept[key] = kept[key] | flags if key in kept else flags  # (kept by any member: a superset, to be safe)

    def inside(name: str, dim: int, alive: np.ndarray) -> bool:  # (a dim no member changes is kept whole)
        flags = kept.get((name, dim))
        return bool(alive.all()) if flags is None else not bool((flags & ~alive).any())

    def alive(name: str) -> tuple[np.ndarray, np.ndarray]:
        return live.alive[name] if name in live.alive else (masks[name].cpu().bool().numpy(), np.ones(1, dtype=bool))

    return {n for n in found if inside(n, 0, alive(n)[0]) and inside(n, 1, alive(n)[1])}
