"""Sparse training at constant sparsity: prune and regrow connections while training.

Every ``every`` steps, each selected layer drops a share of its active weights (the smallest
magnitudes) and regrows as many connections among those that were inactive *before* the update (never
the ones just dropped), so the layer's sparsity never changes:

* SET (Mocanu et al. 2018): regrowth at random (``regrow="random"``);
* RigL (Evci et al. 2020): regrowth where the dense gradient is largest (``regrow="gradient"``); the
  dense gradient of the step's backward pass is read before the masks zero it.

Regrown weights start at zero. The share dropped decays from ``drop_fraction`` to 0 with a cosine
over ``end`` steps (RigL's schedule), or stays constant when ``end`` is None::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.sparse_training import DynamicSparsity
    >>> net = nn.Sequential(nn.Linear(20, 10))
    >>> sparse = DynamicSparsity(net, [{"op_types": ["Linear"], "sparse_ratio": 0.9}], every=1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> for _ in range(3):
    ...     opt.zero_grad(); net(torch.randn(4, 20)).sum().backward(); opt.step()
    ...     sparse.step()
    >>> int((net[0].weight != 0).sum()) <= 20, int(sparse.masks["0.weight"].sum())
    (True, 20)

When the selected layers already carry masks (:func:`slimtorch.apply_masks_`), training starts from
them; otherwise from random masks at the config list's sparsities (sparse from scratch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.checks import check_number
from slimtorch.config import PruneTarget, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.masks import apply_masks_, drop_grad_hook, get_masks
from slimtorch.prune.loop import Callback
from slimtorch.prune.pruner import units_to_prune
from slimtorch.select import select_modules, weight_param_name

__all__ = ["DynamicSparsity", "drop_and_grow"]

_REGROW = ("random", "gradient")


def drop_and_grow(mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor, count: int) -> torch.Tensor:
    """A new mask with the ``count`` smallest-|w| active entries dropped and the ``count`` best-scoring
    entries among those inactive before (never the ones just dropped) grown. Pure; same shape.

        >>> mask = torch.tensor([True, True, False, False])
        >>> drop_and_grow(mask, torch.tensor([0.1, 2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 5.0, 1.0]), 1)
        tensor([False,  True,  True, False])
    """
    flat = mask.reshape(-1)  # (numel,): positions are flat indices from here on
    inactive = int((~flat).sum())
    count = min(count, int(flat.sum()), inactive)
    new = flat.clone()
    if count > 0:
        magnitude = weight.detach().reshape(-1).abs().float().masked_fill(~flat, float("inf"))
        dropped = torch.sort(magnitude, stable=True).indices[:count]  # smallest active weights
        candidates = grow_scores.reshape(-1).float().masked_fill(flat, float("-inf"))
        grown = torch.sort(candidates, descending=True, stable=True).indices[:count]  # best inactive ones
        new[dropped] = False
        new[grown] = True
    return new.reshape(mask.shape)


class DynamicSparsity(Callback):
    """SET / RigL sparse training of the layers ``config_list`` selects (``sparse_ratio`` entries,
    single weights). Call :meth:`step` after each ``optimizer.step()``; ``self.updates`` records, per
    update, the positions dropped and grown in each layer."""

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any] | PruneTarget],
        *,
        regrow: str = "random",
        every: int = 100,
        drop_fraction: float = 0.3,
        end: int | None = None,
        seed: int = 0,
    ) -> None:
        if regrow not in _REGROW:
            raise ConfigError(f"regrow must be one of {list(_REGROW)} (SET, RigL), got {regrow!r}")
        check_number(every, "every", low=1, integer=True)
        check_number(drop_fraction, "drop_fraction", low=0.0, high=1.0)
        if end is not None:
            check_number(end, "end (None or a step count)", low=1, integer=True)
        check_number(seed, "seed", low=0, high=2**63 - 1, integer=True)
        self.model, self.regrow, self.every, self.drop_fraction, self.end = model, regrow, every, drop_fraction, end
        self.generator = torch.Generator().manual_seed(seed)
        self.params = self._select(model, parse_config_list(config_list))
        self.steps = 0
        self.updates: list[dict[str, dict[str, torch.Tensor]]] = []
        self._dense: dict[str, torch.Tensor] = {}
        self._handles = [self._capture(name, p) for name, p in self.params.items()] if regrow == "gradient" else []
        self.masks = self._initial_masks(parse_config_list(config_list))
        apply_masks_(model, self.masks)

    @staticmethod
    def _select(model: nn.Module, targets: Sequence[PruneTarget]) -> dict[str, nn.Parameter]:
        params = {}
        for name, sel in select_modules(model, targets).items():
            t = sel.target
            if t.sparse_ratio is None or (t.granularity is not None and t.granularity.kind != "fine"):
                raise ConfigError(
                    f"sparse training keeps each layer's sparsity of single weights: layer {name!r} needs a "
                    "'sparse_ratio' entry without granularity (or granularity 'fine')"
                )
            pname = weight_param_name(sel.module)
            params[f"{name}.{pname}"] = sel.module._parameters[pname]
        return params

    def _initial_masks(self, targets: Sequence[PruneTarget]) -> dict[str, torch.Tensor]:
        existing = get_masks(self.model)
        chosen = select_modules(self.model, targets)
        masks = {}
        for name, param in self.params.items():
            if name in existing:
                masks[name] = existing[name].bool()
                continue
            ratio = chosen[name.rpartition(".")[0]].target.sparse_ratio or 0.0
            pruned = units_to_prune(param.numel(), ratio, structured=False)
            order = torch.randperm(param.numel(), generator=self.generator)
            flat = torch.ones(param.numel(), dtype=torch.bool)
            flat[order[:pruned]] = False
            masks[name] = flat.reshape(param.shape).to(param.device)
        return masks

    def _capture(self, name: str, param: nn.Parameter) -> torch.utils.hooks.RemovableHandle:
        # Tensor hooks run in registration order: the masks' gradient hook (which zeroes pruned entries)
        # is removed here and re-added by apply_masks_ after this one, so this one sees the dense gradient.
        drop_grad_hook(param)

        def hook(grad: torch.Tensor) -> None:
            if (self.steps + 1) % self.every == 0:  # only the backward of an update step is kept
                self._dense[name] = grad.detach().abs().clone()

        return param.register_hook(hook)

    def fraction(self, step: int) -> float:
        """Share of each layer's active weights dropped (and regrown) at ``step``."""
        if self.end is None:
            return self.drop_fraction
        if step > self.end:
            return 0.0
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end))

    def step(self) -> None:
        """Count one training step (after ``optimizer.step()``); drop and regrow every ``every`` steps."""
        self.steps += 1
        if self.steps % self.every == 0 and self.fraction(self.steps) > 0:
            self.update_()

    def after_step(self, batch: Any) -> None:
        self.step()

    def update_(self) -> None:
        """Drop and regrow now, in every layer, at the current step's fraction."""
        fraction = self.fraction(self.steps)
        new_masks, record = {}, {}
        for name, param in self.params.items():  # every layer's new mask first: a failure changes nothing
            mask = self.masks[name]
            count = math.floor(fraction * int(mask.sum()) + 0.5)
            new_masks[name] = drop_and_grow(mask, param, self._grow_scores(name, param), count)
        for name, param in self.params.items():
            mask, new = self.masks[name], new_masks[name]
            with torch.no_grad():
                param.masked_fill_(new & ~mask, 0.0)  # regrown connections start at zero
            record[name] = {"dropped": (mask & ~new).nonzero(), "grown": (new & ~mask).nonzero()}
        apply_masks_(self.model, new_masks)
        self.masks = new_masks
        self.updates.append(record)
        self._dense.clear()

    def _grow_scores(self, name: str, param: nn.Parameter) -> torch.Tensor:
        if self.regrow == "random":
            return torch.rand(param.shape, generator=self.generator).to(param.device)
        if name not in self._dense:
            raise ConfigError(
                f"RigL regrowth needs the dense gradient of {name!r} from the backward pass of step {self.steps}; "
                "call step() once per training step, after loss.backward() and optimizer.step()"
            )
        return self._dense[name]

    def close(self) -> None:
        """Remove the gradient-capturing hooks (the masks stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
