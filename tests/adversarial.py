"""The adversarial suite's shared checks: a failure must raise a typed error that says what to do, and leave the
model and the files on disk exactly as they were.

Each ``tests/test_adversarial_*.py`` holds a table of cases (bad or unusual inputs); a case that must fail goes
through :func:`fails_cleanly`, one that must succeed checks its result with the compaction oracle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.errors import SlimError


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call could have changed in ``model``: every tensor (parameters and buffers, by
    value, dtype, shape and identity of storage sharing), the module tree as printed, every plain attribute,
    the train/eval flags, registered hooks and parametrizations."""
    # (torch.ao's quantized layers keep a dtype and packed tuples in their state: compared by their repr)
    tensors = {k: (v.dtype, tuple(v.shape), v.detach().clone()) if isinstance(v, torch.Tensor)
               else (None, None, repr(v)) for k, v in model.state_dict(keep_vars=True).items()}
    modules = {}
    for name, m in model.named_modules():
        attrs = {k: repr(v) for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        hooks = tuple(len(getattr(m, h, {})) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                      "_state_dict_hooks", "_load_state_dict_pre_hooks"))
        params = {k: (None if p is None else (type(p).__name__, p.requires_grad, tuple(p.shape)))
                  for k, p in m._parameters.items()}
        buffers = {k: (None if b is None else tuple(b.shape)) for k, b in m._buffers.items()}
        modules[name] = (type(m).__name__, m.training, attrs, hooks, params, buffers)
    return {"repr": repr(model), "tensors": tensors, "modules": modules}


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["repr"] == before["repr"]
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (dtype, shape, value) in before["tensors"].items():
        dtype2, shape2, value2 = after["tensors"][name]
        assert (dtype2, shape2) == (dtype, shape), name
        if not isinstance(value, torch.Tensor):
            assert value2 == value, name
            continue
        assert value2.is_meta == value.is_meta, name
        if value.is_meta:  # (no values to compare: a model on the meta device holds shapes only)
            continue
        assert torch.equal(value2, value) or (value.is_floating_point() and torch.equal(value2.isnan(), value.isnan())
                                              and torch.equal(value2.nan_to_num(), value.nan_to_num())), name


def files_state(paths: Iterable[Path]) -> dict[str, tuple[int, str] | None]:
    """Every file under ``paths`` (files or folders): its mode and the hash of its bytes; a missing path maps to
    None, so a file created by a failed call shows up as a difference."""
    state: dict[str, tuple[int, str] | None] = {}
    for root in paths:
        root = Path(root)
        found = sorted(p for p in root.rglob("*")) if root.is_dir() else [root]
        if root.is_dir():
            state[str(root)] = (root.stat().st_mode, "dir")
        for p in found:
            if p.is_symlink():
                state[str(p)] = (0, f"-> {p.readlink()}")
            elif p.is_file():
                state[str(p)] = (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            elif p.is_dir():
                state[str(p)] = (p.stat().st_mode, "dir")
            else:
                state[str(p)] = None
    return state


def fails_cleanly(
    call: Callable[[], Any],
    error: type[BaseException],
    fragment: str,
    *,
    models: Iterable[nn.Module] = (),
    paths: Iterable[Path] = (),
) -> BaseException:
    """Run ``call``; it must raise ``error`` (a :class:`~slimtorch.errors.SlimError` or one of its subclasses,
    or SystemExit for the command line) whose message contains ``fragment`` (case-insensitive), and leave
    every model in ``models`` and every file under ``paths`` exactly as they were. Returns the exception."""
    models, paths = list(models), [Path(p) for p in paths]
    if not issubclass(error, SystemExit):
        assert issubclass(error, SlimError), f"{error} is not one of slimtorch's typed errors"
    before = [model_state(m) for m in models]
    files_before = files_state(paths)
    with pytest.raises(error) as caught:
        call()
    assert fragment.lower() in str(caught.value).lower(), f"{fragment!r} not in {caught.value!s}"
    for b, m in zip(before, models, strict=True):
        assert_same_state(b, model_state(m))
    assert files_state(paths) == files_before
    return caught.value
