"""Issue 22: ``NegativeQueue`` and ``shared_negative_ids``.

Checked against the loop-by-loop formula (``tests/formula.py``), against the same rows passed another way (per-anchor
negatives with a mask, ``shared_negatives``), against PML's own ``CrossBatchMemory``, and for the queue's bookkeeping
(FIFO order, wrap-around, unfilled slots, ``state_dict``) and under a 2-process gloo group.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import DIST, F64, TOL, batch, formula
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from test_distributed import run_ranks

import pml_triplets as pt
from pml_triplets import _blocks

D = 5


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def rows(count: int, start: int = 0) -> torch.Tensor:
    """``count`` recognizable rows: row j holds ``start + j`` in every entry."""
    return (torch.arange(start, start + count, dtype=F64)[:, None] * torch.ones(D, dtype=F64)).contiguous()


# ---------------------------------------------------------------- the queue's bookkeeping


def test_fifo_order_and_wrap_around() -> None:
    q = pt.NegativeQueue(5, D, dtype=F64)
    assert len(q) == 0
    assert q.negatives.shape == (0, D)
    q.enqueue(rows(3), ids=torch.arange(3))
    assert len(q) == 3
    assert q.ids.tolist() == [0, 1, 2]
    q.enqueue(rows(4, 3), ids=torch.arange(3, 7))  # 7 rows into 5 slots: 0 and 1, the oldest, are overwritten
    assert len(q) == 5
    assert q.ids.tolist() == [5, 6, 2, 3, 4]
    assert q.negatives[:, 0].tolist() == [5, 6, 2, 3, 4]
    q.enqueue(rows(12, 100))  # more rows than slots: the last 5 are kept, in FIFO order, ids unknown
    assert sorted(q.negatives[:, 0].tolist()) == [107, 108, 109, 110, 111]
    assert q.ids.tolist() == [-1] * 5
    assert q.negatives[:, 0].tolist() == [
        108,
        109,
        110,
        111,
        107,
    ]  # as if written one by one: row 100 + j in slot (7 + j) % 5
    q.reset()
    assert len(q) == 0


def test_enqueue_stores_detached_rows_cast_to_the_queue() -> None:
    q = pt.NegativeQueue(4, D)  # float32
    x = rows(2).requires_grad_()
    q.enqueue(x * 2)
    assert not q.negatives.requires_grad
    assert q.negatives.dtype == torch.float32
    close(q.negatives.double(), rows(2) * 2)


def test_state_dict_round_trip_mid_wrap() -> None:
    q = pt.NegativeQueue(4, D, dtype=F64)
    q.enqueue(rows(3), ids=torch.arange(3))
    q.enqueue(rows(2, 3), ids=torch.arange(3, 5))  # wrapped: slot 0 overwritten
    state = q.state_dict()
    fresh = pt.NegativeQueue(4, D, dtype=F64)
    fresh.load_state_dict(state)
    assert len(fresh) == 4
    assert fresh.ids.tolist() == q.ids.tolist() == [4, 1, 2, 3]
    close(fresh.negatives, q.negatives)
    fresh.enqueue(rows(1, 9), ids=torch.tensor([9]))  # continues where the saved one would: slot 1
    q.enqueue(rows(1, 9), ids=torch.tensor([9]))
    assert fresh.ids.tolist() == q.ids.tolist() == [4, 9, 2, 3]


def test_unfilled_slots_are_never_negatives() -> None:
    # A fresh queue's buffers full of NaN: only the filled rows take part, in the loss and in every gradient.
    b = batch(4, 2, D, seed=1)
    q = pt.NegativeQueue(6, D, dtype=F64)
    q.embeddings.fill_(float("nan"))
    q.enqueue(b["shared_negatives"], ids=torch.tensor([0, 1, 2]))
    a, p, n = (b[key].clone().requires_grad_() for key in ("anchors", "positives", "negatives"))
    loss = pt.infonce(a, p, n, queue=q, positive_ids=b["positive_ids"], temperature=0.1)
    grads = torch.autograd.grad(loss, (a, p, n))
    a2, p2, n2 = (b[key].clone().requires_grad_() for key in ("anchors", "positives", "negatives"))
    shared, sid = b["shared_negatives"], torch.tensor([0, 1, 2])
    want = pt.infonce(
        a2, p2, n2, shared_negatives=shared, shared_negative_ids=sid, positive_ids=b["positive_ids"], temperature=0.1
    )
    assert loss.isfinite()
    close(loss, want)
    for got, exp in zip(grads, torch.autograd.grad(want, (a2, p2, n2)), strict=True):
        close(got, exp)


def test_an_empty_queue_is_no_negatives() -> None:
    b = batch(3, 2, D, seed=2)
    a, p, n, pid = b["anchors"], b["positives"], b["negatives"], b["positive_ids"]
    q = pt.NegativeQueue(4, D, dtype=F64)
    close(pt.infonce(a, p, n, queue=q), pt.infonce(a, p, n))
    close(pt.infonce(a, p, n, queue=q, positive_ids=pid), pt.infonce(a, p, n))  # the first step of a training loop
    # The message says that the queue is empty (step 1 of a queue-only loop), not to pass other arguments.
    with pytest.raises(ValueError, match=r"`queue` is empty and the call has no other negatives: enqueue a batch"):
        pt.infonce(a, p, queue=q)


def test_queue_rows_take_the_anchors_dtype() -> None:
    # A float32 queue with float64 embeddings (or bfloat16 ones under autocast): its rows are cast, not rejected.
    b = batch(3, 2, D, s=4, seed=10)
    q = pt.NegativeQueue(4, D)
    q.enqueue(b["shared_negatives"].float(), ids=torch.arange(4))
    got = pt.infonce(b["anchors"], b["positives"], b["negatives"], queue=q, positive_ids=b["positive_ids"])
    shared = b["shared_negatives"].float().double()
    want = pt.infonce(
        b["anchors"], b["positives"], b["negatives"], shared_negatives=shared, shared_negative_ids=torch.arange(4),
        positive_ids=b["positive_ids"],
    )  # fmt: skip
    assert got.dtype == F64
    close(got, want)


# ---------------------------------------------------------------- the loss with shared ids


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"in_batch": True}, id="in-batch"),
    pytest.param({"in_batch": True, "negative_ids": True}, id="in-batch-all-ids"),
    pytest.param({"hardness_mode": "all", "hardness_strength": 2.0}, id="hardness-all"),
    pytest.param({"false_negative_margin": 0.1}, id="filtered-own-embeddings"),
    pytest.param({"in_batch": True, "directions": ("anchor_to_positive", "positive_to_positive")}, id="p2p"),
    pytest.param({"k": 2, "negatives_mask": True}, id="k2-masked"),
    pytest.param({"engine": "pml", "negatives_mask": True}, id="pml-engine"),
]


def call_kwargs(option: dict[str, Any], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    option = dict(option)
    b = batch(5, 3, D, k=option.pop("k", 1), s=6, seed=seed, ids=4)
    data = {key: b[key] for key in ("anchors", "positives", "negatives")}
    kw: dict[str, Any] = {"shared_negatives": b["shared_negatives"], "positive_ids": b["positive_ids"]}
    kw["shared_negative_ids"] = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(seed))
    if option.pop("negatives_mask", False):
        kw["negatives_mask"] = b["negatives_mask"]
    if option.pop("negative_ids", False):
        kw["negative_ids"] = b["negative_ids"]
    return data, kw | option


@pytest.mark.sweep(fast=4)
@pytest.mark.parametrize("option", OPTIONS)
def test_shared_ids_match_the_formula(option: dict[str, Any]) -> None:
    data, kw = call_kwargs(option, seed=3)
    assert (kw["shared_negative_ids"][:, None] == kw["positive_ids"].reshape(5, -1).flatten()).any()  # clashes
    leaves = {key: v.clone().requires_grad_() for key, v in data.items()}
    shared = kw["shared_negatives"].clone().requires_grad_()
    loss = pt.infonce(*leaves.values(), temperature=0.2, **(kw | {"shared_negatives": shared}))
    engine = {key: v for key, v in kw.items() if key != "engine"}
    leaves2 = {key: v.clone().requires_grad_() for key, v in data.items()}
    shared2 = kw["shared_negatives"].clone().requires_grad_()
    want = formula(*leaves2.values(), 0.2, DIST["cosine"], **(engine | {"shared_negatives": shared2}))
    rtol, atol = TOL[F64]
    torch.testing.assert_close(loss, want, rtol=rtol, atol=atol)
    got = torch.autograd.grad(loss, [*leaves.values(), shared])
    exp = torch.autograd.grad(want, [*leaves2.values(), shared2])
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


@pytest.mark.slow  # (the fused Function's gradcheck and the formula tests of shared ids are fast)
@pytest.mark.parametrize("in_batch", [False, True])
def test_gradcheck_and_gradgradcheck_with_shared_ids(in_batch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The blocks' log-sum-exp has its own backward (one softmax, scaled in place): first and second derivatives
    # against finite differences, K = 2 and a mask so that every block kind is there. (Its blocks are small: the
    # size below which autograd's own log-sum-exp runs is lowered to 0.)
    monkeypatch.setattr(_blocks, "_SMALL_BLOCK", 0)
    b = batch(3, 2, 4, k=2, s=3, seed=9, ids=3)
    kw = {"negatives_mask": b["negatives_mask"], "positive_ids": b["positive_ids"], "in_batch": in_batch}
    kw["shared_negative_ids"] = torch.tensor([0, 1, 2])

    def loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        return pt.infonce(a, p, n, shared_negatives=sh, temperature=0.5, **kw)

    x = tuple(b[key].clone().requires_grad_() for key in ("anchors", "positives", "negatives", "shared_negatives"))
    assert torch.autograd.gradcheck(loss, x)
    assert torch.autograd.gradgradcheck(loss, x)


def test_id_exclusion_equals_masking_those_rows() -> None:
    # The shared rows as every anchor's own negatives, masked where their id is one of the anchor's positive ids.
    b = batch(5, 3, D, k=2, s=6, seed=4, ids=4)
    a, p, n, sh, pid = b["anchors"], b["positives"], b["negatives"], b["shared_negatives"], b["positive_ids"]
    sid = torch.tensor([0, 1, 2, 3, 0, 7])
    clash = (sid[None, :, None] == pid[:, None, :]).any(-1)  # (N, S)
    assert clash.any()
    assert not clash.all()
    leaves = [x.clone().requires_grad_() for x in (a, p, n, sh)]
    loss = pt.infonce(*leaves[:3], shared_negatives=leaves[3], shared_negative_ids=sid, positive_ids=pid)
    a2, p2, n2, sh2 = (x.clone().requires_grad_() for x in (a, p, n, sh))
    negatives = torch.cat([n2, sh2.expand(5, -1, -1)], dim=1)  # (N, M + S, d)
    mask = torch.cat([torch.ones(5, 3, dtype=torch.bool), ~clash], dim=1)
    want = pt.infonce(a2, p2, negatives, negatives_mask=mask)
    close(loss, want)
    for got, exp in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, (a2, p2, n2, sh2)), strict=True):
        close(got, exp)


def test_queue_equals_the_same_rows_as_shared_negatives() -> None:
    b = batch(4, 2, D, seed=5, ids=5)
    q = pt.NegativeQueue(8, D, dtype=F64)
    for step in range(3):  # 9 rows into 8 slots: wrapped
        q.enqueue(rows(3, 10 * step) / 10 + 0.1, ids=torch.arange(3) + step)
    kw = {"positive_ids": b["positive_ids"], "temperature": 0.1, "in_batch": True}
    got = pt.infonce(b["anchors"], b["positives"], b["negatives"], queue=q, **kw)
    want = pt.infonce(
        b["anchors"],
        b["positives"],
        b["negatives"],
        shared_negatives=q.negatives.clone(),
        shared_negative_ids=q.ids.clone(),
        **kw,
    )
    close(got, want)
    criterion = pt.InfoNCE(temperature=0.1, in_batch=True)
    close(criterion(b["anchors"], b["positives"], b["negatives"], queue=q, positive_ids=b["positive_ids"]), want)
    ref = pt.reference_infonce(b["anchors"], b["positives"], b["negatives"], queue=q, **kw)
    torch.testing.assert_close(ref, want, rtol=TOL[F64][0], atol=TOL[F64][1])


def test_cached_step_with_a_queue_equals_the_full_batch_step() -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, D).double()
    x = {"a": torch.randn(7, 4, dtype=F64), "p": torch.randn(7, 4, dtype=F64), "n": torch.randn(7, 2, 4, dtype=F64)}
    pid = torch.arange(7) % 5
    q = pt.NegativeQueue(10, D, dtype=F64)
    q.enqueue(torch.randn(6, D, dtype=F64), ids=torch.arange(6))
    loss = pt.cached_step(
        encoder, x["a"], x["p"], x["n"], mini_batch_size=3, queue=q, positive_ids=pid, temperature=0.1
    )
    got = encoder.weight.grad.clone()
    encoder.zero_grad()
    full = pt.infonce(encoder(x["a"]), encoder(x["p"]), encoder(x["n"]), queue=q, positive_ids=pid, temperature=0.1)
    full.backward()
    close(loss, full.detach())
    close(got, encoder.weight.grad)


def test_matches_pml_cross_batch_memory_over_several_steps() -> None:
    # Keys enqueued before the loss, labels as ids (unique: one positive per query, its own key in the memory).
    memory, b, tau = 10, 4, 0.1
    xbm = CrossBatchMemory(NTXentLoss(temperature=tau), embedding_size=D, memory_size=memory)
    q = pt.NegativeQueue(memory, D, dtype=F64)
    g = torch.Generator().manual_seed(6)
    for step in range(6):  # 24 keys through 10 slots
        queries = torch.randn(b, D, generator=g, dtype=F64)
        keys = queries + 0.5 * torch.randn(b, D, generator=g, dtype=F64)
        labels = torch.arange(step * b, (step + 1) * b)
        q1 = queries.clone().requires_grad_()
        enqueue = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
        want = xbm(torch.cat([q1, keys]), torch.cat([labels, labels]), enqueue_mask=enqueue)
        q2 = queries.clone().requires_grad_()
        q.enqueue(keys, ids=labels)
        got = pt.infonce(q2, keys, queue=q, positive_ids=labels, temperature=tau)
        close(got, want, 1e-10)
        close(torch.autograd.grad(got, q2)[0], torch.autograd.grad(want, q1)[0], 1e-10)


# ---------------------------------------------------------------- messages


ERRORS = [
    pytest.param(
        {"shared_negative_ids": torch.arange(3), "positive_ids": torch.arange(2)},
        "`shared_negative_ids` was given without `shared_negatives`",
        id="no-shared",
    ),
    pytest.param(
        {"shared": True, "shared_negative_ids": torch.arange(3)},
        "`shared_negative_ids` needs `positive_ids`",
        id="no-positive-ids",
    ),
    pytest.param(
        {"shared": True, "shared_negative_ids": torch.arange(4), "positive_ids": torch.arange(2)},
        r"`shared_negative_ids` has S=4 but `shared_negatives` has S=3",
        id="wrong-s",
    ),
    pytest.param(
        {"shared": True, "shared_negative_ids": torch.ones(3), "positive_ids": torch.arange(2)},
        "`shared_negative_ids` must be an integer tensor",
        id="float-ids",
    ),
    pytest.param({"shared": True, "queue": True}, "pass either `queue` or `shared_negatives`", id="queue-and-shared"),
    pytest.param({"queue": "bank"}, "`queue` must be a pml_triplets.NegativeQueue; got str", id="queue-type"),
    pytest.param(
        {"queue": True}, "`queue` holds ids, which exclude .* pass `positive_ids`", id="queue-ids-without-positive-ids"
    ),
]


@pytest.mark.parametrize(("kw", "match"), ERRORS)
def test_errors_name_the_argument(kw: dict[str, Any], match: str) -> None:
    kw = dict(kw)
    b = batch(2, 2, D, s=3, seed=7)
    if kw.pop("shared", False):
        kw["shared_negatives"] = b["shared_negatives"]
    if kw.get("queue") is True:
        kw["queue"] = pt.NegativeQueue(4, D, dtype=F64)
        kw["queue"].enqueue(rows(2), ids=torch.arange(2))
    with pytest.raises((ValueError, TypeError), match=match):
        pt.infonce(b["anchors"], b["positives"], b["negatives"], **kw)


def test_queue_rejects_bad_rows() -> None:
    q = pt.NegativeQueue(4, D)
    with pytest.raises(ValueError, match=r"`embeddings` must be \[B, dim\] = \[B, 5\]; got \[2, 3\]"):
        q.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"`ids` must be \[B\] = \[2\]; got \[3\]"):
        q.enqueue(torch.randn(2, D), ids=torch.arange(3))
    with pytest.raises(TypeError, match=r"`ids` must be an integer torch\.Tensor"):
        q.enqueue(torch.randn(2, D), ids=torch.ones(2))
    with pytest.raises(ValueError, match="`size` must be >= 1"):
        pt.NegativeQueue(0, D)
    assert len(q) == 0


# ---------------------------------------------------------------- two ranks


SIZES, QUEUE = (3, 2), 6


def global_steps() -> list[dict[str, torch.Tensor]]:
    """Two steps of a global batch of 5 rows; rank r holds rows SIZES[:r]... of each."""
    g = torch.Generator().manual_seed(8)
    return [
        {
            "anchors": torch.randn(5, D, generator=g, dtype=F64),
            "positives": torch.randn(5, D, generator=g, dtype=F64),
            "negatives": torch.randn(5, 2, D, generator=g, dtype=F64),
            "positive_ids": torch.randint(0, 6, (5,), generator=g),
        }
        for _ in range(2)
    ]


def run_steps(steps: list[dict[str, torch.Tensor]], rows_of: slice, gather: bool) -> dict[str, Any]:
    """Each step: the loss with the queue (in-batch, gathered or not), its gradients, then enqueue the positives."""
    q = pt.NegativeQueue(QUEUE, D, dtype=F64)
    q.enqueue(torch.linspace(-1, 1, 4 * D, dtype=F64).reshape(4, D), ids=torch.tensor([0, 1, 2, 3]))
    out: dict[str, Any] = {"losses": [], "grads": [], "queues": []}
    for step in steps:
        x = {key: v[rows_of].clone() for key, v in step.items()}
        leaves = [x[key].requires_grad_() for key in ("anchors", "positives", "negatives")]
        loss = pt.infonce(*leaves, positive_ids=x["positive_ids"], queue=q, in_batch=True, temperature=0.2,
                          gather_across_devices=gather)  # fmt: skip
        weight = (rows_of.stop - rows_of.start) / sum(SIZES) if gather else 1.0  # all_reduce sums the ranks
        out["losses"].append(loss.detach())
        out["grads"].append(torch.autograd.grad(loss * weight, leaves))
        q.enqueue(x["positives"].detach(), ids=x["positive_ids"], gather_across_devices=gather)
        out["queues"].append((q.negatives.clone(), q.ids.clone()))
    return out


def _worker(rank: int, world: int, init_method: str, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    start = sum(SIZES[:rank])
    out = run_steps(global_steps(), slice(start, start + SIZES[rank]), gather=True)
    torch.save(out, Path(workdir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_two_ranks_keep_equal_queues_and_the_global_loss(tmp_path: Path) -> None:
    got = run_ranks(_worker, (), tmp_path)
    want = run_steps(global_steps(), slice(0, 5), gather=False)
    for step in range(2):
        for r in range(2):  # every rank's queue is the one process's queue
            close(got[r]["queues"][step][0], want["queues"][step][0])
            assert got[r]["queues"][step][1].tolist() == want["queues"][step][1].tolist()
        mean = sum(n * g["losses"][step] for n, g in zip(SIZES, got, strict=True)) / sum(SIZES)
        close(mean, want["losses"][step])
        for i in range(3):  # each rank's gradients are its rows of the global ones
            close(torch.cat([g["grads"][step][i] for g in got]), want["grads"][step][i])


# ---------------------------------------------------------------- issue 30: reproduced failures


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("queue", id="queue"),
        pytest.param("negative_ids", id="negative_ids"),
        pytest.param("in_batch", id="in_batch"),
    ],
)
def test_negative_ids_are_unknown_and_never_clash(where: str) -> None:
    # b30fb93: rows enqueued without ids (stored -1) were dropped from the negatives of every anchor whose
    # positive_ids held -1 (0.021 instead of 0.486 in the report). A negative id now means "unknown" everywhere.
    b = batch(4, 3, D, s=5, seed=11)
    a, p, n = b["anchors"], b["positives"], b["negatives"]
    pid = torch.tensor([-1, 3, -1, 0])
    nid = torch.tensor([[-1, 3, 1], [-1, -1, 3], [0, -1, -1], [0, 2, -1]])
    if where == "queue":
        q = pt.NegativeQueue(8, D, dtype=F64)
        q.enqueue(b["shared_negatives"][:3])  # no ids: -1
        q.enqueue(b["shared_negatives"][3:], ids=torch.tensor([3, -5]))
        got = pt.infonce(a, p, n, queue=q, positive_ids=pid, temperature=0.3)
        want = formula(a, p, n, 0.3, shared_negatives=q.negatives, shared_negative_ids=q.ids, positive_ids=pid)
        assert q.ids.tolist() == [-1, -1, -1, 3, -5]
    else:
        extra = {"in_batch": True} if where == "in_batch" else {}
        got = pt.infonce(a, p, n, negative_ids=nid, positive_ids=pid, temperature=0.3, **extra)
        want = formula(a, p, n, 0.3, negative_ids=nid, positive_ids=pid, **extra)
    close(got, want, 1e-10)
    # Anchor 0's positive id is unknown: none of its own negatives is excluded, whatever their ids say.
    per_pair = pt.infonce(
        a, p, n, negative_ids=nid, loss_fn=NTXentLoss(0.3, reducer=DoNothingReducer()), positive_ids=pid
    )
    plain = pt.infonce(a, p, n, loss_fn=NTXentLoss(0.3, reducer=DoNothingReducer()))
    close(per_pair[0], plain[0], 1e-12)
    assert not torch.isclose(per_pair[1], plain[1])  # anchor 1 (id 3) loses its negative with id 3


def moco_step(seed: int, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's order: the loss with the queue, then enqueue, then backward; the gradient and the expected one."""
    b = batch(4, 2, D, s=6, seed=seed)
    q = pt.NegativeQueue(6, D, dtype=F64)
    q.enqueue(b["shared_negatives"], ids=torch.arange(10, 16))
    rows, ids = q.negatives.clone(), q.ids.clone()
    a = b["anchors"].clone().requires_grad_()
    pid = torch.tensor([10, 1, 12, 3])
    loss = pt.infonce(a, b["positives"], b["negatives"], queue=q, positive_ids=pid, **options)
    q.enqueue(torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(seed)), ids=torch.arange(4))
    loss.backward()  # after the enqueue: the loss belongs to the rows it was computed with
    fresh = a.detach().clone().requires_grad_()
    kw = {"shared_negatives": rows, "shared_negative_ids": ids, "positive_ids": pid}
    want = pt.infonce(fresh, b["positives"], b["negatives"], **kw, **options)
    (g,) = torch.autograd.grad(want, fresh)
    return a.grad, g  # type: ignore[return-value]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="whole"),
        pytest.param({"chunk_size": 2}, id="chunked"),
        pytest.param({"engine": "pml", "chunk_size": 2}, id="pml-chunked"),
        pytest.param({"loss_fn": NTXentLoss(0.1, distance=LpDistance(normalize_embeddings=False))}, id="lp"),
        pytest.param(
            {"loss_fn": NTXentLoss(0.1, distance=LpDistance(normalize_embeddings=False)), "chunk_size": 2},
            id="lp-chunked",
        ),
    ],
)
def test_enqueue_between_the_loss_and_its_backward_changes_nothing(options: dict[str, Any]) -> None:
    # b30fb93: chunks recomputed in the backward pass read the overwritten rows and ids (max gradient error 0.28
    # chunked, 0.8 % with Lp), or autograd raised its in-place error (Lp, one chunk).
    got, want = moco_step(3, **options)
    close(got, want, 1e-12)
    assert got.abs().sum() > 0


def test_enqueue_leaves_the_rows_a_caller_holds() -> None:
    q = pt.NegativeQueue(3, D, dtype=F64)
    q.enqueue(rows(3), ids=torch.arange(3))
    held, ids = q.negatives, q.ids
    q.enqueue(rows(2, 10), ids=torch.arange(10, 12))
    assert held[:, 0].tolist() == [0, 1, 2]  # copy-on-write
    assert ids.tolist() == [0, 1, 2]
    assert q.negatives[:, 0].tolist() == [10, 11, 2]
    assert q.ids.tolist() == [10, 11, 2]


def static_loss(q: pt.NegativeQueue, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> torch.Tensor:
    """The loss with the queue read as a compiled call reads it: the whole buffer and the filled slots' mask."""
    with monkeypatch.context() as m:
        m.setattr("pml_triplets.queue.is_compiling", lambda: True)
        return pt.infonce(**kw, queue=q)


def test_the_compiled_reading_of_a_queue_equals_the_filled_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    b = batch(3, 2, D, seed=5)
    kw: dict[str, Any] = {"anchors": b["anchors"], "positives": b["positives"], "negatives": b["negatives"]}
    q = pt.NegativeQueue(5, D, dtype=F64)
    close(static_loss(q, monkeypatch, **kw), pt.infonce(**kw))  # empty: no shared negatives at all
    q.enqueue(rows(2, 1) / 7, ids=torch.tensor([0, 9]))
    kw["positive_ids"] = torch.tensor([9, 1, 2])
    for step in range(4):  # partly filled, full, wrapped; then reloaded from a state_dict and reset
        close(static_loss(q, monkeypatch, **kw), pt.infonce(**kw, queue=q))
        want = formula(**kw, shared_negatives=q.negatives, shared_negative_ids=q.ids, tau=0.07)
        close(pt.infonce(**kw, queue=q), want, 1e-10)
        q.enqueue(torch.sin(rows(2, 3 * step)), ids=torch.tensor([step, 9 - step]))
    loaded = pt.NegativeQueue(5, D, dtype=F64)
    loaded.load_state_dict(q.state_dict())
    close(static_loss(loaded, monkeypatch, **kw), pt.infonce(**kw, queue=q))
    loaded.reset()
    close(static_loss(loaded, monkeypatch, **kw), pt.infonce(**{k: v for k, v in kw.items() if k != "positive_ids"}))
    assert not loaded.filled.any()
    with pytest.raises(RuntimeError, match="`queue` is empty"):  # the device-side check, without other negatives
        static_loss(loaded, monkeypatch, anchors=b["anchors"], positives=b["positives"])


@pytest.mark.slow  # (compiles: about 15 s)
def test_compiled_loss_with_a_filling_and_wrapping_queue_compiles_at_most_twice() -> None:
    # b30fb93: Dynamo guarded on the queue's Python fill count and recompiled at every step, also once the queue
    # was full, until the recompile limit (then, without fullgraph, it ran eagerly without a word).
    from test_surfaces import Graphs

    torch._dynamo.reset()
    graphs = Graphs()

    def step(a, p, n, pid, queue):  # type: ignore[no-untyped-def]
        return pt.infonce(a, p, n, queue=queue, positive_ids=pid, temperature=0.2)

    compiled = torch.compile(step, backend=graphs, fullgraph=True)
    queues = (pt.NegativeQueue(10, D), pt.NegativeQueue(10, D))  # 20 steps of 4 rows: full at step 3, wraps 7 times
    g = torch.Generator().manual_seed(0)
    for t in range(20):
        a = torch.randn(4, D, generator=g).requires_grad_()
        p, n, pid = torch.randn(4, D, generator=g), torch.randn(4, 3, D, generator=g), torch.arange(4 * t, 4 * t + 4)
        pid[0] = 4 * t - 8 if t >= 2 else pid[0]  # a clash with a queued row
        got, want = compiled(a, p, n, pid, queues[0]), step(a, p, n, pid, queues[1])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, a)[0])
        for q in queues:
            q.enqueue(p, ids=pid)
    assert graphs.count <= 2, f"{graphs.count} graphs over 20 steps"


def test_queue_messages_name_the_queue() -> None:
    q = pt.NegativeQueue(4, D)
    a = torch.randn(2, D - 1)
    # b30fb93 reported "`shared_negatives` has d=5", an argument the caller never passed.
    with pytest.raises(ValueError, match=r"`queue` holds rows of width dim=5 but `anchors` has d=4"):
        pt.infonce(a, a, queue=q)
    q.enqueue(torch.randn(3, D))
    with pytest.raises(ValueError, match=r"`queue` holds rows of width dim=5 but `anchors` has d=4"):
        pt.infonce(a, a, torch.randn(2, 3, D - 1), queue=q)
    assert "-1" in (pt.NegativeQueue.enqueue.__doc__ or "")  # what a row enqueued without ids holds
