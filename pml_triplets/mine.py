"""Exact hard-negative mining over a corpus: the step that makes predefined triplets.

For each query, the negatives are the corpus items most similar to it (the loss's similarity: cosine by default)
that survive the filters, after skipping the ``range_min`` hardest survivors -- sentence-transformers 6.2
``util.mine_hard_negatives``' conventions on embeddings instead of texts. The search is exact and tiled as FAISS's
``IndexFlatIP`` blocks it: corpus tiles × query tiles, the filters applied inside each tile before a running top-k
per query, so nothing is lost and the ``(Q, C)`` score matrix never exists (memory linear in ``Q + C``).

Where it differs from sentence-transformers' miner (``docs/how-to/mine-negatives.md`` has the table; the slow test
in ``tests/test_mine.py`` runs theirs on the same embeddings):

* inputs are embeddings and corpus indices: nothing is deduplicated or embedded; ``exclude_ids`` is new;
* ``range_max`` counts candidates that survive the filters, and ``None`` is the whole corpus; theirs counts raw
  ranks (``range_max + max_positives`` nearest items, filtered afterwards; without one, ``range_min + 10·M +
  max_positives`` with a margin or ``max_score``, else ``range_min + M + max_positives``), so queries come short.
  The two agree where their window covers the corpus;
* equal scores go to the lower corpus id (theirs: ``torch.topk``'s unspecified order);
* a query with fewer than ``M`` negatives keeps its row, ``-1`` / ``False`` where missing (theirs drops the row in
  the "n-tuple" format);
* random draws come from a ``torch.Generator`` and do not depend on tiles (theirs: Python's global ``random``);
* the score is the loss's similarity (``loss_fn``'s distance); theirs normalizes and uses ``model.similarity``;
* no cross-encoder rescoring, ``include_positives`` or output formats.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from pytorch_metric_learning.losses import NTXentLoss

from ._similarity import Similarity
from ._validation import _floating, _shape, _tensor

__all__ = ["MinedNegatives", "mine_negatives"]

Sampling = Literal["top", "random"]

_TILE_ELEMENTS = 1 << 24  # scores of one (query tile, corpus tile) block: 64 MB in float32
_QUERY_TILE = 1024
_LAST = torch.iinfo(torch.int64).max  # the id of a missing candidate while the window is put in id order


class MinedNegatives(NamedTuple):
    """The negatives mined for ``Q`` queries, ``M = num_negatives`` columns, hardest first.

    Attributes:
        ids: ``[Q, M]`` int64 corpus indices, ``-1`` where a query has fewer than ``M`` negatives.
        scores: ``[Q, M]`` their similarity to the query, in the inputs' dtype; ``-inf`` where ``ids`` is ``-1``.
        mask: ``[Q, M]`` bool, ``True`` for a real negative (``ids >= 0``).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    """One checked call: the inputs, the similarity, the filters and the tiles."""

    queries: torch.Tensor  # (Q, d)
    corpus: torch.Tensor  # (C, d)
    m: int
    positive_ids: torch.Tensor  # (Q, P)
    banned: torch.Tensor  # (Q, P + E): never a negative
    range_min: int
    range_max: int | None
    max_score: float | None
    min_score: float | None
    absolute_margin: float | None
    relative_margin: float | None
    sampling: Sampling
    draws: torch.Tensor | None  # (M, Q) uniform in [0, 1), float64: the random draws' only randomness
    sim: Similarity
    work: torch.dtype
    query_chunk: int
    corpus_chunk: int

    @property
    def margins(self) -> bool:
        return self.absolute_margin is not None or self.relative_margin is not None


def mine_negatives(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    num_negatives: int,
    *,
    positive_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None = None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    sampling: Sampling = "top",
    generator: torch.Generator | None = None,
    loss_fn: NTXentLoss | None = None,
    query_chunk: int | None = None,
    corpus_chunk: int | None = None,
    progress: bool = False,
    index: Any = None,
) -> MinedNegatives:
    """Mine ``num_negatives`` hard negatives per query from a corpus, exactly, in memory linear in ``Q + C``.

    With ``s(q, c)`` the similarity as the loss sees it (``loss_fn``'s distance: the cosine by default; a distance
    such as ``LpDistance`` enters negated, ``s = -d``), a corpus item ``c`` is a *candidate* of query ``q`` unless

    * ``c`` is one of ``positive_ids[q]`` or ``exclude_ids[q]``;
    * ``s(q, c) + absolute_margin > pos(q)``, with ``pos(q)`` the query's lowest positive score;
    * ``s(q, c) > pos(q) − |pos(q)| · relative_margin``;
    * ``s(q, c) > max_score`` or ``s(q, c) < min_score``.

    The candidates are ranked by score, highest first (equal scores: the lower corpus index first). The window is
    ranks ``[range_min, range_max)`` of that ranking (``range_max=None``: every candidate, the whole corpus).
    ``sampling="top"`` takes the first ``M = num_negatives`` of the window, ``"random"`` a uniformly random subset of
    ``min(M, window size)`` of it, listed hardest first. A query without any positive id (all ``-1``) has no
    margin threshold: the margins drop nothing for it.

    ``"random"`` never materializes the window: a first pass over the corpus counts each query's window members
    ``n``, Floyd's algorithm picks ``M`` distinct positions in ``[0, n)`` uniformly from ``M·Q`` draws of
    ``generator`` (torch's global generator when ``None``; always ``M·Q`` draws), and a second pass finds the members
    at those positions, counted in corpus order -- a uniformly random subset, the same whatever the tiles, and the
    same for any ``range_max`` that holds the whole window.

    Memory: the queries normalized, one tile of ``query_chunk × corpus_chunk`` scores (about 16 M by default; 64 MB
    in float32) and a running top-``(range_min + M)`` per query (``range_max`` for ``"random"`` with a
    ``range_max``): ``O(Q·(d + range_min + M) + tile)`` beyond the inputs, never ``O(Q·C)``. Each corpus row is
    normalized once per pass. The inputs stay on their device; float16/bfloat16 inputs are scored in float32; no
    gradient is recorded.

    With ``index`` (a FAISS index over the corpus rows normalized as the similarity normalizes them -- unit rows for
    the cosine -- in corpus order), the index is searched for a window of ``range_max + P + E`` candidates per query
    (``P``, ``E``: the widths of ``positive_ids`` and ``exclude_ids``; ``range_max=None``: sentence-transformers' rule,
    ``range_min + 10·M`` with a margin or ``max_score``, else ``range_min + M``), their exact scores are recomputed
    from ``corpus`` and the filters applied: a query whose window holds too few candidates gets fewer negatives
    (the gap exact search does not have); ``"random"`` draws from what survives of that window. An approximate index
    proposes approximate candidates.

    Args:
        queries: ``[Q, d]`` query embeddings.
        corpus: ``[C, d]`` corpus embeddings, same dtype and device.
        num_negatives: ``M >= 1``, the columns of the result.
        positive_ids: ``[Q]`` or ``[Q, P]`` corpus indices of each query's positives; negative values pad.
        exclude_ids: ``[Q, E]`` corpus indices that are never the query's negatives (near-duplicates); negative
            values pad.
        range_min: skip this many of the highest-scoring candidates.
        range_max: the window's end rank among the candidates (at least ``range_min + num_negatives``); ``None``:
            every candidate.
        max_score: drop candidates scoring above it.
        min_score: drop candidates scoring below it.
        absolute_margin: drop candidates with ``score + absolute_margin > pos``.
        relative_margin: drop candidates with ``score > pos − |pos| · relative_margin``.
        sampling: ``"top"`` (the hardest of the window) or ``"random"`` (uniform over the window).
        generator: a ``torch.Generator`` for ``"random"`` (``M·Q`` draws); reproducible given its state.
        loss_fn: the ``NTXentLoss`` whose distance defines the similarity (its temperature is not used).
        query_chunk: queries per tile; ``None``: automatic.
        corpus_chunk: corpus rows per tile; ``None``: automatic (about 4 M scores per tile).
        progress: show a tqdm progress bar.
        index: a FAISS index over the corpus, searched instead of the exact tiles (see above).

    Returns:
        ``MinedNegatives(ids [Q, M] int64, scores [Q, M], mask [Q, M] bool)``, on the inputs' device. It plugs into
        the loss as ``infonce(q, corpus[pos], corpus[ids.clamp_min(0)], negatives_mask=mask, positive_ids=pos,
        negative_ids=ids)``.

    Raises:
        TypeError: a non-tensor or non-floating embedding, embeddings of two dtypes, ids that are not integers, an
            option of the wrong type.
        ValueError: shapes or devices that disagree, ids out of range, ``num_negatives < 1``, a window smaller than
            ``num_negatives``, non-finite embeddings, an index whose size or width differs from the corpus.

    Example:
        >>> import torch, pml_triplets as pt
        >>> corpus = torch.eye(4)  # four orthogonal items
        >>> corpus[3] = torch.tensor([0.9, 0.1, 0.0, 0.0])  # item 3 is close to item 0
        >>> mined = pt.mine_negatives(corpus[:1], corpus, 2, positive_ids=torch.tensor([0]))
        >>> mined.ids.tolist(), mined.mask.tolist()
        ([[3, 1]], [[True, True]])
    """
    plan = _check(queries, corpus, num_negatives, positive_ids, exclude_ids, range_min, range_max, max_score,
                  min_score, absolute_margin, relative_margin, sampling, generator, loss_fn, query_chunk,
                  corpus_chunk)  # fmt: skip
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be a bool; got {type(progress).__name__}")
    if index is not None:
        _check_index(index, plan)
    with torch.no_grad():  # mining is a search, not part of the graph
        ids, scores = _mine(plan, index, progress)
    return MinedNegatives(ids, scores.to(plan.queries.dtype), ids >= 0)


def _mine(plan: _Plan, index: Any, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, scores)`` (Q, M), hardest first, ``-1`` / ``-inf`` where missing."""
    qn = plan.sim.normalize(plan.queries.to(plan.work))  # (Q, d) once: every corpus tile meets every query
    hi = _bounds(plan, qn)
    passes = 1
    if plan.sampling == "random" and plan.range_max is None:
        passes = 3 if plan.range_min > 0 else 2
    bar = _bar(passes * (qn.shape[0] if index is not None else plan.corpus.shape[0])) if progress else None
    if index is not None:
        v, i = _index_candidates(plan, qn, hi, index, bar)  # (Q, K) ranked
        window = plan.range_max if plan.range_max is not None else v.shape[1]
        out = _finish(plan, v[:, plan.range_min : window], i[:, plan.range_min : window])
    elif plan.sampling == "top":
        v, i = _top(plan, qn, hi, plan.range_min + plan.m, bar)
        out = _finish(plan, v[:, plan.range_min :], i[:, plan.range_min :])
    elif plan.range_max is not None:  # a bounded window: keep it whole, then draw from it
        v, i = _top(plan, qn, hi, plan.range_max, bar)
        out = _finish(plan, v[:, plan.range_min :], i[:, plan.range_min :])
    else:
        if plan.range_min > 0:  # the window is every candidate ranked after the range_min-th, the edge
            v, i = _top(plan, qn, hi, plan.range_min, bar)
            edge = v[:, -1:]  # (Q, 1) ranked after it: scoring below it, or as much with a higher id
            cap = edge[:, 0] if hi is None else torch.minimum(hi, edge[:, 0])  # drop what scores above the edge
            level = i.masked_fill(v != edge, -1)  # (Q, range_min) ... and the first range_min at its score
            plan, hi = replace(plan, banned=torch.cat([plan.banned, level], 1)), cap
        v, i = _sample(plan, qn, hi, bar)
        out = i.masked_fill(v == -math.inf, -1), v
    if bar is not None:
        bar.close()
    return out


def _bar(total: int) -> Any:
    from tqdm.auto import tqdm  # a dependency of pytorch-metric-learning

    return tqdm(total=total, desc="mining negatives")


def _tiles(plan: _Plan, qn: torch.Tensor, bar: Any) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """``(q0, q1, c0, c1, normalized corpus tile)``, corpus-major: each corpus row is normalized once."""
    c_total, q_total = plan.corpus.shape[0], qn.shape[0]
    for c0 in range(0, c_total, plan.corpus_chunk):
        c1 = min(c0 + plan.corpus_chunk, c_total)
        cn = plan.sim.normalize(plan.corpus[c0:c1].to(plan.work))  # (ct, d)
        for q0 in range(0, q_total, plan.query_chunk):
            yield q0, min(q0 + plan.query_chunk, q_total), c0, c1, cn
        if bar is not None:
            bar.update(c1 - c0)


# ----------------------------------------------------------------------------------------------------------------
# "top": a running top-k


def _finish(plan: _Plan, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The window ``(v, i)`` (Q, W), ranked: its first M, or M of it at random; then hardest first."""
    if plan.sampling == "random":
        assert plan.draws is not None
        v, i = _by_id(v, i.masked_fill(v == -math.inf, _LAST))  # (Q, W) the window in id order, then the missing
        picks = _subset(plan.draws, (v > -math.inf).sum(1))  # (Q, M) positions in that order
        take = picks.clamp(0, v.shape[1] - 1)
        v = v.gather(1, take).masked_fill(picks < 0, -math.inf)
        v, i = _ranked(v, i.gather(1, take), plan.m)
    v, i = v[:, : plan.m], i[:, : plan.m]
    i = i.masked_fill(v == -math.inf, -1)
    if v.shape[1] < plan.m:  # a window narrower than M (an index that returned fewer)
        pad = plan.m - v.shape[1]
        v = torch.cat([v, v.new_full((v.shape[0], pad), -math.inf)], 1)
        i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], 1)
    return i, v


def _bounds(plan: _Plan, qn: torch.Tensor) -> torch.Tensor | None:
    """``hi`` (Q,): a candidate scoring above it is dropped (the margins and ``max_score``)."""
    hi = None
    if plan.margins and plan.positive_ids.shape[1]:  # no positive: no margin threshold
        parts = []
        for q0 in range(0, qn.shape[0], plan.query_chunk):
            pid = plan.positive_ids[q0 : q0 + plan.query_chunk]  # (qt, P)
            rows = plan.sim.normalize(plan.corpus[pid.clamp_min(0)].to(plan.work))  # (qt, P, d)
            scores = plan.sim.rows(qn[q0 : q0 + plan.query_chunk], rows)  # (qt, P)
            parts.append(scores.masked_fill(pid < 0, math.inf).amin(1))  # the lowest positive score
        pos = torch.cat(parts)  # (Q,)
        has = (plan.positive_ids >= 0).any(1)
        pos = torch.where(has, pos, torch.zeros_like(pos))  # no positive: no threshold (below)
        hi = torch.full_like(pos, math.inf)
        if plan.absolute_margin is not None:
            hi = torch.minimum(hi, pos - plan.absolute_margin)
        if plan.relative_margin is not None:
            hi = torch.minimum(hi, pos - pos.abs() * plan.relative_margin)
        hi = torch.where(has, hi, torch.full_like(hi, math.inf))
    if plan.max_score is not None:
        cap = torch.full((qn.shape[0],), plan.max_score, dtype=plan.work, device=qn.device)
        hi = cap if hi is None else torch.minimum(hi, cap)
    return hi


def _buffer(plan: _Plan, qn: torch.Tensor) -> torch.Tensor | None:
    """One tile's scores, written in place tile after tile where the similarity is a plain product (``None`` else).

    A fresh tile of scores each time costs a quarter of the product itself on the CPU: memory that large comes
    from the system zeroed, page by page.
    """
    d = plan.sim.distance
    if not plan.sim.linear or (d is not None and not d.is_inverted):
        return None
    return qn.new_empty(min(plan.query_chunk, qn.shape[0]) * min(plan.corpus_chunk, plan.corpus.shape[0]))


def _scores(
    plan: _Plan,
    qn: torch.Tensor,
    q0: int,
    q1: int,
    cn: torch.Tensor,
    c0: int,
    hi: torch.Tensor | None,
    buffer: torch.Tensor | None,
) -> torch.Tensor:
    """The scores of queries ``q0:q1`` × the corpus tile at ``c0`` (qt, ct), ``-inf`` where a filter drops one.

    ``buffer``: from ``_buffer``, holds them (overwritten by the next tile).
    """
    ct = cn.shape[0]
    if buffer is None:
        s = plan.sim.block(qn[q0:q1], cn)  # (qt, ct)
    else:
        s = torch.mm(qn[q0:q1], cn.T, out=buffer[: (q1 - q0) * ct].view(q1 - q0, ct))  # (qt, ct)
    if plan.banned.shape[1]:  # amin with +inf leaves a cell as it is: no host sync for the ids outside the tile
        banned = plan.banned[q0:q1] - c0  # (qt, B) columns in this tile
        inside = (banned >= 0) & (banned < ct)
        src = torch.where(inside, -math.inf, math.inf).to(s.dtype)
        s.scatter_reduce_(1, banned.clamp(0, ct - 1), src, reduce="amin")
    if hi is not None:
        s.masked_fill_(s > hi[q0:q1, None], -math.inf)
    if plan.min_score is not None:
        s.masked_fill_(s < plan.min_score, -math.inf)
    return s


def _top(plan: _Plan, qn: torch.Tensor, hi: torch.Tensor | None, k: int, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring candidates (Q, k): scores descending, equal scores by lower id; ``-inf`` pads."""
    v = qn.new_full((qn.shape[0], k), -math.inf)
    i = torch.full((qn.shape[0], k), -1, dtype=torch.int64, device=qn.device)
    buffer = _buffer(plan, qn)
    for q0, q1, c0, c1, cn in _tiles(plan, qn, bar):
        s = _scores(plan, qn, q0, q1, cn, c0, hi, buffer)  # (qt, ct)
        rows = _active(s, v[q0:q1, -1])  # None: every row
        if rows is not None:
            if rows.numel() == 0:
                continue
            s = s[rows]  # (a, ct)
        tv, ti = _tile_top(s, min(k, c1 - c0))
        # the running list holds lower ids than this tile: a stable sort keeps them first among equal scores
        at = slice(q0, q1) if rows is None else rows + q0
        v[at], i[at] = _ranked(torch.cat([v[at], tv], 1), torch.cat([i[at], ti + c0], 1), k)
    return v, i


def _active(s: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``s`` (qt, ct) with a score above their running k-th, ``last`` (qt,); ``None`` for most rows.

    An item scoring at most the running k-th cannot enter: equal scores rank by id, and this tile's ids are higher.
    After the first tiles most rows have none, and a row maximum costs a fraction of a ``topk``.
    """
    rows = (s.amax(1) > last).nonzero()[:, 0]
    return None if rows.numel() * 4 > s.shape[0] * 3 else rows


def _tile_top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row of ``s`` (qt, ct), ties at the cut broken by the lower column, sorted by column.

    ``topk`` keeps an unspecified one of equal values; one more value than needed shows where a tie meets the cut
    (rare outside duplicates), and those rows alone are sorted stably.
    """
    kk = min(k + 1, s.shape[1])
    v, i = s.topk(kk, dim=1)  # (qt, kk)
    if kk > k:
        cut = (v[:, k - 1] == v[:, k]) & (v[:, k - 1] > -math.inf)
        v, i = v[:, :k], i[:, :k]
        if bool(cut.any()):
            rows = cut.nonzero()[:, 0]
            sv, si = s[rows].sort(dim=1, descending=True, stable=True)
            v[rows], i[rows] = sv[:, :k], si[:, :k]
    i, order = i.sort(dim=1)
    return v.gather(1, order), i


def _ranked(v: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of ``(v, i)`` by score descending, keeping the given order among equal scores."""
    v, order = v.sort(dim=1, descending=True, stable=True)
    return v[:, :k], i.gather(1, order)[:, :k]


def _by_id(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, order = i.sort(dim=1)
    return v.gather(1, order), i


# ----------------------------------------------------------------------------------------------------------------
# "random" over an unbounded window: count its members, pick M positions, find them


def _sample(plan: _Plan, qn: torch.Tensor, hi: torch.Tensor | None, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """M of each query's candidates at random (Q, M), hardest first; ``-inf`` / ``-1`` pad.

    Two passes: the first counts the window members ``n`` of each query; ``_subset`` picks M distinct positions in
    ``[0, n)``; the second finds the members at those positions, counting them in corpus order.
    """
    assert plan.draws is not None
    q_total = qn.shape[0]
    n = torch.zeros(q_total, dtype=torch.int64, device=qn.device)
    buffer = _buffer(plan, qn)
    for q0, q1, c0, _, cn in _tiles(plan, qn, bar):
        n[q0:q1] += torch.count_nonzero(_scores(plan, qn, q0, q1, cn, c0, hi, buffer) > -math.inf, dim=1)
    picks = _subset(plan.draws, n)  # (Q, M)
    v = qn.new_full((q_total, plan.m), -math.inf)
    i = torch.full((q_total, plan.m), -1, dtype=torch.int64, device=qn.device)
    before = torch.zeros(q_total, dtype=torch.int64, device=qn.device)  # members in the earlier corpus tiles
    for q0, q1, c0, _, cn in _tiles(plan, qn, bar):
        s = _scores(plan, qn, q0, q1, cn, c0, hi, buffer)  # (qt, ct)
        rank = (s > -math.inf).cumsum(1, dtype=torch.int32)  # (qt, ct): members up to each column
        want = picks[q0:q1] - before[q0:q1, None]  # (qt, M) positions within this tile
        here = (picks[q0:q1] >= 0) & (want >= 0) & (want < rank[:, -1:])
        col = torch.searchsorted(rank, (want + 1).to(torch.int32)).clamp_max(s.shape[1] - 1)  # the member's column
        v[q0:q1] = torch.where(here, s.gather(1, col), v[q0:q1])
        i[q0:q1] = torch.where(here, col + c0, i[q0:q1])
        before[q0:q1] += rank[:, -1]
    return _ranked(v, i, plan.m)


def _subset(draws: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """M distinct positions in ``[0, n)`` per row (Q, M), uniformly: Floyd's algorithm, ``draws`` (M, Q) in [0, 1).

    Where ``n <= M``: all ``n`` positions, then -1.
    """
    m = draws.shape[0]
    picks = torch.full((n.shape[0], m), -1, dtype=torch.int64, device=n.device)
    for t in range(m):  # j = n - M + t; take r uniform in [0, j], or j itself when r was taken
        j = n - m + t
        r = (draws[t] * (j + 1).to(draws.dtype)).long().clamp_max(j)
        picks[:, t] = torch.where((picks[:, :t] == r[:, None]).any(1), j, r)
    everything = torch.arange(m, device=n.device).expand_as(picks)
    picks = torch.where((n <= m)[:, None], everything.masked_fill(everything >= n[:, None], -1), picks)
    return picks.sort(dim=1).values  # ascending: the members come in id order, as ties are ranked


# ----------------------------------------------------------------------------------------------------------------
# a FAISS index


def _index_candidates(
    plan: _Plan, qn: torch.Tensor, hi: torch.Tensor | None, index: Any, bar: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The index's candidates (Q, K), rescored exactly, filtered, ranked."""
    m, b = plan.m, plan.banned.shape[1]
    if plan.range_max is not None:
        window = plan.range_max
    else:  # sentence-transformers' rule
        window = plan.range_min + m * (10 if plan.margins or plan.max_score is not None else 1)
    k = min(window + b, int(index.ntotal))
    vs, is_ = [], []
    for q0 in range(0, qn.shape[0], plan.query_chunk):
        q1 = min(q0 + plan.query_chunk, qn.shape[0])
        _, raw = index.search(qn[q0:q1].to("cpu", torch.float32).contiguous().numpy(), k)
        i = torch.from_numpy(raw).to(device=qn.device, dtype=torch.int64)  # (qt, k), -1 where the index has fewer
        rows = plan.sim.normalize(plan.corpus[i.clamp_min(0)].to(plan.work))  # (qt, k, d)
        v = plan.sim.rows(qn[q0:q1], rows)  # (qt, k) exact scores
        drop = (i < 0) | (i[:, :, None] == plan.banned[q0:q1, None, :]).any(-1)  # (qt, k)
        if hi is not None:
            drop |= v > hi[q0:q1, None]
        if plan.min_score is not None:
            drop |= v < plan.min_score
        v, i = _ranked(*_by_id(v.masked_fill(drop, -math.inf), i), k)
        vs.append(v)
        is_.append(i)
        if bar is not None:
            bar.update(q1 - q0)
    return torch.cat(vs), torch.cat(is_)


def _check_index(index: Any, plan: _Plan) -> None:
    c, d = plan.corpus.shape
    if not (hasattr(index, "search") and hasattr(index, "ntotal") and hasattr(index, "d")):
        raise TypeError(f"`index` must be a FAISS index (with .search, .ntotal and .d); got {type(index).__name__}")
    if int(index.ntotal) != c or int(index.d) != d:
        raise ValueError(
            f"`index` must hold the corpus, [C, d] = [{c}, {d}]; got ntotal={index.ntotal} and d={index.d}"
        )


# ----------------------------------------------------------------------------------------------------------------
# checks


def _check(
    queries: object,
    corpus: object,
    num_negatives: object,
    positive_ids: object,
    exclude_ids: object,
    range_min: object,
    range_max: object,
    max_score: object,
    min_score: object,
    absolute_margin: object,
    relative_margin: object,
    sampling: object,
    generator: object,
    loss_fn: object,
    query_chunk: object,
    corpus_chunk: object,
) -> _Plan:
    q = _tensor("queries", queries)
    c = _tensor("corpus", corpus)
    for name, x in (("queries", q), ("corpus", c)):
        _floating(name, x)
        if x.ndim != 2:
            raise ValueError(f"`{name}` must be [{'Q' if name == 'queries' else 'C'}, d]; got {_shape(x)}")
    if c.shape[1] != q.shape[1]:
        raise ValueError(f"`corpus` must be [C, d] = [C, {q.shape[1]}] (the width of `queries`); got {_shape(c)}")
    if c.dtype != q.dtype:
        raise TypeError(f"`corpus` must have the dtype of `queries`, {q.dtype}; got {c.dtype}")
    if c.device != q.device:
        raise ValueError(f"`corpus` is on {c.device} but `queries` is on {q.device}; move them to one device")
    if q.shape[0] == 0 or c.shape[0] == 0:
        raise ValueError(f"`queries` and `corpus` must not be empty; got {_shape(q)} and {_shape(c)}")
    m = _int("num_negatives", num_negatives, 1)
    lo_rank = _int("range_min", range_min, 0)
    hi_rank = None if range_max is None else _int("range_max", range_max, 1)
    if hi_rank is not None and hi_rank - lo_rank < m:
        raise ValueError(
            f"the window [range_min, range_max) = [{lo_rank}, {hi_rank}) holds {hi_rank - lo_rank} candidates, "
            f"fewer than num_negatives={m}"
        )
    n, size = q.shape[0], c.shape[0]
    pid = _ids("positive_ids", positive_ids, q, size, f"[Q] or [Q, P] = [{n}] or [{n}, P]", (1, 2))
    pid = pid if pid.ndim == 2 else pid[:, None]  # (Q, P)
    eid = pid[:, :0]
    if exclude_ids is not None:
        eid = _ids("exclude_ids", exclude_ids, q, size, f"[Q, E] = [{n}, E]", (2,))
    bounds = {
        name: None if value is None else _real(name, value)
        for name, value in (
            ("max_score", max_score),
            ("min_score", min_score),
            ("absolute_margin", absolute_margin),
            ("relative_margin", relative_margin),
        )
    }
    if sampling not in ("top", "random"):
        raise ValueError(f"`sampling` must be 'top' or 'random'; got {sampling!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None; got {type(generator).__name__}")
    if loss_fn is not None and not isinstance(loss_fn, NTXentLoss):
        raise TypeError(f"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got {type(loss_fn).__name__}")
    qc = None if query_chunk is None else _int("query_chunk", query_chunk, 1)
    cc = None if corpus_chunk is None else _int("corpus_chunk", corpus_chunk, 1)
    if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(c).all()):  # reads values: once, last
        name = "queries" if not bool(torch.isfinite(q).all()) else "corpus"
        raise ValueError(f"`{name}` holds NaN or infinite values")
    qc = qc or min(n, _QUERY_TILE)
    cc = cc or max(1, min(size, _TILE_ELEMENTS // qc))
    draws = None
    if sampling == "random":
        device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.rand(m, n, generator=generator, dtype=torch.float64, device=device).to(q.device)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    sim = Similarity.of(None if loss_fn is None else loss_fn.distance)
    return _Plan(q, c, m, pid, torch.cat([pid, eid], 1), lo_rank, hi_rank, bounds["max_score"],
                 bounds["min_score"], bounds["absolute_margin"], bounds["relative_margin"], sampling, draws,
                 sim, work, qc, cc)  # fmt: skip


def _int(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__}")
    if value < least:
        raise ValueError(f"`{name}` must be >= {least}; got {value}")
    return int(value)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float or None; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value}")
    return float(value)


def _ids(name: str, x: object, q: torch.Tensor, size: int, label: str, ndims: tuple[int, ...]) -> torch.Tensor:
    t = _tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor; got dtype {t.dtype}")
    if t.ndim not in ndims or t.shape[0] != q.shape[0]:
        raise ValueError(f"`{name}` must be {label}; got {_shape(t)}")
    if t.device != q.device:
        raise ValueError(f"`{name}` is on {t.device} but `queries` is on {q.device}; move them to one device")
    t = t.to(torch.int64)
    if t.numel() and int(t.max()) >= size:
        raise ValueError(
            f"`{name}` must index the corpus, 0 <= id < C = {size} (negative: padding); got {int(t.max())}"
        )
    return t
