"""Dependable in real training code: no writes during forward, compile, torch.func, no caps, poisoned rows.

Reference values come from ``formula.py`` (float64, loop by loop) or from closed forms written here. The
torch.compile tests compare with eager runs of the same call (the claim is "compiling changes nothing"), and
``engine="pml"`` is compared with plain PML on the same pairs (the claim is "PML's own numbers").
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from formula import infonce_loop, similarity, term
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, SNRDistance
from pytorch_metric_learning.losses import NTXentLoss, TripletMarginLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.regularizers import LpRegularizer
from torch import nn
from torch.testing import assert_close

import pml_triplets as pt

F64 = torch.float64
F32 = torch.float32
CUDA = torch.cuda.is_available()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def triplets(
    n: int = 6, m: int = 3, d: int = 8, *, k: int = 1, seed: int = 0, dtype: torch.dtype = F64, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """anchors [N, d], positives [N, d] (or [N, K, d]), negatives [N, M, d]; drawn in float64, then cast."""
    g = gen(seed)
    a = torch.randn(n, d, generator=g, dtype=F64)
    p = torch.randn(*((n, d) if k == 1 else (n, k, d)), generator=g, dtype=F64)
    neg = torch.randn(n, m, d, generator=g, dtype=F64)
    a, p, neg = (t.to(dtype).requires_grad_(grad) for t in (a, p, neg))
    return a, p, neg


def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Fresh float64 leaves with the same values, for the formula's own autograd."""
    return [x.detach().double().requires_grad_(True) for x in xs]


def formula_value_and_grads(
    a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, tau: float = pt.DEFAULT_TEMPERATURE, **kw: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    a64, p64, n64 = leaves(a, p, n)
    value = infonce_loop(a64, p64, n64, tau, **kw)
    return value.detach(), torch.autograd.grad(value, (a64, p64, n64))


# --------------------------------------------------------------------------------------------------------------
# Forward writes nothing: the module stays copyable, thread-safe, and the user's loss object stays theirs.
# --------------------------------------------------------------------------------------------------------------


def attributes(module: nn.Module) -> dict[tuple[str, str], Any]:
    """Every attribute of ``module`` and its submodules, as object references (hook dicts left out).

    Children, parameters and buffers are listed one by one, so replacing one is seen as well as adding one.
    """
    out: dict[tuple[str, str], Any] = {}
    for prefix, mod in module.named_modules():
        for key, value in vars(mod).items():
            if key in ("_modules", "_parameters", "_buffers"):
                out.update({(prefix, f"{key}.{name}"): v for name, v in value.items()})
            elif not key.startswith("_"):
                out[(prefix, key)] = value
    return out


def assert_untouched(before: dict[tuple[str, str], Any], module: nn.Module) -> None:
    after = attributes(module)
    assert after.keys() == before.keys(), f"attributes added or removed: {after.keys() ^ before.keys()}"
    changed = [key for key in before if after[key] is not before[key]]
    assert not changed, f"attributes rebound during forward: {[(k, before[k], after[k]) for k in changed]}"


def test_learnable_temperature_module_is_copyable_after_a_step() -> None:
    """After forward + backward, deepcopy, pickle and torch.save(state_dict) work, and the copies compute the same."""
    criterion = pt.InfoNCE(temperature=0.1, learnable_temperature=True)
    a, p, n = triplets(seed=1, grad=True)
    loss = criterion(a, p, n)
    loss.backward()

    twin = copy.deepcopy(criterion)
    restored = pickle.loads(pickle.dumps(criterion))
    buf = io.BytesIO()
    torch.save(criterion.state_dict(), buf)
    buf.seek(0)
    fresh = pt.InfoNCE(temperature=0.5, learnable_temperature=True)
    fresh.load_state_dict(torch.load(buf))

    x = triplets(seed=2)
    expected = criterion(*x).detach()
    for other in (twin, restored, fresh):
        assert_close(other(*x).detach(), expected, rtol=1e-12, atol=0)


def test_learnable_temperature_leaves_the_users_loss_fn_untouched() -> None:
    """A user's NTXentLoss(temperature=0.1) keeps every attribute (temperature 0.1, a float) and works alone after.

    The module meanwhile uses its own temperature exp(log_temperature), here moved to 0.2.
    """
    user = NTXentLoss(temperature=0.1)
    before = attributes(user)
    criterion = pt.InfoNCE(loss_fn=user, learnable_temperature=True)
    with torch.no_grad():
        criterion.log_temperature.fill_(math.log(0.2))

    a, p, n = triplets(seed=3, grad=True)
    loss = criterion(a, p, n)
    loss.backward()
    tau = criterion.log_temperature.detach().double().exp()
    assert_close(loss.detach(), infonce_loop(a.detach(), p.detach(), n.detach(), tau), rtol=1e-6, atol=0)
    assert type(user.temperature) is float
    assert user.temperature == 0.1
    assert_untouched(before, user)

    # the user's own object, two separate graphs, each backward once
    for seed in (4, 5):
        a, p, n = triplets(n=3, m=2, seed=seed, grad=True)
        own = user(pt.concat_embeddings(a, p, n), indices_tuple=pt.build_indices(3, 2))
        own.backward()
        assert a.grad is not None
        assert torch.isfinite(a.grad).all()
        assert_close(own.detach(), infonce_loop(a.detach(), p.detach(), n.detach(), 0.1), rtol=1e-9, atol=0)
    assert_untouched(before, user)


@pytest.mark.slow  # (100 calls)
def test_one_module_called_from_four_threads() -> None:
    """4 threads x 25 calls of one learnable-temperature module, each with its own inputs and backward: no error,
    and every value equals the formula's."""
    criterion = pt.InfoNCE(temperature=0.1, learnable_temperature=True)
    values: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(25):
                seed = 100 * thread + i
                a, p, n = triplets(n=4, m=3, seed=seed, grad=True)
                loss = criterion(a, p, n)
                loss.backward()
                values[seed] = loss.detach()
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} thread(s) raised; first: {errors[0]!r}"
    assert len(values) == 100
    tau = criterion.log_temperature.detach().double().exp()
    for seed, value in values.items():
        assert_close(value, infonce_loop(*triplets(n=4, m=3, seed=seed), tau), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph breaks, same numbers as eager
# --------------------------------------------------------------------------------------------------------------


def compile_kwargs(case: str) -> dict[str, Any]:
    g = gen(11)
    ids = {
        "positive_ids": torch.randint(0, 4, (6,), generator=g),
        "negative_ids": torch.randint(0, 4, (6, 3), generator=g),
    }
    table: dict[str, dict[str, Any]] = {
        "default": {},
        "tensor-temperature": {"temperature": torch.tensor(0.1)},
        "pml-engine": {"engine": "pml"},
        "in-batch": {"in_batch": True},
        "negatives-mask": {"negatives_mask": torch.rand(6, 3, generator=g) > 0.3},
        "ids": ids,
        "shared-negatives": {"shared_negatives": torch.randn(4, 8, generator=g, dtype=F64)},
        "shared-ids": {  # issue 22: a queue's rows with their ids
            "shared_negatives": torch.randn(4, 8, generator=g, dtype=F64),
            "shared_negative_ids": torch.tensor([0, 1, 2, 9]),
            "positive_ids": torch.randint(0, 4, (6,), generator=g),
        },
    }
    return table[case]


# fullgraph=True failures (graph breaks) are Dynamo's, whatever the backend; Inductor's C++ build costs 10-90 s a
# case on a 2-core machine, so it runs the two forward cases that matter most and aot_eager runs the rest.
COMPILE_CASES = [
    pytest.param(case, backend, id=case)
    for case, backend in (
        ("default", "inductor"),
        ("tensor-temperature", "inductor"),
        ("pml-engine", "aot_eager"),
        ("in-batch", "aot_eager"),
        ("negatives-mask", "aot_eager"),
        ("ids", "aot_eager"),
        ("shared-negatives", "aot_eager"),
        ("shared-ids", "aot_eager"),
    )
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "backend"), COMPILE_CASES)
def test_compiled_infonce_equals_eager(case: str, backend: str) -> None:
    """torch.compile(pt.infonce, fullgraph=True) traces without a graph break and returns eager's value."""
    torch._dynamo.reset()
    a, p, n = triplets(seed=12)
    kw = compile_kwargs(case)
    eager = pt.infonce(a, p, n, **kw)
    compiled = torch.compile(pt.infonce, fullgraph=True, backend=backend)(a, p, n, **kw)
    assert_close(compiled, eager, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_infonce_with_parameter_temperature_equals_eager() -> None:
    """An nn.Parameter temperature compiles in one graph; value and its gradient (and the anchors') equal eager."""
    torch._dynamo.reset()

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a, p, n = triplets(seed=13, grad=True)
        tau = nn.Parameter(torch.tensor(0.1, dtype=F64))
        loss = fn(a, p, n, temperature=tau)
        return (loss.detach(), *torch.autograd.grad(loss, (tau, a)))

    eager = run(pt.infonce)
    compiled = run(torch.compile(pt.infonce, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager, strict=True):
        assert_close(c, e, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_learnable_temperature_module_equals_eager() -> None:
    """torch.compile(InfoNCE(learnable_temperature=True), fullgraph=True): forward and backward equal eager.

    The learnable temperature is a float32 parameter, hence the float32 tolerance.
    """
    torch._dynamo.reset()

    def run(criterion: pt.InfoNCE, call: Callable[..., torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        a, p, n = triplets(seed=14, grad=True)
        loss = call(a, p, n)
        loss.backward()
        assert criterion.log_temperature is not None
        return loss.detach(), a.grad, criterion.log_temperature.grad

    eager_module = pt.InfoNCE(temperature=0.1, learnable_temperature=True)
    eager = run(eager_module, eager_module)
    module = pt.InfoNCE(temperature=0.1, learnable_temperature=True)
    compiled = run(module, torch.compile(module, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager, strict=True):
        assert c is not None
        assert e is not None
        assert_close(c, e, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize(
    "how", [pytest.param("tensor", id="tensor-temperature"), pytest.param("learnable", id="learnable")]
)
def test_cuda_training_step_never_synchronizes(how: str) -> None:
    """Forward + backward with a tensor (or learnable) temperature makes no host-device sync (sync debug 'error')."""
    dev = "cuda"
    a, p, n = (t.to(dev).requires_grad_(True) for t in triplets(n=64, m=8, d=32, seed=15, dtype=F32))
    if how == "tensor":
        tau = nn.Parameter(torch.tensor(0.1, device=dev))

        def step() -> None:
            pt.infonce(a, p, n, temperature=tau).backward()
    else:
        criterion = pt.InfoNCE(temperature=0.1, learnable_temperature=True).to(dev)

        def step() -> None:
            criterion(a, p, n).backward()

    step()  # warm-up: allocator, kernels, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(a.grad).all()


# --------------------------------------------------------------------------------------------------------------
# torch.func: grad, vjp and vmap give the formula's gradients, with and without chunks
# --------------------------------------------------------------------------------------------------------------

FUNC_CASES = [
    pytest.param(None, "plain", id="plain"),
    pytest.param(2, "plain", id="plain-chunked"),
    pytest.param(None, "in_batch", id="in-batch"),
    pytest.param(2, "in_batch", id="in-batch-chunked"),
    pytest.param(None, "shared", id="shared"),
    pytest.param(2, "shared", id="shared-chunked"),
]


def func_problem(seed: int) -> tuple[torch.Tensor, ...]:
    """N=6 anchors, M=3, d=8, and S=4 shared negatives."""
    a, p, n = triplets(seed=seed)
    return a, p, n, torch.randn(4, 8, generator=gen(seed + 1000), dtype=F64)


def func_loss(chunk: int | None, option: str) -> Callable[..., torch.Tensor]:
    def f(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        kw: dict[str, Any] = {"in_batch": option == "in_batch"}
        if option == "shared":
            kw["shared_negatives"] = shared
        return pt.infonce(a, p, n, chunk_size=chunk, **kw)

    return f


def func_reference(
    option: str, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, shared: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    kw: dict[str, Any] = {"in_batch": option == "in_batch"}
    if option == "shared":
        kw["shared"] = shared
    return formula_value_and_grads(a, p, n, **kw)


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize(("chunk", "option"), FUNC_CASES)
def test_func_grad_equals_formula_gradient(chunk: int | None, option: str) -> None:
    """torch.func.grad w.r.t. anchors, positives and negatives equals the formula's autograd gradient."""
    a, p, n, sh = func_problem(21)
    grads = torch.func.grad(func_loss(chunk, option), argnums=(0, 1, 2))(a, p, n, sh)
    _, ref = func_reference(option, a, p, n, sh)
    for g, r in zip(grads, ref, strict=True):
        assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize(("chunk", "option"), FUNC_CASES)
def test_func_vjp_equals_formula(chunk: int | None, option: str) -> None:
    """torch.func.vjp returns the formula's value, and its pullback of 1.7 is 1.7 x the formula's gradient."""
    a, p, n, sh = func_problem(22)
    value, pullback = torch.func.vjp(func_loss(chunk, option), a, p, n, sh)
    grads = pullback(torch.tensor(1.7, dtype=F64))
    ref_value, ref = func_reference(option, a, p, n, sh)
    assert_close(value, ref_value, rtol=1e-9, atol=1e-9)
    for g, r in zip(grads[:3], ref, strict=True):
        assert_close(g, 1.7 * r, rtol=1e-9, atol=1e-9)


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize(("chunk", "option"), FUNC_CASES)
def test_func_vmap_over_independent_problems_equals_formula(chunk: int | None, option: str) -> None:
    """vmap over 3 independent problems (leading batch dim) gives each problem's value, and vmap(grad) its
    gradient, as the formula does for each problem alone."""
    problems = [func_problem(30 + b) for b in range(3)]
    stacked = [
        torch.stack(parts) for parts in zip(*problems, strict=True)
    ]  # (3, N, d), (3, N, d), (3, N, M, d), (3, S, d)
    f = func_loss(chunk, option)
    values = torch.func.vmap(f)(*stacked)
    grads = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2)))(*stacked)
    for b, problem in enumerate(problems):
        ref_value, ref = func_reference(option, *problem)
        assert_close(values[b], ref_value, rtol=1e-9, atol=1e-9)
        for g, r in zip(grads, ref, strict=True):
            assert_close(g[b], r, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# engine="auto" is uncapped for every plain NTXentLoss; engine="pml" is PML's numbers, cap included
# --------------------------------------------------------------------------------------------------------------


class MyCos(CosineSimilarity):
    pass


class ScaledDot(BaseDistance):
    """A user's similarity: scale x dot product of the (L2-normalized) embeddings."""

    def __init__(self, scale: float = 1.5, **kwargs: Any) -> None:
        super().__init__(is_inverted=True, **kwargs)
        self.scale = scale

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return self.scale * query_emb @ ref_emb.T

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return self.scale * (query_emb * ref_emb).sum(-1)


def snr_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Minus PML's SNRDistance of 1-D float64 vectors: -var(x̂ - ŷ) / var(x̂), x̂ = x/‖x‖ (PML normalizes first),
    var with Bessel's correction (torch.var's default)."""
    d = x.shape[0]
    nx = torch.sqrt(sum(x[i] * x[i] for i in range(d)))
    ny = torch.sqrt(sum(y[i] * y[i] for i in range(d)))
    xs = [x[i] / nx for i in range(d)]
    diff = [x[i] / nx - y[i] / ny for i in range(d)]

    def var(v: list[torch.Tensor]) -> torch.Tensor:
        mean = sum(v) / d
        return sum((vi - mean) ** 2 for vi in v) / (d - 1)

    return -(var(diff) / var(xs))


# name: (distance factory, float64 similarity of two 1-D vectors as the formula sees it)
DISTANCES: dict[str, tuple[Callable[[], BaseDistance], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "cosine": (CosineSimilarity, lambda x, y: similarity("cosine", x, y)),
    "cosine-subclass": (MyCos, lambda x, y: similarity("cosine", x, y)),
    "snr": (SNRDistance, snr_similarity),
    "user-distance": (ScaledDot, lambda x, y: 1.5 * similarity("cosine", x, y)),
}
HARD_TAU = 0.01


def hard_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One anchor [1, 8] near e0, its positive [1, 8] near -e0 (far), two negatives [1, 2, 8] near e0 (near)."""
    g = gen(41)
    e0 = torch.zeros(8, dtype=F64)
    e0[0] = 1.0
    a = e0 + 0.1 * torch.randn(8, generator=g, dtype=F64)
    p = -e0 + 0.1 * torch.randn(8, generator=g, dtype=F64)
    n = e0 + 0.1 * torch.randn(2, 8, generator=g, dtype=F64)
    return a[None].float(), p[None].float(), n[None].float()


@pytest.mark.parametrize("name", [pytest.param(k, id=k) for k in ("cosine-subclass", "snr", "user-distance")])
def test_auto_engine_is_uncapped_for_every_distance(name: str) -> None:
    """float32, τ=0.01, a far positive: the auto engine returns the formula's loss (hundreds, not PML's
    -log(tiny) = 87.3) and a nonzero gradient equal to the float64 formula's."""
    make, sim = DISTANCES[name]
    a, p, n = (t.requires_grad_(True) for t in hard_case())
    loss = pt.infonce(a, p, n, loss_fn=NTXentLoss(temperature=HARD_TAU, distance=make()))
    loss.backward()

    a64, p64, n64 = leaves(a, p, n)
    ref = term(sim(a64[0], p64[0]) / HARD_TAU, [sim(a64[0], n64[0, j]) / HARD_TAU for j in range(2)])
    ref.backward()
    assert ref.item() > 150, "the case is meant to be far beyond PML's cap"
    assert loss.dtype == F32
    assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    for got, want in ((a.grad, a64.grad), (p.grad, p64.grad), (n.grad, n64.grad)):
        assert got is not None
        assert want is not None
        assert got.abs().max() > 0
        assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", [pytest.param(k, id=k) for k in DISTANCES])
def test_pml_engine_returns_pmls_own_numbers_cap_included(name: str) -> None:
    """engine="pml" equals plain NTXentLoss()(concat_embeddings, build_indices) on the same pairs: for the hard case
    in float32 that is PML's cap -log(finfo.tiny) ≈ 87.34."""
    make, _ = DISTANCES[name]
    a, p, n = hard_case()
    ours = pt.infonce(a, p, n, loss_fn=NTXentLoss(temperature=HARD_TAU, distance=make()), engine="pml")
    theirs = NTXentLoss(temperature=HARD_TAU, distance=make())(
        pt.concat_embeddings(a, p, n), indices_tuple=pt.build_indices(1, 2)
    )
    assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert ours.item() == pytest.approx(-math.log(torch.finfo(F32).tiny), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# A NaN/inf negative excluded by ids reaches neither the loss nor any gradient
# --------------------------------------------------------------------------------------------------------------

POISONS = [
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
]
ENGINES = [pytest.param("auto", id="auto"), pytest.param("pml", id="pml")]


def check_poisoned(
    clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor], poison: float, row: tuple[int, int], **kw: Any
) -> None:
    """``infonce`` on negatives with ``row`` set to ``poison`` equals the formula on the clean ones (same ids)."""
    engine = kw.pop("engine")
    a, p, n = (t.detach().clone().requires_grad_(True) for t in clean)
    with torch.no_grad():
        n[row] = poison
    loss = pt.infonce(a, p, n, engine=engine, **kw)
    loss.backward()

    formula_kw = {"in_batch": kw.get("in_batch", False), "pos_ids": kw["positive_ids"], "neg_ids": kw["negative_ids"]}
    ref_value, ref = formula_value_and_grads(*clean, **formula_kw)
    assert torch.isfinite(loss)
    assert_close(loss.detach(), ref_value, rtol=1e-9, atol=1e-9)
    for name, got in (("anchors", a.grad), ("positives", p.grad), ("negatives", n.grad)):
        assert got is not None, f"no gradient of `{name}`"
        assert torch.isfinite(got).all(), f"non-finite gradient of `{name}`"
    assert n.grad is not None
    assert (n.grad[row] == 0).all()
    for got, want in zip((a.grad, p.grad, n.grad), ref, strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("poison", POISONS)
def test_id_excluded_poisoned_negative_reaches_nothing(poison: float, engine: str) -> None:
    """A NaN/inf negative whose id equals its own anchor's positive id: finite loss equal to the formula without
    it, all gradients finite and equal to the formula's, its own gradient exactly zero."""
    clean = triplets(n=3, m=3, d=5, seed=51)
    pos_ids = torch.tensor([10, 11, 12])
    neg_ids = torch.tensor([[20, 21, 22], [23, 24, 11], [25, 26, 27]])  # negative (1, 2) is anchor 1's positive
    check_poisoned(clean, poison, (1, 2), positive_ids=pos_ids, negative_ids=neg_ids, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("poison", POISONS)
def test_id_excluded_poisoned_negative_reaches_nothing_in_batch(poison: float, engine: str) -> None:
    """in_batch=True, K=2: the poisoned negative's id (99) is a positive id of every row, so no anchor sees it --
    neither its own anchor nor the others through the batch."""
    clean = triplets(n=3, m=3, d=5, k=2, seed=52)
    pos_ids = torch.tensor([[10, 99], [11, 99], [12, 99]])
    neg_ids = torch.tensor([[20, 21, 22], [23, 24, 99], [25, 26, 27]])
    check_poisoned(clean, poison, (1, 2), positive_ids=pos_ids, negative_ids=neg_ids, in_batch=True, engine=engine)


# --------------------------------------------------------------------------------------------------------------
# DoNothingReducer: per-pair losses
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [pytest.param(F64, id="float64"), pytest.param(F32, id="float32")])
def test_do_nothing_reducer_returns_per_pair_losses(dtype: torch.dtype, engine: str) -> None:
    """NTXentLoss(reducer=DoNothingReducer()) gives the (N*K,) per-pair losses, anchor 0's K terms first, with the
    inputs' dtype, equal to the formula's terms; gradients flow through them."""
    a, p, n = triplets(n=4, m=3, d=6, k=2, seed=61, dtype=dtype, grad=True)
    loss_fn = NTXentLoss(temperature=0.1, reducer=DoNothingReducer())
    out = pt.infonce(a, p, n, loss_fn=loss_fn, engine=engine)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (8,)
    assert out.dtype == dtype
    weights = torch.arange(1.0, 9.0, dtype=F64)  # distinct, so the gradient pins the order too
    (out * weights.to(dtype)).sum().backward()

    a64, p64, n64 = leaves(a, p, n)
    ref = infonce_loop(a64, p64, n64, 0.1, reduction="none")
    (ref * weights).sum().backward()
    tol = 1e-9 if dtype == F64 else 2e-5
    assert_close(out.detach().double(), ref.detach(), rtol=tol, atol=tol)
    for got, want in ((a.grad, a64.grad), (p.grad, p64.grad), (n.grad, n64.grad)):
        assert got is not None
        assert want is not None
        assert_close(got.double(), want, rtol=tol, atol=tol)


class CountingCosine(CosineSimilarity):
    """CosineSimilarity that counts every use: zero uses means no work was done."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uses = 0

    def compute_mat(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.uses += 1
        return super().compute_mat(*args, **kwargs)

    def pairwise_distance(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.uses += 1
        return super().pairwise_distance(*args, **kwargs)

    def maybe_normalize(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.uses += 1
        return super().maybe_normalize(*args, **kwargs)


class CountingRegularizer(LpRegularizer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uses = 0

    def compute_loss(self, embeddings: torch.Tensor) -> dict:
        self.uses += 1
        return super().compute_loss(embeddings)


@pytest.mark.parametrize("form", [pytest.param("function", id="infonce"), pytest.param("module", id="InfoNCE")])
def test_do_nothing_reducer_with_regularizer_is_rejected_before_any_work(form: str) -> None:
    """DoNothingReducer cannot carry an embedding regularizer's loss next to the per-pair losses: ValueError naming
    the reducer, before the distance or the regularizer is touched (at construction or at the call)."""
    distance, regularizer = CountingCosine(), CountingRegularizer()
    loss_fn = NTXentLoss(distance=distance, reducer=DoNothingReducer(), embedding_regularizer=regularizer)
    a, p, n = triplets(seed=62)
    call = (
        (lambda: pt.infonce(a, p, n, loss_fn=loss_fn))
        if form == "function"
        else (lambda: pt.InfoNCE(loss_fn=loss_fn)(a, p, n))
    )
    with pytest.raises(ValueError, match="reducer"):
        call()
    assert distance.uses == 0
    assert regularizer.uses == 0


# --------------------------------------------------------------------------------------------------------------
# Inputs: numpy and Fraction scalars work; bad inputs get a clear error before any work
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "tau"),
    [
        pytest.param({"chunk_size": np.int64(2)}, pt.DEFAULT_TEMPERATURE, id="chunk_size-np.int64"),
        pytest.param({"temperature": Fraction(1, 10)}, 0.1, id="temperature-Fraction"),
        pytest.param({"temperature": np.float64(0.1)}, 0.1, id="temperature-np.float64"),
    ],
)
def test_numpy_and_fraction_scalars_are_accepted(kw: dict[str, Any], tau: float) -> None:
    """np.int64 chunk sizes and Fraction / np.float64 temperatures work and equal their Python-number twins."""
    a, p, n = triplets(seed=71)
    got = pt.infonce(a, p, n, **kw)
    twin = {key: (int(v) if key == "chunk_size" else float(v)) for key, v in kw.items()}
    assert_close(got, pt.infonce(a, p, n, **twin), rtol=1e-12, atol=0)
    assert_close(got, infonce_loop(a, p, n, tau), rtol=1e-9, atol=0)


def t64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(72), dtype=F64)


def jagged(*rows: int) -> torch.Tensor:
    return torch.nested.nested_tensor([t64(r, 8) for r in rows], layout=torch.jagged)


# id: (inputs and options, exception, regex)
BAD_INPUTS: list[Any] = [
    pytest.param(
        lambda: {"args": (t64(4, 8), t64(4, 8), t64(4, 3, 8)), "temperature": 0.1, "loss_fn": TripletMarginLoss()},
        TypeError,
        "loss_fn",
        id="temperature-and-TripletMarginLoss",
    ),
    pytest.param(
        lambda: {"args": (t64(4, 8), t64(4, 8), t64(4, 3, 8)), "loss_fn": TripletMarginLoss()},
        TypeError,
        "loss_fn",
        id="TripletMarginLoss",
    ),
    pytest.param(
        lambda: {"args": tuple(t.to("meta") for t in (t64(4, 8), t64(4, 8), t64(4, 3, 8)))},
        ValueError,
        "meta",
        id="meta-device",
    ),
    pytest.param(lambda: {"args": (t64(2, 8), t64(2, 8), jagged(3, 2))}, TypeError, "nested", id="nested-negatives"),
    pytest.param(lambda: {"args": (jagged(1, 1), t64(2, 8), t64(2, 3, 8))}, TypeError, "nested", id="nested-anchors"),
    pytest.param(
        lambda: {"args": (t64(4, 8).to_sparse(), t64(4, 8), t64(4, 3, 8))}, TypeError, "sparse", id="sparse-anchors"
    ),
    pytest.param(
        lambda: {"args": tuple(t.to(torch.complex128) for t in (t64(4, 8), t64(4, 8), t64(4, 3, 8)))},
        TypeError,
        "anchors",
        id="complex",
    ),
    pytest.param(
        lambda: {"args": (t64(32, 128), t64(32, 128), t64(31, 10, 128))},
        ValueError,
        re.escape("`negatives` has N=31 but `anchors` has N=32"),
        id="negatives-N",
    ),
    pytest.param(
        lambda: {"args": (t64(32, 128), t64(31, 128), t64(32, 10, 128))},
        ValueError,
        re.escape("`positives` has N=31 but `anchors` has N=32"),
        id="positives-N",
    ),
    pytest.param(
        lambda: {"args": (t64(32, 128), t64(32, 128), t64(32, 10, 64))},
        ValueError,
        re.escape("`negatives` has d=64 but `anchors` has d=128"),
        id="negatives-d",
    ),
    pytest.param(
        lambda: {
            "args": (t64(32, 128), t64(32, 128), t64(32, 10, 128)),
            "negatives_mask": torch.ones(32, 9, dtype=torch.bool),
        },
        ValueError,
        re.escape("`negatives_mask` has M=9 but `negatives` has M=10"),
        id="negatives_mask-M",
    ),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUTS)
def test_bad_input_is_rejected_before_any_work(build: Callable[[], dict], error: type, match: str) -> None:
    """Each bad input raises the named error type with a message naming what is wrong; where the case leaves the
    loss to us, a counting distance shows that nothing was computed first."""
    kw = build()
    args = kw.pop("args")
    spy = None
    if "loss_fn" not in kw and "temperature" not in kw:
        spy = CountingCosine()
        kw["loss_fn"] = NTXentLoss(distance=spy)
    with pytest.raises(error, match=match):
        pt.infonce(*args, **kw)
    assert spy is None or spy.uses == 0
