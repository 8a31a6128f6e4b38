"""Measuring a known structure: the values compaction needs, from one checked forward pass.

Compaction needs the dependency graph of the masked model and, besides its structure, values: the
statistics of every tensor where channels are consumed (the graph's sinks) and the model's output. The
structure does not depend on values, so when pruning has traced the model shapes-only
(``build_graph(..., values=False)``), that graph carries a :class:`Trace` (``graph.trace``): the structure
and a *tape* of every op the trace saw, with its call site and a signature of its arguments (shapes, dtypes,
where each tensor came from, the values of integer tensors, plain arguments), and which tensors its rules
wanted measured. Nothing is kept anywhere else: whoever wants it replayed hands it on
(:func:`~slimtorch.compute_masks` returns it with the masks, ``masks.trace``, for :func:`~slimtorch.compact_`).

A later ``build_graph(..., values=True, trace=...)`` of the same model on inputs of the same shapes, in the
same modes, then *replays* the tape: the model runs once for real (with the given parameter values, e.g.
masked ones), and a light function mode compares each op with the tape and measures where the tape
says, without running any rule. If anything differs (another op, another shape, an integer index that
changed, a branch taken differently), the replay is abandoned and the model is traced in full. The
graph is then the shapes-only trace's structure, which the real trace reproduces exactly on every
model the tests run, with values measured on this run: what a full trace would have given, at the cost
of about one forward pass.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.graph import build_graph
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> x = torch.randn(1, 3, 6, 6)
    >>> structure = build_graph(net, x, values=False)              # shapes only; carries its trace
    >>> graph = build_graph(net, x, trace=structure.trace)         # replays it: one checked forward pass
    >>> graph.replayed, len(graph.sinks), torch.equal(graph.output, net(x))
    (True, 1, True)
    >>> build_graph(net, x).replayed                                # no trace given: a full trace
    False
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.graph.context import measure, tensors_in
from slimtorch.graph.graph import DependencyGraph, Sink
from slimtorch.graph.live import Block, BlockOps
from slimtorch.graph.run import named_tensors, run_state, temporary_mode
from slimtorch.graph.tracer import Frame, Tracer, run_traced

__all__ = ["Trace", "known_structure", "record", "replay"]


def _key(model: nn.Module, example_inputs: Any, unknown_ops: str, cover: bool) -> tuple:
    """What must be equal for a trace to apply: the inputs' signature, every module's class and mode, every
    parameter's and buffer's name, shape and dtype (a model compacted or given new layers since is not the
    model traced), the options."""
    inputs = Tracer(DependencyGraph(), {}, set(), measuring=True).signature(example_inputs)
    modules = tuple((type(m), m.training) for m in model.modules())
    tensors = tuple((n, t.shape, t.dtype) for group in named_tensors(model) for n, t in group.items())
    return inputs, modules, tensors, unknown_ops, cover


@dataclass(frozen=True, eq=False)
class Trace:
    """What a shapes-only trace learned about a model: its structure and the tape a replay follows. It holds
    no reference to the model (only classes, names, shapes and integer values), so keeping it keeps nothing
    else alive. Made by ``build_graph(..., values=False)`` (``graph.trace``); compared by identity."""

    key: tuple  # see fits()
    graph: DependencyGraph  # the structure (no sinks), with a union-find of its own
    sinks: list[Sink]  # with placeholder statistics
    tape: list[tuple]
    pending: dict[int, list[tuple[int, list[int], tuple]]]  # tape index -> (tensor position, dims, placeholders)
    outputs: list[tuple[tuple, ...]]  # tape index -> per output (shape, dtype, on meta in the shapes-only trace)

    def fits(self, model: nn.Module, example_inputs: Any, unknown_ops: str, cover: bool) -> bool:
        """Whether this is a trace of ``model`` as it is now (every module's class and mode, every tensor's name,
        shape and dtype), on inputs like ``example_inputs``, with these options."""
        return self.key == _key(model, example_inputs, unknown_ops, cover)


class _Diverged(Exception):
    """The run does not follow the tape."""


def record(model: nn.Module, example_inputs: Any, unknown_ops: str, cover: bool, graph: DependencyGraph,
           tracer: Tracer) -> Trace | None:
    """The trace of a shapes-only run of ``model`` (``graph``: its result), or None when its rules measured
    something a replay could not find again."""
    placeholders = {id(p[0]): p for entries in tracer.pending.values() for _, _, p in entries}

    def deferred(sink: Sink | None) -> bool:  # its statistics are placeholders the replay fills
        found = placeholders.get(id(sink.absmax)) if sink is not None else None
        return sink is None or (found is not None and found[1] is sink.vmin and found[2] is sink.vmax
                                and deferred(sink.other))

    if tracer.unreplayable is not None or not all(deferred(s) for s in tracer.sinks):
        return None
    structure = dataclasses.replace(graph, uf=graph.uf.copy(), sinks=[], _cache={})
    return Trace(_key(model, example_inputs, unknown_ops, cover), structure, tracer.sinks, tracer.tape,
                 tracer.pending, tracer.outputs)


def known_structure(trace: Trace | None, model: nn.Module, example_inputs: Any, unknown_ops: str,
                    cover: bool) -> tuple[DependencyGraph, list[Sink]] | None:
    """The structure ``trace`` found, when it fits ``model`` on these inputs with these options, as a graph of
    its own with nothing measured (no sinks, no output), and its sinks with placeholder statistics (what
    would be measured where); None otherwise.

    Nothing here runs the model: it is trusted to run as it was traced. A caller that uses this instead of
    :func:`replay` must check its result another way (``compact_`` compares the compacted model with the
    masked one, and plans again from a measured run if they differ)."""
    if trace is None or not trace.fits(model, example_inputs, unknown_ops, cover):
        return None
    graph = dataclasses.replace(trace.graph, uf=trace.graph.uf.copy(), _cache={}, output=None, measured=False,
                                replayed=False, sinks=[])
    return graph, trace.sinks


class _Replayer(Tracer):
    """Runs no rule: checks each op against the tape and measures where the tape says."""

    def __init__(self, trace: Trace, names: dict[int, str]) -> None:
        super().__init__(DependencyGraph(), names, set(), measuring=True)
        self.trace = trace
        self.at = 0
        self.measured: dict[int, tuple[torch.Tensor, ...]] = {}  # id of a placeholder -> its measured values

    def _exact(self, value: torch.Tensor, source: Any) -> bytes | None:
        # a tensor the shapes-only trace had on meta (a mask computed from floats) was recorded without
        # values; elementwise rules took it there without reading them, and so may it be here
        if type(source) is tuple and self.trace.outputs[source[0]][source[1]][2]:
            return None
        return value.detach().cpu().numpy().tobytes()

    def _op(self, func: Any, site: tuple, args: tuple, kwargs: dict, out: Any) -> None:
        self._check(("op", site, func), (args, kwargs), out)

    def _module(self, module: nn.Module, name: str, frame: Frame, out: Any) -> None:
        with torch._C.DisableTorchFunction():  # (see Tracer._module)
            self._check(("module", name, type(module)), frame.call, out)

    def _check(self, entry: tuple, call: Any, out: Any) -> None:
        index, tape = self.at, self.trace.tape
        if index >= len(tape) or tape[index] != (*entry, self.signature(call)):
            raise _Diverged(f"op {index}: {entry[:2]}")
        self.at += 1
        outputs = tensors_in(out)
        # the outputs too: their number places measured tensors, and their shapes check the shapes-only
        # trace's own shape arithmetic against the real ops
        if tuple((t.shape, t.dtype) for t in outputs) != tuple(o[:2] for o in self.trace.outputs[index]):
            raise _Diverged(f"op {index}: {entry[:2]} gave other outputs")
        for position, keep, placeholders in self.trace.pending.get(index, ()):
            self.measured[id(placeholders[0])] = measure([*tensors_in(call), *outputs][position], keep)
        for k, t in enumerate(outputs):
            self.produced[id(t)] = (weakref.ref(t), index, k)

    def finish(self, out: Any) -> None:
        tape = self.trace.tape
        if self.at != len(tape) - 1 or tape[-1] != ("output", self.signature(out)):
            raise _Diverged("the run ended elsewhere")


def _measured_sinks(sinks: list[Sink], measured: dict[int, tuple[torch.Tensor, ...]]) -> list[Sink]:
    def fill(sink: Sink) -> Sink:
        absmax, vmin, vmax = measured[id(sink.absmax)]  # (a rule's sink statistics are its placeholders)
        other = fill(sink.other) if sink.other is not None else None
        return dataclasses.replace(sink, absmax=absmax, vmin=vmin, vmax=vmax, other=other)

    return [fill(s) for s in sinks]


def replay(trace: Trace, model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None,
           unknown_ops: str, cover: bool, live: Mapping[str, Block] | None = None) -> DependencyGraph | None:
    """The graph a full ``build_graph(model, example_inputs, params=params, ...)`` would give, measured on one
    forward pass checked against ``trace``; None when the trace does not fit the model, these inputs and
    options, or the run does not follow it (the caller then traces in full)."""
    if not trace.fits(model, example_inputs, unknown_ops, cover):
        return None
    state, _, inputs, names = run_state(model, example_inputs, params, measuring=True)
    replayer = _Replayer(trace, names)
    if live:
        replayer.blocks = BlockOps(live, names)
    # the trace's graph may come from build_graph's train-mode pass (``cover``): run in that mode
    mode = temporary_mode(model, training=True) if trace.graph.training and not model.training \
        else contextlib.nullcontext()
    try:
        with mode:
            out = run_traced(model, replayer, state, inputs)
        replayer.finish(out)
    except Exception:  # (_Diverged, or an error the full trace will report properly)
        return None
    return dataclasses.replace(trace.graph, uf=trace.graph.uf.copy(), _cache={}, output=out, measured=True,
                               replayed=True, sinks=_measured_sinks(trace.sinks, replayer.measured))
