"""Hugging Face attention and feed-forward blocks as prunable units: which parameter slices make up an
attention head or an FFN neuron, and how to update a block's size attributes after surgery.

A recogniser is registered per block layout (one function each); it looks at a module and returns a
:class:`BlockSpec` or None. Recognised layouts: BERT-style attention (``self.query/key/value`` +
``output.dense``) and FFN (``intermediate.dense`` + ``output.dense``), the ``q_proj/k_proj/v_proj/o_proj``
attention of LLaMA (grouped-query: several query heads share a key/value head), ViT and most recent
models, LLaMA's gated MLP (``gate_proj/up_proj/down_proj``), ViT's MLP (``fc1``/``fc2``) and GPT-2's
fused ``c_attn``/``c_proj`` and ``c_fc``/``c_proj`` (``Conv1D``, weights stored (in, out))::

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                             intermediate_size=64))
    >>> specs = find_blocks(bert)
    >>> [(s.name, s.kind, s.units) for s in specs.values()]
    [('encoder.layer.0', 'ffn', 64), ('encoder.layer.0.attention', 'attention', 4)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["BlockSpec", "Slice", "find_blocks", "register_block"]


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` of a block owns positions ``offset + u * width ... + width`` along ``dim`` of ``param``
    (a parameter name relative to the block). ``kv``: indexed by key/value head instead of query head."""

    param: str
    dim: int
    width: int
    offset: int = 0
    kv: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """One prunable block: ``units`` heads (or FFN neurons), the slices that compute a unit
    (``producers``), the slices that read it (``consumers``), and alternatives of slices each of which,
    fully masked, makes a unit's output exactly zero (``zeroing``: e.g. a head's value rows, or the
    rows of an FFN's first layer when its activation maps 0 to 0). ``kv_units`` > 0 for grouped-query
    attention: query head ``h`` uses key/value head ``h // (units // kv_units)``."""

    name: str
    kind: str
    module: nn.Module
    units: int
    producers: tuple[Slice, ...]
    consumers: tuple[Slice, ...]
    zeroing: tuple[tuple[Slice, ...], ...]
    set_sizes: Callable[[nn.Module, int, int], None]
    kv_units: int = 0
    config_keys: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.units // self.kv_units if self.kv_units else 1


Recogniser = Callable[[str, nn.Module], "BlockSpec | None"]
_RECOGNISERS: dict[str, Recogniser] = {}


def register_block(layout: str) -> Callable[[Recogniser], Recogniser]:
    """Register a recogniser ``fn(name, module) -> BlockSpec | None`` for one block layout."""

    def deco(fn: Recogniser) -> Recogniser:
        _RECOGNISERS[layout] = fn
        return fn

    return deco


def find_blocks(model: nn.Module) -> dict[str, BlockSpec]:
    """Every recognised attention and FFN block of ``model``, by module name."""
    found: dict[str, BlockSpec] = {}
    for name, module in model.named_modules():
        for recognise in _RECOGNISERS.values():
            spec = recognise(name, module)
            if spec is not None:
                found[spec.name] = spec
    return dict(sorted(found.items()))


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def _zero_preserving(act: object) -> bool:
    """True when ``act(0) == 0`` (GELU, SiLU, ReLU): then a fully masked producer row zeroes its unit."""
    try:
        return bool(callable(act) and float(act(torch.zeros(1))[0]) == 0.0)
    except (TypeError, RuntimeError):
        return False


def _rows(param_prefix: str, width: int, *, bias: bool, kv: bool = False, offset: int = 0) -> tuple[Slice, ...]:
    """The output rows of a Linear (and its bias)."""
    out = [Slice(f"{param_prefix}.weight", 0, width, offset, kv)]
    if bias:
        out.append(Slice(f"{param_prefix}.bias", 0, width, offset, kv))
    return tuple(out)


@register_block("bert_attention")
def _bert_attention(name: str, module: nn.Module) -> BlockSpec | None:
    sa, out = getattr(module, "self", None), getattr(module, "output", None)
    if not (sa is not None and all(_is_linear(getattr(sa, k, None)) for k in ("query", "key", "value"))
            and _is_linear(getattr(out, "dense", None)) and hasattr(sa, "attention_head_size")):
        return None
    d = sa.attention_head_size
    has_bias = sa.query.bias is not None
    producers = _rows("self.query", d, bias=has_bias) + _rows("self.key", d, bias=has_bias) + _rows(
        "self.value", d, bias=has_bias)
    consumers = (Slice("output.dense.weight", 1, d),)

    def set_sizes(block: nn.Module, heads: int, kv_heads: int) -> None:
        block.self.num_attention_heads = heads
        block.self.all_head_size = heads * block.self.attention_head_size

    zeroing = (_rows("self.value", d, bias=has_bias), consumers)
    return BlockSpec(name, "attention", module, sa.query.out_features // d, producers, consumers, zeroing, set_sizes)


@register_block("qkvo_attention")
def _qkvo_attention(name: str, module: nn.Module) -> BlockSpec | None:
    if not (all(_is_linear(getattr(module, k, None)) for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and hasattr(module, "head_dim")):
        return None
    d = module.head_dim
    heads, kv_heads = module.q_proj.out_features // d, module.k_proj.out_features // d
    gqa = kv_heads != heads
    q = _rows("q_proj", d, bias=module.q_proj.bias is not None)
    kv = _rows("k_proj", d, bias=module.k_proj.bias is not None, kv=gqa) + _rows(
        "v_proj", d, bias=module.v_proj.bias is not None, kv=gqa)
    consumers = (Slice("o_proj.weight", 1, d),)

    def set_sizes(block: nn.Module, h: int, kvh: int) -> None:
        if hasattr(block, "num_key_value_groups"):
            block.num_key_value_groups = h // kvh
        if hasattr(block, "num_attention_heads"):
            block.num_attention_heads = h

    zeroing = (tuple(s for s in kv if s.param.startswith("v_proj")), consumers)
    keys = {"units": "num_attention_heads", "kv_units": "num_key_value_heads", "width": "head_dim"}
    return BlockSpec(name, "attention", module, heads, q + kv, consumers, zeroing, set_sizes,
                     kv_heads if gqa else 0, keys)


@register_block("gpt2_attention")
def _gpt2_attention(name: str, module: nn.Module) -> BlockSpec | None:
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if c_attn is None or c_proj is None or not hasattr(module, "split_size") or hasattr(module, "q_attn"):
        return None
    d, e = module.head_dim, module.split_size
    # c_attn's weight is (in, 3 * split): query, key and value columns one after the other.
    producers = tuple(Slice(f"c_attn.{p}", dim, d, k * e) for k in range(3) for p, dim in (("weight", 1), ("bias", 0)))
    consumers = (Slice("c_proj.weight", 0, d),)

    def set_sizes(block: nn.Module, heads: int, kv_heads: int) -> None:
        block.num_heads = heads
        block.split_size = heads * block.head_dim

    zeroing = (producers[4:], consumers)
    return BlockSpec(name, "attention", module, e // d, producers, consumers, zeroing, set_sizes)


def _ffn(name: str, module: nn.Module, ups: tuple[str, ...], down: str, down_dim: int, act: object,
         width_of: nn.Module, *, up_dim: int = 0, keys: dict[str, str] | None = None) -> BlockSpec:
    """An FFN block: neuron ``i`` is output ``i`` of each ``ups`` layer and input ``i`` of ``down``."""
    units = width_of.weight.shape[up_dim]
    producers: tuple[Slice, ...] = ()
    for up in ups:
        layer = module.get_submodule(up)
        producers += (Slice(f"{up}.weight", up_dim, 1),) + ((Slice(f"{up}.bias", 0, 1),) if layer.bias is not None
                                                            else ())
    consumers = (Slice(f"{down}.weight", down_dim, 1),)
    gated = len(ups) > 1  # act(gate) * up: either factor's rows masked zeroes the neuron
    zeroing = [consumers]
    for up in ups:
        if gated or _zero_preserving(act):
            zeroing.append(tuple(s for s in producers if s.param.startswith(f"{up}.")))

    def set_sizes(block: nn.Module, n: int, kv: int) -> None:
        if hasattr(block, "intermediate_size"):
            block.intermediate_size = n

    return BlockSpec(name, "ffn", module, units, producers, consumers, tuple(zeroing), set_sizes,
                     config_keys=keys or {"units": "intermediate_size"})


@register_block("bert_ffn")
def _bert_ffn(name: str, module: nn.Module) -> BlockSpec | None:
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if not (_is_linear(getattr(inter, "dense", None)) and _is_linear(getattr(out, "dense", None))):
        return None
    act = getattr(inter, "intermediate_act_fn", None)
    return _ffn(name, module, ("intermediate.dense",), "output.dense", 1, act, inter.dense)


@register_block("gated_mlp")
def _gated_mlp(name: str, module: nn.Module) -> BlockSpec | None:
    if not all(_is_linear(getattr(module, k, None)) for k in ("gate_proj", "up_proj", "down_proj")):
        return None
    return _ffn(name, module, ("gate_proj", "up_proj"), "down_proj", 1, getattr(module, "act_fn", None),
                module.up_proj)


@register_block("fc_mlp")
def _fc_mlp(name: str, module: nn.Module) -> BlockSpec | None:
    if not (_is_linear(getattr(module, "fc1", None)) and _is_linear(getattr(module, "fc2", None))):
        return None
    act = getattr(module, "activation_fn", getattr(module, "act", None))
    return _ffn(name, module, ("fc1",), "fc2", 1, act, module.fc1)


@register_block("gpt2_mlp")
def _gpt2_mlp(name: str, module: nn.Module) -> BlockSpec | None:
    c_fc, c_proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if c_fc is None or c_proj is None or type(c_fc).__name__ != "Conv1D":
        return None
    # Conv1D weights are (in, out): c_fc's neurons are its columns, c_proj reads them as rows.
    return _ffn(name, module, ("c_fc",), "c_proj", 0, getattr(module, "act", None), c_fc, up_dim=1,
                keys={"units": "n_inner"})
