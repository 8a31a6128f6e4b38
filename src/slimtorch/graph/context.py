"""What a channel rule sees: the op's call, the graph, and helpers to read and set channel labels.

A rule (:func:`~slimtorch.graph.register_rule`) gets an :class:`OpContext` for every call of its op while the
model is traced; a module-level rule (:func:`~slimtorch.graph.register_module_rule`) gets a
:class:`ModuleContext` for every call of its module.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from slimtorch.graph.graph import DependencyGraph

__all__ = ["PLAIN_TYPES", "ModuleContext", "NeedsValues", "OpContext", "Recorder", "measure", "tensors_in"]


class NeedsValues(Exception):
    """Raised inside a shapes-only (meta) trace when something needs real values (the model is then traced
    for real)."""


#: types of plain (non-tensor, non-container) op arguments
PLAIN_TYPES = (int, float, bool, str, type(None), slice, type(...), torch.dtype, torch.device, torch.memory_format,
               torch.layout, torch.Size)
_PLAIN_EXACT = frozenset(PLAIN_TYPES)


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs, in order. Plain tuples, lists and dicts are walked here
    (torch's pytree, which also knows namedtuples and registered classes, costs ~10x more per call and
    runs for every op traced); anything else goes to the pytree."""
    kind = type(tree)
    if kind is tuple or kind is list or kind is dict:
        out: list[torch.Tensor] = []
        for item in tree.values() if kind is dict else tree:
            if type(item) in _PLAIN_EXACT:  # (an exact-type lookup first: most arguments are ints, floats or None)
                continue
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif not isinstance(item, PLAIN_TYPES):
                out += tensors_in(item)
        return out
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, PLAIN_TYPES):
        return []
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class Recorder(Protocol):
    """What a context reads of the tracer that runs the model (:class:`~slimtorch.graph.tracer.Tracer`)."""

    graph: DependencyGraph
    names: dict[int, str]  # tensor id -> the name of the parameter or buffer it is
    buffers: set[str]
    measuring: bool  # False in a shapes-only trace
    stack: list[Any]  # the module calls running, innermost last (``kind``: its module's class)

    def labels(self, t: torch.Tensor) -> torch.Tensor | None: ...

    def set_labels(self, t: torch.Tensor, labels: torch.Tensor | None) -> None: ...

    def defer(self, ctx: OpContext, t: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, ...]: ...


class OpContext:
    """What a rule sees: the call (``args``, ``kwargs``, ``out``), the graph, and label helpers."""

    def __init__(self, tracer: Recorder, func: Any, args: tuple, kwargs: dict, out: Any, site: tuple) -> None:
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
            raise NeedsValues(self.where)

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

    def __init__(self, tracer: Recorder, module: nn.Module, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        super().__init__(tracer, type(module), args, kwargs, out, (name, type(module).__name__, 0))
        self.module, self.module_name = module, name

    def param(self, attr: str) -> str:
        """Full name of the module's own parameter or buffer ``attr``."""
        return f"{self.module_name}.{attr}" if self.module_name else attr
