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
from dataclasses import dataclass, replace
from functools import partial
from types import MethodType
from typing import cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss
from torch.utils.checkpoint import checkpoint

from . import _distributed
from ._config import A2A, A2P, P2A, P2P, Config
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
    rows: int  # T
    m: int


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


def _own_negative_columns(rows: torch.Tensor, pool: Pool, k: int) -> torch.Tensor:
    """(C, M) pool columns of the negatives of global rows ``rows`` (C,)."""
    m = pool.m
    return pool.rows * k + rows[:, None] * m + torch.arange(m, device=rows.device)


def _excluded(pool: Pool, pid: torch.Tensor | None) -> torch.Tensor | None:
    """(C, R) or (1, R) bool: masked candidates, and those with the id of one of the anchor's positives ``pid``."""
    out = None if pool.valid is None else ~pool.valid[None, :]
    if pool.ids is not None and pool.has_id is not None and pid is not None:
        clash = (pool.ids[None, :, None] == pid[:, None, :]).any(-1) & pool.has_id  # (C, R)
        out = clash if out is None else out | clash
    return out


@dataclass(frozen=True)
class Rows:
    """One chunk of anchors and what belongs to them (each field split along dim 0)."""

    a: torch.Tensor  # (C, d)
    p: torch.Tensor  # (C, K, d)
    neg: torch.Tensor | None  # (C, M, d) own negatives; None in-batch (they are in the pool)
    valid: torch.Tensor | None  # (C, M)
    rows: torch.Tensor | None  # (C,) global rows, where a pool needs them
    pid: torch.Tensor | None  # (C, K)
    ga: torch.Tensor | None = None  # (C, g) guide embeddings, unit rows, for false-negative filtering
    gp: torch.Tensor | None = None  # (C, K, g)
    gn: torch.Tensor | None = None  # (C, M, g)

    @property
    def global_rows(self) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("global rows are only built for in-batch candidates")
        return self.rows

    def split(self, size: int) -> list[Rows]:
        if size >= self.a.shape[0]:
            return [self]
        parts = [[None] * -(-self.a.shape[0] // size) if x is None else torch.split(x, size) for x in self._fields()]
        return [Rows(*chunk) for chunk in zip(*parts, strict=True)]

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.a, self.p, self.neg, self.valid, self.rows, self.pid, self.ga, self.gp, self.gn)


@dataclass(frozen=True)
class Context:
    """What every chunk compares with: shared negatives, the in-batch pool, all anchors; and their guides."""

    shared: torch.Tensor | None  # (S, d)
    pool: Pool | None
    anchors: torch.Tensor | None = None  # (T, d) every row's anchor, for the directions that contrast anchors
    g_shared: torch.Tensor | None = None  # (S, g)
    g_pool: torch.Tensor | None = None  # (R, g)
    g_anchors: torch.Tensor | None = None  # (T, g)
    own_guide: bool = False  # the guide is the model's own embeddings (no guide given)


def _lse(logits: torch.Tensor, guide: torch.Tensor | None, limit: torch.Tensor | None, fill: float) -> torch.Tensor:
    """(C, K) log-sum-exp of a row-level block (C, X), dropping for term k what ``guide > limit[:, k]`` marks."""
    if guide is None or limit is None:
        return torch.logsumexp(logits, dim=1)[:, None]  # (C, 1): the same for all K terms
    cols = [torch.logsumexp(logits.masked_fill(guide > limit[:, j, None], fill), dim=1) for j in range(limit.shape[1])]
    return torch.stack(cols, dim=1)


def _dense_chunk(config: Config, k: int, tau: Temperature, r: Rows, ctx: Context) -> torch.Tensor:
    sim, opt = config.similarity, config.retrieval
    fill = torch.finfo(r.a.dtype).min  # finite: an anchor with no negatives gets loss 0 and zero (not NaN) grads
    if sim.linear:  # fold 1/τ into the queries: (C, d) divisions instead of one per logit
        qa, qp, scale = r.a / tau, r.p / tau, None
    else:
        qa, qp, scale = r.a, r.p, tau

    def logits(x: torch.Tensor) -> torch.Tensor:
        return x if scale is None else x / scale

    tau_value = tau.detach() if isinstance(tau, torch.Tensor) else tau  # logits * tau_value: s(a, c), detached

    def harden(x: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
        # + strength * s(a, c), detached and not divided by τ: harder negatives weigh more in the softmax
        if opt.hardness_mode not in kinds:
            return x
        raw = x.detach() * tau_value
        return x + opt.hardness_strength * raw

    pool = ctx.pool
    if pool is not None and k == 1 and opt.plain and pool.ids is None and ctx.shared is None:
        # The common in-batch case as one cross-entropy, the positive in its own column: log_softmax's fused
        # backward keeps one (C, R) tensor fewer alive than log-sum-exp minus the positive.
        cand = logits(sim.block(qa, pool.emb))  # (C, R)
        if pool.valid is not None:
            cand.masked_fill_(~pool.valid, fill)
        return F.cross_entropy(cand, _own_columns(r.global_rows, 1).squeeze(1), reduction="none")  # (C,)

    pos = logits(sim.rows(qa, r.p))  # (C, K)
    limit = None  # (C, K) guide similarity above which a candidate is a false negative
    if opt.margin is not None and r.ga is not None and r.gp is not None:
        g_pos = torch.bmm(r.gp, r.ga[:, :, None]).squeeze(-1)  # (C, K)
        limit = g_pos - (opt.margin if opt.margin_strategy == "absolute" else g_pos.abs() * opt.margin)

    a2p = []  # (C, K) or (C, 1) log-sum-exps of the anchor-to-positive negatives
    if r.neg is not None:
        own = harden(logits(sim.rows(qa, r.neg)), ("own", "all"))  # (C, M)
        own = own if r.valid is None else own.masked_fill(~r.valid, fill)
        g_own = None if r.gn is None or r.ga is None else torch.bmm(r.gn, r.ga[:, :, None]).squeeze(-1)
        a2p.append(_lse(own, g_own, limit, fill))
    if ctx.shared is not None:
        shared = harden(logits(sim.block(qa, ctx.shared)), ("all",))  # (C, S)
        g_sh = None if ctx.g_shared is None or r.ga is None else r.ga @ ctx.g_shared.T
        a2p.append(_lse(shared, g_sh, limit, fill))
    if pool is not None:
        cand = logits(sim.block(qa, pool.emb))  # (C, R): every row's positives and negatives, own included
        if limit is not None and ctx.own_guide and sim.cosine:  # the guide's cosines are these logits times τ
            g_cand: torch.Tensor | None = cand.detach() * tau_value
        else:
            g_cand = None if ctx.g_pool is None or r.ga is None else r.ga @ ctx.g_pool.T
        own_pos = _own_columns(r.global_rows, k)  # (C, K)
        own_neg = _own_negative_columns(r.global_rows, pool, k)  # (C, M)
        if opt.hardness_mode in ("in_batch", "all"):
            kept = cand.gather(1, own_neg) if opt.hardness_mode == "in_batch" else None
            cand = harden(cand, ("in_batch", "all"))
            if kept is not None:  # "in_batch": the anchor's own negatives keep their plain logits
                cand = cand.scatter(1, own_neg, kept)
        elif opt.hardness_mode == "own":
            cand = cand.scatter(1, own_neg, harden(cand.gather(1, own_neg), ("own",)))
        # In place where no one saved the tensor: an anchor's own negatives stay (they are its negatives); its own
        # positives go (they are the numerators of its K terms, never negatives); then masks and id clashes.
        cand.scatter_(1, own_pos, fill)
        excluded = _excluded(pool, r.pid)
        if excluded is not None:
            cand.masked_fill_(excluded, fill)
        a2p.append(_lse(cand, g_cand, limit, fill))

    parts = {A2P: _combine(a2p, r.a, fill)}  # direction -> (C, K) log-sum-exp of its negatives
    if A2A in opt.directions and ctx.anchors is not None:
        aa = logits(sim.block(qa, ctx.anchors)).scatter_(1, r.global_rows[:, None], fill)  # (C, T), not itself
        g_aa = None if ctx.g_anchors is None or r.ga is None else r.ga @ ctx.g_anchors.T
        parts[A2A] = _lse(aa, g_aa, limit, fill)
    if P2A in opt.directions and ctx.anchors is not None:
        pa = logits(sim.block(qp.flatten(0, 1), ctx.anchors)).unflatten(0, (-1, k))  # (C, K, T)
        pa = pa.scatter(2, r.global_rows[:, None, None].expand(-1, k, 1), fill)  # own anchor: the positive pair, below
        if limit is not None and ctx.g_anchors is not None and r.gp is not None:
            pa = pa.masked_fill(r.gp @ ctx.g_anchors.T > limit[..., None], fill)
        parts[P2A] = torch.logsumexp(pa, dim=2)
    if P2P in opt.directions and pool is not None:
        pp = logits(sim.block(qp.flatten(0, 1), pool.emb)).unflatten(0, (-1, k))  # (C, K, R)
        own_docs = torch.cat([_own_columns(r.global_rows, k), _own_negative_columns(r.global_rows, pool, k)], dim=1)
        pp = pp.scatter(2, own_docs[:, None, :].expand(-1, k, -1), fill)  # other rows' docs only
        excluded = _excluded(pool, r.pid)
        if excluded is not None:
            pp = pp.masked_fill(excluded[:, None, :], fill)
        if limit is not None and ctx.g_pool is not None and r.gp is not None:
            pp = pp.masked_fill(r.gp @ ctx.g_pool.T > limit[..., None], fill)
        parts[P2P] = torch.logsumexp(pp, dim=2)

    # -log(e^pos / (e^pos + sum e^neg)) = softplus(lse(neg) - pos): exact, no exp overflow, no tiny added.
    # threshold=40: above it softplus returns x alone, dropping log1p(e^-x) < 5e-18 (below float64's resolution).
    if opt.partition == "per_direction":  # one softmax per direction, each holding the positive once, averaged
        terms = [F.softplus(lse - pos, threshold=40.0) for lse in parts.values()]
        loss = torch.stack(terms).mean(0)
    else:  # one softmax over every block; positive_to_anchor holds the positive pair a second time
        extra = [pos] if P2A in parts else []
        lse = _combine([*parts.values(), *extra], r.a, fill)
        loss = F.softplus(lse - pos, threshold=40.0)
    return loss.reshape(-1)  # (C*K,)


def _combine(lses: list[torch.Tensor], a: torch.Tensor, fill: float) -> torch.Tensor:
    """Log-sum-exp across parts, each (C, K) or (C, 1): no copy of the (C, S + R) logits into one tensor."""
    if not lses:
        return a.new_full((a.shape[0], 1), fill)
    if len(lses) == 1:
        return lses[0]
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(*lses), dim=-1), dim=-1)


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


def _pml_chunk(loss_fn: NTXentLoss, k: int, r: Rows, ctx: Context) -> torch.Tensor:
    a, p, neg, valid = r.a, r.p, r.neg, r.valid
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
            rows, col = valid.nonzero(as_tuple=True)
            a2s.append(rows)
            ns.append(offset + rows * m + col)
        refs.append(neg.reshape(c * m, d))
        offset += c * m
    if ctx.shared is not None:
        s = ctx.shared.shape[0]
        refs.append(ctx.shared)
        a2s.append(torch.arange(c, device=dev).repeat_interleave(s))
        ns.append(offset + torch.arange(s, device=dev).repeat(c))
        offset += s
    pool = ctx.pool
    if pool is not None:
        ok = torch.ones(c, pool.emb.shape[0], dtype=torch.bool, device=dev)
        ok.scatter_(1, _own_columns(r.global_rows, k), False)
        excluded = _excluded(pool, r.pid)
        if excluded is not None:
            ok &= ~excluded
        rows, col = ok.nonzero(as_tuple=True)
        refs.append(pool.emb)
        a2s.append(rows)
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


def evaluate(config: Config, batch: Batch, tau: Temperature) -> torch.Tensor:
    """The ``(N*K,)`` per-pair losses of a validated batch, in its working dtype."""
    spec, sim, opt = batch.spec, config.similarity, config.retrieval
    a, p, neg, sh = batch.anchors, batch.positives, batch.negatives, batch.shared
    guide = batch.guide
    if opt.margin is not None and guide is None:  # no guide: the model's own embeddings, detached, as cosines
        guide = (_unit(a), _unit(p), None if neg is None else _unit(neg))
    g_shared = None if opt.margin is None or sh is None else _unit(sh)
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

    ctx = Context(shared=sh, pool=None, g_shared=g_shared)
    rows = None
    if config.in_batch:
        ctx = _in_batch_context(batch, a, p, neg, guide, config.gather, A2A in opt.directions or P2A in opt.directions)
        ctx = replace(ctx, shared=sh, g_shared=g_shared, own_guide=batch.guide is None)
        assert ctx.pool is not None
        rows = torch.arange(spec.n, device=spec.device) + ctx.pool.offset
    g_a, g_p, g_n = (None, None, None) if guide is None else guide
    own_neg, own_valid, own_gn = (None, None, None) if config.in_batch else (neg, batch.valid, g_n)
    rows_all = Rows(a, p, own_neg, own_valid, rows, batch.pos_ids, g_a, g_p, own_gn)

    width = spec.s + (spec.m if ctx.pool is None else ctx.pool.emb.shape[0])
    size = config.chunk_size or auto_chunk(spec, width, config.dense)
    chunks = rows_all.split(size)
    if config.dense:
        one = partial(_dense_chunk, config, spec.k, tau)
    else:
        one = partial(_pml_chunk, _with_temperature(config.loss_fn or _DEFAULT_LOSS, tau), spec.k)
    # With several chunks, keep one chunk's intermediates alive and recompute them in the backward pass:
    # NTXentLoss's pair matrices, or the dense (C, S + R) logits (per-anchor logits are small: kept).
    recompute = (
        len(chunks) > 1
        and torch.is_grad_enabled()
        and (not config.dense or ctx.pool is not None or sh is not None)
        and not transformed()  # saved-tensor hooks cannot run under torch.func
    )
    losses = [checkpoint(one, r, ctx, use_reentrant=False) if recompute else one(r, ctx) for r in chunks]
    return losses[0] if len(losses) == 1 else torch.cat(losses)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.detach(), dim=-1)


def _in_batch_context(
    batch: Batch,
    a: torch.Tensor,  # (N, d)
    p: torch.Tensor,  # (N, K, d)
    neg: torch.Tensor | None,  # (N, M, d)
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    gather: bool,
    with_anchors: bool,
) -> Context:
    """The pool (every row's positives, then every row's negatives), with all anchors and guides if needed."""
    spec, dev = batch.spec, batch.spec.device
    n, k, m, d = spec.n, spec.k, spec.m, spec.d
    mask, pid, nid = batch.mask, batch.pos_ids, batch.neg_ids
    has_nid = None
    if pid is not None:
        has_nid = torch.full((n, m), nid is not None, dtype=torch.bool, device=dev)
        if nid is None:
            nid = torch.zeros(n, m, dtype=pid.dtype, device=dev)
    g_a, g_p, g_n = (None, None, None) if guide is None else guide
    anchors = a if with_anchors else None
    g_anchors = g_a if with_anchors else None
    offset, total = 0, n
    if gather and _distributed.world()[1] > 1:
        tensors = [p, neg, mask, pid, nid, has_nid, anchors, g_p, g_n, g_anchors]
        gathered, offset, total = _distributed.gather_rows(tensors, n)
        p = cast(torch.Tensor, gathered[0])
        neg, mask, pid, nid, has_nid, anchors, g_p, g_n, g_anchors = gathered[1:]
    emb = p.reshape(-1, d)  # (T*K, d)
    valid = ids = has_id = None
    if neg is not None:
        emb = torch.cat([emb, neg.reshape(-1, d)])  # (T*(K+M), d)
        if mask is not None:
            valid = torch.cat([mask.new_ones(total * k), mask.reshape(-1)])
    if pid is not None and nid is not None and has_nid is not None:
        ids = torch.cat([pid.reshape(-1), nid.reshape(-1)])
        has_id = torch.cat([has_nid.new_ones(pid.numel()), has_nid.reshape(-1)])
    g_pool = None
    if g_p is not None:
        g_pool = g_p.flatten(0, 1) if g_n is None else torch.cat([g_p.flatten(0, 1), g_n.flatten(0, 1)])
    pool = Pool(emb, valid, ids, has_id, offset, total, m)
    return Context(None, pool, anchors, None, g_pool, g_anchors)
