"""Property tests (hypothesis) over random sizes, temperatures, masks, ids and modes, in float64.

Hypothesis draws the sizes, the options and a seed; the tensors come from a torch generator seeded with it, so
every example is reproducible from what hypothesis prints. Expected values come from tests/formula.py or from
another call of the library on transformed inputs (a metamorphic relation), never from a stored number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from helpers import DIST, F64, TOL, formula, gen, loss_fn, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import pml_triplets as pt

SETTINGS = settings(max_examples=25, deadline=None)
ENGINES = st.sampled_from(["dense", "pml"])
# A metamorphic relation compares two float64 calls of the library that do the same arithmetic on permuted,
# masked or rescaled inputs: what differs is the order of a few sums (~1e2 roundings of 2.2e-16 on logits <= 20),
# so 1e-12 holds with margin.
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


@dataclass
class Case:
    """One drawn call: tensors, options and the temperature (float64, CPU)."""

    a: torch.Tensor  # (N, d)
    p: torch.Tensor  # (N, d) or (N, K, d)
    n: torch.Tensor  # (N, M, d)
    tau: float
    shared: torch.Tensor | None = None  # (S, d)
    mask: torch.Tensor | None = None  # (N, M)
    in_batch: bool = False
    pid: torch.Tensor | None = None  # (N,) or (N, K)
    nid: torch.Tensor | None = None  # (N, M)
    seed: int = 0

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.p, self.n, self.shared) if t is not None]

    def kwargs(self) -> dict[str, Any]:
        return {
            "negatives_mask": self.mask,
            "in_batch": self.in_batch,
            "positive_ids": self.pid,
            "negative_ids": self.nid,
        }

    def generator(self, salt: int) -> torch.Generator:
        return gen(self.seed * 7919 + salt)


@st.composite
def cases(draw: st.DrawFn, *, in_batch: bool | None = None, ids: bool = True) -> Case:
    """N in 1..6, K in 1..3, M in 1..5, S in 0..3, d in 1..8, tau in [0.05, 5], optional mask, in_batch and ids."""
    n, k, m, d = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 8))
    s = draw(st.integers(0, 3))
    tau = draw(st.floats(0.05, 5.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    flat = k == 1 and draw(st.booleans())  # positives as [N, d]
    a = randn(g, n, d)
    p = randn(g, n, d) if flat else randn(g, n, k, d)
    neg = randn(g, n, m, d)
    sh = randn(g, s, d) if s else None
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(n, m, generator=g) < draw(st.floats(0.0, 1.0))
    batch = draw(st.booleans()) if in_batch is None else in_batch
    pid = nid = None
    if ids and draw(st.booleans()):
        pid = torch.randint(0, 4, (n,) if flat and draw(st.booleans()) else (n, k), generator=g)
        if not batch or draw(st.booleans()):
            nid = torch.randint(0, 4, (n, m), generator=g)
    return Case(a, p, neg, tau, sh, mask, batch, pid, nid, seed)


def _run(case: Case, engine: str, *, chunk_size: int | None = None, **overrides: Any) -> list[torch.Tensor]:
    """The loss and its gradients w.r.t. every tensor of ``case``, cosine similarity."""
    xs = [t.detach().clone().requires_grad_() for t in case.tensors]
    a, p, n = xs[:3]
    sh = xs[3] if case.shared is not None else None
    kw = case.kwargs() | overrides
    loss = pt.infonce(a, p, n, shared_negatives=sh, temperature=case.tau, engine=engine, chunk_size=chunk_size, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, xs)]


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, atol: float) -> None:
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol * max(1.0, float(y.abs().max())))


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the float64 formula
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # (25 random configurations of the float64 loop; the fixed sweeps of test_options are fast)
@SETTINGS
@given(case=cases(), engine=ENGINES, dist=st.sampled_from(sorted(DIST)))
def test_matches_formula(case: Case, engine: str, dist: str) -> None:
    xs = [t.clone().requires_grad_() for t in case.tensors]
    a, p, n = xs[:3]
    sh = xs[3] if case.shared is not None else None
    fn = loss_fn(DIST[dist], case.tau)
    loss = pt.infonce(a, p, n, shared_negatives=sh, loss_fn=fn, engine=engine, **case.kwargs())
    got = [loss, *torch.autograd.grad(loss, xs)]

    ys = [t.clone().requires_grad_() for t in case.tensors]
    fsh = ys[3] if case.shared is not None else None
    want = formula(*ys[:3], case.tau, DIST[dist], shared_negatives=fsh, **case.kwargs())
    rtol, atol = TOL[F64]
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=rtol, atol=atol)
    # Gradients to the same float64 tolerance, atol scaled by the largest entry: the dense engine's
    # softplus(threshold=40) drops nothing float64 can represent (see
    # tests/test_numerics.py::test_float64_term_around_the_softplus_threshold_is_exact).
    # The formula's sqrt has no gradient at distance 0 (NaN), which d = 1 with LpDistance() hits often; the
    # library must stay finite there (torch.cdist gives 0) and match the formula everywhere else.
    want_grads = torch.autograd.grad(want, ys, allow_unused=True)
    for g, w in zip(got[1:], want_grads, strict=True):
        assert torch.isfinite(g).all()
        w = torch.zeros_like(g) if w is None else w
        defined = torch.isfinite(w)
        scale = max(1.0, float(w[defined].abs().max()) if defined.any() else 0.0)
        torch.testing.assert_close(g[defined], w[defined], rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------------------------
# Metamorphic relations
# ---------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), engine=ENGINES)
def test_permuting_an_anchors_negatives_changes_nothing(case: Case, engine: str) -> None:
    n, m = case.n.shape[:2]
    perm = torch.argsort(torch.rand(n, m, generator=case.generator(1)), dim=1)  # a permutation per row

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.gather(x, 1, perm if x.ndim == 2 else perm[..., None].expand_as(x))

    moved = replace(case, n=rows(case.n), mask=rows(case.mask), nid=rows(case.nid))
    before, after = _run(case, engine), _run(moved, engine)
    inverse = torch.argsort(perm, dim=1)[..., None].expand_as(case.n)
    after[3] = torch.gather(after[3], 1, inverse)  # d loss / d negatives, back in the original order
    _assert_all_close(after, before, **TIGHT)


@SETTINGS
@given(case=cases(in_batch=False, ids=False), engine=ENGINES)
def test_masking_negatives_equals_dropping_them(case: Case, engine: str) -> None:
    """One masked call == the mean of one call per anchor on its real negatives only (0 if it has none).

    The masked rows hold NaN and inf: they must reach neither the loss nor any gradient.
    """
    n, m = case.n.shape[:2]
    mask = torch.rand(n, m, generator=case.generator(2)) < 0.6
    garbage = case.n.clone()
    garbage[~mask] = float("nan")
    garbage[~mask & (torch.arange(m) % 2 == 0)] = float("inf")
    got = _run(replace(case, n=garbage, mask=mask), engine)
    assert torch.isfinite(got[0])
    assert (got[3][~mask] == 0).all()
    assert all(torch.isfinite(g).all() for g in got[1:])

    terms = []
    for i in range(n):
        real = case.n[i : i + 1, mask[i]]  # (1, M_i, d)
        if real.shape[1] == 0 and case.shared is None:
            terms.append(torch.zeros((), dtype=F64))  # documented: an anchor with no negatives has loss 0
            continue
        negatives = real if real.shape[1] else None
        a, p = case.a[i : i + 1], case.p[i : i + 1]
        terms.append(pt.infonce(a, p, negatives, shared_negatives=case.shared, temperature=case.tau, engine=engine))
    torch.testing.assert_close(got[0], torch.stack(terms).mean(), **TIGHT)


@pytest.mark.slow
@SETTINGS
@given(case=cases(in_batch=True), engine=ENGINES, data=st.data())
def test_masking_equals_dropping_in_batch(case: Case, engine: str, data: st.DataObject) -> None:
    """With in_batch, a mask that keeps r negatives in every row == the compacted [N, r, d] negatives, unmasked.

    Masked rows hold NaN; they are neither anyone's negative nor in anyone's gradient.
    """
    n, m, d = case.n.shape
    r = data.draw(st.integers(1, m), label="r")
    order = torch.argsort(torch.rand(n, m, generator=case.generator(3)), dim=1)
    keep = torch.sort(order[:, :r], dim=1).values  # (N, r) kept columns, in their original order
    mask = torch.zeros(n, m, dtype=torch.bool).scatter_(1, keep, True)
    masked = case.n.clone()
    masked[~mask] = float("nan")
    compact = torch.gather(case.n, 1, keep[..., None].expand(n, r, d))
    nid = None if case.nid is None else torch.gather(case.nid, 1, keep)

    got = _run(replace(case, n=masked, mask=mask), engine)
    want = _run(replace(case, n=compact, mask=None, nid=nid), engine)
    assert (got[3][~mask] == 0).all()
    got[3] = torch.gather(got[3], 1, keep[..., None].expand(n, r, d))
    _assert_all_close(got, want, **TIGHT)


@pytest.mark.slow
@SETTINGS
@given(case=cases(), engine=ENGINES, data=st.data())
def test_chunk_size_changes_nothing(case: Case, engine: str, data: st.DataObject) -> None:
    n = case.a.shape[0]
    whole = _run(case, engine)
    _assert_all_close(_run(case, engine, chunk_size=1), whole, **TIGHT)
    size = data.draw(st.integers(1, n + 1), label="chunk_size")
    _assert_all_close(_run(case, engine, chunk_size=size), whole, **TIGHT)


@pytest.mark.slow
@SETTINGS
@given(case=cases(), engine=ENGINES, log_c=st.floats(-3.0, 3.0))
def test_cosine_loss_is_scale_invariant(case: Case, engine: str, log_c: float) -> None:
    """Scaling inputs by c > 0 (one c for everything, and a random c per row) leaves the loss unchanged;
    the gradient w.r.t. a row scaled by c is divided by c."""
    base = _run(case, engine)
    c = 10.0**log_c
    _assert_all_close(_run(replace(case, a=c * case.a, p=c * case.p, n=c * case.n), engine)[:1], base[:1], **TIGHT)

    g = case.generator(4)

    def scale_rows(x: torch.Tensor) -> torch.Tensor:
        return 10.0 ** (6 * torch.rand(*x.shape[:-1], 1, generator=g, dtype=F64) - 3)

    scales = [scale_rows(t) for t in case.tensors]
    scaled = [s * t for s, t in zip(scales, case.tensors, strict=True)]
    moved = replace(case, a=scaled[0], p=scaled[1], n=scaled[2], shared=scaled[3] if case.shared is not None else None)
    got = _run(moved, engine)
    torch.testing.assert_close(got[0], base[0], **TIGHT)
    for grad, s, ref in zip(got[1:], scales, base[1:], strict=True):
        torch.testing.assert_close(grad * s, ref, rtol=1e-9, atol=1e-9 * max(1.0, float(ref.abs().max())))
