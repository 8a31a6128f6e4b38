"""Rewriting calls with hard-coded sizes at run time (``x.view(-1, 4 * 4 * 50)`` after conv2 lost half
its channels). Why at run time: the sizes live in the model's Python source, which compaction must not
edit; a function mode active only during the forward of the modules concerned rewrites just the recorded
calls (same module, same op, same occurrence in that module's forward) and leaves every other call alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from slimtorch.graph import apply_fix
from slimtorch.graph.rules import op_name

__all__ = ["ShapeFixer"]


class _Mode(TorchFunctionMode):
    def __init__(self, fixer: ShapeFixer) -> None:
        super().__init__()
        self.fixer = fixer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        frame = self.fixer.stack[-1]
        name = op_name(func)
        fix = self.fixer.fixes.get((frame[0], name, frame[1][name]))
        frame[1][name] += 1
        if fix is not None:
            new_args, new_kwargs = apply_fix(fix, args, kwargs)
            if self.fixer.probing and (_plain(new_args) != _plain(args) or _plain(new_kwargs) != _plain(kwargs)):
                self.fixer.needed.add((fix["module"], fix["op"], fix["occurrence"]))
            args, kwargs = new_args, new_kwargs
        return func(*args, **kwargs)


def _plain(values: Any) -> list[Any]:
    """The non-tensor arguments (tensors compare elementwise, and are never rewritten)."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return [(k, v) for k, v in items if not isinstance(v, Tensor)]


class _Hook:
    """Forward pre-/post-hook of every module: tracks the innermost module and enters the mode inside the
    modules that hold a rewritten call. An object (not a closure) so that ``copy.deepcopy`` copies it."""

    def __init__(self, fixer: ShapeFixer, name: str, pre: bool) -> None:
        self.fixer, self.name, self.pre = fixer, name, pre

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> None:
        fixer = self.fixer
        if self.pre:
            fixer.stack.append((self.name, Counter()))
            if self.name in fixer.modules and fixer.mode is None:
                fixer.mode, fixer.owner = _Mode(fixer), self.name
                fixer.mode.__enter__()
        else:
            fixer.stack.pop()
            if fixer.mode is not None and fixer.owner == self.name:
                mode, fixer.mode = fixer.mode, None
                mode.__exit__(None, None, None)


class ShapeFixer:
    """The rewrites of one compacted model (``fixes``: dicts from the plan) and their hooks."""

    def __init__(self, fixes: list[dict[str, Any]], probing: bool = False) -> None:
        self.fixes = {(f["module"], f["op"], f["occurrence"]): f for f in fixes}
        self.modules = {f["module"] for f in fixes}
        self.stack: list[tuple[str, Counter]] = [("<outside>", Counter())]
        self.mode: _Mode | None = None
        self.owner = ""
        self.probing = probing
        self.needed: set[tuple[str, str, int]] = set()

    def install(self, model: nn.Module) -> list[Any]:
        """Hook every module of ``model``; returns the hook handles."""
        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(_Hook(self, name, True)))
            handles.append(module.register_forward_hook(_Hook(self, name, False), always_call=True))
        return handles
