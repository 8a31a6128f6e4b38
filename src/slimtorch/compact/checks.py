"""What compaction checks: its arguments, that the example inputs can measure and check anything (not empty, no
NaN), that no tied parameter would be shrunk, that the masked model's outputs on the inputs are finite, and that
the compacted model reproduces them.

    >>> import torch
    >>> compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), 1e-3, 1e-4)  # a NaN never passes
    inf
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves

from slimtorch.checks import check_materialized, check_not_quantized
from slimtorch.errors import CompactionError, ConfigError
from slimtorch.graph import Member
from slimtorch.graph.run import call_model, temporary_mode

__all__ = [
    "check_arguments", "check_example_inputs", "check_finite", "check_not_tied", "compare", "non_finite_inputs",
    "tied_parameters", "verify_result",
]


def _tensor_leaves(example_inputs: Any) -> list[tuple[str, torch.Tensor]]:
    return [(f"example_inputs{keystr(path)}", leaf) for path, leaf in tree_flatten_with_path(example_inputs)[0]
            if isinstance(leaf, torch.Tensor)]


def non_finite_inputs(example_inputs: Any) -> list[str]:
    """Where ``example_inputs`` hold a NaN or an infinity (``"example_inputs[1]"``)."""
    return [where for where, t in _tensor_leaves(example_inputs)
            if (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all())]


def check_example_inputs(example_inputs: Any) -> None:
    """Compaction measures the masked model on ``example_inputs`` (which channels are zero, which constant) and
    checks the result on them: an empty batch measures nothing and a NaN compares with nothing."""
    for where, t in _tensor_leaves(example_inputs):
        if t.is_meta:
            raise ConfigError(f"{where} is on the meta device: compaction runs the model on real values; pass a "
                              "batch of real inputs")
        if t.numel() == 0:
            raise ConfigError(f"{where} is empty (shape {tuple(t.shape)}): compaction measures the model on the "
                              "example inputs and checks the result on them; pass a batch of at least one sample")
        if (t.is_floating_point() or t.is_complex()) and bool(t.isnan().any()):
            raise ConfigError(f"{where} holds {int(t.isnan().sum())} NaN values: compaction measures the model on "
                              "the example inputs and checks the result on them, and a NaN compares with nothing; "
                              "pass finite example inputs")


def check_arguments(model: Any, unknown_ops: str, verify: Any = True) -> None:
    """``compact_``'s arguments besides the masks and inputs: a module, a known policy, a flag."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialized(model, "compact_")
    check_not_quantized(model, "compact_")
    if unknown_ops not in ("error", "keep"):
        raise ConfigError(f"unknown_ops must be 'error' or 'keep', got {unknown_ops!r}")
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {verify!r}")


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter known under several names (tied weights), by its first name: all its names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {found[0]: found for found in names.values() if len(found) > 1}


def check_not_tied(model: nn.Module, members: list[Member], counts: list[int]) -> None:
    """The surgery shrinks a parameter in the layer that owns it: one shared by several layers cannot lose
    channels (the others would keep the full tensor, or a slice cut for another use)."""
    tied = tied_parameters(model)
    for m, n in zip(members, counts, strict=True):
        if n and m.name in tied:
            names = " = ".join(repr(t) for t in tied[m.name])
            raise CompactionError(
                f"the masks remove {n} channels of {names}, one parameter tied between several layers; compaction "
                "cannot shrink a tied parameter. Exclude those layers from pruning (or drop their masks), or untie "
                "them (give each layer its own copy of the weight) before pruning and compacting"
            )


def compare(got: Any, want: Any, rtol: float, atol: float) -> float | None:
    """Largest difference relative to the tolerance, or None if within it (a NaN anywhere is a mismatch:
    ``want`` is finite, see :func:`check_finite`)."""
    a, b = tree_leaves(got), tree_leaves(want)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not isinstance(x, torch.Tensor):
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return float("inf")
        if x.is_floating_point():
            diff = (x.detach().float() - y.detach().float()).abs().max().item() if x.numel() else 0.0
            bound = atol + rtol * (y.detach().float().abs().max().item() if y.numel() else 0.0)
            if not math.isfinite(diff):  # (max(0.0, nan) is 0.0: a NaN must not pass)
                return float("inf")
            worst = max(worst, diff / bound if bound else diff)
        elif not torch.equal(x, y):
            return float("inf")
    return worst if worst > 1 else None


def check_finite(reference: Any, example_inputs: Any) -> None:
    """The check compares with the masked model's outputs: a NaN or infinity there compares with nothing, so
    it is an error that names the output and, if one holds non-finite values, the input."""
    for path, leaf in tree_flatten_with_path(reference)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(leaf.isfinite().all()):
            count = int((~leaf.isfinite()).sum())
            inputs = non_finite_inputs(example_inputs)
            cause = (f"; the example inputs hold non-finite values at {', '.join(inputs)}" if inputs else
                     " although the example inputs are finite (non-finite weights or an overflow)")
            raise CompactionError(
                f"the masked model's output{keystr(path)} holds {count} NaN or infinite values on the example "
                f"inputs{cause}, so the compacted model cannot be checked against it; the model was left as it "
                "was. Pass example inputs on which the masked model's outputs are finite"
            )


def verify_result(model: nn.Module, example_inputs: Any, reference: Any, got: Any = None, rtol: float = 1e-3,
                  atol: float = 1e-4) -> None:
    """Compare the compacted model's eval-mode output (``got``, computed here when not given) with ``reference``."""
    if got is None:
        with torch.no_grad(), temporary_mode(model, training=False):
            got = call_model(model, example_inputs)
    worst = compare(got, reference, rtol, atol)
    if worst is not None:
        raise CompactionError(
            f"the compacted model does not reproduce the masked one on the example inputs (difference {worst:.3g}x "
            "the tolerance); the model was restored. Please report the model: an op's channel rule is wrong"
        )
