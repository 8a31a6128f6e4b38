"""Per-layer statistics for data-driven criteria, collected with hooks that are removed afterwards.

``collect_stats`` runs calibration batches through a model and returns ``{layer: {key: tensor}}``,
the ``stats=`` that :func:`slimtorch.compute_masks` hands to criteria. The model is left exactly as
it was: parameters, ``.grad`` and buffers (BatchNorm running statistics included) are unchanged and
no hook remains::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.prune.stats import collect_stats
    >>> net = nn.Sequential(nn.Linear(3, 2))
    >>> batches = [(torch.ones(4, 3), torch.tensor([0, 1, 0, 1]))]
    >>> stats = collect_stats(net, batches, keys=("input_norm", "apoz"))
    >>> stats["0"]["input_norm"]          # sqrt(4 rows * 1.0**2) per input feature
    tensor([2., 2., 2.])

Inside your own training loop, a :class:`StatsTracker` accumulates the same statistics from every
forward and backward pass while it is open (movement pruning tracks ``"movement"`` this way).

Keys (:data:`STAT_KEYS`): weight-shaped ``"grad"`` (mean gradient per backward pass), ``"grad_sq"``
(mean squared gradient), ``"movement"`` (-sum of w * dL/dw), ``"hessian_diag"`` (the diagonal of the
loss Hessian, :func:`collect_stats` only); per input feature ``"input_norm"`` (L2 norm over all samples
and positions); ``"input_hessian"`` (the layer-wise Hessian of the inputs, for OBS); per output channel
``"apoz"`` (share of zeros after the activation) and ``"mean_activation"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.checks import check_finite_inputs, model_errors
from slimtorch.config import PruneTarget
from slimtorch.errors import ConfigError
from slimtorch.prune.loop import LossFn, forward_batch
from slimtorch.select import prunable_modules, select_modules, weight_param_name

__all__ = ["STAT_KEYS", "Stats", "StatsTracker", "collect_stats", "expand_input_stat", "layer_inputs"]

Stats = dict[str, dict[str, torch.Tensor]]

STAT_KEYS = {
    "grad": "mean gradient of the weight per backward pass (weight-shaped)",
    "grad_sq": "mean squared gradient of the weight per backward pass (weight-shaped)",
    "movement": "-sum over backward passes of weight * gradient (weight-shaped)",
    "hessian_diag": "diagonal of the loss Hessian, mean over batches of z * (H z) for a random +-1 probe z "
                    "(Hutchinson's estimator; weight-shaped; collect_stats only)",
    "input_norm": "L2 norm of each input feature over all samples and positions",
    "input_hessian": "2 X^T X / n of the layer's inputs X (rows: samples and positions; a convolution's unfolded "
                     "patches), one (fan_in, fan_in) matrix per group: (groups, fan_in, fan_in)",
    "apoz": "share of zero activations of each output channel",
    "mean_activation": "mean activation of each output channel",
}
_GRAD_KEYS = frozenset({"grad", "grad_sq", "movement", "hessian_diag"})
_INPUT_KEYS = frozenset({"input_norm", "input_hessian"})
_OUTPUT_KEYS = frozenset({"apoz", "mean_activation"})
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "identity": lambda t: t,
}


def _check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    if isinstance(keys, str):
        raise ConfigError(f"keys must be a sequence of statistic names, got the string {keys!r}; write ({keys!r},)")
    unknown = [k for k in keys if k not in STAT_KEYS]
    if unknown or not keys:
        raise ConfigError(f"unknown statistics {unknown or 'none given'}; available: {sorted(STAT_KEYS)}")
    return tuple(dict.fromkeys(keys))


def _activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)} or a function")
    return _ACTIVATIONS[activation]


def _feature_dim(module: nn.Module) -> int:
    """Where channels/features live in the module's inputs and outputs: dim 1 for convolutions and
    BatchNorm/InstanceNorm/GroupNorm (N, C, ...), the last dim for everything else (..., features)."""
    channel_first = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
    return 1 if isinstance(module, channel_first) else -1


def _per_feature(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., C, ...) -> (positions, C): every sample and position as a row."""
    return t.detach().float().movedim(dim, -1).reshape(-1, t.shape[dim])


class StatsTracker:
    """Accumulates statistics of the selected layers from every forward/backward pass while open.

    Gradient statistics come from hooks on the weights (so they see each backward pass once, even with
    gradient accumulation); activation statistics from forward hooks. Use it as a context manager, or
    call :meth:`close` to remove the hooks. ``config_list`` selects the layers (default: every module
    owning a weight).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        keys: Sequence[str] = ("grad_sq",),
        config_list: Sequence[Mapping[str, Any] | PruneTarget] | None = None,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
    ) -> None:
        self.keys = _check_keys(keys)
        if "hessian_diag" in self.keys:
            raise ConfigError("'hessian_diag' needs a second backward pass through the loss, which a training loop "
                              "does not make: collect it with collect_stats(model, batches, keys=('hessian_diag',), "
                              "loss_fn=...)")
        self.activation = _activation(activation)
        if config_list is None:
            self.layers = prunable_modules(model)
        else:
            self.layers = {name: sel.module for name, sel in select_modules(model, config_list).items()}
        self._sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        self._counts: dict[str, dict[str, int]] = {name: {} for name in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.paused = False  # (collect_stats' second backward pass, for hessian_diag, is not a gradient to record)
        try:
            for name, module in self.layers.items():
                self._attach(name, module)
        except Exception:
            self.close()
            raise

    @property
    def weights(self) -> dict[str, nn.Parameter]:
        """The tracked weight of each layer, by layer name."""
        return {name: m._parameters[weight_param_name(m)] for name, m in self.layers.items()}

    def _attach(self, name: str, module: nn.Module) -> None:
        keys = set(self.keys)
        if keys & _GRAD_KEYS:
            weight = module._parameters[weight_param_name(module)]
            if not weight.requires_grad:
                raise ConfigError(
                    f"layer {name!r} has a frozen weight (requires_grad=False), so it has no gradient "
                    f"statistics; leave it out with the config list or unfreeze it"
                )
            self._handles.append(weight.register_hook(self._grad_hook(name, weight)))
        if keys & (_INPUT_KEYS | _OUTPUT_KEYS):
            self._handles.append(module.register_forward_hook(self._forward_hook(name, module), with_kwargs=True))

    def _add(self, name: str, key: str, value: torch.Tensor, count: int) -> None:
        sums = self._sums[name]
        sums[key] = value if key not in sums else sums[key] + value
        self._counts[name][key] = self._counts[name].get(key, 0) + count

    def _grad_hook(self, name: str, weight: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.paused:
                return
            g = grad.detach().float()
            if "grad" in self.keys:
                self._add(name, "grad", g, 1)
            if "grad_sq" in self.keys:
                self._add(name, "grad_sq", g.pow(2), 1)
            if "movement" in self.keys:
                self._add(name, "movement", -(weight.detach().float() * g), 1)

        return hook

    def _forward_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        dim = _feature_dim(module)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if "input_norm" in self.keys and isinstance(x, torch.Tensor) and x.is_floating_point():
                self._add(name, "input_norm", _per_feature(x, dim).pow(2).sum(dim=0), 0)
            if "input_hessian" in self.keys and isinstance(x, torch.Tensor) and x.is_floating_point():
                rows = layer_inputs(mod, x.detach())  # (groups, rows, fan_in)
                self._add(name, "input_hessian", 2 * rows.transpose(1, 2) @ rows, rows.shape[1])
            if not isinstance(output, torch.Tensor) or not (_OUTPUT_KEYS & set(self.keys)):
                return
            act = _per_feature(self.activation(output.detach()), dim)  # (positions, C)
            if "apoz" in self.keys:
                self._add(name, "apoz", (act == 0).sum(dim=0).float(), act.shape[0])
            if "mean_activation" in self.keys:
                self._add(name, "mean_activation", act.sum(dim=0), act.shape[0])

        return hook

    def stats(self) -> Stats:
        """The statistics so far, ``{layer: {key: tensor}}`` (layers with nothing recorded are left out)."""
        out: Stats = {}
        for name, sums in self._sums.items():
            layer: dict[str, torch.Tensor] = {}
            for key, total in sums.items():
                if key == "input_norm":
                    layer[key] = total.sqrt()
                elif key == "input_hessian":
                    layer[key] = total / max(self._counts[name][key], 1)
                elif key == "movement":
                    layer[key] = total.clone()
                else:
                    layer[key] = total / max(self._counts[name][key], 1)
            if layer:
                out[name] = layer
        return out

    def reset(self) -> None:
        """Forget everything accumulated so far (the hooks stay)."""
        self._sums = {name: {} for name in self.layers}
        self._counts = {name: {} for name in self.layers}

    def close(self) -> None:
        """Remove every hook; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StatsTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    keys: Sequence[str] = ("grad_sq",),
    loss_fn: LossFn | None = None,
    config_list: Sequence[Mapping[str, Any] | PruneTarget] | None = None,
    activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
) -> Stats:
    """Statistics of the selected layers over ``batches``; the model is left exactly as it was.

    Gradient keys need ``loss_fn(model, batch) -> scalar`` (gradients are computed with
    ``torch.autograd.grad``, so ``.grad`` is never touched). The model runs in its current train/eval
    mode; buffers it updates on the way (BatchNorm running statistics) are restored afterwards.
    """
    keys = _check_keys(keys)
    needs_grad = bool(_GRAD_KEYS & set(keys))
    if needs_grad and loss_fn is None:
        wanted = sorted(_GRAD_KEYS & set(keys))
        raise ConfigError(f"statistics {wanted} need gradients; pass loss_fn=(model, batch) -> loss")
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, torch.Tensor)):
        raise ConfigError(f"batches must be an iterable of batches (a DataLoader or a list of them), got "
                          f"{type(batches).__name__}")
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    count = 0
    hessian: dict[str, torch.Tensor] | None = {} if "hessian_diag" in keys else None
    tracked = tuple(k for k in keys if k != "hessian_diag") or ("grad",)  # (the tracker selects the layers)
    with StatsTracker(model, keys=tracked, config_list=config_list, activation=activation) as tracker:
        try:
            for batch in batches:
                _one_batch(model, batch, count, tracker, loss_fn if needs_grad else None, hessian)
                count += 1
        finally:
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])
    if count == 0:
        raise ConfigError("collect_stats got no batches; pass at least one calibration batch")
    stats = {name: {k: v for k, v in layer.items() if k in keys} for name, layer in tracker.stats().items()}
    for name, total in (hessian or {}).items():
        stats.setdefault(name, {})["hessian_diag"] = total / count
    return {name: layer for name, layer in stats.items() if layer}


def _one_batch(model: nn.Module, batch: Any, index: int, tracker: StatsTracker, loss_fn: LossFn | None,
               hessian: dict[str, torch.Tensor] | None) -> None:
    """Run one batch (forward, and backward through ``loss_fn`` when gradients are wanted); a batch the model
    cannot take, or one with NaN or infinite values (statistics of NaN rank nothing), is an error naming it.
    ``hessian`` (when wanted) accumulates each layer's ``z * (H z)``."""
    what = f"collect_stats batch {index}"
    check_finite_inputs(batch, what)
    with model_errors(batch, what):
        if loss_fn is None:
            with torch.no_grad():
                forward_batch(model, batch)
            return
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                              f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''} on {what}")
        weights = tracker.weights
        if hessian is None:
            torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            return
        _hutchinson(loss, weights, index, tracker, hessian)


def _hutchinson(loss: torch.Tensor, weights: Mapping[str, torch.Tensor], index: int, tracker: StatsTracker,
                hessian: dict[str, torch.Tensor]) -> None:
    """One Rademacher probe ``z`` per batch (seeded by the batch index): ``z * (H z)`` estimates the Hessian's
    diagonal without bias (Hutchinson 1989), ``H z`` coming from a second backward pass through the gradient."""
    names = [n for n, w in weights.items() if w.requires_grad]
    params = [weights[n] for n in names]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    gen = torch.Generator().manual_seed(index)
    probes = [torch.randint(0, 2, params[i].shape, generator=gen).to(params[i]) * 2 - 1 for i in used]
    tracker.paused = True  # the second pass computes H z, not a gradient: the trackers' hooks must not see it
    try:
        products = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used], grad_outputs=probes,
                                       allow_unused=True)
    finally:
        tracker.paused = False
    for i, z, hz in zip(used, probes, products, strict=True):
        value = z.detach().float() * (hz.detach().float() if hz is not None else 0.0)
        hessian[names[i]] = value if names[i] not in hessian else hessian[names[i]] + value


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's weight multiplies, per group: ``(groups, rows, fan_in)``. A Linear's inputs (every
    sample and position a row); a convolution's unfolded patches, in the order of a flattened filter
    ``(in/groups, k1, k2, ...)``, so that ``rows @ weight.reshape(out, -1).T`` is the layer's output."""
    x = x.float()
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if not isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ConfigError(f"'input_hessian' is measured for Linear and Conv1d/2d/3d layers, not "
                          f"{type(module).__name__}")
    if module.padding_mode != "zeros":
        raise ConfigError(f"'input_hessian' supports zero padding only, got padding_mode={module.padding_mode!r}")
    dims, kernel = x.dim() - 2, module.kernel_size
    if module.padding == "same":  # torch pads the extra element at the end
        total = [d * (k - 1) for d, k in zip(module.dilation, kernel, strict=True)]
        pad = [(t // 2, t - t // 2) for t in total]
    else:
        pad = [(0, 0)] * dims if module.padding == "valid" else [(p, p) for p in module.padding]
    x = F.pad(x, [p for pair in reversed(pad) for p in pair])  # F.pad lists the last dim first
    for d in range(dims):  # (N, C, *spatial) -> (N, C, *out, *window): one sliding window per spatial dim
        span = module.dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, module.stride[d])
    taps = tuple(slice(None, None, dil) for dil in module.dilation)  # the dilated taps of each window
    x = x[(Ellipsis, *taps)]  # (N, C, *out, *kernel)
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (N, *out, C, *kernel)
    count = math.prod(x.shape[: 1 + dims])  # N * prod(out): one row per sample and output position
    return x.reshape(count, module.groups, -1).transpose(0, 1)  # (groups, rows, C/groups * prod(kernel))


def expand_input_stat(module: nn.Module, stat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A per-input-feature statistic ``(in_features,)`` broadcast to the weight's ``shape``, so that it
    lines up with every weight that reads the feature (grouped and transposed convolutions included)."""
    shape = tuple(shape)
    if isinstance(module, nn.modules.conv._ConvNd) and stat.numel() != module.in_channels:
        raise ConfigError(
            f"the input statistic has {stat.numel()} features but {type(module).__name__} reads "
            f"{module.in_channels} input channels; collect the statistics on this model again"
        )
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # (in, out/groups, k...): the input channel is dim 0.
        return stat.reshape(-1, *[1] * (len(shape) - 1)).expand(shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        # (out, in/groups, k...): output channel o reads input group o // (out/groups).
        by_group = stat.reshape(module.groups, shape[1])  # (groups, in/groups)
        rows = by_group.repeat_interleave(shape[0] // module.groups, dim=0)  # (out, in/groups)
        return rows.reshape(*shape[:2], *[1] * (len(shape) - 2)).expand(shape)
    if len(shape) == 2 and stat.shape == (shape[1],):
        return stat[None, :].expand(shape)  # (out, in): column j reads feature j
    raise ConfigError(
        f"cannot line up an input statistic of {stat.numel()} features with the {shape} weight of "
        f"{type(module).__name__}; input-based criteria (wanda) support Linear and convolution layers"
    )
