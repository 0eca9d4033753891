"""Retrieval options: directions, partition, hardness weighting and false-negative filtering, against the formula.

Each option alone and combined, both partitions, K = 1 and 2, chunked and not, with masks, ids and shared
negatives; loss and gradients in float64. The peers (sentence-transformers, open_clip) are in test_peers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from formula import infonce_loop

import pml_triplets as pt

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N, M, D, DG, S = 5, 3, 6, 4, 2
TAU = 0.25
A2P, P2A, A2A, P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"


def batch(k: int, seed: int) -> dict[str, torch.Tensor]:
    """Positives near their anchors, one near-duplicate negative per row, few ids: margins and ids bite."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=F64)
    p = a[:, None] + 0.7 * torch.randn(N, k, D, generator=g, dtype=F64)  # (N, K, D)
    n = torch.randn(N, M, D, generator=g, dtype=F64)
    n[:, 0] = p[:, 0] + 0.3 * torch.randn(N, D, generator=g, dtype=F64)  # false negatives
    w = torch.randn(D, DG, generator=g, dtype=F64)  # the guide: another view of the same points, width DG
    guide = [x @ w + 0.2 * torch.randn(*x.shape[:-1], DG, generator=g, dtype=F64) for x in (a, p, n)]
    squeeze = (lambda x: x[:, 0]) if k == 1 else (lambda x: x)  # K = 1 as [N, d]
    return {
        "a": a,
        "p": squeeze(p),
        "n": n,
        "ga": guide[0],
        "gp": squeeze(guide[1]),
        "gn": guide[2],
        "mask": torch.rand(N, M, generator=g) > 0.3,
        "shared": torch.randn(S, D, generator=g, dtype=F64),
        "pos_ids": torch.randint(0, 6, (N,) if k == 1 else (N, k), generator=g),
        "neg_ids": torch.randint(0, 6, (N, M), generator=g),
    }


# name -> (pt.infonce options, formula options); the new options have the same names in both
OPTIONS: dict[str, tuple[dict, dict]] = {
    "p2a": ({"in_batch": True, "directions": (A2P, P2A)},) * 2,
    "a2a": ({"in_batch": True, "directions": (A2P, A2A)},) * 2,
    "p2p": ({"in_batch": True, "directions": (A2P, P2P)},) * 2,
    "gte": ({"in_batch": True, "directions": (A2P, P2A, A2A, P2P)},) * 2,
    "hard_in_batch": ({"in_batch": True, "hardness_mode": "in_batch", "hardness_strength": 3.0},) * 2,
    "hard_own": ({"hardness_mode": "own", "hardness_strength": 3.0},) * 2,
    "hard_all": ({"in_batch": True, "hardness_mode": "all", "hardness_strength": 3.0},) * 2,
    "fn_abs": ({"in_batch": True, "false_negative_margin": 0.1},) * 2,
    "fn_rel": ({"in_batch": True, "false_negative_margin": 0.2, "margin_strategy": "relative"},) * 2,
    "fn_own": ({"false_negative_margin": 0.0},) * 2,  # own negatives only, no in-batch
    "mask": ({"negatives_mask": "mask"}, {"mask": "mask"}),
    "shared": ({"shared_negatives": "shared"}, {"shared": "shared"}),
    "ids": ({"positive_ids": "pos_ids", "negative_ids": "neg_ids"}, {"pos_ids": "pos_ids", "neg_ids": "neg_ids"}),
    "guide": ({"guide": "guide"},) * 2,  # with a fn_* option: the guide's similarities, else the model's own
}


def resolve(b: dict[str, torch.Tensor], which: str) -> tuple[dict, dict]:
    """(pt.infonce kwargs, infonce_loop kwargs) of the '+'-joined options, names of batch entries resolved."""

    def value(v: object) -> object:
        if v == "guide":
            return (b["ga"], b["gp"], b["gn"])
        return b[v] if isinstance(v, str) and v in b else v

    ours: dict = {}
    ref: dict = {}
    for name in which.split("+"):
        for out, opts in zip((ours, ref), OPTIONS[name], strict=True):
            for key, v in opts.items():
                if key == "directions" and key in out:  # union, in canonical order
                    v = tuple(d for d in (A2P, P2A, A2A, P2P) if d in set(out[key]) | set(v))
                out[key] = value(v)
    return ours, ref


ALONE = ["p2a", "a2a", "p2p", "gte", "hard_in_batch", "hard_own", "hard_all", "fn_abs", "fn_rel", "fn_own"]
COMBINED = [
    "fn_abs+guide",
    "fn_rel+guide+mask+ids",
    "fn_own+guide+mask",
    "hard_all+shared+mask",
    "hard_in_batch+shared+ids",
    "fn_abs+shared+mask+ids",  # filtered with the model's own embeddings, shared negatives included
    "p2a+hard_all+fn_abs+guide+mask+ids",
    "p2a+hard_in_batch+fn_rel+shared+mask+ids",
    "gte+hard_all+fn_abs+guide+mask+ids",
    "gte+hard_own+fn_rel+shared+mask+ids",
]


def cases() -> list:
    out = []
    for which in ALONE + COMBINED:
        directions = resolve(batch(1, 0), which)[0].get("directions", (A2P,))
        for partition in ("joint", "per_direction"):
            if partition == "per_direction" and set(directions) & {A2A, P2P}:
                continue  # a ValueError, tested below
            out.append(pytest.param(which, partition, id=f"{which}-{partition}"))
    return out


_FORMULA: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # the slow formula, once per chunk sizes


def formula(which: str, partition: str, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    key = (which, partition, k)
    if key not in _FORMULA:
        b = batch(k, seed=len(which) + k)
        _, ref = resolve(b, which)
        xs = [b[name].clone().requires_grad_() for name in ("a", "p", "n")]
        loss = infonce_loop(*xs, TAU, partition=partition, **ref)
        loss.backward()
        _FORMULA[key] = (loss.detach(), [x.grad for x in xs])
    return _FORMULA[key]


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunk2"])
@pytest.mark.parametrize("k", [1, 2], ids=["K1", "K2"])
@pytest.mark.parametrize(("which", "partition"), cases())
def test_matches_formula(which: str, partition: str, k: int, chunk_size: int | None) -> None:
    b = batch(k, seed=len(which) + k)
    ours, _ = resolve(b, which)
    if "guide" in ours:  # the guide may require grad: it must receive none
        ours["guide"] = tuple(x.clone().requires_grad_() for x in ours["guide"])
    xs = [b[name].clone().requires_grad_() for name in ("a", "p", "n")]
    loss = pt.infonce(*xs, temperature=TAU, partition=partition, chunk_size=chunk_size, **ours)
    guide = list(ours.get("guide", ()))
    grads = torch.autograd.grad(loss, xs + guide, allow_unused=True)
    want, want_grads = formula(which, partition, k)
    torch.testing.assert_close(loss.detach(), want, **TOL)
    for name, got, ref in zip(("anchors", "positives", "negatives"), grads[:3], want_grads, strict=True):
        torch.testing.assert_close(got, ref, **TOL, msg=lambda s, name=name: f"d/d{name}: {s}")
    for got in grads[3:]:
        assert got is None or not got.any(), "the guide must get no gradient"


@pytest.mark.slow  # (a check of the sweep's inputs, 3 s of float64 loops; the sweep itself is fast)
def test_options_change_the_loss() -> None:
    # each option must act on these inputs, or the equalities above compare nothing
    plain = formula("p2a", "joint", 2)[0]  # in_batch with the positive_to_anchor block
    for which in ("gte", "p2a+hard_all+fn_abs+guide+mask+ids", "p2a+hard_in_batch+fn_rel+shared+mask+ids"):
        assert abs(formula(which, "joint", 2)[0] - plain) > 1e-3, which
    b = batch(2, seed=0)
    base = infonce_loop(b["a"], b["p"], b["n"], TAU, in_batch=True, directions=(A2P, P2A, A2A, P2P))
    for extra in (
        {"hardness_mode": "in_batch", "hardness_strength": 3.0},
        {"hardness_mode": "own", "hardness_strength": 3.0},
        {"false_negative_margin": 0.1},
        {"false_negative_margin": 0.1, "guide": (b["ga"], b["gp"], b["gn"])},
    ):
        changed = infonce_loop(b["a"], b["p"], b["n"], TAU, in_batch=True, directions=(A2P, P2A, A2A, P2P), **extra)
        assert abs(changed - base) > 1e-3, extra


def test_module_matches_function() -> None:
    b = batch(2, seed=4)
    options = {
        "in_batch": True,
        "directions": (A2P, P2A),
        "partition": "per_direction",
        "hardness_mode": "all",
        "hardness_strength": 2.0,
        "false_negative_margin": 0.1,
        "margin_strategy": "relative",
    }
    criterion = pt.InfoNCE(TAU, **options)
    data = {"negatives_mask": b["mask"], "guide": (b["ga"], b["gp"], b["gn"])}
    got = criterion(b["a"], b["p"], b["n"], **data)
    want = pt.infonce(b["a"], b["p"], b["n"], temperature=TAU, **options, **data)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------- closed forms


def test_gte_closed_form() -> None:
    # a_i = p_i = e_i: P = 1/τ and every other similarity is 0. Joint over the four directions, the positive pair
    # enters twice (anchor_to_positive and positive_to_anchor), each other block adds N-1 terms e^0:
    #   ℓ = log(2e^{1/τ} + 4(N-1)) − 1/τ
    e = torch.eye(3, dtype=F64)
    got = pt.infonce(e, e, in_batch=True, temperature=TAU, directions=(A2P, P2A, A2A, P2P))
    want = math.log(2 * math.exp(1 / TAU) + 4 * 2) - 1 / TAU
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert infonce_loop(e, e, None, TAU, in_batch=True, directions=(A2P, P2A, A2A, P2P)).item() == pytest.approx(
        want, rel=1e-12
    )


def test_symmetric_per_direction_closed_form() -> None:
    # same inputs, per_direction over (A2P, P2A): both directions give log(1 + (N-1)e^{-1/τ})
    e = torch.eye(3, dtype=F64)
    options = {"in_batch": True, "directions": (A2P, P2A), "partition": "per_direction"}
    want = math.log1p(2 * math.exp(-1 / TAU))
    assert pt.infonce(e, e, temperature=TAU, **options).item() == pytest.approx(want, rel=1e-12)
    assert infonce_loop(e, e, None, TAU, **options).item() == pytest.approx(want, rel=1e-12)


def test_false_negative_is_dropped_closed_form() -> None:
    # filtered with the model's own cosine (no guide), margin 0.1; every positive pair has similarity 1/√2
    #   row 0: a = e0, p = e0 + e1; row 1's positive e0 + e2 has similarity 1/√2 > 1/√2 − 0.1: dropped, ℓ = 0
    #   row 1: a = e2, p = e0 + e2; row 0's positive e0 + e1 has similarity 0 <= 1/√2 − 0.1: kept
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    p = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)
    want = (0.0 + math.log1p(math.exp(-(1 / math.sqrt(2)) / TAU))) / 2
    got = pt.infonce(a, p, in_batch=True, temperature=TAU, false_negative_margin=0.1)
    assert got.item() == pytest.approx(want, rel=1e-12)
    ref = infonce_loop(a, p, None, TAU, in_batch=True, false_negative_margin=0.1)
    assert ref.item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- errors


def call(**overrides: object) -> torch.Tensor:
    b = batch(2, seed=1)
    args = {
        "anchors": b["a"],
        "positives": b["p"],
        "negatives": b["n"],
        "in_batch": True,
        "false_negative_margin": 0.1,
        "guide": (b["ga"], b["gp"], b["gn"]),
    } | overrides
    return pt.infonce(args.pop("anchors"), args.pop("positives"), args.pop("negatives"), **args)  # type: ignore[arg-type]


def guide_with(part: int, value: torch.Tensor | None) -> tuple:
    b = batch(2, seed=1)
    guide = [b["ga"], b["gp"], b["gn"]]
    guide[part] = value
    return tuple(guide)


ERRORS = [
    pytest.param({"partition": "per_direction", "directions": (A2P, A2A)}, "per_direction", id="per_direction-a2a"),
    pytest.param({"partition": "per_direction", "directions": (A2P, P2P)}, "per_direction", id="per_direction-p2p"),
    pytest.param({"partition": "softmax"}, "partition", id="bad-partition"),
    pytest.param({"directions": (P2A,)}, "anchor_to_positive", id="no-a2p"),
    pytest.param({"directions": (A2P, "doc_to_doc")}, "doc_to_doc", id="unknown-direction"),
    pytest.param({"directions": (A2P, P2A), "in_batch": False, "guide": None}, "in_batch", id="p2a-no-in_batch"),
    pytest.param({"directions": (A2P, A2A), "in_batch": False, "guide": None}, "in_batch", id="a2a-no-in_batch"),
    pytest.param({"directions": (A2P, P2P), "in_batch": False, "guide": None}, "in_batch", id="p2p-no-in_batch"),
    pytest.param({"hardness_mode": "own", "hardness_strength": -1.0}, "hardness_strength", id="negative-strength"),
    pytest.param({"hardness_mode": "hard_negatives", "hardness_strength": 1.0}, "hardness_mode", id="st-mode-name"),
    pytest.param({"margin_strategy": "proportional"}, "margin_strategy", id="bad-margin-strategy"),
    pytest.param({"guide": guide_with(0, torch.randn(N + 1, DG, dtype=F64))}, "guide", id="guide-anchors-N"),
    pytest.param({"guide": guide_with(1, torch.randn(N, DG, dtype=F64))}, "guide", id="guide-positives-K"),
    pytest.param({"guide": guide_with(1, torch.randn(N, 2, DG + 1, dtype=F64))}, "guide", id="guide-width"),
    pytest.param({"guide": guide_with(2, torch.randn(N, M + 1, DG, dtype=F64))}, "guide", id="guide-negatives-M"),
    pytest.param({"guide": guide_with(2, None)}, "guide", id="guide-negatives-missing"),
    pytest.param({"guide": guide_with(0, torch.randn(N, DG, DG, dtype=F64))}, "guide", id="guide-anchors-3d"),
    pytest.param(
        {"shared_negatives": torch.randn(S, D, dtype=F64)}, r"(?s)guide.*shared|shared.*guide", id="guide-and-shared"
    ),
]


@pytest.mark.parametrize(("overrides", "match"), ERRORS)
def test_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(**overrides)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(
            {"partition": "per_direction", "directions": (A2P, A2A), "in_batch": True},
            "per_direction",
            id="per_direction",
        ),
        pytest.param({"directions": (A2P, P2A)}, "in_batch", id="no-in_batch"),
        pytest.param({"hardness_mode": "own", "hardness_strength": -0.5}, "hardness_strength", id="negative-strength"),
        pytest.param(
            {"false_negative_margin": 0.1, "margin_strategy": "proportional"}, "margin_strategy", id="strategy"
        ),
    ],
)
def test_module_checks_options_at_construction(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pt.InfoNCE(TAU, **options)
