"""Evaluation of one validated call: candidates, chunking, the two engines, PML's regularizer and reducer.

Both engines produce the same unreduced loss dict -- one loss per (anchor, positive) pair, in PML's format
``{"losses": (N*K,), "indices": (a1, p), "reduction_type": "pos_pair"}`` over the layout
``embeddings = anchors`` (N, d), ``ref_emb = cat([positives (N*K, d), negatives (N*M, d), shared (S, d)])`` --
and the instance's embedding regularizer and reducer are applied once to the merged dict, as
``NTXentLoss.forward`` would.

* ``"pml"`` hands each chunk of anchors to ``loss_fn.compute_loss`` with a 4-tuple of pairs.
* ``"dense"`` builds one row of logits per anchor from ``loss_fn.distance`` (its ``maybe_normalize``,
  ``compute_mat`` and ``power``) and ``loss_fn.temperature``; it exists because NTXentLoss compares every positive
  pair with every negative pair of a call, which is quadratic in the chunk, while one row per anchor is linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import PerAnchorReducer
from torch.utils.checkpoint import checkpoint

from . import _distributed
from ._validation import Spec

__all__: list[str] = []  # private module

Engine = Literal["auto", "dense", "pml"]
ENGINES = ("auto", "dense", "pml")
# Distances whose compute_mat broadcasts over a leading batch dimension: the dense engine reproduces them exactly.
_DENSE_DISTANCES = (CosineSimilarity, DotProductSimilarity, LpDistance)
_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 27}  # elements of the largest per-chunk intermediate


@dataclass
class Pool:
    """In-batch candidates: every row's positives then negatives, with their owner row, validity and ids."""

    emb: torch.Tensor  # (R, d)
    owner: torch.Tensor  # (R,) global row of the anchor the candidate belongs to
    valid: torch.Tensor  # (R,) False for masked negatives
    ids: torch.Tensor | None  # (R,) item ids, where known
    has_id: torch.Tensor | None  # (R,)
    offset: int  # global row of local anchor 0


def uses_dense(loss_fn: NTXentLoss, engine: Engine) -> bool:
    """Whether to take the dense engine; it reproduces a plain ``NTXentLoss`` with a distance it knows."""
    cls = type(loss_fn)
    plain_loss = cls._compute_loss is NTXentLoss._compute_loss and cls.compute_loss is NTXentLoss.compute_loss
    supported = plain_loss and type(loss_fn.distance) in _DENSE_DISTANCES
    if engine == "dense" and not supported:
        raise ValueError(
            "`engine='dense'` reproduces a plain NTXentLoss with CosineSimilarity, DotProductSimilarity or "
            f"LpDistance; got {cls.__name__} with {type(loss_fn.distance).__name__} (use engine='auto' or 'pml')"
        )
    return supported and engine != "pml"


def auto_chunk(spec: Spec, pool_rows: int, dense: bool) -> int:
    """Anchors per chunk so that the largest intermediate stays under a per-device budget; chunks of equal size."""
    budget = _BUDGET.get(spec.device.type, _BUDGET["cuda"])
    width = spec.m + spec.s + pool_rows  # negative candidates per anchor
    if dense:  # (C, K + width) logits; one chunk while all of them fit in a few budgets (no recomputation then)
        total = spec.n * (spec.k + width)
        size = spec.n if total <= 4 * budget else max(1, budget // (spec.k + width))
    else:  # NTXentLoss holds (C*K) x (C*width) pair matrices and a C x (C*(K+M) + S + R) distance matrix
        size = max(1, math.isqrt(budget // max(1, spec.k * width + spec.k + spec.m)))
    count = -(-spec.n // size)
    return -(-spec.n // count)


def _similarity(distance: BaseDistance, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``distance``'s matrix for already-normalized inputs, negated when it is a distance (as NT-Xent does)."""
    mat = distance.compute_mat(q, r)
    if distance.power != 1:
        mat = mat**distance.power
    return mat if distance.is_inverted else -mat


def _pool_ok(pool: Pool, rows: torch.Tensor, pos_ids: torch.Tensor | None) -> torch.Tensor:
    """(C, R) bool: candidate r is a negative of anchor ``rows[c]`` (not its own, not masked, no shared id)."""
    ok = pool.valid[None, :] & (pool.owner[None, :] != rows[:, None])
    if pool.ids is not None and pos_ids is not None and pool.has_id is not None:
        same = (pool.ids[None, :, None] == pos_ids[:, None, :]).any(-1)  # (C, R)
        ok &= ~(same & pool.has_id[None, :])
    return ok


def _dense_chunk(
    distance: BaseDistance,
    tau: Any,
    a: torch.Tensor,  # (C, d) normalized
    p: torch.Tensor,  # (C, K, d) normalized
    neg: torch.Tensor | None,  # (C, M, d) normalized
    neg_ok: torch.Tensor | None,  # (C, M)
    shared: torch.Tensor | None,  # (S, d) normalized
    pool: torch.Tensor | None,  # (R, d) normalized
    pool_ok: torch.Tensor | None,  # (C, R)
) -> torch.Tensor:
    fill = torch.finfo(a.dtype).min  # finite, so an anchor with no negatives gets loss 0 and zero (not NaN) grads
    pos = _similarity(distance, a[:, None], p).squeeze(1) / tau  # (C, K)
    parts = []
    if neg is not None:
        logits = _similarity(distance, a[:, None], neg).squeeze(1) / tau  # (C, M)
        parts.append(logits if neg_ok is None else logits.masked_fill(~neg_ok, fill))
    if shared is not None:
        parts.append(_similarity(distance, a, shared) / tau)  # (C, S)
    if pool is not None and pool_ok is not None:
        parts.append((_similarity(distance, a, pool) / tau).masked_fill(~pool_ok, fill))  # (C, R)
    if parts:  # one log-sum-exp per part, then across parts: no copy of the (C, S + R) logits into one tensor
        lses = [torch.logsumexp(part, dim=1) for part in parts]  # each (C,)
        lse = lses[0] if len(lses) == 1 else torch.logsumexp(torch.stack(lses, dim=1), dim=1)
    else:
        lse = a.new_full((a.shape[0],), fill)
    # -log(e^pos / (e^pos + sum e^neg)) = softplus(lse(neg) - pos): exact, no exp overflow, no tiny added.
    # threshold=40: the default (20) returns x alone above 20, dropping log1p(e^-x) ~ 2e-9 (float64 notices).
    return F.softplus(lse[:, None] - pos, threshold=40.0).reshape(-1)  # (C*K,)


def _pml_chunk(
    loss_fn: NTXentLoss,
    a: torch.Tensor,  # (C, d)
    p: torch.Tensor,  # (C, K, d)
    neg: torch.Tensor | None,  # (C, M, d)
    neg_ok: torch.Tensor | None,  # (C, M)
    shared: torch.Tensor | None,  # (S, d)
    pool: torch.Tensor | None,  # (R, d)
    pool_ok: torch.Tensor | None,  # (C, R)
) -> torch.Tensor:
    c, k, d = p.shape
    dev = a.device
    refs = [p.reshape(c * k, d)]
    a2s: list[torch.Tensor] = []
    ns: list[torch.Tensor] = []
    offset = c * k
    if neg is not None:
        m = neg.shape[1]
        ok = neg_ok if neg_ok is not None else torch.ones(c, m, dtype=torch.bool, device=dev)
        rows, cols = ok.nonzero(as_tuple=True)
        refs.append(neg.reshape(c * m, d))
        a2s.append(rows)
        ns.append(offset + rows * m + cols)
        offset += c * m
    if shared is not None:
        s = shared.shape[0]
        refs.append(shared)
        a2s.append(torch.arange(c, device=dev).repeat_interleave(s))
        ns.append(offset + torch.arange(s, device=dev).repeat(c))
        offset += s
    if pool is not None and pool_ok is not None:
        rows, cols = pool_ok.nonzero(as_tuple=True)
        refs.append(pool)
        a2s.append(rows)
        ns.append(offset + cols)
    # A sentinel anchor (row c) owning two negative pairs and no positive: NTXentLoss returns a gradient-free
    # zero when every index tensor has length <= 1 (N=1, M=1) or when there are no negative pairs at all.
    a2s.append(torch.full((2,), c, device=dev))
    ns.append(torch.zeros(2, dtype=torch.long, device=dev))
    a1 = torch.arange(c, device=dev).repeat_interleave(k)
    pairs = (a1, torch.arange(c * k, device=dev), torch.cat(a2s), torch.cat(ns))
    embeddings = torch.cat([a, a[:1].detach()])  # (C+1, d)
    out = loss_fn.compute_loss(embeddings, None, pairs, torch.cat(refs), None)
    return out["loss"]["losses"]


def _zero_rows_without_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.where((x == 0).all(dim=-1, keepdim=True), x.detach(), x)


def _split(x: torch.Tensor | None, size: int, chunks: int) -> list[torch.Tensor | None]:
    # torch.split, once: its backward is one concatenation; slicing in a loop allocates a full-size gradient per slice.
    return [None] * chunks if x is None else list(torch.split(x, size))


def evaluate(
    loss_fn: NTXentLoss,
    spec: Spec,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    negatives_mask: torch.Tensor | None,
    shared_negatives: torch.Tensor | None,
    in_batch: bool,
    positive_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    chunk_size: int | None,
    engine: Engine,
    gather: bool,
) -> torch.Tensor:
    """The reduced loss for validated inputs (see ``pml_triplets.infonce`` for the semantics)."""
    n, k, d = spec.n, spec.k, spec.d
    work = torch.float32 if spec.dtype in (torch.float16, torch.bfloat16) else spec.dtype
    dense = uses_dense(loss_fn, engine)
    loss_fn.reset_stats()
    with torch.autocast(spec.device.type, enabled=False):
        a = raw_anchors = anchors.to(work)
        p = positives.to(work).reshape(n, k, d)  # (N, K, d)
        neg = None if negatives is None else negatives.to(work)  # (N, M, d)
        sh = None if shared_negatives is None else shared_negatives.to(work)  # (S, d)
        pid = None if positive_ids is None else positive_ids.reshape(n, k)  # (N, K)
        if neg is not None and negatives_mask is not None:
            # Zero masked rows first, so whatever they hold (inf, NaN) reaches neither the loss nor any gradient.
            neg = torch.where(negatives_mask[..., None], neg, neg.new_zeros(()))
        neg_ok = negatives_mask
        if spec.dtype == torch.float16 and getattr(loss_fn.distance, "normalize_embeddings", False):
            # normalize's Jacobian at a zero row is I/eps ~ 1e12, which float16 turns into inf: zero rows
            # (padding) get no gradient instead. Their value is unchanged (normalize maps them to 0).
            a, p = _zero_rows_without_grad(a), _zero_rows_without_grad(p)
            neg = None if neg is None else _zero_rows_without_grad(neg)
            sh = None if sh is None else _zero_rows_without_grad(sh)
        if neg is not None and pid is not None and negative_ids is not None:
            clash = (negative_ids[:, :, None] == pid[:, None, :]).any(-1)  # (N, M)
            neg_ok = ~clash if neg_ok is None else neg_ok & ~clash

        if dense:
            dist = loss_fn.distance
            a = dist.maybe_normalize(a, dim=-1)
            p = dist.maybe_normalize(p, dim=-1)
            neg = None if neg is None else dist.maybe_normalize(neg, dim=-1)
            sh = None if sh is None else dist.maybe_normalize(sh, dim=-1)

        pool = _build_pool(spec, p, neg, negatives_mask, pid, negative_ids, gather) if in_batch else None
        size = chunk_size or auto_chunk(spec, 0 if pool is None else pool.emb.shape[0], dense)
        rows = torch.arange(n, device=spec.device) + (0 if pool is None else pool.offset)
        count = -(-n // size)
        # With several chunks, keep one chunk's intermediates alive and recompute them in the backward pass:
        # NTXentLoss's pair matrices, or the dense (C, S + R) logits (per-anchor logits are small: kept).
        recompute = count > 1 and torch.is_grad_enabled() and (not dense or pool is not None or sh is not None)
        columns = zip(
            torch.split(a, size),
            torch.split(p, size),
            _split(neg, size, count),
            _split(neg_ok, size, count),
            torch.split(rows, size),
            _split(pid, size, count),
        )
        one = partial(_dense_chunk, loss_fn.distance, loss_fn.temperature) if dense else partial(_pml_chunk, loss_fn)
        losses = []
        for a_c, p_c, neg_c, ok_c, rows_c, pid_c in columns:
            pool_ok = None if pool is None else _pool_ok(pool, rows_c, pid_c)
            chunk = (a_c, p_c, neg_c, ok_c, sh, None if pool is None else pool.emb, pool_ok)
            losses.append(checkpoint(one, *chunk, use_reentrant=False) if recompute else one(*chunk))
        loss = reduce(loss_fn, torch.cat(losses), raw_anchors, k)
    return loss.to(spec.dtype)


def reduce(loss_fn: NTXentLoss, losses: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """Apply ``loss_fn``'s embedding regularizer and reducer to per-pair ``losses`` (N*K,), as PML's forward does."""
    n = anchors.shape[0]
    dev = anchors.device
    a1 = torch.arange(n, device=dev).repeat_interleave(k)
    p = torch.arange(n * k, device=dev)  # the positive's row in ref_emb
    if k > 1 and _has_per_anchor(loss_fn.reducer):
        # PerAnchorReducer scatters pair losses into an N x N matrix sized from the anchors, not from ref_emb
        # (plain PML raises IndexError there): give it each positive's rank within its anchor instead.
        if k > n:
            raise ValueError(f"PerAnchorReducer needs K <= N positives per anchor; got K={k}, N={n}")
        p = p % k
    loss_dict = {
        "loss": {
            "losses": losses,
            "indices": (a1, p),
            "reduction_type": "pos_pair",
        }
    }
    loss_fn.add_embedding_regularization_to_loss_dict(loss_dict, anchors)
    return loss_fn.reducer(loss_dict, anchors, None)


def _has_per_anchor(reducer: torch.nn.Module) -> bool:
    return any(isinstance(r, PerAnchorReducer) for r in reducer.modules())


def _build_pool(
    spec: Spec,
    p: torch.Tensor,  # (N, K, d)
    neg: torch.Tensor | None,  # (N, M, d)
    mask: torch.Tensor | None,  # (N, M)
    pid: torch.Tensor | None,  # (N, K)
    nid: torch.Tensor | None,  # (N, M)
    gather: bool,
) -> Pool:
    n, k, m, d, dev = spec.n, spec.k, spec.m, spec.d, spec.device
    if mask is None and neg is not None:
        mask = torch.ones(n, m, dtype=torch.bool, device=dev)
    has_pid = None if pid is None else torch.ones(n, k, dtype=torch.bool, device=dev)
    has_nid = None if pid is None else torch.full((n, m), nid is not None, dtype=torch.bool, device=dev)
    if pid is not None and nid is None:
        nid = torch.zeros(n, m, dtype=pid.dtype, device=dev)
    offset, total = 0, n
    if gather and _distributed.world()[1] > 1:
        gathered, offset, total = _distributed.gather_rows([p, neg, mask, pid, nid, has_pid, has_nid], n)
        p = cast(torch.Tensor, gathered[0])
        neg, mask, pid, nid, has_pid, has_nid = gathered[1:]
    owners = torch.arange(total, device=dev)
    emb = [p.reshape(-1, d)]  # (total*K, d)
    owner = [owners.repeat_interleave(k)]
    valid = [torch.ones(total * k, dtype=torch.bool, device=dev)]
    if neg is not None and mask is not None:
        emb.append(neg.reshape(-1, d))  # (total*M, d)
        owner.append(owners.repeat_interleave(m))
        valid.append(mask.reshape(-1))
    ids = has_id = None
    if pid is not None and has_pid is not None:
        ids = torch.cat([pid.reshape(-1)] + ([] if nid is None else [nid.reshape(-1)]))
        has_id = torch.cat([has_pid.reshape(-1)] + ([] if has_nid is None else [has_nid.reshape(-1)]))
    return Pool(torch.cat(emb), torch.cat(owner), torch.cat(valid), ids, has_id, offset)
