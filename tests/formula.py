"""The InfoNCE formula written from the math, loop by loop, in float64 -- independent of the package.

Nothing here imports pml_triplets. Every similarity is an explicit sum over coordinates and every loss term an
explicit log-sum-exp over a Python list, so a test comparing against it compares two separate derivations.
It stays differentiable (torch float64 scalars), so gradients can be compared too.
"""

from __future__ import annotations

from typing import Any

import torch

A2P, P2A, A2A, P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"
# which kinds of A2P negatives each hardness_mode penalizes (shared negatives only under "all")
HARDNESS_KINDS = {None: set(), "in_batch": {"in_batch"}, "own": {"own"}, "all": {"own", "in_batch", "shared"}}


def similarity(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s(x, y) for 1-D float64 vectors: cosine, raw dot, or minus the Euclidean distance."""
    d = x.shape[0]
    dot = sum(x[i] * y[i] for i in range(d))
    if kind == "dot":
        return dot
    if kind == "cosine":
        nx = torch.sqrt(sum(x[i] * x[i] for i in range(d)))
        ny = torch.sqrt(sum(y[i] * y[i] for i in range(d)))
        return dot / (torch.clamp(nx, min=1e-12) * torch.clamp(ny, min=1e-12))
    if kind == "euclidean":
        return -torch.sqrt(sum((x[i] - y[i]) ** 2 for i in range(d)))
    raise ValueError(kind)


def term(pos_logit: torch.Tensor, neg_logits: list[torch.Tensor]) -> torch.Tensor:
    """-log(e^pos / (e^pos + sum_j e^neg_j)), with the max subtracted before exponentiating."""
    top = max([pos_logit.detach(), *[v.detach() for v in neg_logits]])
    total = torch.exp(pos_logit - top) + sum(torch.exp(v - top) for v in neg_logits)
    return -(pos_logit - top - torch.log(total))


def infonce_loop(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    tau: float | torch.Tensor = 0.07,
    *,
    mask: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
    in_batch: bool = False,
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    shared_ids: torch.Tensor | None = None,
    sim: str = "cosine",
    reduction: str = "mean",
    directions: tuple[str, ...] = (A2P,),
    partition: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    margin_strategy: str = "absolute",
    guide: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Mean (or list, with reduction="none") over (anchor i, positive k) of the InfoNCE term.

    P = s(a_i, p_ik)/τ. The "docs" of row j are its K positives and its unmasked negatives. Candidate blocks of
    the pair (i, k), each a list of logits:

    - anchor_to_positive (A2P): s(a_i, c)/τ for anchor i's unmasked negatives ("own"), every shared negative
      ("shared") and, with in_batch, every other row's docs ("in_batch"); minus any candidate whose id equals one
      of anchor i's non-negative positive ids (a negative id is "unknown": it clashes with nothing). P is in this
      block's softmax.
    - positive_to_anchor (P2A): s(a_j, p_ik)/τ for every row j, j = i included (that entry is P again).
    - anchor_to_anchor (A2A): s(a_i, a_j)/τ for j ≠ i.
    - positive_to_positive (P2P): s(p_ik, c)/τ for c in every other row's docs, minus id clashes as in A2P.

    partition="joint": ℓ = logsumexp(P, all selected blocks) − P (so with P2A the positive pair is twice in the
    denominator, as in sentence-transformers). partition="per_direction": ℓ = mean over the selected directions
    of logsumexp(P ∪ A2P) − P and logsumexp(P2A) − P.

    hardness_mode adds hardness_strength · s(a_i, c).detach() (raw, not divided by τ) to A2P negative logits
    only: "in_batch" to other rows' docs, "own" to the anchor's own negatives, "all" to both *and* to the
    shared negatives (shared negatives are penalized under "all" only).

    false_negative_margin: g = cosine of the guide embeddings (of the detached embeddings when guide is None),
    t = g(a_i, p_ik) − margin ("absolute") or g(a_i, p_ik) − |g(a_i, p_ik)|·margin ("relative"); in each block a
    candidate c is dropped when g(x, c) > t, with x = a_i in A2P and A2A and x = p_ik in P2A and P2P. The pair
    (a_i, p_ik) itself is never dropped. Shared negatives are filtered only when guide is None.
    """
    if partition not in ("joint", "per_direction"):
        raise ValueError(partition)
    if A2P not in directions or not set(directions) <= {A2P, P2A, A2A, P2P}:
        raise ValueError(directions)
    if partition == "per_direction" and set(directions) & {A2A, P2P}:
        raise ValueError("per_direction with anchor_to_anchor or positive_to_positive")
    if set(directions) - {A2P} and not in_batch:
        raise ValueError("directions other than anchor_to_positive need in_batch")
    if hardness_mode not in HARDNESS_KINDS:
        raise ValueError(hardness_mode)
    if false_negative_margin is not None and guide is not None and shared is not None:
        raise ValueError("guide with shared negatives")

    a = anchors.double()
    n = a.shape[0]
    p = positives.double()
    if p.ndim == 2:
        p = p[:, None, :]
    k = p.shape[1]
    neg = None if negatives is None else negatives.double()
    m = 0 if neg is None else neg.shape[1]
    pid = None if pos_ids is None else pos_ids.reshape(n, -1).tolist()
    nid = None if neg_ids is None else neg_ids.tolist()
    sh = None if shared is None else shared.double()
    sid = None if shared_ids is None else shared_ids.tolist()

    # guide vectors: the given guide, or the detached embeddings themselves
    if guide is None:
        ga, gp, gn, gs = a.detach(), p.detach(), None if neg is None else neg.detach(), sh
    else:
        ga, gp, gn, gs = guide[0].double(), guide[1].double(), guide[2], None
        gn = None if gn is None else gn.double()
        if gp.ndim == 2:
            gp = gp[:, None, :]
    filtering = false_negative_margin is not None

    def g(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(similarity("cosine", x.detach(), y.detach()))

    def real(j: int, mm: int) -> bool:
        return mask is None or bool(mask[j, mm])

    def negs(j: int) -> list[tuple[torch.Tensor, torch.Tensor | None, object]]:
        """Row j's unmasked negatives as (vector, guide vector, id)."""
        gj = [None] * m if gn is None else gn[j]
        return [(neg[j, mm], gj[mm], None if nid is None else nid[j][mm]) for mm in range(m) if real(j, mm)]

    def docs(j: int) -> list[tuple[torch.Tensor, torch.Tensor | None, object]]:
        """Row j's docs as (vector, guide vector, id): its K positives, then its unmasked negatives."""
        return [(p[j, kk], gp[j, kk], None if pid is None else pid[j][kk]) for kk in range(k)] + negs(j)

    penalized = HARDNESS_KINDS[hardness_mode]
    terms = []
    for i in range(n):
        own_ids = set() if pid is None else {v for v in pid[i] if v >= 0}  # a negative id is unknown: no clash
        # A2P candidates of anchor i as (vector, guide vector, id, kind); the same for each of its positives
        cands = [(*doc, "own") for doc in negs(i)]
        if sh is not None:
            cands += [
                (sh[s], None if gs is None else gs[s], None if sid is None else sid[s], "shared")
                for s in range(sh.shape[0])
            ]
        if in_batch:
            for j in range(n):
                if j != i:
                    cands += [(*doc, "in_batch") for doc in docs(j)]
        cands = [c for c in cands if c[2] is None or c[2] not in own_ids]
        a2p_all = []  # (logit, guide vector), computed once per anchor
        for c, gc, _, kind in cands:
            raw = similarity(sim, a[i], c)
            a2p_all.append((raw / tau + hardness_strength * raw.detach() if kind in penalized else raw / tau, gc))
        others = [doc for j in range(n) if j != i for doc in docs(j) if doc[2] is None or doc[2] not in own_ids]

        for kk in range(k):
            pos = similarity(sim, a[i], p[i, kk]) / tau
            threshold = 0.0
            if filtering:
                gap = g(ga[i], gp[i, kk])
                if margin_strategy == "absolute":
                    threshold = gap - false_negative_margin
                elif margin_strategy == "relative":
                    threshold = gap - abs(gap) * false_negative_margin
                else:
                    raise ValueError(margin_strategy)

            def kept(x: torch.Tensor, gc: torch.Tensor, threshold: float = threshold) -> bool:
                return not filtering or not g(x, gc) > threshold

            blocks = {A2P: [logit for logit, gc in a2p_all if kept(ga[i], gc)]}
            if P2A in directions:  # the j = i entry is the positive pair: never dropped
                blocks[P2A] = [pos] + [
                    similarity(sim, a[j], p[i, kk]) / tau for j in range(n) if j != i and kept(gp[i, kk], ga[j])
                ]
            if A2A in directions:
                blocks[A2A] = [similarity(sim, a[i], a[j]) / tau for j in range(n) if j != i and kept(ga[i], ga[j])]
            if P2P in directions:
                blocks[P2P] = [similarity(sim, p[i, kk], c) / tau for c, gc, _ in others if kept(gp[i, kk], gc)]

            if partition == "joint":
                terms.append(term(pos, [v for name in directions for v in blocks[name]]))
            else:  # P2A's block already holds the positive: drop that copy, term() adds P back
                parts = [term(pos, blocks[A2P])] + ([term(pos, blocks[P2A][1:])] if P2A in directions else [])
                terms.append(sum(parts) / len(parts))
    if reduction == "none":
        return torch.stack(terms)
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- issue 32: distillation and the debiased family
#
# Written from the papers' formulas and, where a paper leaves a convention open, from the peers' code (named at
# each function); every convention is listed in the docstrings. They reuse `similarity`, `term` and
# `infonce_loop` above and nothing else.

DISTILLATIONS = ("kl", "margin_mse")


def _rows(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """(a [N, d], p [N, K, d], neg [N, M, d] or None, K, M) in float64."""
    a, p = anchors.double(), positives.double()
    if p.ndim == 2:
        p = p[:, None, :]
    neg = None if negatives is None else negatives.double()
    return a, p, neg, p.shape[1], 0 if neg is None else neg.shape[1]


def _logsumexp(values: list[torch.Tensor]) -> torch.Tensor:
    """log Σ e^v over a Python list, the max subtracted first."""
    top = max(v.detach() for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def distillation_term(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    teacher_scores: torch.Tensor,
    tau: float | torch.Tensor = 0.07,
    *,
    distillation: str,
    teacher_tau: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sim: str = "cosine",
) -> torch.Tensor:
    """The distillation term alone, over each anchor's own group, in float64.

    Anchor i's group G_i: its K positives, then its unmasked negatives, in the order given; ``teacher_scores[i]``
    ([K+M]) holds t_ic in the same order (the entries of masked negatives are ignored, whatever they hold). The
    teacher's scores are constants (detached, as sentence-transformers detaches its labels); s_ic = s(a_i, c) is
    the student's similarity (cosine, dot, or minus the Euclidean distance).

    "kl" (sentence-transformers 6.2 ``DistillKLDivLoss``; Lin et al. 2020), τ_s = ``tau`` and τ_t = ``teacher_tau``
    (default ``tau``):

        S_ic = e^{s_ic/τ_s} / Σ_{c' ∈ G_i} e^{s_ic'/τ_s},   T_ic = e^{t_ic/τ_t} / Σ_{c' ∈ G_i} e^{t_ic'/τ_t}
        term = τ_s² · (1/N) Σ_i Σ_{c ∈ G_i} T_ic (log T_ic − log S_ic)

    KL(teacher ‖ student), summed over the group and averaged over the N anchors ("batchmean"), times τ_s². A term
    with T_ic = 0 counts 0 (x log x → 0).

    "margin_mse" (sentence-transformers 6.2 ``MarginMSELoss``; Hofstätter et al. 2021): no temperature, raw
    similarities; one margin per (positive k, unmasked negative m) of each anchor,

        term = mean_{(i, k, m)} ((s_ik − s_im) − (t_ik − t_im))²

    the mean over all those triples of the batch (``nn.MSELoss`` over ``[N, M]`` margins when K = 1 and nothing is
    masked). With no triple at all (every negative masked) the term is 0.
    """
    if distillation not in DISTILLATIONS:
        raise ValueError(distillation)
    a, p, neg, k, m = _rows(anchors, positives, negatives)
    t = teacher_scores.detach().double()
    if tuple(t.shape) != (a.shape[0], k + m):
        raise ValueError(f"teacher_scores {tuple(t.shape)}, want {(a.shape[0], k + m)}")
    tau_t = tau if teacher_tau is None else teacher_tau

    def real(i: int, mm: int) -> bool:
        return mask is None or bool(mask[i, mm])

    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(a.shape[0]):
        # the group as (student similarity, teacher score), positives first
        group = [(similarity(sim, a[i], p[i, kk]), t[i, kk]) for kk in range(k)]
        group += [(similarity(sim, a[i], neg[i, mm]), t[i, k + mm]) for mm in range(m) if real(i, mm)]
        if distillation == "kl":
            log_s_norm = _logsumexp([s / tau for s, _ in group])
            log_t_norm = _logsumexp([tt / tau_t for _, tt in group])
            for s, tt in group:
                log_t = tt / tau_t - log_t_norm
                if float(torch.exp(log_t)) > 0.0:
                    total = total + torch.exp(log_t) * (log_t - (s / tau - log_s_norm))
            count += 1
        else:
            for kk in range(k):
                for s_neg, t_neg in group[k:]:
                    total = total + ((group[kk][0] - s_neg) - (group[kk][1] - t_neg)) ** 2
                    count += 1
    if distillation == "kl":
        return tau**2 * total / count
    return total / max(count, 1)


def distilled_loop(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    teacher_scores: torch.Tensor,
    tau: float | torch.Tensor = 0.07,
    *,
    distillation: str,
    teacher_tau: float | torch.Tensor | None = None,
    infonce_weight: float = 1.0,
    mask: torch.Tensor | None = None,
    sim: str = "cosine",
    **infonce_options: Any,
) -> torch.Tensor:
    """``infonce_weight × InfoNCE + distillation term``, both in float64.

    The InfoNCE part is ``infonce_loop`` with every configured candidate (``infonce_options``: shared, in_batch,
    ids, directions, ...; same ``tau``, ``mask`` and ``sim``), its mean over the N·K pairs; the distillation part
    is ``distillation_term`` over the anchors' own groups only. With ``infonce_weight=0`` the InfoNCE part is not
    computed (so it needs no candidate: a row may have only its group).
    """
    if infonce_weight < 0:
        raise ValueError(infonce_weight)
    out = distillation_term(
        anchors,
        positives,
        negatives,
        teacher_scores,
        tau,
        distillation=distillation,
        teacher_tau=teacher_tau,
        mask=mask,
        sim=sim,
    )
    if infonce_weight:
        loss = infonce_loop(anchors, positives, negatives, tau, mask=mask, sim=sim, **infonce_options)
        out = infonce_weight * loss + out
    return out


def debiased_loop(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    tau: float | torch.Tensor = 0.07,
    *,
    debias_prior: float = 0.0,
    hcl_beta: float = 0.0,
    decoupled: bool = False,
    mask: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
    in_batch: bool = False,
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    shared_ids: torch.Tensor | None = None,
    sim: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """The debiased family on the anchor_to_positive softmax: mean (or list) over (anchor i, positive k).

    Candidates C_i of anchor i: exactly infonce_loop's A2P block -- its unmasked negatives, every shared negative
    and, with in_batch, every other row's positives and unmasked negatives, minus any candidate whose id equals one
    of anchor i's non-negative positive ids. n_i = |C_i|, the count *after* those exclusions. P = s(a_i, p_ik)/τ,
    L_c = s(a_i, c)/τ.

    Negative mass G (Robinson et al. 2021, eq. 5 and their ``image/main.py`` ``criterion``; Chuang et al. 2020,
    eq. 6 and their ``main.py``), τ⁺ = ``debias_prior`` in [0, 1), β = ``hcl_beta`` >= 0:

        w_c = e^{β L_c}                                  importance weights, NOT detached (as in HCL's code)
        R   = n_i · Σ_c w_c e^{L_c} / Σ_c w_c              (= Σ_c e^{L_c} when β = 0)
        G   = (R − n_i τ⁺ e^P) / (1 − τ⁺),  then G = max(G, n_i e^{−1/τ})   when τ⁺ > 0
        G   = R                                                                   when τ⁺ = 0

    The clamp's bound n_i e^{−1/τ} is n_i times the least e^{L_c} a cosine allows, so τ⁺ > 0 needs
    ``sim="cosine"`` (ValueError otherwise). With τ⁺ = 0 the authors' code clamps too, but for cosine R is n_i
    times a weighted mean of values >= e^{−1/τ}, so that clamp never binds: leaving it out changes nothing there.
    A clamped G is a constant (zero gradient), as ``torch.clamp`` makes it.

        ℓ_ik = log(e^P + G) − P        (decoupled=False: the InfoNCE form with G in place of Σ e^{L_c})
        ℓ_ik = log G − P               (decoupled=True, Yeh et al. 2022 eq. 6 with w = 1: the positive out of
                                        the denominator)

    τ⁺ = 0, β = 0, decoupled=False is infonce_loop's A2P term. An anchor without candidates has G = 0 (ℓ = 0 when
    not decoupled; decoupled raises ValueError, log 0).
    """
    if not 0.0 <= debias_prior < 1.0:
        raise ValueError(f"debias_prior {debias_prior}, want [0, 1)")
    if hcl_beta < 0:
        raise ValueError(f"hcl_beta {hcl_beta}, want >= 0")
    if debias_prior > 0 and sim != "cosine":
        raise ValueError(f"debias_prior needs a bounded similarity (cosine), got {sim}")
    a, p, neg, k, m = _rows(anchors, positives, negatives)
    n = a.shape[0]
    pid = None if pos_ids is None else pos_ids.reshape(n, -1).tolist()
    nid = None if neg_ids is None else neg_ids.tolist()
    sh = None if shared is None else shared.double()
    sid = None if shared_ids is None else shared_ids.tolist()

    def real(j: int, mm: int) -> bool:
        return mask is None or bool(mask[j, mm])

    def negs(j: int) -> list[tuple[torch.Tensor, object]]:
        return [(neg[j, mm], None if nid is None else nid[j][mm]) for mm in range(m) if real(j, mm)]

    terms = []
    for i in range(n):
        own_ids = set() if pid is None else {v for v in pid[i] if v >= 0}
        cands = negs(i)
        if sh is not None:
            cands += [(sh[s], None if sid is None else sid[s]) for s in range(sh.shape[0])]
        if in_batch:
            for j in range(n):
                if j != i:
                    cands += [(p[j, kk], None if pid is None else pid[j][kk]) for kk in range(k)] + negs(j)
        logits = [similarity(sim, a[i], c) / tau for c, cid in cands if cid is None or cid not in own_ids]
        count = len(logits)
        for kk in range(k):
            pos = similarity(sim, a[i], p[i, kk]) / tau
            if not logits:
                if decoupled:
                    raise ValueError(f"decoupled: anchor {i} has no candidate")
                terms.append(pos - pos)
                continue
            # everything below is scaled by e^{-top} (and the weights by e^{-β top}), which cancels in ℓ
            top = max([pos.detach(), *[v.detach() for v in logits]])
            weights = [torch.exp(hcl_beta * (v - top)) for v in logits]
            mass = count * sum(w * torch.exp(v - top) for w, v in zip(weights, logits, strict=True)) / sum(weights)
            if debias_prior > 0:
                mass = (mass - count * debias_prior * torch.exp(pos - top)) / (1 - debias_prior)
                bound = count * torch.exp(torch.as_tensor(-1.0 / tau, dtype=torch.float64) - top)
                if mass < bound:
                    mass = bound.detach() if isinstance(bound, torch.Tensor) else bound
            if decoupled:
                terms.append(torch.log(mass) + top - pos)
            else:
                terms.append(torch.log(torch.exp(pos - top) + mass) + top - pos)
    if reduction == "none":
        return torch.stack(terms)
    return torch.stack(terms).mean()
