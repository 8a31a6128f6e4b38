"""The dependency graph: which channels of which parameters must be kept or removed together.

Stands alone: imports torch, numpy and :mod:`slimtorch.errors` only, never pruning, compaction or an
integration. Extension points: :func:`register_rule` (an op), :func:`register_module_rule` (a module handled
as one node) and ``TRACE_PREPARERS`` (called as every trace starts: integrations register their rules
there). A shapes-only graph carries its :class:`Trace`, which a later build replays (``build_graph(...,
trace=...)``).

    >>> import torch
    >>> from torchvision.models import resnet18
    >>> from slimtorch.graph import build_graph
    >>> g = build_graph(resnet18(), torch.randn(2, 3, 32, 32))
    >>> len(g.group_of("layer1.0.conv2.weight").units)   # the 64-channel residual stream of stage 1
    64
"""

from slimtorch.graph import layer_rules, module_rules, moves, products, reductions, selection  # noqa: F401  (rules)
from slimtorch.graph.build import build_graph
from slimtorch.graph.callsites import FixSite, apply_fix
from slimtorch.graph.context import ModuleContext, OpContext
from slimtorch.graph.graph import ChannelGroup, DependencyGraph, Member, Sink
from slimtorch.graph.layer_rules import channel_labels, consumer_sink, placed
from slimtorch.graph.replay import Trace
from slimtorch.graph.rules import TRACE_PREPARERS, find_module_rule, find_rule, register_module_rule, register_rule

__all__ = [
    "TRACE_PREPARERS",
    "ChannelGroup",
    "DependencyGraph",
    "FixSite",
    "Member",
    "ModuleContext",
    "OpContext",
    "Sink",
    "Trace",
    "apply_fix",
    "build_graph",
    "channel_labels",
    "consumer_sink",
    "find_module_rule",
    "find_rule",
    "placed",
    "register_module_rule",
    "register_rule",
]
