"""InfoNCE written out loop by loop in float64, from the formulas of the docs: a yardstick, not a trainer.

``reference_infonce`` takes every argument of ``pml_triplets.infonce`` and computes the same number the
slow way. For each anchor it lists each direction's candidates explicitly (embedding, kind, id, guide vector); for
each of its positives it computes every logit one similarity at a time, through the distance object on 1-row
matrices, and takes one log-sum-exp per softmax. It shares nothing with the engines but the input checks, the
default temperature and the table of ``similarity=`` names (``_similarity.NAMED``).
``tests/test_reference.py`` compares it with a second loop written independently (``tests/formula.py``) and with
closed forms; ``python -m pml_triplets check`` measures ``infonce`` against it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance, DotProductSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer, PerAnchorReducer

from ._options import DEFAULT_TEMPERATURE, plain_ntxent
from ._similarity import NAMED, SimilarityName
from ._validation import check_inputs, check_teacher_scores, check_temperature
from .queue import NegativeQueue, from_queue

__all__ = ["reference_infonce"]

_A2P, _P2A, _A2A, _P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"
_DIRECTIONS = (_A2P, _P2A, _A2A, _P2P)
_HARDENED = {None: (), "in_batch": ("in_batch",), "own": ("own",), "all": ("own", "shared", "in_batch")}
_PARTITIONS = ("joint", "per_direction")
_MARGIN_STRATEGIES = ("absolute", "relative")
_ENGINES = ("auto", "dense", "pml")


@dataclass(frozen=True)
class _Options:
    """The checked configuration: which similarity, which blocks, and how their logits change."""

    distance: BaseDistance
    tau: float | torch.Tensor  # a tensor is float64 on the CPU, differentiable
    in_batch: bool
    directions: tuple[str, ...]
    partition: str
    hardness_mode: str | None
    hardness_strength: float
    margin: float | None
    margin_strategy: str
    debias_prior: float = 0.0
    hcl_beta: float = 0.0
    decoupled: bool = False


class _Candidate(NamedTuple):
    """One entry of a softmax besides the positive pair."""

    emb: torch.Tensor  # (d,)
    guide: torch.Tensor  # (g,) unit vector, detached: what the false-negative filter compares
    kind: str  # "own", "shared" or "in_batch" (another row's positive or negative), or "anchor"
    id: int | None


@dataclass(frozen=True)
class _Data:
    """One call's inputs in float64 on the CPU (still differentiable), and their guide vectors."""

    # Python lists of (d,) vectors, so that x.p[i][k] is anchor i's k-th positive (and each use's gradient is (d,))
    a: list[torch.Tensor]  # N anchors
    p: list[list[torch.Tensor]]  # N x K positives
    neg: list[list[torch.Tensor]]  # N x M negatives
    shared: list[torch.Tensor]  # S shared negatives
    keep: list[list[bool]]  # N x M: which negatives exist
    pid: list[list[int]] | None  # N x K
    nid: list[list[int]] | None  # N x M
    sid: list[int] | None  # S
    ga: list[torch.Tensor]  # unit guide vectors (g,): the guide's, or the embeddings' own (detached)
    gp: list[list[torch.Tensor]]
    gn: list[list[torch.Tensor]]
    gs: list[torch.Tensor]


def reference_infonce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    *,
    loss_fn: NTXentLoss | None = None,
    negatives_mask: torch.Tensor | None = None,
    shared_negatives: torch.Tensor | None = None,
    in_batch: bool = False,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    shared_negative_ids: torch.Tensor | None = None,
    queue: NegativeQueue | None = None,
    chunk_size: int | None = None,
    engine: str = "auto",
    gather_across_devices: bool = False,
    directions: tuple[str, ...] = (_A2P,),
    partition: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    margin_strategy: str = "absolute",
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    similarity: SimilarityName | None = None,
    debias_prior: float = 0.0,
    hcl_beta: float = 0.0,
    decoupled: bool = False,
    teacher_scores: torch.Tensor | None = None,
    distillation: str | None = None,
    teacher_temperature: float | None = None,
    infonce_weight: float = 1.0,
) -> torch.Tensor:
    """The loss of ``pml_triplets.infonce``, one anchor and one positive at a time, in float64.

    For term (i, k), with ``P = s(a_i, p_ik)/τ`` and one block of logits per direction,

        ℓ_ik = log(e^P + Σ_{blocks B} Σ_{c ∈ B} e^{L_c}) − P        (partition="joint")
        ℓ_ik = mean_B log(e^P + Σ_{c ∈ B} e^{L_c}) − P            (partition="per_direction")

    The debiased family replaces the anchor_to_positive sum Σ_c e^{L_c} over its n candidates by

        R = n Σ_c w_c e^{L_c} / Σ_c w_c,  w_c = e^{β L_c}           (hcl_beta = β; R = Σ_c e^{L_c} at β = 0)
        G = max((R − n τ⁺ e^P) / (1 − τ⁺), n e^{−1/τ})               (debias_prior = τ⁺ > 0; a clamped G is a
                                                                    constant)
        ℓ_ik = log(e^P + G) − P,  or  log G − P  (decoupled);  ℓ_ik = 0 when n = 0

    * anchor_to_positive: ``L_c = s(a_i, c)/τ (+ hardness_strength * s(a_i, c).detach())`` over anchor i's unmasked
      negatives ("own"), the shared negatives ("shared") and, with ``in_batch``, every other row's positives and
      unmasked negatives ("in_batch"), minus those with the id of one of anchor i's positives. Hardness raises the
      kinds ``hardness_mode`` names: "own", "in_batch", or all three for "all".
    * positive_to_anchor: ``s(a_j, p_ik)/τ`` for j != i, plus P once more in the joint softmax (the j = i entry).
    * anchor_to_anchor: ``s(a_i, a_j)/τ`` for j != i.
    * positive_to_positive: ``s(p_ik, c)/τ`` for the other rows' positives and unmasked negatives, minus id clashes.

    With ``false_negative_margin``, candidate c of a block whose query is x (a_i, or p_ik for the positive_to_*
    blocks) is dropped when ``g(x, c) > g(a_i, p_ik) - margin`` ("absolute") or ``> g(a_i, p_ik) - |g(a_i, p_ik)| *
    margin`` ("relative"), g the cosine of the guide's vectors (of the detached embeddings without a guide). The
    loss is the mean of the N*K terms, or what ``loss_fn``'s reducer makes of them (see below).

    With ``distillation`` each term becomes ``infonce_weight * ℓ_ik + D_i``, anchor i's share of the term over its
    group G_i (its K positives, then its unmasked negatives without a positive's id, in the order given; t_ic the
    teacher's score of c, s_ic = s(a_i, c)):

        "kl":          D_i = τ² Σ_{c ∈ G_i} T_ic (log T_ic − log S_ic),  S = softmax(s/τ), T = softmax(t/τ_t) over G_i
        "margin_mse":  D_i = Σ_{k, m} ((s_ik − s_im) − (t_ik − t_im))² · N / (K · V)

    (V: the batch's count of such negatives), so that the mean over the N·K terms is the batchmean KL, or the mean
    over every (i, k, m) margin.

    Args:
        anchors: ``[N, d]``.
        positives: ``[N, d]`` or ``[N, K, d]``.
        negatives: ``[N, M, d]`` or ``None``.
        temperature: τ, a float or a 0-d tensor (its gradient is computed); ``None`` means 0.07, or
            ``loss_fn.temperature``. Positional here, for compatibility; keyword-only in ``infonce``.
        loss_fn: an ``NTXentLoss``: its distance gives s (pair by pair, ``distance(x[None], c[None])``, negated unless
            ``distance.is_inverted``), its temperature τ, its reducer the result: the mean for a ``MeanReducer``
            without regularizer, the ``(N*K,)`` per-pair losses (anchor-major) for ``DoNothingReducer``, otherwise
            PML's own reducer and ``embedding_regularizer`` objects applied to the loss dict ``{"losses", "indices":
            (anchor, positive's row in cat([positives, negatives, shared])), "reduction_type": "pos_pair"}`` and
            the anchors, as ``NTXentLoss.forward`` does. Subclasses that override NTXentLoss's loss, and a
            ``PerAnchorReducer`` with K > 1 (which plain PML cannot reduce either), raise ``NotImplementedError``.
        negatives_mask: ``[N, M]`` bool, ``True`` for a real negative; masked ones are never touched.
        shared_negatives: ``[S, d]`` negatives of every anchor.
        in_batch: also every other row's positives and unmasked negatives.
        positive_ids: ``[N]`` or ``[N, K]`` ints: a candidate with the id of one of anchor i's positives is dropped.
        negative_ids: ``[N, M]`` ints, the ids of ``negatives``.
        shared_negative_ids: ``[S]`` ints, the ids of ``shared_negatives``.
        queue: a ``NegativeQueue``, read as ``shared_negatives=queue.negatives, shared_negative_ids=queue.ids``.
        chunk_size: checked as ``infonce`` checks it, then ignored: it does not change the value.
        engine: checked, then ignored: this is the exact formula, which ``"pml"`` matches except where PML caps a
            term at ``-log(tiny)``.
        gather_across_devices: checked (it needs ``in_batch``), and changes nothing on one process. The reference
            is single-process: under a process group of more than one rank it raises ``NotImplementedError``.
        directions: the blocks, as above: ``"anchor_to_positive"`` and any of the other three (they need
            ``in_batch``).
        partition: ``"joint"`` or ``"per_direction"`` (not with anchor_to_anchor or positive_to_positive).
        hardness_mode: ``None``, ``"in_batch"``, ``"own"`` or ``"all"``.
        hardness_strength: >= 0.
        false_negative_margin: the margin of the filter, or ``None`` for no filter.
        margin_strategy: ``"absolute"`` or ``"relative"``.
        guide: ``(anchors [N, g], positives [N, g] or [N, K, g], negatives [N, M, g] or None)``, for the filter.
        similarity: without ``loss_fn``, ``"cosine"`` (the default), ``"dot"`` (raw dot product) or ``"euclidean"``
            (minus the L2 distance of the raw vectors); kept for compatibility, not together with ``loss_fn``.
        debias_prior: τ⁺ in [0, 1) (Chuang et al.), as above; needs the cosine similarity.
        hcl_beta: β >= 0 (Robinson et al.), as above.
        decoupled: the positive out of the denominator (Yeh et al.), as above. The three apply to the
            anchor_to_positive softmax alone: not with other directions, per_direction, hardness or the filter.
        teacher_scores: ``[N, K + M]``, the teacher's scores of each anchor's positives then negatives (constants);
            exactly with ``distillation``.
        distillation: ``None``, ``"kl"`` or ``"margin_mse"``.
        teacher_temperature: τ_t of ``"kl"`` (``None``: τ).
        infonce_weight: >= 0, the InfoNCE terms' weight; needs ``distillation``.

    Returns:
        A 0-d tensor (or ``(N*K,)`` for ``DoNothingReducer``) in the inputs' dtype and device, computed in float64
        on the CPU and differentiable w.r.t. the embeddings and a tensor temperature. Slow on purpose.

    Raises:
        TypeError, ValueError: as ``infonce`` for bad inputs and option values.
        NotImplementedError: the cases named above.

    Example:
        >>> import math, torch, pml_triplets as pt
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> loss = pt.reference_infonce(e[:1], e[:1], e[None, 1:], temperature=1.0)  # cos 1 vs three cos 0
        >>> abs(loss.item() - math.log1p(3 * math.exp(-1))) < 1e-12
        True
        >>> gte = ("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive")
        >>> loss = pt.reference_infonce(e[:3], e[:3], temperature=1.0, in_batch=True, directions=gte)
        >>> abs(loss.item() - (math.log(2 * math.e + 4 * 2) - 1)) < 1e-12  # P twice, 4 blocks of N-1 zeros
        True
    """
    opts = _options(
        temperature,
        loss_fn,
        similarity,
        in_batch,
        directions=directions,
        partition=partition,
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        false_negative_margin=false_negative_margin,
        margin_strategy=margin_strategy,
        debiased=(debias_prior, hcl_beta, decoupled),
    )
    _check_run(chunk_size, engine, gather_across_devices, in_batch)
    if _debiased(opts) and engine == "pml":
        raise ValueError("the debiased family is not NTXentLoss: `engine='pml'` cannot compute it")
    shared_negatives, shared_negative_ids, _ = from_queue(
        queue, shared_negatives, shared_negative_ids, positive_ids, anchors, negatives is not None or in_batch,
        static=False,
    )  # fmt: skip
    spec = check_inputs(
        anchors,
        positives,
        negatives,
        negatives_mask=negatives_mask,
        shared_negatives=shared_negatives,
        in_batch=in_batch,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        shared_negative_ids=shared_negative_ids,
    )
    _check_guide(guide, opts.margin, anchors, positives, negatives, shared_negatives)
    _check_reducer(loss_fn, spec.k)
    weight = _check_distillation(distillation, teacher_temperature, infonce_weight, loss_fn)
    check_teacher_scores(teacher_scores, spec, distillation)
    x = _data(anchors, positives, negatives, negatives_mask, shared_negatives, positive_ids, negative_ids,
              shared_negative_ids, guide)  # fmt: skip
    losses = _losses(x, opts)
    if distillation is not None and teacher_scores is not None:
        shares = _distilled(x, opts, _f64(teacher_scores).detach().tolist(), distillation, teacher_temperature)
        losses = weight * losses + shares.repeat_interleave(spec.k)
    return _reduce(loss_fn, losses, _f64(anchors), spec.k).to(device=spec.device, dtype=spec.dtype)


# ---------------------------------------------------------------------------------------------- the formula


def _s(distance: BaseDistance, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s(x, y) of two (d,) vectors: the distance object on 1-row matrices, negated unless it is a similarity."""
    value = cast(torch.Tensor, distance(x[None], y[None]))[0, 0]
    return value if distance.is_inverted else -value


def _logit(opts: _Options, query: torch.Tensor, c: _Candidate, harden: bool) -> torch.Tensor:
    """s(query, c)/τ, plus ``hardness_strength * s`` (detached, not divided by τ) where the mode weighs c."""
    s = _s(opts.distance, query, c.emb)
    if harden and c.kind in _HARDENED[opts.hardness_mode]:
        return s / opts.tau + opts.hardness_strength * s.detach()
    return s / opts.tau


def _limit(opts: _Options, ga: torch.Tensor, gp: torch.Tensor) -> float | None:
    """The guide similarity above which a candidate of term (i, k) is a false negative; None without a margin."""
    if opts.margin is None:
        return None
    g = float(ga @ gp)  # g(a_i, p_ik)
    return g - opts.margin if opts.margin_strategy == "absolute" else g - abs(g) * opts.margin


def _nll(pos: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
    """-log(e^P / (e^P + Σ_c e^L_c)), as logsumexp([P, L...]) - P: exactly 0 when there is no candidate."""
    return torch.logsumexp(torch.stack([pos, *logits]), dim=0) - pos


def _losses(x: _Data, opts: _Options) -> torch.Tensor:
    """The (N*K,) terms ℓ_ik, anchor-major."""
    n, k = len(x.p), len(x.p[0])
    terms = []
    for i in range(n):
        blocks = _candidates(x, i, opts)  # the same for the anchor's K positives
        # the logits of the blocks queried by a_i are the same for its K positives too: computed once
        by_anchor = {
            d: [_logit(opts, x.a[i], c, harden=d == _A2P) for c in blocks[d]] for d in blocks if d in (_A2P, _A2A)
        }
        terms += [_term(x, opts, blocks, by_anchor, i, kk) for kk in range(k)]
    return torch.stack(terms)


def _term(
    x: _Data,
    opts: _Options,
    blocks: dict[str, list[_Candidate]],
    by_anchor: dict[str, list[torch.Tensor]],
    i: int,
    k: int,
) -> torch.Tensor:
    """ℓ_ik: anchor i against its k-th positive and each direction's candidates."""
    a, p = x.a[i], x.p[i][k]
    pos = _s(opts.distance, a, p) / opts.tau  # P
    limit = _limit(opts, x.ga[i], x.gp[i][k])
    logits: dict[str, list[torch.Tensor]] = {}
    for direction, block in blocks.items():
        if direction in (_A2P, _A2A):  # queried by the anchor a_i
            scored, g_query = by_anchor[direction], x.ga[i]
        else:  # positive_to_*: queried by the positive p_ik
            scored, g_query = [_logit(opts, p, c, harden=False) for c in block], x.gp[i][k]
        kept = [limit is None or not float(g_query @ c.guide) > limit for c in block]  # the false-negative filter
        logits[direction] = [v for v, keep in zip(scored, kept, strict=True) if keep]
    if _debiased(opts):  # (anchor_to_positive alone: checked)
        return _debiased_term(opts, pos, logits[_A2P])
    if opts.partition == "per_direction":  # one softmax per direction, each holding the positive pair once
        return torch.stack([_nll(pos, block) for block in logits.values()]).mean()
    again = [pos] if _P2A in logits else []  # positive_to_anchor's j = i entry: the positive pair a second time
    return _nll(pos, again + [v for block in logits.values() for v in block])


def _debiased(opts: _Options) -> bool:
    return opts.debias_prior != 0 or opts.hcl_beta != 0 or opts.decoupled


def _debiased_term(opts: _Options, pos: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
    """ℓ_ik of the debiased family from P and the n candidates' logits L_c, one candidate at a time."""
    n = len(logits)
    if n == 0:
        return pos * 0.0
    shift = max(float(v.detach()) for v in [pos, *logits])  # every exponential below is of a value <= 0
    weights = [torch.exp(opts.hcl_beta * (v - shift)) for v in logits]
    mass = n * torch.stack([w * torch.exp(v - shift) for w, v in zip(weights, logits, strict=True)]).sum()
    mass = mass / torch.stack(weights).sum()
    if opts.debias_prior > 0:
        tau = float(torch.as_tensor(opts.tau).detach())  # the clamp is a constant
        mass = (mass - n * opts.debias_prior * torch.exp(pos - shift)) / (1 - opts.debias_prior)
        floor = n * math.exp(-1 / tau - shift)
        if float(mass.detach()) < floor:
            mass = torch.tensor(floor, dtype=torch.float64)
    if opts.decoupled:
        return torch.log(mass) + shift - pos
    return torch.log(torch.exp(pos - shift) + mass) + shift - pos


def _distilled(
    x: _Data, opts: _Options, t: list[list[float]], distillation: str, teacher_temperature: float | None
) -> torch.Tensor:
    """(N,) each anchor's share D_i of the distillation term (see ``reference_infonce``)."""
    n, k = len(x.p), len(x.p[0])
    tau = opts.tau
    tau_t = tau if teacher_temperature is None else teacher_temperature
    clash = [set() if x.pid is None else {v for v in x.pid[i] if v >= 0} for i in range(n)]
    # group[i]: (student similarity, teacher score) of the positives, then of the candidate negatives
    groups = []
    for i in range(n):
        group = [(_s(opts.distance, x.a[i], x.p[i][kk]), t[i][kk]) for kk in range(k)]
        for m in range(len(x.neg[i])):
            if x.keep[i][m] and (x.nid is None or x.nid[i][m] not in clash[i]):
                group.append((_s(opts.distance, x.a[i], x.neg[i][m]), t[i][k + m]))
        groups.append(group)
    shares = []
    if distillation == "kl":
        for group in groups:
            log_s = torch.log_softmax(torch.stack([s / tau for s, _ in group]), dim=0)
            log_t = torch.log_softmax(torch.stack([torch.as_tensor(v, dtype=torch.float64) / tau_t for _, v in group]),
                                      dim=0)  # fmt: skip
            kl = sum((log_t[c].exp() * (log_t[c] - log_s[c]) for c in range(len(group)) if log_t[c].exp() > 0),
                     torch.zeros((), dtype=torch.float64))  # fmt: skip
            shares.append(tau * tau * kl)
        return torch.stack(shares)
    count = sum(k * (len(group) - k) for group in groups)
    for group in groups:
        total = torch.zeros((), dtype=torch.float64)
        for s_p, t_p in group[:k]:
            for s_n, t_n in group[k:]:
                total = total + ((s_p - s_n) - (t_p - t_n)) ** 2
        shares.append(total * n / max(count, 1))
    return torch.stack(shares)


# ------------------------------------------------------------------------------------------ the candidates


def _id(ids: list[list[int]] | None, row: int, col: int) -> int | None:
    return None if ids is None else ids[row][col]


def _own(x: _Data, i: int) -> list[_Candidate]:
    """Anchor i's unmasked negatives."""
    return [_Candidate(x.neg[i][m], x.gn[i][m], "own", _id(x.nid, i, m)) for m in range(len(x.neg[i])) if x.keep[i][m]]


def _docs(x: _Data, j: int) -> list[_Candidate]:
    """Row j's positives and unmasked negatives, as candidates of the other rows."""
    positives = [_Candidate(x.p[j][k], x.gp[j][k], "in_batch", _id(x.pid, j, k)) for k in range(len(x.p[j]))]
    negatives = [
        _Candidate(x.neg[j][m], x.gn[j][m], "in_batch", _id(x.nid, j, m)) for m in range(len(x.neg[j])) if x.keep[j][m]
    ]
    return positives + negatives


def _candidates(x: _Data, i: int, opts: _Options) -> dict[str, list[_Candidate]]:
    """Each direction's candidates of anchor i, those with the id of one of its positives removed."""
    n = len(x.a)
    clash = set() if x.pid is None else {v for v in x.pid[i] if v >= 0}  # a negative id is unknown: no clash

    def no_clash(cands: list[_Candidate]) -> list[_Candidate]:
        return [c for c in cands if c.id is None or c.id not in clash]

    shared = [
        _Candidate(x.shared[s], x.gs[s], "shared", None if x.sid is None else x.sid[s]) for s in range(len(x.shared))
    ]
    others = [c for j in range(n) if j != i for c in _docs(x, j)] if opts.in_batch else []
    anchors = [_Candidate(x.a[j], x.ga[j], "anchor", None) for j in range(n) if j != i]
    blocks = {_A2P: no_clash(_own(x, i) + shared + others), _P2A: anchors, _A2A: anchors, _P2P: no_clash(others)}
    return {direction: blocks[direction] for direction in opts.directions}


def _data(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    mask: torch.Tensor | None,
    shared: torch.Tensor | None,
    positive_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    shared_negative_ids: torch.Tensor | None,
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
) -> _Data:
    n, d = anchors.shape
    a = _f64(anchors)  # (N, d)
    p = _f64(positives).reshape(n, -1, d)  # (N, K, d)
    k = p.shape[1]
    neg = a.new_zeros(n, 0, d) if negatives is None else _f64(negatives)  # (N, M, d)
    sh = a.new_zeros(0, d) if shared is None else _f64(shared)  # (S, d)
    ga, gp, gn = (a, p, neg) if guide is None else guide  # no guide: the model's own embeddings, detached
    gn = ga.new_zeros(n, 0, ga.shape[-1]) if gn is None else gn  # (N, M, g)
    gs = sh if guide is None else sh.new_zeros(0, 1)  # a guide holds no shared negatives (checked)
    return _Data(
        a=_vectors(a),
        p=_grid(p),
        neg=_grid(neg),
        shared=_vectors(sh),
        keep=[[True] * neg.shape[1]] * n if mask is None else mask.tolist(),
        pid=None if positive_ids is None else positive_ids.reshape(n, k).tolist(),
        nid=None if negative_ids is None else negative_ids.tolist(),
        sid=None if shared_negative_ids is None else shared_negative_ids.tolist(),
        ga=_vectors(_unit(ga)),
        gp=_grid(_unit(gp).reshape(n, k, -1)),
        gn=_grid(_unit(gn)),
        gs=_vectors(_unit(gs)),
    )


def _vectors(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.unbind(0))


def _grid(x: torch.Tensor) -> list[list[torch.Tensor]]:
    return [list(row.unbind(0)) for row in x.unbind(0)]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.float64)  # differentiable: gradients flow back to x's device and dtype


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(_f64(x.detach()), dim=-1)


# ---------------------------------------------------------------------------------------------- reduction


def _reduce(loss_fn: NTXentLoss | None, losses: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """The per-pair ``losses`` (N*K,) reduced as ``NTXentLoss.forward`` reduces its pos_pair losses."""
    if loss_fn is None or (type(loss_fn.reducer) is MeanReducer and loss_fn.embedding_regularizer is None):
        return losses.mean()
    if isinstance(loss_fn.reducer, DoNothingReducer):
        return losses
    n = anchors.shape[0]
    pair_anchor = torch.arange(n).repeat_interleave(k)  # (N*K,)
    pair_positive = torch.arange(n * k)  # (N*K,) the positive's row in ref_emb = cat([positives, ...])
    loss_dict = {"loss": {"losses": losses, "indices": (pair_anchor, pair_positive), "reduction_type": "pos_pair"}}
    loss_fn.add_embedding_regularization_to_loss_dict(loss_dict, anchors)
    out = loss_fn.reducer(loss_dict, anchors, None)
    return cast(torch.Tensor, out["loss"]["losses"] if isinstance(out, dict) else out)


# ------------------------------------------------------------------------------------------------- checks


def _options(
    temperature: object,
    loss_fn: object,
    similarity: object,
    in_batch: object,
    *,
    directions: object,
    partition: str,
    hardness_mode: str | None,
    hardness_strength: object,
    false_negative_margin: object,
    margin_strategy: str,
    debiased: tuple[object, object, object] = (0.0, 0.0, False),
) -> _Options:
    """Check the loss_fn, the temperature, the similarity and the retrieval options."""
    if not isinstance(in_batch, bool):
        raise TypeError(f"`in_batch` must be a bool; got {type(in_batch).__name__}")
    distance, tau = _loss_fn_parts(temperature, loss_fn, similarity)
    tau = check_temperature(tau)
    if hardness_mode not in _HARDENED:
        raise ValueError(f"`hardness_mode` must be one of {tuple(_HARDENED)}; got {hardness_mode!r}")
    if hardness_mode == "in_batch" and not in_batch:
        raise ValueError("`hardness_mode='in_batch'` weighs other rows' candidates: it needs `in_batch=True`")
    strength = _real("hardness_strength", hardness_strength)
    if strength < 0:
        raise ValueError(f"`hardness_strength` must be >= 0; got {strength}")
    if margin_strategy not in _MARGIN_STRATEGIES:
        raise ValueError(f"`margin_strategy` must be one of {_MARGIN_STRATEGIES}; got {margin_strategy!r}")
    prior, beta, decoupled = _real("debias_prior", debiased[0]), _real("hcl_beta", debiased[1]), debiased[2]
    if not isinstance(decoupled, bool):
        raise TypeError(f"`decoupled` must be a bool; got {type(decoupled).__name__}")
    if not 0 <= prior < 1 or beta < 0:
        raise ValueError(f"`debias_prior` must be in [0, 1) and `hcl_beta` >= 0; got {prior} and {beta}")
    cosine = isinstance(distance, DotProductSimilarity) and distance.normalize_embeddings and distance.power == 1
    if prior > 0 and not cosine:
        raise ValueError(f"`debias_prior={prior}` needs the cosine similarity; got {type(distance).__name__}")
    alone = directions in ((_A2P,), [_A2P]) and partition == "joint"
    if (prior or beta or decoupled) and not (alone and hardness_mode is None and false_negative_margin is None):
        raise ValueError(
            "the debiased family is defined on the anchor_to_positive softmax alone: not with other directions, "
            "partition='per_direction', hardness_mode or false_negative_margin"
        )
    return _Options(
        distance=distance,
        tau=_f64(tau) if isinstance(tau, torch.Tensor) else tau,
        in_batch=in_batch,
        directions=_check_directions(directions, partition, in_batch),
        partition=partition,
        hardness_mode=hardness_mode,
        hardness_strength=strength,
        margin=None if false_negative_margin is None else _real("false_negative_margin", false_negative_margin),
        margin_strategy=margin_strategy,
        debias_prior=prior,
        hcl_beta=beta,
        decoupled=decoupled,
    )


def _loss_fn_parts(temperature: object, loss_fn: object, similarity: object) -> tuple[BaseDistance, object]:
    """The distance and the (unchecked) temperature, from ``loss_fn`` or from ``similarity`` and ``temperature``."""
    if loss_fn is None:
        if similarity is not None and similarity not in NAMED:
            raise ValueError(f"`similarity` must be one of {tuple(NAMED)}; got {similarity!r}")
        make = NAMED[str(similarity or "cosine")]
        return make(), DEFAULT_TEMPERATURE if temperature is None else temperature
    if not isinstance(loss_fn, NTXentLoss):
        raise TypeError(f"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got {type(loss_fn).__name__}")
    if not plain_ntxent(loss_fn):  # PML's NTXentLoss, a subclass that only configures it, or pt.NTXentLoss
        raise NotImplementedError(
            f"{type(loss_fn).__name__} overrides NTXentLoss's loss; the reference computes NTXentLoss's own formula"
        )
    for name, value in (("temperature", temperature), ("similarity", similarity)):
        if value is not None:
            raise ValueError(f"pass either `{name}` or `loss_fn` (whose {name} is used), not both; got {value!r}")
    return loss_fn.distance, loss_fn.temperature


def _check_directions(directions: object, partition: object, in_batch: bool) -> tuple[str, ...]:
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
        raise TypeError(f"`directions` must be a tuple of names from {_DIRECTIONS}; got {directions!r}")
    unknown = [d for d in directions if d not in _DIRECTIONS]
    if unknown or _A2P not in directions or len(set(directions)) != len(directions):
        raise ValueError(
            f"`directions` must hold {_A2P!r} and any of the others of {_DIRECTIONS}, once each; got {directions!r}"
        )
    if len(directions) > 1 and not in_batch:
        raise ValueError(f"`directions` {tuple(directions)} draw candidates from the batch: they need `in_batch=True`")
    if partition not in _PARTITIONS:
        raise ValueError(f"`partition` must be one of {_PARTITIONS}; got {partition!r}")
    if partition == "per_direction" and {_A2A, _P2P} & set(directions):
        raise ValueError(
            f"`partition='per_direction'` needs the positive pair in every softmax; {_A2A!r} and {_P2P!r} lack it"
        )
    return tuple(directions)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float; got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite; got {value}")
    return float(value)


def _check_run(chunk_size: object, engine: object, gather: object, in_batch: bool) -> None:
    """Options that do not change the value, checked as ``infonce`` checks them."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an int >= 1 or None; got {chunk_size!r}")
    if engine not in _ENGINES:
        raise ValueError(f"`engine` must be one of {_ENGINES}; got {engine!r}")
    if not isinstance(gather, bool):
        raise TypeError(f"`gather_across_devices` must be a bool; got {type(gather).__name__}")
    if gather and not in_batch:
        raise ValueError("`gather_across_devices=True` needs `in_batch=True`")
    dist = torch.distributed
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError(
            f"`gather_across_devices=True` under a process group of {dist.get_world_size()} ranks: the reference is "
            "single-process; gather every rank's inputs and call it on one process"
        )


def _check_guide(
    guide: object,
    margin: float | None,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    shared: torch.Tensor | None,
) -> None:
    if guide is None:
        return
    if margin is None:
        raise ValueError("`guide` has no effect without `false_negative_margin`: pass both, or neither")
    if shared is not None:
        raise ValueError("`guide` holds no embeddings of `shared_negatives`: filter without a guide, or drop them")
    if not isinstance(guide, (tuple, list)) or len(guide) != 3:
        raise TypeError("`guide` must be a 3-tuple (anchors, positives, negatives or None) of guide embeddings")
    data = (anchors, positives, negatives)
    for part, (g, x) in enumerate(zip(guide, data, strict=True)):
        if (g is None) != (x is None) or (g is not None and not isinstance(g, torch.Tensor)):
            raise ValueError(f"`guide[{part}]` must be a tensor exactly when its data tensor is given")
        if g is not None and not g.is_floating_point():
            raise TypeError(f"`guide[{part}]` must hold floating-point embeddings; got dtype {g.dtype}")
        if g is not None and x is not None and (g.shape[:-1] != x.shape[:-1] or g.shape[-1] != guide[0].shape[-1]):
            raise ValueError(
                f"`guide[{part}]` must be {[*x.shape[:-1], 'g']} (the data's sizes, one width g); got {tuple(g.shape)}"
            )


def _check_distillation(
    distillation: object, teacher_temperature: object, infonce_weight: object, loss_fn: NTXentLoss | None
) -> float:
    """The InfoNCE terms' weight, the distillation options checked."""
    weight = _real("infonce_weight", infonce_weight)
    if weight < 0:
        raise ValueError(f"`infonce_weight` must be >= 0; got {weight}")
    if distillation not in (None, "kl", "margin_mse"):
        raise ValueError(f"`distillation` must be one of (None, 'kl', 'margin_mse'); got {distillation!r}")
    if teacher_temperature is not None and not _real("teacher_temperature", teacher_temperature) > 0:
        raise ValueError(f"`teacher_temperature` must be positive; got {teacher_temperature}")
    if distillation is None and (weight != 1.0 or teacher_temperature is not None):
        raise ValueError("`infonce_weight` and `teacher_temperature` do nothing without `distillation`")
    if teacher_temperature is not None and distillation != "kl":
        raise ValueError(f"`teacher_temperature` is the KL's τ_t; `distillation={distillation!r}` has none")
    reducer = None if loss_fn is None else loss_fn.reducer
    plain = reducer is None or (type(reducer) is MeanReducer and loss_fn.embedding_regularizer is None)  # type: ignore[union-attr]
    if distillation is not None and not plain and not isinstance(reducer, DoNothingReducer):
        raise ValueError("`distillation` takes the mean (MeanReducer) or the per-pair losses (DoNothingReducer)")
    return weight


def _check_reducer(loss_fn: NTXentLoss | None, k: int) -> None:
    if loss_fn is None:
        return
    if isinstance(loss_fn.reducer, DoNothingReducer) and loss_fn.embedding_regularizer is not None:
        raise ValueError(
            "`loss_fn` has a DoNothingReducer (per-pair losses) and an embedding_regularizer, whose term cannot be "
            "added to per-pair losses: drop one of them, or use another reducer"
        )
    if k > 1 and any(isinstance(r, PerAnchorReducer) for r in loss_fn.reducer.modules()):
        raise NotImplementedError(
            f"PerAnchorReducer with K={k} positives per anchor: PML indexes its pairs by anchor rows, which K > 1 "
            "positives overflow (plain NTXentLoss raises IndexError); the reference reduces K = 1 only"
        )
