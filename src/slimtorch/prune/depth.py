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

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.graph.run import call_model, temporary_mode
from slimtorch.masks import COMPACTION_ATTR
from slimtorch.prune.loop import forward_batch

__all__ = ["block_drop_loss", "block_influence", "chain_layers", "drop_blocks_", "plan_block_drop"]


_SPAN = re.compile(r"(?:(.+)\.)?(\d+)-(\d+)")


@dataclass(frozen=True)
class _Block:
    """A module, or a span of consecutive children ``first..last`` of an ``nn.Sequential``."""

    parent: nn.Module
    keys: tuple[str, ...]  # the children of ``parent`` it is made of
    names: tuple[str, ...]  # their names in the model
    modules: tuple[nn.Module, ...]

    @property
    def first(self) -> nn.Module:
        return self.modules[0]

    @property
    def last(self) -> nn.Module:
        return self.modules[-1]


def _span(model: nn.Module, name: str, modules: Mapping[str, nn.Module]) -> _Block | None:
    match = _SPAN.fullmatch(name)
    if match is None:
        return None
    parent_name, first, last = match[1] or "", int(match[2]), int(match[3])
    parent = modules.get(parent_name)
    if not isinstance(parent, nn.Sequential) or not 0 <= first < last < len(parent):
        chains = [n for n, m in modules.items() if isinstance(m, nn.Sequential)]
        raise NoMatchError(f"block {name!r} is no span of an nn.Sequential's children ('<sequential>.<first>-<last>', "
                           f"first < last); {closest(parent_name, chains)}")
    keys = tuple(list(parent._modules)[first : last + 1])
    names = tuple(f"{parent_name}.{k}" if parent_name else k for k in keys)
    return _Block(parent, keys, names, tuple(parent._modules[k] for k in keys))


def _blocks(model: nn.Module, names: Sequence[str]) -> dict[str, _Block]:
    if isinstance(names, str):
        raise ConfigError(f"blocks must be a list of module names, got the string {names!r}; write [{names!r}]")
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        block = _span(model, name, modules) if isinstance(name, str) and name not in modules else None
        if block is None:
            if not name or name not in modules:
                hint = closest(name, [n for n in modules if n])
                raise NoMatchError(f"block {name!r} is not a module of the model; {hint}")
            parent_name, _, key = name.rpartition(".")
            block = _Block(modules[parent_name], (key,), (name,), (modules[name],))
        out[name] = block
    return out


def _first_input(name: str, args: tuple) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise ConfigError(f"block {name!r} is not called with a tensor as first argument, so it cannot be dropped")
    return args[0]


def _check_shape(name: str, x: torch.Tensor, y: Any) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"block {name!r} maps {tuple(x.shape)} to {shape}; only blocks whose output has their input's "
            "shape (residual blocks, transformer layers, shape-keeping layers of a chain) can be replaced by an "
            "identity"
        )
    return y


@contextmanager
def _around(blocks: Mapping[str, _Block], on_output: Callable[[str, torch.Tensor, Any], Any]) -> Iterator[None]:
    """Hooks that see each block's input (its first module's) and output (its last module's): ``on_output(name,
    input, output)`` runs after the block and may replace its output."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, block in blocks.items():
        def before(module: nn.Module, args: tuple, name: str = name) -> None:
            seen[name] = _first_input(name, args)

        def after(module: nn.Module, args: tuple, output: Any, name: str = name) -> Any:
            return on_output(name, seen.pop(name), output)

        handles += [block.first.register_forward_pre_hook(before), block.last.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_influence(model: nn.Module, blocks: Sequence[str], batches: Iterable[Any]) -> dict[str, float]:
    """How much each block changes its input: 1 - cosine similarity of input and output per sample,
    averaged over the batches (the "block influence" of Men et al. 2024). Low scores drop first. A block is
    a module or a span ``"<sequential>.<first>-<last>"`` of a chain's children (:func:`chain_layers`)."""
    chosen = _blocks(model, blocks)
    sums = dict.fromkeys(chosen, 0.0)
    counts = dict.fromkeys(chosen, 0)

    def score(name: str, x: torch.Tensor, output: Any) -> None:
        y = _check_shape(name, x, output)
        cos = F.cosine_similarity(x.reshape(len(x), -1).float(), y.reshape(len(y), -1).float(), dim=1)  # (N,)
        sums[name] += float((1.0 - cos).sum())
        counts[name] += len(cos)

    with _around(chosen, score):
        for batch in batches:
            forward_batch(model, batch)
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
    for name, block in chosen.items():
        def skip(name: str, x: torch.Tensor, output: Any) -> torch.Tensor:
            _check_shape(name, x, output)
            return x

        with _around({name: block}, skip):
            value = float(metric(model))
        out[name] = base - value if higher_is_better else value - base
    return out


def _weighted(module: nn.Module) -> bool:
    """A layer that starts a chain's layer: it has weights and is no normalisation of the layer before it."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return any(True for _ in module.parameters()) and not isinstance(module, norms)


def _run_shapes(model: nn.Module, chains: Sequence[nn.Sequential], example_inputs: Any) -> dict[int, list[tuple]]:
    """Per child of the chains (by id): (input shape, output shape) of each call on ``example_inputs``."""
    shapes: dict[int, list[tuple]] = {}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].shape if args and isinstance(args[0], torch.Tensor) else None
        shapes.setdefault(id(module), []).append((x, output.shape if isinstance(output, torch.Tensor) else None))

    handles = [child.register_forward_hook(record) for chain in chains for child in chain]
    try:
        with torch.no_grad(), temporary_mode(model, training=False):
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def chain_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """The layers of the model's plain chains that can be dropped where shapes allow: in every
    ``nn.Sequential``, a child with weights and the parameter-free and normalisation children after it (a
    conv, its BatchNorm and its ReLU) form one layer, kept when it runs once and its output has its input's
    shape on ``example_inputs``. Named ``"<sequential>.<first>-<last>"`` (positions among its children; a layer
    of one child: the child's name), for :func:`block_influence`, :func:`block_drop_loss` and :func:`drop_blocks_`."""
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]
    shapes = _run_shapes(model, [m for _, m in chains], example_inputs)
    found = []
    for name, chain in chains:
        keys, children = list(chain._modules), list(chain._modules.values())
        starts = [i for i, child in enumerate(children) if _weighted(child)] + [len(children)]
        prefix = f"{name}." if name else ""
        for first, end in itertools.pairwise(starts):
            runs = [shapes.get(id(c), []) for c in children[first:end]]
            if any(len(r) != 1 for r in runs) or runs[0][0][0] is None or runs[0][0][0] != runs[-1][0][1]:
                continue  # not run once, or its output has another shape than its input
            found.append(f"{prefix}{keys[first]}" if end - first == 1 else f"{prefix}{first}-{end - 1}")
    return found


def plan_block_drop(scores: Mapping[str, float], *, count: int) -> list[str]:
    """The ``count`` blocks with the lowest scores, in the order given (ties: the earlier block goes)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(scores):
        raise ConfigError(f"count must be an integer in [0, {len(scores)}], got {count!r}")
    names = list(scores)
    order = sorted(range(len(names)), key=lambda i: (scores[names[i]], i))
    chosen = {names[i] for i in order[:count]}
    return [n for n in names if n in chosen]


def drop_blocks_(model: nn.Module, names: Sequence[str]) -> None:
    """Replace each named block (a module, or every child of a span ``"<sequential>.<first>-<last>"``) with
    ``nn.Identity`` (all names are checked before anything changes).

    The model is then compacted: ``model.slimtorch_compaction`` records ``params_before``,
    ``params_after`` and ``dropped_blocks``, and :func:`slimtorch.report` reports it as such.
    """
    chosen = _blocks(model, names)
    every = [n for block in chosen.values() for n in block.names]
    if len(set(every)) != len(every) or any(n.startswith(o + ".") for n in every for o in every):
        raise ConfigError(f"blocks {list(chosen)} overlap; drop a block or its parts, not both")
    before = sum(p.numel() for p in model.parameters())
    for block in chosen.values():
        for key in block.keys:
            block.parent._modules[key] = nn.Identity()
    info = dict(getattr(model, COMPACTION_ATTR, None) or {})  # keeps what an earlier compaction recorded
    info.setdefault("params_before", before)
    info["params_after"] = sum(p.numel() for p in model.parameters())
    info["dropped_blocks"] = [*info.get("dropped_blocks", []), *chosen]
    setattr(model, COMPACTION_ATTR, info)
