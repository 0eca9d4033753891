"""The fused per-anchor cosine (``pml_triplets._fused.unit_rows``) and the loss through it.

``unit_rows(q, r)[c, j] = <q[c], r[c, j]> / max(‖r[c, j]‖, 1e-12)`` is checked against the same sum written loop by
loop in float64 (values, and gradients by autograd of the loop), against finite differences (gradcheck,
gradgradcheck), against closed forms at a zero row, under ``torch.func`` and ``torch.compile(fullgraph=True)``.
The loss with every per-anchor option the fused path serves is checked against ``tests/formula.py`` at 1e-10,
gradients included, with a spy asserting that the fused path ran.
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


def loop_rows(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(C, J): every cosine-on-the-fly as an explicit sum over coordinates, float64, differentiable."""
    c, j, d = r.shape
    out = [[q.new_zeros(())] * j for _ in range(c)]
    for i in range(c):
        for m in range(j):
            dot = sum(q[i, k] * r[i, m, k] for k in range(d))
            norm = torch.sqrt(sum(r[i, m, k] * r[i, m, k] for k in range(d)))
            out[i][m] = dot / torch.clamp(norm, min=1e-12)
    return torch.stack([torch.stack(row) for row in out])


def problem(seed: int, c: int = 4, j: int = 3, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (C, d), r (C, J, d) with rows of very different lengths, and the output's weights w (C, J)."""
    g = gen(seed)
    r = randn(g, c, j, d) * torch.logspace(-3, 3, c * j, dtype=F64).reshape(c, j, 1)
    return randn(g, c, d), r, randn(g, c, j)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the fused forward (eager, torch.func and compiled paths all go through it)."""
    calls: list[int] = []
    real = _fused._forward

    def counted(q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(r.shape[1])
        return real(q, r, scale)

    monkeypatch.setattr(_fused, "_forward", counted)
    return calls


# ------------------------------------------------------------------------------------------------ unit_rows alone


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 1.0), (2, 1.0), (0, 1 / 0.07), (1, -3.0)])
def test_value_and_gradients_equal_the_loop(seed: int, scale: float) -> None:
    # scale: 1/τ applied to the (C, J) output inside the function (the loss passes it for a number τ)
    q, r, w = problem(seed)
    q1, r1 = leaves(q, r)
    got = _fused.unit_rows(q1, r1, scale)
    grads = torch.autograd.grad((got * w).sum(), (q1, r1))
    q2, r2 = leaves(q, r)
    want = loop_rows(q2, r2) * scale
    expected = torch.autograd.grad((want * w).sum(), (q2, r2))
    assert_close(got, want, **TOL)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, **TOL)


def test_gradcheck_and_gradgradcheck() -> None:
    q, r, _ = problem(3)
    q, r = leaves(q, r / r.norm(dim=-1, keepdim=True))  # unit-ish scale: finite differences stay accurate
    for scale in (1.0, 2.5):
        assert torch.autograd.gradcheck(_fused.unit_rows, (q, r, scale))
        assert torch.autograd.gradgradcheck(_fused.unit_rows, (q, r, scale))


def test_zero_row_follows_normalizes_rule() -> None:
    # F.normalize maps a zero row to 0 and, its norm clamped at eps, has the Jacobian I / eps there: the row's
    # gradient is g * q / eps; rows with a norm keep the usual one.
    q, r, w = problem(4)
    r[1, 2] = 0.0
    q1, r1 = leaves(q, r)
    s = _fused.unit_rows(q1, r1)
    gq, gr = torch.autograd.grad((s * w).sum(), (q1, r1))
    assert s[1, 2] == 0.0
    assert_close(gr[1, 2], w[1, 2] * q[1] / 1e-12, rtol=1e-12, atol=0.0)
    q2, r2 = leaves(q, r)
    s2 = torch.nn.functional.normalize(r2, dim=-1) @ q2[:, :, None]
    expected = torch.autograd.grad((s2.squeeze(-1) * w).sum(), (q2, r2))
    assert_close(gq, expected[0], **TOL)
    assert_close(gr, expected[1], rtol=1e-10, atol=1e-10)


def test_only_the_inputs_that_need_it_get_a_gradient() -> None:
    q, r, w = problem(5)
    for need_q, need_r in ((True, False), (False, True)):
        q1, r1 = q.clone().requires_grad_(need_q), r.clone().requires_grad_(need_r)
        (_fused.unit_rows(q1, r1) * w).sum().backward()
        assert (q1.grad is not None) == need_q
        assert (r1.grad is not None) == need_r


def test_output_may_be_changed_in_place() -> None:
    # The loss masks logits in place; the backward must not read the output it returned.
    q, r, w = problem(6)
    q1, r1 = leaves(q, r)
    s = _fused.unit_rows(q1, r1)
    s.masked_fill_(w > 1.0, -1e30)
    grads = torch.autograd.grad((s.clamp_min(-5.0) * w).sum(), (q1, r1))
    q2, r2 = leaves(q, r)
    s2 = loop_rows(q2, r2).masked_fill(w > 1.0, -1e30)
    expected = torch.autograd.grad((s2.clamp_min(-5.0) * w).sum(), (q2, r2))
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, **TOL)


def test_torch_func_grad_and_vmap_equal_the_loop() -> None:
    problems = [problem(10 + b) for b in range(3)]
    qs, rs, ws = (torch.stack(parts) for parts in zip(*problems, strict=True))

    scale = 1 / 0.3

    def f(q: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (_fused.unit_rows(q, r, scale) * w).sum()

    values = torch.func.vmap(_fused.unit_rows, in_dims=(0, 0, None))(qs, rs, scale)
    grads = torch.func.vmap(torch.func.grad(f, argnums=(0, 1)))(qs, rs, ws)
    for b, (q, r, w) in enumerate(problems):
        q1, r1 = leaves(q, r)
        want = loop_rows(q1, r1) * scale
        expected = torch.autograd.grad((want * w).sum(), (q1, r1))
        assert_close(values[b], want, **TOL)
        assert_close(grads[0][b], expected[0], **TOL)
        assert_close(grads[1][b], expected[1], **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rows_are_cast_block_by_block(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # float64 queries, half rows split into blocks of 2 anchors: the loop on the rows as rounded to half, and
    # their gradient rounded to half once (not accumulated in half).
    monkeypatch.setattr(_fused, "_CAST_BLOCK", 2 * 3 * 5)
    q, r, w = problem(7, c=5)
    r = (r / r.norm(dim=-1, keepdim=True)).to(dtype)
    q1, r1 = q.clone().requires_grad_(), r.clone().requires_grad_()
    s = _fused.unit_rows(q1, r1)
    gq, gr = torch.autograd.grad((s * w).sum(), (q1, r1))
    assert s.dtype == F64
    assert gr.dtype == dtype
    q2, r2 = leaves(q, r.double())
    want = loop_rows(q2, r2)
    expected = torch.autograd.grad((want * w).sum(), (q2, r2))
    assert_close(s, want, **TOL)
    assert_close(gq, expected[0], **TOL)
    assert_close(gr, expected[1].to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-30)


def test_half_negatives_are_never_cast_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Through the loss: bfloat16 negatives reach the fused rows uncast and are cast two anchors at a time.
    monkeypatch.setattr(_fused, "_CAST_BLOCK", 2 * 4 * 5)
    seen: list[tuple[torch.dtype, int, int]] = []  # (dtype, rows per anchor, anchors) of each block
    real = _fused._forward_block

    def spy_block(q: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seen.append((r.dtype, r.shape[1], r.shape[0]))
        return real(q, r, scale)

    monkeypatch.setattr(_fused, "_forward_block", spy_block)
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
    _, r, _ = problem(8)
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


@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_and_gradients_equal_the_formula(name: str, spy: list[int]) -> None:
    data, kw, formula_kw = call(name)
    tau = torch.tensor(0.2, dtype=F64, requires_grad=True)  # a learnable temperature: its gradient too
    loss = pt.infonce(*data, temperature=tau, **kw)
    got = torch.autograd.grad(loss, [*tensors(data, kw), tau])
    assert spy, "the fused rows did not run"
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
def test_pml_cosine_distances_take_the_fused_path(distance: Any, spy: list[int]) -> None:
    data, kw, _ = call("mask")
    loss = pt.infonce(*data, loss_fn=NTXentLoss(temperature=0.3, distance=distance), **kw)
    got = torch.autograd.grad(loss, data)
    assert spy
    ref_data = leaves(*data)
    ref = formula(*ref_data, 0.3, **kw)
    for g, e in zip(got, torch.autograd.grad(ref, ref_data), strict=True):
        assert_close(g, e, **TOL)


def test_raw_dot_product_is_not_normalized(spy: list[int]) -> None:
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
