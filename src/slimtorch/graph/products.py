"""Rules for products that contract a dim: matmul and friends, einsum, scaled dot-product attention.

Each operand's dims get einsum letters. Along a contracted letter, channel i of one operand multiplies
channel i of the other (``q @ k.T`` pairs query and key channels), so they are tied, and a sink records
both sides' values: a removed pair must be zero on at least one side. An operand whose channels meet a
contracted dim along which the other operand carries no channels (attention weights times values along
the tokens) has those channels blocked. The output carries an operand's channels when all of them live
on output letters (``attn @ v`` carries the value channels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimtorch.graph.graph import Sink
from slimtorch.graph.labels import broadcast_merge, varying_dims
from slimtorch.graph.rules import aligned, register_rule

if TYPE_CHECKING:
    from slimtorch.graph.context import OpContext

__all__: list[str] = []


def _spread(labels: torch.Tensor | None, letters: str, order: str) -> torch.Tensor | None:
    """Labels with dims named by ``letters`` laid out over all letters in ``order`` (size 1 where absent)."""
    if labels is None:
        return None
    present = [c for c in order if c in letters]
    moved = labels.permute([letters.index(c) for c in present])  # dims now in ``order`` order
    return moved.reshape([moved.shape[present.index(c)] if c in present else 1 for c in order])


def _varies(spread: torch.Tensor | None, order: str) -> set[str]:
    return set() if spread is None else {order[d] for d in varying_dims(spread)}


def _pair_sink(ctx: OpContext, a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> None:
    sinks = []
    for t, lab in ((a, la), (b, lb)):
        keep = varying_dims(lab)
        absmax, vmin, vmax = ctx.stats(t, keep)
        sinks.append(Sink("pair", lab.reshape([lab.shape[d] for d in keep]), absmax, vmin, vmax))
    sinks[0].other = sinks[1]
    ctx.graph.sinks.append(sinks[0])


def contract(ctx: OpContext, a: torch.Tensor, b: torch.Tensor, spec: tuple[str, str, str]) -> torch.Tensor | None:
    """Tie, sink and block as the module docstring says; return the output's labels (dims ``spec[2]``)."""
    la_letters, lb_letters, out_letters = spec
    order = "".join(dict.fromkeys(la_letters + lb_letters))
    la, lb = ctx.labels(a), ctx.labels(b)
    sa, sb = _spread(la, la_letters, order), _spread(lb, lb_letters, order)
    contracted = {c for c in la_letters if c in lb_letters and c not in out_letters}
    va, vb = _varies(sa, order) & contracted, _varies(sb, order) & contracted
    if va and vb:
        left, right = torch.broadcast_tensors(sa, sb)
        ctx.uf.union(left, right)
        _pair_sink(ctx, a, la, b, lb)
    elif va or vb:
        ctx.block(la if va else lb, "channels summed against an operand that does not carry them")
    result = None
    for lab, varies in ((sb, _varies(sb, order)), (sa, _varies(sa, order))):
        if not varies or not varies <= set(out_letters):
            continue
        if result is not None:
            ctx.block(lab, "a product whose two operands both carry output channels")
            continue
        squeezed = lab
        for d, c in enumerate(order):
            if c not in out_letters:
                squeezed = squeezed.narrow(d, 0, 1)
        kept = [c for c in order if c in out_letters]
        result = squeezed.reshape([squeezed.shape[order.index(c)] for c in kept])
        result = result.permute([kept.index(c) for c in out_letters])
    return result


def _matmul_spec(ra: int, rb: int) -> tuple[str, str, str]:
    batch = "abcdefgh"[: max(ra, rb) - 2] if max(ra, rb) > 2 else ""
    a = "k" if ra == 1 else batch[len(batch) - (ra - 2) :] + "mk"
    b = "k" if rb == 1 else batch[len(batch) - (rb - 2) :] + "kn"
    out = (batch if ra > 1 and rb > 1 else "") + ("m" if ra > 1 else "") + ("n" if rb > 1 else "")
    return a, b, out


@register_rule(*["matmul", "mm", "bmm", "__matmul__", "dot", "mv", "inner"])
def _matmul(ctx: OpContext) -> None:
    a, b = ctx.args[0], ctx.args[1]
    ctx.set_output(contract(ctx, a, b, _matmul_spec(a.dim(), b.dim())))


@register_rule("__rmatmul__")
def _rmatmul(ctx: OpContext) -> None:
    a, b = ctx.args[1], ctx.args[0]
    ctx.set_output(contract(ctx, a, b, _matmul_spec(a.dim(), b.dim())))


@register_rule(*["addmm", "baddbmm", "addbmm", "addmv"])
def _addmm(ctx: OpContext) -> None:
    bias, a, b = ctx.args[0], ctx.args[1], ctx.args[2]
    spec = _matmul_spec(a.dim(), b.dim())
    product = contract(ctx, a, b, spec)
    rank = ctx.outputs[0].dim()
    ctx.set_output(broadcast_merge(ctx.uf, [aligned(product, rank), aligned(ctx.labels(bias), rank)]))


def _expand_ellipsis(term: str, rank: int, fill: str) -> str:
    if "..." not in term:
        return term
    missing = rank - (len(term) - 3)
    return term.replace("...", fill[len(fill) - missing :] if missing else "")


@register_rule("einsum")
def _einsum(ctx: OpContext) -> None:
    equation = ctx.args[0].replace(" ", "")
    packed = len(ctx.args) == 2 and isinstance(ctx.args[1], (list, tuple))
    operands = list(ctx.args[1]) if packed else list(ctx.args[1:])
    if "->" not in equation or len(operands) != 2:
        ctx.graph.unknown.append(("einsum " + equation, ctx.site[0], [ctx.labels(t) for t in operands]))
        return
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)[:8]
    terms = [_expand_ellipsis(t, op.dim(), fill) for t, op in zip(terms, operands, strict=True)]
    out = _expand_ellipsis(out, ctx.outputs[0].dim(), fill)
    ctx.set_output(contract(ctx, operands[0], operands[1], (terms[0], terms[1], out)))


@register_rule("scaled_dot_product_attention")
def _sdpa(ctx: OpContext) -> None:
    q, k, v = ctx.args[0], ctx.args[1], ctx.args[2]
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        ctx.graph.unknown.append(("scaled_dot_product_attention with grouped keys", ctx.site[0],
                                  [ctx.labels(t) for t in (q, k, v)]))
        return
    batch = "abcdefgh"[: q.dim() - 2]
    contract(ctx, q, k, (batch + "le", batch + "se", batch + "ls"))
    if ctx.arg(6, "scale") is None:
        lab = ctx.labels(q)
        if lab is not None and lab.shape[-1] > 1:
            ctx.block(lab, "attention with the default scale 1/sqrt(head size), which would change")
    mask = ctx.arg(3, "attn_mask")
    ctx.block(ctx.labels(mask) if isinstance(mask, torch.Tensor) else None, "attention mask over channels")
    values = ctx.labels(v)  # (..., S, Ev): the output (..., L, Ev) carries them when they do not vary along S
    if values is not None and values.shape[-2] > 1:
        ctx.block(values, "value channels that vary along the tokens")
        values = None
    ctx.set_output(values)
