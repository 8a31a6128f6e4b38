"""The dependency graph: which channels of which parameters must be kept or removed together.

Stands alone: imports torch only, never pruning or compaction code.

    >>> import torch
    >>> from torchvision.models import resnet18
    >>> from slimtorch.graph import build_graph
    >>> g = build_graph(resnet18(), torch.randn(2, 3, 32, 32))
    >>> len(g.group_of("layer1.0.conv2.weight").units)   # the 64-channel residual stream of stage 1
    64
"""

from slimtorch.graph import layer_rules, module_rules, moves, products, reductions  # noqa: F401  (register the rules)
from slimtorch.graph.build import build_graph
from slimtorch.graph.callsites import FixSite, apply_fix
from slimtorch.graph.context import ModuleContext, OpContext
from slimtorch.graph.graph import ChannelGroup, DependencyGraph, Member, Sink
from slimtorch.graph.rules import find_module_rule, find_rule, register_module_rule, register_rule

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "FixSite",
    "Member",
    "ModuleContext",
    "OpContext",
    "Sink",
    "apply_fix",
    "build_graph",
    "find_module_rule",
    "find_rule",
    "register_module_rule",
    "register_rule",
]
