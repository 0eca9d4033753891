"""Forward-mode AD through the loss: ``torch.func.jvp``/``jacfwd``/``hessian`` and eager ``forward_ad``.

Every expected value is independent of the code under test's forward rules: a first-order tangent is checked against
``Σ grad · v`` with ``grad`` from reverse mode (which test_fused.py checks against the float64 loop formula), a
second derivative against a plain-torch float64 formula of the same loss (``F.normalize``, ``logsumexp``) or
tests/formula.py's loop, differentiated by autograd. The fused functions alone are checked by ``gradcheck`` with
``check_forward_ad`` (finite differences), and at zero rows, where finite differences cannot see the clamped norm,
against forward AD of ``F.normalize``'s formula.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import F64, batch, formula, gen, leaves, randn
from torch.testing import assert_close

import pml_triplets as pt
from pml_triplets import _blocks, _fused

TAU = 0.3
TOL = {"rtol": 1e-10, "atol": 1e-10}
TOL2 = {"rtol": 1e-8, "atol": 1e-8}  # second derivatives


class Case(NamedTuple):
    """One configuration of ``infonce``: which inputs and options, and which eager Functions it must reach."""

    k: int = 1  # positives per anchor
    mask: bool = False  # negatives_mask
    shared: bool = False  # shared_negatives, differentiated like the others
    in_batch: bool = False
    lse: bool = False  # every log-sum-exp block through _LogSumExp (_SMALL_BLOCK lowered, not big tensors)


CASES = {
    "default": Case(),
    "mask": Case(mask=True),
    "K=2": Case(k=2),
    "shared": Case(shared=True),
    "lse-block": Case(mask=True, lse=True),
    "in_batch": Case(in_batch=True),
}
FUNC = ["default", "mask", "K=2", "shared"]  # (torch.func: _LogSumExp and unit's Function are eager-only paths)
EAGER = ["default", "mask", "K=2", "shared", "lse-block", "in_batch"]
# The eager Functions each case must go through (the spy below records them).
REACHES = {"shared": {"rows", "unit"}, "lse-block": {"rows", "lse"}, "in_batch": {"unit"}}


def problem(case: Case, n: int = 4, m: int = 3, d: int = 5, seed: int = 0) -> tuple[list[torch.Tensor], Any]:
    """The differentiated inputs (a, p, n[, shared]) of a random float64 batch, and the loss as a function of them."""
    b = batch(n, m, d, k=case.k, s=2, seed=seed)
    primals = [b["anchors"], b["positives"], b["negatives"], *([b["shared_negatives"]] if case.shared else [])]
    mask = b["negatives_mask"] if case.mask else None

    def loss(*xs: torch.Tensor) -> torch.Tensor:
        shared = xs[3] if case.shared else None
        return pt.infonce(
            *xs[:3], negatives_mask=mask, shared_negatives=shared, in_batch=case.in_batch, temperature=TAU
        )

    return primals, loss


def tangents(primals: list[torch.Tensor], seed: int = 99) -> list[torch.Tensor]:
    g = gen(seed)
    return [randn(g, *x.shape) for x in primals]


def reverse_dot(loss: Any, primals: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """``Σ grad · v``, the gradient from reverse mode."""
    xs = leaves(*primals)
    grads = torch.autograd.grad(loss(*xs), xs)
    return sum((g * v).sum() for g, v in zip(grads, vs, strict=True))  # type: ignore[return-value]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blocks, "_SMALL_BLOCK", 4)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names of the eager Functions applied ("rows", "unit", "lse"): each replaced by a subclass that records it."""
    seen: set[str] = set()
    for module, attr, name in [
        (_fused, "_EagerCosineRows", "rows"),
        (_fused, "_EagerUnit", "unit"),
        (_blocks, "_LogSumExp", "lse"),
    ]:
        base = getattr(module, attr)

        def forward(ctx: Any, *args: Any, base: Any = base, name: str = name) -> Any:
            seen.add(name)
            return base.forward(ctx, *args)

        monkeypatch.setattr(module, attr, type(attr, (base,), {"forward": staticmethod(forward)}))
    return seen


def setup(name: str, request: pytest.FixtureRequest) -> Case:
    case = CASES[name]
    if case.lse:
        request.getfixturevalue("small_blocks")
    return case


# ------------------------------------------------------------------------------------------- torch.func, first order


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize("name", FUNC)
def test_func_jvp_equals_reverse_mode(name: str, request: pytest.FixtureRequest) -> None:
    primals, loss = problem(setup(name, request))
    vs = tangents(primals)
    value, tangent = torch.func.jvp(loss, tuple(primals), tuple(vs))
    assert_close(value, loss(*primals), **TOL)
    assert_close(tangent, reverse_dot(loss, primals, vs), **TOL)


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize("name", FUNC)
def test_func_jacfwd_equals_jacrev(name: str, request: pytest.FixtureRequest) -> None:
    primals, loss = problem(setup(name, request))
    argnums = tuple(range(len(primals)))
    forward = torch.func.jacfwd(loss, argnums=argnums)(*primals)
    reverse = torch.func.jacrev(loss, argnums=argnums)(*primals)
    xs = leaves(*primals)
    grads = torch.autograd.grad(loss(*xs), xs)
    for f, r, g in zip(forward, reverse, grads, strict=True):
        assert_close(f, r, **TOL)
        assert_close(f, g, **TOL)


@pytest.mark.parametrize("way", ["func", "eager"])
def test_jvp_of_one_input_alone(way: str) -> None:
    # Tangents for the negatives only: the anchors and positives enter the jvp without one (None).
    primals, loss = problem(CASES["mask"])
    v = tangents(primals)[2]

    def of_negatives(neg: torch.Tensor) -> torch.Tensor:
        return loss(primals[0], primals[1], neg)  # type: ignore[no-any-return]

    if way == "func":
        _, tangent = torch.func.jvp(of_negatives, (primals[2],), (v,))
    else:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(of_negatives(fwAD.make_dual(primals[2], v))).tangent
    zeros = [torch.zeros_like(x) for x in primals[:2]]
    assert_close(tangent, reverse_dot(loss, primals, [*zeros, v]), **TOL)


# ------------------------------------------------------------------------------------------ second order, the formula


def plain_loss(case: Case, mask: torch.Tensor | None, *xs: torch.Tensor) -> torch.Tensor:
    """The loss written with F.normalize and logsumexp, float64: mean over (i, k) of lse(pos, negatives) - pos."""
    a, p, n = (F.normalize(x, dim=-1) for x in xs[:3])
    p = p if case.k > 1 else p[:, None]  # (N, K, d)
    pos = torch.einsum("nkd,nd->nk", p, a) / TAU  # (N, K)
    neg = torch.einsum("nmd,nd->nm", n, a) / TAU  # (N, M)
    if mask is not None:
        neg = neg.masked_fill(~mask, float("-inf"))
    if case.shared:
        neg = torch.cat([neg, a @ F.normalize(xs[3], dim=-1).T / TAU], 1)  # (N, M + S)
    logits = torch.cat([pos[..., None], neg[:, None, :].expand(-1, pos.shape[1], -1)], -1)  # (N, K, 1 + M + S)
    return (torch.logsumexp(logits, -1) - pos).mean()


def flat(case: Case) -> tuple[torch.Tensor, Any, Any]:
    """A tiny problem as one vector x, the library's loss of x, and the plain formula's loss of x."""
    primals, loss = problem(case, n=3, m=2, d=3, seed=5)
    mask = batch(3, 2, 3, k=case.k, s=2, seed=5)["negatives_mask"] if case.mask else None
    shapes = [x.shape for x in primals]
    sizes = [x.numel() for x in primals]

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [part.reshape(shape) for part, shape in zip(x.split(sizes), shapes, strict=True)]

    return (
        torch.cat([x.reshape(-1) for x in primals]),
        lambda x: loss(*split(x)),
        lambda x: plain_loss(case, mask, *split(x)),
    )


def func_hessian(kind: str, f: Any, x: torch.Tensor) -> torch.Tensor:
    if kind == "hessian":  # jacfwd(jacrev(f)): forward over reverse
        return torch.func.hessian(f)(x)  # type: ignore[no-any-return]
    if kind == "hessian-no-grad":  # the backward then runs with grad mode off: no recorded graph to lean on
        with torch.no_grad():
            return torch.func.hessian(f)(x)  # type: ignore[no-any-return]
    if kind == "jacrev(jacfwd)":  # reverse over forward: the jvp's own derivative
        return torch.func.jacrev(torch.func.jacfwd(f))(x)  # type: ignore[no-any-return]
    assert kind == "jacfwd(jacfwd)"  # forward over forward
    return torch.func.jacfwd(torch.func.jacfwd(f))(x)  # type: ignore[no-any-return]


@pytest.mark.sweep(fast=3)
@pytest.mark.parametrize("kind", ["hessian", "hessian-no-grad", "jacrev(jacfwd)", "jacfwd(jacfwd)"])
@pytest.mark.parametrize("name", FUNC)
def test_func_hessian_equals_the_formula(name: str, kind: str) -> None:
    x, loss, plain = flat(CASES[name])
    assert_close(loss(x), plain(x), **TOL)
    expected = torch.autograd.functional.hessian(plain, x)
    assert_close(func_hessian(kind, loss, x), expected, **TOL2)


# ----------------------------------------------------------------------------------------------- eager forward AD


@pytest.mark.parametrize("name", EAGER)
def test_eager_forward_ad_equals_reverse_mode(name: str, request: pytest.FixtureRequest, spy: set[str]) -> None:
    primals, loss = problem(setup(name, request))
    vs = tangents(primals)
    with fwAD.dual_level():
        out = loss(*(fwAD.make_dual(x, v) for x, v in zip(primals, vs, strict=True)))
        value, tangent = fwAD.unpack_dual(out)
    assert spy >= REACHES.get(name, {"rows"}), spy
    assert tangent is not None
    assert_close(value, loss(*primals), **TOL)
    assert_close(tangent, reverse_dot(loss, primals, vs), **TOL)


def eager_hvp(mode: str, loss: Any, primals: list[torch.Tensor], vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` by eager forward AD over a backward, or a backward through the tangent."""
    xs = leaves(*primals)
    with fwAD.dual_level():
        out = loss(*(fwAD.make_dual(x, v) for x, v in zip(xs, vs, strict=True)))
        if mode == "reverse(tangent)":
            return list(torch.autograd.grad(fwAD.unpack_dual(out).tangent, xs))
        assert mode == "forward(grad)"  # the backward itself runs on dual tensors, its graph not recorded
        return [fwAD.unpack_dual(g).tangent for g in torch.autograd.grad(out, xs)]


# reverse(tangent) only through _LogSumExp: torch.logsumexp's and cross_entropy's own forward rules cannot be
# differentiated in reverse in eager mode (torch 2.13: "modified by an inplace operation", output 0 of Exp).
@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize(
    ("name", "mode"),
    [(name, "forward(grad)") for name in ("default", "shared", "lse-block", "in_batch")]
    + [("lse-block", "reverse(tangent)")],
)
def test_eager_second_order_equals_the_formula(
    name: str, mode: str, request: pytest.FixtureRequest, spy: set[str]
) -> None:
    case = setup(name, request)
    primals, loss = problem(case, n=3, m=2, d=3, seed=6)
    mask = batch(3, 2, 3, k=case.k, s=2, seed=6)["negatives_mask"] if case.mask else None
    vs = tangents(primals)
    got = eager_hvp(mode, loss, primals, vs)
    assert spy >= REACHES.get(name, {"rows"}), spy

    def reference(*xs: torch.Tensor) -> torch.Tensor:
        return formula(  # type: ignore[no-any-return]
            *xs[:3],
            TAU,
            negatives_mask=mask,
            shared_negatives=xs[3] if case.shared else None,
            in_batch=case.in_batch,
        )

    _, expected = torch.autograd.functional.hvp(reference, tuple(primals), tuple(vs))
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, **TOL2)


# ---------------------------------------------------------------------------------------------- the Functions alone


def unit_rows(seed: int, c: int = 4, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a (C, d), p (C, 1, d), n (C, 3, d) of norms near 1 (finite differences stay accurate)."""
    g = gen(seed)
    a, p, n = randn(g, c, d), randn(g, c, 1, d), randn(g, c, 3, d)
    return tuple(F.normalize(x, dim=-1) * (1 + 0.5 * torch.rand(*x.shape[:-1], 1, generator=g)) for x in (a, p, n))


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cosine_rows_gradcheck_forward_ad(scale: float) -> None:
    # check_batched_forward_grad: the jvp under vmap (_TransformedCosineRows and its generated vmap rule)
    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_fused.cosine_rows(a, [p, n], scale))

    def one(a: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:  # one rows tensor
        return tuple(_fused.cosine_rows(a, [n], scale))

    x = tuple(leaves(*unit_rows(1)))
    assert torch.autograd.gradcheck(f, x, check_forward_ad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradcheck(one, x[::2], check_forward_ad=True)
    # forward over reverse: the backward's own tangents (the eager backward run on dual tensors)
    small = tuple(leaves(*unit_rows(2, c=2, d=3)))
    assert torch.autograd.gradgradcheck(
        f, small, check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False
    )


def test_unit_gradcheck_forward_ad() -> None:
    x = leaves(randn(gen(2), 4, 5))[0]
    assert torch.autograd.gradcheck(_fused.unit, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(
        _fused.unit, (x,), check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False
    )


def test_logsumexp_gradcheck_forward_ad() -> None:
    x = randn(gen(3), 2, 2, 4)
    x[1, 0] = 0.0  # a zero row
    lse = _blocks._LogSumExp.apply
    assert torch.autograd.gradcheck(lse, (leaves(x)[0],), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(
        lse, (leaves(x)[0],), check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False
    )


@pytest.mark.parametrize("fn", ["cosine_rows", "unit"])
def test_reverse_over_forward_equals_the_formula(fn: str) -> None:
    # The gradient of a tangent <J v, w> (eager: the jvp recorded) against the same of F.normalize's formula.
    a, p, n = unit_rows(9)
    if fn == "cosine_rows":
        xs = [a, p, n]

        def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
            return _fused.cosine_rows(a, [p, n], 2.0)

        def plain(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
            unit = F.normalize(a, dim=-1)[:, :, None]  # (C, d, 1)
            return [2.0 * (F.normalize(r, dim=-1) @ unit).squeeze(-1) for r in (p, n)]
    else:
        xs = [n]

        def f(n: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[misc]
            return [_fused.unit(n)]

        def plain(n: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[misc]
            return [F.normalize(n, dim=-1)]

    vs = tangents(xs)
    ws = [randn(gen(10 + i), *y.shape) for i, y in enumerate(plain(*xs))]

    def grad_of_tangent(g: Any) -> tuple[torch.Tensor, ...]:
        leaf = leaves(*xs)
        with fwAD.dual_level():
            out = g(*(fwAD.make_dual(x, v) for x, v in zip(leaf, vs, strict=True)))
            dot = sum((fwAD.unpack_dual(y).tangent * w).sum() for y, w in zip(out, ws, strict=True))
        return torch.autograd.grad(dot, leaf)

    for got, expected in zip(grad_of_tangent(f), grad_of_tangent(plain), strict=True):
        assert_close(got, expected, **TOL)


def test_zero_rows_follow_normalizes_forward_rule() -> None:
    # F.normalize's norm is clamped at eps: at a zero row its Jacobian is I / eps, which finite differences cannot see.
    # Both ways in (eager and torch.func) against forward AD of the same cosines written with F.normalize.
    a, p, n = unit_rows(4)
    n[1, 2] = 0.0
    a[2] = 0.0
    va, vp, vn = tangents([a, p, n])

    def plain(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unit = F.normalize(a, dim=-1)[:, :, None]  # (C, d, 1)
        return tuple(2.0 * (F.normalize(r, dim=-1) @ unit).squeeze(-1) for r in (p, n))

    def fused(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_fused.cosine_rows(a, [p, n], 2.0))

    _, expected = torch.func.jvp(plain, (a, p, n), (va, vp, vn))
    _, got = torch.func.jvp(fused, (a, p, n), (va, vp, vn))
    with fwAD.dual_level():
        out = fused(*(fwAD.make_dual(x, v) for x, v in zip((a, p, n), (va, vp, vn), strict=True)))
        eager = [fwAD.unpack_dual(s).tangent for s in out]
    for e, g, h in zip(expected, got, eager, strict=True):
        assert_close(g, e, **TOL)
        assert_close(h, e, **TOL)
    # the zero negative: ds = 2 <a, ṅ> / (‖a‖ eps); the zero anchor: ds = 2 <ȧ, r> / (eps ‖r‖)
    assert_close(got[1][1, 2], 2.0 * (a[1] @ vn[1, 2]) / (a[1].norm() * 1e-12), rtol=1e-12, atol=0.0)
    assert_close(got[1][2], 2.0 * (n[2] @ va[2]) / (n[2].norm(dim=-1) * 1e-12), rtol=1e-12, atol=0.0)


def test_unit_zero_row_forward_rule() -> None:
    x = randn(gen(5), 4, 5)
    x[2] = 0.0
    v = randn(gen(6), 4, 5)
    _, expected = torch.func.jvp(lambda x: F.normalize(x, dim=-1), (x,), (v,))
    with fwAD.dual_level():
        got = fwAD.unpack_dual(_fused.unit(fwAD.make_dual(x, v))).tangent
    assert_close(got, expected, **TOL)
    assert_close(got[2], v[2] / 1e-12, rtol=1e-12, atol=0.0)


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("way", ["eager", "func"])
def test_half_rows_forward_rule(dtype: torch.dtype, way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # float64 anchors and positives, half negatives cast two anchors at a time: the tangent of the weighted cosines
    # against reverse mode on the negatives' float64 values (half to float64 is exact).
    monkeypatch.setattr(_fused, "_CAST_BLOCK", 2 * 3 * 5)
    a, p, n = unit_rows(7)
    n = n.to(dtype)
    va, vp, vn = tangents([a, p, n])
    vn = vn.to(dtype)
    g = gen(8)
    w = [randn(g, 4, 1), randn(g, 4, 3)]

    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return sum((s * x).sum() for s, x in zip(_fused.cosine_rows(a, [p, n]), w, strict=True))  # type: ignore[return-value]

    if way == "func":
        _, got = torch.func.jvp(f, (a, p, n), (va, vp, vn))
    else:
        with fwAD.dual_level():
            got = fwAD.unpack_dual(f(*(fwAD.make_dual(x, v) for x, v in zip((a, p, n), (va, vp, vn), strict=True))))[1]
    assert got.dtype == F64
    assert_close(got, reverse_dot(f, [a, p, n.double()], [va, vp, vn.double()]), **TOL)
