"""Hugging Face attention in the compaction engine: module-level channel rules and shrink functions.

Every attention module with a recognised layout (:mod:`~slimtorch.integrations.hf.layouts`) is one node of the
graph: the engine traces nothing inside it. The classes of ``transformers`` are registered when a model that
holds them is first traced (:func:`register_model_attention`, a trace preparer); a class of your own with a
layout of your own is registered with :func:`register_attention`. HF's ``Conv1D`` (GPT-2) and ``FalconLinear``
get a rule too, so that their MLPs compact through the generic graph like any pair of Linear layers.

An attention head is one unit of the graph (its query, key and value rows, its rows of any other per-head
projection or parameter, and its output-projection columns go together); a head goes when the masks cover all
its producing rows or all its columns in the output projection. With grouped-query attention, a key/value head
goes with the last of its query heads, and every key/value head must keep the same number of query heads:
heads kept for that reason are reported with a :class:`~slimtorch.errors.SlimWarning`. A layout that forbids
removing heads (a norm over every head's channels) blocks them, and the warning says how many stay and why.

    >>> import torch, slimtorch
    >>> from transformers import LlamaConfig, LlamaModel
    >>> from slimtorch.integrations.hf.compaction import unit_masks
    >>> llama = LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=8,
    ...                                num_key_value_heads=2, head_dim=4, intermediate_size=64)).eval()
    >>> masks = unit_masks(llama, {"layers.0.self_attn": [0, 1, 2, 3]})       # a whole key/value group
    >>> slimtorch.compact_(llama, masks, example_inputs={"input_ids": torch.tensor([[1, 2, 3]])})
    >>> llama.layers[0].self_attn.k_proj.out_features, llama.config.num_key_value_heads
    (4, 1)
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimtorch.compact.surgery import register_shrink
from slimtorch.errors import SlimWarning
from slimtorch.graph import Sink, register_module_rule
from slimtorch.graph.layer_rules import channel_labels, consumer_sink, placed
from slimtorch.graph.rules import TRACE_PREPARERS, find_module_rule
from slimtorch.integrations.hf.layouts import (
    AttentionLayout,
    Proj,
    Slice,
    attention_layout,
    set_attention_sizes_,
    use_layout,
)
from slimtorch.prune.granularity import WEIGHT_DIMS

if TYPE_CHECKING:
    from slimtorch.graph import ModuleContext

__all__ = ["ATTENTION_TYPES", "HEADS_ATTR", "register_attention", "register_model_attention", "slice_params_"]

#: attribute of a compacted attention module: ``{"original": heads before any compaction, "kept": [their
#: indices]}`` (the pruned-head record and the ALiBi rows read it)
HEADS_ATTR = "slimtorch_heads"


def _arguments(ctx: ModuleContext) -> dict[str, Any]:
    """The call's arguments by parameter name (positional ones included)."""
    try:
        bound = inspect.signature(ctx.module.forward).bind_partial(*ctx.args, **ctx.kwargs)
    except (TypeError, ValueError):
        return dict(ctx.kwargs)
    return {**bound.arguments, **bound.arguments.get("kwargs", {})}


def _tensor(module: nn.Module, path: str) -> torch.Tensor:
    """A parameter by its path (while traced, the model's parameters are swapped for plain tensors)."""
    owner, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _first(args: dict[str, Any], names: tuple[str, ...]) -> torch.Tensor | None:
    return next((args[n] for n in names if isinstance(args.get(n), torch.Tensor)), None)


# -- the channel rule ------------------------------------------------------------------------------------


def _projection(ctx: ModuleContext, p: Proj, args: dict[str, Any], units: int, read: set) -> torch.Tensor:
    """Labels (units, width) of projection ``p``'s rows per unit (a fused layer gets one member for all its
    outputs); its input dim is tied to what it reads and measured there (once per layer and input)."""
    s = p.rows
    weight = _tensor(ctx.module, s.param)
    name = ctx.param(s.param)
    labels = ctx.graph.fresh(name, s.dim, "out", weight.shape[s.dim])
    bias = getattr(ctx.module.get_submodule(p.layer), "bias", None)
    if isinstance(bias, torch.Tensor):
        ctx.graph.attach(ctx.param(f"{p.layer}.bias"), 0, "out", labels)
    for choice in p.reads:
        x = _first(args, choice)
        if x is None or (name, id(x)) in read:
            continue
        read.add((name, id(x)))
        vec = channel_labels(ctx, x, x.dim() - 1)
        ctx.graph.attach(name, 1 - s.dim, "in", vec)
        consumer_sink(ctx, x, x.dim() - 1, vec, (name, 1 - s.dim, "in"), False)
    return labels[s.grid(units)]


def _one_unit_per_row(ctx: ModuleContext, grid: torch.Tensor) -> None:
    """Tie every label of each row of ``grid`` (heads, head_dim): a head is kept or removed whole."""
    ctx.uf.union(grid[:, :1].expand_as(grid).contiguous(), grid)


def _zero(ctx: ModuleContext, s: Slice, units: int) -> torch.Tensor:
    """Per unit of slice ``s`` of a layer's weight: are its rows and bias all zero (after masking) in this trace?"""
    layer = ctx.module.get_submodule(s.param.rpartition(".")[0])
    grid = s.grid(units)
    dead = ~(layer.weight.detach().movedim(s.dim, 0)[grid.reshape(-1)] != 0).reshape(units, -1).any(dim=1)
    if getattr(layer, "bias", None) is not None:
        dead &= ~(layer.bias.detach()[grid.reshape(-1)] != 0).reshape(units, -1).any(dim=1)
    return dead


def _gqa_plan(ctx: ModuleContext, lay: AttentionLayout, heads: torch.Tensor, kv: torch.Tensor) -> None:
    """Grouped-query attention: a key/value head goes with its last query head, and every key/value head
    keeps as many query heads (HF computes the group size once per layer). Decided on the masked
    weights of this trace (an output-projection column or a value row of zeros), before the engine
    plans: heads that must stay are blocked, a key/value head that goes is tied to its query heads."""
    o = _tensor(ctx.module, lay.o.param).detach().movedim(lay.o.dim, 0)
    cols = o[lay.o.grid(lay.heads).reshape(-1)].reshape(lay.heads, -1)  # (heads, d * hidden): head h's columns
    gone = ~(cols != 0).any(dim=1) | _zero(ctx, lay.v.rows, lay.kv_heads).repeat_interleave(lay.group)
    groups = gone.reshape(lay.kv_heads, lay.group)  # (kv heads, query heads per kv head)
    keep_kv = [g for g in range(lay.kv_heads) if not groups[g].all()] or [0]
    per_group = max(int((~groups[g]).sum()) for g in keep_kv) or 1
    held = 0
    for g in range(lay.kv_heads):
        if g not in keep_kv:
            ctx.uf.union(kv[g : g + 1].expand(lay.group).contiguous(), heads[g * lay.group : (g + 1) * lay.group])
            continue
        ctx.graph.block(kv[g : g + 1], f"a key/value head with query heads left ({ctx.module_name})")
        extra = [h for h in range(lay.group) if groups[g, h]][: per_group - int((~groups[g]).sum())]
        why = f"so that every key/value head keeps {per_group} query heads"
        for h in extra:
            ctx.graph.block(heads[g * lay.group + h :][:1], why)
        held += len(extra)
    if held:
        warnings.warn(f"{ctx.module_name}: {held} query heads that the masks remove stay (with zero weights), so "
                      f"that every key/value head keeps {per_group} query heads", SlimWarning, stacklevel=2)


def _warn_refused(ctx: ModuleContext, lay: AttentionLayout) -> None:
    """Heads the masks remove (value rows or output columns all zero) that this layout cannot let go."""
    gone = _zero(ctx, lay.v.rows, lay.kv_heads).repeat_interleave(lay.group)
    if lay.o is not None:
        o = _tensor(ctx.module, lay.o.param).detach().movedim(lay.o.dim, 0)
        gone |= ~(o[lay.o.grid(lay.heads).reshape(-1)] != 0).reshape(lay.heads, -1).any(dim=1)
    if bool(gone.any()):
        warnings.warn(f"{ctx.module_name}: {int(gone.sum())} of its {lay.heads} heads that the masks remove stay (with "
                      f"zero weights): {lay.refuse}, so removing a head would change what it computes", SlimWarning,
                      stacklevel=2)


def _heads(ctx: ModuleContext, lay: AttentionLayout,
           args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels of the query heads (heads, d), key heads and value heads (kv heads, d), every per-head member
    tied."""
    read: set = set()
    q = _projection(ctx, lay.q, args, lay.heads, read)
    k = _projection(ctx, lay.k, args, lay.kv_heads, read)
    v = _projection(ctx, lay.v, args, lay.kv_heads, read)
    ctx.uf.union(k, v)
    _one_unit_per_row(ctx, q)
    _one_unit_per_row(ctx, k)
    for p in lay.more:
        ctx.uf.union(_projection(ctx, p, args, lay.heads, read), q)
    if lay.kv_heads == lay.heads:
        ctx.uf.union(q, k)
    for s in lay.per_head:  # one entry per head (T5's relative bias columns)
        ctx.graph.attach(ctx.param(s.param), s.dim, "out", q[:, 0].contiguous())
    if lay.head_state is not None:  # a per-head tensor from an earlier layer: its heads are these heads
        state = args.get(lay.head_state[0])
        labels = ctx.labels(state) if isinstance(state, torch.Tensor) else None
        if labels is not None and state.dim() > 1 and state.shape[1] == lay.heads:
            ctx.uf.union(channel_labels(ctx, state, 1), q[:, 0].contiguous())
    if lay.refuse:
        ctx.graph.block(q, f"{lay.refuse} ({ctx.module_name})")
        _warn_refused(ctx, lay)
    return q, k, v


def _output_projection(ctx: ModuleContext, lay: AttentionLayout, q: torch.Tensor, k: torch.Tensor,
                       args: dict[str, Any]) -> torch.Tensor:
    """The output projection: its columns per head are the heads' channels (a column reads zeros where the
    value rows are zero); returns the labels of its outputs (tied to the residual added inside, if any)."""
    o_name = ctx.param(lay.o.param)
    o = _tensor(ctx.module, lay.o.param)
    cols = torch.full((o.shape[lay.o.dim],), -1, dtype=torch.long)
    cols[lay.o.grid(lay.heads).reshape(-1)] = q.reshape(-1)  # head h's output lands in its columns
    ctx.graph.attach(o_name, lay.o.dim, "in", cols)
    zero = _zero(ctx, lay.v.rows, lay.kv_heads).repeat_interleave(lay.group)  # (heads,): value provably 0
    absmax = torch.ones(cols.shape)
    absmax[lay.o.grid(lay.heads).reshape(-1)] = (~zero).float().repeat_interleave(lay.head_dim)
    ctx.graph.sinks.append(Sink("consumer", cols, absmax, torch.zeros_like(absmax), absmax,
                                member=(o_name, lay.o.dim, "in")))
    if lay.kv_heads != lay.heads:
        _gqa_plan(ctx, lay, q[:, 0], k[:, 0])
    layer = lay.o.param.rpartition(".")[0]
    produced = ctx.graph.fresh(o_name, 1 - lay.o.dim, "out", o.shape[1 - lay.o.dim])
    if getattr(ctx.module.get_submodule(layer), "bias", None) is not None:
        ctx.graph.attach(ctx.param(f"{layer}.bias"), 0, "out", produced)
    residual = args.get(lay.residual) if lay.residual else None
    if isinstance(residual, torch.Tensor):  # added inside the module: channel i of both is one channel
        ctx.uf.union(produced, channel_labels(ctx, residual, residual.dim() - 1))
    if lay.norm is not None:  # a LayerNorm over the sum, inside the module: its statistics count every channel
        for attr in ("weight", "bias"):
            ctx.graph.attach(ctx.param(f"{lay.norm}.{attr}"), 0, "norm", produced)
        ctx.graph.block(produced, f"normalised inside the attention module ({ctx.module_name})")
    return produced


def _set_outputs(ctx: ModuleContext, lay: AttentionLayout, main: torch.Tensor, q: torch.Tensor) -> None:
    outs = ctx.out if isinstance(ctx.out, tuple) else (ctx.out,)
    out = outs[0]
    ctx.set_labels(out, placed(main, out.dim(), out.dim() - 1))
    state = lay.head_state[1] if lay.head_state else None
    for i, extra in enumerate(outs[1:], 1):  # attention probabilities: no channels; a passed-on bias: the heads
        heads = isinstance(extra, torch.Tensor) and i == state and extra.dim() > 1 and extra.shape[1] == lay.heads
        ctx.set_labels(extra, placed(q[:, 0].contiguous(), extra.dim(), 1) if heads else None)


def _attention_rule(ctx: ModuleContext) -> None:
    ctx.require_values()  # the head plan reads the (masked) projection weights
    lay = attention_layout(ctx.module)
    args = _arguments(ctx)
    x = _first(args, lay.q.reads[0]) if lay is not None else None
    if lay is None or x is None:
        ctx.graph.unknown.append((type(ctx.module).__name__, ctx.module_name, [ctx.labels(x)]))
        return
    q, k, v = _heads(ctx, lay, args)
    if lay.o is None:  # the output projection is outside: it reads the value channels, head by head
        _set_outputs(ctx, lay, v.repeat_interleave(lay.group, dim=0).reshape(-1), q)
        return
    _set_outputs(ctx, lay, _output_projection(ctx, lay, q, k, args), q)


# -- shrink functions --------------------------------------------------------------------------------------


def slice_params_(module: nn.Module, keeps: dict[str, dict[int, torch.Tensor]]) -> None:
    """Keep indices ``keeps[param][dim]`` of parameters named relative to ``module`` (new tensors)."""
    for param, dims in keeps.items():
        owner_name, _, attr = param.rpartition(".")
        owner = module.get_submodule(owner_name)
        tensor = getattr(owner, attr)
        new = tensor.detach()
        for dim, index in sorted(dims.items()):
            new = new.index_select(dim, index.to(new.device))
        setattr(owner, attr, nn.Parameter(new.contiguous(), requires_grad=tensor.requires_grad))


def by_param(keeps: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """The engine's ``"attr:role:dim"`` keys as ``{attr: {dim: indices}}``."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, index in keeps.items():
        attr, _role, dim = key.split(":")
        out.setdefault(attr, {})[int(dim)] = torch.as_tensor(index, dtype=torch.long)
    return out


def _kept_units(s: Slice, keeps: dict[str, dict[int, torch.Tensor]], units: int) -> list[int]:
    """The units of slice ``s`` whose first position survives ``keeps`` (all of them when it is not cut)."""
    index = keeps.get(s.param, {}).get(s.dim)
    if index is None:
        return list(range(units))
    kept = set(index.tolist())
    return [u for u in range(units) if s.start(u) in kept]


class AlibiHeads:
    """Forward pre-hook of a compacted attention module whose model builds ALiBi biases for every original
    head, ``(batch * original, 1, keys)``: keeps the rows of this layer's heads. An object (not a closure), so
    that ``copy.deepcopy`` copies it."""

    def __init__(self, arg: str, position: int) -> None:
        self.arg, self.position = arg, position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        heads = getattr(module, HEADS_ATTR)
        if self.arg in kwargs:
            kwargs = {**kwargs, self.arg: self._rows(kwargs[self.arg], heads)}
        elif len(args) > self.position:
            args = (*args[: self.position], self._rows(args[self.position], heads), *args[self.position + 1 :])
        return args, kwargs

    @staticmethod
    def _rows(alibi: Any, heads: dict) -> Any:
        if not isinstance(alibi, torch.Tensor) or alibi.shape[0] % heads["original"]:
            return alibi
        keep = torch.tensor(heads["kept"], device=alibi.device)
        per = alibi.reshape(-1, heads["original"], *alibi.shape[1:])  # (batch, original heads, 1, keys)
        return per.index_select(1, keep).reshape(-1, *alibi.shape[1:])


def _record_heads_(m: nn.Module, lay: AttentionLayout, kept: list[int]) -> None:
    """Update the module's record of its original heads that stay; hook the ALiBi selection once."""
    old = getattr(m, HEADS_ATTR, None) or {"original": lay.heads, "kept": list(range(lay.heads))}
    setattr(m, HEADS_ATTR, {"original": old["original"], "kept": [old["kept"][h] for h in kept]})
    if lay.alibi is not None and not any(isinstance(h, AlibiHeads) for h in m._forward_pre_hooks.values()):
        names = list(inspect.signature(m.forward).parameters)
        position = names.index(lay.alibi) if lay.alibi in names else 1 << 30
        m.register_forward_pre_hook(AlibiHeads(lay.alibi, position), with_kwargs=True)


def _shrink_attention(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    lay = attention_layout(m)  # (read before the surgery: it measures the heads on the weights)
    cut = by_param(keeps)
    kept = _kept_units(lay.q.rows, cut, lay.heads)
    kept_kv = _kept_units(lay.k.rows, cut, lay.kv_heads)
    slice_params_(m, cut)
    set_attention_sizes_(m, lay, len(kept), len(kept_kv))
    if len(kept) != lay.heads or getattr(m, HEADS_ATTR, None) is not None:
        _record_heads_(m, lay, kept)


# -- HF's linear layers --------------------------------------------------------------------------------------


def _linear_module(ctx: ModuleContext, in_dim: int, width: int) -> None:
    """A module computing ``x @ W + b`` for a weight whose input channels lie on ``in_dim``."""
    x = ctx.args[0] if ctx.args else next(iter(ctx.kwargs.values()))
    vec = channel_labels(ctx, x, x.dim() - 1)
    name = ctx.param("weight")
    ctx.graph.attach(name, in_dim, "in", vec)
    produced = ctx.graph.fresh(name, 1 - in_dim, "out", width)
    if ctx.module.bias is not None:
        ctx.graph.attach(ctx.param("bias"), 0, "out", produced)
    # (a bias folds a constant input channel into it: as for nn.Linear, whose weight is (out, in))
    consumer_sink(ctx, x, x.dim() - 1, vec, (name, in_dim, "in"), in_dim == 1 and ctx.module.bias is not None)
    ctx.set_labels(ctx.out, placed(produced, ctx.out.dim(), ctx.out.dim() - 1))


@register_module_rule(Conv1D)
def _conv1d_rule(ctx: ModuleContext) -> None:
    """HF's Conv1D: ``x @ weight + bias`` with weight (in, out), i.e. a Linear layer stored transposed."""
    _linear_module(ctx, 0, ctx.module.nf)


def _shrink_conv1d(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    slice_params_(m, by_param(keeps))
    m.nx, m.nf = m.weight.shape


register_shrink("hf_conv1d", Conv1D)(_shrink_conv1d)
WEIGHT_DIMS[Conv1D] = (1, 0)  # (pruning reads its output channels from dim 1)


def _linear_subclass_rule(ctx: ModuleContext) -> None:
    """A subclass of ``nn.Linear`` whose forward computes ``x @ weight.T + bias`` itself (Falcon's)."""
    _linear_module(ctx, 1, ctx.module.out_features)


# -- a relative position bias table outside the attention (BEiT) --------------------------------------------


def _is_bias_table(module: nn.Module) -> bool:
    """A module whose only parameter is a ``relative_position_bias_table`` (relative distances, heads)."""
    params = dict(module.named_parameters())
    return list(params) == ["relative_position_bias_table"] and params["relative_position_bias_table"].dim() == 2


def _bias_table_rule(ctx: ModuleContext) -> None:
    """Its output (1, heads, queries, keys) gathers rows of the table: head ``h`` of the output is column ``h``."""
    table = _tensor(ctx.module, "relative_position_bias_table")
    heads = ctx.graph.fresh(ctx.param("relative_position_bias_table"), 1, "out", table.shape[1])
    if isinstance(ctx.out, torch.Tensor) and ctx.out.dim() > 1 and ctx.out.shape[1] == table.shape[1]:
        ctx.set_labels(ctx.out, placed(heads, ctx.out.dim(), 1))
    else:  # (an output of another shape: its heads cannot be followed)
        ctx.graph.block(heads, f"a relative position bias of an unknown shape ({ctx.module_name})")


def _shrink_bias_table(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    slice_params_(m, by_param(keeps))


# -- registration --------------------------------------------------------------------------------------------

#: attention classes handled by the rule above (extend with :func:`register_attention`)
ATTENTION_TYPES: list[type] = []


def register_attention(*types: type, layout: Callable[[nn.Module], AttentionLayout | None] | None = None) -> None:
    """Handle attention classes as one node of the graph each. ``layout``: a function ``module -> AttentionLayout``
    for a layout of your own (the built-in recognisers are tried otherwise, on each module when it is traced)."""
    if layout is not None:
        use_layout(types, layout)
    register_module_rule(*types)(_attention_rule)
    register_shrink("hf_attention", *types, claims_children=True)(_shrink_attention)
    ATTENTION_TYPES.extend(t for t in types if t not in ATTENTION_TYPES)


_SEEN: set[type] = set()


def register_model_attention(model: Any) -> None:
    """Register the attention classes of ``transformers`` found in ``model`` whose layout is recognised, and its
    ``nn.Linear`` subclasses with a forward of their own (a trace preparer: run as every trace starts)."""
    if not isinstance(model, nn.Module):
        return
    for module in model.modules():
        cls = type(module)
        if cls in _SEEN or not cls.__module__.startswith("transformers."):
            continue
        _SEEN.add(cls)
        if isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward:
            register_module_rule(cls)(_linear_subclass_rule)
        elif _is_bias_table(module) and find_module_rule(module) is None:
            register_module_rule(cls)(_bias_table_rule)
            register_shrink("hf_bias_table", cls)(_shrink_bias_table)
        elif find_module_rule(module) is None and attention_layout(module) is not None:
            register_attention(cls)


TRACE_PREPARERS.append(register_model_attention)
