"""``pt.NTXentLoss`` in float16 and bfloat16, and in every dtype without the ``B x R`` matrix.

Half inputs keep PML's distances in the input dtype (row by row; ``LpDistance`` in float16 through its
``pairwise_distance``, as PML's ``compute_mat`` there) and sum in float32: each anchor's exponentials (a half
``index_add`` stops growing: bfloat16 near 256 terms) and the gradients of a row gathered once per pair (a half
``index_put_`` sum, the same). The references: PML's own ``NTXentLoss`` on the same half tensors, and PML in float64
on the same rounded values, exact at these scales; the tolerances are multiples of the dtype's unit roundoff
(:func:`tolerance`). Memory is checked without a clock: a dispatch mode fails the test at the first tensor larger
than the rows gathered for the pairs, and a spy on ``compute_mat`` fails it where PML's matrix would be built.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from pytorch_metric_learning import distances, losses
from torch.utils._python_dispatch import TorchDispatchMode

import pml_triplets as pt
from pml_triplets.ntxent import pair_values

F64 = torch.float64
Run = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def tolerance(dtype: torch.dtype, tau: float) -> tuple[float, float, float]:
    """``(atol, rtol)`` of a loss in ``dtype`` against another computation of it, and the atol of a gradient
    relative to the gradient's largest entry.

    u is the dtype's unit roundoff, eps / 2: bfloat16 2^-8, float16 2^-11, float32 2^-24.

    * A distance computed in the input dtype (normalization, product or norm, result; |s| <= 2 here) carries about
      4u, so a logit s/τ carries 4u/τ, and so does the loss: a log-sum-exp moves at most as much as its largest
      argument. Two computations that each carry that differ by up to 8u/τ (atol), and each is rounded to the
      dtype once (rtol 2u).
    * A gradient entry is a softmax weight, whose logits carry 4u/τ each (8u/τ between two computations), times a
      distance derivative such as a cosine's ``â - s r̂``, which cancels where s is near 1 (the positives here,
      s ≈ 0.96: about 10u); 16u covers that.

    float64: the suite's 1e-10 (the same numbers summed in another order).
    """
    if dtype == F64:
        return 1e-10, 1e-10, 1e-10
    u = torch.finfo(dtype).eps / 2
    return 8 * u / tau, 2 * u, (8 / tau + 16) * u


def run(loss_fn: torch.nn.Module, emb: torch.Tensor, ref: torch.Tensor | None, idx: tuple[torch.Tensor, ...]) -> Run:
    """The loss and its gradients with respect to ``emb`` and ``ref`` (``ref=None``: ``emb`` twice)."""
    emb = emb.detach().requires_grad_()
    ref = None if ref is None else ref.detach().requires_grad_()
    loss = loss_fn(emb, indices_tuple=idx, ref_emb=ref)
    grads = torch.autograd.grad(loss, (emb,) if ref is None else (emb, ref))
    return loss.detach(), (grads[0], grads[-1])


def assert_near(got: Run, want: Run, dtype: torch.dtype, tau: float, what: str) -> None:
    atol, rtol, grad_tol = tolerance(dtype, tau)
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    for name, g, w in zip(("embeddings", "ref_emb"), got[1], want[1], strict=True):
        scale = w.abs().max().item()
        torch.testing.assert_close(
            g.double(), w.double(), atol=grad_tol * scale, rtol=0, msg=lambda m, n=name: f"{what}, d/d{n}: {m}"
        )


class NoLargerThan(TorchDispatchMode):
    """Fails at the first op (forward or backward) that returns a tensor of more than ``budget`` elements."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.budget:
                raise AssertionError(f"{func} returned {tuple(t.shape)}: more than the {self.budget} elements allowed")
        return out


def forbid_matrix(distance: distances.BaseDistance) -> None:
    """Make ``distance.compute_mat`` (an instance attribute: the class, and so the loss's choice, is unchanged) fail."""

    def spy(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"the {len(query)} x {len(ref)} matrix was built")

    distance.compute_mat = spy


# ------------------------------------------------------------------------- long segments in half precision


def coherent(n: int, m: int, d: int, neg_cos: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors ``u`` [n, d] (unit rows) and ``ref = [positives; negatives]`` [n + n*m, d], float64.

    Positive i is ``u_i`` plus noise (cosine about 0.96); anchor i's negatives are ``neg_cos u_i + 0.8 w_i`` plus a
    little noise, with ``w_i`` a unit vector orthogonal to ``u_i``, shared by the anchor's M negatives: their
    gradients add up, so a half-precision sum of them stalls visibly.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    w = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.nn.functional.normalize(w - (w * u).sum(1, keepdim=True) * u, dim=1)  # (n, d), w_i ⊥ u_i
    pos = u + 0.3 * torch.randn(n, d, generator=g, dtype=F64) / d**0.5
    neg = neg_cos * u[:, None] + 0.8 * w[:, None] + 0.1 * torch.randn(n, m, d, generator=g, dtype=F64) / d**0.5
    return u, torch.cat([pos, neg.reshape(n * m, d)])  # (n + n*m, d)


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize(
    ("form", "n", "d"),
    [
        pytest.param("4-tuple", 4, 16, id="4-tuple"),  # the issue's call; B*R <= the rows gathered: PML's matrix
        pytest.param("4-tuple", 8, 3, id="4-tuple-rows"),  # B*R > the rows gathered: the pairs' rows
        pytest.param("3-tuple", 4, 16, id="3-tuple"),  # each positive pair M times: one matrix entry M times
    ],
)
@pytest.mark.parametrize(
    ("dtype", "m", "tau", "neg_cos"),
    [
        pytest.param(torch.bfloat16, 2048, 1.0, 0.0, id="bfloat16-M2048"),
        # PML's float16 term is -log(q + tiny), q = e^-term: off by tiny·e^term, 6.1e-5 * e^3.5 = 2e-3 for these
        # terms (~3.1); at τ = 1 they would be ~9, 0.5 off and near PML's cap of 9.7. Negatives at cosine -0.5
        # and τ = 0.25 keep PML exact enough to compare with.
        pytest.param(torch.float16, 8192, 0.25, -0.5, id="float16-M8192"),
    ],
)
def test_long_segments_sum_in_float32(
    dtype: torch.dtype, m: int, tau: float, neg_cos: float, form: str, n: int, d: int
) -> None:
    anchors, ref = (x.to(dtype) for x in coherent(n, m, d, neg_cos))
    rows = torch.arange(n)
    four = (rows, rows, rows.repeat_interleave(m), n + torch.arange(n * m))  # ref rows: n positives, then negatives
    # The 3-tuple repeats anchor i's term M times with the same negatives: its mean is the 4-tuple's, and so are the
    # gradients. PML is given the 4-tuple (its 3-tuple would build (N*M)² tensors).
    idx = four if form == "4-tuple" else (rows.repeat_interleave(m), rows.repeat_interleave(m), four[3])
    ours = run(pt.NTXentLoss(temperature=tau), anchors, ref, idx)
    assert ours[0].dtype == dtype
    exact = run(losses.NTXentLoss(temperature=tau), anchors.double(), ref.double(), four)
    assert_near(ours, exact, dtype, tau, "against PML in float64")
    assert_near(
        ours, run(losses.NTXentLoss(temperature=tau), anchors, ref, four), dtype, tau, f"against PML in {dtype}"
    )


# ---------------------------------------------------------------------------- LpDistance in float16 is PML's


LP_DISTANCES = [
    pytest.param(lambda: distances.LpDistance(), id="lp"),
    pytest.param(lambda: distances.LpDistance(normalize_embeddings=False), id="lp-raw"),
    pytest.param(lambda: distances.LpDistance(p=1), id="lp-p1"),
    pytest.param(lambda: distances.LpDistance(power=2), id="lp-power2"),
]


@pytest.mark.parametrize("make_distance", LP_DISTANCES)
def test_float16_lp_distance_is_pmls(make_distance: Callable[[], distances.BaseDistance]) -> None:
    n, m, d, tau = 4, 6, 8, 1.0  # B*R = 32² > 2 (P + Q) d = 768: the pairs' rows
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(2 * n + n * m, d, generator=g, dtype=F64) / d**0.5).half()  # rows of norm ~1
    idx = pt.build_indices(n, m)
    # PML's float16 compute_mat is F.pairwise_distance (with its eps) on every row pair: the same numbers at the pairs
    distance = make_distance()
    a, p, neg = idx
    got = pair_values(distance, "lp", emb, emb, (a, p, a, neg))  # the pairs' rows, as the loss evaluates them
    mat = make_distance()(emb)  # (B, B), PML's
    assert torch.equal(got[0], mat[a, p])
    assert torch.equal(got[1], mat[a, neg])
    ours_fn = pt.NTXentLoss(temperature=tau, distance=make_distance())
    forbid_matrix(ours_fn.distance)
    ours = run(ours_fn, emb, None, idx)
    exact = run(losses.NTXentLoss(temperature=tau, distance=make_distance()), emb.double(), None, idx)
    assert_near(ours, exact, torch.float16, tau, "against PML in float64")
    pml = run(losses.NTXentLoss(temperature=tau, distance=make_distance()), emb, None, idx)
    assert_near(ours, pml, torch.float16, tau, "against PML in float16")


def test_float16_lp_distance_at_the_issues_size() -> None:
    # N = M = 32, d = 64, the article's call: PML's float16 matrix is 1088 x 1088 row pairs of 64 (~600 MB at peak);
    # the pairs' rows are 2 * 2048 of 64. Measured by what is built, not by a clock or the allocator.
    n = m = 32
    d = 64
    emb = torch.randn(2 * n + n * m, d, generator=torch.Generator().manual_seed(2)).half()
    loss_fn = pt.NTXentLoss(distance=distances.LpDistance())
    forbid_matrix(loss_fn.distance)
    with NoLargerThan(2 * n * m * d):  # (P + Q) d: the rows gathered for the pairs, once
        loss = loss_fn(emb.requires_grad_(), indices_tuple=pt.build_indices(n, m))
        loss.backward()
    assert loss.dtype == torch.float16
    assert torch.isfinite(loss)
    assert emb.grad is not None
    assert torch.isfinite(emb.grad).all()


# ------------------------------------------------------------------ every known distance, every dtype: no matrix


DISTANCES = [
    pytest.param(lambda: distances.CosineSimilarity(), id="cosine"),
    pytest.param(lambda: distances.DotProductSimilarity(normalize_embeddings=False), id="dot-raw"),
    *LP_DISTANCES,
    pytest.param(lambda: distances.SNRDistance(), id="snr"),
]
DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float32, id="float32"),
    pytest.param(F64, id="float64"),
]


@pytest.mark.sweep(fast=8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_distance", DISTANCES)
def test_rows_in_every_dtype(make_distance: Callable[[], distances.BaseDistance], dtype: torch.dtype) -> None:
    n, m, d, tau = 8, 8, 16, 0.5  # B*R = 80² = 6400 elements > 2 (P + Q) d = 4096: the pairs' rows, never the matrix
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(2 * n + n * m, d, generator=g, dtype=F64) / d**0.5).to(dtype)  # rows of norm ~1
    idx = pt.build_indices(n, m)
    loss_fn = pt.NTXentLoss(temperature=tau, distance=make_distance())
    forbid_matrix(loss_fn.distance)
    with NoLargerThan(2 * n * m * d):  # (P + Q) d < B*R
        ours = run(loss_fn, emb, None, idx)
    assert ours[0].dtype == dtype
    exact = run(losses.NTXentLoss(temperature=tau, distance=make_distance()), emb.double(), None, idx)
    assert_near(ours, exact, dtype, tau, "against PML in float64")


def test_the_checks_see_pmls_matrix() -> None:
    # The spy and the budget can fail: PML's own float16 LpDistance call (its matrix) fails each of them.
    emb = torch.randn(20, 8).half()
    distance = distances.LpDistance()
    forbid_matrix(distance)
    with pytest.raises(AssertionError, match="the 20 x 20 matrix was built"):
        losses.NTXentLoss(distance=distance)(emb, indices_tuple=pt.build_indices(4, 3))
    with NoLargerThan(2 * 24 * 8), pytest.raises(AssertionError, match="more than the 384 elements allowed"):
        losses.NTXentLoss(distance=distances.LpDistance())(emb, indices_tuple=pt.build_indices(4, 3))
