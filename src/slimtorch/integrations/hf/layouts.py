"""Where the heads of a Hugging Face attention module live: one :class:`AttentionLayout` per module, found by
a recogniser per layout (duck-typed on the module's children and attributes, so that every family that shares
a layout is recognised without naming its classes).

A layout says, for each projection, which rows of its weight belong to each head (a :class:`Slice`: fused
``qkv`` layers, interleaved per head or one block after the other, are slices of one weight), which columns
of the output projection read each head, and what else in the module depends on the heads: per-head
parameters (T5's relative position bias), a per-head tensor passed from layer to layer (T5's and MPNet's
position bias), ALiBi slopes (BLOOM), a residual addition and a LayerNorm inside the module (ALBERT, BLOOM),
or a reason the heads cannot go at all (a norm over every head's channels)::

    >>> from transformers import GPTNeoXConfig, GPTNeoXModel
    >>> neox = GPTNeoXModel(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                                   intermediate_size=64, vocab_size=50))
    >>> lay = attention_layout(neox.layers[0].attention)
    >>> lay.heads, lay.head_dim, lay.k.rows.grid(lay.kv_heads)[1].tolist()  # head 1's key rows: after its query
    (4, 8, [32, 33, 34, 35, 36, 37, 38, 39])

This module imports torch only: the rules that use the layouts (:mod:`~slimtorch.integrations.hf.rules`) and
the units built from them (:mod:`~slimtorch.integrations.hf.units`) live beside it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionLayout", "Proj", "Slice", "attention_layout", "columns", "register_layout", "rows",
           "set_attention_sizes_", "use_layout"]


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` (a head, an FFN neuron) owns ``width`` consecutive positions along ``dim`` of ``param`` (a
    parameter name relative to its block), starting at ``offset + u * stride`` (``stride`` 0: ``width``, units
    side by side). With ``group`` > 0, units come in groups of ``group`` that sit ``group_stride`` apart (Falcon's
    fused rows: the query heads of a key/value group, then its key and value). ``kv``: indexed by key/value head
    instead of query head. ``at``: ``(dim, index)`` of another dim the slice lies in (one expert of a 3-D
    weight)."""

    param: str
    dim: int
    width: int
    offset: int = 0
    kv: bool = False
    stride: int = 0
    group: int = 0
    group_stride: int = 0
    at: tuple[int, int] | None = None

    def start(self, unit: int) -> int:
        step = self.stride or self.width
        if self.group:
            return self.offset + (unit // self.group) * self.group_stride + (unit % self.group) * step
        return self.offset + unit * step

    def positions(self, unit: int) -> slice:
        start = self.start(unit)
        return slice(start, start + self.width)

    def grid(self, units: int) -> torch.Tensor:
        """(units, width): the positions of every unit."""
        starts = torch.tensor([self.start(u) for u in range(units)], dtype=torch.long)
        return starts[:, None] + torch.arange(self.width)

    def moved(self, param: str) -> Slice:
        """The same positions in another parameter (a layer's bias beside its weight: dim 0)."""
        return Slice(param, 0, self.width, self.offset, self.kv, self.stride, self.group, self.group_stride)


@dataclass(frozen=True)
class Proj:
    """One projection: its weight's ``rows`` per head (``rows.param`` is ``"<layer>.weight"``, ``rows.dim`` the
    weight's output dim: 0 for ``nn.Linear``, 1 for HF's ``Conv1D``) and the forward arguments it reads: each
    entry of ``reads`` is a choice (the first one given is used), and every entry is read (DeBERTa's shared
    projections read the hidden states and the relative embeddings)."""

    rows: Slice
    reads: tuple[tuple[str, ...], ...] = (("hidden_states",),)

    @property
    def layer(self) -> str:
        return self.rows.param.rpartition(".")[0]


@dataclass(frozen=True)
class AttentionLayout:
    """The heads of one attention module: ``heads`` query heads and ``kv_heads`` key/value heads of width
    ``head_dim``; ``o`` the output projection's input columns per query head (None: the output projection lies
    outside the module, BERT's ``self``/``output`` split). The rest describes what else depends on the heads:

    - ``more``: other projections with rows per query head (DeBERTa's position projections);
    - ``per_head``: parameters with one entry per query head along a dim (T5's relative bias columns);
    - ``head_state``: ``(argument, output index or None)`` of a tensor with heads on dim 1 passed from layer to
      layer (a shared position bias): the heads of every layer it reaches are decided together;
    - ``alibi``: an argument holding ALiBi biases ``(batch * heads, 1, keys)`` built for the model's original
      head count: a compacted layer selects its heads' rows at run time;
    - ``residual`` / ``norm``: an argument added to the output inside the module, and a LayerNorm child applied
      to the sum (its channels stay: its statistics count them);
    - ``refuse``: why no head can go (every head is blocked, with this reason);
    - ``sizes``: module attributes set after surgery, beyond the usual ones (``("split_size", "width")``);
    - ``own_config``: the forward reads head counts from ``module.config``: a compacted module gets its own copy.
    """

    q: Proj
    k: Proj
    v: Proj
    o: Slice | None
    heads: int
    kv_heads: int
    head_dim: int
    more: tuple[Proj, ...] = ()
    per_head: tuple[Slice, ...] = ()
    head_state: tuple[str, int | None] | None = None
    alibi: str | None = None
    residual: str | None = None
    norm: str | None = None
    refuse: str = ""
    sizes: tuple[tuple[str, str], ...] = ()
    own_config: bool = False

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def projections(self) -> tuple[Proj, ...]:
        return (self.q, self.k, self.v, *self.more)


Recogniser = Callable[[nn.Module], "AttentionLayout | None"]
_LAYOUTS: dict[str, Recogniser] = {}
_BY_TYPE: dict[type, Recogniser] = {}


def register_layout(name: str) -> Callable[[Recogniser], Recogniser]:
    """Register a recogniser ``fn(module) -> AttentionLayout | None`` tried on every module."""

    def deco(fn: Recogniser) -> Recogniser:
        _LAYOUTS[name] = fn
        return fn

    return deco


def use_layout(types: tuple[type, ...], fn: Recogniser) -> None:
    """Recognise modules of ``types`` (and subclasses) with ``fn`` only."""
    for t in types:
        _BY_TYPE[t] = fn


def attention_layout(module: nn.Module) -> AttentionLayout | None:
    """The :class:`AttentionLayout` of an attention module, else None."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls](module)
    for recognise in _LAYOUTS.values():
        found = recognise(module)
        if found is not None:
            return found
    return None


# -- building blocks --------------------------------------------------------------------------------------


def _linear(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in names)


def _int(m: nn.Module, *names: str) -> int | None:
    """The first of ``names`` that ``m`` has as an int attribute."""
    for n in names:
        value = getattr(m, n, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _only(m: nn.Module, known: set[str]) -> bool:
    """``m`` holds no parameter of its own and every child that holds some is one of ``known``: nothing else
    could depend on the heads."""
    own = any(True for _ in m.parameters(recurse=False))
    return not own and all(name in known or not _has_params(child) for name, child in m.named_children())


def rows(layer: str, width: int, *, offset: int = 0, stride: int = 0, kv: bool = False, conv1d: bool = False,
         group: int = 0, group_stride: int = 0) -> Slice:
    """The output rows of ``layer`` per head (``conv1d``: HF's ``Conv1D``, whose weight is stored (in, out))."""
    return Slice(f"{layer}.weight", 1 if conv1d else 0, width, offset, kv, stride, group, group_stride)


def columns(layer: str, width: int, *, conv1d: bool = False) -> Slice:
    """The input columns of the output projection ``layer`` per head."""
    return Slice(f"{layer}.weight", 0 if conv1d else 1, width)


_SELF = (("hidden_states",),)
_CROSS = (("key_value_states", "encoder_hidden_states", "hidden_states"),)


def _norm_refusal(m: nn.Module, d: int) -> str:
    """Why a query/key norm forbids removing heads: it normalises over every head's channels at once."""
    for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        weight = getattr(getattr(m, name, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape[-1] != d:
            return f"its {name} normalises the channels of every head together ({weight.shape[-1]} of them)"
    return ""


# -- the layouts of Hugging Face families -----------------------------------------------------------------


def _bias_table(m: nn.Module, heads: int) -> tuple[Slice, ...]:
    """A relative position bias table with a column per head (Swin, BEiT), as a per-head parameter."""
    table = getattr(getattr(m, "relative_position_bias", None), "relative_position_bias_table", None)
    if isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[1] == heads:
        return (Slice("relative_position_bias.relative_position_bias_table", 1, 1),)
    return ()


@register_layout("q_proj/k_proj/v_proj")
def _qkvo(m: nn.Module) -> AttentionLayout | None:
    """LLaMA, Mistral, Qwen, Gemma, Phi, OPT, BART, mBART, Marian, Whisper, CLIP, ViT, Swin (a relative position
    bias table with a column per head), the MoE families...; BEiT passes its relative position bias (batch, heads,
    queries, keys) in as the attention mask: its heads are these heads."""
    o = next((n for n in ("o_proj", "out_proj", "dense") if _linear(m, n)), None)
    d = _int(m, "head_dim")
    if o is None or d is None or not _linear(m, "q_proj", "k_proj", "v_proj"):
        return None
    norms = {n for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") if getattr(m, n, None) is not None}
    heads, kv = m.q_proj.out_features // d, m.k_proj.out_features // d
    per_head = _bias_table(m, heads)
    if not _only(m, {"q_proj", "k_proj", "v_proj", o, *norms, *(["relative_position_bias"] if per_head else [])}):
        return None
    if heads * d != m.q_proj.out_features or kv * d != m.k_proj.out_features or kv == 0 or heads % kv:
        return None
    gqa = kv != heads
    return AttentionLayout(Proj(rows("q_proj", d)), Proj(rows("k_proj", d, kv=gqa), _CROSS),
                           Proj(rows("v_proj", d, kv=gqa), _CROSS), columns(o, d), heads, kv, d, per_head=per_head,
                           refuse=_norm_refusal(m, d), head_state=("attention_mask", None))


@register_layout("query/key/value")
def _bert_like(m: nn.Module) -> AttentionLayout | None:
    """BERT, RoBERTa, XLM-R, ELECTRA (the output projection is a sibling); ALBERT (dense, residual and LayerNorm
    inside); a relative position bias table of its own (BEiT's older layout)."""
    d = _int(m, "attention_head_size")
    if d is None or not _linear(m, "query", "key", "value"):
        return None
    heads = m.query.out_features // d
    if _linear(m, "dense") and isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm):  # ALBERT
        if not _only(m, {"query", "key", "value", "dense", "LayerNorm"}):
            return None
        return AttentionLayout(Proj(rows("query", d)), Proj(rows("key", d)), Proj(rows("value", d)),
                               columns("dense", d), heads, heads, d, residual="hidden_states", norm="LayerNorm")
    per_head = _bias_table(m, heads)  # (BEiT's, when each layer has its own)
    if not _only(m, {"query", "key", "value", *(["relative_position_bias"] if per_head else [])}):
        return None
    return AttentionLayout(Proj(rows("query", d)), Proj(rows("key", d), _CROSS), Proj(rows("value", d), _CROSS),
                           None, heads, heads, d, per_head=per_head)


@register_layout("deberta")
def _deberta(m: nn.Module) -> AttentionLayout | None:
    """DeBERTa-v2/v3: disentangled attention, whose position projections have rows per head."""
    d = _int(m, "attention_head_size")
    if d is None or not _linear(m, "query_proj", "key_proj", "value_proj"):
        return None
    known = {"query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj"}
    if not _only(m, known):
        return None
    heads = m.query_proj.out_features // d
    rel = ("rel_embeddings",)
    shared = getattr(m, "share_att_key", False) and getattr(m, "relative_attention", False)
    query = (("query_states", "hidden_states"), rel) if shared else (("query_states", "hidden_states"),)
    key = (("hidden_states",), rel) if shared else _SELF
    more = tuple(Proj(rows(n, d), (rel,)) for n in ("pos_key_proj", "pos_query_proj") if _linear(m, n))
    return AttentionLayout(Proj(rows("query_proj", d), query), Proj(rows("key_proj", d), key),
                           Proj(rows("value_proj", d)), None, heads, heads, d, more=more)


@register_layout("q_lin/k_lin/v_lin")
def _distilbert(m: nn.Module) -> AttentionLayout | None:
    d = _int(m, "attention_head_size")
    if d is None or not _linear(m, "q_lin", "k_lin", "v_lin", "out_lin"):
        return None
    if not _only(m, {"q_lin", "k_lin", "v_lin", "out_lin"}):
        return None
    heads = m.q_lin.out_features // d
    return AttentionLayout(Proj(rows("q_lin", d)), Proj(rows("k_lin", d)), Proj(rows("v_lin", d)),
                           columns("out_lin", d), heads, heads, d)


@register_layout("q/k/v/o")
def _t5_mpnet(m: nn.Module) -> AttentionLayout | None:
    """T5, mT5 (relative bias in the first layer, passed on); MPNet (relative bias computed by the encoder)."""
    d = _int(m, "key_value_proj_dim", "attention_head_size")
    if d is None or not _linear(m, "q", "k", "v", "o") or hasattr(m, "block_len"):
        return None  # (LongT5's local attention: its position bias holds the heads on another dim)
    bias = getattr(m, "relative_attention_bias", None)
    if not _only(m, {"q", "k", "v", "o", "relative_attention_bias"}):
        return None
    heads = m.q.out_features // d
    t5 = hasattr(m, "key_value_proj_dim")
    per_head = (Slice("relative_attention_bias.weight", 1, 1),) if isinstance(bias, nn.Embedding) else ()
    return AttentionLayout(Proj(rows("q", d)), Proj(rows("k", d), _CROSS), Proj(rows("v", d), _CROSS),
                           columns("o", d), heads, heads, d, per_head=per_head,
                           head_state=("position_bias", 1 if t5 else None))


@register_layout("c_attn/c_proj")
def _gpt2(m: nn.Module) -> AttentionLayout | None:
    """GPT-2's fused ``c_attn`` (HF ``Conv1D``, weight (in, 3 * width): query, key and value columns)."""
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    d = _int(m, "head_dim")
    if type(c_attn).__name__ != "Conv1D" or type(c_proj).__name__ != "Conv1D" or d is None or hasattr(m, "q_attn"):
        return None
    e = c_attn.weight.shape[1] // 3  # (in, 3 * e): query, key and value columns, e each
    return AttentionLayout(*(Proj(rows("c_attn", d, offset=k * e, conv1d=True)) for k in range(3)),
                           columns("c_proj", d, conv1d=True), e // d, e // d, d, sizes=(("split_size", "width"),))


@register_layout("c_attn Linear")
def _bigcode(m: nn.Module) -> AttentionLayout | None:
    """GPT-BigCode/StarCoder: a Linear ``c_attn`` holding every query head then one key and one value head
    (multi-query), or per head its query, key and value rows."""
    d, heads = _int(m, "head_dim"), _int(m, "num_heads")
    if d is None or heads is None or not _linear(m, "c_attn", "c_proj") or hasattr(m, "q_attn") \
            or not _only(m, {"c_attn", "c_proj"}) or not isinstance(getattr(m, "multi_query", None), bool):
        return None
    sizes = (("embed_dim", "width"), ("split_size", "width"))
    if m.multi_query:
        e = heads * d
        return AttentionLayout(Proj(rows("c_attn", d)), Proj(rows("c_attn", d, offset=e, kv=True)),
                               Proj(rows("c_attn", d, offset=e + d, kv=True)), columns("c_proj", d), heads, 1, d,
                               sizes=sizes)
    return AttentionLayout(*(Proj(rows("c_attn", d, offset=k * d, stride=3 * d)) for k in range(3)),
                           columns("c_proj", d), heads, heads, d, sizes=sizes)


@register_layout("query_key_value")
def _fused_per_head(m: nn.Module) -> AttentionLayout | None:
    """GPT-NeoX/Pythia and Persimmon (rows per head: query, key, value), BLOOM (the same, with ALiBi and the
    residual added inside), Falcon (multi-query: every query head, then one key and one value; grouped: per
    key/value group, its query heads, key and value; else per head like BLOOM)."""
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    d = _int(m, "head_size", "head_dim")
    if d is None or not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)):
        return None
    norms = {n for n in ("q_layernorm", "k_layernorm") if getattr(m, n, None) is not None}  # (Persimmon's)
    if not _only(m, {"query_key_value", "dense", *norms}):
        return None
    n = qkv.out_features // d
    kind = type(m).__name__
    if getattr(m, "new_decoder_architecture", False):
        kv = _int(m, "num_kv_heads") or 1
        group = n // kv - 2  # per key/value group: its query heads, its key, its value
        g = (group + 2) * d
        return AttentionLayout(Proj(rows("query_key_value", d, group=group, group_stride=g)),
                               Proj(rows("query_key_value", d, offset=group * d, stride=g, kv=True)),
                               Proj(rows("query_key_value", d, offset=(group + 1) * d, stride=g, kv=True)),
                               columns("dense", d), group * kv, kv, d, alibi="alibi")
    if getattr(m, "multi_query", False):
        heads = n - 2
        return AttentionLayout(Proj(rows("query_key_value", d)),
                               Proj(rows("query_key_value", d, offset=heads * d, kv=True)),
                               Proj(rows("query_key_value", d, offset=(heads + 1) * d, kv=True)),
                               columns("dense", d), heads, 1, d, alibi="alibi")
    heads = n // 3
    alibi = "alibi" if kind.startswith(("Bloom", "Falcon")) else None
    return AttentionLayout(*(Proj(rows("query_key_value", d, offset=k * d, stride=3 * d)) for k in range(3)),
                           columns("dense", d), heads, heads, d, alibi=alibi,
                           residual="residual" if kind.startswith("Bloom") else None, refuse=_norm_refusal(m, d))


@register_layout("Wqkv")
def _mpt(m: nn.Module) -> AttentionLayout | None:
    """MPT: one ``Wqkv`` holding every query head, then every key head, then every value head; ALiBi biases
    ``(heads, 1, keys)`` passed in as ``position_bias``."""
    d = _int(m, "head_dim")
    if d is None or not _linear(m, "Wqkv", "out_proj") or not _only(m, {"Wqkv", "out_proj"}):
        return None
    e = m.Wqkv.out_features // 3
    return AttentionLayout(*(Proj(rows("Wqkv", d, offset=k * e)) for k in range(3)), columns("out_proj", d),
                           e // d, e // d, d, alibi="position_bias")


@register_layout("qkv_proj")
def _phi3(m: nn.Module) -> AttentionLayout | None:
    """Phi-3: one ``qkv_proj`` holding every query head, then the key heads, then the value heads."""
    d, kv = _int(m, "head_dim"), _int(m, "num_key_value_heads")
    if d is None or kv is None or not _linear(m, "qkv_proj", "o_proj") or not _only(m, {"qkv_proj", "o_proj"}):
        return None
    heads = m.qkv_proj.out_features // d - 2 * kv
    if heads <= 0 or heads % kv:
        return None
    gqa = kv != heads
    return AttentionLayout(Proj(rows("qkv_proj", d)), Proj(rows("qkv_proj", d, offset=heads * d, kv=gqa)),
                           Proj(rows("qkv_proj", d, offset=(heads + kv) * d, kv=gqa)), columns("o_proj", d),
                           heads, kv, d, own_config=True)


# -- sizes after surgery ----------------------------------------------------------------------------------

#: module attributes that hold a head count or a width, and which of the sizes they hold
_SIZE_ATTRS = (("num_heads", "heads"), ("num_attention_heads", "heads"), ("n_heads", "heads"), ("n_head", "heads"),
               ("num_key_value_heads", "kv_heads"), ("num_kv_heads", "kv_heads"), ("num_key_value_groups", "groups"),
               ("all_head_size", "width"), ("inner_dim", "width"))


def _sync_children(m: nn.Module) -> None:
    """Size attributes of the layers inside ``m`` from their (sliced) weights."""
    for child in m.modules():
        weight = getattr(child, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(child, nn.Linear):
            child.out_features, child.in_features = weight.shape
        elif isinstance(child, nn.Embedding):
            child.num_embeddings, child.embedding_dim = weight.shape
        elif isinstance(child, nn.LayerNorm):
            child.normalized_shape = tuple(weight.shape)
        elif type(child).__name__ == "Conv1D":  # HF's (in, out) linear
            child.nx, child.nf = weight.shape


def set_attention_sizes_(m: nn.Module, lay: AttentionLayout, heads: int, kv_heads: int) -> None:
    """After surgery left ``heads`` query heads and ``kv_heads`` key/value heads in ``m`` (whose layout before it
    was ``lay``): the size attributes of ``m`` and of its layers."""
    _sync_children(m)
    kv_heads = kv_heads if lay.kv_heads != lay.heads else heads
    sizes = {"heads": heads, "kv_heads": kv_heads, "groups": heads // max(kv_heads, 1), "width": heads * lay.head_dim}
    if lay.kv_heads == 1 and lay.heads > 1:  # multi-query: one key/value head whatever the query heads
        sizes["kv_heads"] = 1
    for attr, size in (*_SIZE_ATTRS, *lay.sizes):
        if isinstance(getattr(m, attr, None), int) and not isinstance(getattr(m, attr), bool):
            setattr(m, attr, sizes[size])
    config = getattr(m, "config", None)
    if lay.own_config and config is not None and getattr(config, "num_attention_heads", heads) != heads:
        m.config = copy.copy(config)  # (one config is shared by every layer; this layer's head count is its own)
        m.config.num_attention_heads = heads
