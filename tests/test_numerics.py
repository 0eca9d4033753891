"""Numerics: half precision and autocast, extreme temperatures, zero vectors, determinism, gradcheck.

Every expected value comes from tests/formula.py (float64, loop by loop) evaluated on the very inputs the library
saw -- after rounding to the input dtype -- never from pml_triplets itself.

``python tests/test_numerics.py`` prints the figures quoted in issue 7 (library vs formula vs PML's own
``NTXentLoss`` on a hard float16 batch, and the float32 relative errors at tau = 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from formula import infonce_loop
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss
from torch.autograd.gradcheck import GradcheckError

import pml_triplets as pt

F64 = torch.float64
ENGINES = [pytest.param("dense", id="dense"), pytest.param("pml", id="pml")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _hard_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor opposite its positive and aligned with its negatives: cosines about -1 and +1.

    With cosine similarity every term is about 2/tau + log(M).
    """
    g = _gen(seed)
    u = F.normalize(_randn(g, n, d), dim=1)
    return u, -u + 0.05 * _randn(g, n, d), u[:, None] + 0.05 * _randn(g, n, m, d)


def _easy_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor aligned with its positive and opposite its negatives: every term about M e^{-2/tau}."""
    a, p, neg = _hard_batch(seed, n, m, d)
    return a, -p, -neg


def _random_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return _randn(g, n, d), _randn(g, n, d), _randn(g, n, m, d)


BATCHES = {"hard": _hard_batch, "easy": _easy_batch, "random": _random_batch}


class Dist(NamedTuple):
    """A PML distance and how tests/formula.py computes the same similarity."""

    make: Callable[[], BaseDistance]
    sim: str  # formula.similarity kind
    unit: bool  # the distance L2-normalizes its inputs first (cosine does so inside formula.similarity)


DIST = {
    "cosine": Dist(CosineSimilarity, "cosine", False),
    "dot-raw": Dist(lambda: DotProductSimilarity(normalize_embeddings=False), "dot", False),
    "lp-unit": Dist(LpDistance, "euclidean", True),
    "lp-raw": Dist(lambda: LpDistance(normalize_embeddings=False), "euclidean", False),
}
DISTANCES = [pytest.param(v, id=k) for k, v in DIST.items()]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) row by row, as the normalizing distances define it (a zero row stays zero)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(1e-12)


def _formula(
    dist: Dist,
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    tau: float,
    *,
    shared: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """tests/formula.py in float64 on the given (already rounded) tensors; differentiable w.r.t. them."""

    def prep(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return _unit(x.double()) if dist.unit else x.double()

    return infonce_loop(prep(a), prep(p), prep(n), tau, shared=prep(shared), sim=dist.sim, **kw)


def _loss_fn(dist: Dist, tau: float | torch.Tensor) -> NTXentLoss:
    return NTXentLoss(temperature=tau, distance=dist.make())


def _leaves(*xs: torch.Tensor | None) -> list[Any]:
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _assert_grads_close(
    got: list[torch.Tensor], want: tuple[torch.Tensor, ...], rtol: float, floor: float = 0.0
) -> None:
    """Elementwise within ``rtol`` relative, plus ``rtol`` times the largest expected entry (or ``floor``) absolute."""
    for g, w in zip(got, want):
        assert g is not None
        atol = max(rtol * float(w.abs().max()), floor)
        torch.testing.assert_close(g.detach().double().cpu(), w, rtol=rtol, atol=atol)


def _assert_finite(*xs: torch.Tensor | None) -> None:
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
        lin.weight.copy_(torch.eye(d) + 0.01 * torch.randn(d, d, generator=_gen(seed)))
    xs = [x.float().to(device) for x in batch]
    if how == "autocast":
        emb = [lin(x) for x in xs]  # the caller holds the autocast region open
    else:
        emb = [lin(x).to(half) for x in xs]
    for e in emb:
        e.retain_grad()
    return lin, emb


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
    _assert_finite(loss, lin.weight.grad, *(e.grad for e in emb))

    rounded = [e.detach().cpu().double().requires_grad_() for e in emb]  # exactly what the library was given
    want = infonce_loop(*rounded, tau)
    if batch == "hard":
        # the true term is about 2/tau + log M = 41: far above 10, and above PML's float16 cap -log(tiny) = 9.7
        assert want.item() > 2 / tau - 1
    rtol, atol = TOL[half]
    torch.testing.assert_close(loss.detach().double().cpu(), want, rtol=rtol, atol=atol)
    _assert_grads_close([e.grad for e in emb], torch.autograd.grad(want, rounded), rtol)

    # and within one rounding to `half` of the float32 result on the same rounded values
    loss32 = pt.infonce(*(e.detach().float() for e in emb), temperature=tau, engine=engine)
    assert abs(loss.item() - loss32.item()) <= torch.finfo(half).eps * abs(loss32.item())


@pytest.mark.parametrize("half", [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bf16")])
def test_pml_recipe_in_half_caps_at_minus_log_tiny_the_library_does_not(device: str, half: torch.dtype) -> None:
    """PML's own NTXentLoss adds finfo(dtype).tiny inside its log; the library's default engine does not."""
    tau, (a, p, n) = 0.05, (x.to(half).to(device) for x in _hard_batch(3))
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
        lin, emb = _half_embeddings(device, "autocast", half, _hard_batch(7, n=3, m=2, d=6), seed=2)
        if emb[0].dtype != half:
            pytest.skip(f"torch.autocast({device!r}, {half}) does not produce {half} in this torch")
        loss = criterion(*emb)
    loss.backward()
    assert criterion.log_temperature is not None
    _assert_finite(loss, criterion.log_temperature.grad, lin.weight.grad)

    log_tau = torch.tensor(math.log(0.05), dtype=F64, requires_grad=True)
    want = infonce_loop(*(e.detach().cpu().double() for e in emb), log_tau.exp(), in_batch=True)
    (want_grad,) = torch.autograd.grad(want, log_tau)
    torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), rtol=TOL[half][0], atol=TOL[half][1])
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
VALUE_RTOL = {F64: 1e-10, torch.float32: 1e-5}
GRAD_RTOL = {F64: 1e-8, torch.float32: 1e-4}


@pytest.mark.parametrize(("engine", "dtype", "tau", "batch"), TEMPERATURE_CASES)
def test_extreme_temperature_matches_formula(engine: str, dtype: torch.dtype, tau: float, batch: str) -> None:
    """tau = 0.01 with cosine puts logits at +-100 (a hard term is 2/tau + log M = 201); tau = 10 at +-0.1."""
    a, p, n = _leaves(*(x.to(dtype) for x in BATCHES[batch](21, n=5, m=4, d=6)))
    loss = pt.infonce(a, p, n, temperature=tau, engine=engine)
    loss.backward()
    _assert_finite(loss, a.grad, p.grad, n.grad)

    ref = _leaves(*(x.double() for x in (a, p, n)))
    want = infonce_loop(*ref, tau)
    # atol: an easy term at tau = 0.01 is M e^-200 ~ 1e-86, below float32's range and below the resolution of
    # PML's log(num/den + tiny) -- and of the formula's gradient, whose 1 - softmax(pos) cancels to 0 there.
    torch.testing.assert_close(loss.detach().double(), want, rtol=VALUE_RTOL[dtype], atol=1e-30)
    _assert_grads_close([a.grad, p.grad, n.grad], torch.autograd.grad(want, ref), GRAD_RTOL[dtype], floor=1e-30)


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


def test_float64_term_just_above_softplus_threshold_is_exact() -> None:
    # one anchor, one negative: pos logit 0, negative logit x, so the term is log(1 + e^x) = x + log1p(e^-x)
    x = 20.5
    dot = DotProductSimilarity(normalize_embeddings=False)
    a, p, n = _leaves(torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64), torch.full((1, 1, 1), x, dtype=F64))
    loss = pt.infonce(a, p, n, loss_fn=NTXentLoss(temperature=1.0, distance=dot))
    loss.backward()
    want = infonce_loop(*_leaves(a, p, n), 1.0, sim="dot")
    assert want.item() == pytest.approx(x + math.log1p(math.exp(-x)), rel=1e-15)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-13, atol=0.0)
    assert n.grad is not None
    assert n.grad.item() == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Zero vectors (padding)
# ---------------------------------------------------------------------------------------------------------------


def _zero_case(role: str, dtype: torch.dtype) -> tuple[list[Any], torch.Tensor | None]:
    """(anchors, positives, negatives, shared) with zero rows in the place named by ``role``, and a mask."""
    g = _gen(31)
    s = 30 if role == "shared-many" else 2  # > 25 candidates: torch.cdist switches to its matmul path
    a, p, n, sh = _randn(g, 3, 4), _randn(g, 3, 4), _randn(g, 3, 3, 4), _randn(g, s, 4)
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


@pytest.mark.parametrize(("role", "dtype"), ZERO_CASES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dist", DISTANCES)
def test_zero_vectors_are_finite_and_match_formula(dist: Dist, engine: str, role: str, dtype: torch.dtype) -> None:
    (a, p, n, sh), mask = _zero_case(role, dtype)
    a, p, n, sh = _leaves(a, p, n, sh)
    loss = pt.infonce(
        a, p, n, shared_negatives=sh, negatives_mask=mask, in_batch=True, loss_fn=_loss_fn(dist, 0.1), engine=engine
    )
    loss.backward()
    _assert_finite(loss, a.grad, p.grad, n.grad, sh.grad)
    want = _formula(dist, a.detach(), p.detach(), n.detach(), 0.1, shared=sh.detach(), mask=mask, in_batch=True)
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("dist", "half"), ZERO_HALF_CASES)
def test_zero_vectors_in_half_precision(device: str, dist: Dist, half: torch.dtype, engine: str) -> None:
    (a, p, n, sh), _ = _zero_case("all-of-a-row", half)
    a, p, n, sh = _leaves(*(x.to(device) for x in (a, p, n, sh)))
    loss = pt.infonce(a, p, n, shared_negatives=sh, in_batch=True, loss_fn=_loss_fn(dist, 0.1), engine=engine)
    loss.backward()
    assert loss.dtype == half
    want = _formula(
        dist, a.detach().cpu(), p.detach().cpu(), n.detach().cpu(), 0.1, shared=sh.detach().cpu(), in_batch=True
    )
    torch.testing.assert_close(loss.detach().double().cpu(), want, rtol=TOL[half][0], atol=TOL[half][1])
    _assert_finite(a.grad, p.grad, n.grad, sh.grad)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def _mode_inputs(mode: str, dtype: torch.dtype, seed: int = 41) -> tuple[list[Any], dict[str, Any]]:
    """Small inputs (N=3, M=2, d=3) and keyword arguments for one mode of :func:`pml_triplets.infonce`."""
    g = _gen(seed)
    n_, m, d = 3, 2, 3
    k = 2 if mode == "K=2" else 1
    a, n = _randn(g, n_, d), _randn(g, n_, m, d)
    p = _randn(g, n_, k, d) if k > 1 else _randn(g, n_, d)
    tensors: list[Any] = [a, p, n]
    kw: dict[str, Any] = {}
    if mode == "mask":
        kw["negatives_mask"] = torch.tensor([[True, False], [True, True], [False, False]])
    elif mode == "shared":
        tensors.append(_randn(g, 2, d))
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
        tensors = [a, _randn(g, n_, 2, d), n, _randn(g, 2, d), torch.tensor(0.3, dtype=F64)]
    return [t.to(dtype) for t in tensors], kw


def _call(dist: Dist, engine: str, mode: str, kw: dict[str, Any], chunk_size: int | None = None) -> Callable[..., Any]:
    """A function of the mode's tensors (anchors, positives, negatives[, shared][, temperature])."""
    shared = mode in ("shared", "everything")
    learn = mode in ("temperature", "everything")

    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        sh = rest[0] if shared else None
        tau = rest[-1] if learn else 0.3
        return pt.infonce(
            a, p, n, shared_negatives=sh, loss_fn=_loss_fn(dist, tau), engine=engine, chunk_size=chunk_size, **kw
        )

    return f


MODES = ["plain", "K=2", "mask", "shared", "in_batch", "ids", "temperature", "everything"]


@pytest.mark.parametrize("mode", ["plain", "K=2", "mask", "in_batch", "ids", "everything"])
@pytest.mark.parametrize("engine", ENGINES)
def test_bitwise_deterministic_across_calls_and_single_chunk_sizes(engine: str, mode: str) -> None:
    tensors, kw = _mode_inputs(mode, torch.float32)

    def run(chunk_size: int | None) -> list[torch.Tensor]:
        xs = _leaves(*tensors)
        loss = _call(DIST["cosine"], engine, mode, kw, chunk_size)(*xs)
        return [loss.detach(), *torch.autograd.grad(loss, xs)]

    first = run(None)
    n = tensors[0].shape[0]
    for again in (run(None), run(None), run(n), run(n + 5)):  # None picks one chunk for so small a batch
        for x, y in zip(first, again):
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("dist", "mode", "chunk_size"), GRADCHECK_CASES)
def test_gradcheck(dist: str, mode: str, chunk_size: int | None, engine: str) -> None:
    """Every mode under cosine; every distance under the plain call and all modes at once; and chunks of one
    anchor (the dense engine recomputes those in backward). fast_mode: one random projection of the Jacobian
    per input, against finite differences."""
    tensors, kw = _mode_inputs(mode, F64)
    xs = _leaves(*tensors)
    assert torch.autograd.gradcheck(_call(DIST[dist], engine, mode, kw, chunk_size), xs, fast_mode=True)


def test_gradcheck_full_jacobian() -> None:
    tensors, kw = _mode_inputs("everything", F64, seed=43)
    assert torch.autograd.gradcheck(_call(DIST["cosine"], "dense", "everything", kw), _leaves(*tensors))


def test_gradcheck_can_fail() -> None:
    """The harness above rejects a wrong gradient (a surrogate whose backward is off by a factor)."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return 1.01 * grad

    tensors, kw = _mode_inputs("plain", F64)
    f = _call(DIST["cosine"], "dense", "plain", kw)
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(lambda a, p, n: f(Wrong.apply(a), p, n), _leaves(*tensors), fast_mode=True)


# ---------------------------------------------------------------------------------------------------------------
# Figures for the issue: python tests/test_numerics.py
# ---------------------------------------------------------------------------------------------------------------


def _measure() -> None:
    n, m, tau = 8, 4, 0.05
    a, p, neg = (x.half() for x in _hard_batch(3, n=n, m=m, d=16))
    want = infonce_loop(a, p, neg, tau).item()
    lib = pt.infonce(a, p, neg, temperature=tau).item()
    pml = NTXentLoss(temperature=tau)(pt.concat_embeddings(a, p, neg), indices_tuple=pt.build_indices(n, m)).item()
    print(f"hard float16 batch (N={n}, M={m}, d=16, tau={tau}; 2/tau + log M = {2 / tau + math.log(m):.4f}):")
    print(f"  float64 formula {want:.6f}   library {lib:.6f}   PML NTXentLoss float16 {pml:.6f}")
    for name, batch in (("random", _random_batch(5, n=64, m=16, d=32)), ("hard", _hard_batch(5, n=64, m=16, d=32))):
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
