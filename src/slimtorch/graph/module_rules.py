"""Module-level rules: a whole module is one node of the graph (nothing inside it is traced).

This is the extension point for attention blocks and recurrent layers, whose internals (heads, gates,
time steps) are easier to state once for the module than to rediscover op by op. A module rule gets a
:class:`~slimtorch.graph.context.ModuleContext` (``ctx.module``, ``ctx.args``, ``ctx.kwargs``, ``ctx.out``,
``ctx.param(attr)`` for full parameter names) and must set the labels of the module's outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from slimtorch.graph.layer_rules import channel_labels, consumer_sink, placed
from slimtorch.graph.rules import register_module_rule

if TYPE_CHECKING:
    from slimtorch.graph.context import ModuleContext

__all__: list[str] = []


def _input(ctx: ModuleContext, index: int, name: str) -> torch.Tensor | None:
    value = ctx.args[index] if index < len(ctx.args) else ctx.kwargs.get(name)
    return value if isinstance(value, torch.Tensor) else None


@register_module_rule(nn.MultiheadAttention)
def _multihead_attention(ctx: ModuleContext) -> None:
    m = ctx.module
    query, key, value = _input(ctx, 0, "query"), _input(ctx, 1, "key"), _input(ctx, 2, "value")
    if m.bias_k is not None or m.add_zero_attn or query is None or key is None or value is None:
        ctx.graph.unknown.append(("MultiheadAttention with bias_k or add_zero_attn", ctx.module_name,
                                  [ctx.labels(t) for t in (query, key, value)]))
        return
    inputs = [channel_labels(ctx, t, t.dim() - 1) for t in (query, key, value)]
    g = ctx.graph
    if m.in_proj_weight is not None:  # packed (3 * E, E): q, k and v read the same columns
        name = ctx.param("in_proj_weight")
        rows = g.fresh(name, 0, "out", m.in_proj_weight.shape[0])
        for other in inputs[1:]:
            ctx.uf.union(inputs[0], other)
        g.attach(name, 1, "in", inputs[0])
        consumer_sink(ctx, query, query.dim() - 1, inputs[0], (name, 1, "in"), False)
    else:
        parts = []
        for attr, vec, t in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), inputs, (query, key, value),
                                strict=True):
            name = ctx.param(attr)
            parts.append(g.fresh(name, 0, "out", getattr(m, attr).shape[0]))
            g.attach(name, 1, "in", vec)
            consumer_sink(ctx, t, t.dim() - 1, vec, (name, 1, "in"), False)
        rows = torch.cat(parts)
    if m.in_proj_bias is not None:
        g.attach(ctx.param("in_proj_bias"), 0, "out", rows)
    q, k, v = rows.chunk(3)
    ctx.uf.union(q, k)  # attention logits pair query channel i with key channel i
    heads = m.num_heads
    g.equal_count(torch.cat([q.reshape(heads, -1), v.reshape(heads, -1)]))  # one head size for all heads
    out_name = ctx.param("out_proj.weight")
    g.attach(out_name, 1, "in", v)
    produced = g.fresh(out_name, 0, "out", m.out_proj.weight.shape[0])
    if m.out_proj.bias is not None:
        g.attach(ctx.param("out_proj.bias"), 0, "out", produced)
    out = ctx.out[0]
    ctx.set_labels(out, placed(produced, out.dim(), out.dim() - 1))
    if ctx.out[1] is not None:
        ctx.set_labels(ctx.out[1], None)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@register_module_rule(nn.RNNBase)
def _recurrent(ctx: ModuleContext) -> None:
    m = ctx.module
    x = _input(ctx, 0, "input")
    if x is None or getattr(m, "proj_size", 0) or m.mode not in _GATES:
        ctx.graph.unknown.append((f"{type(m).__name__} (packed input or projections)", ctx.module_name,
                                  [ctx.labels(x)] if x is not None else []))
        return
    g, gates = ctx.graph, _GATES[m.mode]
    previous = channel_labels(ctx, x, x.dim() - 1)
    blocks = []
    for layer in range(m.num_layers):
        outputs = []
        for suffix in ("", "_reverse")[: 2 if m.bidirectional else 1]:
            tag = f"_l{layer}{suffix}"
            hidden = g.fresh(ctx.param(f"weight_hh{tag}"), 1, "in", m.hidden_size)
            rows = hidden.repeat(gates)  # (gates * hidden,): the gate blocks of the weights' rows
            for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if getattr(m, f"{attr}{tag}", None) is not None:
                    g.attach(ctx.param(f"{attr}{tag}"), 0, "out", rows)
            g.attach(ctx.param(f"weight_ih{tag}"), 1, "in", previous)
            if layer == 0:
                consumer_sink(ctx, x, x.dim() - 1, previous, (ctx.param(f"weight_ih{tag}"), 1, "in"), False)
            outputs.append(hidden)
            blocks.append(hidden)
        previous = torch.cat(outputs)
    g.equal_count(torch.stack(blocks))  # hidden_size is one number for every layer and direction
    if _input(ctx, 1, "hx") is not None or isinstance(ctx.kwargs.get("hx"), tuple) or len(ctx.args) > 1:
        ctx.block(torch.stack(blocks), "a recurrent layer given an initial state")
    out, state = ctx.out
    ctx.set_labels(out, placed(previous, out.dim(), out.dim() - 1))
    for s in state if isinstance(state, tuple) else (state,):
        stacked = torch.stack(blocks)  # (layers * directions, hidden)
        ctx.set_labels(s, stacked.reshape(stacked.shape[0], *([1] * (s.dim() - 2)), stacked.shape[1]))
