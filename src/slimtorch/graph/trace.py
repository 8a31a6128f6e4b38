"""Tracing: one real forward pass under a ``TorchFunctionMode``, per-op rules propagating channel labels.

Why not torch.export or FX: both re-trace the Python code symbolically, which fails on data-dependent
control flow and (for export) takes tens of seconds on a large model; a function mode sees exactly the
ops that run, with real shapes and values, at the cost of one forward pass. Modules with a module-level
rule (``nn.MultiheadAttention``, LSTM...) are handled as one node: nothing inside them is traced.

The channel structure alone (``values=False``: what pruning needs) does not depend on the values, so it
is first traced with every floating-point parameter, buffer and input on the ``meta`` device: shapes
only, no arithmetic. Integer tensors (indices, token ids) stay real, so that rules mapping channels
through indices read true indices. Anything that needs a value (data-dependent control flow, an index
computed from floating-point data, a rule that reads weights) raises in that trace, and the model is then
traced again for real: the meta trace is a shortcut, never a guess.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import sys
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from slimtorch.errors import ConfigError, SlimError, TraceError, UnsupportedOpError
from slimtorch.graph.graph import DependencyGraph
from slimtorch.graph.live import Block, BlockOps
from slimtorch.graph.rules import PLAIN_TYPES, VALUE_FREE, find_module_rule, find_rule, op_name, tensors_in

__all__ = [
    "ModuleContext", "OpContext", "build_graph", "call_model", "collector_paused", "substituted", "temporary_mode",
]


_PLAIN_TYPES = frozenset(PLAIN_TYPES) - {torch.device}  # (a signature leaves devices out: meta in a shapes-only trace)
_EXACT_DTYPES = frozenset([torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])


#: ops that turn a tensor's values into a Python value (which may decide the model's control flow)
_TO_PYTHON = frozenset(["__bool__", "item", "tolist", "__int__", "__float__", "__index__", "is_nonzero", "equal",
                        "allclose"])


def _no_ref() -> None:  # a weak reference to nothing
    return None


class _NeedsValues(Exception):
    """Raised inside a shapes-only (meta) trace when something needs real values."""


@dataclass
class _Frame:
    module: str
    counts: Counter = field(default_factory=Counter)
    kind: type | None = None  # the module's class
    rule: Any = None
    call: tuple[Any, Any] | None = None


class OpContext:
    """What a rule sees: the call (``args``, ``kwargs``, ``out``), the graph, and label helpers."""

    def __init__(self, tracer: _Tracer, func: Any, args: tuple, kwargs: dict, out: Any, site: tuple) -> None:
        self.tracer, self.func, self.args, self.kwargs, self.out = tracer, func, args, kwargs, out
        self.site = site  # (innermost module name, op name, occurrence of that op in the module call)
        self.graph: DependencyGraph = tracer.graph
        self.uf = tracer.graph.uf

    @property
    def name(self) -> str:
        return self.site[1]

    @property
    def measuring(self) -> bool:
        """Whether this trace runs on real values (sinks are recorded); False in a shapes-only trace."""
        return self.tracer.measuring

    def require_values(self) -> None:
        """For rules that read values (weights, data): in a shapes-only trace, trace for real instead."""
        if not self.tracer.measuring:
            raise _NeedsValues(self.where)

    @property
    def module_type(self) -> type | None:
        """The class of the innermost module whose forward runs the op (None outside every module)."""
        return self.tracer.stack[-1].kind

    @property
    def where(self) -> str:
        return f"{self.name!r} in module {self.site[0] or '<root>'!r}"

    @property
    def outputs(self) -> list[torch.Tensor]:
        return tensors_in(self.out)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument by position or keyword."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    def labels(self, t: Any) -> torch.Tensor | None:
        """Labels of a tensor (``None``: carries no channels); parameters and floating buffers used
        directly get one fresh label per element on first use."""
        return self.tracer.labels(t) if isinstance(t, torch.Tensor) else None

    def full_labels(self, t: torch.Tensor) -> torch.Tensor:
        """Labels expanded to ``t``'s full shape (-1 where none), as a contiguous tensor."""
        labels = self.labels(t)
        if labels is None:
            return torch.full(t.shape, -1, dtype=torch.long)
        return labels.expand(t.shape).contiguous()

    def set_labels(self, t: Any, labels: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor):
            self.tracer.set_labels(t, labels)

    def set_output(self, labels: torch.Tensor | None) -> None:
        for t in self.outputs:
            self.set_labels(t, labels)

    def param_name(self, t: Any) -> str | None:
        """The parameter or buffer name of ``t`` when it is one (not derived from one)."""
        return self.tracer.names.get(id(t)) if isinstance(t, torch.Tensor) else None

    def block(self, labels: torch.Tensor | None, why: str) -> None:
        self.graph.block(labels, f"{why} ({self.where})")

    def stats(self, t: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(abs max, min, max) of ``t`` per index of the ``keep`` dims, over all other dims. In a shapes-only
        trace they are placeholders, filled when the graph is measured (:mod:`slimtorch.graph.replay`)."""
        if self.tracer.measuring:
            return measure(t, keep)
        return self.tracer.defer(self, t, keep)


def measure(t: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(abs max, min, max) of ``t`` per index of the ``keep`` dims, over all other dims."""
    x = t.detach()
    x = x.float() if not x.is_floating_point() else x
    others = [d for d in range(x.dim()) if d not in keep]
    if any(x.shape[d] == 0 for d in others):
        zero = torch.zeros([x.shape[d] for d in keep])
        return zero, zero, zero
    # Reduce over ``others`` in place instead of permuting into a (*keep, rest) copy: two reductions
    # instead of a copy, an abs and three reductions; the abs max is max(-min, max), exactly.
    if others:
        vmin, vmax = x.amin(dim=others), x.amax(dim=others)
    else:  # (a copy: the tensor itself may be changed in place later in the forward pass)
        vmin = vmax = x.clone()
    kept = sorted(keep)  # the reductions leave the kept dims in ascending order; put them in ``keep`` order
    if kept != keep:
        order = [kept.index(d) for d in keep]
        vmin, vmax = vmin.permute(order), vmax.permute(order)
    if x.device.type != "cpu":
        vmin, vmax = vmin.cpu(), vmax.cpu()
    return torch.maximum(vmin.neg(), vmax), vmin, vmax


class ModuleContext(OpContext):
    """What a module-level rule sees: ``module``, its name, the call's ``args``/``kwargs``, ``out``."""

    def __init__(self, tracer: _Tracer, module: nn.Module, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        super().__init__(tracer, type(module), args, kwargs, out, (name, type(module).__name__, 0))
        self.module, self.module_name = module, name

    def param(self, attr: str) -> str:
        """Full name of the module's own parameter or buffer ``attr``."""
        return f"{self.module_name}.{attr}" if self.module_name else attr


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: DependencyGraph, names: dict[int, str], buffers: set[str], measuring: bool) -> None:
        super().__init__()
        self.graph, self.names, self.buffers, self.measuring = graph, names, buffers, measuring
        self._labels: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}
        self.stack = [_Frame("<outside>")]  # ops outside the model's forward are not recorded
        self.atomic = 0
        # A shapes-only trace keeps a tape of every op it saw (see slimtorch.graph.replay), so that the values
        # compaction needs can later be measured by a plain forward pass checked against it.
        self.tape: list[tuple] | None = None if measuring else []
        self.produced: dict[int, tuple[weakref.ref, int, int]] = {}  # tensor id -> (tensor, tape index, output)
        self.current: tuple[int, list[torch.Tensor], list[torch.Tensor]] = (-1, [], [])  # the op handled: (tape
        # index, its input tensors, its output tensors)
        self.pending: dict[int, list[tuple[int, list[int], tuple]]] = {}  # tape index -> statistics to measure
        self.unreplayable: str | None = None
        self.outputs: list[tuple[tuple, ...]] = []  # per tape entry, per output: (shape, dtype, had no values)
        self.sinks: list[Any] = []  # a shapes-only trace's sinks, statistics still placeholders (set at its end)
        self.blocks: BlockOps | None = None  # computes layers on their live block (slimtorch.graph.live)
        self._derived: dict[int, weakref.ref] = {}  # tensors computed from channels (see _follow_values)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = None if self.measuring else _shape_of(func, args, kwargs)
        if out is None and self.blocks is not None:
            out = self.blocks.run(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if self.atomic == 0 and len(self.stack) > 1:
            name = op_name(func)
            frame = self.stack[-1]
            site = (frame.module, name, frame.counts[name])
            frame.counts[name] += 1
            self._op(func, site, args, kwargs, out)
        return out

    # -- the tape ----------------------------------------------------------------------------------

    def signature(self, value: Any) -> Any:
        """What a rule may read of an op's arguments, in comparable form: tensors by shape, dtype, where they
        come from (a parameter's name, or which earlier op's which output) and, for integer and bool tensors
        with values, their values; plain values as they are. The device is left out (meta in a shapes-only
        trace). (Written for speed: it runs for every argument of every op of a tape.)"""
        kind = type(value)
        if kind in _PLAIN_TYPES:
            return value
        if kind is tuple or kind is list:
            items = [v if type(v) in _PLAIN_TYPES else self.signature(v) for v in value]
            return (kind is list, *items)
        if isinstance(value, torch.Tensor):
            i = id(value)
            source: Any = self.names.get(i)
            if source is None:
                entry = self.produced.get(i)
                source = entry[1:] if entry is not None and entry[0]() is value else None
            exact = None if value.dtype not in _EXACT_DTYPES or value.is_meta else self._exact(value, source)
            return (value.shape, value.dtype, source, exact)
        if kind is dict:
            return ("dict", *[(k, self.signature(v)) for k, v in value.items()])
        if isinstance(value, torch.device):
            return "device"
        return ("object", kind.__qualname__)

    def _exact(self, value: torch.Tensor, source: Any) -> bytes | None:
        """The values of an integer or bool tensor (rules may read indices)."""
        return value.detach().cpu().numpy().tobytes()

    def _tape(self, entry: tuple, call: Any, inputs: list[torch.Tensor], out: Any) -> None:
        """Append an op to the tape (``inputs``: the tensors of ``call``); its outputs are then known as this op's."""
        index = len(self.tape)
        self.tape.append((*entry, self.signature(call)))
        outputs = tensors_in(out)
        self.current = (index, inputs, outputs)
        self.outputs.append(tuple((t.shape, t.dtype, t.is_meta) for t in outputs))
        for k, t in enumerate(outputs):
            self.produced[id(t)] = (weakref.ref(t), index, k)

    def defer(self, ctx: OpContext, t: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, ...]:
        """Placeholders for ``measure(t, keep)`` in a shapes-only trace, to be measured on replay."""
        shape = [t.shape[d] for d in keep]
        placeholders = (torch.zeros(shape), torch.zeros(shape), torch.zeros(shape))
        index, inputs, outputs = self.current
        tensors = [*inputs, *outputs]
        position = next((k for k, u in enumerate(tensors) if u is t), None)
        if position is None:
            self.unreplayable = f"a rule measured a tensor that is not an argument or result of {ctx.where}"
        else:
            self.pending.setdefault(index, []).append((position, list(keep), placeholders))
        return placeholders

    # -- rules -------------------------------------------------------------------------------------

    def _op(self, func: Any, site: tuple, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = tensors_in((args, kwargs))
        if self.tape is not None:
            self._tape(("op", site, func), (args, kwargs), inputs, out)
        name = site[1]
        if not self.measuring and name not in VALUE_FREE:
            _check_meta(inputs, name)
        leaves = [self.names[id(t)] for t in inputs if id(t) in self.names]
        self.graph.used.update(leaves)
        if self.measuring:
            self._follow_values(name, site[0], inputs, out)
        if not leaves and not any(self._has(t) for t in inputs):
            return
        ctx = OpContext(self, func, args, kwargs, out, site)
        rule = find_rule(func)
        if rule is None:
            if ctx.outputs:
                self.graph.unknown.append((name, site[0], [ctx.labels(t) for t in inputs]))
            return
        rule(ctx)

    def _module(self, module: nn.Module, name: str, frame: _Frame, out: Any) -> None:
        """A module handled as one node by its module-level rule (called as the module's forward returns,
        where this mode is active: what it does with tensors must not be traced)."""
        with torch._C.DisableTorchFunction():
            inputs = tensors_in(frame.call)
            if self.tape is not None:
                self._tape(("module", name, type(module)), frame.call, inputs, out)
            self.graph.used.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters())
            if not self.measuring:
                _check_meta(inputs, type(module).__name__)
            else:
                self._follow_values(type(module).__name__, name, inputs, out)
            frame.rule(ModuleContext(self, module, name, *frame.call, out))

    def _follow_values(self, op: str, module: str, inputs: list[torch.Tensor], out: Any) -> None:
        """Values computed from channels, followed through every op (a mean over all of them carries no label),
        so that the graph can say where such a value decides the model's Python control flow: inputs that take
        another path run code this trace never saw. (A shapes-only trace cannot get there: it has no values.)"""
        if not any(self._has(t) or self._derived.get(id(t), _no_ref)() is t for t in inputs):
            return
        if op in _TO_PYTHON:
            self.graph.branches.append(f"{op!r} in module {module or '<root>'!r}")
        for t in tensors_in(out):
            self._derived[id(t)] = weakref.ref(t)

    def _has(self, t: torch.Tensor) -> bool:
        entry = self._labels.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] is not None

    def labels(self, t: torch.Tensor) -> torch.Tensor | None:
        entry = self._labels.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        name = self.names.get(id(t))
        if name is None or not t.is_floating_point():
            return None
        return self.graph.fresh(name, None, "element", tuple(t.shape), is_buffer=name in self.buffers)

    def set_labels(self, t: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is not None and labels.dim() != t.dim():
            raise RuntimeError(f"labels of rank {labels.dim()} for a tensor of rank {t.dim()}")
        self._labels[id(t)] = (weakref.ref(t), labels)

    # -- module calls -------------------------------------------------------------------------------

    def traced_forward(self, module: nn.Module, name: str, forward: Any) -> Any:
        """``forward`` of ``module`` wrapped to keep the stack of module calls (for op sites and module-level
        rules). A wrapper rather than forward hooks: hooks put every module call on ``nn.Module``'s slow path
        (with two Python hooks each call, about 40 us; a fifth of a small CNN's traced forward)."""
        rule = find_module_rule(module)

        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.graph.called.add(name)
            frame = _Frame(name, kind=type(module))
            self.stack.append(frame)
            if self.atomic:
                self.atomic += 1
            elif rule is not None:
                self.atomic = 1
                frame.rule, frame.call = rule, (args, kwargs)
            out = forward(*args, **kwargs)
            self.stack.pop()
            if frame.rule is not None:
                self.atomic = 0
                self._module(module, name, frame, out)
            elif self.atomic:
                self.atomic -= 1
            return out

        return run


# Ops whose output shape the shapes-only trace computes itself. On meta tensors torch computes it through
# Python reference implementations (about 1 ms a call for batch_norm, hardtanh or linear: more than the
# real op on a small input). The checks torch would make are repeated; whatever they do not cover (other
# argument forms, dtypes) returns None and runs torch's own meta kernel, which raises as the real op would.
_ACTIVATIONS = {
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "mish", "dropout",
}
_SHAPED = _ACTIVATIONS | {"batch_norm", "layer_norm", "linear", "conv1d", "conv2d", "conv3d"}


def _per_dim(value: Any, default: int, k: int) -> list[int] | None:
    """A conv's stride, padding or dilation as one int per spatial dim; None for other forms ("same")."""
    value = default if value is None else value
    if isinstance(value, int):
        return [value] * k
    if isinstance(value, (tuple, list)) and len(value) == k and all(isinstance(i, int) for i in value):
        return list(value)
    return None


def _conv_shape(x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The output shape of conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups) for numeric
    arguments that torch would accept; None for anything else (torch's own kernel then decides)."""
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype:
        return None
    k = weight.dim() - 2
    groups = _arg(args, kwargs, 6, "groups")
    groups = 1 if groups is None else groups
    if x.dim() != k + 2 or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups \
            or x.shape[1] != weight.shape[1] * groups or (bias is not None and bias.shape != weight.shape[:1]):
        return None
    stride = _per_dim(_arg(args, kwargs, 3, "stride"), 1, k)
    padding = _per_dim(_arg(args, kwargs, 4, "padding"), 0, k)
    dilation = _per_dim(_arg(args, kwargs, 5, "dilation"), 1, k)
    if stride is None or padding is None or dilation is None:
        return None  # e.g. padding="same": let torch work it out
    spatial = [(n + 2 * p - d * (w - 1) - 1) // s + 1
               for n, p, d, w, s in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride, strict=True)]
    if min(spatial) < 1 or min(stride) < 1:
        return None
    return (x.shape[0], weight.shape[0], *spatial)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


_BINARY = {"add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
           "__truediv__", "__rtruediv__"}
_BINARY_INPLACE = {"add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def _same_layout_operand(x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """The other operand of ``x + other`` is a Python number or a meta tensor of x's dtype, shape and
    strides (a residual sum), and nothing else is asked (``alpha`` aside): the result is laid out as x."""
    other = _arg(args, kwargs, 1, "other")
    extra = set(kwargs) - {"other", "alpha"}
    if len(args) > 2 or extra or not isinstance(_arg(args, kwargs, 2, "alpha") or 1, (int, float)):
        return False
    if type(other) in (int, float):
        return True
    return isinstance(other, torch.Tensor) and other.is_meta and other.dtype == x.dtype \
        and other.shape == x.shape and other.stride() == x.stride()


def _attention_shape(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The outputs of ``F.multi_head_attention_forward`` for batched self- or cross-attention with one packed
    input projection and no masks or extra biases (what ``nn.MultiheadAttention`` runs, e.g. in torchvision's
    ViT); None for anything else. On meta tensors torch runs its dozen inner ops through Python reference
    code, about 4 ms a call."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
    if len(args) > len(names) + 1:
        return None  # (training is the 14th; the rest come as keywords from nn.MultiheadAttention)
    q, k, v, heads, w, b = a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"]
    tensors = (q, k, v, w, a["out_proj_weight"])
    if not all(isinstance(t, torch.Tensor) and t.is_meta and t.dtype == q.dtype for t in tensors) or q.dim() != 3 \
            or k.shape != v.shape or k.dim() != 3 or k.shape[1] != q.shape[1]:
        return None
    plain = {"key_padding_mask": None, "attn_mask": None, "use_separate_proj_weight": False, "q_proj_weight": None,
             "k_proj_weight": None, "v_proj_weight": None, "static_k": None, "static_v": None, "is_causal": False}
    if any(kwargs.get(n, default) is not default for n, default in plain.items()) \
            or set(kwargs) - set(names) - set(plain) - {"training", "need_weights", "average_attn_weights"}:
        return None
    length, batch, embed = q.shape
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or embed != a["embed_dim_to_check"] \
            or k.shape[2] != embed or not isinstance(heads, int) or heads < 1 or embed % heads \
            or w.shape != (3 * embed, embed) or (b is not None and b.shape != (3 * embed,)) \
            or a["out_proj_weight"].shape != (embed, embed) \
            or (a["out_proj_bias"] is not None and a["out_proj_bias"].shape != (embed,)):
        return None
    out = torch.empty((length, batch, embed), dtype=q.dtype, device="meta")
    if not kwargs.get("need_weights", True):
        return out, None
    source = k.shape[0]
    shape = (batch, length, source) if kwargs.get("average_attn_weights", True) else (batch, heads, length, source)
    return out, torch.empty(shape, dtype=q.dtype, device="meta")


def _shape_of(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_meta or not x.is_floating_point():
        return None
    name = op_name(func)
    if name.endswith("_") and name[:-1] in _ACTIVATIONS:
        return x  # in place
    if name in _BINARY_INPLACE and _same_layout_operand(x, args, kwargs):
        return x
    if name in _BINARY and _same_layout_operand(x, args, kwargs):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if name == "multi_head_attention_forward":
        return _attention_shape(args, kwargs)
    if name not in _SHAPED or any(isinstance(t, torch.Tensor) and not t.is_meta for t in (*args, *kwargs.values())):
        return None
    if name == "batch_norm":
        stats = _arg(args, kwargs, 1, "running_mean")
        if _arg(args, kwargs, 5, "training") or not isinstance(stats, torch.Tensor) or x.dim() < 2 \
                or stats.shape != (x.shape[1],):
            return None
    elif name == "layer_norm":
        shape, weight = tuple(_arg(args, kwargs, 1, "normalized_shape")), _arg(args, kwargs, 2, "weight")
        if tuple(x.shape[x.dim() - len(shape):]) != shape or (weight is not None and tuple(weight.shape) != shape):
            return None
    elif name in ("conv1d", "conv2d", "conv3d"):
        shape = _conv_shape(x, args, kwargs)
        return None if shape is None else torch.empty(shape, dtype=x.dtype, device="meta")
    elif name == "linear":
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != x.dtype or x.dim() < 1 \
                or weight.shape[1] != x.shape[-1] or (bias is not None and bias.shape != weight.shape[:1]):
            return None
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")
    # empty_like on meta goes through Python reference code (~40 us); empty_strided is ~2 us
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _check_meta(values: list[Any], op: str) -> None:
    """A meta tensor that is not floating point (a mask or index computed from data) has no values a
    rule could read: indexing a real tensor with it would give garbage, so trace for real instead.
    (Not called for elementwise ops, whose rules read labels and shapes only: a computed mask in
    ``masked_fill`` or ``where`` is harmless there.)"""
    for t in values:
        if isinstance(t, torch.Tensor) and t.is_meta and not (t.is_floating_point() or t.is_complex()):
            raise _NeedsValues(f"{op!r} takes a {t.dtype} tensor computed from data")


def _to_meta(tree: Any, memo: dict[int, torch.Tensor]) -> Any:
    """Floating-point tensors of ``tree`` as meta tensors (one per distinct tensor: tied weights stay tied)."""

    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            return t
        if id(t) not in memo:  # (not empty_like: ~20x slower on meta, and this runs for every parameter)
            memo[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return memo[id(t)]

    return tree_map(convert, tree)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` called on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


@contextmanager
def substituted(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model`` holds ``values`` (by parameter or buffer name) instead of its own tensors;
    its own are put back after. A tensor known under several names (tied weights) is replaced under all of
    them, so a value given for one name holds for its aliases; different values for two aliases are an error.

    Written here rather than using ``torch.func.functional_call``, which does the same through a generic
    accessor (~7 ms a call on a 200-module model, a fifth of a small CNN's forward pass) and rejects a value
    given for one name of a tied pair."""
    slots = []  # (the dict that holds the tensor, its key, the tensor), each slot once
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and (id(store), key) not in seen:
                    seen.add((id(store), key))
                    slots.append((store, key, t, f"{prefix}.{key}" if prefix else key))
    by_tensor: dict[int, tuple[str, torch.Tensor]] = {}
    for _, _, t, name in slots:
        if name in values:
            first = by_tensor.setdefault(id(t), (name, values[name]))
            if first[1] is not values[name]:
                raise ValueError(f"{first[0]!r} and {name!r} are one tied tensor but were given different values")
    swapped = []
    try:
        for store, key, t, _ in slots:
            if id(t) in by_tensor:
                store[key] = by_tensor[id(t)][1]
                swapped.append((store, key, t))
        yield
    finally:
        for store, key, t in reversed(swapped):
            store[key] = t


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after). Tracing and planning allocate
    many short-lived tuples and lists; each allocation burst starts a collection that walks the objects of
    the whole process (a full one, every few calls, takes 0.2 s in a process holding a few torchvision
    models), to find almost no cyclic garbage: what little there is goes at the next collection after the
    block. Also usable as a decorator."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@collector_paused()
def build_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    unknown_ops: str = "error",
    cover: bool = False,
    values: bool = True,
    live: Mapping[str, Block] | None = None,
) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs) and return its :class:`~slimtorch.graph.DependencyGraph`. Nothing of the model changes: BatchNorm
    running statistics are updated on copies.

    Args:
        params: parameter values to run with instead of the model's own (e.g. masked ones), by name.
        unknown_ops: ``"error"`` raises :class:`~slimtorch.errors.UnsupportedOpError` for an op with no
            channel rule that touches prunable channels; ``"keep"`` leaves those channels unpruned
            (they are blocked, and the graph says why).
        cover: when layers with parameters do not run in the model's mode (e.g. auxiliary classifiers
            in eval mode), trace in train mode too and keep the graph that reaches more of them, so
            that compaction leaves no layer reading channels that are gone. ``graph.unreached`` lists
            the layers that still never ran.
        values: record what compaction needs besides the structure (the values where channels are
            consumed, ``graph.output``). ``False`` (what pruning needs) traces shapes only when the model
            allows it, several times faster on a large model; ``graph.measured`` says which was done.
            A shapes-only trace keeps a tape of the model's ops; a later ``values=True`` build of the same
            model on inputs of the same shapes, in the same modes, replays it (one forward pass checked op
            by op against the tape, values measured where the rules asked) instead of tracing again, and
            traces in full when the run differs in anything; ``graph.replayed`` says which was done (see
            :mod:`slimtorch.graph.replay`).
        live: by parameter name, the live block (output rows, input columns) of weights that are zero outside
            it, as :func:`~slimtorch.graph.live.live_blocks` finds from their masks: a measured run computes
            their linear and convolution ops on that block only (the same values at a fraction of the cost;
            see :mod:`slimtorch.graph.live`). The caller vouches for the zeros.
    """
    if unknown_ops not in ("error", "keep"):
        raise ConfigError(f"unknown_ops must be 'error' or 'keep', got {unknown_ops!r}")
    if "transformers" in sys.modules:  # Hugging Face attention rules, registered on first use (heavy import)
        with contextlib.suppress(ImportError):
            importlib.import_module("slimtorch.integrations.hf.compaction")
    from slimtorch.graph.replay import forget, remember, replay  # (it builds on this module)

    if values and (measured := replay(model, example_inputs, params, unknown_ops, cover, live)) is not None:
        return measured
    graph, tracer = _traced(model, example_inputs, params, unknown_ops, values, live)
    if cover and graph.unreached and not model.training:
        try:
            with temporary_mode(model, training=True):
                trained = _traced(model, example_inputs, params, unknown_ops, values, live)
        except TraceError:  # e.g. BatchNorm cannot train on a batch of one 1x1 map
            trained = None
        if trained is not None and len(trained[0].unreached) < len(graph.unreached):
            graph, tracer = trained
    if not graph.measured:
        remember(model, example_inputs, unknown_ops, cover, graph, tracer)
    elif not values:
        forget(model)  # (the model needed values this time: an older template is no longer to be trusted)
    return graph


def _traced(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None, unknown_ops: str,
            values: bool, live: Mapping[str, Block] | None = None) -> tuple[DependencyGraph, _Tracer]:
    if not values:
        # Anything that fails on shapes alone (see the module docstring) is traced for real: the real
        # trace gives the same structure, or the error the user should see.
        with contextlib.suppress(Exception):
            return _trace(model, example_inputs, params, unknown_ops, measuring=False)
    return _trace(model, example_inputs, params, unknown_ops, measuring=True, live=live)


@contextmanager
def temporary_mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """Put every module in train or eval mode for the block, then give each its own mode back (a model
    may mix them, e.g. dropout off while BatchNorm trains; ``model.train(was)`` would flatten that)."""
    modes = [(m, m.training) for m in model.modules()]
    if any(mode != training for _, mode in modes):  # (``train`` recurses through every module: skip a no-op)
        model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``named_parameters`` and ``named_buffers`` (every name of a shared tensor included), in one walk
    over the modules instead of two."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for key, t in module._parameters.items():
            if t is not None:
                params[dot + key] = t
        for key, t in module._buffers.items():
            if t is not None:
                buffers[dot + key] = t
    return params, buffers


def run_state(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None,
              measuring: bool) -> tuple[dict[str, torch.Tensor], set[str], Any, dict[int, str]]:
    """What a traced run swaps into the model: ``(tensors by name, buffer names, inputs, tensor id -> name)``.
    ``params`` replace parameters by name; buffers are copies (BatchNorm updates its statistics in place);
    in a shapes-only run every floating-point tensor, inputs included, is a meta tensor."""
    state, buffers = _named_tensors(model)
    if params:  # a value given for one name of tied weights holds for every name of that tensor
        given = {id(state[n]): v for n, v in params.items() if n in state}
        state = {n: given.get(id(t), t) for n, t in state.items()}
    if measuring:
        buffers = {n: b.clone() for n, b in buffers.items()}
    else:
        memo: dict[int, torch.Tensor] = {}
        state, example_inputs = _to_meta(state, memo), _to_meta(example_inputs, memo)
        # integer buffers stay real (indices), as copies: BatchNorm counts its batches in place
        buffers = {n: b if b.is_meta else b.clone() for n, b in _to_meta(buffers, memo).items()}
    names: dict[int, str] = {}
    for n, t in [*state.items(), *buffers.items()]:
        names.setdefault(id(t), n)
    return {**state, **buffers}, set(buffers), example_inputs, names


def run_traced(model: nn.Module, tracer: _Tracer, state: dict[str, torch.Tensor], example_inputs: Any) -> Any:
    """Run ``model`` on ``example_inputs`` with ``state`` swapped in, under ``tracer``, every module's forward
    wrapped by it (and given back after, as it was)."""
    wrapped = []  # (module, its own instance-level forward if it had one)
    try:
        for name, module in model.named_modules():
            own = module.__dict__.get("forward")
            module.__dict__["forward"] = tracer.traced_forward(module, name, module.forward)
            wrapped.append((module, own))
        with torch.no_grad(), tracer, substituted(model, state):
            return call_model(model, example_inputs)
    except SlimError:
        raise
    except Exception as err:
        raise TraceError(f"the model failed to run on the example inputs: {type(err).__name__}: {err}") from err
    finally:
        for module, own in wrapped:
            if own is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = own


def _trace(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None, unknown_ops: str,
           measuring: bool, live: Mapping[str, Block] | None = None) -> tuple[DependencyGraph, _Tracer]:
    state, buffers, example_inputs, names = run_state(model, example_inputs, params, measuring)
    graph = DependencyGraph(training=model.training, measured=measuring)
    tracer = _Tracer(graph, names, buffers, measuring)
    if measuring and live:
        tracer.blocks = BlockOps(live, names)
    out = run_traced(model, tracer, state, example_inputs)
    graph.output = out if measuring else None
    prefix = {n: f"{n}." if n else "" for n, _ in model.named_modules()}
    graph.unreached = [n for n, m in model.named_modules() if n not in graph.called and (own := [
        prefix[n] + p for p, _ in m.named_parameters(recurse=False)]) and not graph.used.intersection(own)]
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            graph.block(tracer.labels(t), "reaches the model output")
    _resolve_unknown(graph, unknown_ops)
    if tracer.tape is not None:  # a shapes-only graph has no measured values: its sinks wait for a replay
        tracer.tape.append(("output", tracer.signature(out)))
        tracer.sinks, graph.sinks = graph.sinks, []
    return graph, tracer


def _resolve_unknown(graph: DependencyGraph, policy: str) -> None:
    """Unknown ops matter only where they touch channels of a layer; raise or block those."""
    if not graph.unknown:
        return
    layer_units = [graph.unit_of(m.labels) for m in graph.members.values() if m.role != "element"]
    known = torch.unique(torch.cat([u.reshape(-1) for u in layer_units])) if layer_units else torch.empty(0)
    for op, module, inputs in graph.unknown:
        touched = [lab for lab in inputs if lab is not None and bool(torch.isin(graph.unit_of(lab), known).any())]
        if not touched:
            continue
        if policy == "error":
            raise UnsupportedOpError(
                f"op {op!r} in module {module or '<root>'!r} touches prunable channels but has no channel rule, "
                "so its effect on them is unknown; register one with slimtorch.graph.register_rule, or pass "
                "unknown_ops='keep' to leave those channels unpruned"
            )
        for lab in touched:
            graph.block(lab, f"unknown op {op!r} in module {module or '<root>'!r}")
