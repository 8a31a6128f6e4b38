"""``build_graph``: trace a model into its dependency graph, shapes only where that is enough."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.errors import ConfigError, TraceError
from slimtorch.graph.graph import DependencyGraph
from slimtorch.graph.live import Block
from slimtorch.graph.replay import Trace, record, replay
from slimtorch.graph.rules import TRACE_PREPARERS
from slimtorch.graph.run import collector_paused, temporary_mode
from slimtorch.graph.tracer import Tracer, trace_once

__all__ = ["build_graph"]


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
    trace: Trace | None = None,
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
            A shapes-only graph carries its :class:`~slimtorch.graph.replay.Trace` (``graph.trace``: the
            structure and a tape of the model's ops, None when the model had to be traced for real).
        live: by parameter name, the live block (output rows, input columns) of weights that are zero outside
            it, as :func:`~slimtorch.graph.live.live_blocks` finds from their masks: a measured run computes
            their linear and convolution ops on that block only (the same values at a fraction of the cost;
            see :mod:`slimtorch.graph.live`). The caller vouches for the zeros.
        trace: a shapes-only graph's ``trace``: a ``values=True`` build of the same model on inputs of the same
            shapes, in the same modes, replays it (one forward pass checked op by op against the tape, values
            measured where the rules asked) instead of tracing again, and traces in full when the run differs
            in anything; ``graph.replayed`` says which was done (see :mod:`slimtorch.graph.replay`).
    """
    if unknown_ops not in ("error", "keep"):
        raise ConfigError(f"unknown_ops must be 'error' or 'keep', got {unknown_ops!r}")
    for prepare in TRACE_PREPARERS:
        prepare(model)
    if values and trace is not None \
            and (measured := replay(trace, model, example_inputs, params, unknown_ops, cover, live)) is not None:
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
        graph.trace = record(model, example_inputs, unknown_ops, cover, graph, tracer)
    return graph


def _traced(model: nn.Module, example_inputs: Any, params: Mapping[str, torch.Tensor] | None, unknown_ops: str,
            values: bool, live: Mapping[str, Block] | None = None) -> tuple[DependencyGraph, Tracer]:
    if not values:
        # Anything that fails on shapes alone (see the module docstring) is traced for real: the real
        # trace gives the same structure, or the error the user should see.
        with contextlib.suppress(Exception):
            return trace_once(model, example_inputs, params, unknown_ops, measuring=False)
    return trace_once(model, example_inputs, params, unknown_ops, measuring=True, live=live)
