"""Per-op channel rules: one small function per op, in a registry keyed by the torch function (or its name).

A rule reads the labels of the call's inputs (``ctx.labels(t)``), sets the labels of its outputs
(``ctx.set_output(...)``) and records what it learns: ties between channels (``ctx.uf.union``),
parameters indexed by channels (``ctx.graph.fresh`` / ``ctx.graph.attach``), channels that cannot be
removed (``ctx.block``), equal-count constraints, measured values (sinks) and fix sites. Add one with::

    @register_rule(torch.nn.functional.glu)          # or a name: @register_rule("glu")
    def _glu(ctx): ...

and a rule for a whole module (its forward is not traced inside) with ``@register_module_rule(MyBlock)``.
This file holds the generic rules (elementwise, data movement); what data movement records besides moving
labels (fix sites, blocks) is in ``moves.py``, reductions in ``reductions.py``, products in ``products.py``,
layer rules in ``layer_rules.py`` and module-level rules in ``module_rules.py``.

A rule is *exact* when the compacted model, running the op on the kept channels (with any sizes or positions
in the call rewritten), computes what the full op computes with the removed channels dropped. An op whose
result depends on how many channels there are, or on where a channel sits (a roll, a gather with computed
indices, a mean), is either rewritten so that it stays exact or blocks the channels it touches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from slimtorch.graph.callsites import FixSite
from slimtorch.graph.context import ModuleContext, OpContext, tensors_in
from slimtorch.graph.labels import broadcast_merge, collapse, union_rows, varying_dims

__all__ = [
    "MOVE_EXTRA",
    "NUMBER_FACTORIES",
    "TRACE_PREPARERS",
    "VALUE_FREE",
    "after_move",
    "aligned",
    "bind_positions",
    "find_module_rule",
    "find_rule",
    "nary",
    "note_grid",
    "note_number",
    "op_name",
    "register_module_rule",
    "register_rule",
]

Rule = Callable[[OpContext], None]
ModuleRule = Callable[[ModuleContext], None]
_BY_FUNC: dict[Any, Rule] = {}
_BY_NAME: dict[str, Rule] = {}
_BY_TYPE: dict[type, ModuleRule] = {}

#: ``fn(model)`` called as every trace starts, before any rule is looked up: an integration with a third-party
#: library registers its rules from here when the library is in use (see :mod:`slimtorch.integrations`), so
#: that the graph never imports it
TRACE_PREPARERS: list[Callable[[Any], None]] = []


def register_rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for torch functions (objects, matched first) or op names (``"add_"``)."""

    def deco(rule: Rule) -> Rule:
        for op in ops:
            (_BY_NAME if isinstance(op, str) else _BY_FUNC)[op] = rule
        return rule

    return deco


def register_module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register a rule that handles a whole module (and its subclasses) as one node."""

    def deco(rule: ModuleRule) -> ModuleRule:
        for t in types:
            _BY_TYPE[t] = rule
        return rule

    return deco


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property such as Tensor.T: name it after the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def find_rule(func: Any) -> Rule | None:
    try:
        rule = _BY_FUNC.get(func)
    except TypeError:
        rule = None
    return rule or _BY_NAME.get(op_name(func))


def find_module_rule(module: Any) -> ModuleRule | None:
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


# -- elementwise -------------------------------------------------------------------------------------

_UNARY = [
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus", "softsign", "mish", "mish_",
    "logsigmoid", "threshold", "threshold_", "rrelu", "tanhshrink", "softshrink", "hardshrink", "dropout",
    "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "neg",
    "neg_", "__neg__", "abs", "abs_", "__abs__", "exp", "exp_", "exp2", "log", "log_", "log2", "log10",
    "log1p", "expm1", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "reciprocal", "reciprocal_", "square", "sin", "cos",
    "tan", "erf", "erf_", "erfc", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "nan_to_num",
    "contiguous", "clone", "detach", "detach_", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "cpu", "cuda", "requires_grad_", "zero_", "fill_", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite",
    "data", "square_", "pow_", "sigmoid_", "__invert__", "__bool__", "special_expit", "logit",
]
# the bounds may be tensors (a per-channel threshold): elementwise between all tensors, as the ops below
_CLAMP = ["clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max"]

_NARY = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "floor_divide", "remainder",
    "fmod", "pow", "maximum", "minimum", "fmax", "fmin", "atan2", "hypot", "eq", "ne", "lt", "le", "gt", "ge",
    "eq_", "ne_", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "where",
    "masked_fill", "masked_fill_", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "__add__",
    "__radd__", "__iadd__", "__sub__", "__rsub__", "rsub", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__pow__", "__rpow__",
    "__ipow__", "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__floordiv__", "__rfloordiv__", "__mod__", "copysign", "xlogy", "heaviside", *_CLAMP,
]
_TRIANGLE = ["tril", "triu", "tril_", "triu_"]


def aligned(labels: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """Labels of a broadcast operand, with the leading dims broadcasting adds."""
    if labels is None or labels.dim() == rank:
        return labels
    return labels.reshape((1,) * (rank - labels.dim()) + tuple(labels.shape))


def note_scalars(ctx: OpContext) -> None:
    """Floats in arithmetic may come from a channel count (Swin scales logits by ``(C // heads) ** -0.5``,
    C being its input width): remember them; compaction pins those that change when channels go."""
    values = {str(i): a for i, a in enumerate(ctx.args) if isinstance(a, float)}
    if values:
        ctx.graph.fix_sites.append(FixSite(ctx.site, "scalar", None, {"values": values}))


#: factories of a tensor from a Python number: ``torch.tensor(C)`` where C is a channel count (RAFT divides its
#: correlation volume by ``sqrt(torch.tensor(C))``) is a size that compaction would change. Their numbers are
#: noted as :func:`note_scalars` notes floats (they make no channels, so their rules would never run).
NUMBER_FACTORIES = frozenset(["tensor", "as_tensor", "scalar_tensor"])


def note_number(ctx: OpContext) -> None:
    """A tensor made from one Python number: pinned, like a float in arithmetic, where compaction changes it."""
    value = ctx.args[0] if ctx.args else None
    if type(value) in (int, float):
        ctx.graph.fix_sites.append(FixSite(ctx.site, "scalar", None, {"values": {"0": value}}))


#: ops whose rules read only labels and shapes, never the values of their tensor arguments
VALUE_FREE = frozenset(_UNARY) | frozenset(_NARY) | frozenset(_TRIANGLE)


@register_rule(*_UNARY)
def _unary(ctx: OpContext) -> None:
    ctx.set_output(ctx.labels(ctx.args[0]) if ctx.args else None)
    note_scalars(ctx)


@register_rule(*_NARY)
def nary(ctx: OpContext) -> None:
    outs = ctx.outputs
    if not outs:
        return
    rank = outs[0].dim()
    tensors = tensors_in((ctx.args, ctx.kwargs))
    # A one-element parameter or buffer (a learnable scale or offset, as in HGNetV2's affine blocks) is shared by
    # every channel it meets: it is no channel, and its one label would tie all of them into one unit that no
    # pruning can split (the layers before it were then left whole without a word).
    parts = [None if t.numel() == 1 and ctx.param_name(t) is not None else aligned(ctx.labels(t), rank)
             for t in tensors]
    merged = broadcast_merge(ctx.uf, parts)
    ctx.set_output(merged)
    note_grid(ctx, merged)
    note_scalars(ctx)
    if merged is not None and any(p is None for p in parts):
        bind_positions(ctx, merged, [t.shape for t, p in zip(tensors, parts, strict=True) if p is None])


def bind_positions(ctx: OpContext, labels: torch.Tensor, shapes: list[torch.Size], skip: int | None = None) -> None:
    """Operands that carry no channels (a model input, ``torch.arange(C)``, a constant computed in forward) but
    differ along a channel dim of the result (``labels``; ``shapes`` aligned to its rank from the right, ``skip``:
    a dim along which they are laid next to it, as in ``cat``) hold values bound to positions, not to channels:
    the compacted model would pair them with other channels, or fail on their size. Along a dim where the
    channels vary alone, they are blocked; along a dim of a grid (heads x head size), every row must stay, so
    the rows keep equal counts (a row then goes only with all of them)."""
    vary = varying_dims(labels)
    rank = labels.dim()
    bound = sorted({d for shape in shapes for d in vary if d != skip and d - (rank - len(shape)) >= 0
                    and shape[d - (rank - len(shape))] > 1})
    if not bound:
        return
    if len(bound) == len(vary):
        ctx.block(labels, "combined with a tensor that carries no channels but differs along them (values bound to "
                          "positions, such as an input or torch.arange of the channel count)")
        return
    for d in bound:
        ctx.graph.equal_count(labels.movedim(d, 0).reshape(labels.shape[d], -1))  # (rows along d, rest)


@register_rule(*_TRIANGLE)
def _triangle(ctx: OpContext) -> None:
    """tril/triu keep positions by their place in the last two dims: channels there would move the diagonal."""
    labels = ctx.labels(ctx.args[0])
    if labels is not None and any(d >= labels.dim() - 2 for d in varying_dims(labels)):
        ctx.block(labels, f"{ctx.name} over channels (which positions it keeps depends on how many there are)")
    ctx.set_output(labels)


@register_rule("copy_")
def _copy(ctx: OpContext) -> None:
    ctx.set_labels(ctx.args[0], aligned(ctx.labels(ctx.args[1]), ctx.args[0].dim()))


_UNIFORM = ["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
            "new_empty", "new_full", "bernoulli", "bernoulli_", "normal_", "uniform_"]


@register_rule(*_UNIFORM)
def _uniform(ctx: OpContext) -> None:
    """A fresh tensor whose values come from no channel and are bound to no position (zeros, noise), shaped
    after its input: labels of -1 broadcast along every dim (not None), so that adding it to channels binds
    nothing (see :func:`bind_positions`)."""
    for t in ctx.outputs:
        ctx.set_labels(t, torch.full([1] * t.dim(), -1, dtype=torch.long))


@register_rule("new_tensor")
def _constant(ctx: OpContext) -> None:
    ctx.set_output(None)  # a fresh tensor: its values do not come from any channel


def note_grid(ctx: OpContext, labels: torch.Tensor | None) -> None:
    """A tensor whose channels vary along several dims (heads x head size, tokens x features) can only be
    compacted densely if each row along the innermost varying dim keeps the same number of channels."""
    vary = varying_dims(labels)
    if len(vary) < 2:
        return
    inner = vary[-1]
    rows = labels.movedim(inner, -1).reshape(-1, labels.shape[inner])  # (rows, channels per row)
    ctx.graph.equal_count(rows)


# -- data movement: the op is applied to the labels themselves ------------------------------------------

_MOVE = [
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "expand", "expand_as", "broadcast_to", "repeat", "tile", "narrow", "select", "__getitem__",
    "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "cat", "concat", "concatenate", "stack",
    "hstack",
    "vstack", "roll", "flip", "fliplr", "flipud", "rot90", "pad", "pixel_unshuffle", "index_select", "gather",
    "take_along_dim", "repeat_interleave", "unfold", "diagonal", "atleast_1d", "atleast_2d", "atleast_3d",
]
_PERMUTE = ["permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "t_", "T", "mT"]
_INDEX_DATA_ONLY = {"__getitem__", "index_select", "gather", "take_along_dim", "__setitem__"}


def _label_call(ctx: OpContext) -> Any:
    """Run the op on float64 label tensors (exact for ids below 2**53) in place of data tensors."""
    index_ops = ctx.name in _INDEX_DATA_ONLY
    data = tree_leaves([ctx.args[0], ctx.args[2]] if ctx.name == "__setitem__" else ctx.args[:1])

    def sub(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or (index_ops and not any(x is d for d in data)):
            return x
        if ctx.labels(x) is None and not x.is_floating_point() and not any(x is d for d in data):
            return x  # e.g. the repeats of repeat_interleave: an argument, not data
        # Data without labels (an integer buffer such as position ids) carries none: -1, not its values.
        return ctx.full_labels(x).double()

    args, kwargs = tree_map(sub, ctx.args), tree_map(sub, ctx.kwargs)
    if ctx.name == "pad" and ctx.arg(2, "mode", "constant") == "constant":  # padded positions hold no channel
        kwargs = {**kwargs, "value": -1.0}
        args = args[:3] if len(args) > 3 else args
    if ctx.name == "__setitem__" and not isinstance(args[2], torch.Tensor):  # a number written holds no channel
        args = (args[0], args[1], -1.0, *args[3:])
    result = ctx.func(*args, **kwargs)
    if result is None:  # in-place (__setitem__): the first argument's labels were written
        result = args[0]
    return result


def _pads_only_plain_dims(ctx: OpContext) -> bool:
    labels = ctx.labels(ctx.args[0])
    pads = ctx.arg(1, "pad")
    padded = [labels.dim() - 1 - i // 2 for i, p in enumerate(pads) if p] if labels is not None else []
    return labels is not None and all(labels.shape[d] == 1 for d in padded)


def _store(ctx: OpContext, result: Any) -> list[torch.Tensor | None]:
    produced = [r for r in tree_leaves(result) if isinstance(r, torch.Tensor)]
    targets = ctx.outputs or [ctx.args[0]]
    out = []
    for target, lab in zip(targets, produced, strict=False):
        lab = collapse(ctx.uf, lab.long()) if lab.dtype != torch.bool else None
        ctx.set_labels(target, lab)
        note_grid(ctx, lab)
        out.append(lab)
    return out


#: what a data-movement op records besides moving labels (fix sites, blocks, equal counts), by op name:
#: ``fn(ctx, source, labels)``, ``source`` the first argument's labels before the op, ``labels`` the outputs'
MOVE_EXTRA: dict[str, Callable[[OpContext, torch.Tensor | None, list], None]] = {}


def after_move(*names: str) -> Callable[[Callable], Callable]:
    """Register what data-movement ops ``names`` record besides moving labels (see :data:`MOVE_EXTRA`)."""

    def deco(fn: Callable) -> Callable:
        for name in names:
            MOVE_EXTRA[name] = fn
        return fn

    return deco


@register_rule(*_MOVE, "__setitem__")
def _move(ctx: OpContext) -> None:
    if ctx.name == "view" and isinstance(dtype := ctx.arg(1, "dtype"), torch.dtype):  # x.view(dtype): bytes
        x = ctx.args[0]
        if dtype.itemsize == x.dtype.itemsize:  # the same elements read as another type (a bool mask as uint8)
            ctx.set_output(ctx.labels(x))
        elif ctx.labels(x) is not None:  # elements split or merged: no rule says where channels go
            ctx.graph.unknown.append((f"view as {dtype}", ctx.site[0], [ctx.labels(x)]))
            ctx.set_output(None)
        return
    if ctx.name == "pad" and _pads_only_plain_dims(ctx):
        ctx.set_output(ctx.labels(ctx.args[0]))  # e.g. spatial padding: every position keeps its channels
        return
    first = ctx.args[0] if ctx.args else None
    source = ctx.labels(first) if isinstance(first, torch.Tensor) else None  # (before an in-place op writes)
    labels = _store(ctx, _label_call(ctx))
    extra = MOVE_EXTRA.get(ctx.name)
    if extra is not None:
        extra(ctx, source, labels)


@register_rule(*_PERMUTE)
def _permute(ctx: OpContext) -> None:
    before = varying_dims(ctx.labels(ctx.args[0]))
    (labels,) = _store(ctx, _label_call(ctx))[:1] or [None]
    if labels is None or len(before) < 2:
        return
    perm = _permutation(ctx, labels.dim())
    after = [perm.index(d) for d in before]
    if after == sorted(after):
        return
    # Reordering two channel dims (a channel shuffle) interleaves channels, which a compacted tensor can
    # only reproduce when every row keeps the same indices: tie each index across the other dims.
    keep = max(varying_dims(labels), key=lambda d: labels.shape[d])
    tied = union_rows(ctx.uf, labels, [keep])
    shape = [1] * labels.dim()
    shape[keep] = labels.shape[keep]
    ctx.set_output(tied.reshape(shape))


def _permutation(ctx: OpContext, rank: int) -> list[int]:
    """Output dim i comes from input dim perm[i]."""
    probe = torch.empty([2 + d for d in range(rank)])  # distinct sizes identify the dims
    moved = ctx.func(probe, *ctx.args[1:], **ctx.kwargs) if ctx.name not in ("T", "mT") else (
        probe.permute(*reversed(range(rank))) if ctx.name == "T" else probe.transpose(-2, -1))
    return [list(probe.shape).index(n) for n in moved.shape]


