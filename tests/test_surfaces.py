"""Regressions of issue 19: the surfaces around the formula (numbered as in the issue; 1 and 4 are in
test_distributed.py, 2 and 7 in test_cached.py, 10c in test_demo.py).

Each test failed on b391386 (the core before the block rebuild); the values are checked against the independent
float64 loop of tests/formula.py or closed forms, never against the package itself.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo
from formula import infonce_loop
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pml_triplets as pt
from pml_triplets import _engine

F64 = torch.float64


def data(n: int, m: int, d: int, k: int = 1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=F64)
    p = torch.randn(n, d, generator=g, dtype=F64) if k == 1 else torch.randn(n, k, d, generator=g, dtype=F64)
    return [a, p, torch.randn(n, m, d, generator=g, dtype=F64)]


# ------------------------------------------------------------------ 3: a loss_fn's temperature, read at each call


@pytest.mark.parametrize("tau", [-0.1, 0.0, float("nan")], ids=["negative", "zero", "nan"])
def test_loss_fn_temperature_set_later_is_checked_when_read(tau: float) -> None:
    lf = NTXentLoss(temperature=0.1)
    criterion = pt.InfoNCE(loss_fn=lf)
    lf.temperature = tau  # a schedule writes it after construction
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        criterion(*data(4, 3, 5))


def test_loss_fn_temperature_schedule_is_honoured() -> None:
    lf = NTXentLoss(temperature=0.1)
    criterion = pt.InfoNCE(loss_fn=lf)
    a, p, n = data(4, 3, 5)
    lf.temperature = 0.5
    torch.testing.assert_close(criterion(a, p, n), infonce_loop(a, p, n, 0.5), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ issue 30, item 8: the module's current loss_fn


def test_module_reads_its_loss_fns_distance_as_it_is_now() -> None:
    # b30fb93: after one forward, replacing fn.distance left the module on the old cosine (1.358 where infonce and
    # PML gave 13.765); the temperature and the reducer were read anew.
    from pytorch_metric_learning.distances import DotProductSimilarity

    fn = NTXentLoss(temperature=0.5)
    criterion = pt.InfoNCE(loss_fn=fn)
    a, p, n = data(4, 3, 5, seed=2)
    torch.testing.assert_close(criterion(a, p, n), infonce_loop(a, p, n, 0.5), rtol=1e-12, atol=1e-12)
    fn.distance = DotProductSimilarity(normalize_embeddings=False)
    want = infonce_loop(a, p, n, 0.5, sim="dot")
    torch.testing.assert_close(criterion(a, p, n), want, rtol=1e-12, atol=1e-12)
    emb, idx = pt.concat_embeddings(a, p, n), pt.build_indices(4, 3)  # PML itself, on the same pairs
    torch.testing.assert_close(NTXentLoss(0.5, distance=fn.distance)(emb, indices_tuple=idx), want)


def test_module_uses_a_loss_fn_assigned_later_or_refuses_it() -> None:
    # b30fb93: `criterion.loss_fn = NTXentLoss(temperature=2.0)` was silently ignored (the old τ kept, and shown by
    # repr beside the new submodule).
    criterion = pt.InfoNCE(loss_fn=NTXentLoss(temperature=0.1))
    a, p, n = data(4, 3, 5, seed=3)
    criterion(a, p, n)
    criterion.loss_fn = NTXentLoss(temperature=2.0)
    torch.testing.assert_close(criterion(a, p, n), infonce_loop(a, p, n, 2.0), rtol=1e-12, atol=1e-12)
    assert repr(criterion).splitlines()[1].strip() == "temperature=2"
    with pytest.raises(TypeError, match="`loss_fn` must be a pytorch_metric_learning NTXentLoss"):
        criterion.loss_fn = nn.Linear(2, 2)
    assert isinstance(criterion.loss_fn, NTXentLoss)  # the refused value was not stored
    fixed = pt.InfoNCE(temperature=0.3)
    with pytest.raises(ValueError, match="pass either `temperature` or `loss_fn`"):
        fixed.loss_fn = NTXentLoss(temperature=2.0)
    torch.testing.assert_close(fixed(a, p, n), infonce_loop(a, p, n, 0.3), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 5: compile once for every batch size


class Graphs:
    """A torch.compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: object) -> object:
        self.count += 1
        return gm.forward


SCHEDULED = {  # option -> its value at step t: a float schedule
    "temperature": lambda t: 0.05 + 0.01 * t,
    "hardness_strength": lambda t: 1.0 + 0.5 * t,
    "false_negative_margin": lambda t: 0.05 + 0.01 * t,
}


@pytest.mark.slow  # (compiles: about 20 s)
@pytest.mark.skipif(
    getattr(torch._dynamo.config, "specialize_float", True),
    reason="this torch specializes every Python float (one graph per τ value), whatever the library does",
)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_compile_fullgraph_twenty_steps_at_most_two_graphs(chunk_size: int | None) -> None:
    torch._dynamo.reset()
    graphs = Graphs()

    def step(a, p, n, pid, nid, tau, strength, margin):  # type: ignore[no-untyped-def]
        options = {"in_batch": True, "hardness_mode": "all", "chunk_size": chunk_size}
        return pt.infonce(
            a,
            p,
            n,
            positive_ids=pid,
            negative_ids=nid,
            temperature=tau,
            hardness_strength=strength,
            false_negative_margin=margin,
            **options,
        )

    compiled = torch.compile(step, backend=graphs, fullgraph=True)
    for t in range(20):
        n = 5 + (7 * t) % 11  # 5..15 anchors, in no order
        a, p, neg = (x.float().requires_grad_() for x in data(n, 2, 6, seed=t))
        pid, nid = torch.arange(n), torch.randint(0, n, (n, 2), generator=torch.Generator().manual_seed(t))
        args = (pid, nid, *(f(t) for f in SCHEDULED.values()))
        got = compiled(a, p, neg, *args)
        (g_got,) = torch.autograd.grad(got, a)
        want = step(a, p, neg, *args)
        (g_want,) = torch.autograd.grad(want, a)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)
    assert graphs.count <= 2, f"{graphs.count} graphs for one configuration over 20 steps"


# ------------------------------------------------------------------ 6: the automatic chunk counts every block


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"directions": ("anchor_to_positive", "positive_to_positive")}, id="positive_to_positive"),
        pytest.param({"false_negative_margin": 0.1}, id="filtering"),
        pytest.param({"directions": ("anchor_to_positive", "positive_to_anchor")}, id="positive_to_anchor"),
    ],
)
def test_automatic_chunk_keeps_per_positive_blocks_under_the_budget(
    options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 1 << 11  # everything is several budgets: chunks (one chunk up to 4 budgets)
    monkeypatch.setitem(_engine._BUDGET, "cpu", budget)
    # R = 32 * (4 + 4) = 256 candidates: one anchor's (K, R) block alone is 1,024 elements, all of them 32,768
    a, p, n = (x.float().requires_grad_() for x in data(32, 4, 8, k=4))
    with LargestTensor() as seen:
        pt.infonce(a, p, n, in_batch=True, **options).backward()
    assert seen.numel <= budget, f"an intermediate of {seen.numel} elements, budget {budget}"


# ------------------------------------------------------------------ 8: a tensor temperature belongs to the module


def test_parameter_temperature_is_registered_trained_and_converted() -> None:
    tau = nn.Parameter(torch.tensor(0.2))
    criterion = pt.InfoNCE(temperature=tau)
    assert list(criterion.parameters()) == [tau]
    assert list(criterion.state_dict()) == ["tau"]
    optimizer = torch.optim.SGD(criterion.parameters(), lr=0.1)
    criterion(*(x.float() for x in data(4, 3, 5))).backward()
    optimizer.step()
    assert tau.item() != pytest.approx(0.2)
    assert criterion.double().temperature.dtype == F64


def test_tensor_temperature_is_a_buffer() -> None:
    criterion = pt.InfoNCE(temperature=torch.tensor(0.2))
    assert list(criterion.parameters()) == []
    assert list(criterion.state_dict()) == ["tau"]
    assert criterion.double().temperature.dtype == F64


# ------------------------------------------------------------------ 9: options that would do nothing


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(
            {"hardness_mode": "own"},
            r"`hardness_mode='own'` does nothing with `hardness_strength=0`",
            id="mode-without-strength",
        ),
        pytest.param(
            {"hardness_strength": 2.0},
            r"`hardness_strength=2.0` does nothing without `hardness_mode`",
            id="strength-without-mode",
        ),
        pytest.param(
            {"margin_strategy": "relative"},
            r"`margin_strategy='relative'` does nothing without",
            id="strategy-without-margin",
        ),
    ],
)
def test_options_that_do_nothing_are_rejected(options: dict, match: str) -> None:
    a, p, n = data(4, 3, 5)
    with pytest.raises(ValueError, match=match):
        pt.infonce(a, p, n, **options)
    with pytest.raises(ValueError, match=match):
        pt.InfoNCE(**options)


def test_own_hardness_without_own_negatives_is_rejected() -> None:
    a, p, _ = data(4, 3, 5)
    with pytest.raises(ValueError, match=r"`hardness_mode='own'` weighs each anchor's own negatives"):
        pt.infonce(a, p, None, in_batch=True, hardness_mode="own", hardness_strength=1.0)


# ------------------------------------------------------------------ 10: messages that say what is wrong


def test_pml_engine_with_retrieval_option_names_no_class_none() -> None:
    a, p, n = data(4, 3, 5)
    with pytest.raises(ValueError, match=r"engine='pml' with no loss_fn") as err:
        pt.infonce(a, p, n, engine="pml", false_negative_margin=0.1)
    assert "NoneType" not in str(err.value)


def test_positive_ids_message_for_k_positives() -> None:
    a, p, n = data(4, 3, 5, k=2)
    with pytest.raises(ValueError, match=r"`positive_ids` must be \[N, K\] = \[4, 2\] \(positives are \[N, K, d\]\)"):
        pt.infonce(a, p, n, positive_ids=torch.arange(4), negative_ids=torch.zeros(4, 3, dtype=torch.long))


# ------------------------------------------------------------------ 11: a distance that reads its values


class CheckedCosine(CosineSimilarity):
    """Cosine similarity that refuses NaNs -- data-dependent control flow, which torch.vmap cannot batch."""

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        m = super().compute_mat(query_emb, ref_emb)
        if torch.isnan(m).any():
            raise ValueError("NaN similarity")
        return m


def test_distance_that_reads_its_values_is_computed() -> None:
    assert isinstance(CheckedCosine(), BaseDistance)
    a, p, n = data(5, 3, 4)
    got = pt.infonce(a, p, n, loss_fn=NTXentLoss(temperature=0.3, distance=CheckedCosine()))
    torch.testing.assert_close(got, infonce_loop(a, p, n, 0.3), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 12: ties at the false-negative margin


def test_candidate_tied_with_the_positive_is_kept_at_margin_zero() -> None:
    # Row 1's positive is row 0's positive: for anchor 0 its cosine equals the positive's exactly, and with
    # margin 0 GIST's strict `>` keeps it (sentence-transformers compares the same cosines).
    g = torch.Generator().manual_seed(3)
    a, p = torch.randn(4, 7, generator=g, dtype=F64), torch.randn(4, 7, generator=g, dtype=F64)
    p[1] = p[0]
    got = pt.infonce(a, p, None, temperature=0.1, in_batch=True, false_negative_margin=0.0)
    want = infonce_loop(a, p, None, 0.1, in_batch=True, false_negative_margin=0.0)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    dropped = infonce_loop(a, p, None, 0.1, in_batch=True, false_negative_margin=1e-9)  # the tie dropped
    assert abs(want.item() - dropped.item()) > 1e-3  # so the test tells keeping from dropping


# ------------------------------------------------------------------ structure: three frames to the math


@pytest.mark.parametrize("entry", ["infonce", "InfoNCE"])
def test_a_call_reaches_the_math_in_three_frames(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    math = _engine.chunk_loss

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        here = [f.function for f in inspect.stack()[1:] if "pml_triplets" in f.filename.replace("\\", "/")]
        seen.append(["chunk_loss", *here])
        return math(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_engine, "chunk_loss", spy)
    a, p, n = data(6, 3, 5)
    (pt.infonce if entry == "infonce" else pt.InfoNCE())(a, p, n)
    assert seen == [["chunk_loss", "evaluate", "infonce" if entry == "infonce" else "forward"]]
