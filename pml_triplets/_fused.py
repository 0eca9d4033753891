"""The cosine similarity of each anchor with its own rows, normalizing the rows on the fly, with its own backward.

(And ``unit(x)``, ``F.normalize``'s rule with a one-pass backward, for every other tensor the engine normalizes.)

``unit_rows(q, r, scale)`` is ``scale * <q[c], r[c, j] / max(‖r[c, j]‖, eps)>``, (C, J) for ``q`` (C, d) and ``r``
(C, J, d): ``F.normalize``'s rule for ``r`` (``q`` is normalized by the caller; ``scale`` is 1/τ for a number τ, else
1 and τ is in ``q``). The per-anchor negatives
are the largest tensor of a call; through ``F.normalize`` and autograd they would be copied normalized, and the
backward would write three temporaries of their size. Here the forward pass reads ``r`` twice (norms, dots) and
writes (C, J) tensors only; the backward reads it twice and writes one tensor of its size, the gradient:

* ``∂/∂q[c] = Σ_j u[c, j] r[c, j]``,
* ``∂/∂r[c, j] = u[c, j] q[c] - u[c, j] <q[c], r[c, j]> / den[c, j]² · r[c, j]`` (the second term only where the
  norm is not clamped),

with ``u = scale · g / den`` and ``den = max(‖r‖, eps)``. Half-precision rows are computed in ``q``'s dtype (float32) a
block of anchors at a time (about 16 MB of float32 each), never as a float32 copy of the whole tensor. Two ways in,
one math:

* eager: :class:`_EagerUnitRows`, an ``autograd.Function`` (a recorded backward, for second derivatives,
  recomputes norms and dots from ``q`` and ``r``); under ``torch.func`` transforms :class:`_UnitRows`, the same
  with ``setup_context`` and ``generate_vmap_rule``;
* ``torch.compile``: :class:`_UnitRows` traced, its products written elementwise, which the compiler fuses into
  passes over ``r`` (traced as batched matrix products they became slower loops: 105 ms against 72 ms eager at
  N=4096, M=64, d=128 on 2 CPU threads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._validation import is_compiling, transformed

__all__: list[str] = []  # private module

_EPS = 1e-12  # F.normalize's default
_CAST_BLOCK = 1 << 22  # elements of r per block when half-precision rows are computed in float32 (16 MB)


def unit_rows(q: torch.Tensor, r: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(C, J) cosines-on-the-fly ``scale * <q[c], r[c, j]> / max(‖r[c, j]‖, eps)`` for ``q`` (C, d), ``r`` (C, J, d).

    ``scale``: a number (``1/τ``), applied to the (C, J) output: no scaled (C, d) copy of ``q`` and its backward.

    Example:
        >>> import torch
        >>> q, r = torch.eye(2), torch.tensor([[[3.0, 4.0]], [[0.0, -2.0]]])
        >>> unit_rows(q, r)
        tensor([[ 0.6000],
                [-1.0000]])
    """
    eager = not (is_compiling() or transformed())
    return (_EagerUnitRows if eager else _UnitRows).apply(q, r, scale)[0]  # type: ignore[no-untyped-call,no-any-return]


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


def _forward(q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, norms, dots)``, each (C, J) in ``q``'s dtype, ``dots`` unscaled; half-precision ``r`` cast by blocks."""
    if r.dtype == q.dtype:
        return _forward_block(q, r, scale)
    parts = [_forward_block(qb, rb.to(q.dtype), scale) for qb, rb in zip(*_anchor_blocks(q, r), strict=True)]
    s, norm, dots = (torch.cat(x) for x in zip(*parts, strict=True))
    return s, norm, dots


def _forward_block(q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(r, dim=-1)
    # Compiled, or one or two rows per anchor (a positive): elementwise (the compiler fuses it with the norms: one
    # pass); else (C, 1, d) x (C, d, J), a batched product twice as fast as (C, J, d) x (C, d, 1) on 2 CPU threads,
    # which writes no (C, J, d) temporary (eager, such a fresh temporary costs more in page faults than the product).
    elementwise = r.shape[1] <= 2 or is_compiling()
    dots = (r * q[:, None, :]).sum(-1) if elementwise else torch.matmul(q[:, None, :], r.mT).squeeze(1)
    s = dots / norm.clamp_min(_EPS)
    return (s if scale == 1.0 else s * scale), norm, dots


def _anchor_blocks(q: torch.Tensor, r: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``q`` and ``r`` split into blocks of anchors whose rows hold about ``_CAST_BLOCK`` elements."""
    size = max(1, _CAST_BLOCK // max(1, r.shape[1] * r.shape[2]))
    return q.split(size), r.split(size)


def _backward(
    g: torch.Tensor, q: torch.Tensor, r: torch.Tensor, norm: torch.Tensor, dots: torch.Tensor, want: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂q, ∂/∂r)`` for the gradient ``g`` (C, J) of the unscaled output; None where ``want`` says so.

    Half-precision ``r``: block by block in ``q``'s dtype, each block's ``∂/∂r`` written into ``r``'s dtype.
    """
    if r.dtype == q.dtype:
        return _backward_block(g, q, r, norm, dots, want)
    qs, rs = _anchor_blocks(q, r)
    sizes = [b.shape[0] for b in qs]
    blocks = zip(g.split(sizes), qs, rs, norm.split(sizes), dots.split(sizes), strict=True)
    parts = [_backward_block(gb, qb, rb.to(q.dtype), nb, db, want) for gb, qb, rb, nb, db in blocks]
    gq = torch.cat([x for x, _ in parts]) if want[0] else None  # type: ignore[misc]
    if not want[1]:
        return gq, None
    if transformed() or (torch.is_grad_enabled() and not is_compiling()):
        return gq, torch.cat([x.to(r.dtype) for _, x in parts])  # type: ignore[union-attr]
    gr = torch.empty_like(r)
    for part, (_, x) in zip(gr.split(sizes), parts, strict=True):
        part.copy_(x)
    return gq, gr


def _backward_block(
    g: torch.Tensor, q: torch.Tensor, r: torch.Tensor, norm: torch.Tensor, dots: torch.Tensor, want: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    den = norm.clamp_min(_EPS)
    u = g / den  # (C, J)
    gq = None
    if want[0]:  # (C, d); compiled or one or two rows per anchor: elementwise (not C batched (1, J) x (J, d))
        if r.shape[1] == 1:
            gq = r[:, 0] * u  # (no (C, 1, d) temporary summed over its one row)
        elif r.shape[1] == 2 or is_compiling():
            gq = (r * u[..., None]).sum(1)
        else:
            gq = torch.matmul(u[:, None, :], r).squeeze(1)
    if not want[1]:
        return gq, None
    w = torch.where(norm > _EPS, -u * dots / den.square(), 0.0)  # (C, J) the radial part; none where clamped
    gr = r * w[..., None]  # (C, J, d): the one tensor of r's size written; u ⊗ q is added to it in place
    if transformed() or (torch.is_grad_enabled() and not is_compiling()):  # no in-place batching rule; recorded
        return gq, torch.addcmul(gr, u[..., None], q[:, None, :])
    return gq, gr.addcmul_(u[..., None], q[:, None, :])


class _UnitRows(torch.autograd.Function):
    """For torch.func transforms: ``setup_context`` and a generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(q, r, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor, float], output: tuple[torch.Tensor, ...]
                      ) -> None:  # fmt: skip
        # s is not saved: the caller may change it in place (a mask, a fill)
        ctx.save_for_backward(*inputs[:2], *output[1:])
        ctx.scale = inputs[2]
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        q, r, norm, dots = ctx.saved_tensors
        if torch.is_grad_enabled():  # recorded (create_graph): norms and dots as functions of q and r
            norm, dots = _forward(q, r, 1.0)[1:]
        g = g if ctx.scale == 1.0 else g * ctx.scale
        return (*_backward(g, q, r, norm, dots, ctx.needs_input_grad[:2]), None)


class _EagerUnitRows(_UnitRows):
    """Eager mode: the same, with ``forward(ctx, ...)``, whose ``apply`` binds no signature (0.05 ms a call)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        output = _forward(q, r, scale)
        _UnitRows.setup_context(ctx, (q, r, scale), output)
        return output

    setup_context = torch.autograd.Function.setup_context  # not defined: the old calling convention
