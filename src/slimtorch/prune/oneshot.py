"""One-shot pruning of a causal language model from calibration text: magnitude, Wanda and SparseGPT.

The decoder layers are pruned one after the other, as both papers do: the calibration batches are run
up to the first layer; each layer's linear inputs are measured on them (``X^T X``, from which SparseGPT
takes its Hessian and Wanda its input-feature norms), its linears are pruned, and the batches then go
through the *pruned* layer to become the next layer's inputs, so later layers correct for earlier
errors. Embeddings and the output head stay dense, as in the papers.

Pure first, then apply: :func:`one_shot_prune` computes new weights and masks on copies of the layers
and leaves the model alone; :func:`apply_one_shot_` writes them in::

    >>> import torch
    >>> from slimtorch.models.tiny_lm import TinyLMConfig, build_model
    >>> model = build_model(TinyLMConfig(vocab_size=64, hidden_size=32, layers=2, heads=4, kv_heads=2,
    ...                                  intermediate_size=64))
    >>> result = one_shot_prune(model, torch.randint(0, 64, (4, 16)), method="sparsegpt", pattern="2:4")
    >>> apply_one_shot_(model, result)
    >>> w = model.model.layers[0].mlp.down_proj.weight
    >>> int((w.reshape(-1, 4) != 0).sum(dim=1).max())
    2
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.config import Granularity
from slimtorch.errors import ConfigError
from slimtorch.masks import apply_masks_
from slimtorch.prune.criteria import ScoreContext, get_criterion
from slimtorch.prune.granularity import unit_view
from slimtorch.prune.sparsegpt import sparsegpt_solve

__all__ = ["ONE_SHOT_METHODS", "ONE_SHOT_STATS", "OneShotResult", "apply_one_shot_", "capture_layer_inputs",
           "decoder_layers", "one_shot_prune", "parse_one_shot", "prune_layer_", "register_one_shot", "run_layer"]

#: ``fn(weight (out, in), xtx (in, in) = sum of x x^T over calibration tokens, tokens, sparsity, pattern)
#: -> (new weight, keep mask)``; ``pattern`` is ``(n, m)`` or None.
OneShotFn = Callable[
    [torch.Tensor, torch.Tensor, int, float, "tuple[int, int] | None"], tuple[torch.Tensor, torch.Tensor]
]
ONE_SHOT_METHODS: dict[str, OneShotFn] = {}
#: What a method reads of its inputs (a method missing here reads ``"full"``): ``"none"`` (no calibration
#: at all: the layers are not even run), ``"diag"`` (``xtx`` is the ``(in,)`` diagonal, the squared input
#: norms: an ``(in, in)`` matrix is never built) or ``"full"`` (``xtx`` is the ``(in, in)`` matrix).
ONE_SHOT_STATS: dict[str, str] = {}


def register_one_shot(name: str, *, stats: str = "full") -> Callable[[OneShotFn], OneShotFn]:
    """Register a one-shot layer pruning method under ``name``; ``stats`` says what of ``X^T X`` it reads."""
    if stats not in ("none", "diag", "full"):
        raise ConfigError(f"stats must be 'none', 'diag' or 'full', got {stats!r}")

    def deco(fn: OneShotFn) -> OneShotFn:
        ONE_SHOT_METHODS[name] = fn
        ONE_SHOT_STATS[name] = stats
        return fn

    return deco


def _keep_top(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, *, per_row: bool) -> torch.Tensor:
    """Keep mask from weight-shaped scores: N of every M along each row, else the top ``1 - sparsity``
    of each row (``per_row``) or of the whole matrix."""
    if pattern is not None:
        n, m = pattern
        groups = scores.reshape(scores.shape[0], -1, m)  # (out, in/m, m)
        top = torch.topk(groups, n, dim=2).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True).reshape(scores.shape)
    rows = scores if per_row else scores.reshape(1, -1)  # ranking pool: (pools, weights per pool)
    count = int(rows.shape[1] * sparsity + 0.5)
    keep = torch.ones_like(rows, dtype=torch.bool)
    if count:
        keep.scatter_(1, torch.topk(rows, count, dim=1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def _criterion_scores(name: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-weight scores from a registered criterion at fine granularity, weight-shaped."""
    crit = get_criterion(name)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # only its shape is read
    view = unit_view(layer, tuple(weight.shape), Granularity(kind="fine"))
    ctx = ScoreContext(name, layer, view, stats)
    return view.from_units(crit.fn(view.units(weight), ctx)[:, None])


@register_one_shot("magnitude", stats="none")
def _magnitude(weight, xtx, tokens, sparsity, pattern):
    """|w|, ranked over the whole layer (the papers' magnitude baseline)."""
    keep = _keep_top(_criterion_scores("magnitude", weight, {}), sparsity, pattern, per_row=False)
    return weight * keep, keep


@register_one_shot("wanda", stats="diag")
def _wanda(weight, xtx, tokens, sparsity, pattern):
    """|w| times the L2 norm of its input feature over the calibration tokens, ranked per output row."""
    squares = xtx.diagonal() if xtx.dim() == 2 else xtx  # (in,): sum over tokens of x_j^2
    norms = squares.clamp_min(0).sqrt().to(weight.dtype)  # (in,): ||X_j||_2
    stats = {"input_norm": norms}
    keep = _keep_top(_criterion_scores("wanda", weight, stats), sparsity, pattern, per_row=True)
    return weight * keep, keep


@register_one_shot("sparsegpt")
def _sparsegpt(weight, xtx, tokens, sparsity, pattern):
    """Second-order OBS updates with the Hessian ``2 X^T X / tokens``."""
    return sparsegpt_solve(weight, 2.0 * xtx / max(tokens, 1), sparsity=sparsity, pattern=pattern)


@dataclass(frozen=True)
class OneShotResult:
    """New weights and keep masks by parameter name (``model.layers.0.mlp.down_proj.weight``)."""

    method: str
    sparsity: float
    pattern: str | None
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and ModuleList of a Hugging Face model's decoder layers
    (``config.num_hidden_layers`` blocks; ``model.layers`` in LLaMA, ``transformer.h`` in GPT-2)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return name, module
    raise ConfigError(f"found no list of {count} decoder layers in {type(model).__name__}; one-shot pruning needs a "
                      "Hugging Face causal LM with config.num_hidden_layers")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


def capture_layer_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives for each batch of token ids."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Each batch's inputs passed through ``layer``: the next layer's inputs (hidden states replaced)."""
    out = []
    for args, kwargs in inputs:
        hidden = layer(*args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # (B, T, hidden)
        out.append(((hidden, *args[1:]), kwargs))
    return out


def _gram(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[tuple[tuple, dict]],
          stats: str) -> dict[str, Any]:
    """Per linear: [sum of x x^T (in, in), or of x^2 (in,) for ``stats="diag"``, in float64; number of tokens]."""
    acc: dict[str, list] = {name: [0.0, 0] for name in linears}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            acc[name][0] = acc[name][0] + (x.T @ x if stats == "full" else x.pow(2).sum(dim=0))
            acc[name][1] += x.shape[0]

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in linears.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return acc


def parse_one_shot(method: str, sparsity: float, pattern: str | None) -> tuple[int, int] | None:
    """Check one-shot arguments; the ``(n, m)`` of an ``"N:M"`` pattern, or None."""
    if method not in ONE_SHOT_METHODS:
        raise ConfigError(f"unknown one-shot method {method!r}; available: {sorted(ONE_SHOT_METHODS)}")
    gran = Granularity.parse(pattern) if pattern is not None else None
    if gran is not None and gran.kind != "n:m":
        raise ConfigError(f"pattern must be an 'N:M' string such as '2:4', got {pattern!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return (gran.n, gran.m) if gran is not None else None


def prune_layer_(
    layer: nn.Module,
    inputs: list[tuple[tuple, dict]],
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    *,
    store_dtype: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prune every linear of one decoder layer in place from its calibration ``inputs`` (the (args, kwargs)
    it receives; unused by methods that read no statistics); ``{linear name: (new weight, keep mask)}``.
    ``store_dtype``: the weights are rounded to it (the dtype they will be saved in), so that the next
    layer is calibrated on what is saved."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    stats = ONE_SHOT_STATS.get(method, "full")
    grams = _gram(layer, linears, inputs, stats) if stats != "none" else {n: [None, 0] for n in linears}
    out = {}
    for name, linear in linears.items():
        xtx, tokens = grams.pop(name)  # (in, in) float64 each: freed as soon as used
        new_weight, keep = ONE_SHOT_METHODS[method](linear.weight.detach(), xtx, tokens, sparsity, nm)
        if store_dtype is not None:
            new_weight = new_weight.to(store_dtype).to(linear.weight.dtype)
        linear.weight.copy_(new_weight)
        out[name] = (new_weight.detach().clone(), keep.bool())
    return out


def one_shot_prune(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    method: str = "sparsegpt",
    sparsity: float = 0.5,
    pattern: str | None = None,
    batch_size: int = 16,
) -> OneShotResult:
    """Prune every linear of every decoder layer of a causal LM, layer after layer, from ``calibration``
    token ids ``(samples, seq_len)``. Pure: returns new weights and masks, the model is not changed.

    Args:
        method: a key of :data:`ONE_SHOT_METHODS` (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``).
        sparsity: fraction pruned (unstructured); ignored when ``pattern`` is given.
        pattern: ``"2:4"`` (or any ``"N:M"``) for semi-structured sparsity.
    """
    nm = parse_one_shot(method, sparsity, pattern)
    prefix, layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        inputs = capture_layer_inputs(model, layers[0], list(calibration.split(batch_size)))
        for index, original in enumerate(layers):
            layer = copy.deepcopy(original)  # pruned on a copy: the user's model stays as it is
            for name, (new_weight, keep) in prune_layer_(layer, inputs, method, sparsity, nm).items():
                key = f"{prefix}.{index}.{name}.weight"
                weights[key], masks[key] = new_weight, keep
            inputs = run_layer(layer, inputs)
    model.train(was_training)
    return OneShotResult(method, sparsity if nm is None else 1 - nm[0] / nm[1], pattern, weights, masks)


def apply_one_shot_(model: nn.Module, result: OneShotResult) -> None:
    """Write the pruned weights into ``model`` and mask them (pruned weights stay zero if trained)."""
    params = dict(model.named_parameters())
    missing = [k for k in result.weights if k not in params]
    if missing:
        raise ConfigError(f"the result names parameters the model lacks: {missing[:3]}; was it computed on another "
                          "model?")
    with torch.no_grad():
        for key, weight in result.weights.items():
            params[key].copy_(weight)
    apply_masks_(model, result.masks)
