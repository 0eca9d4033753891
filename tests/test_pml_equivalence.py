"""A configured NTXentLoss gives through pml_triplets exactly what plain PML gives on the same pairs.

"Plain PML" here is ``loss_fn(anchors, indices_tuple=(a1, p, a2, n), ref_emb=cat([positives, negatives]))`` with
the pairs built by hand in this file. Both engines and several chunk sizes must agree with it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from formula import infonce_loop
from helpers import F64, batch, gen, triplets
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance, SNRDistance
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    PerAnchorReducer,
    SumReducer,
    ThresholdReducer,
)
from pytorch_metric_learning.regularizers import LpRegularizer, ZeroMeanRegularizer

import pml_triplets as pt


def data(n: int = 6, k: int = 1, m: int = 4, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return triplets(n, m, d, k=k, seed=seed)


def plain_pml(fn: NTXentLoss, a: torch.Tensor, p: torch.Tensor, neg: torch.Tensor, mask=None) -> torch.Tensor:
    """PML's own way, by hand: embeddings = anchors, ref_emb = [positives; negatives], a 4-tuple of pairs."""
    n, m, d = neg.shape
    p3 = p.reshape(n, -1, d)
    k = p3.shape[1]
    ref = torch.cat([p3.reshape(n * k, d), neg.reshape(n * m, d)])
    a1 = torch.arange(n).repeat_interleave(k)
    pp = torch.arange(n * k)
    keep = torch.ones(n, m, dtype=torch.bool) if mask is None else mask
    a2, j = keep.nonzero(as_tuple=True)
    return fn(a, indices_tuple=(a1, pp, a2, n * k + a2 * m + j), ref_emb=ref)


CONFIGS = [
    pytest.param(lambda: NTXentLoss(temperature=0.1), id="default-cosine"),
    pytest.param(lambda: NTXentLoss(0.5, distance=DotProductSimilarity(normalize_embeddings=False)), id="dot-raw"),
    pytest.param(lambda: NTXentLoss(0.3, distance=DotProductSimilarity()), id="dot-normalized"),
    pytest.param(lambda: NTXentLoss(0.7, distance=LpDistance()), id="lp"),
    pytest.param(lambda: NTXentLoss(0.7, distance=LpDistance(normalize_embeddings=False, p=1)), id="l1-raw"),
    pytest.param(lambda: NTXentLoss(0.4, distance=LpDistance(power=2)), id="lp-squared"),
    pytest.param(lambda: NTXentLoss(0.9, distance=SNRDistance()), id="snr"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=AvgNonZeroReducer()), id="avg-nonzero"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=ThresholdReducer(low=2.5)), id="threshold"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=SumReducer()), id="sum"),
    pytest.param(lambda: NTXentLoss(0.2, reducer=PerAnchorReducer()), id="per-anchor"),
    pytest.param(lambda: NTXentLoss(0.2, embedding_regularizer=LpRegularizer()), id="lp-regularizer"),
    pytest.param(
        lambda: NTXentLoss(
            0.2,
            embedding_regularizer=ZeroMeanRegularizer(),
            embedding_reg_weight=0.3,
            reducer=ThresholdReducer(high=4.0),
        ),
        id="regularizer+threshold",
    ),
    pytest.param(lambda: NTXentLoss(torch.tensor(0.25, dtype=F64)), id="tensor-temperature"),
]


@pytest.mark.sweep(fast=8)
@pytest.mark.parametrize("make", CONFIGS)
@pytest.mark.parametrize("engine", ["auto", "pml"])
@pytest.mark.parametrize("k", [1, 3])
def test_configured_instance_equals_plain_pml(make, engine: str, k: int) -> None:
    a, p, neg = (x.requires_grad_() for x in data(k=k, seed=k))
    mask = torch.rand(6, 4, generator=gen(1)) > 0.3
    if k > 1 and isinstance(make().reducer, PerAnchorReducer):
        # plain PML raises IndexError here (test_per_anchor_reducer_with_k_positives); with K pairs for every
        # anchor, the mean of per-anchor means is the plain mean over pairs
        want = infonce_loop(a, p, neg, 0.2, mask=mask)
    else:
        want = plain_pml(make(), a, p, neg, mask)
    (g_want,) = torch.autograd.grad(want, a)
    got = pt.infonce(a, p, neg, loss_fn=make(), negatives_mask=mask, engine=engine, chunk_size=4)
    (g_got,) = torch.autograd.grad(got, a)
    # Both float64; PML sums exps where the dense engine takes a logsumexp, which moves the last few digits only
    # (observed 3e-16 on values, 3e-15 on gradient entries): 1e-10 and 1e-8 leave wide margins.
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_auto_engine_choice() -> None:
    # every plain NTXentLoss is computed densely, whatever its distance; only a loss that overrides NTXentLoss's
    # own computation goes to PML
    from pml_triplets._options import make_options

    def dense(loss_fn: NTXentLoss, engine: str = "auto") -> bool:
        return make_options(loss_fn=loss_fn, engine=engine).dense

    class Custom(NTXentLoss):
        def _compute_loss(self, *args):  # type: ignore[no-untyped-def]
            return super()._compute_loss(*args)

    class MyCosine(CosineSimilarity):
        pass

    for distance in (CosineSimilarity(), MyCosine(), LpDistance(), SNRDistance(), DotProductSimilarity()):
        assert dense(NTXentLoss(distance=distance))
    assert not dense(Custom())
    assert not dense(NTXentLoss(), "pml")


def test_forced_dense_engine_rejects_a_loss_it_cannot_reproduce() -> None:
    a, p, neg = data()
    sub = type("Sub", (NTXentLoss,), {"_compute_loss": lambda self, *a: NTXentLoss._compute_loss(self, *a)})()
    with pytest.raises(ValueError, match=r"`engine='dense'` computes NTXentLoss's own loss; Sub overrides it"):
        pt.infonce(a, p, neg, loss_fn=sub, engine="dense")


def test_subclass_goes_through_pml() -> None:
    class Doubled(NTXentLoss):
        def _compute_loss(self, pos_pairs, neg_pairs, indices_tuple):  # type: ignore[no-untyped-def]
            out = super()._compute_loss(pos_pairs, neg_pairs, indices_tuple)
            out["loss"]["losses"] = 2 * out["loss"]["losses"]
            return out

    a, p, neg = data()
    assert pt.infonce(a, p, neg, loss_fn=Doubled()).item() == pytest.approx(
        2 * infonce_loop(a, p, neg, 0.07).item(), rel=1e-10
    )


@pytest.mark.parametrize("chunk", [1, 2, 5, 6, 100])
def test_engines_agree_in_batch_combined(chunk: int) -> None:
    # the dense engine and NTXentLoss on the same pairs, with every option at once
    b = batch(6, 3, 5, k=2, s=4, seed=4, keep=0.7, ids=6)
    a, p, neg = b.pop("anchors"), b.pop("positives"), b.pop("negatives")
    kw = dict(b, in_batch=True, chunk_size=chunk)
    fn = NTXentLoss(0.3, reducer=PerAnchorReducer())
    dense = pt.infonce(a, p, neg, loss_fn=copy.deepcopy(fn), engine="dense", **kw)
    pml = pt.infonce(a, p, neg, loss_fn=copy.deepcopy(fn), engine="pml", **kw)
    torch.testing.assert_close(dense, pml, rtol=1e-12, atol=1e-12)


def test_result_does_not_depend_on_chunk_size() -> None:
    a, p, neg = data(n=11, m=5, seed=9)
    values = {c: pt.infonce(a, p, neg, chunk_size=c, in_batch=True).item() for c in (1, 3, 4, 11, None)}
    assert max(values.values()) - min(values.values()) < 1e-12, values


def test_per_anchor_reducer_with_k_positives() -> None:
    a, p, neg = data(k=3, seed=3)
    with pytest.raises(IndexError):  # PML sizes PerAnchorReducer's buffer from len(embeddings)
        plain_pml(NTXentLoss(0.2, reducer=PerAnchorReducer()), a, p, neg)
    # every anchor has K pairs, so the mean of per-anchor means is the plain mean over pairs
    for engine in ("dense", "pml"):
        got = pt.infonce(a, p, neg, loss_fn=NTXentLoss(0.2, reducer=PerAnchorReducer()), engine=engine)
        assert got.item() == pytest.approx(infonce_loop(a, p, neg, 0.2).item(), rel=1e-10)
