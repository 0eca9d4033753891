"""The vocabulary of docs/how-to/neighbours.md, each equivalence against the installed peer.

sentence-transformers ``MultipleNegativesRankingLoss(scale)``, info-nce-pytorch ``InfoNCE(temperature, reduction,
negative_mode)``, PML ``SelfSupervisedLoss(NTXentLoss(...), symmetric)`` and, where installed, open_clip
``ClipLoss`` with ``logit_scale``: each peer is called as installed (never a copy of its code), on the same float64
tensors as ``pt.infonce``, and the loss and every input's gradient must agree to 1e-12. The float64 values match
to about 1e-15 (the same sums in another order); 1e-12 leaves room for another machine's summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import clip_loss_class
from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer

import pml_triplets as pt

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N, M, S, D = 6, 3, 5, 8
BOTH = ("anchor_to_positive", "positive_to_anchor")  # the two softmaxes of a symmetric (CLIP-style) loss
SIMCLR = ("anchor_to_positive", "anchor_to_anchor")  # one view against the other rows' two views


def batch(seed: int) -> dict[str, torch.Tensor]:
    """Anchors, positives near them, per-anchor negatives [N, M, D] and shared negatives [S, D], in float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=F64)
    p = a + 0.8 * torch.randn(N, D, generator=g, dtype=F64)
    return {
        "a": a,
        "p": p,
        "n": torch.randn(N, M, D, generator=g, dtype=F64),
        "s": torch.randn(S, D, generator=g, dtype=F64),
    }


Fn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def loss_and_grads(fn: Fn, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fn`` on fresh leaves of every tensor of ``b``; the gradients of those it used (the others' are None)."""
    leaves = {k: v.clone().requires_grad_() for k, v in b.items()}
    loss = fn(leaves)
    loss.sum().backward()
    return loss.detach(), {k: x.grad for k, x in leaves.items() if x.grad is not None}


def check(ours: Fn, theirs: Fn, seed: int = 0) -> None:
    b = batch(seed)
    (got, got_grads), (want, want_grads) = loss_and_grads(ours, b), loss_and_grads(theirs, b)
    torch.testing.assert_close(got, want, **TOL, msg=lambda s: f"loss differs from the peer's: {s}")
    assert got_grads.keys() == want_grads.keys(), f"gradients of {sorted(got_grads)} vs the peer's {sorted(want_grads)}"
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], **TOL, msg=lambda s, n=name: f"d/d{n} differs: {s}")


# ---------------------------------------------------------------- sentence-transformers


@pytest.mark.slow  # importing sentence-transformers takes seconds
@pytest.mark.parametrize("with_negatives", [False, True], ids=["pairs", "hard-negatives"])
def test_mnrl_scale_is_one_over_temperature(with_negatives: bool) -> None:
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses", reason="in the dev extra")
    mnrl = st.MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0)  # cosine; the model is never called

    def theirs(b: dict[str, torch.Tensor]) -> torch.Tensor:
        columns = [b["a"], b["p"], *(b["n"].unbind(1) if with_negatives else ())]  # (query, doc, hard_1, ...)
        return mnrl.compute_loss_from_embeddings(columns, None)  # type: ignore[no-any-return]

    def ours(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return pt.infonce(b["a"], b["p"], b["n"] if with_negatives else None, temperature=0.05, in_batch=True)

    check(ours, theirs)


# ---------------------------------------------------------------- info-nce-pytorch


def info_nce() -> Any:
    return pytest.importorskip("info_nce", reason="info-nce-pytorch is in the dev extra")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negative_mode", ["paired", "unpaired", None], ids=["paired", "unpaired", "no-negatives"])
def test_info_nce(negative_mode: str | None, reduction: str) -> None:
    # paired: per-anchor negatives [N, M, D]; unpaired: [M, D] shared by every query; none: the other rows' keys.
    # Its reduction is F.cross_entropy's; PML's reducers give the same: MeanReducer (the default), SumReducer and
    # DoNothingReducer (the (N,) per-query losses).
    peer = info_nce().InfoNCE(temperature=0.1, reduction=reduction, negative_mode=negative_mode or "unpaired")
    key = {"paired": "n", "unpaired": "s", None: None}[negative_mode]
    reducer = {"mean": None, "sum": SumReducer(), "none": DoNothingReducer()}[reduction]
    options: dict[str, Any] = {"temperature": 0.1} if reducer is None else {"loss_fn": NTXentLoss(0.1, reducer=reducer)}

    def theirs(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return peer(b["a"], b["p"], None if key is None else b[key])  # type: ignore[no-any-return]

    def ours(b: dict[str, torch.Tensor]) -> torch.Tensor:
        if negative_mode == "paired":
            return pt.infonce(b["a"], b["p"], b["n"], **options)
        if negative_mode == "unpaired":
            return pt.infonce(b["a"], b["p"], shared_negatives=b["s"], **options)
        return pt.infonce(b["a"], b["p"], in_batch=True, **options)

    check(ours, theirs)


# ---------------------------------------------------------------- pytorch-metric-learning


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-sided"])
def test_self_supervised_loss(symmetric: bool) -> None:
    # symmetric=True: NTXentLoss over the 2N rows [view1; view2] with labels [0..N-1, 0..N-1]: each row's softmax
    # holds its other view and the 2N - 2 rows of other items -- view1 against view2 with the anchor_to_anchor
    # block, plus the same with the views swapped, averaged. symmetric=False: view1 against view2 only.
    peer = SelfSupervisedLoss(NTXentLoss(temperature=0.1), symmetric=symmetric)

    def ours(b: dict[str, torch.Tensor]) -> torch.Tensor:
        if not symmetric:
            return pt.infonce(b["a"], b["p"], temperature=0.1, in_batch=True)
        one = pt.infonce(b["a"], b["p"], temperature=0.1, in_batch=True, directions=SIMCLR)
        return (one + pt.infonce(b["p"], b["a"], temperature=0.1, in_batch=True, directions=SIMCLR)) / 2

    check(ours, lambda b: peer(b["a"], b["p"]))


def test_self_supervised_loss_in_one_call() -> None:
    # the same symmetric loss as one call: both views as anchors, each row's positive its other view, and the ids
    # keep a row's own view out of its in-batch negatives
    peer = SelfSupervisedLoss(NTXentLoss(temperature=0.1), symmetric=True)
    ids = torch.arange(N).repeat(2)

    def ours(b: dict[str, torch.Tensor]) -> torch.Tensor:
        views = torch.cat([b["a"], b["p"]]), torch.cat([b["p"], b["a"]])  # (2N, D) each
        return pt.infonce(*views, temperature=0.1, in_batch=True, positive_ids=ids)

    check(ours, lambda b: peer(b["a"], b["p"]))


# ---------------------------------------------------------------- open_clip


def test_open_clip_logit_scale() -> None:
    clip_loss = clip_loss_class()()  # skips when open_clip_torch is not installed (it pulls a CUDA torch)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=F64)  # CLIP's parameter at its initial value

    def unit(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # CLIP's features are normalized
        return torch.nn.functional.normalize(b["a"], dim=-1), torch.nn.functional.normalize(b["p"], dim=-1)

    def ours(b: dict[str, torch.Tensor]) -> torch.Tensor:
        tau = 1 / logit_scale.exp()
        return pt.infonce(*unit(b), temperature=tau, in_batch=True, directions=BOTH, partition="per_direction")

    check(ours, lambda b: clip_loss(*unit(b), logit_scale.exp()))
