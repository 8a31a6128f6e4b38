"""Per-op channel rules: one small function per op, in a registry keyed by the torch function (or its name).

A rule reads the labels of the call's inputs (``ctx.labels(t)``), sets the labels of its outputs
(``ctx.set_output(...)``) and records what it learns: ties between channels (``ctx.uf.union``),
parameters indexed by channels (``ctx.graph.fresh`` / ``ctx.graph.attach``), channels that cannot be
removed (``ctx.block``), equal-count constraints, measured values (sinks) and fix sites. Add one with::

    @register_rule(torch.nn.functional.glu)          # or a name: @register_rule("glu")
    def _glu(ctx): ...

and a rule for a whole module (its forward is not traced inside) with ``@register_module_rule(MyBlock)``.
This file holds the generic rules (elementwise, data movement, reductions, products); layer rules are in
``layers.py`` and module-level rules in ``modules.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from slimtorch.graph.fixes import SHAPE_OPS, FixSite, shape_args
from slimtorch.graph.labels import broadcast_merge, collapse, union_rows, varying_dims

if TYPE_CHECKING:
    from slimtorch.graph.trace import ModuleContext, OpContext

__all__ = ["PLAIN_TYPES", "VALUE_FREE", "find_module_rule", "find_rule", "op_name", "register_module_rule",
           "register_rule", "tensors_in"]

Rule = Callable[["OpContext"], None]
ModuleRule = Callable[["ModuleContext"], None]
_BY_FUNC: dict[Any, Rule] = {}
_BY_NAME: dict[str, Rule] = {}
_BY_TYPE: dict[type, ModuleRule] = {}


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


#: types of plain (non-tensor, non-container) op arguments
PLAIN_TYPES = (int, float, bool, str, type(None), slice, type(...), torch.dtype, torch.device, torch.memory_format,
               torch.layout, torch.Size)
_PLAIN_EXACT = frozenset(PLAIN_TYPES)


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs, in order. Plain tuples, lists and dicts are walked here
    (torch's pytree, which also knows namedtuples and registered classes, costs ~10x more per call and
    runs for every op traced); anything else goes to the pytree."""
    kind = type(tree)
    if kind is tuple or kind is list or kind is dict:
        out: list[torch.Tensor] = []
        for item in tree.values() if kind is dict else tree:
            if type(item) in _PLAIN_EXACT:  # (an exact-type lookup first: most arguments are ints, floats or None)
                continue
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif not isinstance(item, PLAIN_TYPES):
                out += tensors_in(item)
        return out
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, PLAIN_TYPES):
        return []
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


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
    "tan", "erf", "erf_", "erfc", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_",
    "clip", "clip_", "clamp_min", "clamp_max", "nan_to_num", "contiguous", "clone", "detach", "detach_",
    "float", "half", "double", "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad_", "zero_",
    "fill_", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite", "data", "tril", "triu", "tril_",
    "triu_", "square_", "pow_", "sigmoid_", "__invert__", "__bool__", "special_expit", "logit",
]

_NARY = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "floor_divide", "remainder",
    "fmod", "pow", "maximum", "minimum", "fmax", "fmin", "atan2", "hypot", "eq", "ne", "lt", "le", "gt", "ge",
    "eq_", "ne_", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "where",
    "masked_fill", "masked_fill_", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "__add__",
    "__radd__", "__iadd__", "__sub__", "__rsub__", "rsub", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__pow__", "__rpow__",
    "__ipow__", "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__floordiv__", "__rfloordiv__", "__mod__", "copysign", "xlogy", "heaviside",
]


def _aligned(labels: torch.Tensor | None, rank: int) -> torch.Tensor | None:
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


#: ops whose rules read only labels and shapes, never the values of their tensor arguments
VALUE_FREE = frozenset(_UNARY) | frozenset(_NARY)


@register_rule(*_UNARY)
def _unary(ctx: OpContext) -> None:
    ctx.set_output(ctx.labels(ctx.args[0]) if ctx.args else None)
    note_scalars(ctx)


@register_rule(*_NARY)
def _nary(ctx: OpContext) -> None:
    outs = ctx.outputs
    if not outs:
        return
    rank = outs[0].dim()
    parts = [_aligned(ctx.labels(t), rank) for t in tensors_in((ctx.args, ctx.kwargs))]
    merged = broadcast_merge(ctx.uf, parts)
    ctx.set_output(merged)
    note_grid(ctx, merged)
    note_scalars(ctx)


@register_rule("copy_")
def _copy(ctx: OpContext) -> None:
    ctx.set_labels(ctx.args[0], _aligned(ctx.labels(ctx.args[1]), ctx.args[0].dim()))


@register_rule(*[
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
    "new_empty", "new_full", "new_tensor", "bernoulli", "bernoulli_", "normal_", "uniform_", "argwhere",
    "nonzero",
])
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
    "split", "split_with_sizes", "chunk", "unbind", "cat", "concat", "concatenate", "stack", "hstack",
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
    if ctx.name == "pad":  # padded positions hold no channel
        kwargs = {**kwargs, "value": -1.0}
        args = args[:3] if len(args) > 3 else args
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
    labels = _store(ctx, _label_call(ctx))
    extra = _MOVE_EXTRA.get(ctx.name)
    if extra is not None:
        extra(ctx, labels)


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


def _dim_arg(ctx: OpContext, index: int, default: int = 0) -> int:
    dim = ctx.arg(index, "dim", default)
    rank = ctx.args[0].dim()
    return dim + rank if dim < 0 else dim


def _after_split(ctx: OpContext, labels: list) -> None:
    dim = _dim_arg(ctx, 2)
    source = ctx.labels(ctx.args[0])
    if dim not in varying_dims(source):
        return
    size = ctx.arg(1, "split_size_or_sections", ctx.kwargs.get("split_size", ctx.kwargs.get("sizes")))
    total = ctx.args[0].shape[dim]
    as_list = not isinstance(size, int)
    sizes = list(size) if as_list else [min(size, total - i) for i in range(0, total, size)]
    row_labels = union_rows(ctx.uf, source, [dim])
    if not as_list:
        if total % size:
            ctx.block(row_labels, "split into unequal parts along channels")
            return
        ctx.graph.equal_count(row_labels.reshape(-1, size))
    ctx.graph.fix_sites.append(FixSite(ctx.site, "split", source, {"dim": dim, "sizes": sizes, "as_list": as_list}))


def _after_chunk(ctx: OpContext, labels: list) -> None:
    dim = _dim_arg(ctx, 2)
    source = ctx.labels(ctx.args[0])
    if dim not in varying_dims(source):
        return
    row_labels = union_rows(ctx.uf, source, [dim])
    parts = ctx.arg(1, "chunks")
    if row_labels.numel() % parts:
        ctx.block(row_labels, "chunk into unequal parts along channels")
    else:
        ctx.graph.equal_count(row_labels.reshape(parts, -1))


def _after_unbind(ctx: OpContext, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    source = ctx.labels(ctx.args[0])
    if varying_dims(source) == [dim]:
        ctx.block(source, "unbind along channels (each channel becomes its own tensor)")


def _after_shape(ctx: OpContext, labels: list) -> None:
    found = shape_args(ctx.name, ctx.args)
    if found is None or not labels or labels[0] is None:
        return
    out = labels[0]
    if any(out.shape[d] > 1 for d in range(out.dim())):
        ctx.graph.fix_sites.append(FixSite(ctx.site, "shape", out, {"sizes": found[0]}))


def _after_narrow(ctx: OpContext, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    source = ctx.labels(ctx.args[0])
    if dim in varying_dims(source):
        data = {"dim": dim, "start": ctx.arg(2, "start"), "length": ctx.arg(3, "length")}
        ctx.graph.fix_sites.append(FixSite(ctx.site, "narrow", source, data))


def _after_select(ctx: OpContext, labels: list) -> None:
    dim = _dim_arg(ctx, 1)
    source = ctx.labels(ctx.args[0])
    if dim in varying_dims(source):
        ctx.graph.fix_sites.append(FixSite(ctx.site, "select", source, {"dim": dim, "index": ctx.arg(2, "index")}))


def _after_index(ctx: OpContext, labels: list) -> None:
    source = ctx.labels(ctx.args[0])
    vary = varying_dims(source)
    if not vary:
        return
    items = list(ctx.args[1]) if isinstance(ctx.args[1], tuple) else [ctx.args[1]]
    if any(it is Ellipsis for it in items):
        at = items.index(Ellipsis)
        consumed = sum(it is not None for it in items) - 1
        items = items[:at] + [slice(None)] * (ctx.args[0].dim() - consumed) + items[at + 1 :]
        positions = None  # the ellipsis is expanded: positions no longer match the call's tuple
    else:
        positions = list(range(len(items)))
    dim, fixes = 0, []
    for pos, item in enumerate(items):
        if item is None:
            continue
        if dim in vary:
            if isinstance(item, (torch.Tensor, list, bool)):
                ctx.block(source, "indexing channels with a tensor or list")
                return
            if isinstance(item, slice) and item.step not in (None, 1):
                ctx.block(source, "slicing channels with a step")
                return
            if positions is None and not (isinstance(item, slice) and item == slice(None)):
                ctx.block(source, "indexing channels after an ellipsis")
                return
            if isinstance(item, int):
                fixes.append({"pos": pos, "dim": dim, "int": item})
            elif item != slice(None):
                fixes.append({"pos": pos, "dim": dim, "slice": [item.start, item.stop]})
        dim += 1
    if fixes:
        ctx.graph.fix_sites.append(FixSite(ctx.site, "index", source, {"items": fixes}))


_MOVE_EXTRA: dict[str, Callable[[OpContext, list], None]] = {
    "split": _after_split,
    "split_with_sizes": _after_split,
    "chunk": _after_chunk,
    "unbind": _after_unbind,
    "narrow": _after_narrow,
    "select": _after_select,
    "__getitem__": _after_index,
    "__setitem__": _after_index,
    **{op: _after_shape for op in SHAPE_OPS},
}
