"""Tracing: one real forward pass under a ``TorchFunctionMode``, per-op rules propagating channel labels.

Why not torch.export or FX: both re-trace the Python code symbolically, which fails on data-dependent
control flow and (for export) takes tens of seconds on a large model; a function mode sees exactly the
ops that run, with real shapes and values, at the cost of one forward pass. Modules with a module-level
rule (``nn.MultiheadAttention``, LSTM...) are handled as one node: nothing inside them is traced.
"""

from __future__ import annotations

import contextlib
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
from torch.utils._pytree import tree_leaves

from slimtorch.errors import SlimError, TraceError, UnsupportedOpError
from slimtorch.graph.graph import DependencyGraph
from slimtorch.graph.rules import find_module_rule, find_rule, op_name

__all__ = ["ModuleContext", "OpContext", "build_graph"]


@dataclass
class _Frame:
    module: str
    counts: Counter = field(default_factory=Counter)
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
    def where(self) -> str:
        return f"{self.name!r} in module {self.site[0] or '<root>'!r}"

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [t for t in tree_leaves(self.out) if isinstance(t, torch.Tensor)]

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
        """(abs max, min, max) of ``t`` per index of the ``keep`` dims, over all other dims."""
        x = t.detach()
        x = x.float() if not x.is_floating_point() else x
        others = [d for d in range(x.dim()) if d not in keep]
        if any(x.shape[d] == 0 for d in others):
            zero = torch.zeros([x.shape[d] for d in keep])
            return zero, zero, zero
        # Reduce over ``others`` in place instead of permuting into a (*keep, rest) copy: two reductions
        # instead of a copy, an abs and three reductions; the abs max is max(-min, max), exactly.
        vmin = x.amin(dim=others) if others else x
        vmax = x.amax(dim=others) if others else x
        kept = sorted(keep)  # the reductions leave the kept dims in ascending order; put them in ``keep`` order
        order = [kept.index(d) for d in keep]
        vmin, vmax = vmin.permute(order), vmax.permute(order)
        return torch.maximum(-vmin, vmax).cpu(), vmin.cpu(), vmax.cpu()


class ModuleContext(OpContext):
    """What a module-level rule sees: ``module``, its name, the call's ``args``/``kwargs``, ``out``."""

    def __init__(self, tracer: _Tracer, module: nn.Module, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        super().__init__(tracer, type(module), args, kwargs, out, (name, type(module).__name__, 0))
        self.module, self.module_name = module, name

    def param(self, attr: str) -> str:
        """Full name of the module's own parameter or buffer ``attr``."""
        return f"{self.module_name}.{attr}" if self.module_name else attr


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: DependencyGraph, names: dict[int, str], buffers: set[str]) -> None:
        super().__init__()
        self.graph, self.names, self.buffers = graph, names, buffers
        self._labels: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}
        self.stack = [_Frame("<outside>")]  # ops outside the model's forward are not recorded
        self.atomic = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.atomic == 0 and len(self.stack) > 1:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = op_name(func)
        frame = self.stack[-1]
        site = (frame.module, name, frame.counts[name])
        frame.counts[name] += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        leaves = [self.names[id(t)] for t in inputs if id(t) in self.names]
        self.graph.used.update(leaves)
        if not leaves and not any(self._has(t) for t in inputs):
            return
        ctx = OpContext(self, func, args, kwargs, out, site)
        rule = find_rule(func)
        if rule is None:
            if ctx.outputs:
                self.graph.unknown.append((name, frame.module, [ctx.labels(t) for t in inputs]))
            return
        rule(ctx)

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

    # -- module hooks -------------------------------------------------------------------------------

    def pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.graph.called.add(name)
            frame = _Frame(name)
            self.stack.append(frame)
            if self.atomic:
                self.atomic += 1
            elif (rule := find_module_rule(module)) is not None:
                self.atomic = 1
                frame.rule, frame.call = rule, (args, kwargs)

        return hook

    def post_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            frame = self.stack.pop()
            if frame.rule is not None:
                self.atomic = 0
                self.graph.used.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters())
                with torch._C.DisableTorchFunction():
                    frame.rule(ModuleContext(self, module, name, *frame.call, out))
            elif self.atomic:
                self.atomic -= 1

        return hook


def _call(model: nn.Module, state: dict[str, torch.Tensor], example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return torch.func.functional_call(model, state, (), dict(example_inputs))
    if isinstance(example_inputs, tuple):
        return torch.func.functional_call(model, state, example_inputs)
    return torch.func.functional_call(model, state, (example_inputs,))


def build_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    unknown_ops: str = "error",
    cover: bool = False,
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
    """
    if unknown_ops not in ("error", "keep"):
        raise ValueError(f"unknown_ops must be 'error' or 'keep', got {unknown_ops!r}")
    if "transformers" in sys.modules:  # Hugging Face attention rules, registered on first use (heavy import)
        with contextlib.suppress(ImportError):
            importlib.import_module("slimtorch.transformers.hf")
    graph = _trace(model, example_inputs, params, unknown_ops)
    if cover and graph.unreached and not model.training:
        try:
            with temporary_mode(model, training=True):
                trained = _trace(model, example_inputs, params, unknown_ops)
        except TraceError:  # e.g. BatchNorm cannot train on a batch of one 1x1 map
            trained = None
        if trained is not None and len(trained.unreached) < len(graph.unreached):
            graph = trained
    return graph


@contextmanager
def temporary_mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """Put every module in train or eval mode for the block, then give each its own mode back (a model
    may mix them, e.g. dropout off while BatchNorm trains; ``model.train(was)`` would flatten that)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _trace(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None,
           unknown_ops: str) -> DependencyGraph:
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(params or {})
    buffers = {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)}
    names: dict[int, str] = {}
    for n, t in [*state.items(), *buffers.items()]:
        names.setdefault(id(t), n)
    graph = DependencyGraph(training=model.training)
    tracer = _Tracer(graph, names, set(buffers))
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(tracer.post_hook(name), with_kwargs=True))
    try:
        with torch.no_grad(), tracer:
            out = _call(model, {**state, **buffers}, example_inputs)
    except SlimError:
        raise
    except Exception as err:
        raise TraceError(f"the model failed to run on the example inputs: {type(err).__name__}: {err}") from err
    finally:
        for h in handles:
            h.remove()
    graph.output = out
    prefix = {n: f"{n}." if n else "" for n, _ in model.named_modules()}
    graph.unreached = [n for n, m in model.named_modules() if n not in graph.called and (own := [
        prefix[n] + p for p, _ in m.named_parameters(recurse=False)]) and not graph.used.intersection(own)]
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            graph.block(tracer.labels(t), "reaches the model output")
    _resolve_unknown(graph, unknown_ops)
    return graph


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
