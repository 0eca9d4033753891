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

the radial terms (those with ``a[c]`` resp. ``r[c, j]``) only where the norm is not clamped. The forward rule
(``jvp``, for ``torch.func.jvp``/``jacfwd``/``hessian`` and eager forward AD) is the derivative of the same formula:
``ds = scale (<ȧ, r> + <a, ṙ>) / (D(a) D(r)) - s (dD(a) / D(a) + dD(r) / D(r))``, ``dD(x) = <x, ẋ> / ‖x‖`` where
the norm is not clamped, else 0. Half-precision rows are computed in the anchors' dtype (float32) a block of anchors
at a time (about 16 MB of float32 each), never as a float32 copy of the whole tensor. Two ways in, one math:

* eager: ``_EagerCosineRows``, an ``autograd.Function`` (a backward or jvp that is itself differentiated, for
  second derivatives, recomputes norms and dots from the inputs); under ``torch.func`` transforms
  ``_TransformedCosineRows``, the same with ``setup_context`` and ``generate_vmap_rule`` (under two forward
  transforms, ``jacfwd(jacfwd(f))``, plain ops: torch.func drops a Function's outer tangents there);
* ``torch.compile``: ``_CosineRows``, the same without the forward rule (Dynamo traces no custom ``jvp``),
  traced, its products written elementwise, which the compiler fuses into passes over ``r`` (traced as batched
  matrix products they became slower loops: 105 ms against 72 ms eager at N=4096, M=64, d=128 on 2 CPU threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ._compat import is_compiling, nested_jvp, transformed

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
    fn: type[_CosineRows] = _EagerCosineRows
    if is_compiling():
        fn = _CosineRows
    elif transformed():
        if nested_jvp():  # torch.func drops the outer tangents of a Function's jvp (pytorch/pytorch#197867)
            return list(_forward(scale, a, rows)[: len(rows)])  # plain ops, differentiated by torch's own rules
        fn = _TransformedCosineRows
    out = fn.apply(scale, a, *rows, *[None] * (2 - len(rows)))  # type: ignore[no-untyped-call]
    return list(out[: len(rows)])


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x / max(‖x‖, eps)`` over the last dim, ``F.normalize``'s rule, with a backward of one pass in eager mode.

    ``F.normalize``'s backward goes through the division, the clamp and the norm (five temporaries of x's size);
    here ``∂/∂x = (g - y <g, y>) / den`` (``<g, y>`` not subtracted where the norm is clamped), and the forward rule
    is the same map of ``ẋ`` (the Jacobian is symmetric). Compiled and under torch.func transforms it is
    ``F.normalize`` itself.

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
        ctx.save_for_forward(x, norm)
        y: torch.Tensor = x / norm.clamp_min(_EPS)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        return _unit_jacobian(x, norm, g, _differentiated_backward())

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        return _unit_jacobian(x, norm, t, _differentiated_jvp(x))


def _unit_jacobian(x: torch.Tensor, norm: torch.Tensor, v: torch.Tensor, differentiated: bool) -> torch.Tensor:
    """``J v`` with ``J = (I - y yᵀ) / den`` the Jacobian of ``unit`` at ``x``: symmetric, the backward's and the jvp's.

    ``differentiated``: the result is itself differentiated (recorded, or under forward AD), so the norm is taken
    again as a function of ``x`` and nothing is written in place.
    """
    if differentiated:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv = norm.clamp_min(_EPS).reciprocal()  # (..., 1)
    # (v - y <v, y>) / den with y = x / den: v / den - x <v, x> / den³, two tensors of x's size written (five
    # through y); glibc returns freed heap tops to the system, and each fresh temporary page-faults again.
    c = torch.where(norm > _EPS, (v * x).sum(-1, keepdim=True), 0.0) * inv.pow(3)  # (..., 1)
    out: torch.Tensor = v * inv
    return torch.addcmul(out, x, c, value=-1) if differentiated else out.addcmul_(x, c, value=-1)


def _differentiated_backward() -> bool:
    """Whether a backward's result is itself differentiated: recorded, under a torch.func transform, or forward AD.

    Then it reads the forward's norms as functions of the inputs: the saved ones are constants, with neither a graph
    nor a tangent. Recorded: ``create_graph``; ``hessian`` is a forward transform over the backward; an eager
    forward-AD level runs it on dual tensors.
    """
    if is_compiling():  # (Dynamo traces a backward under a transform of its own; it traces no forward AD)
        return torch.is_grad_enabled()
    return torch.is_grad_enabled() or transformed() or fwAD._current_level >= 0


def _differentiated_jvp(*inputs: torch.Tensor) -> bool:
    """Whether a jvp's result is itself differentiated: under a torch.func transform, or recorded for ``inputs``.

    (``jacrev(jacfwd(f))``, or an eager backward through a tangent.)
    """
    return transformed() or (torch.is_grad_enabled() and any(x.requires_grad for x in inputs))


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
    return torch.linalg.vector_norm(r, dim=-1), _dots(a, r)


def _dots(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(C, J) ``<a[c], r[c, j]>``."""
    # Compiled, or one or two rows per anchor (a positive): elementwise (the compiler fuses it with the norms: one
    # pass); else (C, 1, d) x (C, d, J), a batched product twice as fast as (C, J, d) x (C, d, 1) on 2 CPU threads,
    # which writes no (C, J, d) temporary (eager, such a fresh temporary costs more in page faults than the product).
    if r.shape[1] <= 2 or is_compiling():
        return (r * a[:, None, :]).sum(-1)
    return torch.matmul(a[:, None, :], r.mT).squeeze(1)


def _anchor_blocks(a: torch.Tensor, r: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``a`` and ``r`` split into blocks of anchors whose rows hold about ``_CAST_BLOCK`` elements."""
    size = _block_size(r)
    return a.split(size), r.split(size)


def _block_size(r: torch.Tensor) -> int:
    return max(1, _CAST_BLOCK // max(1, r.shape[1] * r.shape[2]))


def _jvp(
    scale: float,
    a: torch.Tensor,
    ta: torch.Tensor | None,
    rows: Sequence[torch.Tensor],
    trows: Sequence[torch.Tensor | None],
    norm: torch.Tensor,
    norms: Sequence[torch.Tensor],
    dots: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """The tangents of the (C, J) outputs ``s`` for the tangents ``ta`` of ``a`` and ``trows`` of ``rows`` (None: none).

    With ``dD(x) = <x, ẋ> / ‖x‖`` where the norm is not clamped, else 0:
    ``ds = scale (<ȧ, r> + <a, ṙ>) / (D(a) D(r)) - s (dD(a) / D(a) + dD(r) / D(r))``.
    """
    den = norm.clamp_min(_EPS)  # (C, 1)
    # rel_x = dD(x) / D(x): (C, 1) for a, (C, J) for r
    rel_a = None if ta is None else torch.where(norm > _EPS, (a * ta).sum(-1, keepdim=True), 0.0) / den.square()
    out: list[torch.Tensor] = []
    for r, tr, n, d in zip(rows, trows, norms, dots, strict=True):
        if ta is None and tr is None:  # (zeros, not None: with materialize_grads off, torch 2.13 asserts on None)
            out.append(torch.zeros_like(d))
            continue
        rr, dd = _tangent_dots(a, ta, r, tr)  # (C, J): <r, ṙ> (None without ṙ), <ȧ, r> + <a, ṙ>
        den_r = n.clamp_min(_EPS)
        rel_r = None if rr is None else torch.where(n > _EPS, rr, 0.0) / den_r.square()
        out.append((dd - d * _total(rel_a, rel_r)) * (scale / (den_r * den)))
    return out


def _total(*xs: torch.Tensor | None) -> torch.Tensor:
    """The sum of those not None (one at least)."""
    parts = [x for x in xs if x is not None]
    return sum(parts[1:], start=parts[0])


def _tangent_dots(
    a: torch.Tensor, ta: torch.Tensor | None, r: torch.Tensor, tr: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(C, J) ``<r, ṙ>`` (None without ``ṙ``) and ``<ȧ, r> + <a, ṙ>`` (one tangent at least), in ``a``'s dtype.

    Half-precision ``r`` and ``ṙ`` are cast a block of anchors at a time, as in the forward.
    """
    if r.dtype == a.dtype:
        return _tangent_dots_block(a, ta, r, tr)
    size = _block_size(r)
    blocks = [[None] * -(-a.shape[0] // size) if x is None else x.split(size) for x in (a, ta, r, tr)]
    parts = [
        _tangent_dots_block(ab, tab, rb.to(a.dtype), None if trb is None else trb.to(a.dtype))
        for ab, tab, rb, trb in zip(*blocks, strict=True)
    ]
    rr = [x for x, _ in parts if x is not None]
    return torch.cat(rr) if rr else None, torch.cat([dd for _, dd in parts])


def _tangent_dots_block(
    a: torch.Tensor, ta: torch.Tensor | None, r: torch.Tensor, tr: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    rr = None if tr is None else (r * tr).sum(-1)
    return rr, _total(None if ta is None else _dots(ta, r), None if tr is None else _dots(a, tr))


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


_Saved = tuple[int, torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def _saved(ctx: Any, forward_ad: bool) -> _Saved:
    """``(count, a, rows, norm of a, norms, dots)`` as ``setup_context`` saved them, for the backward or the jvp.

    The norms and dots are computed again from the inputs where the result is itself differentiated.
    """
    count, (a, *rest) = ctx.count, ctx.saved_tensors
    rows, aux = rest[:count], rest[count:]
    if _differentiated_jvp(a, *rows) if forward_ad else _differentiated_backward():
        aux = list(_forward(1.0, a, rows)[count:])
    return count, a, rows, aux[0], aux[1 : count + 1], aux[count + 1 :]


class _CosineRows(torch.autograd.Function):
    """Traced by torch.compile: ``setup_context``, a generated vmap rule, and no forward rule.

    Dynamo traces neither a custom ``jvp`` nor ``save_for_forward`` (torch 2.13). A fixed signature, ``second``
    None for one rows tensor: Dynamo binds a variadic ``forward`` wrongly when no input needs a gradient (torch 2.13:
    the scale is taken for the anchors).
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
        count, a, rows, norm, norms, dots = _saved(ctx, forward_ad=False)
        want = ctx.needs_input_grad[1 : 2 + count]
        out = _backward(grads[:count], ctx.scale, a, rows, norm, norms, dots, want)
        return (None, *out, *[None] * (2 - count))


class _TransformedCosineRows(_CosineRows):
    """Under torch.func transforms: the same with its forward rule."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        _CosineRows.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], *[x for x in inputs[2:] if x is not None], *output[ctx.count :])

    @staticmethod
    def jvp(ctx: Any, _: None, ta: torch.Tensor | None, *trows: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        count, a, rows, norm, norms, dots = _saved(ctx, forward_ad=True)
        ds = _jvp(ctx.scale, a, ta, rows, trows[:count], norm, norms, dots)
        return (*ds, *[None] * (1 + 2 * count))  # (the norms and dots: not differentiable)


class _EagerCosineRows(_TransformedCosineRows):
    """Eager mode: the same, with ``forward(ctx, ...)``, whose ``apply`` binds no signature (0.05 ms a call)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, scale: float, a: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        output = _forward(scale, a, [first] if second is None else [first, second])
        _TransformedCosineRows.setup_context(ctx, (scale, a, first, second), output)
        ctx.set_materialize_grads(False)  # the norms' and dots' gradients stay None, not zeros made for nothing
        return output

    setup_context = torch.autograd.Function.setup_context  # not defined: the old calling convention
