"""Hugging Face attention in the compaction engine: module-level channel rules and shrink functions.

Importing this module registers, with :func:`slimtorch.graph.register_module_rule` and
:func:`slimtorch.compact.register_shrink`, one rule per attention layout (the engine traces nothing inside
these modules):

* ``query/key/value`` cores (BERT's ``BertSelfAttention``): the output projection lies outside, so the
  generic Linear rule reads the heads' channels and measures them;
* ``q_proj/k_proj/v_proj/o_proj`` attention (LLaMA with grouped-query attention, ViT);
* GPT-2's fused ``c_attn``/``c_proj`` (HF ``Conv1D``, weights stored (in, out)); ``Conv1D`` itself also
  gets a rule, so GPT-2's MLP compacts through the generic graph like any pair of Linear layers.

An attention head is one unit of the graph (its query, key and value rows and its output-projection
columns go together); a head goes when the masks cover all its producing rows or all its columns in
the output projection. With grouped-query attention, a key/value head goes with the last of its query
heads, and every key/value head must keep the same number of query heads: heads kept for that reason
are reported with a :class:`~slimtorch.errors.SlimWarning`. Feed-forward blocks need no rule of their own.

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

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.vit.modeling_vit import ViTAttention
from transformers.pytorch_utils import Conv1D

from slimtorch.compact.surgery import register_shrink
from slimtorch.errors import CompactionError, SlimWarning
from slimtorch.graph import Sink, register_module_rule
from slimtorch.graph.layer_rules import channel_labels, consumer_sink, placed

if TYPE_CHECKING:
    from slimtorch.graph import ModuleContext

__all__ = ["ATTENTION_TYPES", "attention_layout", "register_attention", "set_attention_sizes_"]


@dataclass(frozen=True)
class _Proj:
    """A projection ``layer`` (child name) whose ``out_dim`` (1 for ``Conv1D``) holds heads from ``offset``."""

    layer: str
    out_dim: int
    offset: int = 0


@dataclass(frozen=True)
class Layout:
    """Where the heads of an attention module live: ``q``, ``k``, ``v`` projections, the output projection
    ``o`` (None when it lies outside the module) and ``heads``/``kv_heads`` of width ``head_dim``."""

    q: _Proj
    k: _Proj
    v: _Proj
    o: _Proj | None
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _width(layer: nn.Module, out_dim: int) -> int:
    return layer.weight.shape[out_dim]


def attention_layout(m: nn.Module) -> Layout | None:
    """The :class:`Layout` of a recognised attention module (duck-typed), else None."""
    if all(isinstance(getattr(m, k, None), nn.Linear) for k in ("query", "key", "value")) and hasattr(
            m, "attention_head_size"):
        d = m.attention_head_size
        heads = m.query.out_features // d
        return Layout(_Proj("query", 0), _Proj("key", 0), _Proj("value", 0), None, heads, heads, d)
    if all(isinstance(getattr(m, k, None), nn.Linear) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        d = m.head_dim
        return Layout(_Proj("q_proj", 0), _Proj("k_proj", 0), _Proj("v_proj", 0), _Proj("o_proj", 0),
                      m.q_proj.out_features // d, m.k_proj.out_features // d, d)
    if isinstance(getattr(m, "c_attn", None), Conv1D) and isinstance(getattr(m, "c_proj", None), Conv1D):
        e, d = m.c_attn.nf // 3, m.head_dim  # c_attn's columns: query, key and value, e each
        return Layout(_Proj("c_attn", 1), _Proj("c_attn", 1, e), _Proj("c_attn", 1, 2 * e), _Proj("c_proj", 1),
                      e // d, e // d, d)
    return None


def set_attention_sizes_(m: nn.Module) -> None:
    """Set an attention module's size attributes from its (sliced) weights; raises
    :class:`~slimtorch.errors.CompactionError` when the heads no longer fit Hugging Face's layout."""
    for child in m.children():
        if isinstance(child, nn.Linear):
            child.out_features, child.in_features = child.weight.shape
        elif isinstance(child, Conv1D):
            child.nx, child.nf = child.weight.shape
    if hasattr(m, "c_attn"):  # GPT-2: split_size is the width of each of query, key and value
        m.split_size = m.c_attn.nf // 3
        m.num_heads = m.split_size // m.head_dim
        return
    d = getattr(m, "attention_head_size", getattr(m, "head_dim", None))
    q, k = (m.query, m.key) if hasattr(m, "query") else (m.q_proj, m.k_proj)
    heads, kv_heads = q.out_features // d, k.out_features // d
    if kv_heads == 0 or heads % kv_heads:
        raise CompactionError(f"{type(m).__name__} would keep {heads} query heads for {kv_heads} key/value heads; "
                              "every key/value head must keep the same number of query heads")
    for attr, value in (("num_attention_heads", heads), ("num_heads", heads), ("all_head_size", heads * d),
                        ("num_key_value_groups", heads // kv_heads), ("num_key_value_heads", kv_heads)):
        if hasattr(m, attr):
            setattr(m, attr, value)


# -- the channel rule ------------------------------------------------------------------------------------


def _rows(ctx: ModuleContext, p: _Proj, x_vec: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Labels of ``size`` output channels of projection ``p`` from ``p.offset`` (a fused layer gets one
    member for all its outputs); its input dim is tied to ``x_vec`` and measured on ``x``."""
    layer = ctx.module.get_submodule(p.layer)
    name = ctx.param(f"{p.layer}.weight")
    labels = ctx.graph.fresh(name, p.out_dim, "out", _width(layer, p.out_dim))
    if layer.bias is not None:
        ctx.graph.attach(ctx.param(f"{p.layer}.bias"), 0, "out", labels)
    if (name, 1 - p.out_dim, "in") not in ctx.graph.members:
        ctx.graph.attach(name, 1 - p.out_dim, "in", x_vec)
        consumer_sink(ctx, x, x.dim() - 1, x_vec, (name, 1 - p.out_dim, "in"), False)
    return labels[p.offset : p.offset + size]


def _one_unit_per_row(ctx: ModuleContext, grid: torch.Tensor) -> None:
    """Tie every label of each row of ``grid`` (heads, head_dim): a head is kept or removed whole."""
    ctx.uf.union(grid[:, :1].expand_as(grid).contiguous(), grid)


def _zero(ctx: ModuleContext, p: _Proj, heads: int, d: int) -> torch.Tensor:
    """Per head of projection ``p``: are its weight rows and bias all zero (after masking) in this trace?"""
    layer = ctx.module.get_submodule(p.layer)
    w = layer.weight.detach().movedim(p.out_dim, 0)[p.offset : p.offset + heads * d]  # (heads * d, in)
    dead = ~(w != 0).reshape(heads, -1).any(dim=1)
    if layer.bias is not None:
        dead &= ~(layer.bias.detach()[p.offset : p.offset + heads * d] != 0).reshape(heads, d).any(dim=1)
    return dead


def _gqa_plan(ctx: ModuleContext, lay: Layout, heads: torch.Tensor, kv: torch.Tensor) -> None:
    """Grouped-query attention: a key/value head goes with its last query head, and every key/value head
    keeps as many query heads (HF computes the group size once per layer). Decided on the masked
    weights of this trace (an output-projection column or a value row of zeros), before the engine
    plans: heads that must stay are blocked, a key/value head that goes is tied to its query heads."""
    o = ctx.module.get_submodule(lay.o.layer).weight.detach()
    cols = o.movedim(1 - lay.o.out_dim, 0).reshape(lay.heads, -1)  # (heads, d * hidden): head h's columns
    gone = ~(cols != 0).any(dim=1) | _zero(ctx, lay.v, lay.kv_heads, lay.head_dim).repeat_interleave(lay.group)
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


def _attention_rule(ctx: ModuleContext) -> None:
    ctx.require_values()  # the head plan reads the (masked) projection weights
    lay = attention_layout(ctx.module)
    x = ctx.args[0] if ctx.args else ctx.kwargs.get("hidden_states")
    if lay is None or not isinstance(x, torch.Tensor):
        ctx.graph.unknown.append((type(ctx.module).__name__, ctx.module_name, [ctx.labels(x)]))
        return
    vec = channel_labels(ctx, x, x.dim() - 1)
    d = lay.head_dim
    q = _rows(ctx, lay.q, vec, x, lay.heads * d).reshape(lay.heads, d)  # (heads, d)
    k = _rows(ctx, lay.k, vec, x, lay.kv_heads * d).reshape(lay.kv_heads, d)
    v = _rows(ctx, lay.v, vec, x, lay.kv_heads * d).reshape(lay.kv_heads, d)
    ctx.uf.union(k, v)
    _one_unit_per_row(ctx, q)
    _one_unit_per_row(ctx, k)
    out = ctx.out[0] if isinstance(ctx.out, tuple) else ctx.out
    for extra in ctx.out[1:] if isinstance(ctx.out, tuple) else ():
        ctx.set_labels(extra, None)  # attention probabilities: no channels
    if lay.kv_heads == lay.heads:
        ctx.uf.union(q, k)
    if lay.o is None:  # the output projection is outside: it reads the value channels, head by head
        ctx.set_labels(out, placed(v.reshape(-1), out.dim(), out.dim() - 1))
        return
    o = ctx.module.get_submodule(lay.o.layer)
    o_name = ctx.param(f"{lay.o.layer}.weight")
    cols = q.reshape(-1)  # query head h's output lands in columns h * d ... h * d + d - 1
    ctx.graph.attach(o_name, 1 - lay.o.out_dim, "in", cols)
    zero = _zero(ctx, lay.v, lay.kv_heads, d).repeat_interleave(lay.group * d)  # (heads * d,): value provably 0
    absmax = (~zero).float()
    ctx.graph.sinks.append(Sink("consumer", cols, absmax, torch.zeros_like(absmax), absmax,
                                member=(o_name, 1 - lay.o.out_dim, "in")))
    if lay.kv_heads != lay.heads:
        _gqa_plan(ctx, lay, q[:, 0], k[:, 0])
    produced = ctx.graph.fresh(o_name, lay.o.out_dim, "out", _width(o, lay.o.out_dim))
    if o.bias is not None:
        ctx.graph.attach(ctx.param(f"{lay.o.layer}.bias"), 0, "out", produced)
    ctx.set_labels(out, placed(produced, out.dim(), out.dim() - 1))


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


def _by_param(keeps: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """The engine's ``"attr:role:dim"`` keys as ``{attr: {dim: indices}}``."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, index in keeps.items():
        attr, _role, dim = key.split(":")
        out.setdefault(attr, {})[int(dim)] = index
    return out


def _shrink_attention(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    slice_params_(m, _by_param(keeps))
    set_attention_sizes_(m)


def _shrink_conv1d(m: nn.Module, keeps: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    slice_params_(m, _by_param(keeps))
    m.nx, m.nf = m.weight.shape


@register_module_rule(Conv1D)
def _conv1d_rule(ctx: ModuleContext) -> None:
    """HF's Conv1D: ``x @ weight + bias`` with weight (in, out), i.e. a Linear layer stored transposed."""
    x = ctx.args[0] if ctx.args else ctx.kwargs.get("x")
    vec = channel_labels(ctx, x, x.dim() - 1)
    name = ctx.param("weight")
    ctx.graph.attach(name, 0, "in", vec)
    produced = ctx.graph.fresh(name, 1, "out", ctx.module.nf)
    if ctx.module.bias is not None:
        ctx.graph.attach(ctx.param("bias"), 0, "out", produced)
    consumer_sink(ctx, x, x.dim() - 1, vec, (name, 0, "in"), False)  # folding assumes (out, in) weights
    ctx.set_labels(ctx.out, placed(produced, ctx.out.dim(), ctx.out.dim() - 1))


register_shrink("hf_conv1d", Conv1D)(_shrink_conv1d)

#: attention classes handled by the rule above (extend with :func:`register_attention`)
ATTENTION_TYPES: list[type] = []


def register_attention(*types: type) -> None:
    """Handle more attention classes with one of the layouts above (checked on each module when traced)."""
    register_module_rule(*types)(_attention_rule)
    register_shrink("hf_attention", *types, claims_children=True)(_shrink_attention)
    ATTENTION_TYPES.extend(types)


register_attention(BertSelfAttention, LlamaAttention, ViTAttention, GPT2Attention)
