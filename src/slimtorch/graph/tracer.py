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

import functools
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from slimtorch.errors import SlimError, TraceError, UnsupportedOpError
from slimtorch.graph.context import PLAIN_TYPES, ModuleContext, OpContext, tensors_in
from slimtorch.graph.graph import DependencyGraph
from slimtorch.graph.live import Block, BlockOps
from slimtorch.graph.rules import NUMBER_FACTORIES, VALUE_FREE, find_module_rule, find_rule, note_number, op_name
from slimtorch.graph.run import attributes_kept, call_model, run_state, substituted
from slimtorch.graph.shapes import check_meta, shape_of

__all__ = ["Frame", "Tracer", "run_traced", "trace_once"]


_PLAIN_TYPES = frozenset(PLAIN_TYPES) - {torch.device}  # (a signature leaves devices out: meta in a shapes-only trace)
_EXACT_DTYPES = frozenset([torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])


#: ops that turn a tensor's values into a Python value (which may decide the model's control flow)
_TO_PYTHON = frozenset(["__bool__", "item", "tolist", "__int__", "__float__", "__index__", "is_nonzero", "equal",
                        "allclose"])


def _no_ref() -> None:  # a weak reference to nothing
    return None


@dataclass
class Frame:
    module: str
    counts: Counter = field(default_factory=Counter)
    kind: type | None = None  # the module's class
    rule: Any = None
    call: tuple[Any, Any] | None = None


class Tracer(TorchFunctionMode):
    def __init__(self, graph: DependencyGraph, names: dict[int, str], buffers: set[str], measuring: bool) -> None:
        super().__init__()
        self.graph, self.names, self.buffers, self.measuring = graph, names, buffers, measuring
        self._labels: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}
        self.stack = [Frame("<outside>")]  # ops outside the model's forward are not recorded
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
        out = None if self.measuring else shape_of(func, args, kwargs)
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
            check_meta(inputs, name)
        leaves = [self.names[id(t)] for t in inputs if id(t) in self.names]
        self.graph.used.update(leaves)
        if self.measuring:
            self._follow_values(name, site[0], inputs, out)
        if not leaves and not any(self._has(t) for t in inputs):
            if name in NUMBER_FACTORIES:
                note_number(OpContext(self, func, args, kwargs, out, site))
            return
        ctx = OpContext(self, func, args, kwargs, out, site)
        rule = find_rule(func)
        if rule is None:
            if ctx.outputs:
                self.graph.unknown.append((name, site[0], [ctx.labels(t) for t in inputs]))
            return
        rule(ctx)

    def _module(self, module: nn.Module, name: str, frame: Frame, out: Any) -> None:
        """A module handled as one node by its module-level rule (called as the module's forward returns,
        where this mode is active: what it does with tensors must not be traced)."""
        with torch._C.DisableTorchFunction():
            inputs = tensors_in(frame.call)
            if self.tape is not None:
                self._tape(("module", name, type(module)), frame.call, inputs, out)
            self.graph.used.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters())
            if not self.measuring:
                check_meta(inputs, type(module).__name__)
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
            frame = Frame(name, kind=type(module))
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


def run_traced(model: nn.Module, tracer: Tracer, state: dict[str, torch.Tensor], example_inputs: Any) -> Any:
    """Run ``model`` on ``example_inputs`` with ``state`` swapped in, under ``tracer``, every module's forward
    wrapped by it (and given back after, as it was), every module's attributes kept as they were."""
    with attributes_kept(model):
        return _run_wrapped(model, tracer, state, example_inputs)


def _run_wrapped(model: nn.Module, tracer: Tracer, state: dict[str, torch.Tensor], example_inputs: Any) -> Any:
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


def trace_once(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None, unknown_ops: str,
           measuring: bool, live: Mapping[str, Block] | None = None) -> tuple[DependencyGraph, Tracer]:
    state, buffers, example_inputs, names = run_state(model, example_inputs, params, measuring)
    graph = DependencyGraph(training=model.training, measured=measuring)
    tracer = Tracer(graph, names, buffers, measuring)
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
