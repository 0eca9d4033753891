"""Values against closed forms and the loop-by-loop formula, the article's recipe, the index helpers, the module."""

from __future__ import annotations

import math

import pytest
import torch
from formula import infonce_loop
from helpers import F64, TOL, batch, triplets
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

import pml_triplets as pt

# Float64 results against a closed form or the formula agree to 1e-12 relative: a few hundred roundings of
# 2.2e-16 at most, on values of order 1 to 10. Gradients and other dtypes use TOL (helpers.py).
# ---------------------------------------------------------------- closed forms, derived by hand


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
@pytest.mark.parametrize("m", [1, 3, 7])
def test_orthonormal_negatives(tau: float, m: int) -> None:
    # a = p = e0, negatives e1..eM: cos(a,p) = 1, cos(a,n) = 0  =>  -log(e^{1/τ} / (e^{1/τ} + M)) = log(1 + M e^{-1/τ})
    e = torch.eye(m + 1, dtype=F64)
    loss = pt.infonce(e[:1], e[:1], e[None, 1:], temperature=tau)
    assert loss.item() == pytest.approx(math.log1p(m * math.exp(-1 / tau)), rel=1e-12)


@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_negatives_equal_positive(tau: float) -> None:
    # every negative is the positive: all logits equal  =>  log(1 + M), whatever τ
    a, p, _ = triplets(1, 1, 5, seed=3)
    n = p[:, None].expand(1, 4, 5)
    assert pt.infonce(a, p, n, temperature=tau).item() == pytest.approx(math.log(5), rel=1e-12)


def test_opposite_positive() -> None:
    # p = -a, negatives orthogonal: cos = -1 and 0  =>  log(1 + M e^{1/τ})
    e = torch.eye(4, dtype=F64)
    loss = pt.infonce(e[:1], -e[:1], e[None, 1:], temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(3 * math.exp(2.0)), rel=1e-12)


def test_dot_product_closed_form() -> None:
    # unnormalized dot: a = e0, p = 2 e0, n_j = c_j e0  =>  log(1 + Σ_j e^{(c_j - 2)/τ})
    from pytorch_metric_learning.distances import DotProductSimilarity

    e0 = torch.eye(3, dtype=F64)[0]
    c = [0.5, -1.0, 3.0]
    n = torch.stack([cj * e0 for cj in c])[None]
    fn = NTXentLoss(temperature=0.25, distance=DotProductSimilarity(normalize_embeddings=False))
    loss = pt.infonce(e0[None], 2 * e0[None], n, loss_fn=fn)
    assert loss.item() == pytest.approx(math.log1p(sum(math.exp((cj - 2) / 0.25) for cj in c)), rel=1e-12)


def test_euclidean_closed_form() -> None:
    # LpDistance without normalization: anchor at 0, positive at distance 1, negatives at distance r_j
    #   => s = -distance  =>  log(1 + Σ_j e^{(1 - r_j)/τ})
    from pytorch_metric_learning.distances import LpDistance

    e = torch.eye(3, dtype=F64)
    r = [2.0, 0.5, 1.5]
    n = torch.stack([r[0] * e[1], r[1] * e[2], -r[2] * e[0]])[None]
    fn = NTXentLoss(temperature=0.5, distance=LpDistance(normalize_embeddings=False))
    loss = pt.infonce(torch.zeros(1, 3, dtype=F64), e[:1], n, loss_fn=fn)
    assert loss.item() == pytest.approx(math.log1p(sum(math.exp((1 - rj) / 0.5) for rj in r)), rel=1e-12)


def test_two_positives_closed_form() -> None:
    # a = e0, positives e0 (cos 1) and e1 (cos 0), negatives e2, e3 (cos 0):
    #   k=0: log(1 + 2 e^{-1/τ});  k=1: -log(1 / (1 + 2)) = log 3;  the loss is their mean.
    e = torch.eye(4, dtype=F64)
    tau = 0.2
    loss = pt.infonce(e[:1], e[None, :2], e[None, 2:], temperature=tau)
    expected = (math.log1p(2 * math.exp(-1 / tau)) + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_default_temperature_is_007() -> None:
    e = torch.eye(3, dtype=F64)
    assert pt.infonce(e[:1], e[:1], e[None, 1:]).item() == pytest.approx(math.log1p(2 * math.exp(-1 / 0.07)))


# ---------------------------------------------------------------- against the loop-by-loop formula


SHAPES = [
    pytest.param(1, 1, 4, id="N1-M1"),
    pytest.param(1, 5, 3, id="N1-M5"),
    pytest.param(5, 1, 6, id="N5-M1"),
    pytest.param(6, 4, 8, id="N6-M4"),
    pytest.param(9, 3, 2, id="N9-M3-d2"),
]


@pytest.mark.parametrize(("n", "m", "d"), SHAPES)
def test_matches_formula(n: int, m: int, d: int, device: str, dtype: torch.dtype) -> None:
    a, p, neg = (x.to(device=device, dtype=dtype) for x in triplets(n, m, d, seed=n * 10 + m))
    loss = pt.infonce(a, p, neg, temperature=0.1)
    expected = infonce_loop(a.cpu(), p.cpu(), neg.cpu(), 0.1)
    assert loss.dtype == dtype
    assert loss.device.type == device
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("n", "m", "d"), SHAPES)
def test_gradients_match_formula(n: int, m: int, d: int, device: str) -> None:
    a, p, neg = (x.to(device).requires_grad_() for x in triplets(n, m, d, seed=7 + n))
    pt.infonce(a, p, neg, temperature=0.3).backward()
    leaves = [x.detach().cpu().requires_grad_() for x in (a, p, neg)]
    infonce_loop(*leaves, 0.3).backward()
    for got, want in zip((a, p, neg), leaves, strict=True):
        assert got.grad is not None
        assert want.grad is not None
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=TOL[F64][0], atol=1e-12)  # entries are >> 1e-12


def test_n1_m1_has_value_and_gradient_where_pml_returns_zero() -> None:
    a, p, neg = (x.requires_grad_() for x in triplets(1, 1, 4, seed=3))
    plain = NTXentLoss()(pt.concat_embeddings(a, p, neg), indices_tuple=pt.build_indices(1, 1))
    assert plain.item() == 0.0  # PML's shortcut when every index tensor has length <= 1
    for engine in ("dense", "pml"):
        a.grad = None
        loss = pt.infonce(a, p, neg, engine=engine)
        assert loss.item() == pytest.approx(infonce_loop(a, p, neg).item(), rel=1e-12)
        loss.backward()
        assert a.grad is not None
        assert a.grad.abs().sum() > 0


def test_reference_infonce_matches_formula() -> None:
    b = batch(5, 3, 4, k=2, seed=11, keep=0.6)
    a, p, neg, mask = b["anchors"], b["positives"], b["negatives"], b["negatives_mask"]
    got = pt.reference_infonce(a, p, neg, 0.2, negatives_mask=mask, in_batch=True)
    assert got.item() == pytest.approx(infonce_loop(a, p, neg, 0.2, mask=mask, in_batch=True).item(), rel=1e-12)


def test_reference_infonce_keeps_dtype() -> None:
    a, p, neg = (x.float() for x in triplets(3, 2, 4))
    assert pt.reference_infonce(a, p, neg).dtype == torch.float32


# ---------------------------------------------------------------- the article's recipe and the index helpers


def article_recipe(a: torch.Tensor, p: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Copied from the article: anchor and positive indices with `.repeat(M)`."""
    n, m, d = neg.shape
    idx_a = torch.arange(0, n).repeat(m)
    idx_p = torch.arange(n, n * 2).repeat(m)
    idx_n = torch.arange(n * 2, n * 2 + n * m)
    embeddings = torch.cat([a, p, neg.reshape(-1, d)], dim=0)
    return NTXentLoss()(embeddings, indices_tuple=(idx_a, idx_p, idx_n))


def test_article_recipe_is_wrong_and_build_indices_is_right() -> None:
    a, p, neg = triplets(4, 3, 8, seed=21)
    truth = infonce_loop(a, p, neg, 0.07).item()
    recipe = article_recipe(a, p, neg).item()
    fixed = NTXentLoss()(pt.concat_embeddings(a, p, neg), indices_tuple=pt.build_indices(4, 3)).item()
    assert abs(recipe - truth) > 1e-2
    assert fixed == pytest.approx(truth, rel=1e-12)


def test_build_indices_layout() -> None:
    a, p, n = pt.build_indices(3, 2)
    assert a.tolist() == [0, 0, 1, 1, 2, 2]
    assert p.tolist() == [3, 3, 4, 4, 5, 5]
    assert n.tolist() == [6, 7, 8, 9, 10, 11]
    assert all(t.dtype == torch.int64 for t in (a, p, n))
    # row 2N + j of concat_embeddings is negative j % M of anchor j // M, and a[j] must be that anchor
    assert all(a[j].item() == j // 2 for j in range(6))


@pytest.mark.parametrize("where", [pytest.param("fixture", id="device"), pytest.param("meta", id="meta")])
def test_build_indices_device(device: str, where: str) -> None:
    # "meta" is never the default device, so this fails on a CPU-only machine too if `device=` is ignored
    target = device if where == "fixture" else "meta"
    assert all(t.device.type == target for t in pt.build_indices(2, 2, device=target))


def test_concat_embeddings_layout() -> None:
    a, p, neg = triplets(3, 2, 4)
    emb = pt.concat_embeddings(a, p, neg)
    assert emb.shape == (3 + 3 + 6, 4)
    assert torch.equal(emb[:3], a)
    assert torch.equal(emb[3:6], p)
    assert torch.equal(emb[6 + 1 * 2 + 1], neg[1, 1])


def test_pairing_matrix_recipe_vs_build_indices() -> None:
    n, m = 4, 3
    right = pt.pairing_matrix(pt.build_indices(n, m), n, m)
    block = torch.block_diag(*[torch.ones(1, m, dtype=torch.bool)] * n)
    assert torch.equal(right, block)
    recipe = (torch.arange(n).repeat(m), torch.arange(n, 2 * n).repeat(m), torch.arange(2 * n, 2 * n + n * m))
    wrong = pt.pairing_matrix(recipe, n, m)
    # negative row j is compared with anchor j % N; with N=4, M=3 most of them land off their block
    expected = torch.zeros(n, n * m, dtype=torch.bool)
    for j in range(n * m):
        expected[j % n, j] = True
    assert torch.equal(wrong, expected)
    # j = 0, 5, 6, 11 happen to satisfy j % 4 == j // 3; the other 8 pairings are wrong
    assert (wrong & ~block).sum() == 8


def test_pairing_matrix_four_tuple_and_unused_anchor() -> None:
    # anchor 1 has negative pairs but no positive pair: NTXentLoss never uses them
    a1, p = torch.tensor([0]), torch.tensor([2])
    a2, neg = torch.tensor([0, 1]), torch.tensor([4, 6])
    mat = pt.pairing_matrix((a1, p, a2, neg), 2, 2)
    assert mat.int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------- module form


def test_module_equals_function() -> None:
    a, p, neg = triplets(5, 4, 6, seed=5)
    crit = pt.InfoNCE(temperature=0.2)
    assert crit(a, p, neg).item() == pytest.approx(pt.infonce(a, p, neg, temperature=0.2).item(), rel=1e-15)
    assert "temperature=0.2" in repr(crit)


def test_module_moves_with_to(device: str) -> None:
    fn = NTXentLoss(temperature=0.2)
    fn.register_buffer("probe", torch.zeros(2))  # PML's losses hold no tensor of their own: give `.to` one to move
    crit = pt.InfoNCE(loss_fn=fn, learnable_temperature=True)
    assert {"loss_fn", "loss_fn.distance"} <= {name for name, _ in crit.named_modules()}

    assert crit.to(torch.float64) is crit
    assert crit.loss_fn is fn
    assert fn.probe.dtype == F64
    assert isinstance(crit.log_temperature, nn.Parameter)
    assert crit.log_temperature.dtype == F64

    crit.to(device)
    assert fn.probe.device.type == device
    assert crit.log_temperature.device.type == device
    a, p, neg = (x.to(device) for x in triplets(4, 3, 5, seed=13))
    loss = crit(a, p, neg)
    assert loss.dtype == F64
    assert loss.device.type == device
    want = infonce_loop(a.cpu(), p.cpu(), neg.cpu(), crit.log_temperature.detach().cpu().exp())
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert fn.temperature == 0.2  # the learnable temperature is handed to the computation, never written into fn

    crit.to("meta")  # never the default device: fails on a CPU-only machine too if something stays behind
    assert fn.probe.device.type == "meta"
    assert crit.log_temperature.device.type == "meta"
