"""The triplets: for every image of a labelled set, a same-class positive and M other-class negatives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NegativeMode = Literal["hard", "random"]


@dataclass(frozen=True)
class Triplets:
    """One epoch of predefined triplets over a training set; anchor ``i`` is training image ``i``.

    Attributes:
        positives: ``[N]`` int64, a same-class image other than ``i``.
        negatives: ``[N, M]`` int64, images of other classes.
    """

    positives: torch.Tensor
    negatives: torch.Tensor


def hard_negative_pool(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's ``k`` nearest images of another class, by Euclidean distance between raw pixel vectors.

    Args:
        x: ``[N, D]`` features.
        labels: ``[N]`` integer classes.
        k: pool size per image; at most the smallest number of other-class images.

    Returns:
        ``[N, k]`` int64 indices into ``x``, nearest first.
    """
    check_labels(labels, len(x))
    fewest = fewest_other_class(labels)
    if not 1 <= k <= fewest:
        raise ValueError(f"`k` must be in [1, {fewest}] (the fewest other-class images of any image); got {k}")
    dist = torch.cdist(x.double(), x.double())  # float64 so near-ties are ordered the same on every machine
    dist[labels[:, None] == labels[None, :]] = math.inf
    return dist.topk(k, dim=1, largest=False).indices


def make_triplets(
    labels: torch.Tensor,
    m: int,
    *,
    mode: NegativeMode = "hard",
    generator: torch.Generator,
    pool: torch.Tensor | None = None,
) -> Triplets:
    """Draw a same-class positive and ``m`` other-class negatives for every image of a labelled set.

    Args:
        labels: ``[N]`` integer classes; every class needs at least two images.
        m: negatives per anchor M.
        mode: ``"hard"``: M distinct negatives drawn uniformly from the anchor's row of ``pool`` (see
            :func:`hard_negative_pool`); ``"random"``: M negatives drawn uniformly, with replacement, from all
            images of other classes.
        generator: the source of randomness (CPU).
        pool: ``[N, k]`` candidate negatives with ``k >= m``; required for ``"hard"``.

    Returns:
        Indices into the labelled set: positives ``[N]``, negatives ``[N, M]``.
    """
    n = check_labels(labels, None)
    order, start, count, rank = _class_layout(labels)
    if int(count[count > 0].min()) < 2:
        raise ValueError("every class needs at least two images, or some anchor has no positive")
    c_start, c_count = start[labels], count[labels]

    # A uniform draw among the other c_count - 1 members of the anchor's class: skip over the anchor itself.
    r = _uniform_below(c_count - 1, (n,), generator)
    r = r + (r >= rank - c_start).long()
    positives = order[c_start + r]

    if mode == "hard":
        if pool is None or pool.ndim != 2 or pool.shape[0] != n or not m <= pool.shape[1]:
            raise ValueError(f"`mode='hard'` needs `pool` of shape [{n}, k] with k >= m = {m}")
        pick = torch.rand(n, pool.shape[1], generator=generator).argsort(dim=1)[:, :m]
        negatives = pool.gather(1, pick)
    elif mode == "random":
        # Index the other-class images as order[:start] ++ order[start + count:], skipping the anchor's class.
        r = _uniform_below((n - c_count)[:, None].expand(n, m), (n, m), generator)
        negatives = order[r + c_count[:, None] * (r >= c_start[:, None]).long()]
    else:
        raise ValueError(f"`mode` must be 'hard' or 'random'; got {mode!r}")
    return Triplets(positives, negatives)


def fewest_other_class(labels: torch.Tensor) -> int:
    """The smallest number of other-class images any image has: the most hard negatives an anchor can have."""
    count = torch.bincount(labels)
    return len(labels) - int(count.max())


def check_labels(labels: torch.Tensor, n: int | None) -> int:
    """The length of ``labels``, a 1-D integer tensor (of length ``n`` when given); ``ValueError`` otherwise."""
    if labels.ndim != 1 or labels.is_floating_point() or (n is not None and len(labels) != n):
        raise ValueError(f"`labels` must be a 1-D integer tensor of length {n}; got {tuple(labels.shape)}")
    return len(labels)


def _class_layout(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images sorted by class.

    Returns ``order`` ``[N]``, each class's ``start`` and ``count`` ``[C]``, and ``rank`` ``[N]``, the position of
    each image in ``order``.
    """
    order = torch.argsort(labels, stable=True)
    count = torch.bincount(labels)
    start = count.cumsum(0) - count
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return order, start, count, rank


def _uniform_below(high: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in ``[0, high)``, elementwise (``high`` broadcasts to ``shape``).

    float64 keeps the product below ``high``.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (u * high).long().clamp_max(high - 1)
