"""Per-pair losses of one validated batch: candidates, chunking, and the two engines.

Both engines return one loss per (anchor, positive) pair, anchor-major, ``(N*K,)``; ``_reduce`` then applies the
instance's embedding regularizer and reducer as ``NTXentLoss.forward`` would.

* ``dense`` builds one row of logits per anchor from the similarity of the instance's distance (see
  ``_similarity``): an anchor's own negatives (C, M), the shared negatives (C, S) and, in-batch, every row's
  positives and negatives (C, R). It is linear in the pairs; NTXentLoss itself compares every positive pair of a
  call with every negative pair, which is quadratic in the chunk.
* ``pml`` hands each chunk's pairs to ``loss_fn.compute_loss`` with a 4-tuple: PML's own numbers, for subclasses
  that override NTXentLoss's loss (and on request).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from types import MethodType
from typing import Any, cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss
from torch.utils.checkpoint import checkpoint

from . import _distributed
from ._config import Config
from ._similarity import Similarity
from ._validation import Batch, Spec, Temperature, transformed

__all__: list[str] = []  # private module

_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 27}  # elements of the largest per-chunk intermediate
_DEFAULT_LOSS = NTXentLoss()  # engine="pml" without a loss_fn; never modified (see _with_temperature)


@dataclass(frozen=True)
class Pool:
    """In-batch candidates: every row's K positives, then every row's M negatives, over all gathered rows."""

    emb: torch.Tensor  # (R, d) with R = T*(K + M) for T rows in all
    valid: torch.Tensor | None  # (R,) False for masked negatives; None when nothing is masked
    ids: torch.Tensor | None  # (R,) item ids where known
    has_id: torch.Tensor | None  # (R,)
    offset: int  # global row of local anchor 0


def auto_chunk(spec: Spec, width: int, dense: bool) -> int:
    """Anchors per chunk so that the largest intermediate stays under a per-device budget; chunks of equal size.

    ``width`` is the number of negative candidates per anchor.
    """
    budget = _BUDGET.get(spec.device.type, _BUDGET["cuda"])
    if dense:  # (C, K + width) logits; one chunk while all of them fit in a few budgets (no recomputation then)
        total = spec.n * (spec.k + width)
        size = spec.n if total <= 4 * budget else max(1, budget // (spec.k + width))
    else:  # NTXentLoss holds (C*K) x (C*width) pair matrices and a C x (C*(K+M) + S + R) distance matrix
        size = max(1, math.isqrt(budget // max(1, spec.k * width + spec.k + spec.m)))
    count = -(-spec.n // size)
    return -(-spec.n // count)


def _own_columns(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(C, K) pool columns of the positives of global rows ``rows`` (C,)."""
    return rows[:, None] * k + torch.arange(k, device=rows.device)


def _id_clash(pool: Pool, pid: torch.Tensor | None) -> torch.Tensor | None:
    """(C, R) bool: the candidate has the id of one of the anchor's positives ``pid`` (C, K)."""
    if pool.ids is None or pool.has_id is None or pid is None:
        return None
    return (pool.ids[None, :, None] == pid[:, None, :]).any(-1) & pool.has_id


def _dense_chunk(
    sim: Similarity,
    k: int,
    tau: Temperature,
    a: torch.Tensor,  # (C, d) normalized
    p: torch.Tensor,  # (C, K, d) normalized
    neg: torch.Tensor | None,  # (C, M, d) normalized; None in-batch (they are in the pool)
    valid: torch.Tensor | None,  # (C, M)
    rows: torch.Tensor,  # (C,) global rows
    pid: torch.Tensor | None,  # (C, K)
    shared: torch.Tensor | None,  # (S, d) normalized
    pool: Pool | None,
) -> torch.Tensor:
    fill = torch.finfo(a.dtype).min  # finite: an anchor with no negatives gets loss 0 and zero (not NaN) grads
    if sim.linear:  # fold 1/τ into the anchors: (C, d) divisions instead of one per logit
        q, scale = a / tau, None
    else:
        q, scale = a, tau

    def logits(x: torch.Tensor) -> torch.Tensor:
        return x if scale is None else x / scale

    pos = logits(sim.rows(q, p))  # (C, K)
    parts = []
    if neg is not None:
        own = logits(sim.rows(q, neg))  # (C, M)
        parts.append(own if valid is None else own.masked_fill(~valid, fill))
    if shared is not None:
        parts.append(logits(sim.block(q, shared)))  # (C, S)
    if pool is not None:
        cand = logits(sim.block(q, pool.emb))  # (C, R): every row's positives and negatives, own included
        # In place: the matmul's backward needs its inputs, not this output. An anchor's own negatives stay (they
        # are its negatives); its own positives go (they are the numerators of its K terms, never negatives).
        cand.scatter_(1, _own_columns(rows, k), fill)
        if pool.valid is not None:
            cand.masked_fill_(~pool.valid, fill)
        clash = _id_clash(pool, pid)
        if clash is not None:
            cand.masked_fill_(clash, fill)
        parts.append(cand)
    if parts:  # one log-sum-exp per part, then across parts: no copy of the (C, S + R) logits into one tensor
        lses = [torch.logsumexp(part, dim=1) for part in parts]  # each (C,)
        lse = lses[0] if len(lses) == 1 else torch.logsumexp(torch.stack(lses, dim=1), dim=1)
    else:
        lse = a.new_full((a.shape[0],), fill)
    # -log(e^pos / (e^pos + sum e^neg)) = softplus(lse(neg) - pos): exact, no exp overflow, no tiny added.
    # threshold=40: above it softplus returns x alone, dropping log1p(e^-x) < 5e-18 (below float64's resolution).
    return F.softplus(lse[:, None] - pos, threshold=40.0).reshape(-1)  # (C*K,)


def _with_temperature(loss_fn: NTXentLoss, tau: Temperature) -> NTXentLoss:
    """``loss_fn`` itself when ``tau`` is its temperature, else a shallow copy that holds ``tau``.

    NTXentLoss reads ``self.temperature``; the copy keeps the caller's object untouched (deepcopy, threads and
    reuse keep working) and shares every submodule.
    """
    own = loss_fn.temperature
    if tau is own or (not isinstance(tau, torch.Tensor) and not isinstance(own, torch.Tensor) and tau == own):
        return loss_fn
    view = copy.copy(loss_fn)
    for name, value in vars(loss_fn).items():  # PML keeps bound methods as attributes (loss_method): rebind them
        if isinstance(value, MethodType) and value.__self__ is loss_fn:
            view.__dict__[name] = MethodType(value.__func__, view)
    view.__dict__["temperature"] = tau  # an instance attribute shadows a registered parameter of that name
    return view


def _pml_chunk(
    loss_fn: NTXentLoss,
    k: int,
    a: torch.Tensor,  # (C, d)
    p: torch.Tensor,  # (C, K, d)
    neg: torch.Tensor | None,  # (C, M, d); None in-batch
    valid: torch.Tensor | None,  # (C, M)
    rows: torch.Tensor,  # (C,) global rows
    pid: torch.Tensor | None,  # (C, K)
    shared: torch.Tensor | None,  # (S, d)
    pool: Pool | None,
) -> torch.Tensor:
    c, _, d = p.shape
    dev = a.device
    refs = [p.reshape(c * k, d)]
    a2s: list[torch.Tensor] = []
    ns: list[torch.Tensor] = []
    offset = c * k
    if neg is not None:
        m = neg.shape[1]
        if valid is None:  # every pair: no data-dependent shapes
            a2s.append(torch.arange(c, device=dev).repeat_interleave(m))
            ns.append(offset + torch.arange(c * m, device=dev))
        else:
            r, col = valid.nonzero(as_tuple=True)
            a2s.append(r)
            ns.append(offset + r * m + col)
        refs.append(neg.reshape(c * m, d))
        offset += c * m
    if shared is not None:
        s = shared.shape[0]
        refs.append(shared)
        a2s.append(torch.arange(c, device=dev).repeat_interleave(s))
        ns.append(offset + torch.arange(s, device=dev).repeat(c))
        offset += s
    if pool is not None:
        ok = torch.ones(c, pool.emb.shape[0], dtype=torch.bool, device=dev)
        ok.scatter_(1, _own_columns(rows, k), False)
        if pool.valid is not None:
            ok &= pool.valid
        clash = _id_clash(pool, pid)
        if clash is not None:
            ok &= ~clash
        r, col = ok.nonzero(as_tuple=True)
        refs.append(pool.emb)
        a2s.append(r)
        ns.append(offset + col)
    # A sentinel anchor (row c) owning two negative pairs and no positive: NTXentLoss returns a gradient-free
    # zero when every index tensor has length <= 1 (N=1, M=1) or when there are no negative pairs at all.
    a2s.append(torch.full((2,), c, device=dev))
    ns.append(torch.zeros(2, dtype=torch.long, device=dev))
    a1 = torch.arange(c, device=dev).repeat_interleave(k)
    pairs = (a1, torch.arange(c * k, device=dev), torch.cat(a2s), torch.cat(ns))
    embeddings = torch.cat([a, a[:1].detach()])  # (C+1, d)
    out = loss_fn.compute_loss(embeddings, None, pairs, torch.cat(refs), None)
    return cast(torch.Tensor, out["loss"]["losses"])


def _zero_rows_without_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.where((x == 0).all(dim=-1, keepdim=True), x.detach(), x)


def _split(x: torch.Tensor | None, size: int, chunks: int) -> list[torch.Tensor | None]:
    # torch.split, once: its backward is one concatenation; slicing in a loop allocates a full-size gradient per slice.
    return [None] * chunks if x is None else list(torch.split(x, size))


def evaluate(config: Config, batch: Batch, tau: Temperature) -> torch.Tensor:
    """The ``(N*K,)`` per-pair losses of a validated batch, in its working dtype."""
    spec, sim = batch.spec, config.similarity
    a, p, neg, sh = batch.anchors, batch.positives, batch.negatives, batch.shared
    if spec.dtype == torch.float16 and sim.normalizes:
        # normalize's Jacobian at a zero row is I/eps ~ 1e12, which float16 turns into inf: zero rows
        # (padding) get no gradient instead. Their value is unchanged (normalize maps them to 0).
        a, p = _zero_rows_without_grad(a), _zero_rows_without_grad(p)
        neg = None if neg is None else _zero_rows_without_grad(neg)
        sh = None if sh is None else _zero_rows_without_grad(sh)
    if config.dense:
        a, p = sim.normalize(a), sim.normalize(p)
        neg = None if neg is None else sim.normalize(neg)
        sh = None if sh is None else sim.normalize(sh)

    pool = _build_pool(batch, p, neg, config.gather) if config.in_batch else None
    own_neg, own_valid = (None, None) if config.in_batch else (neg, batch.valid)
    width = spec.s + (spec.m if pool is None else pool.emb.shape[0])
    size = config.chunk_size or auto_chunk(spec, width, config.dense)
    count = -(-spec.n // size)
    rows = torch.arange(spec.n, device=spec.device) + (0 if pool is None else pool.offset)
    if config.dense:
        one = partial(_dense_chunk, sim, spec.k, tau)
    else:
        one = partial(_pml_chunk, _with_temperature(config.loss_fn or _DEFAULT_LOSS, tau), spec.k)
    # With several chunks, keep one chunk's intermediates alive and recompute them in the backward pass:
    # NTXentLoss's pair matrices, or the dense (C, S + R) logits (per-anchor logits are small: kept).
    recompute = (
        count > 1
        and torch.is_grad_enabled()
        and (not config.dense or pool is not None or sh is not None)
        and not transformed()  # saved-tensor hooks cannot run under torch.func
    )
    columns = zip(
        torch.split(a, size),
        torch.split(p, size),
        _split(own_neg, size, count),
        _split(own_valid, size, count),
        torch.split(rows, size),
        _split(batch.pos_ids, size, count),
        strict=True,
    )
    losses = []
    for chunk in columns:
        args: tuple[Any, ...] = (*chunk, sh, pool)
        losses.append(checkpoint(one, *args, use_reentrant=False) if recompute else one(*args))
    return losses[0] if count == 1 else torch.cat(losses)


def _build_pool(batch: Batch, p: torch.Tensor, neg: torch.Tensor | None, gather: bool) -> Pool:
    """Every row's positives ``p`` (N, K, d) then negatives ``neg`` (N, M, d), gathered over ranks if asked."""
    spec, dev = batch.spec, batch.spec.device
    n, k, m, d = spec.n, spec.k, spec.m, spec.d
    mask, pid, nid = batch.mask, batch.pos_ids, batch.neg_ids
    has_nid = None
    if pid is not None:
        has_nid = torch.full((n, m), nid is not None, dtype=torch.bool, device=dev)
        if nid is None:
            nid = torch.zeros(n, m, dtype=pid.dtype, device=dev)
    offset = 0
    if gather and _distributed.world()[1] > 1:
        gathered, offset, _ = _distributed.gather_rows([p, neg, mask, pid, nid, has_nid], n)
        p = cast(torch.Tensor, gathered[0])
        neg, mask, pid, nid, has_nid = gathered[1:]
    emb = p.reshape(-1, d)  # (T*K, d)
    valid = ids = has_id = None
    if neg is not None:
        emb = torch.cat([emb, neg.reshape(-1, d)])  # (T*(K+M), d)
        if mask is not None:
            valid = torch.cat([mask.new_ones(p.shape[0] * k), mask.reshape(-1)])
    if pid is not None and nid is not None and has_nid is not None:
        ids = torch.cat([pid.reshape(-1), nid.reshape(-1)])
        has_id = torch.cat([has_nid.new_ones(pid.numel()), has_nid.reshape(-1)])
    return Pool(emb, valid, ids, has_id, offset)
