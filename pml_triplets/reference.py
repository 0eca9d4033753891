"""The InfoNCE formula written out in plain torch, one anchor at a time, in float64: a yardstick, not a trainer."""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F

from ._validation import check_inputs, check_temperature

__all__ = ["reference_infonce"]

Similarity = Literal["cosine", "dot", "euclidean"]


def _sim(kind: Similarity, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Similarity of one anchor ``a`` (d,) with each row of ``c`` (R, d); a distance is negated."""
    if kind == "cosine":
        return F.normalize(c, dim=-1) @ F.normalize(a, dim=0)
    if kind == "dot":
        return c @ a
    return -cast(torch.Tensor, torch.linalg.vector_norm(c - a, dim=-1))


def reference_infonce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.07,
    *,
    negatives_mask: torch.Tensor | None = None,
    shared_negatives: torch.Tensor | None = None,
    in_batch: bool = False,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    r"""Mean over (anchor, positive) pairs of :math:`-\log\frac{e^{s(a,p)/τ}}{e^{s(a,p)/τ}+\sum_c e^{s(a,c)/τ}}`.

    Same arguments and candidate rules as :func:`pml_triplets.infonce` (no reducers, no engines); ``similarity``
    is ``"cosine"``, ``"dot"`` (raw dot product) or ``"euclidean"`` (minus the L2 distance of the raw vectors).
    Computed in float64 by an explicit loop over anchors, returned in the inputs' dtype. Slow on purpose.

    Example:
        >>> import torch, pml_triplets as pt
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> loss = pt.reference_infonce(e[:1], e[:1], e[None, 1:], temperature=1.0)
        >>> import math; abs(loss.item() - math.log1p(3 * math.exp(-1))) < 1e-12  # cos 1 vs three cos 0
        True
    """
    if similarity not in ("cosine", "dot", "euclidean"):
        raise ValueError(f"`similarity` must be 'cosine', 'dot' or 'euclidean'; got {similarity!r}")
    check_temperature(temperature)
    spec = check_inputs(
        anchors,
        positives,
        negatives,
        negatives_mask=negatives_mask,
        shared_negatives=shared_negatives,
        in_batch=in_batch,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
    )
    n, k, m, d = spec.n, spec.k, spec.m, spec.d
    f64 = torch.float64
    tau = temperature.to(f64) if isinstance(temperature, torch.Tensor) else float(temperature)
    a = anchors.to(f64)
    p = positives.to(f64).reshape(n, k, d)
    neg = anchors.new_zeros(n, 0, d, dtype=f64) if negatives is None else negatives.to(f64)
    keep = torch.ones(n, m, dtype=torch.bool) if negatives_mask is None else negatives_mask.cpu()
    pid = None if positive_ids is None else positive_ids.reshape(n, k).tolist()
    nid = None if negative_ids is None else negative_ids.tolist()

    terms = []
    for i in range(n):
        cands, cand_ids = [], []  # anchor i's negatives, with their ids (None where unknown)
        for j in range(n):
            if j != i and not in_batch:
                continue
            if j != i:  # in-batch: row j's positives
                cands += [p[j, kk] for kk in range(k)]
                cand_ids += [None if pid is None else pid[j][kk] for kk in range(k)]
            for mm in range(m):
                if keep[j, mm]:
                    cands.append(neg[j, mm])
                    cand_ids.append(None if nid is None else nid[j][mm])
        if shared_negatives is not None:
            cands += list(shared_negatives.to(f64))
            cand_ids += [None] * shared_negatives.shape[0]
        own = set() if pid is None else set(pid[i])
        cands = [c for c, c_id in zip(cands, cand_ids, strict=True) if c_id is None or c_id not in own]
        neg_logits = _sim(similarity, a[i], torch.stack(cands)) / tau if cands else a.new_zeros(0)
        for kk in range(k):
            pos_logit = _sim(similarity, a[i], p[i, kk][None])[0] / tau
            logits = torch.cat([pos_logit[None], neg_logits])
            terms.append(torch.logsumexp(logits, dim=0) - pos_logit)
    return torch.stack(terms).mean().to(spec.dtype)
