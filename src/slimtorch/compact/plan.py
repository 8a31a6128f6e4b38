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
from slimtorch.compact.surgery import CLAIMS_CHILDREN, shrink_kind
from slimtorch.errors import CompactionError
from slimtorch.graph import DependencyGraph, Member, build_graph
from slimtorch.graph.graph import PerMember, Sink, label_table
from slimtorch.graph.live import Cut, LiveBlocks, live_blocks, masked
from slimtorch.graph.replay import known_structure
from slimtorch.masks import Masks, canonical_masks, check_masks, is_masked

__all__ = ["CompactionPlan", "coupled_channels", "plan_compaction"]


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


def _dead(member: Member, mask: torch.Tensor | None,
          alive: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> torch.Tensor:
    """Per label of ``member``: is the weight slice it indexes entirely masked? ``alive``: the live rows and
    columns of masks, found already (:class:`~slimtorch.graph.live.LiveBlocks`). (In numpy: on a layer's
    mask its reductions take a fraction of torch's fixed cost per call, and a model has a hundred of them.)"""
    size = member.labels.numel()
    if mask is None:
        return torch.zeros(size, dtype=torch.bool)
    if member.groups == 1 and member.dim in (0, 1) and alive and (found := alive.get(member.name)) is not None \
            and found[member.dim].size == size:
        return torch.from_numpy(~found[member.dim])
    keep = mask.detach().bool().cpu().numpy()
    if keep.size == 0:
        return torch.ones(size, dtype=torch.bool)
    if member.groups > 1:
        moved = np.moveaxis(keep, (member.other_dim, member.dim), (0, 1))  # (other, dim, rest...)
        g = member.groups
        alive = moved.reshape(g, moved.shape[0] // g, moved.shape[1], -1).any(axis=(1, 3))  # (groups, dim)
        return torch.from_numpy(~alive.reshape(-1))
    others = tuple(d for d in range(keep.ndim) if d != member.dim)
    return torch.from_numpy(~(keep.any(axis=others) if others else keep))


def _requests(
    graph: DependencyGraph, masks: Mapping[str, torch.Tensor], params: dict[str, torch.Tensor],
    alive: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, dict[tuple, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(roots, dead, requested, independent)``: the root of every label; per member key, which of its
    slices are masked (:func:`_dead`, for :func:`_check_sinks`); and per unit, whether the masks ask to
    remove it, and whether every weight slice producing it is masked (its values do not depend on the input)."""
    roots = graph.uf.roots()
    dead: dict[tuple, torch.Tensor] = {}
    n = roots.numel()
    all_ = {r: torch.ones(n, dtype=torch.int8) for r in ("out", "in")}
    any_ = {r: torch.zeros(n, dtype=torch.bool) for r in ("out", "in")}
    found: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"out": ([], []), "in": ([], [])}
    for m in graph.members.values():
        if m.role not in all_ or m.is_buffer or m.name not in params or params[m.name].dim() < 2:
            continue
        dead[m.key] = _dead(m, masks.get(m.name), alive)
        found[m.role][0].append(m.labels.reshape(-1))
        found[m.role][1].append(dead[m.key])
    for role, (labels, flags) in found.items():  # every member of a role at once
        if labels:
            flat = torch.cat(labels)
            valid = flat >= 0
            units = roots[flat[valid]]
            any_[role][units] = True
            all_[role].scatter_reduce_(0, units, torch.cat(flags)[valid].to(torch.int8), "amin")
    independent = any_["out"] & all_["out"].bool()
    return roots, dead, independent | (any_["in"] & all_["in"].bool()), independent


@dataclass
class _Fold:
    member: tuple
    position: int
    value: float
    unit: int


def _check_sinks(graph: DependencyGraph, roots: torch.Tensor, requested: torch.Tensor, independent: torch.Tensor,
                 masks: Mapping[str, torch.Tensor],
                 dead_of: dict[tuple, torch.Tensor]) -> tuple[torch.Tensor, list[_Fold]]:
    """Per unit: may it go as far as its sinks are concerned; and the constants to fold if it does."""
    allowed = torch.ones(roots.numel(), dtype=torch.bool)
    requested_at, independent_at = label_table(requested, roots), label_table(independent, roots)
    consumers = [s for s in graph.sinks if s.kind == "consumer"]
    folds: list[_Fold] = []
    if consumers:  # all at once (a model has one per layer): a few ops instead of a dozen per sink
        labels, dead = _consumed(graph, consumers, masks, dead_of)
        owner = torch.repeat_interleave(torch.tensor([s.labels.numel() for s in consumers]))
        asked, independent_here = requested_at[labels], independent_at[labels]
        units = roots[labels.clamp(min=0)]
        zero = (torch.cat([s.absmax.reshape(-1) for s in consumers]) == 0) & independent_here
        vmin = torch.cat([s.vmin.reshape(-1) for s in consumers])
        foldable = torch.tensor([s.foldable and not graph.training for s in consumers])[owner]
        const = (vmin == torch.cat([s.vmax.reshape(-1) for s in consumers])) & vmin.isfinite() & independent_here \
            & foldable
        allowed[units[asked & ~(dead | zero | const)]] = False
        starts = torch.cumsum(torch.tensor([0] + [s.labels.numel() for s in consumers]), 0)
        folds = [_Fold(consumers[i].member, p - int(starts[i]), float(vmin[p]), int(units[p]))
                 for p, i in zip(*[t.tolist() for t in _where(asked & ~dead & ~zero & const, owner)], strict=True)]
    for sink in graph.sinks:
        if sink.kind == "consumer":
            continue
        labels = sink.labels.reshape(-1)
        asked = requested_at[labels]
        if not bool(asked.any()):
            continue
        units = roots[labels.clamp(min=0)]
        zero = (sink.absmax.reshape(-1) == 0) & independent_at[labels]
        if sink.kind == "pair":
            other = sink.other
            other_units = roots[other.labels.reshape(-1).clamp(min=0)]
            zero_a = torch.ones_like(allowed).scatter_reduce_(0, units, zero, "amin")
            other_zero = (other.absmax.reshape(-1) == 0) & independent[other_units]
            zero_b = torch.ones_like(allowed).scatter_reduce_(0, other_units, other_zero, "amin")
            ok = (zero_a | zero_b)[units]
        else:
            ok = zero
        allowed[units[asked & ~ok]] = False
    return allowed, folds


def _consumed(graph: DependencyGraph, consumers: list[Sink], masks: Mapping[str, torch.Tensor],
              dead_of: dict[tuple, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of every consumer sink, concatenated, and whether the weight slice reading each is masked."""
    labels = torch.cat([s.labels.reshape(-1) for s in consumers])
    return labels, torch.cat([_dead_at(graph.members[s.member], masks, dead_of) for s in consumers])


def _reads_values(graph: DependencyGraph, sinks: list[Sink], roots: torch.Tensor, requested: torch.Tensor,
                  masks: Mapping[str, torch.Tensor], dead_of: dict[tuple, torch.Tensor]) -> bool:
    """Would :func:`_check_sinks` read a measured value of ``sinks``? Only where a requested channel is
    consumed by a weight slice that is not masked, or reaches a sink of another kind."""
    requested_at = label_table(requested, roots)
    consumers = [s for s in sinks if s.kind == "consumer"]
    if consumers:
        labels, dead = _consumed(graph, consumers, masks, dead_of)
        if bool((requested_at[labels] & ~dead).any()):
            return True
    others = [one for s in sinks if s.kind != "consumer" for one in (s, s.other) if one is not None]
    return any(bool(requested_at[one.labels.reshape(-1)].any()) for one in others)


def _where(flags: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``flags`` holds, and the owner of each."""
    positions = torch.nonzero(flags).flatten()
    return positions, owner[positions]


def _dead_at(member: Member, masks: Mapping[str, torch.Tensor], dead_of: dict[tuple, torch.Tensor]) -> torch.Tensor:
    found = dead_of.get(member.key)
    return found if found is not None else _dead(member, masks.get(member.name))


def _enforce(graph: DependencyGraph, roots: torch.Tensor, removed: torch.Tensor, kept: dict[str, int]) -> None:
    """Give back removed units until every equal-count constraint and rectangular slice holds (in place)."""
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
            kept["to keep equal channel counts (conv groups, heads, chunks, layers)"] = (
                kept.get("to keep equal channel counts (conv groups, heads, chunks, layers)", 0) + back.numel())
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


def _fold_deltas(model: nn.Module, folds: list[_Fold], removed: torch.Tensor,
                 params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bias changes that carry removed constant channels: bias += sum over the kernel of W[:, c] * value."""
    deltas: dict[str, torch.Tensor] = {}
    for fold in folds:
        if not bool(removed[fold.unit]):
            continue
        weight_name = fold.member[0]
        bias_name = weight_name.rsplit(".", 1)[0] + ".bias" if "." in weight_name else "bias"
        column = params[weight_name].detach().select(1, fold.position)  # (out, *kernel)
        delta = column.reshape(column.shape[0], -1).sum(dim=1) * fold.value
        deltas[bias_name] = deltas.get(bias_name, 0) + delta
    return deltas


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
        roots, dead, requested, independent = _requests(graph, masks, params, live.alive)
        if _reads_values(graph, sinks, roots, requested, masks, dead):
            known = None  # (a requested channel's values matter somewhere: they must be measured)
    if known is None:
        masked = _masked(params, masks)
        graph = build_graph(model, example_inputs, params=masked, unknown_ops=unknown_ops, cover=True, live=live,
                            trace=trace)
        roots, dead, requested, independent = _requests(graph, masks, params, live.alive)
        allowed, folds = _check_sinks(graph, roots, requested, independent, masks, dead)
    else:  # no sink reads a requested channel: every one is allowed, none is folded
        allowed, folds = torch.ones_like(requested), []
    blocked = torch.zeros_like(requested)
    blocked[torch.tensor(sorted(graph.blocked_units()), dtype=torch.long)] = True
    removed = requested & allowed & ~blocked
    kept: dict[str, int] = {}
    for why, which in (("their values are not zero where they are used and cannot be folded", requested & ~allowed),
                       ("they reach the output or an op that depends on every channel", requested & allowed & blocked)):
        if int(which.sum()):
            kept[why] = int(which.sum())
    _enforce(graph, roots, removed, kept)
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
        folds=_fold_deltas(model, folds, removed, masked | {n: p for n, p in params.items() if n not in masked}),
        fixes=_fixes(graph, roots, removed),
        requested=int(requested.sum()),
        kept=kept,
        masked=masked,
        live=live,
        unmasked=unmasked,
        whole=whole,
    )


def coupled_channels(model: nn.Module, plan: CompactionPlan,
                     masks: Mapping[str, torch.Tensor]) -> list[tuple[str, int, list[str]]]:
    """Whole channels that the masks zero in one parameter but that no request removes, because the channels
    they are tied to (by a residual add, a concatenation...) are kept by another parameter's mask:
    ``(parameter, how many, the parameters that keep them)``, for each parameter that zeroes any."""
    masks = canonical_masks(model, masks)
    roots, dead, requested, _ = _requests(plan.graph, masks, dict(model.named_parameters()), plan.live.alive)
    zeroed: dict[str, set[int]] = {}  # parameter -> units it zeroes whole, not requested
    keeping: dict[int, set[str]] = {}  # unit -> parameters whose slices of it are not masked
    for key, flags in dead.items():
        labels = plan.graph.members[key].labels.reshape(-1)
        valid = labels >= 0
        for unit, is_dead in zip(roots[labels[valid]].tolist(), flags[valid].tolist(), strict=True):
            if not requested[unit]:
                (zeroed.setdefault(key[0], set()).add(unit) if is_dead else keeping.setdefault(unit, set()).add(key[0]))
    return [(name, len(units), sorted(set().union(*(keeping.get(u, set()) for u in units)) - {name}))
            for name, units in sorted(zeroed.items())]


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
