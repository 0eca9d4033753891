"""The article's recipe done right: one embedding matrix and a 3-tuple of indices for ``NTXentLoss``.

The recipe in circulation concatenates ``[anchors, positives, negatives.reshape(-1, d)]`` and builds
``a = arange(N).repeat(M)``. Row ``2N + j`` of that matrix is negative ``j % M`` of anchor ``j // M``, but
``repeat`` gives ``a[j] = j % N``: anchors are compared with *other anchors'* negatives. ``repeat_interleave(M)``
gives ``a[j] = j // M``, the anchor that owns the negative. ``pairing_matrix`` shows the difference.
"""

from __future__ import annotations

import numbers

import torch

from ._validation import check_inputs

__all__ = ["build_indices", "concat_embeddings", "pairing_matrix"]

IndicesTuple = tuple[torch.Tensor, ...]


def concat_embeddings(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Stack anchors, positives and negatives into the matrix that ``build_indices`` indexes.

    Args:
        anchors: ``[N, d]``.
        positives: ``[N, d]``.
        negatives: ``[N, M, d]``, negatives ``[i, :]`` belonging to anchor ``i``.

    Returns:
        ``[2N + N*M, d]``: rows ``0..N-1`` anchors, ``N..2N-1`` positives, then ``2N + i*M + j`` is negative ``j``
        of anchor ``i`` (row-major).

    Example:
        >>> import torch, pml_triplets as pt
        >>> from pytorch_metric_learning.losses import NTXentLoss
        >>> a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3, 8)
        >>> emb = pt.concat_embeddings(a, p, n)
        >>> emb.shape
        torch.Size([20, 8])
        >>> loss = NTXentLoss()(emb, indices_tuple=pt.build_indices(4, 3))
        >>> torch.allclose(loss, pt.reference_infonce(a, p, n), atol=1e-5)
        True
    """
    spec = check_inputs(anchors, positives, negatives)
    if positives.ndim != 2:
        raise ValueError(
            f"`positives` must be [N, d] = [{spec.n}, {spec.d}] here (one positive per anchor); "
            f"got {tuple(positives.shape)}; use pml_triplets.infonce for K positives"
        )
    return torch.cat([anchors, positives, negatives.reshape(-1, spec.d)])  # (2N + N*M, d)


def build_indices(
    n: int, m: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(a, p, n)`` 3-tuple for ``NTXentLoss`` over ``concat_embeddings``'s layout.

    Every anchor index and positive index is repeated once per negative with ``repeat_interleave`` -- *not*
    ``repeat``, which pairs anchor ``j % N`` with negative row ``j`` owned by anchor ``j // M``.

    PML turns a 3-tuple into the pairs ``(a, p)`` and ``(a, n)``; each anchor's positive pair appears M times,
    each time with that anchor's M negatives, so the mean over pairs is the mean over anchors. PML returns a zero
    loss with no gradient when every index tensor has length <= 1 (``n = m = 1``): use ``infonce`` there.

    Args:
        n: number of anchors N.
        m: negatives per anchor M.
        device: where the index tensors live; must be the embeddings' device.

    Returns:
        Three ``[N*M]`` int64 tensors ``a``, ``p``, ``n``.

    Example:
        >>> import pml_triplets as pt
        >>> a, p, n = pt.build_indices(2, 3)
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 5, 6, 7, 8, 9])
    """
    n = check_size("n", n)
    m = check_size("m", m)
    rows = torch.arange(n, device=device).repeat_interleave(m)  # (N*M,): the anchor that owns each negative
    return rows, n + rows, 2 * n + torch.arange(n * m, device=device)


def pairing_matrix(indices_tuple: IndicesTuple, n: int, m: int) -> torch.Tensor:
    """Which negatives each anchor is compared with, under an indices tuple over ``concat_embeddings``.

    Entry ``[i, j]`` is ``True`` when NTXentLoss compares anchor ``i`` with negative row ``2N + j`` (negative
    ``j % M`` of anchor ``j // M``): there is a negative pair ``(i, 2N + j)`` and anchor ``i`` has a positive pair.
    For correct indices the matrix is block-diagonal; an entry off the diagonal blocks is a mis-pairing.

    Both of PML's forms: a 3-tuple ``(a, p, n)`` is the positive pairs ``(a, p)`` and the negative pairs ``(a, n)``;
    a 4-tuple ``(a1, p, a2, n)`` the positive pairs ``(a1, p)`` and the negative pairs ``(a2, n)``. The recipe's
    mistake is ``.repeat(M)`` for the negatives' anchors in either: ``a`` in the 3-tuple, ``a2`` in the 4-tuple.

    Args:
        indices_tuple: a 3-tuple ``(a, p, n)`` or 4-tuple ``(a1, p, a2, n)`` of index tensors, as PML takes them.
        n: number of anchors N.
        m: negatives per anchor M.

    Returns:
        ``[N, N*M]`` bool (on the CPU).

    Example:
        >>> import torch, pml_triplets as pt
        >>> N, M = 2, 2
        >>> pt.pairing_matrix(pt.build_indices(N, M), N, M).int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
        >>> recipe = (torch.arange(N).repeat(M), torch.arange(N, 2 * N).repeat(M), torch.arange(2 * N, 2 * N + N * M))
        >>> pt.pairing_matrix(recipe, N, M).int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1]]

        The same recipe as a 4-tuple ``(a1, p, a2, n)``, and its fix, ``a2`` with ``repeat_interleave``:

        >>> a1, p, n = torch.arange(N), torch.arange(N, 2 * N), torch.arange(2 * N, 2 * N + N * M)
        >>> pt.pairing_matrix((a1, p, torch.arange(N).repeat(M), n), N, M).int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1]]
        >>> pt.pairing_matrix((a1, p, torch.arange(N).repeat_interleave(M), n), N, M).int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
    """
    n = check_size("n", n)
    m = check_size("m", m)
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError("`indices_tuple` must be a 3-tuple (a, p, n) or a 4-tuple (a1, p, a2, n) of tensors")
    parts = []
    for name, t in zip(
        ("a", "p", "n") if len(indices_tuple) == 3 else ("a1", "p", "a2", "n"), indices_tuple, strict=True
    ):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.ndim != 1:
            raise TypeError(f"`indices_tuple` entry `{name}` must be a 1-D integer tensor; got {t!r:.80}")
        parts.append(t.detach().long().cpu())
    a1, _, a2, neg = (parts[0], parts[1], parts[0], parts[2]) if len(parts) == 3 else tuple(parts)
    if len(a2) != len(neg):
        raise ValueError(f"`indices_tuple` anchors and negatives differ in length: {len(a2)} vs {len(neg)}")
    col = neg - 2 * n
    keep = (a2 >= 0) & (a2 < n) & (col >= 0) & (col < n * m)  # pairs whose ends are an anchor and a negative
    has_pos = torch.zeros(n, dtype=torch.bool)
    has_pos[a1[(a1 >= 0) & (a1 < n)]] = True
    out = torch.zeros(n, n * m, dtype=torch.bool)
    out[a2[keep], col[keep]] = True
    return out & has_pos[:, None]


def check_size(name: str, value: object) -> int:
    """A non-negative integer (``numbers.Integral``, numpy's included; ``bool`` excluded), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0; got {value}")
    return int(value)
