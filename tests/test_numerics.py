"""Numerics: half precision and autocast, extreme temperatures, zero vectors, determinism, gradcheck.

Every expected value comes from tests/formula.py (float64, loop by loop) evaluated on the very inputs the library
saw -- after rounding to the input dtype -- never from pml_triplets itself.

``python tests/test_numerics.py`` prints the library vs the formula vs PML's own ``NTXentLoss`` on a hard float16
batch (PML's term is capped at -log(tiny) = 9.7 there), and the float32 relative errors at tau = 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from formula import infonce_loop
from helpers import (
    BATCHES,
    DIST,
    DISTANCES,
    ENGINES,
    F64,
    TOL,
    Dist,
    formula,
    gen,
    hard_batch,
    leaves,
    loss_fn,
    randn,
    random_batch,
)
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt


def assert_grads_close(
    got: list[torch.Tensor], want: tuple[torch.Tensor, ...], rtol: float, floor: float = 0.0
) -> None:
    """Elementwise within ``rtol`` relative, plus ``rtol`` times the largest expected entry (or ``floor``) absolute."""
    for g, w in zip(got, want, strict=True):
        assert g is not None
        atol = max(rtol * float(w.abs().max()), floor)
        torch.testing.assert_close(g.detach().double().cpu(), w, rtol=rtol, atol=atol)


def assert_finite(*xs: torch.Tensor | None) -> None:
    for x in xs:
        assert x is not None
        assert torch.isfinite(x).all(), x


# ---------------------------------------------------------------------------------------------------------------
# Half precision and torch.autocast
# ---------------------------------------------------------------------------------------------------------------

MIXED = [
    pytest.param("inputs", torch.float16, id="float16-inputs"),
    pytest.param("inputs", torch.bfloat16, id="bfloat16-inputs"),
    pytest.param("autocast", torch.bfloat16, id="autocast-bfloat16"),
    pytest.param("autocast", torch.float16, id="autocast-float16"),
]


def _half_embeddings(
    device: str, how: str, half: torch.dtype, batch: tuple[torch.Tensor, ...], seed: int
) -> tuple[torch.nn.Linear, list[torch.Tensor]]:
    """Embeddings of ``batch`` through a near-identity Linear: under autocast, or cast to ``half`` afterwards."""
    d = batch[0].shape[-1]
    lin = torch.nn.Linear(d, d, bias=False, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d) + 0.01 * torch.randn(d, d, generator=gen(seed)))
    xs = [x.float().to(device) for x in batch]
    if how == "autocast":
        emb = [lin(x) for x in xs]  # the caller holds the autocast region open
    else:
        emb = [lin(x).to(half) for x in xs]
    for e in emb:
        e.retain_grad()
    return lin, emb


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("batch", [pytest.param("hard", id="hard"), pytest.param("random", id="random")])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("how", "half"), MIXED)
def test_half_precision_matches_float64_formula(
    device: str, how: str, half: torch.dtype, engine: str, batch: str
) -> None:
    tau = 0.05
    with torch.autocast(device, dtype=half, enabled=how == "autocast"):
        lin, emb = _half_embeddings(device, how, half, BATCHES[batch](11), seed=5)
        if emb[0].dtype != half:
            pytest.skip(f"torch.autocast({device!r}, {half}) does not produce {half} in this torch")
        loss = pt.infonce(*emb, temperature=tau, engine=engine)
    loss.backward()

    assert loss.dtype == half
    assert loss.device.type == device
    assert_finite(loss, lin.weight.grad, *(e.grad for e in emb))

    rounded = [e.detach().cpu().double().requires_grad_() for e in emb]  # exactly what the library was given
    want = infonce_loop(*rounded, tau)
    if batch == "hard":
        # the true term is about 2/tau + log M = 41: far above 10, and above PML's float16 cap -log(tiny) = 9.7
        assert want.item() > 2 / tau - 1
    rtol, atol = TOL[half]
    torch.testing.assert_close(loss.detach().double().cpu(), want, rtol=rtol, atol=atol)
    assert_grads_close([e.grad for e in emb], torch.autograd.grad(want, rounded), rtol)

    # and within one rounding to `half` of the float32 result on the same rounded values
    loss32 = pt.infonce(*(e.detach().float() for e in emb), temperature=tau, engine=engine)
    assert abs(loss.item() - loss32.item()) <= torch.finfo(half).eps * abs(loss32.item())


@pytest.mark.parametrize("half", [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bf16")])
def test_pml_recipe_in_half_caps_at_minus_log_tiny_the_library_does_not(device: str, half: torch.dtype) -> None:
    """PML's own NTXentLoss adds finfo(dtype).tiny inside its log; the library's default engine does not."""
    tau, (a, p, n) = 0.05, (x.to(half).to(device) for x in hard_batch(3))
    want = infonce_loop(a.cpu(), p.cpu(), n.cpu(), tau)
    got = pt.infonce(a, p, n, temperature=tau)
    torch.testing.assert_close(got.double().cpu(), want, rtol=TOL[half][0], atol=TOL[half][1])

    cap = -math.log(torch.finfo(half).tiny)  # 9.70 in float16, 87.3 in bfloat16
    emb, idx = pt.concat_embeddings(a, p, n), pt.build_indices(*n.shape[:2], device=device)
    pml = NTXentLoss(temperature=tau)(emb, indices_tuple=idx)
    assert pml.item() <= min(cap, want.item()) + 0.5
    if half == torch.float16:
        assert want.item() > 4 * cap  # PML loses three quarters of the loss; the library none of it


@pytest.mark.parametrize("chunk_size", [pytest.param(None, id="one-chunk"), pytest.param(1, id="chunks-of-1")])
@pytest.mark.parametrize("half", [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bf16")])
def test_autocast_learnable_temperature(device: str, half: torch.dtype, chunk_size: int | None) -> None:
    """In-batch under autocast with a learnable temperature; chunks of 1 take the recomputing (checkpoint) path."""
    criterion = pt.InfoNCE(temperature=0.05, learnable_temperature=True, in_batch=True, chunk_size=chunk_size)
    criterion = criterion.to(device)
    with torch.autocast(device, dtype=half):
        lin, emb = _half_embeddings(device, "autocast", half, hard_batch(7, n=3, m=2, d=6), seed=2)
        if emb[0].dtype != half:
            pytest.skip(f"torch.autocast({device!r}, {half}) does not produce {half} in this torch")
        loss = criterion(*emb)
    loss.backward()
    assert criterion.log_temperature is not None
    assert_finite(loss, criterion.log_temperature.grad, lin.weight.grad)

    log_tau = torch.tensor(math.log(0.05), dtype=F64, requires_grad=True)
    want = infonce_loop(*(e.detach().cpu().double() for e in emb), log_tau.exp(), in_batch=True)
    (want_grad,) = torch.autograd.grad(want, log_tau)
    torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), rtol=TOL[half][0], atol=TOL[half][1])
    # log_temperature and its gradient stay float32 (never rounded to half): logits at 1/tau = 20 carry a few
    # 1e-6 of float32 error, and so does this sum over them; 1e-4 is tens of times that (observed: 2e-7)
    got_grad = criterion.log_temperature.grad.double().cpu()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * float(want_grad.abs()))


# ---------------------------------------------------------------------------------------------------------------
# Small and large temperatures
# ---------------------------------------------------------------------------------------------------------------

TEMPERATURE_CASES = [
    pytest.param(engine, dtype, tau, batch, id=f"{engine}-{str(dtype)[6:]}-tau{tau:g}-{batch}")
    for engine in ("dense", "pml")
    for dtype in (F64, torch.float32)
    for tau in (0.01, 10.0)
    for batch in ("hard", "easy", "random")
    # PML caps a float32 term at -log(tiny) = 87.3, which both of these batches exceed at tau = 0.01:
    # test_pml_engine_float32_caps_a_term_at_minus_log_tiny
    if not (engine == "pml" and dtype == torch.float32 and tau == 0.01 and batch != "easy")
]
# At tau = 0.01 a logit s/tau is 100 times the cosine, and so is its rounding error: about 1e-13 in float64 and
# 3e-5 in float32 (a few eps each). The mean losses at tau = 0.01 are 200 (hard) and 44 (random), so float32's
# 1e-5 relative allows 4e-4 or more, over 10x that error; the easy batch's ~1e-86 is left to the atol below. At
# tau = 10 the logits are <= 0.1 and their errors 100x smaller. float64's 1e-10 is far above its 1e-13.
# A gradient entry is a softmax weight (whose relative error is the logit's absolute error) times 1/tau, compared
# with atol = rtol * the largest entry: float32's 1e-4 is 3x that 3e-5; float64's 1e-8 is far above 1e-13.
VALUE_RTOL = {F64: 1e-10, torch.float32: 1e-5}
GRAD_RTOL = {F64: 1e-8, torch.float32: 1e-4}


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize(("engine", "dtype", "tau", "batch"), TEMPERATURE_CASES)
def test_extreme_temperature_matches_formula(engine: str, dtype: torch.dtype, tau: float, batch: str) -> None:
    """tau = 0.01 with cosine puts logits at +-100 (a hard term is 2/tau + log M = 201); tau = 10 at +-0.1."""
    a, p, n = leaves(*(x.to(dtype) for x in BATCHES[batch](21, n=5, m=4, d=6)))
    loss = pt.infonce(a, p, n, temperature=tau, engine=engine)
    loss.backward()
    assert_finite(loss, a.grad, p.grad, n.grad)

    ref = leaves(*(x.double() for x in (a, p, n)))
    want = infonce_loop(*ref, tau)
    # atol: an easy term at tau = 0.01 is M e^-200 ~ 1e-86, below float32's range and below the resolution of
    # PML's log(num/den + tiny) -- and of the formula's gradient, whose 1 - softmax(pos) cancels to 0 there.
    torch.testing.assert_close(loss.detach().double(), want, rtol=VALUE_RTOL[dtype], atol=1e-30)
    assert_grads_close([a.grad, p.grad, n.grad], torch.autograd.grad(want, ref), GRAD_RTOL[dtype], floor=1e-30)


@pytest.mark.parametrize("batch", [pytest.param("hard", id="hard"), pytest.param("random", id="random")])
def test_pml_engine_float32_caps_a_term_at_minus_log_tiny(batch: str) -> None:
    """PML's known limitation (log(num/den + tiny)), pinned so that a change in it is noticed; dense is exact."""
    a, p, n = (x.float() for x in BATCHES[batch](21, n=5, m=4, d=6))
    terms = infonce_loop(a, p, n, 0.01, reduction="none")
    cap = -math.log(torch.finfo(torch.float32).tiny)
    assert terms.max().item() > cap + 3  # hard: every term is about 2/tau + log M = 201; random: one is 91
    capped = (-torch.log(torch.exp(-terms) + torch.finfo(torch.float32).tiny)).mean()  # -log(e^-t + tiny)
    torch.testing.assert_close(
        pt.infonce(a, p, n, temperature=0.01, engine="pml").double(), capped, rtol=1e-5, atol=0.0
    )
    torch.testing.assert_close(pt.infonce(a, p, n, temperature=0.01).double(), terms.mean(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("x", [20.5, 25.0, 45.0])
def test_float64_term_around_the_softplus_threshold_is_exact(x: float) -> None:
    """The dense engine's term is softplus(x, threshold=40): exact in float64 on both sides of 40.

    One anchor, one negative: the positive logit is 0 and the negative's is x, so the term is
    log(1 + e^x) = x + log1p(e^-x) and its derivative w.r.t. the negative is sigmoid(x). Above 40 softplus returns x
    alone, dropping log1p(e^-x) < 4.3e-18, below float64's resolution there (one ulp of 40 is 7e-15). torch's
    default threshold, 20, would drop e^-20.5 = 1.2e-9 at x = 20.5 and e^-25 = 1.4e-11 at x = 25 (relative 6e-11
    and 6e-13, in the value and in the gradient): 2e-15 relative, about ten ulps, catches both.
    """
    dot = DotProductSimilarity(normalize_embeddings=False)
    a, p, n = leaves(torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64), torch.full((1, 1, 1), x, dtype=F64))
    loss = pt.infonce(a, p, n, loss_fn=NTXentLoss(temperature=1.0, distance=dot))
    loss.backward()
    exact = x + math.log1p(math.exp(-x))
    assert infonce_loop(*leaves(a, p, n), 1.0, sim="dot").item() == pytest.approx(exact, rel=2e-15)
    assert loss.item() == pytest.approx(exact, rel=2e-15)
    assert n.grad is not None
    assert n.grad.item() == pytest.approx(1 / (1 + math.exp(-x)), rel=2e-15)


# ---------------------------------------------------------------------------------------------------------------
# Zero vectors (padding)
# ---------------------------------------------------------------------------------------------------------------


def _zero_case(role: str, dtype: torch.dtype) -> tuple[list[Any], torch.Tensor | None]:
    """(anchors, positives, negatives, shared) with zero rows in the place named by ``role``, and a mask."""
    g = gen(31)
    s = 30 if role == "shared-many" else 2  # > 25 candidates: torch.cdist switches to its matmul path
    a, p, n, sh = randn(g, 3, 4), randn(g, 3, 4), randn(g, 3, 3, 4), randn(g, s, 4)
    mask = None
    if role == "anchor":
        a[1] = 0
    elif role == "positive":
        p[1] = 0
    elif role == "negative":
        n[1, 2] = 0
        n[2, 0] = 0
    elif role in ("shared", "shared-many"):
        sh[0] = 0
        a[2] = 0  # zero against zero: distance 0
    elif role == "all-of-a-row":
        a[0], p[0], n[0], sh[0] = 0, 0, 0, 0
    elif role == "masked-padding":
        n[:, 1:] = 0  # zero padding, masked -- except n[2, 1], a real zero negative
        n[0, 0] = 0  # another real zero negative
        mask = torch.tensor([[True, False, False], [True, False, False], [True, True, False]])
    return [x.to(dtype) for x in (a, p, n, sh)], mask


ZERO_ROLES = ["anchor", "positive", "negative", "shared", "shared-many", "all-of-a-row", "masked-padding"]
ZERO_CASES = [pytest.param(role, F64, id=f"{role}-float64") for role in ZERO_ROLES] + [
    pytest.param(role, torch.float32, id=f"{role}-float32") for role in ("all-of-a-row", "masked-padding")
]


@pytest.mark.sweep(fast=6)
@pytest.mark.parametrize(("role", "dtype"), ZERO_CASES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dist", DISTANCES)
def test_zero_vectors_are_finite_and_match_formula(dist: Dist, engine: str, role: str, dtype: torch.dtype) -> None:
    (a, p, n, sh), mask = _zero_case(role, dtype)
    a, p, n, sh = leaves(a, p, n, sh)
    loss = pt.infonce(
        a, p, n, shared_negatives=sh, negatives_mask=mask, in_batch=True, loss_fn=loss_fn(dist, 0.1), engine=engine
    )
    loss.backward()
    assert_finite(loss, a.grad, p.grad, n.grad, sh.grad)
    want = formula(
        a.detach(), p.detach(), n.detach(), 0.1, dist, shared_negatives=sh.detach(), negatives_mask=mask, in_batch=True
    )
    torch.testing.assert_close(loss.detach().double(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    if mask is not None:
        assert n.grad is not None
        assert (n.grad[~mask] == 0).all()


# float16 with a normalizing distance covers the library's guard: F.normalize's Jacobian at a zero row is I/eps = 1e12,
# inf once cast back to float16, so zero rows get no gradient there.
ZERO_HALF_CASES = [
    pytest.param(DIST[name], half, id=f"{name}-{str(half)[6:]}")
    for name in ("cosine", "dot-raw", "lp-unit", "lp-raw")
    for half in (torch.bfloat16, torch.float16)
]


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("dist", "half"), ZERO_HALF_CASES)
def test_zero_vectors_in_half_precision(device: str, dist: Dist, half: torch.dtype, engine: str) -> None:
    (a, p, n, sh), _ = _zero_case("all-of-a-row", half)
    a, p, n, sh = leaves(*(x.to(device) for x in (a, p, n, sh)))
    loss = pt.infonce(a, p, n, shared_negatives=sh, in_batch=True, loss_fn=loss_fn(dist, 0.1), engine=engine)
    loss.backward()
    assert loss.dtype == half
    want = formula(a.detach(), p.detach(), n.detach(), 0.1, dist, shared_negatives=sh.detach(), in_batch=True)
    torch.testing.assert_close(loss.detach().double().cpu(), want, rtol=TOL[half][0], atol=TOL[half][1])
    assert_finite(a.grad, p.grad, n.grad, sh.grad)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def _mode_inputs(mode: str, dtype: torch.dtype, seed: int = 41) -> tuple[list[Any], dict[str, Any]]:
    """Small inputs (N=3, M=2, d=3) and keyword arguments for one mode of :func:`pml_triplets.infonce`."""
    g = gen(seed)
    n_, m, d = 3, 2, 3
    k = 2 if mode == "K=2" else 1
    a, n = randn(g, n_, d), randn(g, n_, m, d)
    p = randn(g, n_, k, d) if k > 1 else randn(g, n_, d)
    tensors: list[Any] = [a, p, n]
    kw: dict[str, Any] = {}
    if mode == "mask":
        kw["negatives_mask"] = torch.tensor([[True, False], [True, True], [False, False]])
    elif mode == "shared":
        tensors.append(randn(g, 2, d))
    elif mode == "in_batch":
        kw["in_batch"] = True
    elif mode == "ids":
        kw.update(
            in_batch=True, positive_ids=torch.tensor([0, 1, 0]), negative_ids=torch.tensor([[1, 2], [3, 0], [4, 1]])
        )
    elif mode == "temperature":
        tensors.append(torch.tensor(0.3, dtype=F64))
    elif mode == "everything":
        kw.update(
            in_batch=True,
            negatives_mask=torch.tensor([[True, False], [True, True], [False, True]]),
            positive_ids=torch.tensor([[0, 5], [1, 6], [0, 7]]),
            negative_ids=torch.tensor([[1, 2], [3, 0], [4, 5]]),
        )
        tensors = [a, randn(g, n_, 2, d), n, randn(g, 2, d), torch.tensor(0.3, dtype=F64)]
    return [t.to(dtype) for t in tensors], kw


def _call(dist: Dist, engine: str, mode: str, kw: dict[str, Any], chunk_size: int | None = None) -> Callable[..., Any]:
    """A function of the mode's tensors (anchors, positives, negatives[, shared][, temperature])."""
    shared = mode in ("shared", "everything")
    learn = mode in ("temperature", "everything")

    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        sh = rest[0] if shared else None
        tau = rest[-1] if learn else 0.3
        return pt.infonce(
            a, p, n, shared_negatives=sh, loss_fn=loss_fn(dist, tau), engine=engine, chunk_size=chunk_size, **kw
        )

    return f


MODES = ["plain", "K=2", "mask", "shared", "in_batch", "ids", "temperature", "everything"]


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("mode", ["plain", "K=2", "mask", "in_batch", "ids", "everything"])
@pytest.mark.parametrize("engine", ENGINES)
def test_bitwise_deterministic_across_calls_and_single_chunk_sizes(engine: str, mode: str) -> None:
    tensors, kw = _mode_inputs(mode, torch.float32)

    def run(chunk_size: int | None) -> list[torch.Tensor]:
        xs = leaves(*tensors)
        loss = _call(DIST["cosine"], engine, mode, kw, chunk_size)(*xs)
        return [loss.detach(), *torch.autograd.grad(loss, xs)]

    first = run(None)
    n = tensors[0].shape[0]
    for again in (run(None), run(None), run(n), run(n + 5)):  # None picks one chunk for so small a batch
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck in float64
# ---------------------------------------------------------------------------------------------------------------


GRADCHECK_CASES = (
    [pytest.param("cosine", mode, None, id=f"cosine-{mode}") for mode in MODES]
    + [
        pytest.param(dist, mode, None, id=f"{dist}-{mode}")
        for dist in ("dot-raw", "lp-unit", "lp-raw")
        for mode in ("plain", "everything")
    ]
    + [pytest.param("cosine", "everything", 1, id="cosine-everything-chunks-of-1")]
)


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("dist", "mode", "chunk_size"), GRADCHECK_CASES)
def test_gradcheck(dist: str, mode: str, chunk_size: int | None, engine: str) -> None:
    """Every mode under cosine; every distance under the plain call and all modes at once; and chunks of one
    anchor (the dense engine recomputes those in backward). fast_mode: one random projection of the Jacobian
    per input, against finite differences."""
    tensors, kw = _mode_inputs(mode, F64)
    xs = leaves(*tensors)
    f = _call(DIST[dist], engine, mode, kw, chunk_size)
    # gradcheck agrees trivially on an input the loss ignores (zero against zero): every input must matter
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(f(*xs), xs))
    assert torch.autograd.gradcheck(f, xs, fast_mode=True)


def test_gradcheck_full_jacobian() -> None:
    tensors, kw = _mode_inputs("everything", F64, seed=43)
    assert torch.autograd.gradcheck(_call(DIST["cosine"], "dense", "everything", kw), leaves(*tensors))


# ---------------------------------------------------------------------------------------------------------------
# Figures: python tests/test_numerics.py
# ---------------------------------------------------------------------------------------------------------------


def _measure() -> None:
    n, m, tau = 8, 4, 0.05
    a, p, neg = (x.half() for x in hard_batch(3, n=n, m=m, d=16))
    want = infonce_loop(a, p, neg, tau).item()
    lib = pt.infonce(a, p, neg, temperature=tau).item()
    pml = NTXentLoss(temperature=tau)(pt.concat_embeddings(a, p, neg), indices_tuple=pt.build_indices(n, m)).item()
    print(f"hard float16 batch (N={n}, M={m}, d=16, tau={tau}; 2/tau + log M = {2 / tau + math.log(m):.4f}):")
    print(f"  float64 formula {want:.6f}   library {lib:.6f}   PML NTXentLoss float16 {pml:.6f}")
    for name, batch in (("random", random_batch(5, n=64, m=16, d=32)), ("hard", hard_batch(5, n=64, m=16, d=32))):
        a, p, neg = (x.float() for x in batch)
        want = infonce_loop(a, p, neg, 0.01).item()
        lib = pt.infonce(a, p, neg, temperature=0.01).item()
        eng = pt.infonce(a, p, neg, temperature=0.01, engine="pml").item()
        emb, idx = pt.concat_embeddings(a, p, neg), pt.build_indices(64, 16)
        pml = NTXentLoss(temperature=0.01)(emb, indices_tuple=idx).item()
        print(f"float32 tau=0.01 {name} batch (N=64, M=16, d=32): formula {want:.7f}")
        for label, v in (("library (dense)", lib), ("library engine='pml'", eng), ("PML NTXentLoss recipe", pml)):
            print(f"  {label:22s} {v:.7f}   relative error {abs(v - want) / want:.2e}")


if __name__ == "__main__":
    _measure()
