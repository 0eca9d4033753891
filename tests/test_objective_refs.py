"""The references of issue 32's losses (``tests/formula.py``: distillation and the debiased family), checked.

1. Against closed forms derived by hand (orthonormal vectors, where every cosine is 0 or 1, and a few chosen
   angles) and invariants (teacher equal to student, τ⁺ = β = 0 is InfoNCE, a masked negative is a removed one).
2. Against the authors' conventions on the SimCLR setup: Robinson et al.'s ``criterion`` (joshr17/HCL
   ``image/main.py``) and Chuang et al.'s estimator (chingyaoc/DCL ``main.py``), restated in matrix form here (their
   code is not on PyPI and is not copied); loss and gradients to 1e-12 in float64.
3. Slow: against installed peers, sentence-transformers 6.2 ``DistillKLDivLoss`` and ``MarginMSELoss``, and
   lightly 1.6 ``DCLLoss`` when installed; loss and gradients to 1e-12 in float64.

SimCLR layout (HCL, DCL, lightly): two views x1, x2 [B, d] of B images; each of the 2B views is an anchor, the other
view of its image its positive, the 2B − 2 remaining views its negatives. Our rows: anchors = cat(x1, x2),
positives = cat(x2, x1), and either explicit negatives [2B, 2B − 2, d] or ``in_batch`` with positive ids
``cat(arange(B), arange(B))`` (which drops the anchor's own view, the positive of the other row of its image). The
authors average the 2B per-view terms (HCL and DCL: ``.mean()`` over 2B rows; lightly: ``0.5 * (loss0 + loss1)``
of two means over B): the same number as our mean over the 2B rows.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from formula import debiased_loop, distillation_term, distilled_loop, infonce_loop
from torch import nn

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
E = torch.eye(8, dtype=F64)


def close(got: torch.Tensor | float, want: torch.Tensor | float, who: str = "") -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=F64), torch.as_tensor(want, dtype=F64), **TOL, msg=who)


def kl(teacher_logits: list[float], student_logits: list[float]) -> float:
    """KL(softmax(teacher) ‖ softmax(student)) with the math module."""
    zt = sum(math.exp(v) for v in teacher_logits)
    zs = sum(math.exp(v) for v in student_logits)
    return sum(
        math.exp(t) / zt * ((t - math.log(zt)) - (s - math.log(zs)))
        for t, s in zip(teacher_logits, student_logits, strict=True)
    )


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def batch(seed: int, n: int = 3, k: int = 1, m: int = 3, d: int = 5) -> tuple[torch.Tensor, ...]:
    """(anchors [N, d], positives [N, K, d], negatives [N, M, d]): positives near their anchors."""
    a = rand(seed, n, d)
    return a, a[:, None] + 0.8 * rand(seed + 1, n, k, d), rand(seed + 2, n, m, d)


def cosines(a: torch.Tensor, p: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """[N, K+M] cosines of each anchor with its positives then its negatives (torch's own cosine)."""
    return F.cosine_similarity(a[:, None], torch.cat([p, neg], 1), dim=-1)


Result = tuple[torch.Tensor, list[torch.Tensor]]  # (loss, gradients)


def grads(fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> Result:
    """(loss, gradients w.r.t. each x) of fn on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(*leaves)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def same(who: str, got: Result, want: Result) -> None:
    close(got[0], want[0], f"[{who}] loss")
    for i, (x, y) in enumerate(zip(got[1], want[1], strict=True)):
        torch.testing.assert_close(x, y, **TOL, msg=lambda s, i=i: f"[{who}] gradient of input {i}: {s}")


# ================================================================ 1a. distillation: closed forms and invariants

# a = e0, group (e0 | e1, e2): student cosines 1, 0, 0
ONE = {"anchors": E[:1], "positives": E[:1], "negatives": E[None, 1:3]}
TEACHER = torch.tensor([[3.0, 1.0, -1.0]], dtype=F64)


@pytest.mark.parametrize(("tau_s", "tau_t"), [(1.0, 1.0), (0.5, 2.0), (0.25, None)])
def test_kl_closed_form(tau_s: float, tau_t: float | None) -> None:
    got = distillation_term(**ONE, teacher_scores=TEACHER, tau=tau_s, teacher_tau=tau_t, distillation="kl")
    t = tau_s if tau_t is None else tau_t
    # KL(teacher ‖ student) over the group, times τ_s² (sentence-transformers' scaling), one row: batchmean = sum
    want = tau_s**2 * kl([3.0 / t, 1.0 / t, -1.0 / t], [1.0 / tau_s, 0.0, 0.0])
    close(got, want)


def test_kl_group_of_several_positives() -> None:
    # K = 2 positives (e0, e1) then one negative e2: the group is the K + M = 3 candidates, cosines (1, 0, 0)
    t = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64)
    got = distillation_term(E[:1], E[None, :2], E[None, 2:3], t, 0.5, distillation="kl")
    close(got, 0.25 * kl([2.0, 4.0, -2.0], [2.0, 0.0, 0.0]))


def test_kl_batchmean_over_anchors() -> None:
    # two rows: the mean of the rows' KLs (not the mean over the N·(K+M) entries)
    a, p, neg = E[[0, 3]], E[[0, 3]], torch.stack([E[1:3], E[4:6]])
    t = torch.tensor([[3.0, 1.0, -1.0], [0.0, 0.0, 2.0]], dtype=F64)
    got = distillation_term(a, p, neg, t, tau=1.0, distillation="kl")
    close(got, (kl([3.0, 1.0, -1.0], [1.0, 0.0, 0.0]) + kl([0.0, 0.0, 2.0], [1.0, 0.0, 0.0])) / 2)


@pytest.mark.parametrize("sim", ["cosine", "dot", "euclidean"])
def test_kl_teacher_equal_to_student_is_zero_and_flat(sim: str) -> None:
    a, p, neg = batch(0)
    group = torch.cat([p, neg], 1)
    s = {
        "cosine": F.cosine_similarity(a[:, None], group, dim=-1),
        "dot": (a[:, None] * group).sum(-1),
        "euclidean": -(a[:, None] - group).norm(dim=-1),
    }[sim]
    t = 3.0 * s + 5.0  # τ_t = 3 τ_s: the same distribution; a per-row shift changes no softmax
    loss, (ga, gp, gn) = grads(
        lambda a, p, n: distillation_term(a, p, n, t, 0.5, teacher_tau=1.5, distillation="kl", sim=sim), a, p, neg
    )
    close(loss, 0.0)
    for g in (ga, gp, gn):  # KL's minimum: its gradient vanishes
        close(g.abs().max(), 0.0)


def test_margin_mse_closed_forms() -> None:
    # margins s_p − s_n = 1, 1 against the teacher's 3 − 1 = 2 and 3 + 1 = 4: ((1 − 2)² + (1 − 4)²) / 2
    close(distillation_term(**ONE, teacher_scores=TEACHER, distillation="margin_mse"), 5.0)
    # no temperature: τ changes nothing
    close(distillation_term(**ONE, teacher_scores=TEACHER, tau=0.01, distillation="margin_mse"), 5.0)
    # K = 2 positives (both e0) and one negative e1: one margin per (positive, negative), ((1 − 2)² + (1 − 3)²) / 2
    t = torch.tensor([[2.0, 3.0, 0.0]], dtype=F64)
    close(distillation_term(E[:1], E[None, [0, 0]], E[None, 1:2], t, distillation="margin_mse"), 2.5)


def test_margin_mse_of_equal_margins_is_zero() -> None:
    a, p, neg = batch(1)
    t = cosines(a, p, neg) - 7.0  # the same margins
    close(distillation_term(a, p, neg, t, distillation="margin_mse"), 0.0)


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_masked_negatives_are_removed_ones(kind: str) -> None:
    a, p, neg = batch(2, m=4)
    t = rand(9, 3, 5)
    mask = torch.tensor([[True, False, True, True]] * 3)
    t_masked = t.clone()
    t_masked[:, 2] = float("nan")  # the masked negative's teacher score is never read
    got = distillation_term(a, p, neg, t_masked, 0.5, distillation=kind, mask=mask)
    keep = [0, 1, 3, 4]
    close(got, distillation_term(a, p, neg[:, [0, 2, 3]], t[:, keep], 0.5, distillation=kind))
    if kind == "kl":  # ragged masks: the KL is the mean of the rows' KLs, each over its own group
        mask = torch.tensor([[True, False, True, True], [True, True, True, True], [False, False, False, True]])
        got = distillation_term(a, p, neg, t, 0.5, distillation="kl", mask=mask)
        rows = [
            distillation_term(
                a[i : i + 1], p[i : i + 1], neg[i : i + 1, mask[i]], t[i : i + 1, cols], 0.5, distillation="kl"
            )
            for i in range(3)
            for cols in [[0, *(1 + torch.nonzero(mask[i]).flatten()).tolist()]]
        ]
        close(got, sum(rows) / 3)


def test_distilled_combination_closed_form() -> None:
    # rows (e0 | e1) and (e2 | e3), τ = 1/2, in_batch: InfoNCE sees 3 zero-cosine candidates per row, the
    # distillation only each row's own group (e0, e1): teacher logits (t/τ) against student logits (2, 0)
    a, p, neg = E[[0, 2]], E[[0, 2]], E[[1, 3]][:, None]
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    infonce = math.log(math.exp(2.0) + 3) - 2.0
    distill = 0.25 * (kl([2.0, 0.0], [2.0, 0.0]) + kl([0.0, 2.0], [2.0, 0.0])) / 2
    got = distilled_loop(a, p, neg, t, 0.5, distillation="kl", infonce_weight=0.3, in_batch=True)
    close(got, 0.3 * infonce + distill)
    close(distilled_loop(a, p, neg, t, 0.5, distillation="kl", infonce_weight=0.0, in_batch=True), distill)
    # and the InfoNCE part is infonce_loop's
    close(infonce_loop(a, p, neg, 0.5, in_batch=True), infonce)


def test_distillation_shape_error() -> None:
    with pytest.raises(ValueError, match=r"teacher_scores \(1, 2\), want \(1, 3\)"):
        distillation_term(**ONE, teacher_scores=TEACHER[:, :2], distillation="kl")
    with pytest.raises(ValueError, match="mse"):
        distillation_term(**ONE, teacher_scores=TEACHER, distillation="mse")


# ================================================================ 1b. the debiased family: closed forms


def test_debiased_without_options_is_infonce() -> None:
    # τ⁺ = β = 0, not decoupled: infonce_loop's anchor_to_positive term, with every kind of candidate and exclusion
    g = torch.Generator().manual_seed(4)
    a, p, neg = batch(4, n=4, k=2, m=3)
    opts: dict[str, Any] = {
        "mask": torch.rand(4, 3, generator=g) < 0.6,
        "shared": rand(5, 2, 5),
        "in_batch": True,
        "pos_ids": torch.randint(0, 4, (4, 2), generator=g),
        "neg_ids": torch.randint(0, 4, (4, 3), generator=g),
        "shared_ids": torch.tensor([1, 7]),
    }
    for sim in ("cosine", "dot", "euclidean"):
        got = grads(lambda a, p, n, sim=sim: debiased_loop(a, p, n, 0.5, sim=sim, **opts), a, p, neg)
        same(sim, got, grads(lambda a, p, n, sim=sim: infonce_loop(a, p, n, 0.5, sim=sim, **opts), a, p, neg))


# a = p = e0, three orthogonal negatives: P = 1/τ, every L_c = 0; τ = 1
THREE = {"anchors": E[:1], "positives": E[:1], "negatives": E[None, 1:4], "tau": 1.0}


def test_debias_prior_closed_forms() -> None:
    e = math.e
    # τ⁺ = 0.1: G = (3 − 3 · 0.1 · e) / 0.9 > 3/e, no clamp
    close(debiased_loop(**THREE, debias_prior=0.1), math.log(e + (3 - 0.3 * e) / 0.9) - 1)
    # τ⁺ = 0.5: (3 − 1.5 e) / 0.5 < 0, clamped at n e^{−1/τ} = 3/e
    close(debiased_loop(**THREE, debias_prior=0.5), math.log(e + 3 / e) - 1)
    # n counts the candidates left after exclusions: a masked negative and an id clash leave one
    mask = torch.tensor([[True, False, True]])
    close(debiased_loop(**THREE, debias_prior=0.5, mask=mask), math.log(e + 2 / e) - 1)
    ids = {"pos_ids": torch.tensor([5]), "neg_ids": torch.tensor([[5, 1, 2]])}
    close(debiased_loop(**THREE, debias_prior=0.5, mask=mask, **ids), math.log(e + 1 / e) - 1)
    close(debiased_loop(**THREE, debias_prior=0.1, **ids), math.log(e + (2 - 0.2 * e) / 0.9) - 1)


def test_hcl_beta_closed_forms() -> None:
    # negatives at cosine 0 and c = 1/√2, τ = 1: w = (1, e^{βc}), R = 2 (1 + e^{βc} e^c) / (1 + e^{βc})
    neg = torch.stack([E[1], (E[0] + E[1]) / math.sqrt(2)])[None]
    c, e = 1 / math.sqrt(2), math.e
    for beta in (0.0, 1.0, 3.0):
        r = 2 * (1 + math.exp(beta * c) * math.exp(c)) / (1 + math.exp(beta * c))
        close(debiased_loop(E[:1], E[:1], neg, 1.0, hcl_beta=beta), math.log(e + r) - 1)
        g = (r - 2 * 0.1 * e) / 0.9  # with τ⁺ = 0.1 (above the clamp 2/e)
        close(debiased_loop(E[:1], E[:1], neg, 1.0, hcl_beta=beta, debias_prior=0.1), math.log(e + g) - 1)
    # equal similarities: equal weights, β changes nothing
    close(debiased_loop(**THREE, hcl_beta=5.0, debias_prior=0.1), debiased_loop(**THREE, debias_prior=0.1))


def test_hcl_weights_carry_gradient() -> None:
    # HCL's code does not detach its weights: the β loss's gradient is that of the formula with live weights,
    # not the one with detached weights (which differ for β > 0)
    a, p, neg = batch(6)
    live = grads(lambda a, p, n: debiased_loop(a, p, n, 0.5, hcl_beta=2.0), a, p, neg)[1][0]

    def detached(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        pos = F.cosine_similarity(a[:, None], p, dim=-1)[:, 0] / 0.5
        logits = F.cosine_similarity(a[:, None], n, dim=-1) / 0.5
        w = torch.exp(2.0 * logits).detach()
        mass = n.shape[1] * (w * logits.exp()).sum(1) / w.sum(1)
        return (torch.log(pos.exp() + mass) - pos).mean()

    frozen = grads(detached, a, p, neg)
    close(grads(lambda a, p, n: debiased_loop(a, p, n, 0.5, hcl_beta=2.0), a, p, neg)[0], frozen[0])
    assert (live - frozen[1][0]).abs().max() > 1e-3


def test_decoupled_closed_forms() -> None:
    # one negative: ℓ = (s_n − s_p)/τ, whatever the vectors
    a, p, neg = batch(7, m=1)
    s = cosines(a, p, neg)
    close(debiased_loop(a, p, neg, 0.5, decoupled=True), ((s[:, 1] - s[:, 0]) / 0.5).mean())
    # orthonormal: log 3 − 1; and with τ⁺ = 0.5 the clamped mass: log(3/e) − 1 = log 3 − 2
    close(debiased_loop(**THREE, decoupled=True), math.log(3) - 1)
    close(debiased_loop(**THREE, decoupled=True, debias_prior=0.5), math.log(3) - 2)
    # plain − decoupled = log(1 + e^P / Σ e^L), row by row
    a, p, neg = batch(8)
    s = cosines(a, p, neg) / 0.5
    gap = torch.log1p(s[:, 0].exp() / s[:, 1:].exp().sum(1)).mean()
    close(debiased_loop(a, p, neg, 0.5) - debiased_loop(a, p, neg, 0.5, decoupled=True), gap)


def test_debiased_rejects() -> None:
    with pytest.raises(ValueError, match="bounded similarity"):
        debiased_loop(**THREE, debias_prior=0.1, sim="dot")
    with pytest.raises(ValueError, match=r"want \[0, 1\)"):
        debiased_loop(**THREE, debias_prior=1.0)
    with pytest.raises(ValueError, match="want >= 0"):
        debiased_loop(**THREE, hcl_beta=-1.0)
    with pytest.raises(ValueError, match="no candidate"):
        debiased_loop(E[:1], E[:1], None, 1.0, decoupled=True)
    debiased_loop(**THREE, hcl_beta=1.0, sim="dot")  # β alone needs no bound


# ================================================================ 2. the authors' conventions, SimCLR layout
#
# Their code is not on PyPI and is not copied here. simclr_matrix restates, in matrix form written for this test,
# the conventions read from joshr17/HCL image/main.py @ 7b4647fac271c78a2a9d619fe3f2929ecfaf33df (`criterion`,
# estimator "hard" and "easy") and chingyaoc/DCL main.py @ 7d6345f6a2e4e2615e63f39966ad0dad3f54f954 (`train`, the
# `debiased` estimator): inputs L2-normalized by the model; 2B anchors, each with the other view as positive and
# the 2B − 2 other views as negatives (N = 2B − 2, a constant); importance weights e^{β s/τ}, not detached,
# normalized by their mean over the N negatives; Ng = (−τ⁺ N e^P + reweighted Σ e^L) / (1 − τ⁺) clamped from
# below at N e^{−1/τ} by torch.clamp (zero gradient where it binds), the clamp applied whatever τ⁺ in "hard";
# the loss the mean over the 2B anchors of −log(e^P / (e^P + Ng)). The verbatim code was run against
# debiased_loop outside the repository, once, when these references were written (equal to 1e-12).


def simclr_matrix(
    x1: torch.Tensor, x2: torch.Tensor, tau: float, *, tau_plus: float = 0.0, beta: float | None = None
) -> torch.Tensor:
    """The authors' SimCLR loss from their conventions: ``beta=None`` is the DCL estimator (clamped only when
    τ⁺ > 0, as DCL's ``debiased``), a float β HCL's "hard" estimator (always clamped)."""
    z = F.normalize(torch.cat([x1, x2]), dim=-1)  # [2B, d]
    rows = z.shape[0]
    partner = torch.arange(rows).roll(rows // 2)  # row r's other view
    logits = z @ z.T / tau  # [2B, 2B]
    pos = logits[torch.arange(rows), partner]  # [2B]
    others = ~(torch.eye(rows, dtype=torch.bool) | F.one_hot(partner, rows).bool())
    neg = logits[others].view(rows, rows - 2)  # [2B, N]
    n = rows - 2
    if beta is None:
        mass = neg.exp().sum(1)
    else:
        mass = n * (torch.softmax(beta * neg, dim=1) * neg.exp()).sum(1)  # Σ w e^L / mean w, w = e^{βL}
    if beta is not None or tau_plus > 0:
        mass = ((mass - tau_plus * n * pos.exp()) / (1 - tau_plus)).clamp(min=n * math.exp(-1 / tau))
    return (torch.log(pos.exp() + mass) - pos).mean()


B, D, TAU = 4, 5, 0.5  # DCL's and HCL's default temperature


def views(seed: int, spread: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unnormalized views [B, D] of B images (the authors' model normalizes; the tests do it for them)."""
    x1 = rand(seed, B, D)
    return x1, x1 + spread * rand(seed + 1, B, D)


def simclr_rows(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors [2B, d], positives [2B, d], negatives [2B, 2B − 2, d]): each view, its partner, the others."""
    b = x1.shape[0]
    every = torch.cat([x1, x2])
    others = [[j for j in range(2 * b) if j not in (r, (r + b) % (2 * b))] for r in range(2 * b)]
    return every, torch.cat([x2, x1]), every[torch.tensor(others)]


def ours(layout: str, tau: float = TAU, **options: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reference on two views, in the explicit-negatives or the in-batch-with-ids layout."""

    def fn(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        a, p, neg = simclr_rows(x1, x2)
        if layout == "negatives":
            return debiased_loop(a, p, neg, tau, **options)
        ids = torch.arange(x1.shape[0]).repeat(2)  # the anchor's own view is the other row's positive: same id
        return debiased_loop(a, p, None, tau, in_batch=True, pos_ids=ids, **options)

    return fn


def unclamped_below_bound(x1: torch.Tensor, x2: torch.Tensor, tau_plus: float, beta: float) -> bool:
    """Whether the τ⁺ estimator falls below HCL's clamp for some view (so that the clamp is exercised)."""
    a, p, neg = simclr_rows(F.normalize(x1, dim=-1), F.normalize(x2, dim=-1))
    pos = ((a * p).sum(-1) / TAU).exp()
    e = ((a[:, None] * neg).sum(-1) / TAU).exp()
    n = neg.shape[1]
    mass = n * (e**beta * e).sum(1) / (e**beta).sum(1)
    return bool(((mass - n * tau_plus * pos) / (1 - tau_plus) < n * math.exp(-1 / TAU)).any())


HCL_CASES = [(0.1, 1.0, 0.6), (0.0, 1.0, 0.6), (0.1, 0.0, 0.6), (0.0, 0.0, 0.6), (0.5, 0.5, 0.15), (0.3, 2.0, 1.0)]


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize(("tau_plus", "beta", "spread"), HCL_CASES)
def test_hcl_conventions(tau_plus: float, beta: float, spread: float, layout: str) -> None:
    x1, x2 = views(10, spread)
    peer = grads(lambda a, b: simclr_matrix(a, b, TAU, tau_plus=tau_plus, beta=beta), x1, x2)
    same("HCL hard", grads(ours(layout, debias_prior=tau_plus, hcl_beta=beta), x1, x2), peer)
    if (tau_plus, spread) == (0.5, 0.15):  # close views: the clamp binds for some views
        assert unclamped_below_bound(x1, x2, tau_plus, beta)


@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
def test_hcl_easy_conventions(layout: str) -> None:
    x1, x2 = views(11)
    peer = grads(lambda a, b: simclr_matrix(a, b, TAU), x1, x2)
    same("HCL easy", grads(ours(layout), x1, x2), peer)


@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize(("tau_plus", "spread"), [(0.0, 0.6), (0.1, 0.6), (0.5, 0.15)])
def test_dcl_conventions(tau_plus: float, spread: float, layout: str) -> None:
    x1, x2 = views(12, spread)
    peer = grads(lambda a, b: simclr_matrix(a, b, TAU, tau_plus=tau_plus), x1, x2)
    same("DCL", grads(ours(layout, debias_prior=tau_plus), x1, x2), peer)
    if tau_plus == 0.5:
        assert unclamped_below_bound(x1, x2, tau_plus, 0.0)


# ================================================================ 3. installed peers (slow)


def lightly_dcl_module() -> Any:
    """lightly 1.6's ``lightly/loss/dcl_loss.py`` as installed, loaded by path: ``lightly.loss``'s ``__init__``
    imports torchvision (for other losses), which the dev extra leaves out (it pulls a CUDA torch)."""
    lightly = pytest.importorskip("lightly", reason="lightly 1.6 (pip install --no-deps lightly==1.6.0)")
    path = pathlib.Path(lightly.__file__).parent / "loss" / "dcl_loss.py"
    spec = importlib.util.spec_from_file_location("lightly_dcl_loss", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_lightly_dcl_loss(tau: float, layout: str) -> None:
    x1, x2 = views(13)
    peer = grads(lightly_dcl_module().DCLLoss(temperature=tau), x1, x2)  # it normalizes itself
    same("lightly DCLLoss", grads(ours(layout, tau, decoupled=True), x1, x2), peer)


def st_losses() -> Any:
    return pytest.importorskip("sentence_transformers.sentence_transformer.losses", reason="in the dev extra")


def st_util() -> Any:
    return pytest.importorskip("sentence_transformers.util", reason="in the dev extra")


ST_SIMS = {"cosine": "pairwise_cos_sim", "dot": "pairwise_dot_score"}


@pytest.mark.slow
@pytest.mark.parametrize("sim", list(ST_SIMS))
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(("tau_s", "tau_t"), [(1.0, 1.0), (0.5, 2.0), (0.05, 0.2)])
def test_distill_kl_div_loss(tau_s: float, tau_t: float, m: int, sim: str) -> None:
    a, p, neg = batch(20 + m, n=4, m=m)
    t = 4.0 * rand(30, 4, 1 + m)
    peer_loss = st_losses().DistillKLDivLoss(
        nn.Identity(),  # stored only: compute_loss_from_embeddings takes the embeddings
        similarity_fct=getattr(st_util(), ST_SIMS[sim]),
        student_temperature=tau_s,
        teacher_temperature=tau_t,
    )
    peer = grads(lambda a, p, n: peer_loss.compute_loss_from_embeddings([a, p[:, 0], *n.unbind(1)], t), a, p, neg)
    got = grads(
        lambda a, p, n: distilled_loop(
            a, p, n, t, tau_s, distillation="kl", teacher_tau=tau_t, infonce_weight=0.0, sim=sim
        ),
        a,
        p,
        neg,
    )
    same("DistillKLDivLoss", got, peer)


@pytest.mark.slow
@pytest.mark.parametrize("sim", list(ST_SIMS))
@pytest.mark.parametrize("m", [1, 3])
def test_margin_mse_loss(m: int, sim: str) -> None:
    a, p, neg = batch(40 + m, n=4, m=m)
    t = 2.0 * rand(50, 4, 1 + m)  # the [N, 1 + M] form: positive's score, then the negatives'
    peer_loss = st_losses().MarginMSELoss(nn.Identity(), similarity_fct=getattr(st_util(), ST_SIMS[sim]))
    peer = grads(lambda a, p, n: peer_loss.compute_loss_from_embeddings([a, p[:, 0], *n.unbind(1)], t), a, p, neg)
    got = grads(
        lambda a, p, n: distilled_loop(a, p, n, t, 0.5, distillation="margin_mse", infonce_weight=0.0, sim=sim),
        a,
        p,
        neg,
    )
    same("MarginMSELoss", got, peer)
