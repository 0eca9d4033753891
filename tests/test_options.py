"""Masks, K positives, shared and in-batch negatives, ids, tensor and learnable temperatures."""

from __future__ import annotations

import math

import pytest
import torch
from formula import infonce_loop
from helpers import ENGINES, F64, TOL, batch, formula, gen

import pml_triplets as pt

TRIPLET = ("anchors", "positives", "negatives")
# the batch entries each option passes to infonce (in_batch passes `in_batch=True`)
OPTION_KEYS = {"mask": ("negatives_mask",), "shared": ("shared_negatives",), "ids": ("positive_ids", "negative_ids")}


def options(b: dict[str, torch.Tensor], which: str) -> dict[str, object]:
    """infonce's keyword arguments for the options named in ``which`` ("plain", "mask+in_batch+ids", ...)."""
    kw: dict[str, object] = {}
    for name in which.split("+"):
        if name == "in_batch":
            kw["in_batch"] = True
        kw.update({key: b[key] for key in OPTION_KEYS.get(name, ())})
    return kw


# Float64 tolerances: 1e-12 relative against closed forms and the formula (see test_core.py), TOL[float64]'s 1e-9
# where gradients enter, and 1e-13 where two calls of the library differ only in the order of a few sums.
CASES = [
    "plain",
    "mask",
    "shared",
    "in_batch",
    "ids",
    "in_batch+ids",
    "mask+in_batch+ids",
    "mask+shared+in_batch+ids",
]


@pytest.mark.sweep(fast=8)
@pytest.mark.parametrize("which", CASES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("engine", ENGINES)
def test_option_matches_formula(which: str, k: int, engine: str) -> None:
    b = batch(k=k, seed=len(which) + k)
    kw = options(b, which)
    got = pt.infonce(*(b[key] for key in TRIPLET), temperature=0.2, engine=engine, **kw)
    want = formula(*(b[key] for key in TRIPLET), 0.2, **kw)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("which", ["mask+in_batch+ids", "mask+shared+in_batch+ids"])
def test_option_gradients_match_formula(which: str) -> None:
    b = batch(k=2, seed=3)
    kw = options(b, which)
    leaves = [b[key].clone().requires_grad_() for key in TRIPLET]
    pt.infonce(*leaves, temperature=0.2, **kw).backward()
    copies = [b[key].clone().requires_grad_() for key in TRIPLET]
    formula(*copies, 0.2, **kw).backward()
    for got, want in zip(leaves, copies, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("which", ["mask+in_batch+ids", "shared+in_batch"])
def test_options_on_device_and_dtype(which: str, device: str, dtype: torch.dtype) -> None:
    b = {key: v.to(device) for key, v in batch(k=2, seed=8).items()}
    b.update({key: b[key].to(dtype) for key in (*TRIPLET, "shared_negatives")})
    kw = options(b, which)
    got = pt.infonce(*(b[key] for key in TRIPLET), temperature=0.2, **kw)
    want = formula(*(b[key] for key in TRIPLET), 0.2, **kw)  # on the rounded values, in float64
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype
    assert got.device.type == device
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol)


def test_negatives_none_with_shared_or_in_batch() -> None:
    b = batch(seed=4)
    a, p, sh = b["anchors"], b["positives"], b["shared_negatives"]
    got = pt.infonce(a, p, None, shared_negatives=sh, temperature=0.3)
    assert got.item() == pytest.approx(infonce_loop(a, p, None, 0.3, shared=sh).item(), rel=1e-12)
    got = pt.infonce(a, p, in_batch=True, temperature=0.3)
    assert got.item() == pytest.approx(infonce_loop(a, p, None, 0.3, in_batch=True).item(), rel=1e-12)


def test_in_batch_closed_form() -> None:
    # a_i = p_i = e_i, no per-anchor negatives: anchor 0's only candidate is p_1 = e1 (cos 0)
    #   => each anchor: log(1 + e^{-1/τ})
    e = torch.eye(2, dtype=F64)
    got = pt.infonce(e, e, in_batch=True, temperature=0.25)
    assert got.item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-12)


def test_anchor_without_negatives_counts_as_zero() -> None:
    # anchor 0 has every negative masked: its term is 0 and it still counts in the mean (denominator 2)
    e = torch.eye(4, dtype=F64)
    a = e[:2]
    neg = torch.stack([e[2:], e[2:]])  # (2, 2, 4)
    mask = torch.tensor([[False, False], [True, True]])
    for engine in ("dense", "pml"):
        got = pt.infonce(a, a, neg, negatives_mask=mask, temperature=0.5, engine=engine)
        assert got.item() == pytest.approx((0 + math.log1p(2 * math.exp(-2.0))) / 2, rel=1e-12)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("engine", ENGINES)
def test_masking_equals_dropping(engine: str) -> None:
    b = batch(n=1, m=6, seed=5)
    mask = torch.tensor([[True, False, True, True, False, True]])
    masked = pt.infonce(b["anchors"], b["positives"], b["negatives"], negatives_mask=mask, engine=engine)
    dropped = pt.infonce(b["anchors"], b["positives"], b["negatives"][:, mask[0]], engine=engine)
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-13)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("garbage", [1e30, float("inf"), float("nan")], ids=["huge", "inf", "nan"])
def test_garbage_in_masked_rows_changes_nothing(engine: str, garbage: float) -> None:
    b = batch(k=2, seed=6)
    mask = b["negatives_mask"]
    dirty = b["negatives"].clone()
    dirty[~mask] = garbage
    results = []
    for negs in (b["negatives"], dirty):
        leaves = [b["anchors"].clone().requires_grad_(), b["positives"].clone().requires_grad_()]
        neg = negs.clone().requires_grad_()
        loss = pt.infonce(*leaves, neg, negatives_mask=mask, in_batch=True, engine=engine)
        loss.backward()
        results.append((loss.detach(), *[x.grad for x in leaves], neg.grad))
    for clean, dirt in zip(*results, strict=True):
        assert torch.isfinite(dirt).all()
        torch.testing.assert_close(dirt, clean, rtol=0, atol=0)
    assert (results[1][3][~mask] == 0).all()  # no gradient reaches a masked row


def test_permuting_negatives_changes_nothing() -> None:
    b = batch(m=7, seed=7)
    perm = torch.stack([torch.randperm(7, generator=gen(i)) for i in range(5)])  # a different order per anchor
    negs = torch.gather(b["negatives"], 1, perm[..., None].expand(-1, -1, 6))
    mask = torch.gather(b["negatives_mask"], 1, perm)
    one = pt.infonce(b["anchors"], b["positives"], b["negatives"], negatives_mask=b["negatives_mask"], in_batch=True)
    two = pt.infonce(b["anchors"], b["positives"], negs, negatives_mask=mask, in_batch=True)
    assert one.item() == pytest.approx(two.item(), rel=1e-13)


def test_permuting_batch_rows_changes_nothing_in_batch() -> None:
    b = batch(k=2, seed=9)
    perm = torch.randperm(5, generator=gen(1))
    kw = lambda idx: dict(  # noqa: E731
        negatives_mask=b["negatives_mask"][idx],
        positive_ids=b["positive_ids"][idx],
        negative_ids=b["negative_ids"][idx],
        in_batch=True,
    )
    ident = torch.arange(5)
    one = pt.infonce(b["anchors"], b["positives"], b["negatives"], **kw(ident))
    two = pt.infonce(b["anchors"][perm], b["positives"][perm], b["negatives"][perm], **kw(perm))
    assert one.item() == pytest.approx(two.item(), rel=1e-13)


def test_other_positives_are_not_negatives() -> None:
    # a = e0 with positives e0 and e1: if e1 were a negative of the first pair the loss would be larger
    e = torch.eye(3, dtype=F64)
    got = pt.infonce(e[:1], e[None, :2], e[None, 2:], temperature=1.0)
    want = (math.log1p(math.exp(-1.0)) + math.log(2)) / 2
    assert got.item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- temperature


def test_tensor_temperature_gradient_matches_formula() -> None:
    b = batch(k=2, seed=10)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    pt.infonce(
        b["anchors"], b["positives"], b["negatives"], temperature=tau, negatives_mask=b["negatives_mask"], in_batch=True
    ).backward()
    tau_ref = torch.tensor(0.3, dtype=F64, requires_grad=True)
    formula(*(b[key] for key in TRIPLET), tau_ref, negatives_mask=b["negatives_mask"], in_batch=True).backward()
    assert tau.grad is not None
    assert tau_ref.grad is not None
    assert tau.grad.item() == pytest.approx(tau_ref.grad.item(), rel=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_learnable_temperature_moves_as_the_gradient_says(engine: str) -> None:
    b = batch(n=8, m=5, seed=11)
    crit = pt.InfoNCE(temperature=0.5, learnable_temperature=True, engine=engine).double()
    opt = torch.optim.SGD(crit.parameters(), lr=0.05)
    for _ in range(3):
        log_tau = crit.log_temperature.detach().clone().requires_grad_()
        ref = infonce_loop(b["anchors"], b["positives"], b["negatives"], log_tau.exp())
        (ref_grad,) = torch.autograd.grad(ref, log_tau)
        opt.zero_grad()
        crit(b["anchors"], b["positives"], b["negatives"]).backward()
        assert crit.log_temperature.grad.item() == pytest.approx(ref_grad.item(), rel=1e-8)
        before = crit.log_temperature.item()
        opt.step()
        assert crit.log_temperature.item() == pytest.approx(before - 0.05 * ref_grad.item(), rel=1e-12)


def test_learnable_temperature_gets_zero_gradient_when_every_negative_is_masked() -> None:
    # no candidate anywhere: every term is 0 whatever the temperature, so d loss / d log_tau is 0 (not NaN from
    # 0 * inf through the masked logits)
    b = batch(seed=12)
    crit = pt.InfoNCE(temperature=0.1, learnable_temperature=True).double()
    mask = torch.zeros(5, 4, dtype=torch.bool)  # every negative masked, in-batch off
    loss = crit(b["anchors"], b["positives"], b["negatives"], negatives_mask=mask)
    loss.backward()
    assert loss.item() == 0.0
    assert crit.log_temperature.grad is not None
    assert crit.log_temperature.grad.item() == 0.0


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_in_batch_cross_entropy_path_equals_the_general_path(masked: bool) -> None:
    # In-batch with K = 1 and no ids is one cross-entropy per anchor (the positive as its target column); ids that
    # exclude nothing take the general path (log-sum-exp of the negatives, positive apart). Values and gradients
    # must agree, and both must equal the formula.
    b = batch(n=7, m=3, seed=11)
    mask = b["negatives_mask"] if masked else None
    no_clash = {"positive_ids": torch.arange(7), "negative_ids": torch.arange(100, 121).reshape(7, 3)}
    results = []
    for ids in ({}, no_clash):
        xs = [b[key].clone().requires_grad_() for key in ("anchors", "positives", "negatives")]
        loss = pt.infonce(*xs, temperature=0.2, in_batch=True, negatives_mask=mask, **ids)
        results.append((loss, *torch.autograd.grad(loss, xs)))
    for fast, general in zip(*results, strict=True):
        torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-12)
    want = formula(b["anchors"], b["positives"], b["negatives"], 0.2, in_batch=True, negatives_mask=mask)
    torch.testing.assert_close(results[0][0], want, rtol=1e-12, atol=1e-12)
