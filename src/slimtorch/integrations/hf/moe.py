"""Mixtures of experts (Mixtral, Qwen2-MoE, OLMoE): whole experts and the neurons of each expert.

A mixture-of-experts block holds a router (``gate``: one row of weights per expert, then a softmax and a top-k
choice) and the experts' weights as 3-D tensors (``gate_up_proj`` (experts, 2 * neurons, hidden), ``down_proj``
(experts, hidden, neurons)). Both are one node each of the compaction graph (their hidden channels compact like
a Linear layer's); routing is data, never channels, so the engine never removes an expert on its own.

**Neurons of an expert.** Masks that zero neurons of an expert (its gate or up rows, or its down column: see
:func:`~slimtorch.integrations.hf.compaction.unit_masks` on a block ``<experts>[<e>]``) are compacted after the
rest of the model (:func:`compact_expert_neurons_`, run by :func:`slimtorch.compact_`): a masked neuron adds
exactly zero, so removing it is exact. The experts of a block share one tensor, so each keeps the same number of
neurons, a multiple of 16 bytes' worth (the row stride transformers' grouped matrix products need); neurons kept
for these reasons stay with zero weights, and a :class:`~slimtorch.errors.SlimWarning` says how many.

**Whole experts.** Removing an expert changes the routing: the router no longer offers it, and the softmax over
the remaining experts is renormalised. :func:`disabled_experts` runs a model as if those experts were removed
(their router logits at minus infinity: never chosen, no share of the softmax), the masked model of expert
pruning; :func:`prune_experts_` removes them (router rows and expert weights together) and computes what the
model computed under :func:`disabled_experts`::

    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> moe = MixtralForCausalLM(MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                                        num_key_value_heads=2, intermediate_size=64, vocab_size=50,
    ...                                        num_local_experts=4, num_experts_per_tok=2)).eval()
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with torch.no_grad(), disabled_experts(moe, {"model.layers.0.mlp": [1, 3]}):
    ...     expected = moe(input_ids=ids).logits
    >>> prune_experts_(moe, {"model.layers.0.mlp": [1, 3]})
    >>> moe.model.layers[0].mlp.gate.weight.shape, moe.config.num_local_experts
    (torch.Size([2, 32]), 2)
    >>> torch.allclose(moe(input_ids=ids).logits, expected, atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slimtorch.compact.surgery import register_shrink
from slimtorch.errors import CompactionError, ConfigError, NoMatchError, SlimWarning, closest
from slimtorch.graph import register_module_rule
from slimtorch.graph.layer_rules import channel_labels, consumer_sink, placed
from slimtorch.graph.rules import TRACE_PREPARERS
from slimtorch.integrations.hf.configs import BEFORE_KEY, fit_config_
from slimtorch.integrations.hf.rules import by_param, slice_params_
from slimtorch.integrations.hf.units import experts_layout
from slimtorch.masks import COMPACTION_ATTR, apply_masks_, get_masks, remove_masks_

if TYPE_CHECKING:
    from slimtorch.graph import ModuleContext

__all__ = ["compact_expert_neurons_", "disabled_experts", "moe_blocks", "prune_experts_", "router_of"]


def _router(m: object) -> bool:
    weight = getattr(m, "weight", None)
    return isinstance(m, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
        and isinstance(getattr(m, "top_k", None), int)


#: the names a mixture-of-experts block gives its router (Mixtral, Qwen-MoE, OLMoE: ``gate``; Granite: ``router``)
_ROUTER_NAMES = ("gate", "router")


def router_of(block: nn.Module) -> nn.Module:
    """The router of a mixture-of-experts block (see :func:`moe_blocks`)."""
    return next(getattr(block, n) for n in _ROUTER_NAMES if _router(getattr(block, n, None)))


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every mixture-of-experts block of ``model`` (a router, ``gate`` or ``router``, and ``experts`` with 3-D
    weights), by name."""
    found = {}
    for name, m in model.named_modules():
        gate = next((r for r in (getattr(m, n, None) for n in _ROUTER_NAMES) if _router(r)), None)
        experts = getattr(m, "experts", None)
        layout = experts_layout(experts) if isinstance(experts, nn.Module) else None
        if _router(gate) and layout is not None and gate.weight.shape[0] == layout[0]:
            found[name] = m
    return found


# -- the channel rules: hidden channels only ------------------------------------------------------------------


def _hidden_input(ctx: ModuleContext) -> torch.Tensor:
    return ctx.args[0] if ctx.args else ctx.kwargs["hidden_states"]


def _router_rule(ctx: ModuleContext) -> None:
    """``softmax(x @ W.T)`` and a top-k choice: hidden channels are the weight's columns; the expert rows stay."""
    x = _hidden_input(ctx)
    vec = channel_labels(ctx, x, x.dim() - 1)
    name = ctx.param("weight")
    ctx.graph.attach(name, 1, "in", vec)
    consumer_sink(ctx, x, x.dim() - 1, vec, (name, 1, "in"), False)
    rows = ctx.graph.fresh(name, 0, "out", ctx.module.weight.shape[0])
    if isinstance(getattr(ctx.module, "bias", None), torch.Tensor):
        ctx.graph.attach(ctx.param("bias"), 0, "out", rows)
    ctx.graph.block(rows, f"an expert's router row ({ctx.module_name}): experts go with prune_experts_, which "
                          "removes the expert with its row")
    for out in ctx.out if isinstance(ctx.out, tuple) else (ctx.out,):
        ctx.set_labels(out, None)  # logits, weights and indices per expert: routing, not channels


def _experts_rule(ctx: ModuleContext) -> None:
    """Every expert reads the hidden channels (``gate_up_proj``'s last dim) and writes them (``down_proj``'s
    dim 1); the neurons inside an expert are compacted by :func:`compact_expert_neurons_`."""
    x = _hidden_input(ctx)
    vec = channel_labels(ctx, x, x.dim() - 1)
    name = ctx.param("gate_up_proj")
    ctx.graph.attach(name, 2, "in", vec)
    consumer_sink(ctx, x, x.dim() - 1, vec, (name, 2, "in"), False)
    produced = ctx.graph.fresh(ctx.param("down_proj"), 1, "out", ctx.module.down_proj.shape[1])
    if isinstance(getattr(ctx.module, "down_proj_bias", None), torch.Tensor):
        ctx.graph.attach(ctx.param("down_proj_bias"), 1, "out", produced)
    ctx.set_labels(ctx.out, placed(produced, ctx.out.dim(), ctx.out.dim() - 1))


def _shrink_router(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    slice_params_(m, by_param(keeps))
    m.num_experts, m.hidden_dim = m.weight.shape


def _cut_neurons(tensors: dict[str, torch.Tensor], kept: torch.Tensor, neurons: int) -> dict[str, torch.Tensor]:
    """Keep, for each expert e (dim 0), its neurons ``kept[e]`` (experts, kept per expert): both halves of its
    gate/up rows, its down columns."""
    out = {}
    for attr, t in tensors.items():
        dim, index = (2, kept) if attr == "down_proj" else (1, torch.cat([kept, kept + neurons], dim=1))
        shape = [t.shape[0], 1, 1][: t.dim()]
        shape[dim] = index.shape[1]
        size = list(t.shape)
        size[dim] = index.shape[1]
        out[attr] = t.gather(dim, index.to(t.device).reshape(shape).expand(size))
    return out


_NEURON_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj")


def _shrink_experts(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    """Hidden channels (the engine's ``attr:role:dim`` keys) or each expert's neurons (``expert:<e>:neurons``)."""
    per_expert = {int(k.split(":")[1]): torch.as_tensor(v) for k, v in keeps.items() if k.startswith("expert:")}
    slice_params_(m, by_param({k: v for k, v in keeps.items() if not k.startswith("expert:")}))
    if per_expert:
        kept = torch.stack([per_expert[e] for e in range(m.down_proj.shape[0])])  # (experts, kept neurons)
        params = {a: getattr(m, a) for a in _NEURON_PARAMS if isinstance(getattr(m, a, None), nn.Parameter)}
        cut = _cut_neurons({a: p.detach() for a, p in params.items()}, kept, m.down_proj.shape[2])
        for attr, new in cut.items():
            setattr(m, attr, nn.Parameter(new.contiguous(), requires_grad=params[attr].requires_grad))
    m.num_experts, m.hidden_dim, m.intermediate_dim = m.down_proj.shape


register_shrink("hf_router")(_shrink_router)
register_shrink("hf_experts")(_shrink_experts)
_SEEN: set[type] = set()


def register_model_experts(model: Any) -> None:
    """Register the router and expert classes of the mixture-of-experts blocks in ``model`` (a trace preparer)."""
    if not isinstance(model, nn.Module):
        return
    for block in moe_blocks(model).values():
        for module, rule, kind in ((router_of(block), _router_rule, "hf_router"), (block.experts, _experts_rule,
                                                                             "hf_experts")):
            if type(module) not in _SEEN:
                _SEEN.add(type(module))
                register_module_rule(type(module))(rule)
                register_shrink(kind, type(module))(_shrink_router if kind == "hf_router" else _shrink_experts)


TRACE_PREPARERS.append(register_model_experts)


# -- the neurons of each expert ----------------------------------------------------------------------------------


def _dead_neurons(m: nn.Module, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(experts, neurons): neurons whose output the masks make exactly zero (down column masked, up rows masked,
    or gate rows masked under an activation that maps 0 to 0)."""
    experts, neurons = experts_layout(m)
    dead = torch.zeros(experts, neurons, dtype=torch.bool)
    if "down_proj" in masks:
        dead |= ~masks["down_proj"].any(dim=1)  # (experts, neurons): a column of zeros
    if "gate_up_proj" in masks:
        rows = ~masks["gate_up_proj"].any(dim=2)  # (experts, 2 * neurons)
        if "gate_up_proj_bias" in masks:
            rows &= ~masks["gate_up_proj_bias"]
        elif isinstance(getattr(m, "gate_up_proj_bias", None), torch.Tensor):
            rows &= False
        act = getattr(m, "act_fn", None)
        zero_preserving = callable(act) and float(act(torch.zeros(1))[0]) == 0.0
        dead |= rows[:, neurons:] | (rows[:, :neurons] & zero_preserving)
    return dead


def _neuron_keeps(dead: torch.Tensor, align: int) -> tuple[dict[str, list[int]], int]:
    """Neurons each expert keeps (the same number for all: the most any expert needs, rounded up to a multiple of
    ``align``; dead ones first to stay)."""
    keep = min(-(-int((~dead).sum(dim=1).max().clamp(min=1)) // align) * align, dead.shape[1])
    keeps = {}
    for e, row in enumerate(dead):
        alive = torch.nonzero(~row).flatten().tolist()
        held = torch.nonzero(row).flatten().tolist()[: keep - len(alive)]
        keeps[f"expert:{e}:neurons"] = sorted(alive + held)
    held_total = dead.shape[0] * keep - int((~dead).sum())
    return keeps, held_total


def compact_expert_neurons_(model: nn.Module) -> None:
    """Remove the neurons of each expert that the masks on the model make zero (run by :func:`slimtorch.compact_`
    after it compacted the rest: the masks it keeps on the model are the ones it could not remove). Recorded as a
    step of ``model.slimtorch_compaction`` (replayed by the loaders)."""
    step: dict[str, Any] = {"modules": {}, "fixes": []}
    for block_name, block in moe_blocks(model).items():
        m, name = block.experts, f"{block_name}.experts" if block_name else "experts"
        masks = {k: v for k, v in get_masks(m).items() if "." not in k}
        dead = _dead_neurons(m, masks) if masks else None
        if dead is None or not bool(dead.any()):
            continue
        # grouped matrix products (transformers' experts kernels) need rows of a multiple of 16 bytes
        keeps, held = _neuron_keeps(dead, max(1, 16 // m.down_proj.element_size()))
        if held:  # (also when that leaves every neuron: masks that remove nothing say so)
            warnings.warn(f"{name}: {held} expert neurons that the masks remove stay (with zero weights), so that "
                          f"every expert keeps {len(next(iter(keeps.values())))} neurons (the same number, a multiple "
                          "of 16 bytes)", SlimWarning, stacklevel=3)
        if all(len(v) == dead.shape[1] for v in keeps.values()):
            continue
        remove_masks_(m)  # (the masks are cut with the weights, then applied again)
        index = {k: torch.tensor(v) for k, v in keeps.items()}
        _shrink_experts(m, index, {})
        kept = torch.stack(list(index.values()))
        cut = _cut_neurons({k: v for k, v in masks.items() if k in _NEURON_PARAMS}, kept, dead.shape[1])
        apply_masks_(m, {k: v for k, v in {**masks, **cut}.items() if not bool(v.all())})
        step["modules"][name] = {"kind": "hf_experts", "keeps": keeps, "options": {}}
    if step["modules"]:
        info = getattr(model, COMPACTION_ATTR, None) or {}
        info["steps"] = [*info.get("steps", []), step]
        info["params_after"] = sum(p.numel() for p in model.parameters())
        setattr(model, COMPACTION_ATTR, info)


# -- whole experts ------------------------------------------------------------------------------------------------


def _check_experts(model: nn.Module, experts: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    blocks = moe_blocks(model)
    out = {}
    for name, chosen in experts.items():
        if name not in blocks:
            raise NoMatchError(f"{name!r} is no mixture-of-experts block of the model; {closest(name, blocks)}")
        total, chosen = router_of(blocks[name]).weight.shape[0], sorted(set(chosen))
        if any(not isinstance(e, int) or not 0 <= e < total for e in chosen):
            raise ConfigError(f"expert indices of {name!r} must be in 0..{total - 1}, got {chosen}")
        top_k = router_of(blocks[name]).top_k
        if total - len(chosen) < top_k:
            raise ConfigError(f"{name!r} routes each token to {top_k} experts; removing {len(chosen)} of {total} "
                              f"would leave {total - len(chosen)}: keep at least {top_k}")
        out[name] = chosen
    return out


class _RouteAround(TorchFunctionMode):
    """Inside a router's forward: its logits for the ``gone`` experts are minus infinity."""

    def __init__(self, weight: torch.Tensor, gone: list[int]) -> None:
        super().__init__()
        self.weight, self.gone = weight, gone

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
        if func is torch.nn.functional.linear and weight is self.weight:
            out = out.index_fill(-1, torch.tensor(self.gone, device=out.device), float("-inf"))
        return out


@contextlib.contextmanager
def disabled_experts(model: nn.Module, experts: Mapping[str, Iterable[int]]) -> Iterator[None]:
    """Run ``model`` as if the ``experts`` (``{block name: [expert indices]}``) were removed: never routed to,
    and no share of the router's softmax. What :func:`prune_experts_` then computes."""
    chosen = _check_experts(model, experts)
    handles = []
    for name, gone in chosen.items():
        gate = router_of(model.get_submodule(name))
        mode = _RouteAround(gate.weight, gone)
        handles.append(gate.register_forward_pre_hook(lambda m, a, mode=mode: mode.__enter__() and None))
        handles.append(gate.register_forward_hook(lambda m, a, o, mode=mode: mode.__exit__(None, None, None),
                                                  always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _shrink_moe(block: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    """Keep experts ``keeps["experts:keep:0"]``: the router's rows and the experts' weights (dim 0)."""
    kept = torch.as_tensor(keeps["experts:keep:0"], dtype=torch.long)
    gate, experts = router_of(block), block.experts
    router = next(n for n in _ROUTER_NAMES if getattr(block, n, None) is gate)
    # every parameter of the router and of the experts has one entry per expert on dim 0
    slice_params_(block, {f"{prefix}.{n}": {0: kept} for prefix, owner in ((router, gate), ("experts", experts))
                          for n, _ in owner.named_parameters()})
    gate.num_experts = experts.num_experts = len(kept)


register_shrink("hf_moe")(_shrink_moe)


def prune_experts_(model: nn.Module, experts: Mapping[str, Iterable[int]]) -> None:
    """Remove whole experts: ``{block name: [expert indices]}`` (see :func:`moe_blocks`); each goes with its router
    row. The result computes what ``model`` computes under :func:`disabled_experts`. The config's expert count
    is updated where every block keeps the same number and the config can say so; the removal is recorded as a
    compaction step (replayed by the loaders)."""
    chosen = _check_experts(model, experts)
    if any(get_masks(model.get_submodule(n)) for n in chosen):
        raise CompactionError("the mixture-of-experts blocks carry masks; compact them (slimtorch.compact_) or "
                              "remove_masks_ first")
    step: dict[str, Any] = {"modules": {}, "fixes": []}
    before = sum(p.numel() for p in model.parameters())
    for name, gone in chosen.items():
        block = model.get_submodule(name)
        kept = [e for e in range(router_of(block).weight.shape[0]) if e not in gone]
        keeps = {"experts:keep:0": kept}
        _shrink_moe(block, {k: torch.tensor(v) for k, v in keeps.items()}, {})
        step["modules"][name] = {"kind": "hf_moe", "keeps": keeps, "options": {}}
    info = getattr(model, COMPACTION_ATTR, None) or {}
    info.update(steps=[*info.get("steps", []), step], params_before=info.get("params_before", before),
                params_after=sum(p.numel() for p in model.parameters()))
    info.setdefault("pruned_experts", {}).update({n: g for n, g in chosen.items()})
    setattr(model, COMPACTION_ATTR, info)
    counts = {router_of(b).weight.shape[0] for b in moe_blocks(model).values()}
    if len(counts) == 1 and getattr(model, "config", None) is not None:
        names = [f"{n}.experts.down_proj" for n in moe_blocks(model)]
        for key in ("num_local_experts", "num_experts"):
            if isinstance(getattr(model.config, key, None), int):
                info[BEFORE_KEY] = {**info.get(BEFORE_KEY, {})}
                fit_config_(model, {key: counts.pop()}, names, info[BEFORE_KEY])
                break
