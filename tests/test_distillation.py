"""Distillation from a teacher (``distillation="kl" | "margin_mse"``, ``teacher_scores``, ``infonce_weight``).

The library against ``tests/formula.distilled_loop`` (float64, loop by loop; itself checked against closed forms and
sentence-transformers 6.2 in ``test_objective_refs.py``): loss and gradients to 1e-12, over both terms, the InfoNCE
weight, K, ragged masks (NaN in the masked teacher entries), per-anchor / in-batch / shared layouts, chunk sizes,
the teacher temperature and a learnable τ. Then the other entry points (``InfoNCE``, ``cached_step``,
``reference_infonce``), ``torch.func``, half precision, the errors; slow: the installed peers and ``torch.compile``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from formula import distilled_loop
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import AvgNonZeroReducer, DoNothingReducer
from torch import nn

import pml_triplets as pt

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N, M, D = 5, 4, 6
KINDS = ("kl", "margin_mse")


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def data(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """anchors [N, d], positives [N, K, d] near them, negatives [N, M, d], a ragged mask, teacher scores [N, K+M]."""
    a = rand(seed, N, D)
    p = a[:, None] + 0.7 * rand(seed + 1, N, k, D)
    neg = rand(seed + 2, N, M, D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    return a, p, neg, mask, 3.0 * rand(seed + 3, N, k + M)


def value_and_grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], who: str) -> None:
    names = ("loss", "anchors", "positives", "negatives", "shared", "temperature")
    for name, x, y in zip(names, got, want, strict=False):
        torch.testing.assert_close(x, y, **TOL, msg=lambda s, name=name: f"[{who}] {name}: {s}")


# The whole grid is slow (about 0.5 s a case, the loops); the fast run keeps the ragged-mask, K = 2, weight 0.5,
# shared-negatives cases.
GRID = [
    pytest.param(kind, weight, k, masked, layout,
                 marks=() if (masked, k, weight, layout) == (True, 2, 0.5, "shared") else pytest.mark.slow)
    for kind in KINDS for weight in (0.0, 0.5, 1.0) for k in (1, 2) for masked in (False, True)
    for layout in ("own", "in_batch", "shared")
]  # fmt: skip


@pytest.mark.parametrize(("kind", "weight", "k", "masked", "layout"), GRID)
def test_equals_the_formula(kind: str, weight: float, k: int, masked: bool, layout: str) -> None:
    a, p, neg, mask, t = data(k, seed=k + 10 * masked)
    if masked:  # whatever a masked negative's teacher entry holds is never read
        t = t.clone()
        t[:, k:][~mask] = float("nan")
    shared = rand(7, 3, D)
    # (teacher temperature, learnable τ): the default τ_t = τ (a tensor τ's gradient flows through both softmaxes)
    cases = [(None, False), (None, True)] + ([(0.3, True)] if kind == "kl" else [])
    for tau_t, learnable in cases:
        leaves = [x.clone().requires_grad_() for x in (a, p, neg, shared)]
        tau = torch.tensor(0.2, dtype=F64, requires_grad=True) if learnable else 0.2
        options: dict[str, Any] = {"in_batch": layout == "in_batch"}
        if layout == "shared":
            options["shared"] = leaves[3]
        loop = distilled_loop(*leaves[:3], t, tau, distillation=kind, teacher_tau=tau_t, infonce_weight=weight,
                              mask=mask if masked else None, **options)  # fmt: skip
        extra = [tau] if learnable else []
        want = value_and_grads(loop, leaves + extra)  # type: ignore[operator]
        options = {"in_batch": layout == "in_batch", "shared_negatives": leaves[3] if layout == "shared" else None}
        for size in (1, 3, None):
            got = pt.infonce(*leaves[:3], negatives_mask=mask if masked else None, teacher_scores=t,
                             distillation=kind, teacher_temperature=tau_t, infonce_weight=weight, temperature=tau,
                             chunk_size=size, **options)  # type: ignore[arg-type]  # fmt: skip
            assert_same(value_and_grads(got, leaves + extra), want, f"chunk_size={size}, tau_t={tau_t}")  # type: ignore[operator]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("distance", "sim"),
    [(DotProductSimilarity(normalize_embeddings=False), "dot"), (LpDistance(normalize_embeddings=False), "euclidean")],
)
def test_the_loss_fns_similarity(kind: str, distance: Any, sim: str) -> None:
    a, p, neg, mask, t = data(2, seed=3)
    leaves = [x.clone().requires_grad_() for x in (a, p, neg)]
    loss_fn = NTXentLoss(temperature=0.5, distance=distance)
    got = pt.infonce(*leaves, loss_fn=loss_fn, negatives_mask=mask, teacher_scores=t, distillation=kind,
                     infonce_weight=0.5)  # fmt: skip
    want = distilled_loop(*leaves, t, 0.5, distillation=kind, infonce_weight=0.5, mask=mask, sim=sim)
    assert_same(value_and_grads(got, leaves), value_and_grads(want, leaves), sim)


def test_a_group_without_negatives_and_ids() -> None:
    # id clashes leave the group as they leave the softmax: the same as masking those negatives
    a, p, neg, _, t = data(1, seed=5)
    pid, nid = torch.arange(N)[:, None], torch.full((N, M), -1)
    nid[0, 1], nid[2, 3] = 0, 2  # row 0's negative 1 and row 2's negative 3 are their own positives
    mask = nid < 0
    for kind in KINDS:
        got = pt.infonce(a, p, neg, positive_ids=pid, negative_ids=nid, teacher_scores=t, distillation=kind)
        want = distilled_loop(a, p, neg, t, 0.07, distillation=kind, mask=mask)
        torch.testing.assert_close(got, want, **TOL)
    # every negative masked: margin_mse has no margin (0), the KL is over the positives alone (0 with K = 1)
    none = torch.zeros(N, M, dtype=torch.bool)
    for kind in KINDS:
        got = pt.infonce(a, p, neg, negatives_mask=none, teacher_scores=t, distillation=kind, infonce_weight=0.0)
        assert got.item() == 0.0


def test_module_equals_function_and_per_pair_losses() -> None:
    a, p, neg, mask, t = data(2)
    tau = nn.Parameter(torch.tensor(0.3, dtype=F64))
    module = pt.InfoNCE(tau, distillation="kl", teacher_temperature=0.5, infonce_weight=0.25)
    got = module(a, p, neg, negatives_mask=mask, teacher_scores=t)
    want = pt.infonce(a, p, neg, negatives_mask=mask, teacher_scores=t, temperature=tau, distillation="kl",
                      teacher_temperature=0.5, infonce_weight=0.25)  # fmt: skip
    torch.testing.assert_close(got, want, **TOL)
    assert "distillation='kl'" in repr(module)
    queue = pt.NegativeQueue(4, D, dtype=F64)
    queue.enqueue(rand(9, 4, D))
    torch.testing.assert_close(
        module(a, p, neg, negatives_mask=mask, teacher_scores=t, queue=queue),
        module(a, p, neg, negatives_mask=mask, teacher_scores=t, shared_negatives=queue.negatives),
        **TOL,
    )
    # DoNothingReducer: each pair carries its anchor's share of the term, so their mean is the loss
    for kind in KINDS:
        per_pair = pt.infonce(a, p, neg, negatives_mask=mask, teacher_scores=t, distillation=kind,
                              loss_fn=NTXentLoss(0.1, reducer=DoNothingReducer()))  # fmt: skip
        mean = pt.infonce(a, p, neg, negatives_mask=mask, teacher_scores=t, distillation=kind, temperature=0.1)
        assert per_pair.shape == (N * 2,)
        torch.testing.assert_close(per_pair.mean(), mean, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_infonce_equals_the_formula(kind: str) -> None:
    a, p, neg, mask, t = data(2, seed=4)
    t[:, 2:][~mask] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (a, p, neg)]
    tau = torch.tensor(0.25, dtype=F64, requires_grad=True)
    tau_t = 0.4 if kind == "kl" else None
    got = pt.reference_infonce(*leaves, tau, negatives_mask=mask, in_batch=True, teacher_scores=t,
                               distillation=kind, teacher_temperature=tau_t, infonce_weight=0.5)  # fmt: skip
    want = distilled_loop(*leaves, t, tau, distillation=kind, teacher_tau=tau_t, infonce_weight=0.5, mask=mask,
                          in_batch=True)  # fmt: skip
    assert_same(value_and_grads(got, [*leaves, tau]), value_and_grads(want, [*leaves, tau]), "reference")


def test_cached_step_equals_the_full_batch_step() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(6, 5).double()
    x_a, x_p, x_n = rand(1, N, 6), rand(2, N, 6), rand(3, N, M, 6)
    _, _, _, mask, t = data(1)
    options: dict[str, Any] = {"negatives_mask": mask, "teacher_scores": t, "distillation": "margin_mse",
                               "infonce_weight": 0.5, "temperature": 0.2}  # fmt: skip
    loss = pt.cached_step(encoder, x_a, x_p, x_n, mini_batch_size=2, **options)
    cached = [w.grad.clone() for w in encoder.parameters()]  # type: ignore[union-attr]
    full = pt.infonce(encoder(x_a), encoder(x_p), encoder(x_n), **options)
    torch.testing.assert_close(loss, full.detach(), **TOL)
    for got, want in zip(cached, torch.autograd.grad(full, list(encoder.parameters())), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_func_grad() -> None:
    a, p, neg, mask, t = data(1)

    def loss(a: torch.Tensor) -> torch.Tensor:
        return pt.infonce(a, p, neg, negatives_mask=mask, teacher_scores=t, distillation="kl", infonce_weight=0.5)

    got = torch.func.grad(loss)(a)
    leaf = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_half_inputs_accumulate_in_float32(kind: str) -> None:
    a, p, neg, mask, t = data(1, seed=8)
    half = [x.bfloat16() for x in (a, p, neg, t)]
    got = pt.infonce(*half[:3], negatives_mask=mask, teacher_scores=half[3], distillation=kind, temperature=0.1)
    want = distilled_loop(*(x.double() for x in half[:3]), half[3].double(), 0.1, distillation=kind, mask=mask)
    assert got.dtype == torch.bfloat16
    # float32 inside: within bfloat16's rounding of the result (a bfloat16 computation would be far off)
    assert abs(got.double().item() - want.item()) <= 8e-3 * max(1.0, abs(want.item()))


def call(**given: Any) -> torch.Tensor:
    a, p, neg, _, t = data(1)
    return pt.infonce(a, p, neg, **{"teacher_scores": t, "distillation": "kl", **given})


@pytest.mark.parametrize(
    ("given", "error", "match"),
    [
        ({"distillation": None}, ValueError, r"`teacher_scores` \[N, K \+ M\] must be given exactly when"),
        ({"teacher_scores": None}, ValueError, r"teacher_scores=None and distillation='kl'"),
        ({"teacher_scores": torch.zeros(N, M, dtype=F64)}, ValueError,
         r"`teacher_scores` must be \[N, K \+ M\] = \[5, 1 \+ 4\] .*; got \(5, 4\)"),
        ({"teacher_scores": torch.zeros(N, 1 + M, dtype=torch.long)}, TypeError, "`teacher_scores` must hold floating"),
        ({"teacher_scores": [[0.0] * 5] * 5}, TypeError, "`teacher_scores` must be a torch.Tensor"),
        ({"distillation": "mse"}, ValueError, r"`distillation` must be one of \('kl', 'margin_mse', None\)"),
        ({"infonce_weight": -1.0}, ValueError, "`infonce_weight` must be >= 0"),
        ({"infonce_weight": "1"}, TypeError, "`infonce_weight` must be a float"),
        ({"teacher_temperature": 0.0}, ValueError, "`teacher_temperature` must be positive"),
        ({"distillation": "margin_mse", "teacher_temperature": 0.5}, ValueError, "has none"),
        ({"distillation": None, "teacher_scores": None, "infonce_weight": 0.5}, ValueError,
         "`infonce_weight=0.5` does nothing without `distillation`"),
        ({"engine": "pml"}, ValueError, "computed by the dense engine only"),
        ({"loss_fn": NTXentLoss(reducer=AvgNonZeroReducer())}, ValueError, "AvgNonZeroReducer"),
    ],
)  # fmt: skip
def test_errors(given: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(**given)


def test_reference_errors() -> None:
    a, p, neg, _, t = data(1)
    with pytest.raises(ValueError, match="must be given exactly when"):
        pt.reference_infonce(a, p, neg, teacher_scores=t)
    with pytest.raises(ValueError, match=r"\[N, K \+ M\] = \[5, 1 \+ 4\]"):
        pt.reference_infonce(a, p, neg, teacher_scores=t[:, :3], distillation="kl")
    with pytest.raises(ValueError, match="`distillation` must be one of"):
        pt.reference_infonce(a, p, neg, teacher_scores=t, distillation="mse")


# ================================================================ slow: installed peers, torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("sim", ["cosine", "dot"])
@pytest.mark.parametrize(("tau_s", "tau_t"), [(1.0, 1.0), (0.05, 0.2)])
def test_distill_kl_div_loss(tau_s: float, tau_t: float, sim: str) -> None:
    from test_objective_refs import ST_SIMS, st_losses, st_util

    a, p, neg, _, t = data(1, seed=21)
    peer_loss = st_losses().DistillKLDivLoss(nn.Identity(), similarity_fct=getattr(st_util(), ST_SIMS[sim]),
                                             student_temperature=tau_s, teacher_temperature=tau_t)  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (a, p, neg)]
    peer = peer_loss.compute_loss_from_embeddings([leaves[0], leaves[1][:, 0], *leaves[2].unbind(1)], t)
    distance = DotProductSimilarity(normalize_embeddings=False) if sim == "dot" else None
    loss_fn = NTXentLoss(tau_s, **({"distance": distance} if distance else {}))
    got = pt.infonce(*leaves, loss_fn=loss_fn, teacher_scores=t, distillation="kl", teacher_temperature=tau_t,
                     infonce_weight=0.0)  # fmt: skip
    assert_same(value_and_grads(got, leaves), value_and_grads(peer, leaves), "DistillKLDivLoss")


@pytest.mark.slow
@pytest.mark.parametrize("sim", ["cosine", "dot"])
def test_margin_mse_loss(sim: str) -> None:
    from test_objective_refs import ST_SIMS, st_losses, st_util

    a, p, neg, _, t = data(1, seed=31)
    peer_loss = st_losses().MarginMSELoss(nn.Identity(), similarity_fct=getattr(st_util(), ST_SIMS[sim]))
    leaves = [x.clone().requires_grad_() for x in (a, p, neg)]
    peer = peer_loss.compute_loss_from_embeddings([leaves[0], leaves[1][:, 0], *leaves[2].unbind(1)], t)
    loss_fn = NTXentLoss(0.5, distance=DotProductSimilarity(normalize_embeddings=False)) if sim == "dot" else None
    got = pt.infonce(*leaves, loss_fn=loss_fn, teacher_scores=t, distillation="margin_mse", infonce_weight=0.0)
    assert_same(value_and_grads(got, leaves), value_and_grads(peer, leaves), "MarginMSELoss")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind: str) -> None:
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    criterion = pt.InfoNCE(0.1, distillation=kind, chunk_size=2)
    step = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        a, p, neg, mask, t = (x.float() if x.is_floating_point() else x for x in data(1, seed=seed))
        leaf = a.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = step(leaf, p, neg, negatives_mask=mask, teacher_scores=t)
        want = criterion(a, p, neg, negatives_mask=mask, teacher_scores=t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.backward()
    assert counts["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize(
    "debiased",
    [
        pytest.param({"debias_prior": 0.1}, id="prior"),
        pytest.param({"hcl_beta": 0.5}, id="hcl"),
        pytest.param({"debias_prior": 0.1, "hcl_beta": 1.0, "decoupled": True}, id="all-three"),
    ],
)
@pytest.mark.parametrize("distillation", ["kl", "margin_mse"])
def test_distillation_beside_the_debiased_family(debiased: dict[str, Any], distillation: str) -> None:
    # weight × the debiased loss (formula.debiased_loop) + the term (formula.distillation_term), loss and gradients
    from formula import debiased_loop, distillation_term

    g = torch.Generator().manual_seed(3)
    a, p = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    n, t = torch.randn(6, 3, 8, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = False
    a_, p_, n_ = (x.clone().requires_grad_() for x in (a, p, n))
    ours = pt.infonce(a_, p_, n_, temperature=0.5, negatives_mask=mask, teacher_scores=t, distillation=distillation,
                      infonce_weight=0.5, **debiased)  # fmt: skip
    a2, p2, n2 = (x.clone().requires_grad_() for x in (a, p, n))
    want = 0.5 * debiased_loop(a2, p2, n2, 0.5, mask=mask, **debiased)
    want = want + distillation_term(a2, p2, n2, t, 0.5, distillation=distillation, mask=mask)
    ours.backward()
    want.backward()
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    for mine, theirs in ((a_, a2), (p_, p2), (n_, n2)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
