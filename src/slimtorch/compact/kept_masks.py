"""The masks a compacted model keeps: each mask cut the way compaction cuts its parameter.

Compaction removes the channels the masks prune whole; what the masks prune inside the channels that stay
(single weights, N:M patterns, or whole channels a residual addition forced it to keep) is still zero in
the compacted model. Those entries stay masked, at the compacted size, so that training after compaction
keeps them at zero as it does on the masked model (``remove_masks_`` lets them grow back)::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch import compact_, get_masks
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)  # row 1 goes
    >>> compact_(net, {"0.weight": mask, "0.bias": mask.any(dim=1)}, example_inputs=torch.randn(2, 4))
    >>> get_masks(net)["0.weight"]
    tensor([[ True, False,  True,  True],
            [ True,  True, False,  True]])

The cut reuses the surgery itself: each shrink function runs once more on a stand-in of its layer (the
same class and attributes, its own parameter dicts) whose parameters are the masks (bool; 0/1 values of
the parameters' dtype for a shrink function that computes on what it cuts).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.compact.surgery import CLAIMS_CHILDREN, SHRINKS
from slimtorch.errors import CompactionError
from slimtorch.masks import apply_masks_, get_masks

__all__ = ["carried_masks", "cut_masks", "keep_masks_"]


def carried_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks that hold after compaction, at full size: the model's own, replaced by those given (bool);
    masks that keep everything are left out."""
    merged = {name: m.detach().to(torch.bool) for name, m in {**get_masks(model), **masks}.items()}
    return {name: m for name, m in merged.items() if not bool(m.all())}


def _stand_in(module: nn.Module, children: bool) -> nn.Module:
    """A copy of ``module`` that shares its tensors but not its dicts and lists (nor, with ``children``, its
    submodules), so that a shrink function can replace what the copy holds without touching the module."""
    twin = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, list)):
            twin.__dict__[key] = type(value)(value)
    if children:
        twin._modules = {k: None if c is None else _stand_in(c, True) for k, c in module._modules.items()}
    return twin


def _cut_owner(module: nn.Module, prefix: str, change: Mapping[str, Any], masks: Mapping[str, torch.Tensor],
               exact_dtype: bool) -> dict[str, torch.Tensor] | None:
    """The masks of one changed module's parameters, cut by its shrink function on a stand-in (None if none
    of them is masked). The stand-in's parameters are the masks as bool, or (``exact_dtype``) as 0/1 values
    of each parameter's dtype, for a shrink function that computes on what it cuts."""
    claims = change["kind"] in CLAIMS_CHILDREN  # (else the shrink function changes the module's own tensors)
    twin = _stand_in(module, claims)
    slots = {f"{prefix}{name}.{attr}" if name else f"{prefix}{attr}": (sub, attr)
             for name, sub in (twin.named_modules() if claims else [("", twin)])
             for attr, param in sub._parameters.items() if param is not None}
    if not any(name in masks for name in slots):
        return None
    for name, (sub, attr) in slots.items():
        param = sub._parameters[attr]
        dtype = param.dtype if exact_dtype else torch.bool
        value = masks[name] if name in masks else torch.ones(param.shape, dtype=torch.bool, device=param.device)
        sub._parameters[attr] = nn.Parameter(value.to(param.device, dtype), requires_grad=False)
    SHRINKS[change["kind"]](twin, change["keeps"], change["options"])
    return {name: sub._parameters[attr].detach() != 0 for name, (sub, attr) in slots.items() if name in masks}


def cut_masks(model: nn.Module, masks: Mapping[str, torch.Tensor],
              changes: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``masks`` (full size) as they are once the plan's ``changes`` (``CompactionPlan.modules``: module name
    -> kind, keeps, options) have cut their parameters. Pure: ``model`` is not changed."""
    out = dict(masks)
    for owner, change in changes.items():
        module, prefix = model.get_submodule(owner), f"{owner}." if owner else ""
        try:
            cut = _cut_owner(module, prefix, change, masks, exact_dtype=False)
        except Exception:  # a shrink function that computes on the values: cut 0/1 values of the right dtype
            try:
                cut = _cut_owner(module, prefix, change, masks, exact_dtype=True)
            except Exception as err:  # the model is untouched: only the stand-in ran
                raise CompactionError(f"cannot cut the masks of {owner!r} as its {change['kind']} shrink function "
                                      f"cuts its parameters ({type(err).__name__}: {err}); the model is "
                                      "unchanged") from err
        out.update(cut or {})
    return out


def keep_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Mask ``model`` (compacted) with the compacted-size ``masks`` that still prune something. An entry
    that is not zero in the model stays unmasked: compaction may have folded a constant into it."""
    params = dict(model.named_parameters())
    kept = {}
    for name, mask in masks.items():
        param = params.get(name)
        if param is None:  # (a parameter compaction removed)
            continue
        if tuple(param.shape) != tuple(mask.shape):
            raise CompactionError(f"the mask of {name!r} was cut to {tuple(mask.shape)} but the parameter is "
                                  f"{tuple(param.shape)}; please report the model: a shrink function is wrong")
        if bool(mask.all()):  # (most are: whole channels pruned, all gone)
            continue
        mask = mask.to(param.device) | (param.detach() != 0)
        if not bool(mask.all()):
            kept[name] = mask
    if kept:
        apply_masks_(model, kept)
