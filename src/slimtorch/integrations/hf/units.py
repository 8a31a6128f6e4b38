"""Hugging Face attention and feed-forward blocks as prunable units: which parameter slices make up an
attention head or an FFN neuron, and how to update a block's size attributes after surgery.

A recogniser is registered per block layout (one function each); it looks at a module and returns a
:class:`BlockSpec` or None. Attention blocks come from the attention layouts
(:func:`~slimtorch.integrations.hf.layouts.attention_layout`: BERT-style cores with their sibling output
projection, ``q_proj/k_proj/v_proj`` with grouped-query attention, ALBERT, DeBERTa-v2, DistilBERT, T5, MPNet,
GPT-2, GPT-NeoX, BLOOM, Falcon, Phi-3...). FFN layouts: BERT's ``intermediate``/``output``, gated MLPs
(``gate_proj``/``up_proj``/``down_proj``, Phi-3's fused ``gate_up_proj``), ``fc1``/``fc2``, GPT-2's ``Conv1D``
pair, DistilBERT, ALBERT, T5 (plain and gated), ``dense_h_to_4h``/``dense_4h_to_h``, and the neurons of each
expert of a mixture of experts (3-D expert weights)::

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                             intermediate_size=64))
    >>> specs = find_blocks(bert)
    >>> [(s.name, s.kind, s.units) for s in specs.values()]
    [('encoder.layer.0', 'ffn', 64), ('encoder.layer.0.attention', 'attention', 4)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from slimtorch.integrations.hf.layouts import AttentionLayout, Slice, attention_layout, set_attention_sizes_

__all__ = ["BlockSpec", "Slice", "find_blocks", "register_block"]


@dataclass(frozen=True)
class BlockSpec:
    """One prunable block: ``units`` heads (or FFN neurons), the slices that compute a unit
    (``producers``), the slices that read it (``consumers``), and alternatives of slices each of which,
    fully masked, makes a unit's output exactly zero (``zeroing``: e.g. a head's value rows, or the
    rows of an FFN's first layer when its activation maps 0 to 0). ``kv_units`` > 0 for grouped-query
    attention: query head ``h`` uses key/value head ``h // (units // kv_units)``. Slices name parameters
    relative to the module at ``path`` (default: ``name``; one expert of a mixture of experts is a block
    of its own, named ``<experts>[<index>]``)."""

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
    path: str | None = None

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.units // self.kv_units if self.kv_units else 1

    @property
    def prefix(self) -> str:
        """The module path the slices' parameter names are relative to."""
        return self.name if self.path is None else self.path


Recogniser = Callable[[str, nn.Module], "BlockSpec | list[BlockSpec] | None"]
_RECOGNISERS: dict[str, Recogniser] = {}


def register_block(layout: str) -> Callable[[Recogniser], Recogniser]:
    """Register a recogniser ``fn(name, module) -> BlockSpec | None`` for one block layout (a list of blocks
    when one module holds several: the experts of a mixture of experts)."""

    def deco(fn: Recogniser) -> Recogniser:
        _RECOGNISERS[layout] = fn
        return fn

    return deco


def find_blocks(model: nn.Module) -> dict[str, BlockSpec]:
    """Every recognised attention and FFN block of ``model``, by block name. A block's ``config_keys["units"]``
    names the key of the model's config that holds its size (the first of its candidates the config has)."""
    found: dict[str, BlockSpec] = {}
    config = getattr(model, "config", None)
    for name, module in model.named_modules():
        for recognise in _RECOGNISERS.values():
            spec = recognise(name, module)
            for one in spec if isinstance(spec, list) else [spec] if spec is not None else []:
                found[one.name] = _resolved(one, config)
    return dict(sorted(found.items()))


def _resolved(spec: BlockSpec, config: object) -> BlockSpec:
    candidates = spec.config_keys.get("candidates")
    if not candidates:
        return spec
    # (an int, or None where the config derives the size: GPT-2's n_inner)
    key = next((k for k in candidates.split(",") if isinstance(getattr(config, k, ""), (int, type(None)))), None)
    keys = {k: v for k, v in spec.config_keys.items() if k not in ("units", "candidates")}
    return replace(spec, config_keys={**keys, "units": key} if key else keys)


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def _zero_preserving(act: object) -> bool:
    """True when ``act(0) == 0`` (GELU, SiLU, ReLU): then a fully masked producer row zeroes its unit."""
    try:
        return bool(callable(act) and float(act(torch.zeros(1))[0]) == 0.0)
    except (TypeError, RuntimeError):
        return False


# -- attention ---------------------------------------------------------------------------------------------

#: config keys of the head sizes, for the layouts whose configs state the head width (LLaMA-style)
_HEAD_KEYS = {"units": "num_attention_heads", "kv_units": "num_key_value_heads", "width": "head_dim"}


def _with_bias(core: nn.Module, s: Slice, prefix: str) -> tuple[Slice, ...]:
    """A projection's rows of weight (and bias), named from the block."""
    layer = s.param.rpartition(".")[0]
    out = [replace(s, param=prefix + s.param)]
    if getattr(core.get_submodule(layer), "bias", None) is not None:
        out.append(s.moved(f"{prefix}{layer}.bias"))
    return tuple(out)


def _attention_spec(name: str, block: nn.Module, core: nn.Module, prefix: str, lay: AttentionLayout,
                    o: Slice) -> BlockSpec:
    producers: tuple[Slice, ...] = ()
    for proj in lay.projections:
        producers += _with_bias(core, proj.rows, prefix)
    producers += tuple(replace(s, param=prefix + s.param) for s in lay.per_head)
    v = _with_bias(core, lay.v.rows, prefix)

    def set_sizes(module: nn.Module, heads: int, kv_heads: int) -> None:
        set_attention_sizes_(module.get_submodule(prefix.rstrip(".")) if prefix else module, lay, heads, kv_heads)

    keys = _HEAD_KEYS if any(hasattr(core, k) for k in ("q_proj", "qkv_proj")) else {}
    return BlockSpec(name, "attention", block, lay.heads, producers, (o,), (v, (o,)), set_sizes,
                     lay.kv_heads if lay.kv_heads != lay.heads else 0, dict(keys))


@register_block("attention")
def _attention(name: str, module: nn.Module) -> BlockSpec | None:
    lay = attention_layout(module)
    if lay is None or lay.o is None:  # (an output projection outside: the block is the parent, below)
        return None
    return _attention_spec(name, module, module, "", lay, lay.o)


@register_block("attention_core")
def _attention_core(name: str, module: nn.Module) -> BlockSpec | None:
    """BERT-style: ``self`` holds the heads, ``output.dense`` projects them back."""
    core, dense = getattr(module, "self", None), getattr(getattr(module, "output", None), "dense", None)
    lay = attention_layout(core) if isinstance(core, nn.Module) else None
    if lay is None or lay.o is not None or not _is_linear(dense):
        return None
    return _attention_spec(name, module, core, "self.", lay, Slice("output.dense.weight", 1, lay.head_dim))


# -- feed-forward --------------------------------------------------------------------------------------------


def _ffn(name: str, module: nn.Module, units: int, factors: tuple[tuple[Slice, ...], ...],
         consumers: tuple[Slice, ...], act: object, keys: tuple[str, ...], *, path: str | None = None,
         size_attr: str = "intermediate_size") -> BlockSpec:
    """An FFN block of ``units`` neurons: each of ``factors`` (one for a plain MLP, two for a gated one) computes
    a neuron's input to the activation (or the factor it is multiplied by); ``consumers`` read it."""
    producers = tuple(s for factor in factors for s in factor)
    gated = len(factors) > 1  # act(gate) * up: either factor's rows masked zeroes the neuron
    zeroing = [consumers, *(f for f in factors if gated or _zero_preserving(act))]

    def set_sizes(block: nn.Module, n: int, kv: int) -> None:
        if isinstance(getattr(block, size_attr, None), int):
            setattr(block, size_attr, n)

    return BlockSpec(name, "ffn", module, units, producers, consumers, tuple(zeroing), set_sizes,
                     config_keys={"units": keys[0], "candidates": ",".join(keys)} if keys else {}, path=path)


def _rows(module: nn.Module, layer: str, *, dim: int = 0, offset: int = 0) -> tuple[Slice, ...]:
    """A layer's output rows (``dim``: of its weight) and bias, one per neuron."""
    out = [Slice(f"{layer}.weight", dim, 1, offset)]
    if getattr(module.get_submodule(layer), "bias", None) is not None:
        out.append(Slice(f"{layer}.bias", 0, 1, offset))
    return tuple(out)


def _pair(name: str, module: nn.Module, up: str, down: str, act: object, keys: tuple[str, ...],
          gate: str | None = None) -> BlockSpec:
    """``down(act(up(x)))`` or, with ``gate``, ``down(act(gate(x)) * up(x))``: Linear layers."""
    factors = tuple(_rows(module, n) for n in ((gate, up) if gate else (up,)))
    units = module.get_submodule(up).out_features
    return _ffn(name, module, units, factors, (Slice(f"{down}.weight", 1, 1),), act, keys)


def _has(module: nn.Module, *paths: str) -> bool:
    try:
        return all(_is_linear(module.get_submodule(p)) for p in paths)
    except AttributeError:
        return False


def _ffn_keys(name: str, *candidates: str) -> tuple[str, ...]:
    """Config keys that may hold the FFN width, the encoder's or decoder's own first where they differ."""
    side = ("encoder_ffn_dim",) if "encoder" in name else ("decoder_ffn_dim",) if "decoder" in name else ()
    return (*side, *candidates)


#: (first layer(s), second layer, activation attribute, config keys): FFN layouts of two or three Linear layers
_PAIRS: tuple[tuple[tuple[str, ...], str, str, tuple[str, ...]], ...] = (
    (("intermediate.dense",), "output.dense", "intermediate.intermediate_act_fn", ("intermediate_size",)),
    (("gate_proj", "up_proj"), "down_proj", "act_fn", ("intermediate_size",)),
    (("up_proj",), "down_proj", "act", ()),
    (("fc1",), "fc2", "activation_fn", ("ffn_dim", "intermediate_size")),
    (("lin1",), "lin2", "activation", ("hidden_dim",)),
    (("ffn",), "ffn_output", "activation", ("intermediate_size",)),
    (("wi",), "wo", "act", ("d_ff",)),
    (("wi_0", "wi_1"), "wo", "act", ("d_ff",)),
    (("dense_h_to_4h",), "dense_4h_to_h", "act", ("intermediate_size", "ffn_hidden_size")),
    (("fc_in",), "fc_out", "act", ("n_inner",)),
    (("c_fc",), "c_proj", "act", ("intermediate_size",)),
)


@register_block("ffn")
def _linear_ffn(name: str, module: nn.Module) -> BlockSpec | None:
    for ups, down, act_attr, keys in _PAIRS:
        if _has(module, *ups, down):
            owner, _, attr = act_attr.rpartition(".")
            act = getattr(module.get_submodule(owner) if owner else module, attr, None)
            if act is None:  # (names vary: fc1/fc2 blocks call it act or activation_fn, BLOOM gelu_impl)
                act = next((getattr(module, a) for a in ("act", "activation_fn", "gelu_impl") if hasattr(module, a)),
                           None)
            keys = ("shared_expert_intermediate_size",) if name.endswith("shared_expert") else keys
            gate = ups[0] if len(ups) > 1 else None
            return _pair(name, module, ups[-1], down, act, _ffn_keys(name, *keys), gate)
    return None


@register_block("gate_up_proj")
def _fused_gated(name: str, module: nn.Module) -> BlockSpec | None:
    """Phi-3: ``gate_up_proj`` holds the gate rows, then the up rows."""
    if not (_is_linear(getattr(module, "gate_up_proj", None)) and _is_linear(getattr(module, "down_proj", None))):
        return None
    units = module.down_proj.in_features
    factors = (_rows(module, "gate_up_proj"), _rows(module, "gate_up_proj", offset=units))
    act = getattr(module, "activation_fn", None)
    return _ffn(name, module, units, factors, (Slice("down_proj.weight", 1, 1),), act, ("intermediate_size",))


@register_block("gpt2_mlp")
def _gpt2_mlp(name: str, module: nn.Module) -> BlockSpec | None:
    c_fc, c_proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if c_fc is None or c_proj is None or type(c_fc).__name__ != "Conv1D":
        return None
    # Conv1D weights are (in, out): c_fc's neurons are its columns, c_proj reads them as rows.
    return _ffn(name, module, c_fc.weight.shape[1], (_rows(module, "c_fc", dim=1),), (Slice("c_proj.weight", 0, 1),),
                getattr(module, "act", None), ("n_inner",))


def experts_layout(module: nn.Module) -> tuple[int, int] | None:
    """(experts, neurons per expert) of a mixture of experts' expert weights stored as 3-D tensors (Mixtral,
    Qwen2-MoE, OLMoE: ``gate_up_proj`` (experts, 2 * neurons, hidden) holding each expert's gate rows then its
    up rows, ``down_proj`` (experts, hidden, neurons)); None for any other layout."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return None
    if getattr(module, "is_transposed", False) or not getattr(module, "has_gate", True) \
            or not getattr(module, "is_concatenated", True):
        return None
    experts, neurons = down.shape[0], down.shape[2]
    if gate_up.shape != (experts, 2 * neurons, down.shape[1]):
        return None
    return experts, neurons


@register_block("experts")
def _expert_blocks(name: str, module: nn.Module) -> list[BlockSpec]:
    """One FFN block per expert: its neurons, in its slice of the 3-D weights."""
    found = experts_layout(module)
    if found is None:
        return []
    experts, neurons = found
    bias = isinstance(getattr(module, "gate_up_proj_bias", None), torch.Tensor)
    out = []
    for e in range(experts):
        factors = tuple((Slice("gate_up_proj", 1, 1, off, at=(0, e)),)
                        + ((Slice("gate_up_proj_bias", 1, 1, off, at=(0, e)),) if bias else ())
                        for off in (0, neurons))
        out.append(_ffn(f"{name}[{e}]", module, neurons, factors, (Slice("down_proj", 2, 1, at=(0, e)),),
                        getattr(module, "act_fn", None), ("moe_intermediate_size", "intermediate_size"), path=name,
                        size_attr="intermediate_dim"))
    return out
