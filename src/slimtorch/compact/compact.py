"""``compact_``: turn a masked model into a really smaller one that computes the same thing.

    >>> import torch
    >>> from torch import nn
    >>> import slimtorch
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> masks = slimtorch.compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)
    >>> slimtorch.compact_(net, masks, example_inputs=x)
    >>> net[0].out_channels, net[4].in_features
    (4, 144)

Plan first (pure, :func:`~slimtorch.compact.plan.plan_compaction`), then apply: bake the masks in, fold
constants, run each layer's shrink function, hook the rewrites of hard-coded sizes, and check that the
result reproduces the masked model's outputs on ``example_inputs``. If anything fails, the model is put
back exactly as it was and the error says why.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.compact.checks import check_arguments, check_finite, tied_parameters, verify_result
from slimtorch.compact.explain import KeptChannels, describe_kept, kept_channels
from slimtorch.compact.kept_masks import carried_masks, cut_masks, keep_masks_
from slimtorch.compact.plan import CompactionPlan, plan_compaction
from slimtorch.compact.rewrites import ShapeFixer
from slimtorch.compact.surgery import SHRINKS, reusing
from slimtorch.errors import CompactionError, SlimError, SlimWarning
from slimtorch.graph.live import BlockMode, BlockOps
from slimtorch.graph.rules import TRACE_PREPARERS
from slimtorch.graph.run import call_model, collector_paused, run_state, substituted, temporary_mode
from slimtorch.masks import COMPACTION_ATTR, canonical_masks, is_masked, mask_factor, remove_masks_

__all__ = ["AFTER_COMPACTION", "COMPACTION_ATTR", "Snapshot", "compact_", "replay_"]

#: ``fn(model)`` called after every successful compaction (e.g. to update a Hugging Face config)
AFTER_COMPACTION: list[Callable[[nn.Module], None]] = []



class Snapshot:
    """Every module's class and attributes, so that a failed compaction can be undone exactly. Compaction replaces
    tensors (never writes into them) and rewrites the containers that hold them (parameter, buffer and hook
    dicts, lists): a copy of each module's attribute dict and of the containers in it is enough. Restoring
    installs fresh copies of those, so that an attempt after a restore (the measured retry), which writes into
    the containers it finds, leaves the snapshot as it was for the next restore."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(module, module.__class__, _copied(module.__dict__)) for module in model.modules()]

    def restore(self, model: nn.Module) -> None:
        for module, cls, state in self.saved:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(_copied(state))  # mask buffers and hooks, if any, come back with it


_CONTAINERS = (dict, OrderedDict, list, set)


def _copied(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its containers (dicts, lists, sets: parameters, buffers, submodules, hooks) copied: by their
    constructor (a tenth of ``copy.copy``'s time on an OrderedDict, and a model has a dozen per module), other
    kinds of them (a defaultdict) by ``copy.copy``."""
    return {k: (type(v)(v) if type(v) in _CONTAINERS else copy.copy(v) if isinstance(v, _CONTAINERS) else v)
            for k, v in state.items()}


def _masked_reference(model: nn.Module, plan: CompactionPlan, example_inputs: Any) -> Any:
    """The masked model's eval-mode output, without touching the model: a forward pass with the plan's masked
    parameter values, linear layers and convolutions computed on their live blocks (whose cuts the surgery
    then takes)."""
    state, _, inputs, names = run_state(model, example_inputs, plan.masked, measuring=True)  # (buffers: copies)
    with torch.no_grad(), temporary_mode(model, training=False), substituted(model, state), \
            BlockMode(BlockOps(plan.live, names, {n: mask_factor(m) for n, m in plan.unmasked.items()})):
        return call_model(model, inputs)


def _set_params(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Give parameters new values (new ``nn.Parameter`` objects, ``requires_grad`` kept); a parameter known
    under several names (tied weights) gets the one new object under all of them, so it stays tied.
    (Written into each module's parameter dict: ``setattr`` re-registers a parameter with checks that cost
    more than the rest of this, and the name is registered already.)"""
    if not values:
        return
    params: dict[str, torch.Tensor] = {}
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # id of a parameter -> every (module, attr) holding it
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                params[f"{prefix}.{attr}" if prefix else attr] = p
                slots.setdefault(id(p), []).append((module, attr))
    for name, value in values.items():
        old = params[name]
        new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
        for module, attr in slots[id(old)]:
            module._parameters[attr] = new


def _keeps(change: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.long) for k, v in change["keeps"].items()}


def replay_(model: nn.Module, steps: list[dict[str, Any]]) -> list[Any]:
    """Apply recorded compaction steps (:meth:`CompactionPlan.to_dict`) to ``model``'s shapes: the
    surgery and the call rewrites, not the values (a checkpoint loads those). Returns hook handles."""
    for prepare in TRACE_PREPARERS:  # integrations register their shrink functions here, as when a trace starts:
        prepare(model)               # a process may load a compacted model before it has traced anything
    handles: list[Any] = []
    for step in steps:
        for name, change in step["modules"].items():
            kind = change["kind"]
            if kind not in SHRINKS:
                raise CompactionError(f"no shrink function registered for {kind!r} (module {name!r})")
            SHRINKS[kind](model.get_submodule(name), _keeps(change), change["options"])
    fixes = [f for step in steps for f in step["fixes"]]
    if fixes:
        handles += ShapeFixer(fixes).install(model)
    return handles


def _needed_fixes(model: nn.Module, fixes: list[dict[str, Any]],
                  example_inputs: Any) -> tuple[list[dict[str, Any]], Any]:
    """Run once with every rewrite, remembering which ones changed a call (others compute right already).
    Also returns the output: the rewrites left out change no call, so it is the compacted model's output."""
    probe = ShapeFixer(fixes, probing=True)
    handles = probe.install(model)
    try:
        with torch.no_grad(), temporary_mode(model, training=False):
            out = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return [f for f in fixes if (f["module"], f["op"], f["occurrence"]) in probe.needed], out


def _apply(model: nn.Module, plan: CompactionPlan, example_inputs: Any) -> tuple[dict, Any]:
    """Change the model as planned; returns the step record and, when the call rewrites needed a probing
    run, its (eval-mode) output."""
    if is_masked(model):
        remove_masks_(model)
    _set_params(model, plan.masked)  # (the plan's unmasked weights stay: the surgery keeps only what their masks keep)
    params = dict(model.named_parameters())
    _set_params(model, {n: params[n].detach() + delta.to(params[n]) for n, delta in plan.folds.items()})
    step = plan.to_dict()
    with reusing(plan.cuts):
        for name, change in plan.modules.items():  # (the plan's keep tensors; the step holds them as lists)
            SHRINKS[change["kind"]](model.get_submodule(name), change["keeps"], change["options"])
    out = None
    if step["fixes"]:
        step["fixes"], out = _needed_fixes(model, step["fixes"], example_inputs)
        ShapeFixer(step["fixes"]).install(model)
    return step, out


def _summary(model: nn.Module, plan: CompactionPlan, step: dict, before: int,
             kept: list[KeptChannels]) -> dict[str, Any]:
    previous = getattr(model, COMPACTION_ATTR, None) or {}
    return {
        **previous,  # what other size changes recorded (dropped blocks, pruned heads) stays
        "params_before": previous.get("params_before", before),
        "params_after": sum(p.numel() for p in model.parameters()),
        "channels_requested": plan.requested,
        "channels_removed": plan.removed_count,
        "kept_against_masks": dict(plan.kept),
        "masked_channels_kept": [k.to_dict() for k in kept],
        "folded_biases": sorted(plan.folds),
        "zero_padded_norms": sorted(n for n, c in plan.modules.items() if "full_size" in c["options"]),
        "rewritten_calls": len(step["fixes"]),
        "unreached_layers": list(plan.graph.unreached),
        "steps": [*previous.get("steps", []), step],
    }


@collector_paused()
def compact_(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    example_inputs: Any,
    verify: bool = True,
    unknown_ops: str = "error",
) -> None:
    """Remove the channels ``masks`` prune from ``model``, in place, keeping what it computes.

    Args:
        model: the model (masked or not: the masks given are the truth).
        masks: ``{param_name: bool tensor}`` as :func:`~slimtorch.compute_masks` returns (whose shapes-only
            trace of the model, ``masks.trace``, is replayed when it still fits the model, instead of tracing
            the model again: :class:`~slimtorch.masks.Masks`).
        example_inputs: a batch the model accepts (tensor, tuple of positional inputs or dict of keyword
            inputs), used to trace it and to check the result.
        verify: check that the compacted model reproduces the masked one on ``example_inputs`` (eval
            mode); on a mismatch the model is restored and :class:`~slimtorch.errors.CompactionError` raised.
        unknown_ops: ``"error"`` or ``"keep"`` (channels touched by an op without a channel rule stay).

    Train/eval mode, dtype, device and ``requires_grad`` are kept; ``model.slimtorch_compaction`` (a dict)
    says what changed, and a :class:`~slimtorch.errors.SlimWarning` says how many channels the masks
    prune had to stay, and why. What the masks prune inside the channels that stay stays masked, at the
    compacted size (:mod:`slimtorch.compact.kept_masks`): training keeps it at zero unless
    :func:`~slimtorch.remove_masks_` lets it grow back.
    """
    # With the check, a plan may take the structure of the shapes-only trace the masks carry instead of running
    # the masked model through the graph (when no measured value would change it): the check's reference is
    # then a forward pass of the masked model on live blocks, and if the check fails, the model is restored
    # and planned again from a measured run.
    check_arguments(model, unknown_ops, verify)
    snapshot = Snapshot(model)  # (before the plan runs the model: a forward that changes attributes is undone)
    before = sum(p.numel() for p in model.parameters())
    plan = _planned(model, masks, example_inputs, unknown_ops, not verify, snapshot)
    kept = _kept(model, plan, masks, snapshot)  # (read before the surgery: it names the model's parameters)
    carried = carried_masks(model, masks)  # what stays masked inside the kept channels, cut like its parameter
    kept_masks = _cut(model, carried, plan, snapshot)
    try:
        step = _apply_checked(model, plan, example_inputs, verify, snapshot)
    except Exception:
        if plan.graph.measured:
            raise
        # the model did not run as traced (changed since?): restored, planned again from a measured run
        plan = _planned(model, masks, example_inputs, unknown_ops, True, snapshot)
        kept = _kept(model, plan, masks, snapshot)
        kept_masks = _cut(model, carried, plan, snapshot)
        step = _apply_checked(model, plan, example_inputs, verify, snapshot)
    try:
        keep_masks_(model, kept_masks)
        setattr(model, COMPACTION_ATTR, _summary(model, plan, step, before, kept))
        for finish in AFTER_COMPACTION:  # (each leaves what it changes outside the model as it was if it fails)
            finish(model)
    except BaseException:
        snapshot.restore(model)
        raise
    _warn_kept(model, plan, masks, kept)
    if plan.graph.branches:
        sites = ", ".join(dict.fromkeys(plan.graph.branches))
        warnings.warn(
            f"the model's forward turns values computed from its channels into Python values ({sites}), which may "
            "choose what it runs next: compaction followed, and checked, the path the example inputs take. Inputs "
            "that take another path run code compaction did not see; check the compacted model on such inputs.",
            SlimWarning,
            stacklevel=2,
        )


def _planned(model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs: Any, unknown_ops: str,
             measure: bool, snapshot: Snapshot) -> CompactionPlan:
    """The plan; if planning fails, the model is restored (its forward, run by the plan, may change attributes)."""
    try:
        return plan_compaction(model, masks, example_inputs=example_inputs, unknown_ops=unknown_ops, measure=measure)
    except BaseException:
        snapshot.restore(model)
        raise


def _cut(model: nn.Module, carried: Mapping[str, torch.Tensor], plan: CompactionPlan,
         snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The masks that stay on the compacted model, at its size; if cutting them fails, the model is restored.
    A mask the surgery cuts down to entries it keeps is left out (``plan.whole``: a structured mask whose
    parameter keeps nothing outside its live block; most of a channel-pruned model's, and cutting those
    was most of this step's time)."""
    try:
        return cut_masks(model, {n: m for n, m in carried.items() if n not in plan.whole}, plan.modules)
    except BaseException:
        snapshot.restore(model)
        raise


def _kept(model: nn.Module, plan: CompactionPlan, masks: Mapping[str, torch.Tensor],
          snapshot: Snapshot) -> list[KeptChannels]:
    """The masked channels ``plan`` keeps (see :mod:`slimtorch.compact.explain`); the model is restored on a failure."""
    try:
        return kept_channels(model, plan, canonical_masks(model, masks))
    except BaseException:
        snapshot.restore(model)
        raise


def _warn_kept(model: nn.Module, plan: CompactionPlan, masks: Mapping[str, torch.Tensor],
               kept: list[KeptChannels]) -> None:
    """Say which masked channels stay, how many and why; when nothing went although the masks zero something,
    say that too."""
    if plan.removed_count == 0 and any(not bool(m.all()) for m in masks.values()):
        if kept:
            coupled = any(k.reason.startswith("coupled") for k in kept)
            message = (f"compaction removed no channel: the masks zero whole channels that must stay: "
                       f"{describe_kept(kept)}. The masks stay on the model."
                       + (" A channel goes only when every layer that produces it (or every layer that reads it) is "
                          "masked there; compute_masks(..., example_inputs=...) extends a pruned channel to every "
                          "parameter coupled with it." if coupled else ""))
        else:
            message = ("compaction removed no channel: the masks zero no whole channel of a layer's weights (they "
                       "mask single weights, or only normalisation parameters such as BatchNorm scales); the masks "
                       "stay on the model. To remove channels, mask whole output rows of the layers, e.g. with "
                       "compute_masks(..., example_inputs=...), which extends a pruned channel to every parameter "
                       "that produces it.")
    elif kept:
        message = (f"compaction removed {plan.removed_count} channels, and kept {sum(k.channels for k in kept)} "
                   f"that the masks zero whole: {describe_kept(kept)}. The compacted model computes exactly what "
                   "the masked one does; those channels stay, masked.")
    else:
        return
    warnings.warn(message, SlimWarning, stacklevel=4)  # (the caller of compact_, past its decorator)


def _apply_checked(model: nn.Module, plan: CompactionPlan, example_inputs: Any, verify: bool,
                   snapshot: Snapshot) -> dict[str, Any]:
    """Apply ``plan`` and (``verify``) check the result against the masked model; on any failure, restore
    ``model`` from ``snapshot`` and raise (a :class:`~slimtorch.errors.SlimError` as it is, anything else
    as a :class:`~slimtorch.errors.CompactionError`)."""
    try:
        if not verify:
            reference = None
        elif not plan.graph.measured or plan.graph.training or model.training:  # the check runs in eval mode
            reference = _masked_reference(model, plan, example_inputs)
        else:
            reference = plan.graph.output
        if verify:
            check_finite(reference, example_inputs)
        step, probed = _apply(model, plan, example_inputs)
        if verify:
            verify_result(model, example_inputs, reference, probed)
    except BaseException as err:
        snapshot.restore(model)
        if isinstance(err, SlimError) or not isinstance(err, Exception):
            raise
        tied = "; ".join(" = ".join(names) for names in tied_parameters(model).values())
        advice = (f". The model ties parameters ({tied}): exclude the layers that share them from pruning, or untie "
                  "them (give each layer its own copy) before compacting" if tied else "")
        raise CompactionError(
            f"compaction failed and the model was restored: {type(err).__name__}: {err}{advice}") from err
    return step
