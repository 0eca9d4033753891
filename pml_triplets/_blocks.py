"""The dense engine's math: one chunk of anchors, its candidates as named blocks, each block to a log-sum-exp.

Term (i, k) is ``-log(e^pos / (e^pos + Σ_c e^{logit(c)}))`` over the candidates of every block that enters its
softmax. A block is a set of candidates with its logits, what it excludes, and the guide similarities the
false-negative filter compares (sentence-transformers' named ``sim_matrices``, one per block):

=========================  ===========  =====================================================================
block                      logits       candidates
=========================  ===========  =====================================================================
``own``                    (C, M)       the anchor's own negatives, minus masked ones and id clashes
``shared``                 (C, S)       every shared negative, minus id clashes
``in_batch``               (C, R)       every row's positives and negatives, minus the anchor's own row
``anchor_to_anchor``       (C, T)       every other anchor
``positive_to_anchor``     (C, K, T)    every other anchor, seen from the positive p_ik
``positive_to_positive``   (C, K, R)    the other rows' candidates, seen from the positive p_ik
=========================  ===========  =====================================================================

``block_lse`` applies to any block, in order, hardness (by block kind), exclusion, the guide filter and the
log-sum-exp; ``chunk_loss`` combines the blocks per ``partition``. The logits are never concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._compat import is_compiling, transformed
from ._inputs import Temperature
from ._options import A2A, P2A, P2P, Options

__all__: list[str] = []  # private module

# Which blocks each hardness_mode weighs (anchor-to-positive blocks only).
_HARDENED = {"own": ("own", "all"), "in_batch": ("in_batch", "all"), "shared": ("all",)}
_A2P = ("own", "shared", "in_batch")  # the anchor-to-positive blocks


@dataclass(frozen=True)
class Rows:
    """One chunk of C anchors and what belongs to them; every field is split along dim 0.

    A field named as a per-row field of ``_inputs.Inputs`` that the layout does not derive (``_engine._PASSED``)
    arrives as the caller gave it (checked, cast): a new per-row input is a field here and its use, no layout code.
    """

    anchors: torch.Tensor  # (C, d)
    positives: torch.Tensor  # (C, K, d)
    negatives: torch.Tensor | None  # (C, M, d)
    valid: torch.Tensor | None  # (C, M) the mask minus id clashes with the anchor's own positives
    rows: torch.Tensor  # (C,) global row of each anchor (its index among every rank's rows)
    own: torch.Tensor | None  # (C, K + M) pool columns of the anchor's own row (in-batch only)
    positive_ids: torch.Tensor | None  # (C, K)
    ga: torch.Tensor | None  # (C, g) guide embeddings, unit rows, for false-negative filtering
    gp: torch.Tensor | None  # (C, K, g)
    gn: torch.Tensor | None  # (C, M, g)
    teacher_scores: torch.Tensor | None = None  # (C, K + M) the teacher's scores of the own group, for distillation

    def split(self, size: int) -> list[Rows]:
        names = [f.name for f in fields(self)]
        count = -(-self.anchors.shape[0] // size)
        parts = [[None] * count if v is None else torch.split(v, size) for v in map(self.__getattribute__, names)]
        return [Rows(**dict(zip(names, chunk, strict=True))) for chunk in zip(*parts, strict=True)]


@dataclass(frozen=True)
class Context:
    """What every chunk compares with: shared negatives, the in-batch pool, every anchor; and their guides."""

    shared: torch.Tensor | None  # (S, d)
    g_shared: torch.Tensor | None  # (S, g)
    shared_ids: torch.Tensor | None = None  # (S,) item ids of the shared negatives
    shared_unused: torch.Tensor | None = None  # (S,) shared rows that are no negative (a queue's empty slots)
    pool: torch.Tensor | None = None  # (R, d): every row's K positives, then every row's M negatives (R = T*(K + M))
    pool_excluded: torch.Tensor | None = None  # (R,) negatives no anchor may use (masked, or clashing everywhere)
    pool_ids: torch.Tensor | None = None  # (R,) item ids (-1, unknown, for negatives without)
    g_pool: torch.Tensor | None = None  # (R, g)
    anchors: torch.Tensor | None = None  # (T, d) every row's anchor, for the directions that contrast anchors
    g_anchors: torch.Tensor | None = None  # (T, g)
    margins: torch.Tensor | None = None  # () margin_mse: the batch's mean candidate negatives per anchor (masks)


@dataclass(frozen=True)
class Block:
    """Candidates of a chunk's terms: logits, which ones are not candidates, and their guide similarities."""

    logits: torch.Tensor  # (C, X), the same for every positive k, or (C, K, X)
    own: torch.Tensor | None  # (C, J) or (C, K, J): columns of the anchor's own row, never its candidates here
    excluded: torch.Tensor | None  # bool, broadcastable to the logits
    guide: torch.Tensor | None  # (C, X) or (C, K, X): guide cosine of the block's query with each candidate


def chunk_loss(opts: Options, k: int, tau: Temperature, r: Rows, ctx: Context) -> torch.Tensor:
    """The (C*K,) losses of one chunk's terms, anchor-major."""
    sim = opts.similarity
    fill = torch.finfo(r.anchors.dtype).min  # finite: an anchor with no negatives gets loss 0 and zero (not NaN) grads
    raw = ctx.pool is None and sim.fused  # anchors and their own rows as given: the similarity normalizes them
    # With a linear similarity, 1/τ is folded into the queries: (C, d) divisions instead of one per logit.
    scale = None if sim.linear else tau
    qp = (
        r.positives / tau if sim.linear and (P2P in opts.directions or P2A in opts.directions) else r.positives
    )  # (as queries)
    memo: list[torch.Tensor] = []

    def queries() -> torch.Tensor:  # the anchors as queries, made when a block first compares them (raw: shared)
        if not memo:
            a = sim.normalize(r.anchors) if raw else r.anchors
            memo.append(a / tau if scale is None else a)
        return memo[0]

    def logits(s: torch.Tensor) -> torch.Tensor:
        return s if scale is None else s / scale

    if ctx.pool is not None and k == 1 and opts.plain and ctx.pool_ids is None and ctx.shared is None:
        return _plain_in_batch(logits(sim.block(queries(), ctx.pool)), r, ctx, fill)
    pos, neg = group_logits(opts, tau, r, None if raw else queries)  # (C, K), (C, M)
    term = None if opts.distillation is None else distilled(opts, tau, pos, neg, r, ctx)  # (C,)

    def total(losses: torch.Tensor) -> torch.Tensor:  # (C*K,): weight × InfoNCE + each anchor's share of the term
        if term is None:
            return losses
        return (opts.infonce_weight * losses.reshape(-1, k) + term[:, None]).reshape(-1)

    if neg is not None and ctx.pool is None and ctx.shared is None and r.valid is None and opts.plain:
        return _nll(pos, block_lse(Block(neg, None, None, None), None, None, fill)).reshape(-1)  # the one block
    cand = None if ctx.pool is None else logits(sim.block(queries(), ctx.pool))  # (C, R) the in-batch block's logits
    strength, tau_value = opts.hardness_strength, tau.detach() if isinstance(tau, torch.Tensor) else tau
    limit, g_in_batch = _guides(opts, k, r, ctx, pos, cand, tau_value)
    lses: dict[str, torch.Tensor] = {}  # block -> (C, K) or (C, 1) log-sum-exp of its candidates
    masses: list[Mass] = []  # the debiased family: the anchor-to-positive blocks' parts of its estimator
    for name, block in _blocks(opts, logits, neg, queries, qp, r, ctx, cand, g_in_batch):
        if opts.debiased and name in _A2P:  # (only with anchor_to_positive, joint, no hardness, no filter: checked)
            masses.append(mass_of(block, opts.hcl_beta, fill))
            continue
        hard = opts.hardness_mode in _HARDENED.get(name, ())
        lses[name] = block_lse(block, limit, strength * tau_value if hard else None, fill)
    if masses:
        return total(debiased_nll(opts, tau_value, pos, masses, fill).reshape(-1))
    a2p = [lses.pop(name) for name in _A2P if name in lses]
    if opts.partition == "per_direction":  # one softmax per direction, each holding the positive once, averaged
        parts = [_combine(a2p, pos, fill), *([lses[P2A]] if P2A in lses else [])]
        return total(torch.stack([_nll(pos, lse) for lse in parts]).mean(0).reshape(-1))
    extra = [pos] if P2A in lses else []  # positive_to_anchor holds the positive pair a second time
    return total(_nll(pos, _combine([*a2p, *lses.values(), *extra], pos, fill)).reshape(-1))


def distilled(
    opts: Options, tau: Temperature, pos: torch.Tensor, neg: torch.Tensor | None, r: Rows, ctx: Context
) -> torch.Tensor:
    """(C,) each anchor's share of the distillation term, from its group's logits ``s/τ`` (``group_logits``).

    The group: the K positives, then the candidate negatives (``r.valid``); ``r.teacher_scores`` (C, K + M) in the
    same order, constants, read only where ``r.valid`` holds (a masked entry may hold NaN). Each share is added to
    the anchor's K per-pair losses, so that their mean over the N·K pairs is the term:

        "kl":          share_i = τ_s² Σ_c T_ic (log T_ic − log S_ic)    (mean over anchors: the batchmean KL)
        "margin_mse":  share_i = Σ_{k,m} ((s_ik − s_im) − (t_ik − t_im))² / (K · V̄)

    with V̄ the batch's mean number of candidate negatives per anchor (``ctx.margins``; M without masks): the term
    is the mean over every (i, k, m) triple of the batch, which is not the mean of per-anchor means when the
    anchors' counts differ.
    """
    assert r.teacher_scores is not None  # (prepare: given exactly with distillation)
    t, k = r.teacher_scores.detach(), pos.shape[1]
    keep = None if r.valid is None else torch.cat([r.valid.new_ones(pos.shape), r.valid], dim=1)  # (C, K + M)
    if keep is not None:  # a masked entry may hold anything (NaN): zeroed before it meets τ's gradient
        t = torch.where(keep, t, 0.0)
    if opts.distillation == "kl":
        s = pos if neg is None else torch.cat([pos, neg], dim=1)  # (C, K + M) student logits s/τ_s
        tau_t = tau if opts.teacher_temperature is None else opts.teacher_temperature
        t = t / tau_t
        if keep is not None:  # out of both softmaxes
            fill = torch.finfo(s.dtype).min
            s, t = s.masked_fill(~keep, fill), t.masked_fill(~keep, fill)
        log_t = torch.log_softmax(t, dim=1)
        kl = log_t.exp() * (log_t - torch.log_softmax(s, dim=1))  # T = 0 (masked, or underflowed): counts 0
        if keep is not None:
            kl = torch.where(keep, kl, 0.0)
        return tau * tau * kl.sum(1)
    if neg is None or neg.shape[1] == 0:
        return pos.new_zeros(pos.shape[0])
    # Student margins in raw similarities: the logits' differences times τ (margin_mse has no temperature). The
    # product saves the fresh difference, not ``neg``, which the own block's log-sum-exp then masks in place.
    err = (pos[:, :, None] - neg[:, None, :]) * tau - (t[:, :k, None] - t[:, None, k:])  # (C, K, M)
    if r.valid is not None:
        err = err * r.valid[:, None, :]
    margins = neg.shape[1] if ctx.margins is None else ctx.margins
    return err.square().sum((1, 2)) / (k * margins)


def group_logits(
    opts: Options, tau: Temperature, r: Rows, queries: Callable[[], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits of each anchor's own group: ``s(a_i, p_ik)/τ`` (C, K) and ``s(a_i, n_im)/τ`` (C, M) or None.

    The seam for a term that needs the group's distribution (a softmax over [positives, negatives], as open_clip's
    ``get_logits`` serves ``DistillClipLoss``): the same numbers the InfoNCE terms use, before hardness, exclusion
    (``r.valid`` says which negatives are candidates) and the filter. ``queries``: the anchors as queries (unit
    rows, divided by τ for a linear similarity), shared with the other blocks; ``None``: ``r`` holds the anchors
    and rows as given, and the similarity normalizes them on the fly (``sim.fused``), in one call.
    """
    sim, rows = opts.similarity, [r.positives] if r.negatives is None else [r.positives, r.negatives]
    if queries is None:  # one call; a number 1/τ scales its (C, J) outputs, a tensor τ divides them
        if isinstance(tau, torch.Tensor):
            own = [x / tau for x in sim.raw_rows(r.anchors, rows)]
        else:
            own = sim.raw_rows(r.anchors, rows, 1.0 / tau)
    else:  # (a linear similarity's queries hold 1/τ already)
        own = [sim.rows(queries(), x) if sim.linear else sim.rows(queries(), x) / tau for x in rows]
    return own[0], own[1] if len(own) > 1 else None


def block_lse(block: Block, limit: torch.Tensor | None, hardness: Temperature | None, fill: float) -> torch.Tensor:
    """(C, K) or (C, 1) log-sum-exp of a block's candidates, after hardness, exclusion and the guide filter.

    ``hardness``: ``strength * τ`` when the block is weighed: ``logit + strength * s(q, c).detach()``, where
    ``s = logit * τ``. ``limit`` (C, K): a candidate whose guide similarity exceeds it is dropped for term k.
    """
    x, drop = block.logits, block.excluded
    if hardness is not None:
        x = x + hardness * x.detach()
    # In place where that is free: nothing saved the logits (the similarity's matmul saves its inputs, a
    # division by τ its operands), and a view would make autograd copy its whole base back (CopySlices).
    in_place = not is_compiling() and not x._is_view()  # (the compiler decides for itself)
    if block.own is not None:  # C*J writes, not a pass over the block
        x = x.scatter_(-1, block.own, fill) if in_place else x.scatter(-1, block.own, fill)
        in_place = True
    if limit is not None and block.guide is not None:
        g = block.guide if block.guide.ndim == 3 else block.guide[:, None, :]  # (C, K or 1, X)
        over = g > limit[..., None]  # (C, K, X)
        drop = over if drop is None else over | (drop if drop.ndim == 3 else drop[:, None, :])
        if x.ndim == 2:
            x, in_place = x[:, None, :], False  # (C, 1, X)
    if drop is not None:
        x = x.masked_fill_(drop, fill) if in_place and drop.shape == x.shape else x.masked_fill(drop, fill)
    if is_compiling() or transformed() or x.numel() < _SMALL_BLOCK:
        return torch.logsumexp(x, dim=-1, keepdim=x.ndim == 2)
    lse: torch.Tensor = _LogSumExp.apply(x)  # type: ignore[no-untyped-call]
    return lse if lse.ndim == 2 else lse[:, None]


_SMALL_BLOCK = 1 << 16  # logits: below it, autograd's own log-sum-exp (no Python backward, 2 spare tensors are KBs)


class _LogSumExp(torch.autograd.Function):
    """``logsumexp(x, -1)`` whose backward allocates one tensor of x's size, not three.

    Autograd's ``grad * (x - lse).exp()`` holds two temporaries of x's size at once beside x; ``softmax(x)`` is the
    same ``exp(x - lse)`` in one fused pass, scaled in place. With a shared block of 65,536 queued rows this is the
    difference between 1.27x and 1.0x the direct formula's peak memory; its forward rule (eager forward AD) is
    ``Σ softmax(x) · ẋ``. (Compiled code and torch.func transforms use ``torch.logsumexp``: the compiler fuses it,
    the transforms need no custom rule.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # (the calling convention whose apply binds no signature)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return torch.logsumexp(x, dim=-1)

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (torch.softmax(x, dim=-1) * t).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        weights = torch.softmax(x, dim=-1)
        # In place unless the backward is itself recorded (create_graph): softmax saved its output for that graph.
        return weights * grad[..., None] if torch.is_grad_enabled() else weights.mul_(grad[..., None])


def _blocks(
    opts: Options,
    logits: Callable[[torch.Tensor], torch.Tensor],
    own_logits: torch.Tensor | None,
    queries: Callable[[], torch.Tensor],
    qp: torch.Tensor,
    r: Rows,
    ctx: Context,
    cand: torch.Tensor | None,
    g_in_batch: torch.Tensor | None,
) -> Iterator[tuple[str, Block]]:
    """The chunk's candidate blocks, built one at a time (each is reduced before the next one exists)."""
    sim, k = opts.similarity, r.positives.shape[1]
    own_guide = opts.false_negative_margin is not None and r.ga is None  # the guide's cosines are the logits

    def block(x: torch.Tensor, own: torch.Tensor | None, excluded: torch.Tensor | None, g: torch.Tensor | None
              ) -> Block:  # fmt: skip
        return Block(x, own, excluded, x.detach() if own_guide else g)

    if own_logits is not None:
        g = None if r.gn is None or r.ga is None else torch.bmm(r.gn, r.ga[:, :, None]).squeeze(-1)  # (C, M)
        yield "own", block(own_logits, None, None if r.valid is None else ~r.valid, g)
    if ctx.shared is not None:
        g = None if ctx.g_shared is None or r.ga is None else r.ga @ ctx.g_shared.T  # (C, S)
        yield "shared", block(logits(sim.block(queries(), ctx.shared)), None, shared_excluded(r, ctx), g)
    if ctx.pool is not None and cand is not None and r.own is not None:
        excluded = pool_excluded(r, ctx, own_row=False)  # (C, R) or None
        yield "in_batch", Block(cand, r.own, excluded, g_in_batch)
        if P2P in opts.directions:
            g = None if ctx.g_pool is None or r.gp is None else r.gp @ ctx.g_pool.T  # (C, K, R)
            pp = logits(sim.block(qp.flatten(0, 1), ctx.pool)).unflatten(0, (-1, k))  # (C, K, R)
            own = r.own[:, None, :].expand(-1, k, -1)  # (C, K, K + M)
            yield P2P, block(pp, own, None if excluded is None else excluded[:, None, :], g)
    if ctx.anchors is not None:
        if A2A in opts.directions:
            g = None if ctx.g_anchors is None or r.ga is None else r.ga @ ctx.g_anchors.T  # (C, T)
            yield A2A, block(logits(sim.block(queries(), ctx.anchors)), r.rows[:, None], None, g)
        if P2A in opts.directions:  # its own anchor is the positive pair: counted apart
            g = None if ctx.g_anchors is None or r.gp is None else r.gp @ ctx.g_anchors.T  # (C, K, T)
            pa = logits(sim.block(qp.flatten(0, 1), ctx.anchors)).unflatten(0, (-1, k))  # (C, K, T)
            yield P2A, block(pa, r.rows[:, None, None].expand(-1, k, 1), None, g)


def same_item(ids: torch.Tensor, positive_ids: torch.Tensor) -> torch.Tensor:
    """``ids == positive_ids`` (broadcast), where the positive id is known: a negative id clashes with nothing.

    Negative ids are moved apart first (candidates' to -1, positives' to -2; both operands are small), so that the
    broadcast result costs one comparison, as plain equality does.
    """
    return ids.clamp_min(-1) == positive_ids.masked_fill(positive_ids < 0, -2)


def shared_excluded(r: Rows, ctx: Context) -> torch.Tensor | None:
    """(C, S) bool: shared rows that are not the anchor's negatives (unused, or an id clash), or None for none."""
    out = None if ctx.shared_unused is None else ctx.shared_unused[None, :].expand(r.anchors.shape[0], -1)
    if ctx.shared_ids is not None and r.positive_ids is not None:
        clash = same_item(ctx.shared_ids[None, :, None], r.positive_ids[:, None, :]).any(-1)  # (C, S)
        out = clash if out is None else out | clash
    return out


def pool_excluded(r: Rows, ctx: Context, own_row: bool = True) -> torch.Tensor | None:
    """(C, R) bool: which pool candidates are not the anchor's in-batch negatives, or None for none.

    Masked negatives, candidates with the id of one of its positives, and (``own_row``) its own row: its
    positives are numerators, its negatives its own block.
    """
    out = None if ctx.pool_excluded is None else ctx.pool_excluded[None, :].expand(r.rows.shape[0], -1)
    if ctx.pool_ids is not None and r.positive_ids is not None:
        clash = same_item(ctx.pool_ids[None, :, None], r.positive_ids[:, None, :]).any(-1)  # (C, R)
        out = clash if out is None else out | clash
    if own_row and ctx.pool is not None and r.own is not None:
        mine = torch.zeros(r.rows.shape[0], ctx.pool.shape[0], dtype=torch.bool, device=r.rows.device)
        out = mine.scatter_(1, r.own, True) if out is None else out.scatter(1, r.own, True)
    return out


def _guides(
    opts: Options, k: int, r: Rows, ctx: Context, pos: torch.Tensor, cand: torch.Tensor | None, tau: Temperature
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The false-negative filter's (C, K) limits and the in-batch block's (C, R) guide similarities.

    A candidate of term (i, k) whose guide similarity exceeds ``limit[i, k]`` is dropped; both are None without
    filtering. Without a guide (``r.ga`` None: the model's own cosines), the logits ``cos / τ`` are the guide
    similarities and the limit is in their units. The positive's similarity is read from the in-batch block, where
    the positives are columns: the same products as every candidate's, so a tie stays a tie.
    """
    if opts.false_negative_margin is None:
        return None, None
    margin: Temperature = opts.false_negative_margin
    if r.ga is None:
        g_in_batch, g_pos, margin = None if cand is None else cand.detach(), pos.detach(), margin / tau
    else:
        assert r.gp is not None
        g_in_batch = None if ctx.g_pool is None else r.ga @ ctx.g_pool.T  # (C, R)
        g_pos = torch.bmm(r.gp, r.ga[:, :, None]).squeeze(-1)  # (C, K)
    if g_in_batch is not None:
        g_pos = g_in_batch.gather(1, r.rows[:, None] * k + torch.arange(k, device=r.rows.device))  # (C, K)
    absolute = opts.margin_strategy == "absolute"
    return g_pos - (margin if absolute else g_pos.abs() * opts.false_negative_margin), g_in_batch


def _plain_in_batch(cand: torch.Tensor, r: Rows, ctx: Context, fill: float) -> torch.Tensor:
    """K = 1 in-batch InfoNCE as one cross-entropy over the pool (C, R), the positive in its own column.

    log_softmax's fused backward keeps one (C, R) tensor fewer alive than log-sum-exp minus the positive; the
    anchor's own negatives are pool columns like the others'.
    """
    if ctx.pool_excluded is not None:
        cand.masked_fill_(ctx.pool_excluded, fill)  # in place: the matmul did not save its output
    return F.cross_entropy(cand, r.rows, reduction="none")  # (C,): row i's positive is pool column i when K = 1


def _combine(lses: list[torch.Tensor], pos: torch.Tensor, fill: float) -> torch.Tensor:
    """(C, K) log-sum-exp across blocks, each (C, K) or (C, 1); ``fill`` when there is none."""
    if not lses:
        return torch.full_like(pos, fill)
    if len(lses) == 1:
        return lses[0]
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(*lses), dim=-1), dim=-1)


class Mass(NamedTuple):
    """One anchor-to-positive block's part of the debiased family's estimator (β = ``hcl_beta``)."""

    weighted: torch.Tensor  # (C, 1) log Σ_c e^{(1+β) L_c} over the block's candidates (log Σ_c e^{L_c} at β = 0)
    weights: torch.Tensor | None  # (C, 1) log Σ_c e^{β L_c}, None at β = 0
    candidates: torch.Tensor  # (C,) its candidates: columns not excluded (masks, id clashes, the anchor's own row)


def mass_of(block: Block, beta: float, fill: float) -> Mass:
    """The block's ``Mass``: log-sum-exps of its scaled logits (``block_lse``: the same exclusions) and its count."""
    if beta == 0:
        return Mass(block_lse(block, None, None, fill), None, _count(block))
    weighted = block_lse(replace(block, logits=block.logits * (1 + beta)), None, None, fill)  # (fresh tensors:
    weights = block_lse(replace(block, logits=block.logits * beta), None, None, fill)  # block_lse writes in them)
    return Mass(weighted, weights, _count(block))


def _count(block: Block) -> torch.Tensor:
    """(C,) the block's candidates per anchor: its columns minus the excluded ones and the anchor's own row."""
    c, x = block.logits.shape[0], block.logits.shape[-1]
    if block.own is None:
        return torch.full((c,), x, device=block.logits.device) if block.excluded is None else (~block.excluded).sum(-1)
    out = torch.zeros(c, x, dtype=torch.bool, device=block.logits.device).scatter_(1, block.own, True)  # (C, X)
    return x - (out if block.excluded is None else out | block.excluded).sum(-1)


def debiased_nll(opts: Options, tau: Temperature, pos: torch.Tensor, masses: list[Mass], fill: float) -> torch.Tensor:
    """(C, K) terms of the debiased family; n the anchor's candidates, P = ``pos``, τ⁺ and β the options.

        R = n Σ_c w_c e^{L_c} / Σ_c w_c,  w_c = e^{β L_c}        (Σ_c e^{L_c} at β = 0)
        G = max((R − n τ⁺ e^P) / (1 − τ⁺), n e^{−1/τ})            (G = R at τ⁺ = 0; a clamped G is a constant)
        ℓ = log(e^P + G) − P,   or  log G − P  when decoupled;   ℓ = 0 for an anchor without candidates

    In log space: log R = log n + lse((1+β) L) − lse(β L), and the difference as
    ``log R + log1p(−τ⁺ e^{P + log n − log R}) − log1p(−τ⁺)``, taken only where its argument is < 1 (elsewhere G
    is the clamp), so that no branch of the selections overflows. ``tau`` is detached (the clamp is a constant).
    """
    n = torch.stack([m.candidates for m in masses]).sum(0)[:, None].to(pos.dtype)  # (C, 1)
    some = n > 0
    log_n = n.clamp_min(1).log()  # (an anchor without candidates: any finite value, its term is 0)
    log_r = _combine([m.weighted for m in masses], pos, fill)  # (C, 1)
    if opts.hcl_beta != 0:
        log_r = log_n + log_r - _combine([m.weights for m in masses if m.weights is not None], pos, fill)
    log_g = log_r
    prior = opts.debias_prior
    if prior != 0:
        excess = pos + log_n - log_r  # (C, K) log(n e^P / R): G > 0 exactly where τ⁺ e^excess < 1
        below = excess < -math.log(prior)
        safe = torch.where(below, excess, torch.full_like(excess, -math.inf))
        unclamped = log_r + torch.log1p(-prior * safe.exp()) - math.log1p(-prior)
        bound = log_n - 1 / tau  # (C, 1) log(n e^{−1/τ})
        log_g = torch.where(below & (unclamped >= bound), unclamped, bound)
    terms = log_g - pos if opts.decoupled else _nll(pos, log_g)
    return torch.where(some, terms, torch.zeros_like(terms))


def _nll(pos: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # -log(e^pos / (e^pos + Σ e^neg)) = softplus(lse(neg) - pos): exact, no overflow, no tiny added. threshold=40:
    # above it softplus returns x alone, dropping log1p(e^-x) < 5e-18 (below float64's resolution).
    return F.softplus(lse - pos, threshold=40.0)
