"""The InfoNCE formula written from the math, loop by loop, in float64 -- independent of the package.

Nothing here imports pml_triplets. Every similarity is an explicit sum over coordinates and every loss term an
explicit log-sum-exp over a Python list, so a test comparing against it compares two separate derivations.
It stays differentiable (torch float64 scalars), so gradients can be compared too.
"""

from __future__ import annotations

import torch


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
    sim: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or list, with reduction="none") over (anchor i, positive k) of the InfoNCE term.

    Candidates of anchor i: its unmasked negatives; every shared negative; with in_batch, every other row's
    positives and unmasked negatives; minus any candidate whose id equals one of anchor i's positive ids.
    """
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

    def real(j: int, mm: int) -> bool:
        return mask is None or bool(mask[j, mm])

    terms = []
    for i in range(n):
        cands = []  # (vector, id or None)
        for mm in range(m):
            if real(i, mm):
                cands.append((neg[i, mm], None if nid is None else nid[i][mm]))
        if shared is not None:
            cands += [(shared[s].double(), None) for s in range(shared.shape[0])]
        if in_batch:
            for j in range(n):
                if j == i:
                    continue
                cands += [(p[j, kk], None if pid is None else pid[j][kk]) for kk in range(k)]
                for mm in range(m):
                    if real(j, mm):
                        cands.append((neg[j, mm], None if nid is None else nid[j][mm]))
        own = set() if pid is None else set(pid[i])
        negs = [similarity(sim, a[i], c) / tau for c, cid in cands if cid is None or cid not in own]
        for kk in range(k):
            terms.append(term(similarity(sim, a[i], p[i, kk]) / tau, negs))
    if reduction == "none":
        return torch.stack(terms)
    return torch.stack(terms).mean()
