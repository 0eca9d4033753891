"""One call of the loss: inputs checked, candidates laid out (gathered across ranks), chunks, engine, reduction.

* The dense engine (``_blocks.chunk_loss``) computes each chunk's logits from the instance's similarity, block by
  block: linear in the pairs. Peak memory is O(chunk · (K + M + S + R)) plus the per-positive blocks; the automatic
  chunk keeps the largest of them under a per-device budget, and several chunks are recomputed in the backward.
* The PML engine (``_pml_chunk``) hands each chunk's pairs to ``loss_fn.compute_loss`` with a 4-tuple: PML's own
  numbers, for subclasses that override NTXentLoss's loss (and on request). NTXentLoss compares every positive
  pair of a call with every negative pair: quadratic in the chunk.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import fields, replace
from functools import partial
from types import MethodType
from typing import Any, cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss
from torch.utils.checkpoint import checkpoint

from . import _distributed
from ._blocks import Context, Rows, chunk_loss, group_logits, pool_excluded, same_item, shared_excluded
from ._compat import as_dtype, autocast_enabled, is_compiling, transformed
from ._inputs import DECLARED, Inputs, Temperature, gather
from ._options import A2A, P2A, P2P, Options
from ._reduce import check_reducer, reduce
from ._validation import Spec, prepare

__all__: list[str] = []  # private module

_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 27}  # elements of the largest per-chunk intermediate
_DEFAULT_LOSS = NTXentLoss()  # engine="pml" without a loss_fn; never modified (see _with_temperature)
_ROWS, _CONTEXT = tuple(f.name for f in fields(Rows)), tuple(f.name for f in fields(Context))
_DERIVED = ("anchors", "positives", "negatives", "positive_ids")  # Rows fields the layout computes from Inputs'
# Per-row inputs that a chunk reads as given: the Rows fields named as a row field of Inputs (teacher_scores).
_PASSED = tuple(name for name in _ROWS if name not in _DERIVED and name in DECLARED and DECLARED[name].axis == "row")


def evaluate(opts: Options, inputs: Inputs) -> torch.Tensor:
    """The loss of one call: validated, computed chunk by chunk, reduced; in the inputs' dtype."""
    spec, x = prepare(
        inputs, opts.in_batch, opts.false_negative_margin is not None, opts.hardness_mode, opts.distillation
    )
    tau = x.temperature
    check_reducer(opts, spec.n, spec.k)
    with torch.autocast(spec.device.type, enabled=False) if autocast_enabled(spec.device.type) else _nothing():
        rows, ctx = _layout(opts, spec, x)
        size = opts.chunk_size or auto_chunk(opts, spec, ctx)
        if opts.dense:
            one = partial(chunk_loss, opts, spec.k, tau)
        else:
            one = partial(_pml_chunk, _with_temperature(opts.loss_fn or _DEFAULT_LOSS, tau), spec.k)
        if size >= spec.n:
            per_pair = one(rows, ctx)  # (N*K,)
        elif is_compiling() and opts.dense:
            per_pair = _mapped(opts, tau, spec.k, rows, ctx, size)
        else:
            # Keep one chunk's intermediates alive and recompute them in the backward pass: NTXentLoss's pair
            # matrices, or the dense (C, S + R) logits (per-anchor logits are small: kept).
            recompute = (
                torch.is_grad_enabled()
                and (not opts.dense or ctx.pool is not None or ctx.shared is not None)
                and not transformed()  # saved-tensor hooks cannot run under torch.func
            )
            per_pair = torch.cat(
                [checkpoint(one, r, ctx, use_reentrant=False) if recompute else one(r, ctx) for r in rows.split(size)]
            )
        loss = reduce(opts, per_pair, x.anchors, spec.k)
        return as_dtype(loss, spec.dtype)


def own_logits(opts: Options, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each anchor's own group as the dense engine's softmax sees it: ``(N, K + M)`` logits and ``(N, M)`` valid.

    The logits ``s(a_i, c)/τ`` of its K positives, then its M negatives in the order given (``group_logits``,
    all N anchors at once, in the working dtype); ``valid`` says which negatives are candidates (the mask minus
    id clashes; None: all). Where it is False the logit means nothing: such rows are zeroed before any use.
    What a term over the group's distribution (distillation) reads, as open_clip's ``get_logits``.
    """
    if not opts.dense:
        raise ValueError("the logits of the dense engine: `engine='pml'` computes no logits of its own")
    spec, x = prepare(
        inputs, opts.in_batch, opts.false_negative_margin is not None, opts.hardness_mode, opts.distillation
    )
    tau, sim = x.temperature, opts.similarity
    rows, ctx = _layout(opts, spec, x)
    raw = ctx.pool is None and sim.fused  # (as chunk_loss: rows as given, normalized on the fly)
    pos, neg = group_logits(
        opts, tau, rows, None if raw else lambda: rows.anchors / tau if sim.linear else rows.anchors
    )
    return pos if neg is None else torch.cat([pos, neg], dim=1), rows.valid


def _mapped(opts: Options, tau: Temperature, k: int, rows: Rows, ctx: Context, size: int) -> torch.Tensor:
    """The chunks as one ``map`` over rows padded to (count, size, ...), for ``torch.compile``.

    The graph then does not depend on the number of chunks (a loop would unroll it), and the map's backward
    recomputes each chunk, as ``checkpoint`` does in eager mode. Padded anchors are zeros; their losses are
    dropped. Scalars that the compiler traces (a τ, strength or margin schedule) enter the map as tensors.
    """
    from torch._higher_order_ops.map import map as hop_map

    count = -(-rows.anchors.shape[0] // size)
    names = [name for name in _ROWS if getattr(rows, name) is not None]
    xs = [_pad(getattr(rows, name), count * size).unflatten(0, (count, size)) for name in names]
    shared = {name: getattr(ctx, name) for name in _CONTEXT if getattr(ctx, name) is not None}

    def body(x: list[torch.Tensor], *context: torch.Tensor) -> torch.Tensor:
        chunk = Rows(**cast(dict[str, Any], dict.fromkeys(_ROWS) | dict(zip(names, x, strict=True))))
        everything = Context(**dict.fromkeys(_CONTEXT) | dict(zip(shared, context, strict=True)))
        return chunk_loss(options, k, scalars[0], chunk, everything)  # (size*K,)

    scalars = [
        v if isinstance(v, torch.Tensor) else rows.anchors.new_full((), v)
        for v in (tau, opts.hardness_strength, opts.false_negative_margin or 0.0)
    ]
    options = replace(
        opts,
        # (a mode's strength only: without one it is 0.0, and a tensor would differ from the plain default)
        hardness_strength=scalars[1] if opts.hardness_mode is not None else opts.hardness_strength,  # type: ignore[arg-type]
        false_negative_margin=None if opts.false_negative_margin is None else scalars[2],  # type: ignore[arg-type]
    )
    total = rows.anchors.shape[0] * k
    return cast(torch.Tensor, hop_map(body, xs, *shared.values())).reshape(-1)[:total]  # type: ignore[arg-type]


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    # zeros: a finite loss, dropped, of an empty anchor; slice_scatter, not cat, which specializes on an empty pad
    return x.new_zeros((rows, *x.shape[1:])).slice_scatter(x, dim=0, start=0, end=x.shape[0])


class _nothing:  # contextlib.nullcontext, which torch.compile < 2.4 does not trace
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def auto_chunk(opts: Options, spec: Spec, ctx: Context) -> int:
    """Anchors per chunk so that the largest intermediate stays under a per-device budget; chunks of equal size.

    Counts, per anchor, every logit of every block -- the per-positive blocks (positive_to_*, the guide filter's
    (K, X) masks) K times.
    """
    budget = _BUDGET.get(spec.device.type, _BUDGET["cuda"])
    r = 0 if ctx.pool is None else ctx.pool.shape[0]
    t = 0 if ctx.anchors is None else ctx.anchors.shape[0]
    width = spec.m + spec.s + r  # anchor-to-positive candidates
    if not opts.dense:  # NTXentLoss holds (C*K) x (C*width) pair matrices and a C x (C*(K+M) + S + R) distances
        size = max(1, math.isqrt(budget // max(1, spec.k * width + spec.k + spec.m)))
    else:
        per_k = (opts.false_negative_margin is not None) * width + (P2P in opts.directions) * r
        per_k += (P2A in opts.directions) * t + (ctx.shared_ids is not None) * spec.s  # the last: the id clashes
        per_anchor = spec.k + width + (A2A in opts.directions) * t + spec.k * per_k
        total = spec.n * per_anchor  # one chunk while everything fits in a few budgets (no recomputation then)
        size = spec.n if total <= 4 * budget else max(1, budget // per_anchor)
    count = -(-spec.n // size)
    return -(-spec.n // count)


def _layout(opts: Options, spec: Spec, x: Inputs) -> tuple[Rows, Context]:
    """The chunkable rows and what every chunk compares with, normalized as the distance would normalize them."""
    a, p, neg, pid, nid = x.anchors, x.positives, x.negatives, x.positive_ids, x.negative_ids
    fused = opts.dense and opts.similarity.fused and not opts.in_batch  # per-anchor rows normalized on the fly
    if neg is not None and not fused:  # (fused, half-precision negatives are cast block by block)
        neg = neg.to(a.dtype)
    # Without a guide, the model's own cosines: the dense engine's logits themselves when it computes cosines (no
    # guide tensors then), else the detached unit embeddings.
    unit = opts.false_negative_margin is not None and x.guide is None and not opts.similarity.cosine
    guide = (_unit(a), _unit(p), _unit(neg)) if unit else x.guide or (None, None, None)
    ga, gp, gn = guide
    valid = x.negatives_mask
    if nid is not None and pid is not None:
        clash = same_item(nid[:, :, None], pid[:, None, :]).any(-1)  # (N, M) the same item as one of its positives
        valid = ~clash if valid is None else valid & ~clash
    rows = torch.arange(spec.n, device=spec.device)  # (N,) global rows (offset below, once gathered)
    norm = partial(_normalize, opts, spec)
    shared = None if x.shared_negatives is None else norm(x.shared_negatives)
    unused_shared = None if x.shared_mask is None else ~x.shared_mask
    ctx = Context(shared, _unit(x.shared_negatives) if unit else None, x.shared_negative_ids, unused_shared,
                  margins=_margins(opts, spec, valid))  # fmt: skip
    passed = {name: getattr(x, name) for name in _PASSED}  # this rank's rows, as checked
    if not opts.in_batch:  # what the similarity normalizes itself (fused: anchors and their rows) stays as it is
        unused = _unused(x.negatives_mask, pid, nid, False)  # (N, M) whatever they hold reaches no loss
        if unused is not None and neg is not None:
            neg = torch.where(unused[..., None], neg.new_zeros(()), neg)
        rows_of = partial(_normalize, opts, spec, fused=fused)
        neg = None if neg is None else rows_of(neg)
        r = Rows(**passed, anchors=rows_of(a), positives=rows_of(p), negatives=neg, valid=valid, rows=rows, own=None,
                 positive_ids=pid, ga=ga, gp=gp, gn=gn)  # fmt: skip
        return r, ctx
    with_anchors = A2A in opts.directions or P2A in opts.directions
    # (anchors: gathered only for the directions that compare them)
    pooled = x._replace(anchors=a if with_anchors else cast(torch.Tensor, None), negatives=neg, guide=guide)
    everyone, offset, total = pooled, 0, spec.n
    if opts.gather_across_devices and _distributed.world()[1] > 1:
        everyone, offset, total = gather(everyone, spec.n)
        rows = rows + offset
    unused = _unused(everyone.negatives_mask, everyone.positive_ids, everyone.negative_ids, True)  # (T, M)
    if unused is not None and everyone.negatives is not None:  # whatever they hold (inf, NaN) reaches no loss
        everyone = everyone._replace(negatives=torch.where(unused[..., None], everyone.negatives.new_zeros(()),
                                                           everyone.negatives))  # fmt: skip
    ctx = _pool(everyone, unused, total, spec, norm, ctx)
    assert ctx.pool is not None
    # This rank's rows are in the pool already normalized (and gathered): take them from it.
    k, m, d = spec.k, spec.m, spec.d
    own_p = ctx.pool[offset * k : (offset + spec.n) * k].view(spec.n, k, d)  # (N, K, d)
    start = total * k + offset * m
    own_neg = None if neg is None else ctx.pool[start : start + spec.n * m].view(spec.n, m, d)  # (N, M, d)
    own_a = norm(a) if ctx.anchors is None else ctx.anchors[offset : offset + spec.n]
    cols = [rows[:, None] * k + torch.arange(k, device=rows.device)]  # (N, K) pool columns of its positives
    cols.append(total * k + rows[:, None] * m + torch.arange(m, device=rows.device))  # (N, M) of its negatives
    own = torch.cat(cols, dim=1)  # (N, K + M)
    r = Rows(**passed, anchors=own_a, positives=own_p, negatives=own_neg, valid=valid, rows=rows, own=own,
             positive_ids=pid, ga=ga, gp=gp, gn=gn)  # fmt: skip
    return r, ctx


def _margins(opts: Options, spec: Spec, valid: torch.Tensor | None) -> torch.Tensor | None:
    """margin_mse's normalizer when masks differ by row: the batch's mean number of candidate negatives per anchor.

    Its term is a mean over every (i, k, m) triple of the batch, not a mean of per-anchor means: each anchor's pairs
    carry ``Σ_m (margin error)² / margins``, and the mean over the N·K pairs is then that mean (see ``chunk_loss``).
    Counted once per call, over this rank's rows; without a mask it is M, a constant (None here).
    """
    if opts.distillation != "margin_mse" or valid is None:
        return None
    return valid.sum().clamp(min=1).to(torch.float32 if spec.dtype != torch.float64 else spec.dtype) / spec.n


def _normalize(opts: Options, spec: Spec, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``x`` as the dense engine compares it: normalized as the distance would (the PML engine does it itself).

    ``fused``: left as it is, for a similarity that normalizes it on the fly.
    """
    if spec.dtype == torch.float16 and opts.similarity.normalizes:
        # normalize's Jacobian at a zero row is I/eps ~ 1e12, which float16 turns into inf: zero rows (padding)
        # get no gradient instead. Their value is unchanged (normalize maps them to 0).
        x = torch.where((x == 0).all(dim=-1, keepdim=True), x.detach(), x)
    return opts.similarity.normalize(x) if opts.dense and not fused else x


def _unused(
    mask: torch.Tensor | None, pid: torch.Tensor | None, nid: torch.Tensor | None, in_batch: bool
) -> torch.Tensor | None:
    """(T, M) bool: negatives that no anchor may use.

    Masked ones, and those with the id of a positive of every row that may use them (its own; in-batch, all).
    """
    unused = None if mask is None else ~mask
    if pid is not None and nid is not None:
        if in_batch:  # an id held by every row is held by row 0: test row 0's ids only, O(T*K*(K + M))
            common = (pid[None, :, :] == pid[0][:, None, None]).any(-1).all(-1)  # (K,) row 0's ids held by all
            everywhere = (same_item(nid[..., None], pid[0]) & common).any(-1)  # (T, M)
        else:
            everywhere = same_item(nid[:, :, None], pid[:, None, :]).any(-1)  # (T, M)
        unused = everywhere if unused is None else unused | everywhere
    return unused


def _pool(
    everyone: Inputs,
    unused: torch.Tensor | None,
    total: int,
    spec: Spec,
    norm: Callable[[torch.Tensor], torch.Tensor],
    base: Context,
) -> Context:
    """``base`` with the in-batch pool over all T rows (embeddings, exclusions, ids, guides) and the anchors."""
    p, neg, pid, nid, anchors = (everyone.positives, everyone.negatives, everyone.positive_ids,
                                 everyone.negative_ids, everyone.anchors)  # fmt: skip
    ga, gp, gn = everyone.guide or (None, None, None)
    k, d = spec.k, spec.d
    # Normalized before the concatenation, which saves nothing for the backward (normalize saves its input).
    emb = [norm(x.reshape(-1, d)) for x in (p, neg) if x is not None]  # R = T*(K + M) rows
    excluded = None if unused is None else torch.cat([unused.new_zeros(total * k), unused.reshape(-1)])  # (R,)
    ids = None
    if pid is not None:  # negatives without ids get the unknown id -1: they never clash
        unknown = None if neg is None or nid is not None else pid.new_full((total * spec.m,), -1, dtype=torch.long)
        ids = torch.cat([x.reshape(-1).long() for x in (pid, nid, unknown) if x is not None])  # (R,)
    g_pool = [g.flatten(0, 1) for g in (gp, gn) if g is not None]
    return replace(
        base, pool=_cat(emb), pool_excluded=excluded, pool_ids=ids, g_pool=_cat(g_pool) if g_pool else None,
        anchors=None if anchors is None else norm(anchors), g_anchors=None if anchors is None else ga,
    )  # fmt: skip


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # one part: no copy


def _unit(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else F.normalize(x.detach(), dim=-1)


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
    """One chunk through ``loss_fn.compute_loss``: positives, valid own negatives, shared and pool as ``ref_emb``."""
    c, d, dev = r.anchors.shape[0], r.anchors.shape[1], r.anchors.device
    refs, a2s, ns, offset = [r.positives.reshape(c * k, d)], [], [], c * k

    def add(emb: torch.Tensor, rows: torch.Tensor, col: torch.Tensor) -> None:  # pairs (anchor rows[j], emb[col[j]])
        nonlocal offset
        refs.append(emb)
        a2s.append(rows)
        ns.append(offset + col)
        offset += emb.shape[0]

    if r.negatives is not None:
        m = r.negatives.shape[1]
        if r.valid is None:  # every pair: no data-dependent shapes
            add(
                r.negatives.reshape(c * m, d),
                torch.arange(c, device=dev).repeat_interleave(m),
                torch.arange(c * m, device=dev),
            )
        else:
            rows, col = r.valid.nonzero(as_tuple=True)
            add(r.negatives.reshape(c * m, d), rows, rows * m + col)
    if ctx.shared is not None:
        s, clash = ctx.shared.shape[0], shared_excluded(r, ctx)
        if clash is None:  # every pair: no data-dependent shapes
            add(ctx.shared, torch.arange(c, device=dev).repeat_interleave(s), torch.arange(s, device=dev).repeat(c))
        else:
            add(ctx.shared, *(~clash).nonzero(as_tuple=True))
    if ctx.pool is not None:
        excluded = pool_excluded(r, ctx)
        assert excluded is not None  # the own row at least
        add(ctx.pool, *(~excluded).nonzero(as_tuple=True))
    # A sentinel anchor (row c) owning two negative pairs and no positive: NTXentLoss returns a gradient-free
    # zero when every index tensor has length <= 1 (N=1, M=1) or when there are no negative pairs at all.
    a2s.append(torch.full((2,), c, device=dev))
    ns.append(torch.zeros(2, dtype=torch.long, device=dev))
    a1 = torch.arange(c, device=dev).repeat_interleave(k)
    pairs = (a1, torch.arange(c * k, device=dev), torch.cat(a2s), torch.cat(ns))
    embeddings = torch.cat([r.anchors, r.anchors[:1].detach()])  # (C+1, d)
    out = loss_fn.compute_loss(embeddings, None, pairs, torch.cat(refs), None)
    return cast(torch.Tensor, out["loss"]["losses"])
