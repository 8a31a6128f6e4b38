"""The oracle for the model zoos beyond torchvision's classifiers (detectors, segmenters, video and flow models,
Ultralytics YOLO, timm): compact a model pruned by half and check it against the masked model on fresh inputs,
the parameter count the masks imply, and a save/load round trip.

Detectors pick boxes by their scores (``topk``, ``sort``, non-maximum suppression). With random weights many
scores are exactly equal (saturated activations give identical features at many positions), and which of two
equal scores comes first is an accident of rounding: the masked and the compacted model, which sum in another
order, may break such a tie differently. So the comparison *pins the selections*: the masked model's run
records the result of every op that picks entries by value, and the compacted model's run checks that each
such op gets the same inputs (within the tolerance) and is given the masked model's choice. Everything else,
the inputs of every selection included, is compared numerically; a wrong channel shows there.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from nets import randomize_, run
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.graph.rules import op_name
from slimtorch.io import load_compacted_, save_compacted
from slimtorch.prune.coupled import implied_param_count

#: ops whose result is a choice among entries made by their values
_SELECTIONS = {"topk", "sort", "argsort", "msort", "kthvalue", "nms", "nonzero", "argwhere", "argmax", "argmin"}


def _selects(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _SELECTIONS:
        return True
    if name == "where":  # one argument: the positions where it holds
        return len(args) + len(kwargs) == 1
    return name in ("max", "min") and ((len(args) > 1 and isinstance(args[1], int)) or "dim" in kwargs)


class Selections(TorchFunctionMode):
    """Records (``pinned=None``) or replays the results of the ops that select entries by value (see the module
    docstring); replaying checks that each gets the inputs it got when recorded."""

    def __init__(self, pinned: list[tuple[str, list[torch.Tensor], Any]] | None = None) -> None:
        super().__init__()
        self.pinned, self.seen = pinned, []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        if not _selects(name, args, kwargs):
            return func(*args, **kwargs)
        inputs = [t.detach().clone() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.pinned is None:
            out = func(*args, **kwargs)
            self.seen.append((name, inputs, out))
            return out
        want_name, want_inputs, out = self.pinned[len(self.seen)]
        assert name == want_name, f"selection {len(self.seen)}: {name} where the masked model ran {want_name}"
        for got, want in zip(inputs, want_inputs, strict=True):
            scale = max(1.0, float(want.float().abs().max())) if want.numel() and want.is_floating_point() else 1.0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
        self.seen.append((name, inputs, out))
        return out


def pinned_outputs(model: nn.Module, ref: nn.Module, x: Any) -> tuple[Any, Any, int]:
    """The compacted and the masked model's outputs on ``x`` with the selections pinned, and how many were."""
    with torch.no_grad():
        recorder = Selections()
        with recorder:
            want = run(ref, x)
        replayer = Selections(recorder.seen)
        with replayer:
            got = run(model, x)
    assert len(replayer.seen) == len(recorder.seen)
    return got, want, len(recorder.seen)


def assert_outputs_close(got: Any, want: Any, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every tensor of two output trees close, the absolute tolerance scaled by the largest value (random BN
    statistics make some outputs large)."""
    a, b = tree_leaves(got), tree_leaves(want)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol * max(1.0, float(v.abs().max())))
        elif isinstance(v, torch.Tensor):
            assert torch.equal(u, v)


@dataclass
class Case:
    """A model of a zoo: ``build()`` gives the model (eval mode, random weights) and two inputs of one shape, the
    example and a fresh one; ``op_types`` and ``exclude`` (module names) choose what is pruned by half.
    ``keeps``: masked channels must stay (the reason is the model's, e.g. weight standardisation), and compaction
    must say which in a warning and in its record."""

    build: Callable[[], tuple[nn.Module, Any, Any]]
    op_types: tuple[str, ...] = ("Conv2d", "Linear")
    exclude: list[str] = field(default_factory=list)
    save_load: bool = True
    keeps: bool = False


def check(case: Case) -> dict[str, Any]:
    """The oracle: returns what compaction recorded (``model.slimtorch_compaction``) and the warnings' texts."""
    model, x, fresh = case.build()
    randomize_(model)
    config: list[dict[str, Any]] = [{"op_types": list(case.op_types), "sparse_ratio": 0.5}]
    if case.exclude:
        config.append({"exclude": True, "op_names": case.exclude})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = compute_masks(model, config, example_inputs=x)
        ref = copy.deepcopy(model)
        apply_masks_(ref, masks)
        before = sum(p.numel() for p in model.parameters())
        compact_(model, masks, example_inputs=x)
    got, want, _ = pinned_outputs(model, ref, fresh)
    assert_outputs_close(got, want)
    after = sum(p.numel() for p in model.parameters())
    kept = model.slimtorch_compaction["masked_channels_kept"]
    if case.keeps:  # what stays is said, with numbers, and recorded
        assert kept and after <= before
        first = f"{kept[0]['channels']} {kept[0]['side']} channels of {kept[0]['parameter']!r}"
        assert any(first in str(w.message) for w in caught), [str(w.message) for w in caught]
    else:
        assert not kept and after == implied_param_count(ref, masks) < before
    if case.save_load:
        with tempfile.TemporaryDirectory() as folder:
            save_compacted(model, folder)
            again, _, _ = case.build()
            load_compacted_(again, folder)
            loaded, compacted, _ = pinned_outputs(again, model, fresh)
            assert_outputs_close(loaded, compacted, rtol=0, atol=0)
    return {**model.slimtorch_compaction, "warnings": [str(w.message) for w in caught]}
