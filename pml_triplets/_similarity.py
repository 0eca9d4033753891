"""The similarity ``s`` of a PML distance, on the blocks the dense engine needs, linear in the pairs it compares.

NT-Xent enters a distance negated (``s = -d``) and a similarity as it is, after ``distance.maybe_normalize`` and
``** distance.power`` -- exactly what ``BaseDistance.forward`` computes, but only for the pairs asked for:

* ``rows(q, r)``: ``q`` (C, d) against its own rows ``r`` (C, M, d) -> (C, M) (an anchor's positives, its negatives);
* ``block(q, r)``: ``q`` (C, d) against every row of ``r`` (R, d) -> (C, R) (shared and in-batch candidates).

* ``raw_rows(a, [p, n])``: the same for anchors and rows as given (the cosine and a plain dot product): the cosine
  normalizes both on the fly, in one call (``._fused.cosine_rows``): no normalized copy of the (C, M, d)
  negatives, the largest tensor of a per-anchor call, nor of the anchors.

``compute_mat`` is only ever called on 2-D inputs (PML before 2.9 rejects 3-D ones); for a distance the module does
not know, ``rows`` maps it over the anchors with ``torch.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)

from ._fused import cosine_rows, unit

__all__: list[str] = []  # private module

Kind = Literal["dot", "lp", "snr", "generic"]
"""Which of PML's ``compute_mat`` a distance keeps: the dot product (``DotProductSimilarity``, ``CosineSimilarity``),
``LpDistance``'s, ``SNRDistance``'s, or one of its own (``"generic"``: only the distance's own methods compute it)."""

SimilarityName = Literal["cosine", "dot", "euclidean"]
NAMED: dict[str, Callable[[], BaseDistance]] = {  # the ``similarity=`` names of ``reference_infonce``
    "cosine": CosineSimilarity,
    "dot": lambda: DotProductSimilarity(normalize_embeddings=False),
    "euclidean": lambda: LpDistance(normalize_embeddings=False),
}


def kind_of(distance: BaseDistance | None) -> Kind:
    """The one dispatch on a distance's kind, for the engine, the drop-in and the reference.

    ``None`` is the default cosine similarity: ``"dot"`` on unit rows.

    Example:
        >>> from pytorch_metric_learning.distances import CosineSimilarity, LpDistance, SNRDistance
        >>> kind_of(None), kind_of(CosineSimilarity()), kind_of(LpDistance()), kind_of(SNRDistance())
        ('dot', 'dot', 'lp', 'snr')
    """
    if distance is None:
        return "dot"
    mat = type(distance).compute_mat
    if mat is DotProductSimilarity.compute_mat:
        return "dot"
    if mat is LpDistance.compute_mat:
        return "lp"
    return "snr" if mat is SNRDistance.compute_mat else "generic"


@dataclass(frozen=True)
class Similarity:
    """How to compute ``s`` for one distance; ``distance=None`` is the default cosine similarity."""

    distance: BaseDistance | None
    kind: Kind

    @classmethod
    def of(cls, distance: BaseDistance | None) -> Similarity:
        return cls(distance, kind_of(distance))

    @property
    def linear(self) -> bool:
        """``s(q, r) = <q, r>`` on normalized inputs: ``1/τ`` can be folded into the anchors."""
        return self.kind == "dot" and (self.distance is None or self.distance.power == 1)

    @property
    def cosine(self) -> bool:
        """``s`` is the cosine similarity."""
        d = self.distance
        return self.linear and (d is None or (bool(d.normalize_embeddings) and d.p == 2))

    @property
    def fused(self) -> bool:
        """``rows`` takes raw rows: the cosine similarity (normalized by ``F.normalize``'s rule), or a plain dot."""
        plain = self.distance is None or _plain(self.distance)
        return self.linear and plain and (self.cosine or not self.normalizes)

    @property
    def normalizes(self) -> bool:
        return self.distance is None or bool(self.distance.normalize_embeddings)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Rows normalized as the distance would (over the last dim), or ``x`` unchanged."""
        d = self.distance
        if d is None or (self.normalizes and d.p == 2 and _plain(d)):  # F.normalize(x, dim=-1)'s rule
            return unit(x)
        return cast(torch.Tensor, d.maybe_normalize(x, dim=-1))

    def _finish(self, mat: torch.Tensor) -> torch.Tensor:
        if self.distance is None:
            return mat
        if self.distance.power != 1:
            mat = mat**self.distance.power
        return mat if self.distance.is_inverted else -mat

    def rows(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``s(q[c], r[c, j])`` for normalized ``q`` (C, d) and ``r`` (C, J, d) -> (C, J)."""
        if self.kind == "dot":  # (C, 1, d) x (C, d, J): a batched gemv twice as fast as (C, J, d) x (C, d, 1)
            mat = torch.matmul(q[:, None, :], r.mT).squeeze(1)  # (C, J)
        elif self.kind == "lp":
            assert self.distance is not None
            mat = torch.cdist(q[:, None], r, p=self.distance.p).squeeze(1)  # (C, J)
        else:  # ("snr" too: its compute_mat, as any other distance's)
            mat = self._generic_rows(q, r)
        return self._finish(mat)

    def raw_rows(self, a: torch.Tensor, rows: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        """``scale * s(a[c], r[c, j])`` (C, J) for ``a`` (C, d) and each ``r`` of ``rows`` (C, J, d), all as given.

        Only where ``fused``: the cosine normalizes anchors and rows on the fly, in one call; a plain dot takes
        them as they are (a dot product is never inverted: no sign to apply). ``scale``: a number (the caller's
        ``1/τ``) multiplying the (C, J) similarities.
        """
        if self.normalizes:
            return cosine_rows(a, rows, scale)
        out = [torch.matmul(a[:, None, :], r.to(a.dtype).mT).squeeze(1) for r in rows]  # (half rows: cast)
        return out if scale == 1.0 else [x * scale for x in out]

    def _generic_rows(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``compute_mat`` of each anchor with its own rows, mapped with vmap, else one anchor at a time.

        The loop is for a distance that reads its values (``if torch.isnan(m).any(): ...``), which vmap cannot
        batch.
        """
        assert self.distance is not None
        try:
            return cast(torch.Tensor, torch.vmap(self.distance.compute_mat)(q[:, None], r).squeeze(1))  # (C, J)
        except RuntimeError:
            return torch.stack([self.distance.compute_mat(q[i : i + 1], r[i])[0] for i in range(q.shape[0])])

    def block(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``s(q[c], r[j])`` for normalized ``q`` (C, d) and ``r`` (R, d) -> (C, R)."""
        if self.kind == "dot":
            mat = q @ r.T
        elif self.kind == "lp":
            assert self.distance is not None
            mat = torch.cdist(q, r, p=self.distance.p)
        else:
            assert self.distance is not None
            mat = self.distance.compute_mat(q, r)
        return self._finish(mat)


def _plain(distance: BaseDistance) -> bool:
    """Whether ``distance`` normalizes as ``BaseDistance`` does (``F.normalize``), not by a method of its own."""
    kind = type(distance)
    return kind.normalize is BaseDistance.normalize and kind.maybe_normalize is BaseDistance.maybe_normalize
