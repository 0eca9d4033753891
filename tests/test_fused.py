"""The fused per-anchor cosine (``pml_triplets._fused.cosine_rows``) and the loss through it.

``cosine_rows(a, rows)[i][c, j] = <a[c], r_i[c, j]> / (max(‖a[c]‖, 1e-12) max(‖r_i[c, j]‖, 1e-12))`` is checked
against the same sums written loop by loop in float64 (values, and gradients by autograd of the loop), against
finite differences (gradcheck, gradgradcheck), against closed forms at zero rows, under ``torch.func`` and
``torch.compile(fullgraph=True)``. The loss with every per-anchor option the fused path serves is checked against
``tests/formula.py`` at 1e-10, gradients included, with a spy asserting that the fused path ran.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import DIST, batch, formula, gen, leaves, randn
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from torch.testing import assert_close

import pml_triplets as pt
from pml_triplets import _fused

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def loop_cosines(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(C, J): every cosine as explicit sums over coordinates, both norms clamped at 1e-12, float64, differentiable."""
    c, j, d = r.shape
    out = [[a.new_zeros(())] * j for _ in range(c)]
    for i in range(c):
        norm_a = torch.sqrt(sum(a[i, k] * a[i, k] for k in range(d)))
        for m in range(j):
            dot = sum(a[i, k] * r[i, m, k] for k in range(d))
            norm_r = torch.sqrt(sum(r[i, m, k] * r[i, m, k] for k in range(d)))
            out[i][m] = dot / (torch.clamp(norm_a, min=1e-12) * torch.clamp(norm_r, min=1e-12))
    return torch.stack([torch.stack(row) for row in out])


def problem(
    seed: int, js: tuple[int, ...] = (1, 3), c: int = 4, d: int = 5
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """a (C, d) and rows (C, J, d) for each J of ``js``, all of very different lengths; the outputs' weights (C, J)."""
    g = gen(seed)
    a = randn(g, c, d) * torch.logspace(-2, 2, c, dtype=F64)[:, None]
    rows = [randn(g, c, j, d) * torch.logspace(-3, 3, c * j, dtype=F64).reshape(c, j, 1) for j in js]
    return a, rows, [randn(g, c, j) for j in js]


def weighted(outputs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * w).sum() for x, w in zip(outputs, weights, strict=True))  # type: ignore[return-value]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Rows per anchor of each call of the fused forward (eager, torch.func and compiled paths all go through it)."""
    calls: list[tuple[int, ...]] = []
    real = _fused._forward

    def counted(scale: float, a: torch.Tensor, rows: Any) -> tuple[torch.Tensor, ...]:
        calls.append(tuple(r.shape[1] for r in rows))
        return real(scale, a, rows)

    monkeypatch.setattr(_fused, "_forward", counted)
    return calls


# ---------------------------------------------------------------------------------------------- cosine_rows alone

# Rows per anchor of each tensor: the backward runs last to first, each J through its own branch (1: a product with
# the one row, 2: elementwise, 3: a batched product), first into a fresh anchor gradient, then into it in place.
SHAPES = [(1,), (3,), (1, 3), (3, 2), (2, 1)]


@pytest.mark.parametrize(("js", "scale"), [(js, 1.0) for js in SHAPES] + [((1, 3), 1 / 0.07), ((2, 1), -3.0)])
def test_values_and_gradients_equal_the_loop(js: tuple[int, ...], scale: float) -> None:
    # scale: 1/τ applied to the (C, J) outputs inside the function (the loss passes it for a number τ)
    a, rows, w = problem(len(js) + int(scale), js)
    a1, *rows1 = leaves(a, *rows)
    got = _fused.cosine_rows(a1, rows1, scale)
    grads = torch.autograd.grad(weighted(got, w), (a1, *rows1))
    a2, *rows2 = leaves(a, *rows)
    want = [loop_cosines(a2, r) * scale for r in rows2]
    expected = torch.autograd.grad(weighted(want, w), (a2, *rows2))
    for x, y in zip(got, want, strict=True):
        assert_close(x, y, **TOL)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, **TOL)


def test_one_or_two_rows_tensors() -> None:
    a, rows, _ = problem(0, (1, 2, 3))
    with pytest.raises(ValueError, match="one or two tensors"):
        _fused.cosine_rows(a, rows)


@pytest.mark.slow
def test_compiled_without_gradients_equals_eager() -> None:
    # Dynamo traces the forward alone when no input needs a gradient (the fixed signature's reason).
    torch._dynamo.reset()
    a, rows, _ = problem(1)
    for count in (1, 2):
        compiled = torch.compile(_fused.cosine_rows, fullgraph=True, backend="aot_eager")(a, rows[:count], 2.0)
        for x, y in zip(compiled, _fused.cosine_rows(a, rows[:count], 2.0), strict=True):
            assert_close(x, y, **TOL)


@pytest.mark.slow  # (test_forward_ad's gradcheck of the same Function, backward included, is fast)
def test_gradcheck_and_gradgradcheck() -> None:
    a, rows, _ = problem(3, (1, 3))
    a, p, n = leaves(a / a.norm(dim=-1, keepdim=True), *(r / r.norm(dim=-1, keepdim=True) for r in rows))
    for scale in (1.0, 2.5):  # (unit-ish rows: finite differences stay accurate)

        def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, scale: float = scale) -> tuple[torch.Tensor, ...]:
            return tuple(_fused.cosine_rows(a, [p, n], scale))

        assert torch.autograd.gradcheck(f, (a, p, n))
        assert torch.autograd.gradgradcheck(f, (a, p, n))


def test_zero_rows_follow_normalizes_rule() -> None:
    # F.normalize maps a zero row to 0 and, its norm clamped at eps, has the Jacobian I / eps there: a zero row r
    # gets g * a / (‖a‖ eps), a zero anchor Σ_j g_j r_j / (eps ‖r_j‖); the others keep the usual gradients.
    a, (r,), (w,) = problem(4, (3,))
    r[1, 2] = 0.0
    a[2] = 0.0
    a1, r1 = leaves(a, r)
    (s,) = _fused.cosine_rows(a1, [r1])
    ga, gr = torch.autograd.grad((s * w).sum(), (a1, r1))
    assert s[1, 2] == 0.0
    assert (s[2] == 0.0).all()
    assert_close(gr[1, 2], w[1, 2] * a[1] / (a[1].norm() * 1e-12), rtol=1e-12, atol=0.0)
    assert_close(ga[2], (w[2, :, None] * r[2] / r[2].norm(dim=-1, keepdim=True)).sum(0) / 1e-12, rtol=1e-12, atol=0.0)
    a2, r2 = leaves(a, r)
    fn = torch.nn.functional.normalize
    s2 = (fn(r2, dim=-1) @ fn(a2, dim=-1)[:, :, None]).squeeze(-1)
    expected = torch.autograd.grad((s2 * w).sum(), (a2, r2))
    assert_close(ga, expected[0], **TOL)
    assert_close(gr, expected[1], **TOL)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]


@pytest.mark.parametrize("need", NEEDS)
def test_only_the_inputs_that_need_it_get_a_gradient(need: tuple[bool, bool, bool]) -> None:
    a, rows, w = problem(5)
    x = [t.clone().requires_grad_(flag) for t, flag in zip((a, *rows), need, strict=True)]
    weighted(_fused.cosine_rows(x[0], x[1:]), w).backward()
    assert [t.grad is not None for t in x] == list(need)
    a2, *rows2 = leaves(a, *rows)
    want = [loop_cosines(a2, r) for r in rows2]
    expected = torch.autograd.grad(weighted(want, w), (a2, *rows2))
    for t, e in zip(x, expected, strict=True):
        if t.grad is not None:
            assert_close(t.grad, e, **TOL)


def test_outputs_may_be_changed_in_place() -> None:
    # The loss masks logits in place; the backward must not read the outputs it returned.
    a, rows, w = problem(6)
    a1, *rows1 = leaves(a, *rows)
    got = _fused.cosine_rows(a1, rows1)
    got[1].masked_fill_(w[1] > 1.0, -1e30)
    grads = torch.autograd.grad(weighted([x.clamp_min(-5.0) for x in got], w), (a1, *rows1))
    a2, *rows2 = leaves(a, *rows)
    want = [loop_cosines(a2, r) for r in rows2]
    want[1] = want[1].masked_fill(w[1] > 1.0, -1e30)
    expected = torch.autograd.grad(weighted([x.clamp_min(-5.0) for x in want], w), (a2, *rows2))
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, **TOL)


def test_torch_func_grad_and_vmap_equal_the_loop() -> None:
    problems = [problem(10 + b) for b in range(3)]
    a_s = torch.stack([a for a, _, _ in problems])
    ps, ns = (torch.stack([rows[i] for _, rows, _ in problems]) for i in (0, 1))
    wp, wn = (torch.stack([w[i] for _, _, w in problems]) for i in (0, 1))
    scale = 1 / 0.3

    def rows(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_fused.cosine_rows(a, [p, n], scale))

    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
        return weighted(list(rows(a, p, n)), [wp, wn])

    values = torch.func.vmap(rows)(a_s, ps, ns)
    grads = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2)))(a_s, ps, ns, wp, wn)
    for b, (a, rs, w) in enumerate(problems):
        a1, *rows1 = leaves(a, *rs)
        want = [loop_cosines(a1, r) * scale for r in rows1]
        expected = torch.autograd.grad(weighted(want, w), (a1, *rows1))
        for i in range(2):
            assert_close(values[i][b], want[i], **TOL)
        for i in range(3):
            assert_close(grads[i][b], expected[i], **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rows_are_cast_block_by_block(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # float64 anchors and positives, half negatives split into blocks of 2 anchors: the loop on the negatives as
    # rounded to half, and their gradient rounded to half once (not accumulated in half).
    monkeypatch.setattr(_fused, "_CAST_BLOCK", 2 * 3 * 5)
    a, (p, n), w = problem(7, (1, 3), c=5)
    n = (n / n.norm(dim=-1, keepdim=True)).to(dtype)
    a1, p1, n1 = a.clone().requires_grad_(), p.clone().requires_grad_(), n.clone().requires_grad_()
    got = _fused.cosine_rows(a1, [p1, n1])
    grads = torch.autograd.grad(weighted(got, w), (a1, p1, n1))
    assert all(x.dtype == F64 for x in got)
    assert grads[2].dtype == dtype
    a2, p2, n2 = leaves(a, p, n.double())
    want = [loop_cosines(a2, p2), loop_cosines(a2, n2)]
    expected = torch.autograd.grad(weighted(want, w), (a2, p2, n2))
    for x, y in zip(got, want, strict=True):
        assert_close(x, y, **TOL)
    assert_close(grads[0], expected[0], **TOL)
    assert_close(grads[1], expected[1], **TOL)
    assert_close(grads[2], expected[2].to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-30)


def test_half_negatives_are_never_cast_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Through the loss: bfloat16 negatives reach the fused rows uncast and are cast two anchors at a time.
    monkeypatch.setattr(_fused, "_CAST_BLOCK", 2 * 4 * 5)
    seen: list[tuple[torch.dtype, int, int]] = []  # (dtype, rows per anchor, anchors) of each block
    real = _fused._norms_dots_block

    def spy_block(a: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((r.dtype, r.shape[1], r.shape[0]))
        return real(a, r)

    monkeypatch.setattr(_fused, "_norms_dots_block", spy_block)
    data, kw, _ = call("mask", dtype=torch.bfloat16)
    pt.infonce(*data, **kw).backward()
    negatives = [anchors for dtype, rows, anchors in seen if rows == 4]  # (the positives: float32 already, 1 row)
    assert {dtype for dtype, _, _ in seen} == {torch.float32}
    assert sum(negatives) == 6  # 6 anchors, 2 at a time
    assert max(negatives) == 2
    assert data[2].grad is not None
    assert data[2].grad.dtype == torch.bfloat16


def test_unit_equals_the_loop_and_normalizes_rule() -> None:
    # unit(x) = x / max(‖x‖, 1e-12), row by row: values and gradients against the loop (rows of very different
    # lengths and a zero row, whose Jacobian is I / eps as F.normalize's), then finite differences.
    _, (r,), _ = problem(8, (3,))
    x = r.reshape(-1, r.shape[-1]).clone()
    x[3] = 0.0
    w = randn(gen(9), *x.shape)
    x1 = x.clone().requires_grad_()
    y = _fused.unit(x1)
    (got,) = torch.autograd.grad((y * w).sum(), x1)
    x2 = x.clone().requires_grad_()
    norms = torch.stack([torch.sqrt(sum(row[k] * row[k] for k in range(x.shape[1]))) for row in x2])
    want = x2 / torch.clamp(norms, min=1e-12)[:, None]
    (expected,) = torch.autograd.grad((want * w).sum(), x2)
    assert_close(y, want, **TOL)
    rows = torch.arange(x.shape[0]) != 3  # (the loop's sqrt has no derivative at 0: the zero row by its closed form)
    assert_close(got[rows], expected[rows], rtol=1e-10, atol=1e-10)
    assert_close(got[3], w[3] / 1e-12, rtol=1e-12, atol=0.0)
    moderate = randn(gen(10), 4, 5).requires_grad_()  # (norms near 2: finite differences stay accurate)
    assert torch.autograd.gradcheck(_fused.unit, (moderate,))
    assert torch.autograd.gradgradcheck(_fused.unit, (moderate,))


# ------------------------------------------------------------------------------------------ the loss through it

# Per-anchor option sets the fused rows serve: (infonce keywords, keys of helpers.batch they take)
OPTIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "plain": ({}, ()),
    "mask": ({}, ("negatives_mask",)),
    "K=2": ({}, ()),
    "ids": ({}, ("positive_ids", "negative_ids")),
    "shared": ({}, ("shared_negatives",)),
    "shared-ids": ({"shared_negative_ids": torch.tensor([0, 1, 3])}, ("shared_negatives", "positive_ids")),
    "hardness-own": ({"hardness_mode": "own", "hardness_strength": 2.0}, ("negatives_mask",)),
    "hardness-all": ({"hardness_mode": "all", "hardness_strength": 0.5}, ("shared_negatives",)),
    "margin": ({"false_negative_margin": 0.1}, ("negatives_mask",)),
    "margin-relative": ({"false_negative_margin": 0.2, "margin_strategy": "relative"}, ()),
    "chunked": ({"chunk_size": 2}, ("negatives_mask", "shared_negatives")),
}


def call(name: str, *, dtype: torch.dtype = F64) -> tuple[list[torch.Tensor], dict[str, Any], dict[str, Any]]:
    extra, keys = OPTIONS[name]
    b = batch(6, 4, 5, k=2 if name == "K=2" else 1, seed=len(name))
    data = leaves(*(b[key].to(dtype) for key in ("anchors", "positives", "negatives")))
    kw = {key: b[key] for key in keys} | extra
    if "shared_negatives" in kw:
        kw["shared_negatives"] = kw["shared_negatives"].to(dtype).requires_grad_()
    return data, kw, {key: value for key, value in kw.items() if key != "chunk_size"}


def tensors(data: list[torch.Tensor], kw: dict[str, Any]) -> list[torch.Tensor]:
    return [*data, *([kw["shared_negatives"]] if "shared_negatives" in kw else [])]


@pytest.mark.sweep(fast=6)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_and_gradients_equal_the_formula(name: str, spy: list[tuple[int, ...]]) -> None:
    data, kw, formula_kw = call(name)
    tau = torch.tensor(0.2, dtype=F64, requires_grad=True)  # a learnable temperature: its gradient too
    loss = pt.infonce(*data, temperature=tau, **kw)
    got = torch.autograd.grad(loss, [*tensors(data, kw), tau])
    assert spy, "the fused rows did not run"
    assert all(len(rows) == 2 for rows in spy), "positives and negatives not in one call"
    ref_data = leaves(*data)
    ref_kw = dict(formula_kw)
    if "shared_negatives" in ref_kw:
        ref_kw["shared_negatives"] = leaves(ref_kw["shared_negatives"])[0]
    ref_tau = tau.detach().clone().requires_grad_()
    ref = formula(*ref_data, ref_tau, **ref_kw)
    expected = torch.autograd.grad(ref, [*tensors(ref_data, ref_kw), ref_tau])
    assert_close(loss.detach(), ref.detach(), **TOL)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, **TOL)


@pytest.mark.parametrize(
    "distance",
    [
        pytest.param(CosineSimilarity(), id="CosineSimilarity"),
        pytest.param(DotProductSimilarity(), id="DotProductSimilarity-normalized"),
    ],
)
def test_pml_cosine_distances_take_the_fused_path(distance: Any, spy: list[tuple[int, ...]]) -> None:
    data, kw, _ = call("mask")
    loss = pt.infonce(*data, loss_fn=NTXentLoss(temperature=0.3, distance=distance), **kw)
    got = torch.autograd.grad(loss, data)
    assert spy
    ref_data = leaves(*data)
    ref = formula(*ref_data, 0.3, **kw)
    for g, e in zip(got, torch.autograd.grad(ref, ref_data), strict=True):
        assert_close(g, e, **TOL)


def test_raw_dot_product_is_not_normalized(spy: list[tuple[int, ...]]) -> None:
    # DotProductSimilarity(normalize_embeddings=False): no norms to fuse, a plain batched product; the formula's
    # raw dot product.
    data, kw, _ = call("mask")
    loss = pt.infonce(*data, loss_fn=NTXentLoss(temperature=5.0, distance=DIST["dot-raw"].make()), **kw)
    ref_data = leaves(*data)
    ref = formula(*ref_data, 5.0, DIST["dot-raw"], **kw)
    assert not spy
    assert_close(loss, ref, **TOL)
    for g, e in zip(torch.autograd.grad(loss, data), torch.autograd.grad(ref, ref_data), strict=True):
        assert_close(g, e, **TOL)


@pytest.mark.slow  # (the Function's own gradcheck is in the fast run)
def test_loss_gradcheck_and_gradgradcheck() -> None:
    # (no hardness or margin here: their detached terms make the loss differ from what its gradient describes)
    b = batch(3, 3, 4, k=2, seed=8)

    def loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return pt.infonce(a, p, n, negatives_mask=b["negatives_mask"], temperature=0.5)

    x = tuple(leaves(b["anchors"], b["positives"], b["negatives"]))
    assert torch.autograd.gradcheck(loss, x)
    assert torch.autograd.gradgradcheck(loss, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "mask", "K=2", "shared-ids", "hardness-own"])
def test_compiled_fullgraph_equals_eager_gradients_included(name: str) -> None:
    """torch.compile(fullgraph=True) with inductor: the fused rows traced, their products written elementwise."""
    torch._dynamo.reset()
    data, kw, _ = call(name)
    eager = pt.infonce(*data, temperature=0.2, **kw)
    expected = torch.autograd.grad(eager, tensors(data, kw))
    compiled = torch.compile(pt.infonce, fullgraph=True)(*data, temperature=0.2, **kw)
    got = torch.autograd.grad(compiled, tensors(data, kw))
    assert_close(compiled, eager, **TOL)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lower_precision_agrees_with_the_formula(dtype: torch.dtype) -> None:
    data, kw, formula_kw = call("mask", dtype=dtype)
    loss = pt.infonce(*data, temperature=0.2, **kw)
    got = torch.autograd.grad(loss, data)
    assert loss.dtype == dtype
    assert all(g.dtype == dtype for g in got)
    ref_data = leaves(*(x.double() for x in data))
    ref = formula(*ref_data, 0.2, **formula_kw)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    assert_close(loss.double(), ref.detach(), **tol)
    for g, e in zip(got, torch.autograd.grad(ref, ref_data), strict=True):
        assert_close(g.double(), e, **tol)
