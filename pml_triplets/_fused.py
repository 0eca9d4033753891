"""The cosines of each anchor with its own rows, normalizing both on the fly, with their own backward.

(And ``unit(x)``, ``F.normalize``'s rule with a one-pass backward, for every other tensor the engine normalizes.)

``cosine_rows(a, rows, scale)`` is, for each ``r`` of ``rows`` (one or two (C, J, d) tensors), the (C, J) cosines
``scale * <a[c], r[c, j]> / (D(a[c]) D(r[c, j]))`` with ``D(x) = max(‖x‖, eps)``: ``F.normalize``'s rule for both
sides (``scale`` is 1/τ for a number τ). An anchor's positives and its own negatives go through one call: the
anchors are normalized once (no (C, d) unit copy), and their gradient is one tensor, written once. The per-anchor
negatives are the largest tensor of a call; through ``F.normalize`` and autograd they would be copied normalized,
and the backward would write three temporaries of their size. Here the forward pass reads each ``r`` twice (norms,
dots) and writes (C, J) tensors only; the backward reads it twice and writes one tensor of its size, its gradient.
With ``s`` the cosine, ``u = scale · g / (D(a) D(r))`` and ``w = scale · g · s / D(r)²``:

* ``∂/∂a[c] = Σ_r Σ_j u[c, j] r[c, j] - (Σ_r Σ_j scale · g[c, j] s[c, j]) / D(a[c])² · a[c]``,
* ``∂/∂r[c, j] = u[c, j] a[c] - w[c, j] r[c, j]``,

the radial terms (those with ``a[c]`` resp. ``r[c, j]``) only where the norm is not clamped. Half-precision rows
are computed in the anchors' dtype (float32) a block of anchors at a time (about 16 MB of float32 each), never as
a float32 copy of the whole tensor. Two ways in, one math:

* eager: :class:`_EagerCosineRows`, an ``autograd.Function`` (a recorded backward, for second derivatives,
  recomputes norms and dots from the inputs); under ``torch.func`` transforms :class:`_CosineRows`, the same with
  ``setup_context`` and ``generate_vmap_rule``;
* ``torch.compile``: :class:`_CosineRows` traced, its products written elementwise, which the compiler fuses into
  passes over ``r`` (traced as batched matrix products they became slower loops: 105 ms against 72 ms eager at
  N=4096, M=64, d=128 on 2 CPU threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import is_compiling, transformed

__all__: list[str] = []  # private module

_EPS = 1e-12  # F.normalize's default
_CAST_BLOCK = 1 << 22  # elements of r per block when half-precision rows are computed in float32 (16 MB)


def cosine_rows(a: torch.Tensor, rows: Sequence[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    """``scale * cos(a[c], r[c, j])`` (C, J) for ``a`` (C, d) and each ``r`` of ``rows`` (C, J, d), as given.

    ``rows``: one or two tensors (an anchor's positives, its own negatives). ``scale``: a number (``1/τ``), applied
    to the (C, J) outputs: no scaled (C, d) copy of the anchors.

    Example:
        >>> import torch
        >>> a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> p, n = torch.tensor([[[1.0, 1.0]], [[0.0, 5.0]]]), torch.tensor([[[3.0, 4.0]], [[0.0, -2.0]]])
        >>> [s.squeeze(1) for s in cosine_rows(a, [p, n])]
        [tensor([0.7071, 1.0000]), tensor([ 0.6000, -1.0000])]
    """
    if not 1 <= len(rows) <= 2:
        raise ValueError(f"`rows` must hold one or two tensors (positives, negatives); got {len(rows)}")
    fn = _CosineRows if is_compiling() or transformed() else _EagerCosineRows
    out = fn.apply(scale, a, *rows, *[None] * (2 - len(rows)))  # type: ignore[no-untyped-call]
    return list(out[: len(rows)])


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x / max(‖x‖, eps)`` over the last dim, ``F.normalize``'s rule, with a backward of one pass in eager mode.

    ``F.normalize``'s backward goes through the division, the clamp and the norm (five temporaries of x's size);
    here ``∂/∂x = (g - y <g, y>) / den`` (``<g, y>`` not subtracted where the norm is clamped). Compiled and under
    torch.func transforms it is ``F.normalize`` itself.

    Example:
        >>> import torch
        >>> unit(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    if is_compiling() or transformed():
        return F.normalize(x, dim=-1)
    return _EagerUnit.apply(x)  # type: ignore[no-untyped-call,no-any-return]


class _EagerUnit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        ctx.save_for_backward(x, norm)  # not y: the caller may let it go (the in-batch pool is a copy of its parts)
        y: torch.Tensor = x / norm.clamp_min(_EPS)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # recorded (create_graph): the norm as a function of x
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv = norm.clamp_min(_EPS).reciprocal()  # (..., 1)
        # (g - y <g, y>) / den with y = x / den: g / den - x <g, x> / den³, two tensors of x's size written (five
        # through y); glibc returns freed heap tops to the system, and each fresh temporary page-faults again.
        c = torch.where(norm > _EPS, (g * x).sum(-1, keepdim=True), 0.0) * inv.pow(3)  # (..., 1)
        grad: torch.Tensor = g * inv
        return torch.addcmul(grad, x, c, value=-1) if torch.is_grad_enabled() else grad.addcmul_(x, c, value=-1)


def _in_place() -> bool:
    """Whether the backward may write into its own fresh tensors: not recorded (create_graph), not batched (vmap)."""
    return not transformed() and (is_compiling() or not torch.is_grad_enabled())


def _forward(scale: float, a: torch.Tensor, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(*s, norm of a, *norms, *dots)``: ``s``, norms and raw dots (C, J) per ``r``, in ``a``'s dtype."""
    norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)  # (C, 1)
    den = norm.clamp_min(_EPS)
    den = den if scale == 1.0 else den / scale
    parts = [_norms_dots(a, r) for r in rows]
    s = [dots / (n.clamp_min(_EPS) * den) for n, dots in parts]
    return (*s, norm, *(n for n, _ in parts), *(dots for _, dots in parts))


def _norms_dots(a: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, J) norms of ``r`` and its dots with ``a``; half-precision ``r`` cast a block of anchors at a time."""
    if r.dtype == a.dtype:
        return _norms_dots_block(a, r)
    parts = [_norms_dots_block(ab, rb.to(a.dtype)) for ab, rb in zip(*_anchor_blocks(a, r), strict=True)]
    return torch.cat([n for n, _ in parts]), torch.cat([d for _, d in parts])


def _norms_dots_block(a: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(r, dim=-1)
    # Compiled, or one or two rows per anchor (a positive): elementwise (the compiler fuses it with the norms: one
    # pass); else (C, 1, d) x (C, d, J), a batched product twice as fast as (C, J, d) x (C, d, 1) on 2 CPU threads,
    # which writes no (C, J, d) temporary (eager, such a fresh temporary costs more in page faults than the product).
    elementwise = r.shape[1] <= 2 or is_compiling()
    dots = (r * a[:, None, :]).sum(-1) if elementwise else torch.matmul(a[:, None, :], r.mT).squeeze(1)
    return norm, dots


def _anchor_blocks(a: torch.Tensor, r: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``a`` and ``r`` split into blocks of anchors whose rows hold about ``_CAST_BLOCK`` elements."""
    size = max(1, _CAST_BLOCK // max(1, r.shape[1] * r.shape[2]))
    return a.split(size), r.split(size)


def _backward(
    grads: Sequence[torch.Tensor | None],
    scale: float,
    a: torch.Tensor,
    rows: Sequence[torch.Tensor],
    norm: torch.Tensor,
    norms: Sequence[torch.Tensor],
    dots: Sequence[torch.Tensor],
    want: Sequence[bool],
) -> list[torch.Tensor | None]:
    """``[∂/∂a, *∂/∂rows]`` for the gradients ``grads`` (C, J) of the outputs; None where ``want`` says so."""
    in_place, den = _in_place(), norm.clamp_min(_EPS)  # (C, 1)
    ga, radial = None, None  # (C, d), and (C, 1) Σ_j scale · g · s over every row
    out: list[torch.Tensor | None] = []
    # Last to first: the positives (one row, after the negatives) add into the negatives' ∂a in place.
    for g, r, n, d, need in reversed(list(zip(grads, rows, norms, dots, want[1:], strict=True))):
        if g is None or not (want[0] or need):  # (None: the output reached no loss, eager)
            out.append(None)
            continue
        den_r = n.clamp_min(_EPS)
        u = (g if scale == 1.0 else g * scale) / (den_r * den)  # (C, J)
        gs = u * d  # scale · g · s
        radial = gs.sum(-1, keepdim=True) if radial is None else radial + gs.sum(-1, keepdim=True)
        w = torch.where(n > _EPS, gs / den_r.square(), 0.0) if need else None  # (C, J) none where clamped
        ga, gr = _rows_backward(u, w, a, r, ga, want[0], in_place)
        out.append(gr)
    if ga is not None:
        assert radial is not None
        c = torch.where(norm > _EPS, radial, 0.0) / den.square()  # (C, 1)
        ga = ga.addcmul_(a, c, value=-1) if in_place else torch.addcmul(ga, a, c, value=-1)
    return [ga, *reversed(out)]


def _rows_backward(
    u: torch.Tensor,
    w: torch.Tensor | None,
    a: torch.Tensor,
    r: torch.Tensor,
    ga: torch.Tensor | None,
    want_a: bool,
    in_place: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(ga + Σ_j u r, u ⊗ a - w r)`` for one ``r``; ``ga`` None: the first term alone; ``w`` None: no ``∂/∂r``.

    Half-precision ``r``: block by block in ``a``'s dtype, each block's ``∂/∂r`` written into ``r``'s dtype.
    """
    if r.dtype == a.dtype:
        gr = None if w is None else _rows_grad(u, w, a, r, in_place)
        return _anchor_grad(u, r, ga, in_place) if want_a else ga, gr
    sizes = [b.shape[0] for b in _anchor_blocks(a, r)[0]]
    blocks = list(zip(u.split(sizes), a.split(sizes), r.split(sizes), strict=True))
    if want_a:
        part = torch.cat([_anchor_grad(ub, rb.to(a.dtype), None, in_place) for ub, _, rb in blocks])
        ga = part if ga is None else ga.add_(part) if in_place else ga + part
    if w is None:
        return ga, None
    grads = zip(blocks, w.split(sizes), strict=True)
    parts = [_rows_grad(ub, wb, ab, rb.to(a.dtype), in_place) for (ub, ab, rb), wb in grads]
    if not in_place:
        return ga, torch.cat([x.to(r.dtype) for x in parts])
    gr = torch.empty_like(r)
    for block, x in zip(gr.split(sizes), parts, strict=True):
        block.copy_(x)
    return ga, gr


def _anchor_grad(u: torch.Tensor, r: torch.Tensor, ga: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """``ga + Σ_j u[c, j] r[c, j]`` (C, d), into ``ga`` where it may be written; one row: no (C, 1, d) temporary."""
    if r.shape[1] == 1:
        if ga is None:
            return r[:, 0] * u
        return ga.addcmul_(r[:, 0], u) if in_place else torch.addcmul(ga, r[:, 0], u)
    if r.shape[1] == 2 or is_compiling():  # (elementwise, not C batched (1, J) x (J, d))
        part = (r * u[..., None]).sum(1)
        return part if ga is None else ga.add_(part) if in_place else ga + part
    if ga is None:
        return torch.matmul(u[:, None, :], r).squeeze(1)
    if in_place:
        ga[:, None, :].baddbmm_(u[:, None, :], r)
        return ga
    return torch.baddbmm(ga[:, None, :], u[:, None, :], r).squeeze(1)


def _rows_grad(u: torch.Tensor, w: torch.Tensor, a: torch.Tensor, r: torch.Tensor, in_place: bool) -> torch.Tensor:
    gr = u[..., None] * a[:, None, :]  # (C, J, d): the one tensor of r's size written; -w r is added in place
    if in_place:
        return gr.addcmul_(r, w[..., None], value=-1)
    return torch.addcmul(gr, r, w[..., None], value=-1)


class _CosineRows(torch.autograd.Function):
    """For torch.func transforms: ``setup_context`` and a generated vmap rule.

    A fixed signature, ``second`` None for one rows tensor: Dynamo binds a variadic ``forward`` wrongly when no
    input needs a gradient (torch 2.13: the scale is taken for the anchors).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        scale: float, a: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        return _forward(scale, a, [first] if second is None else [first, second])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        # s is not saved: the caller may change it in place (a mask, a fill)
        rows = [x for x in inputs[2:] if x is not None]
        ctx.save_for_backward(inputs[1], *rows, *output[len(rows) :])
        ctx.scale, ctx.count = inputs[0], len(rows)
        ctx.mark_non_differentiable(*output[len(rows) :])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        count, (a, *rest) = ctx.count, ctx.saved_tensors
        rows, aux = rest[:count], rest[count:]  # aux: (norm of a, *norms, *dots)
        if torch.is_grad_enabled():  # recorded (create_graph): norms and dots as functions of the inputs
            aux = list(_forward(1.0, a, rows)[count:])
        norm, norms, dots = aux[0], aux[1 : count + 1], aux[count + 1 :]
        want = ctx.needs_input_grad[1 : 2 + count]
        out = _backward(grads[:count], ctx.scale, a, rows, norm, norms, dots, want)
        return (None, *out, *[None] * (2 - count))


class _EagerCosineRows(_CosineRows):
    """Eager mode: the same, with ``forward(ctx, ...)``, whose ``apply`` binds no signature (0.05 ms a call)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, scale: float, a: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        output = _forward(scale, a, [first] if second is None else [first, second])
        _CosineRows.setup_context(ctx, (scale, a, first, second), output)
        ctx.set_materialize_grads(False)  # the norms' and dots' gradients stay None, not zeros made for nothing
        return output

    setup_context = torch.autograd.Function.setup_context  # not defined: the old calling convention
