"""Dropping whole blocks (residual blocks, transformer layers, shape-keeping layers): score, plan, drop.

Whole blocks are not expressed as masks. Zeroing a residual branch makes a block compute its shortcut
only in special cases (``relu(x + 0)`` equals ``x`` only when ``x >= 0``; a projection shortcut is no
identity at all), so masks would promise an equivalence they cannot keep. Instead a pure planner picks
blocks from scores and :func:`drop_blocks_` replaces each with ``nn.Identity``: exact by construction,
and the model really gets smaller and faster. Only blocks whose output has their input's shape qualify;
the scorers check it on real data::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.depth import block_influence, drop_blocks_, plan_block_drop
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.eye(4)), net[1].bias.zero_()   # block "1" changes nothing
    >>> scores = block_influence(net, ["0", "1"], [torch.randn(8, 4)])
    >>> plan_block_drop(scores, count=1)
    ['1']
    >>> drop_blocks_(net, ["1"])
    >>> net[1]
    Identity()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.masks import COMPACTION_ATTR
from slimtorch.prune.loop import forward_batch

__all__ = ["block_drop_loss", "block_influence", "drop_blocks_", "plan_block_drop"]


def _blocks(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(names, str):
        raise ConfigError(f"blocks must be a list of module names, got the string {names!r}; write [{names!r}]")
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            hint = closest(name, [n for n in modules if n])
            raise NoMatchError(f"block {name!r} is not a module of the model; {hint}")
    return {name: modules[name] for name in names}


def _first_input(name: str, args: tuple) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise ConfigError(f"block {name!r} is not called with a tensor as first argument, so it cannot be dropped")
    return args[0]


def _check_shape(name: str, x: torch.Tensor, y: Any) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"block {name!r} maps {tuple(x.shape)} to {shape}; only blocks whose output has their input's "
            "shape (residual blocks, transformer layers) can be replaced by an identity"
        )
    return y


@torch.no_grad()
def block_influence(model: nn.Module, blocks: Sequence[str], batches: Iterable[Any]) -> dict[str, float]:
    """How much each block changes its input: 1 - cosine similarity of input and output per sample,
    averaged over the batches (the "block influence" of Men et al. 2024). Low scores drop first."""
    chosen = _blocks(model, blocks)
    sums = dict.fromkeys(chosen, 0.0)
    counts = dict.fromkeys(chosen, 0)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = _first_input(name, args)
            y = _check_shape(name, x, output)
            cos = F.cosine_similarity(x.reshape(len(x), -1).float(), y.reshape(len(y), -1).float(), dim=1)  # (N,)
            sums[name] += float((1.0 - cos).sum())
            counts[name] += len(cos)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in chosen.items()]
    try:
        for batch in batches:
            forward_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ConfigError(f"blocks {missing} never ran on the batches given; check the names (or give batches)")
    return {name: sums[name] / counts[name] for name in chosen}


def block_drop_loss(
    model: nn.Module, blocks: Sequence[str], metric: Callable[[nn.Module], float], *, higher_is_better: bool = True
) -> dict[str, float]:
    """The metric lost when each block alone is skipped (its output replaced by its input). Pure: the
    skip is a temporary forward hook."""
    chosen = _blocks(model, blocks)
    base = float(metric(model))
    out = {}
    for name, module in chosen.items():

        def skip(mod: nn.Module, args: tuple, output: Any, name: str = name) -> torch.Tensor:
            x = _first_input(name, args)
            _check_shape(name, x, output)
            return x

        handle = module.register_forward_hook(skip)
        try:
            value = float(metric(model))
        finally:
            handle.remove()
        out[name] = base - value if higher_is_better else value - base
    return out


def plan_block_drop(scores: Mapping[str, float], *, count: int) -> list[str]:
    """The ``count`` blocks with the lowest scores, in the order given (ties: the earlier block goes)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(scores):
        raise ConfigError(f"count must be an integer in [0, {len(scores)}], got {count!r}")
    names = list(scores)
    order = sorted(range(len(names)), key=lambda i: (scores[names[i]], i))
    chosen = {names[i] for i in order[:count]}
    return [n for n in names if n in chosen]


def drop_blocks_(model: nn.Module, names: Sequence[str]) -> None:
    """Replace each named block with ``nn.Identity`` (all names are checked before anything changes).

    The model is then compacted: ``model.slimtorch_compaction`` records ``params_before``,
    ``params_after`` and ``dropped_blocks``, and :func:`slimtorch.report` reports it as such.
    """
    chosen = _blocks(model, names)
    if any(name.startswith(other + ".") for name in chosen for other in chosen):
        raise ConfigError(f"blocks {list(chosen)} overlap; drop a block or its parts, not both")
    before = sum(p.numel() for p in model.parameters())
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = nn.Identity()
    info = dict(getattr(model, COMPACTION_ATTR, None) or {})  # keeps what an earlier compaction recorded
    info.setdefault("params_before", before)
    info["params_after"] = sum(p.numel() for p in model.parameters())
    info["dropped_blocks"] = [*info.get("dropped_blocks", []), *chosen]
    setattr(model, COMPACTION_ATTR, info)
