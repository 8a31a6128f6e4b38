"""Masks, the contract between stages: ``dict[param_name, Tensor]``, bool (or 0/1), same shape as the param.

``apply_masks_`` makes a model compute as pruned while keeping every shape and every parameter object
(so an optimizer built before still works), and keeps pruned weights at zero through training,
``copy.deepcopy`` and ``state_dict`` round trips. ``remove_masks_`` bakes the zeros in and removes every
trace of the masking::

    >>> import torch, torch.nn as nn
    >>> from slimtorch import apply_masks_, remove_masks_
    >>> net = nn.Linear(3, 2)
    >>> apply_masks_(net, {"weight": torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)})
    >>> (net.weight == 0).sum().item()
    2
    >>> remove_masks_(net)
    >>> hasattr(net, "weight_mask")
    False

Why not ``torch.nn.utils.prune`` or ``parametrize``: both rename the parameter (``weight_orig`` /
``parametrizations.weight.original``), which breaks state-dict keys and the dependency graph's view of
the model. Here the parameter stays a plain ``weight``; the mask is a buffer ``weight_mask`` saved in the
state dict; a forward pre-hook and a state-dict hook re-zero pruned entries in place, and a gradient hook
zeroes their gradient so no optimizer (momentum, Adam, weight decay) moves them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from slimtorch.checks import check_materialized, check_module
from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.graph.live import masked
from slimtorch.graph.replay import Trace

__all__ = [
    "COMPACTION_ATTR",
    "MASK_SUFFIX",
    "Masks",
    "apply_masks_",
    "canonical_masks",
    "check_mask_values",
    "check_masks",
    "drop_grad_hook",
    "get_masks",
    "is_masked",
    "mask_factor",
    "mask_sparsity",
    "merge_masks",
    "model_state",
    "remove_masks_",
    "without_masks",
]

MASK_SUFFIX = "_mask"

#: Attribute the compaction stage sets on a model it has made smaller (a dict describing the change).
COMPACTION_ATTR = "slimtorch_compaction"


class Masks(dict):
    """Masks as :func:`~slimtorch.compute_masks` returns them: a ``dict[str, Tensor]`` in every use (indexing,
    iteration, ``dict(masks)``, ``{**masks}``, saving) that also carries what computing them learned about the
    model, ``trace``: the shapes-only trace of its dependency graph (None when no graph was built, or the model
    had to be traced for real). :func:`~slimtorch.compact_` hands it to the graph, which measures the values
    compaction needs by replaying it (one forward pass, checked op by op) instead of tracing the model again,
    when the trace still fits the model. What is derived from the masks (``dict(masks)``, a comprehension, a
    merge) is a plain dict without it: compacting with it gives the same result, tracing the model again.

        >>> import torch
        >>> from torch import nn
        >>> from slimtorch import compute_masks
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> masks = compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)
        >>> isinstance(masks, dict), masks.trace is not None, type(dict(masks)).__name__
        (True, True, 'dict')
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, *, trace: Trace | None = None) -> None:
        super().__init__(masks or {})
        self.trace = trace

# Gradient hooks installed, by id(parameter) -> (weak reference to it, handle). Tensor hooks are not
# copied by ``copy.deepcopy``, so the forward pre-hook (which is) installs them lazily on whatever
# parameter object the module holds now. (A WeakKeyDictionary cannot hold tensors: it compares keys
# with ``==``, which is elementwise for tensors.)
_GRAD_HOOKS: dict[int, tuple[weakref.ref, torch.utils.hooks.RemovableHandle]] = {}


def _has_grad_hook(param: torch.Tensor) -> bool:
    entry = _GRAD_HOOKS.get(id(param))
    return entry is not None and entry[0]() is param


def _add_grad_hook(param: torch.Tensor, mask: torch.Tensor) -> None:
    for key in [k for k, (ref, _) in _GRAD_HOOKS.items() if ref() is None]:
        del _GRAD_HOOKS[key]  # forget parameters that no longer exist
    _GRAD_HOOKS[id(param)] = (weakref.ref(param), param.register_hook(_GradMask(mask)))


def drop_grad_hook(param: torch.Tensor) -> None:
    """Remove the hook that masks ``param``'s gradient (masking installs one per masked parameter)."""
    if _has_grad_hook(param):
        _GRAD_HOOKS.pop(id(param))[1].remove()


def mask_factor(mask: torch.Tensor) -> torch.Tensor:
    """A mask as a multiplier: a bool mask viewed as uint8 (the same bytes). Multiplying a float tensor by
    uint8 is about 3x faster on CPU than by bool, whose conversion torch does not vectorise."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _MaskHook:
    """Forward pre-hook and state-dict pre-hook of a masked module. Holds names only, never tensors, so a
    deep-copied module's copy of the hook works on the copy's own parameters and masks."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def enforce(self, module: nn.Module) -> None:
        # Unseen by function modes (a graph trace, a compacted model's call rewrites): masking is not an op
        # of the model, and counted as one it would shift the call sites of the model's own ops.
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for name in self.names:
                param = module._parameters[name]
                mask = module._buffers[name + MASK_SUFFIX]
                param.mul_(mask_factor(mask))
                if not bool(param.sum().isfinite()):  # a NaN or infinity: a product by zero keeps it (see masked)
                    param.masked_fill_(~mask, 0)
                if param.requires_grad and not _has_grad_hook(param):
                    _add_grad_hook(param, mask)

    def __call__(self, module: nn.Module, args: object) -> None:
        if torch.compiler.is_exporting():
            # An exported program must not write into its parameters; the masked entries are zero already
            # (zeroed when the masks were applied, their gradients masked since), so the program is the same.
            return
        self.enforce(module)

    def state_dict_hook(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.enforce(module)


class _GradMask:
    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return masked(grad, self.mask)


def _find_hook(module: nn.Module) -> tuple[int, _MaskHook] | None:
    # Hooks are looked up in the module's hook dicts (not kept as handles) because handles do not
    # survive deepcopy.
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _MaskHook):
            return key, hook
    return None


def _split(name: str) -> tuple[str, str]:
    module_name, _, param_name = name.rpartition(".")
    return module_name, param_name


def check_mask_values(masks: Mapping[str, torch.Tensor]) -> None:
    """Raise a clear error unless ``masks`` maps names (str) to dense tensors holding only 0 and 1 (what any
    model's masks must be, before they are matched to its parameters)."""
    if not isinstance(masks, Mapping):
        raise ConfigError(f"masks must be a dict of parameter name -> tensor, got {type(masks).__name__}")
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise ConfigError(f"mask keys must be parameter names (str), got {name!r} ({type(name).__name__})")
        if not isinstance(mask, torch.Tensor):
            raise ConfigError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
        if mask.layout != torch.strided or mask.is_meta:
            where = "on the meta device (no values)" if mask.is_meta else f"{mask.layout}"
            raise ConfigError(f"mask {name!r} is {where}: masks must be dense tensors with values (mask.to_dense(), "
                              "or made on a real device)")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ConfigError(f"mask {name!r} must be bool or hold only 0 and 1")


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise a clear error unless every key names a parameter of ``model`` and every mask fits it."""
    check_module(model, "masks")
    check_mask_values(masks)
    params = dict(model.named_parameters(remove_duplicate=False))  # (a tied weight under each of its names)
    for name, mask in masks.items():
        if name not in params:
            raise NoMatchError(f"mask {name!r} names no parameter of the model; {closest(name, params)}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(params[name].shape)}"
            )


def canonical_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` keyed by each parameter's first name (as ``named_parameters`` lists it): a mask given under
    another name of a tied weight moves to that one, and masks given under several of its names combine
    (an entry is kept when every one keeps it, as applying them all does)."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(p), name)
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        key = canonical.get(name, name)
        out[key] = mask if key not in out else out[key].bool() & mask.to(out[key].device).bool()
    return out


def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make ``model`` compute as pruned (same shapes); pruned entries stay zero from now on.

    Applying again replaces the masks of the parameters named and keeps the others. All masks are
    checked before anything changes.
    """
    check_masks(model, masks)
    check_materialized(model, "apply_masks_")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, mask in masks.items():
        module_name, param_name = _split(name)
        by_module.setdefault(module_name, {})[param_name] = mask
    for module_name, module_masks in by_module.items():
        _apply_module_(model.get_submodule(module_name), module_masks)


def _apply_module_(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    found = _find_hook(module)
    names = list(found[1].names) if found else []
    for param_name, mask in masks.items():
        param = module._parameters[param_name]
        buffer_name = param_name + MASK_SUFFIX
        mask = mask.to(device=param.device, dtype=torch.bool)
        if param_name in names:
            module._buffers[buffer_name].copy_(mask)  # in place: the gradient hook holds this tensor
            continue
        if buffer_name in module._buffers or hasattr(module, buffer_name):
            raise ConfigError(f"{type(module).__name__} already has an attribute {buffer_name!r}; cannot mask it")
        module.register_buffer(buffer_name, mask.clone())
        names.append(param_name)
    if found is None:
        hook = _MaskHook(tuple(names))
        module.register_forward_pre_hook(hook)
        module.register_state_dict_pre_hook(hook.state_dict_hook)
    else:
        hook = found[1]
        hook.names = tuple(names)
    hook.enforce(module)


def is_masked(model: nn.Module) -> bool:
    """True when any module of ``model`` carries masks from :func:`apply_masks_`."""
    check_module(model, "is_masked")
    return any(_find_hook(m) is not None for m in model.modules())


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks currently applied to ``model`` (copies), keyed by parameter name."""
    check_module(model, "get_masks")
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        found = _find_hook(module)
        if found is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        for name in found[1].names:
            out[prefix + name] = module._buffers[name + MASK_SUFFIX].detach().clone()
    return out


def remove_masks_(model: nn.Module) -> None:
    """Bake the masks in (pruned entries are exactly zero) and remove buffers and hooks."""
    check_module(model, "remove_masks_")
    for module in model.modules():
        found = _find_hook(module)
        if found is None:
            continue
        key, hook = found
        hook.enforce(module)
        del module._forward_pre_hooks[key]
        for sd_key, sd_hook in list(module._state_dict_pre_hooks.items()):
            if getattr(sd_hook, "__self__", None) is hook:
                del module._state_dict_pre_hooks[sd_key]
        for name in hook.names:
            drop_grad_hook(module._parameters[name])
            del module._buffers[name + MASK_SUFFIX]


def merge_masks(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks that prune what either ``old`` or ``new`` prunes (bool, keyed like both): a second pruning
    round keeps the first round's zeros.

    >>> merge_masks({"w": torch.tensor([True, False, True])}, {"w": torch.tensor([False, True, True])})["w"]
    tensor([False, False,  True])
    """
    out = {name: m.to(torch.bool) for name, m in old.items()}
    for name, mask in new.items():
        mask = mask.to(torch.bool)
        out[name] = out[name].to(mask.device) & mask if name in out and out[name].shape == mask.shape else mask
    return out


@contextmanager
def without_masks(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block ``model`` carries no masks (their zeros stay in the weights), e.g. for a writer that
    saves plain layers; they are put back after. Yields the masks.

    >>> net = nn.Linear(2, 1)
    >>> apply_masks_(net, {"weight": torch.tensor([[True, False]])})
    >>> with without_masks(net) as masks:
    ...     is_masked(net), sorted(masks)
    (False, ['weight'])
    >>> is_masked(net)
    True
    """
    masks = get_masks(model)
    remove_masks_(model)
    try:
        yield masks
    finally:
        if masks:
            apply_masks_(model, masks)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of zeros in each mask, keyed like the masks."""
    return {name: 1.0 - float(m.float().mean()) if m.numel() else 0.0 for name, m in masks.items()}


def model_state(model: nn.Module) -> str:
    """``"masked"``, ``"compacted"`` or ``"dense"`` (a quantized model is still one of these three:
    :func:`slimtorch.report.quantization` says how it is quantized). A compacted model is ``"compacted"`` even
    when it carries masks (what the masks prune inside the channels compaction kept, or a later pruning round)."""
    if getattr(model, COMPACTION_ATTR, None):
        return "compacted"
    if is_masked(model):
        return "masked"
    return "dense"
