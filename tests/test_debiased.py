"""The debiased family (``debias_prior`` τ⁺, ``hcl_beta`` β, ``decoupled``) against its references.

1. ``infonce`` and ``reference_infonce`` against ``tests/formula.debiased_loop`` (the float64 loop written from
   the papers: Chuang et al. 2020, Robinson et al. 2021, Yeh et al. 2022), loss and gradients to 1e-12, over
   τ⁺ × β × decoupled × K × masks × ids × shared × in_batch × chunk_size.
2. The SimCLR layout against the authors' conventions restated in ``tests/test_objective_refs.py`` (HCL's
   ``criterion``, DCL's estimator) and, slow, lightly 1.6's ``DCLLoss`` (``decoupled=True``) when installed.
3. What must hold besides: an anchor without candidates, a tensor temperature, torch.func, torch.compile, the
   fast paths off, and the rejections.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from formula import debiased_loop
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss
from test_objective_refs import (
    HCL_CASES,
    TAU,
    grads,
    lightly_dcl_module,
    same,
    simclr_matrix,
    simclr_rows,
    unclamped_below_bound,
    views,
)

import pml_triplets as pt
from pml_triplets import _options

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N, M, S, D = 4, 3, 3, 5
SPREAD = torch.tensor([0.3, 0.8, 1.5, 3.0], dtype=F64)[:, None, None]  # positives near and far: clamped and not


def data(seed: int, k: int) -> dict[str, torch.Tensor]:
    """Anchors [N, D], positives [N, k, D] near them, negatives [N, M, D], shared [S, D]; with masks and ids."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=F64)
    mask = torch.rand(N, M, generator=g) > 0.4
    mask[:, 0] = True  # every anchor keeps a negative: decoupled is defined for each (no candidate: a test below)
    return {
        "anchors": a,
        "positives": a[:, None] + SPREAD * torch.randn(N, k, D, generator=g, dtype=F64),
        "negatives": torch.randn(N, M, D, generator=g, dtype=F64),
        "shared": torch.randn(S, D, generator=g, dtype=F64),
        "mask": mask,
        # row 1's positive shares an id with row 0's and with a negative of row 2: id clashes in every block
        "pos_ids": torch.tensor([[0, 10], [0, 11], [2, 12], [3, -1]])[:, :k],
        "neg_ids": torch.tensor([[5, 6, 7], [8, 9, 2], [0, 20, 21], [-1, 22, 3]]),
        "shared_ids": torch.tensor([3, 30, 11]),
    }


def library(x: dict[str, torch.Tensor], case: dict[str, Any], chunk_size: int | None) -> Any:
    """(a, p, n, shared) -> infonce for ``case`` (formula's names: mask, pos_ids, ...)."""

    def fn(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *sh: torch.Tensor) -> torch.Tensor:
        return pt.infonce(
            a, p, n, negatives_mask=case.get("mask"), shared_negatives=sh[0] if sh else None,
            positive_ids=case.get("pos_ids"), negative_ids=case.get("neg_ids"),
            shared_negative_ids=case.get("shared_ids") if case["shared"] else None, in_batch=case["in_batch"],
            temperature=0.5, chunk_size=chunk_size, **case["options"],
        )  # fmt: skip

    return fn


def formula(case: dict[str, Any]) -> Any:
    def fn(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *sh: torch.Tensor) -> torch.Tensor:
        return debiased_loop(
            a, p, n, 0.5, mask=case.get("mask"), shared=sh[0] if sh else None,
            pos_ids=case.get("pos_ids"), neg_ids=case.get("neg_ids"),
            shared_ids=case.get("shared_ids") if case["shared"] else None, in_batch=case["in_batch"],
            **case["options"],
        )  # fmt: skip

    return fn


def make_case(x: dict[str, torch.Tensor], masks: bool, ids: bool, shared: bool, in_batch: bool, **options: Any
              ) -> dict[str, Any]:  # fmt: skip
    case: dict[str, Any] = {"shared": shared, "in_batch": in_batch, "options": options}
    if masks:
        case["mask"] = x["mask"]
    if ids:
        case |= {"pos_ids": x["pos_ids"], "neg_ids": x["neg_ids"], "shared_ids": x["shared_ids"]}
    return case


def inputs(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(x[name] for name in ("anchors", "positives", "negatives", "shared") if name in x)


def check(x: dict[str, torch.Tensor], case: dict[str, Any], chunk_size: int | None, who: str) -> None:
    xs = inputs(x) if case["shared"] else inputs(x)[:3]
    same(who, all_grads(library(x, case, chunk_size), *xs), all_grads(formula(case), *xs))


def all_grads(fn: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, gradients) of fn on fresh leaves; zeros for an input the loss does not reach (every G clamped)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(*leaves)
    out = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, out, strict=True)]


# ------------------------------------------------------------------------ 1. the library against the formula

LAYOUTS = list(itertools.product([False, True], repeat=4))  # masks, ids, shared, in_batch
FACTORS = ([0.0, 0.1, 0.3], [0.0, 0.5, 1.0], [False, True], [1, 2], LAYOUTS, [1, 3, None])  # τ⁺, β, decoupled, K, ...


def covering(factors: tuple[list[Any], ...]) -> list[tuple[Any, ...]]:
    """Cases of ``product(*factors)`` that meet every pair of two factors' values, and every (τ⁺, β, decoupled).

    Greedy (each pick the case that meets the most unmet combinations): 1,728 cases become about 60, and every
    failure the full product could show through two factors, or through the three options together, still shows.
    """
    cases = list(itertools.product(*factors))
    groups = [*itertools.combinations(range(len(factors)), 2), (0, 1, 2)]

    def meets(case: tuple[Any, ...]) -> set[tuple[Any, ...]]:
        return {(g, tuple(repr(case[i]) for i in g)) for g in groups}

    unmet, chosen = set().union(*(meets(c) for c in cases)), []
    while unmet:
        best = max(cases, key=lambda c: len(meets(c) & unmet))
        chosen.append(best)
        unmet -= meets(best)
    return chosen


def _case_id(prior: float, beta: float, decoupled: bool, k: int, layout: tuple[bool, ...], chunk: int | None) -> str:
    parts = [n for n, on in zip(("mask", "ids", "shared", "inbatch"), layout, strict=True) if on] or ["plain"]
    coupling = "decoupled" if decoupled else "coupled"
    return f"prior{prior}-beta{beta}-{coupling}-K{k}-{'-'.join(parts)}-chunk{chunk or 'all'}"


@pytest.mark.sweep(fast=12)
@pytest.mark.parametrize(
    ("prior", "beta", "decoupled", "k", "layout", "chunk_size"),
    [pytest.param(*case, id=_case_id(*case)) for case in covering(FACTORS)],
)
def test_library_equals_the_formula(
    prior: float, beta: float, decoupled: bool, k: int, layout: tuple[bool, ...], chunk_size: int | None
) -> None:
    masks, ids, shared, in_batch = layout
    x = data(7, k)
    options = {"debias_prior": prior, "hcl_beta": beta, "decoupled": decoupled}
    check(x, make_case(x, masks, ids, shared, in_batch, **options), chunk_size, "infonce")


def test_the_clamp_binds_and_is_a_constant() -> None:
    """τ⁺ = 0.2: close positives put the estimator below n e^{−1/τ}, far ones above (asserted by hand)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N, D, generator=g, dtype=F64)
    spread = torch.tensor([0.05, 0.05, 3.0, 3.0], dtype=F64)[:, None, None]
    p = a[:, None] + spread * torch.randn(N, 1, D, generator=g, dtype=F64)
    n = torch.randn(N, M, D, generator=g, dtype=F64)
    cos = lambda u, v: (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))  # noqa: E731
    e_pos, e_neg = (cos(a, p[:, 0]) / 0.5).exp(), (cos(a[:, None], n) / 0.5).exp()
    unclamped = (e_neg.sum(1) - M * 0.2 * e_pos) / 0.8
    bound = M * math.exp(-1 / 0.5)
    assert bool((unclamped < bound).any()), unclamped
    assert bool((unclamped > bound).any()), unclamped
    for decoupled in (False, True):
        case = {"shared": False, "in_batch": False, "options": {"debias_prior": 0.2, "decoupled": decoupled}}
        check({"anchors": a, "positives": p, "negatives": n}, case, None, f"clamp, decoupled={decoupled}")


@pytest.mark.slow
def test_reference_equals_the_formula() -> None:
    x = data(8, 2)
    for prior, beta, decoupled, in_batch in itertools.product([0.0, 0.3], [0.0, 1.0], [False, True], [False, True]):
        case = make_case(x, True, True, True, in_batch, debias_prior=prior, hcl_beta=beta, decoupled=decoupled)

        def ref(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, sh: torch.Tensor, case: Any = case) -> Any:
            return pt.reference_infonce(
                a, p, n, 0.5, negatives_mask=case["mask"], shared_negatives=sh, positive_ids=case["pos_ids"],
                negative_ids=case["neg_ids"], shared_negative_ids=case["shared_ids"], in_batch=case["in_batch"],
                **case["options"],
            )  # fmt: skip

        want = grads(formula(case), *inputs(x))
        same(f"reference {case['options']} in_batch={in_batch}", grads(ref, *inputs(x)), want)


@pytest.mark.parametrize("sim", ["dot", "euclidean"])
def test_weights_and_decoupling_need_no_bounded_similarity(sim: str) -> None:
    """β and decoupled take any similarity (only τ⁺'s clamp needs the cosine's bound)."""
    x = data(9, 1)
    raw = {"normalize_embeddings": False}
    distance = DotProductSimilarity(**raw) if sim == "dot" else LpDistance(**raw)
    a, p, n, _ = (t / 3 for t in inputs(x))
    for opt in ({"hcl_beta": 0.5}, {"decoupled": True}, {"hcl_beta": 1.0, "decoupled": True}):
        got = grads(
            lambda a, p, n, o=opt: pt.infonce(a, p, n, loss_fn=NTXentLoss(0.5, distance=distance), **o), a, p, n
        )
        want = grads(lambda a, p, n, o=opt: debiased_loop(a, p, n, 0.5, sim=sim, **o), a, p, n)
        same(f"{sim} {opt}", got, want)
        ref = grads(lambda a, p, n, o=opt: pt.reference_infonce(a, p, n, 0.5, similarity=sim, **o), a, p, n)
        same(f"reference {sim} {opt}", ref, want)


# ------------------------------------------------------------------------------- 2. the authors' SimCLR setup


def simclr_library(layout: str, tau: float = TAU, **options: Any) -> Any:
    """``infonce`` on two views: explicit negatives [2B, 2B − 2, d], or in_batch with one id per image."""

    def fn(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        a, p, neg = simclr_rows(x1, x2)
        if layout == "negatives":
            return pt.infonce(a, p, neg, temperature=tau, **options)
        ids = torch.arange(x1.shape[0]).repeat(2)  # the anchor's own view is the other row's positive: same id
        return pt.infonce(a, p, temperature=tau, in_batch=True, positive_ids=ids, **options)

    return fn


@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize(("tau_plus", "beta", "spread"), HCL_CASES)
def test_hcl_conventions(tau_plus: float, beta: float, spread: float, layout: str) -> None:
    """Robinson et al.'s ``criterion`` ("hard"), as test_objective_refs restates it: clamped whatever τ⁺."""
    x1, x2 = views(10, spread)
    peer = grads(lambda a, b: simclr_matrix(a, b, TAU, tau_plus=tau_plus, beta=beta), x1, x2)
    same("HCL hard", grads(simclr_library(layout, debias_prior=tau_plus, hcl_beta=beta), x1, x2), peer)
    if (tau_plus, spread) == (0.5, 0.15):
        assert unclamped_below_bound(x1, x2, tau_plus, beta)


@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize(("tau_plus", "spread"), [(0.1, 0.6), (0.5, 0.15)])
def test_dcl_conventions(tau_plus: float, spread: float, layout: str) -> None:
    """Chuang et al.'s debiased estimator (their ``main.py``), as test_objective_refs restates it."""
    x1, x2 = views(12, spread)
    peer = grads(lambda a, b: simclr_matrix(a, b, TAU, tau_plus=tau_plus), x1, x2)
    same("DCL", grads(simclr_library(layout, debias_prior=tau_plus), x1, x2), peer)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["negatives", "in_batch"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_lightly_dcl_loss(tau: float, layout: str) -> None:
    """lightly 1.6's ``DCLLoss`` (Yeh et al., no weight function; it normalizes, and averages the two views)."""
    x1, x2 = views(13)
    peer = grads(lightly_dcl_module().DCLLoss(temperature=tau), x1, x2)
    same("lightly DCLLoss", grads(simclr_library(layout, tau, decoupled=True), x1, x2), peer)


# ------------------------------------------------------------------------------------- 3. what holds besides


def test_an_anchor_without_candidates_has_loss_zero_and_no_gradient() -> None:
    """ℓ = 0 (and still counted in the mean), as InfoNCE's convention; the formula rejects it when decoupled."""
    x = data(11, 1)
    mask = torch.ones(N, M, dtype=torch.bool)
    mask[1] = False  # anchor 1: no candidate
    a, p, n = (t.clone().requires_grad_() for t in inputs(x)[:3])
    every = {"hcl_beta": 1.0, "decoupled": True, "debias_prior": 0.1}
    for options in ({"decoupled": True}, {"debias_prior": 0.3}, every):
        got = pt.infonce(a, p, n, negatives_mask=mask, temperature=0.5, **options)
        ref = pt.reference_infonce(a, p, n, 0.5, negatives_mask=mask, **options)
        keep = torch.tensor([0, 2, 3])
        want = debiased_loop(a[keep], p[keep], n[keep], 0.5, mask=mask[keep], **options) * 3 / 4
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(ref, want, **TOL)
        ga, gp = torch.autograd.grad(got, (a, p))
        assert torch.isfinite(ga).all()
        assert torch.isfinite(gp).all()
        assert ga[1].abs().max() == 0
        assert gp[1].abs().max() == 0
    with pytest.raises(ValueError, match="no candidate"):
        debiased_loop(a, p, n, 0.5, mask=mask, decoupled=True)


def test_a_tensor_temperature_gets_its_gradient() -> None:
    x = data(12, 2)
    for options in ({"debias_prior": 0.3, "hcl_beta": 0.5}, {"decoupled": True, "hcl_beta": 1.0}):
        tau = torch.tensor(0.5, dtype=F64, requires_grad=True)
        got = pt.infonce(*inputs(x)[:3], temperature=tau, in_batch=True, **options)
        (g_got,) = torch.autograd.grad(got, tau)
        want = debiased_loop(*inputs(x)[:3], tau, in_batch=True, **options)
        (g_want,) = torch.autograd.grad(want, tau)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(g_got, g_want, **TOL)


def test_torch_func_grad() -> None:
    x = data(13, 1)
    a, p, n, sh = inputs(x)
    options = {"debias_prior": 0.1, "hcl_beta": 0.5, "decoupled": True}
    got = torch.func.grad(lambda a: pt.infonce(a, p, n, shared_negatives=sh, temperature=0.5, **options))(a)
    want = grads(lambda a: debiased_loop(a, p, n, 0.5, shared=sh, **options), a)[1][0]
    torch.testing.assert_close(got, want, **TOL)


def test_the_module_equals_the_function() -> None:
    x = data(14, 1)
    criterion = pt.InfoNCE(0.5, in_batch=True, debias_prior=0.1, hcl_beta=0.5)
    assert "debias_prior=0.1, hcl_beta=0.5" in repr(criterion)
    want = pt.infonce(*inputs(x)[:3], temperature=0.5, in_batch=True, debias_prior=0.1, hcl_beta=0.5)
    torch.testing.assert_close(criterion(*inputs(x)[:3]), want, rtol=0, atol=0)


@pytest.mark.parametrize("option", [{"debias_prior": 0.1}, {"hcl_beta": 0.5}, {"decoupled": True}])
def test_the_fast_paths_are_off(option: dict[str, Any]) -> None:
    """Both fast paths (the one per-anchor block, K = 1 in-batch as one cross-entropy) read ``plain``."""
    assert not _options.make_options(**option).plain
    x = data(15, 1)
    for in_batch in (False, True):
        case = {"shared": False, "in_batch": in_batch, "options": option}
        check(x, case, None, f"{option} in_batch={in_batch}")


@pytest.mark.slow
def test_compile_fullgraph() -> None:
    x = data(16, 2)
    a, p, n, sh = (t.float() for t in inputs(x))
    options = {"debias_prior": 0.1, "hcl_beta": 0.5, "decoupled": True}

    def step(a: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        return pt.infonce(a, p, n, shared_negatives=sh, in_batch=True, temperature=0.5, chunk_size=chunk_size,
                          **options)  # fmt: skip

    for chunk_size in (None, 3):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        leaf = a.clone().requires_grad_()
        got = compiled(leaf, chunk_size)
        (g_got,) = torch.autograd.grad(got, leaf)
        want = step(leaf, chunk_size)
        (g_want,) = torch.autograd.grad(want, leaf)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)


E = torch.eye(4, dtype=F64)
ONE = (E[:1], E[:1], E[None, 1:3])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"debias_prior": 1.0}, ValueError, r"`debias_prior` .* must be in \[0, 1\); got 1", id="prior=1"),
        pytest.param({"debias_prior": -0.1}, ValueError, r"`debias_prior`.*\[0, 1\)", id="prior<0"),
        pytest.param({"debias_prior": "0.1"}, TypeError, r"`debias_prior` must be a float; got str", id="prior-str"),
        pytest.param({"hcl_beta": -1.0}, ValueError, r"`hcl_beta` must be >= 0; got -1.0", id="beta<0"),
        pytest.param({"hcl_beta": math.inf}, ValueError, r"`hcl_beta` must be finite", id="beta-inf"),
        pytest.param({"decoupled": 1}, TypeError, r"`decoupled` must be a bool; got int", id="decoupled-int"),
        pytest.param(
            {
                "debias_prior": 0.1,
                "loss_fn": NTXentLoss(0.5, distance=DotProductSimilarity(normalize_embeddings=False)),
            },
            ValueError,
            r"`debias_prior=0.1` clamps .* needs the cosine.*DotProductSimilarity",
            id="prior-dot",
        ),
        pytest.param(
            {"debias_prior": 0.1, "loss_fn": NTXentLoss(0.5, distance=LpDistance())},
            ValueError,
            r"needs the cosine similarity.*LpDistance",
            id="prior-lp",
        ),
        pytest.param(
            {"hcl_beta": 0.5, "engine": "pml"},
            ValueError,
            r"is not NTXentLoss: the dense engine computes it",
            id="pml",
        ),
        pytest.param(
            {"decoupled": True, "in_batch": True, "directions": ("anchor_to_positive", "anchor_to_anchor")},
            ValueError,
            r"anchor_to_positive softmax .* only; got directions=",
            id="directions",
        ),
        pytest.param(
            {"decoupled": True, "in_batch": True, "partition": "per_direction"},
            ValueError,
            r"only; got partition='per_direction'",
            id="partition",
        ),
        pytest.param(
            {"hcl_beta": 1.0, "hardness_mode": "own", "hardness_strength": 1.0},
            ValueError,
            r"only; got hardness_mode='own'",
            id="hardness",
        ),
        pytest.param(
            {"debias_prior": 0.1, "false_negative_margin": 0.1},
            ValueError,
            r"only; got false_negative_margin=0.1",
            id="margin",
        ),
    ],
)
def test_rejections(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        pt.infonce(*ONE, **options)
    with pytest.raises(error, match=match):
        pt.InfoNCE(**options)
    ref = {k: v for k, v in options.items() if k != "engine"}
    if "engine" not in options:
        with pytest.raises((ValueError, TypeError)):
            pt.reference_infonce(*ONE, **ref)
