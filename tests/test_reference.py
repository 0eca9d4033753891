"""``pt.reference_infonce``, the package's float64 yardstick, checked from three sides.

1. Against ``tests/formula.py``, a loop written separately from the same formulas (docs), over a seeded sweep of
   random option combinations: loss and every gradient to 1e-9 in float64.
2. Against closed forms derived by hand on orthonormal vectors, where every similarity is 0 or 1.
3. Against plain PML (``NTXentLoss`` on hand-built pairs: its distances, reducers, regularizers) and against
   ``pt.infonce`` itself on a few combinations.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from formula import infonce_loop
from helpers import DIST, F64, FORMULA_NAMES, Dist, unit
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance, SNRDistance
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    DoNothingReducer,
    PerAnchorReducer,
    SumReducer,
    ThresholdReducer,
)
from pytorch_metric_learning.regularizers import LpRegularizer

import pml_triplets as pt

A2P, P2A, A2A, P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"
TOL = {"rtol": 1e-9, "atol": 1e-9}
NAMED = {"cosine": "cosine", "dot-raw": "dot", "lp-raw": "euclidean"}  # DIST key -> reference's `similarity=`
EMBEDDINGS = ("anchors", "positives", "negatives", "shared_negatives")


# ------------------------------------------------------------------------------------ 1. the independent loop


def draw(seed: int) -> tuple[dict[str, Any], dict[str, Any], str, str, bool]:
    """(embeddings, options in infonce's names, DIST key, reduction, tensor temperature) of one random call.

    Positives sit near their anchors and some negatives near a positive, ids come from few values and the guide is
    another view of the same points, so that masks, ids, hardness and the margin filter all bite.
    """
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    n, k, m, d = rng.randint(1, 4), rng.choice([1, 2]), rng.choice([0, 1, 3]), 4
    a = torch.randn(n, d, generator=g, dtype=F64)
    sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.25, -1.0, 1.0).to(F64)  # g(a, p) < 0 bites "relative"
    p = sign * a[:, None] + 0.7 * torch.randn(n, k, d, generator=g, dtype=F64)  # (N, K, d)
    neg = torch.randn(n, m, d, generator=g, dtype=F64)
    if m:
        neg[:, 0] = p[:, 0] + 0.3 * torch.randn(n, d, generator=g, dtype=F64)  # near-duplicates: false negatives
    x: dict[str, Any] = {"anchors": a, "positives": p[:, 0] if k == 1 and rng.random() < 0.5 else p}
    x["negatives"] = neg if m else None
    opt: dict[str, Any] = {"in_batch": rng.random() < 0.6}
    if rng.random() < 0.4:
        x["shared_negatives"] = torch.randn(2, d, generator=g, dtype=F64)
    if not m and "shared_negatives" not in x:
        opt["in_batch"] = True
    if m and rng.random() < 0.4:
        opt["negatives_mask"] = torch.rand(n, m, generator=g) < 0.6
    shared = "shared_negatives" in x
    if rng.random() < 0.4 and (m or opt["in_batch"] or shared):
        opt["positive_ids"] = torch.randint(0, 4, tuple(x["positives"].shape[:-1]), generator=g)
        if shared and (rng.random() < 0.7 or not (m or opt["in_batch"])):
            opt["shared_negative_ids"] = torch.randint(0, 4, (2,), generator=g)
        if m and (rng.random() < 0.7 or not (opt["in_batch"] or "shared_negative_ids" in opt)):
            opt["negative_ids"] = torch.randint(0, 4, (n, m), generator=g)
    opt |= retrieval(rng, opt["in_batch"])
    if "false_negative_margin" in opt and "shared_negatives" not in x and rng.random() < 0.5:
        w = torch.randn(d, 3, generator=g, dtype=F64)  # the guide: a projection of the points, plus noise
        views = [
            None if t is None else t @ w + 0.2 * torch.randn(*t.shape[:-1], 3, generator=g, dtype=F64)
            for t in (x["anchors"], x["positives"], x["negatives"])
        ]
        opt["guide"] = tuple(views)
    return x, opt, rng.choice(list(DIST)), rng.choice(["mean", "mean", "none"]), rng.random() < 0.3


def retrieval(rng: random.Random, in_batch: bool) -> dict[str, Any]:
    """Random directions, partition, hardness and margin, each present about half of the time."""
    opt: dict[str, Any] = {}
    if in_batch and rng.random() < 0.6:
        opt["directions"] = (A2P, *[d for d in (P2A, A2A, P2P) if rng.random() < 0.5])
        if not {A2A, P2P} & set(opt["directions"]) and rng.random() < 0.5:
            opt["partition"] = "per_direction"
    if rng.random() < 0.5:
        opt["hardness_mode"] = rng.choice(["own", "all", "in_batch"] if in_batch else ["own"])
        opt["hardness_strength"] = rng.choice([0.5, 3.0])
    if rng.random() < 0.5:
        opt["false_negative_margin"] = rng.choice([0.0, 0.1, 0.3])
        opt["margin_strategy"] = rng.choice(["absolute", "relative"])
    return opt


def formula(x: dict[str, Any], opt: dict[str, Any], dist: Dist, tau: Any, reduction: str) -> torch.Tensor:
    """tests/formula.py on the same call (normalizing first where the distance does, as tests/helpers.py does)."""

    emb = {key: unit(v) if dist.unit and v is not None else v for key, v in x.items()}
    kw = {FORMULA_NAMES[key]: v for key, v in opt.items()}
    return infonce_loop(
        emb["anchors"],
        emb["positives"],
        emb["negatives"],
        tau,
        shared=emb.get("shared_negatives"),
        sim=dist.sim,
        reduction=reduction,
        **kw,
    )


def reference(x: dict[str, Any], opt: dict[str, Any], key: str, tau: Any, reduction: str, named: bool) -> Any:
    """The reference on the call: by ``similarity=`` name where one exists and ``named``, else by ``loss_fn``."""
    if named and key in NAMED and reduction == "mean":
        return pt.reference_infonce(**x, temperature=tau, similarity=NAMED[key], **opt)  # type: ignore[arg-type]
    reducer = DoNothingReducer() if reduction == "none" else None
    fn = NTXentLoss(temperature=tau, distance=DIST[key].make(), **({"reducer": reducer} if reducer else {}))
    return pt.reference_infonce(**x, loss_fn=fn, **opt)


def loss_and_grads(compute: Any, x: dict[str, Any], tau: Any) -> tuple[torch.Tensor, list[Any]]:
    """``compute(leaves, tau)`` weighted by fixed random weights when it is a vector, and its gradients."""
    leaves = {key: None if v is None else v.detach().clone().requires_grad_() for key, v in x.items()}
    tau_leaf = tau.detach().clone().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    out = compute(leaves, tau_leaf)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).reshape(out.shape)
    wrt = [v for v in leaves.values() if v is not None] + ([tau_leaf] if isinstance(tau, torch.Tensor) else [])
    grads = torch.autograd.grad((out * weights).sum(), wrt, allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, grads, strict=True)]


SEEDS = 200


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_matches_the_independent_loop(seed: int) -> None:
    x, opt, key, reduction, tensor_tau = draw(seed)
    tau: Any = torch.tensor(0.3, dtype=F64) if tensor_tau else 0.3
    named = seed % 2 == 0
    got, got_grads = loss_and_grads(lambda e, t: reference(e, opt, key, t, reduction, named), x, tau)
    want, want_grads = loss_and_grads(lambda e, t: formula(e, opt, DIST[key], t, reduction), x, tau)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, **TOL, msg=lambda s: f"{key} {reduction} {opt}: {s}")
    for i, (gr, ref) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(gr, ref, **TOL, msg=lambda s, i=i: f"gradient {i}, {key} {opt}: {s}")


def test_the_sweep_covers_every_option() -> None:
    # the draws must exercise each option, or the sweep compares less than it claims
    seen: set[str] = set()
    for seed in range(SEEDS):
        x, opt, key, reduction, tensor_tau = draw(seed)
        seen |= {k for k, v in x.items() if v is not None} | set(opt) | {key, reduction}
        seen |= set(opt.get("directions", ())) | {str(opt.get(k)) for k in ("partition", "hardness_mode")}
        seen |= {f"K={x['positives'].shape[1]}" if x["positives"].ndim == 3 else "K=1 as [N, d]"}
        seen |= {"tensor tau"} if tensor_tau else set()
        seen |= {str(opt.get("margin_strategy"))} | ({"no negatives"} if x["negatives"] is None else set())
    want = {*EMBEDDINGS, *FORMULA_NAMES, *DIST, "mean", "none", P2A, A2A, P2P, "per_direction", "own", "all"}
    want |= {"in_batch", "K=1 as [N, d]", "K=2", "tensor tau", "absolute", "relative", "no negatives"}
    assert want <= seen, want - seen


# ---------------------------------------------------------------------------------------- 2. closed forms


TAU = 0.25
E = torch.eye(6, dtype=F64)


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        pytest.param("own", lambda h: math.log(2 + math.exp(h) + math.exp(-1 / TAU)), id="own"),
        pytest.param("all", lambda h: math.log(1 + 2 * math.exp(h) + math.exp(-1 / TAU)), id="all"),
        pytest.param(None, lambda h: math.log(3 + math.exp(-1 / TAU)), id="none"),
    ],
)
def test_hardness_closed_form(mode: str | None, want: Any) -> None:
    # a = p = e0; own negatives e0 (cosine 1) and e1 (cosine 0); one shared negative e0 (cosine 1). Logits: P = 1/τ,
    # the copies of e0 1/τ (+ h where hardened), e1 0:
    #   ℓ = log(e^{1/τ} + e^{1/τ + h·[own hardened]} + e^0 + e^{1/τ + h·[shared hardened]}) − 1/τ
    h = 2.0
    a, neg, shared = E[:1], torch.stack([E[0], E[1]])[None], E[:1]
    got = pt.reference_infonce(
        a, a, neg, TAU, shared_negatives=shared, hardness_mode=mode, hardness_strength=h if mode else 0.0
    )
    assert got.item() == pytest.approx(want(h), rel=1e-12)


GTE = (A2P, P2A, A2A, P2P)


@pytest.mark.parametrize(
    ("margin", "partition", "want"),
    [
        # threshold 1 − margin = 0.5 > 0: nothing dropped; P twice (A2P and P2A), each block N−1 = 2 terms e^0
        pytest.param(0.5, "joint", math.log(2 * math.exp(1 / TAU) + 4 * 2) - 1 / TAU, id="kept"),
        # threshold 0: cosine 0 > 0 is false, so ties are kept (a strict >)
        pytest.param(1.0, "joint", math.log(2 * math.exp(1 / TAU) + 4 * 2) - 1 / TAU, id="tie-kept"),
        # threshold −0.5: every candidate dropped, the positive pair never: log(2e^{1/τ}) − 1/τ
        pytest.param(1.5, "joint", math.log(2), id="all-dropped"),
        pytest.param(1.5, "per_direction", 0.0, id="all-dropped-per-direction"),
        pytest.param(0.5, "per_direction", math.log1p(2 * math.exp(-1 / TAU)), id="kept-per-direction"),
    ],
)
def test_directions_and_margin_closed_form(margin: float, partition: str, want: float) -> None:
    # a_i = p_i = e_i for N = 3: P = 1/τ, every other similarity 0, every guide cosine 0 but g(a_i, p_i) = 1
    e = E[:3, :3]
    directions = GTE if partition == "joint" else (A2P, P2A)
    for strategy in ("absolute", "relative"):  # |g(a_i, p_i)| = 1: the same threshold
        got = pt.reference_infonce(
            e,
            e,
            None,
            TAU,
            in_batch=True,
            directions=directions,
            partition=partition,
            false_negative_margin=margin,
            margin_strategy=strategy,
        )
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15), strategy


@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
def test_k_positives_and_ids_closed_form(with_ids: bool) -> None:
    # a_0 = e0 with positives (e0, e2); a_1 = e1 with positives (e1, e3); in-batch, no own negatives.
    # Term (i, 0): P = 1/τ; term (i, 1): P = 0. The other row's two positives have cosine 0; the anchor's own other
    # positive is never its negative. With ids [[0, 1], [0, 2]] each anchor loses the other row's id-0 positive.
    a = E[:2, :4]
    p = torch.stack([torch.stack([E[0], E[2]]), torch.stack([E[1], E[3]])])[..., :4]  # (2, 2, 4)
    ids = torch.tensor([[0, 1], [0, 2]]) if with_ids else None
    c = 1 if with_ids else 2  # candidates per term
    want = (math.log(math.exp(1 / TAU) + c) - 1 / TAU + math.log(1 + c)) / 2
    got = pt.reference_infonce(a, p, None, TAU, in_batch=True, positive_ids=ids)
    assert got.item() == pytest.approx(want, rel=1e-12)
    per_pair = pt.reference_infonce(
        a, p, None, loss_fn=NTXentLoss(TAU, reducer=DoNothingReducer()), in_batch=True, positive_ids=ids
    )
    assert per_pair.shape == (4,)
    assert per_pair.mean().item() == pytest.approx(want, rel=1e-12)


def test_temperature_gradient_closed_form() -> None:
    # a = p = e0 against M = 3 orthogonal negatives: ℓ(τ) = log(1 + M e^{−1/τ}),
    #   dℓ/dτ = M e^{−1/τ} / (τ² (1 + M e^{−1/τ}))
    tau = torch.tensor(TAU, dtype=F64, requires_grad=True)
    loss = pt.reference_infonce(E[:1], E[:1], E[None, 1:4], tau)
    (grad,) = torch.autograd.grad(loss, tau)
    q = 3 * math.exp(-1 / TAU)
    assert loss.item() == pytest.approx(math.log1p(q), rel=1e-12)
    assert grad.item() == pytest.approx(q / (TAU**2 * (1 + q)), rel=1e-12)


# ---------------------------------------------------------------------------- 3. plain PML and pt.infonce


def plain_pml(fn: NTXentLoss, a: torch.Tensor, p: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> Any:
    """PML's own forward on hand-built pairs: embeddings = anchors, ref_emb = [positives; negatives]."""
    n, m, d = neg.shape
    a2, j = mask.nonzero(as_tuple=True)
    pairs = (torch.arange(n), torch.arange(n), a2, n + a2 * m + j)
    return fn(a, indices_tuple=pairs, ref_emb=torch.cat([p, neg.reshape(n * m, d)]))


PML_CONFIGS = [
    pytest.param(lambda: NTXentLoss(0.5, distance=DotProductSimilarity(normalize_embeddings=False)), id="dot-raw"),
    pytest.param(lambda: NTXentLoss(0.7, distance=LpDistance(normalize_embeddings=False, p=1)), id="l1-raw"),
    pytest.param(lambda: NTXentLoss(0.4, distance=LpDistance(power=2)), id="lp-squared"),
    pytest.param(lambda: NTXentLoss(0.9, distance=SNRDistance()), id="snr"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=AvgNonZeroReducer()), id="avg-nonzero"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=ThresholdReducer(low=2.5)), id="threshold"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=SumReducer()), id="sum"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=PerAnchorReducer()), id="per-anchor"),
    pytest.param(lambda: NTXentLoss(0.2, embedding_regularizer=LpRegularizer()), id="lp-regularizer"),
]


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("make", PML_CONFIGS)
def test_matches_plain_pml(make: Any) -> None:
    # K = 1 and a mask: pairs PML takes as they are; an anchor whose negatives are all masked (ℓ = 0) included
    g = torch.Generator().manual_seed(3)
    a, p, neg = (torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for s in ((5, 4), (5, 4), (5, 3, 4)))
    mask = torch.rand(5, 3, generator=g) < 0.7
    mask[0] = False
    mask[1] = True
    got = pt.reference_infonce(a, p, neg, loss_fn=make(), negatives_mask=mask)
    want = plain_pml(make(), a, p, neg, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for gr, ref in zip(torch.autograd.grad(got, (a, p, neg)), torch.autograd.grad(want, (a, p, neg)), strict=True):
        torch.testing.assert_close(gr, ref, rtol=1e-10, atol=1e-12)


INFONCE_COMBOS = [
    pytest.param({"loss_fn": NTXentLoss(0.3, reducer=SumReducer()), "k": 2, "in_batch": True}, id="sum-K2"),
    pytest.param(
        {"loss_fn": NTXentLoss(0.3, embedding_regularizer=LpRegularizer()), "shared": True, "mask": True}, id="reg"
    ),
    pytest.param(
        {
            "temperature": 0.2,
            "in_batch": True,
            "directions": GTE,
            "hardness_mode": "all",
            "hardness_strength": 2.0,
            "ids": True,
            "mask": True,
            "k": 2,
        },
        id="gte-hardness-ids",
    ),
    pytest.param(
        {
            "loss_fn": NTXentLoss(0.4, distance=LpDistance()),
            "in_batch": True,
            "directions": (A2P, P2A),
            "partition": "per_direction",
            "false_negative_margin": 0.1,
            "margin_strategy": "relative",
            "guide": True,
        },
        id="symmetric-guided-lp",
    ),
    pytest.param(
        {
            "temperature": 0.1,
            "shared": True,
            "false_negative_margin": 0.2,
            "hardness_mode": "own",
            "hardness_strength": 1.0,
            "ids": True,
        },
        id="own-filtered-shared",
    ),
]


@pytest.mark.parametrize("combo", INFONCE_COMBOS)
def test_matches_infonce(combo: dict[str, Any]) -> None:
    combo = dict(combo)
    g = torch.Generator().manual_seed(7)
    n, m, d, k = 5, 3, 6, combo.pop("k", 1)
    x = {
        "anchors": torch.randn(n, d, generator=g, dtype=F64, requires_grad=True),
        "positives": torch.randn(n, k, d, generator=g, dtype=F64, requires_grad=True),
        "negatives": torch.randn(n, m, d, generator=g, dtype=F64, requires_grad=True),
    }
    if combo.pop("shared", False):
        x["shared_negatives"] = torch.randn(2, d, generator=g, dtype=F64, requires_grad=True)
    if combo.pop("mask", False):
        combo["negatives_mask"] = torch.rand(n, m, generator=g) < 0.6
    if combo.pop("ids", False):
        combo["positive_ids"] = torch.randint(0, 4, (n, k), generator=g)
        combo["negative_ids"] = torch.randint(0, 4, (n, m), generator=g)
    if combo.pop("guide", False):
        combo["guide"] = tuple(torch.randn(*v.shape[:-1], 3, generator=g, dtype=F64) for v in x.values())
    got = pt.reference_infonce(**x, **combo)
    want = pt.infonce(**x, chunk_size=2, **combo)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    leaves = list(x.values())
    for gr, ref in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(gr, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- dtype, device, masks


def test_keeps_dtype_and_device_and_differentiates(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, p, neg = (torch.randn(*s, generator=g).to(device).requires_grad_() for s in ((3, 4), (3, 4), (3, 2, 4)))
    loss = pt.reference_infonce(a, p, neg, in_batch=True)
    assert (loss.dtype, loss.device.type, loss.shape) == (torch.float32, device, ())
    loss.backward()
    assert a.grad is not None
    assert a.grad.dtype == torch.float32
    assert a.grad.device.type == device


def test_masked_and_excluded_negatives_are_never_touched() -> None:
    # NaN in a masked slot and in a slot excluded by ids: the loss and every gradient stay finite, and equal the
    # loss without those slots
    g = torch.Generator().manual_seed(1)
    a, p = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    neg = torch.randn(3, 3, 4, generator=g, dtype=F64)
    neg[0, 2] = neg[1, 0] = math.nan
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 2] = False
    pid, nid = torch.tensor([0, 1, 2]), torch.tensor([[5, 6, 7], [1, 8, 9], [10, 11, 12]])  # neg[1, 0] has id 1
    neg.requires_grad_()
    loss = pt.reference_infonce(a, p, neg, 0.2, negatives_mask=mask, positive_ids=pid, negative_ids=nid)
    (grad,) = torch.autograd.grad(loss, neg)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert grad[0, 2].abs().max() == 0
    assert grad[1, 0].abs().max() == 0
    clean = torch.where(torch.isnan(neg.detach()), 0.0, neg.detach())
    assert loss.item() == pytest.approx(
        pt.reference_infonce(a, p, clean, 0.2, negatives_mask=mask, positive_ids=pid, negative_ids=nid).item()
    )


# ------------------------------------------------------------------------------------------------- errors


class Overriding(NTXentLoss):
    def _compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        return super()._compute_loss(*args, **kwargs)


A, P, N3 = torch.randn(3, 4, dtype=F64), torch.randn(3, 2, 4, dtype=F64), torch.randn(3, 2, 4, dtype=F64)

ERRORS = [
    pytest.param({"loss_fn": NTXentLoss(0.1), "temperature": 0.1}, ValueError, "either `temperature`", id="tau-twice"),
    pytest.param({"loss_fn": NTXentLoss(0.1), "similarity": "dot"}, ValueError, "either `similarity`", id="sim-twice"),
    pytest.param({"similarity": "manhattan"}, ValueError, "similarity", id="bad-similarity"),
    pytest.param({"loss_fn": torch.nn.MSELoss()}, TypeError, "NTXentLoss", id="not-ntxent"),
    pytest.param({"loss_fn": Overriding()}, NotImplementedError, "Overriding overrides", id="overriding-subclass"),
    pytest.param(
        {"loss_fn": NTXentLoss(reducer=PerAnchorReducer())}, NotImplementedError, "PerAnchorReducer", id="per-anchor-K2"
    ),
    pytest.param(
        {"loss_fn": NTXentLoss(reducer=DoNothingReducer(), embedding_regularizer=LpRegularizer())},
        ValueError,
        "DoNothingReducer",
        id="per-pair-with-regularizer",
    ),
    pytest.param({"temperature": -1.0}, ValueError, "temperature", id="negative-tau"),
    pytest.param({"directions": (A2P, P2A)}, ValueError, "in_batch", id="p2a-without-in_batch"),
    pytest.param({"directions": (P2A,), "in_batch": True}, ValueError, "anchor_to_positive", id="no-a2p"),
    pytest.param({"directions": "anchor_to_positive"}, TypeError, "directions", id="directions-str"),
    pytest.param(
        {"directions": (A2P, A2A), "in_batch": True, "partition": "per_direction"},
        ValueError,
        "per_direction",
        id="per-direction-a2a",
    ),
    pytest.param({"partition": "softmax"}, ValueError, "partition", id="bad-partition"),
    pytest.param({"hardness_mode": "hard_negatives"}, ValueError, "hardness_mode", id="bad-mode"),
    pytest.param({"hardness_mode": "in_batch", "hardness_strength": 1.0}, ValueError, "in_batch", id="mode-no-batch"),
    pytest.param({"hardness_mode": "own", "hardness_strength": -1.0}, ValueError, ">= 0", id="negative-strength"),
    pytest.param({"false_negative_margin": math.inf}, ValueError, "finite", id="infinite-margin"),
    pytest.param({"margin_strategy": "proportional"}, ValueError, "margin_strategy", id="bad-strategy"),
    pytest.param({"guide": (A, P, N3)}, ValueError, "false_negative_margin", id="guide-without-margin"),
    pytest.param({"guide": (A, P[:, :1], N3), "false_negative_margin": 0.1}, ValueError, r"guide\[1\]", id="guide-K"),
    pytest.param(
        {"guide": (A, P, None), "false_negative_margin": 0.1}, ValueError, r"guide\[2\]", id="guide-no-negatives"
    ),
    pytest.param(
        {"guide": (A, P, N3), "false_negative_margin": 0.1, "shared_negatives": A},
        ValueError,
        "shared",
        id="guide-with-shared",
    ),
    pytest.param({"chunk_size": 0}, ValueError, "chunk_size", id="chunk-0"),
    pytest.param({"engine": "fast"}, ValueError, "engine", id="bad-engine"),
    pytest.param({"gather_across_devices": True}, ValueError, "in_batch", id="gather-without-in_batch"),
    pytest.param({"negatives": N3[:2]}, ValueError, "negatives", id="shape-checked"),
]


@pytest.mark.parametrize(("options", "error", "match"), ERRORS)
def test_errors(options: dict[str, Any], error: type[Exception], match: str) -> None:
    call = {"anchors": A, "positives": P, "negatives": N3} | options
    with pytest.raises(error, match=match):
        pt.reference_infonce(**call)


def test_gather_under_several_ranks_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    with pytest.raises(NotImplementedError, match="single-process"):
        pt.reference_infonce(A, P, N3, in_batch=True, gather_across_devices=True)
    pt.reference_infonce(A, P, N3, in_batch=True)  # without gathering, each rank's own loss is well defined
