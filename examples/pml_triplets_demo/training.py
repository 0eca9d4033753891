"""Training: the steps of each epoch (fresh triplets, every image an anchor once) and Adam on ``pt.infonce``.

``train`` forwards the loss's options, so a notebook comparing options calls it instead of writing its own loop::

    train(model, x, y, loss_options={"in_batch": True, "false_negative_margin": 0.1}, guide=guide_embeddings)
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import torch
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

import pml_triplets as pt

from .triplets import NegativeMode, check_labels, fewest_other_class, hard_negative_pool, make_triplets

if TYPE_CHECKING:
    from tqdm import tqdm

Objective = Literal["infonce", "article-recipe"]

EPOCHS = 20
NEGATIVES = 8
TEMPERATURE = 0.1
BATCH_SIZE = 128
LR = 3e-3
HARD_POOL_FACTOR = 4  # hard negatives of an anchor are drawn from its HARD_POOL_FACTOR * M nearest

# pt.infonce options that train fills in per batch itself: the argument of train to give instead.
PER_BATCH = {
    "temperature": "temperature",
    "guide": "guide",
    "positive_ids": "ids",
    "negative_ids": "ids",
}


class Batch(NamedTuple):
    """One training step's images, as indices into the training set."""

    anchors: torch.Tensor  # [B]
    positives: torch.Tensor  # [B]
    negatives: torch.Tensor  # [B, M]


@dataclass(frozen=True)
class History:
    """Training losses, one per optimizer step.

    Attributes:
        step_losses: the loss of every minibatch, in order.
        steps_per_epoch: minibatches per epoch.
    """

    step_losses: list[float]
    steps_per_epoch: int

    @property
    def epoch_losses(self) -> list[float]:
        """Mean minibatch loss of each epoch."""
        k = self.steps_per_epoch
        return [math.fsum(self.step_losses[i : i + k]) / k for i in range(0, len(self.step_losses), k)]


def batches(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = EPOCHS,
    negatives: int = NEGATIVES,
    mode: NegativeMode = "hard",
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
) -> Iterator[Batch]:
    """The steps :func:`train` takes, in order: fresh triplets each epoch, every image an anchor once per epoch.

    The same arguments give the same steps (the first is ``next(batches(...))``). Hard negatives come from each
    anchor's ``HARD_POOL_FACTOR * negatives`` nearest other-class images (:func:`hard_negative_pool`).

    Args:
        x: ``[N, D]`` training features (for the hard-negative pool).
        labels: ``[N]`` training classes.
        epochs: passes over the anchors.
        negatives: negatives per anchor M.
        mode: ``"hard"`` or ``"random"`` negatives (see :func:`make_triplets`).
        batch_size: anchors per step.
        seed: seed of the triplets and the anchor order.
    """
    n = check_labels(labels, len(x))
    pool = None
    if mode == "hard":
        pool = hard_negative_pool(x, labels, min(HARD_POOL_FACTOR * negatives, fewest_other_class(labels)))
    return _steps(labels, n, epochs, negatives, mode, batch_size, pool, torch.Generator().manual_seed(seed))


def _steps(
    labels: torch.Tensor,
    n: int,
    epochs: int,
    negatives: int,
    mode: NegativeMode,
    batch_size: int,
    pool: torch.Tensor | None,
    generator: torch.Generator,
) -> Iterator[Batch]:
    for _ in range(epochs):
        trip = make_triplets(labels, negatives, mode=mode, generator=generator, pool=pool)
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            yield Batch(rows, trip.positives[rows], trip.negatives[rows])


def train(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = EPOCHS,
    negatives: int = NEGATIVES,
    mode: NegativeMode = "hard",
    temperature: float = TEMPERATURE,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    objective: Objective = "infonce",
    loss_options: Mapping[str, Any] | None = None,
    guide: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    progress: bool = False,
) -> History:
    """Train ``model`` in place with Adam on the steps of :func:`batches`; it is left in eval mode.

    Each step embeds anchors ``[B]``, positives ``[B]`` and negatives ``[B, M]`` with ``model`` and calls
    ``pt.infonce(a, p, n, temperature=temperature, **loss_options)``, adding the batch's rows of ``guide`` and
    ``ids`` when given.

    Args:
        model: maps ``[B, D]`` to ``[B, d]``.
        x: ``[N, D]`` training features.
        labels: ``[N]`` training classes.
        epochs: passes over the anchors.
        negatives: negatives per anchor M.
        mode: ``"hard"`` or ``"random"`` negatives (see :func:`make_triplets`).
        temperature: InfoNCE temperature.
        batch_size: anchors per step; each step embeds ``batch_size * (2 + M)`` images.
        lr: Adam learning rate.
        seed: seed of the triplets and the anchor order (the weights are seeded by :func:`make_embedder`).
        objective: ``"infonce"`` (``pt.infonce``) or ``"article-recipe"`` (:func:`article_recipe_loss`,
            mis-paired; it takes no loss options).
        loss_options: keyword arguments of ``pt.infonce`` passed at every step, such as ``in_batch``,
            ``directions``, ``partition``, ``hardness_mode``, ``hardness_strength``, ``false_negative_margin``.
        guide: ``[N, g]`` guide embeddings of the training images (from a guide model, ``embed(guide_model, x)``,
            or the pixels themselves); each step passes ``guide=(guide[a], guide[p], guide[n])`` of its images.
        ids: ``[N]`` an id of each training image (its class: the label oracle); each step passes the ids of its
            positives and negatives as ``positive_ids`` / ``negative_ids``, so no candidate sharing the id of an
            anchor's positive is its negative.
        progress: report each epoch's mean loss on stderr: a tqdm bar when stderr is a terminal, otherwise one
            line per epoch (``epoch 3/20  loss 0.1234``), which logs and notebooks keep readable.

    Returns:
        The loss of every step (:class:`History`).
    """
    options = _check_loss_options(objective, loss_options, guide, ids, len(x))
    steps = batches(x, labels, epochs=epochs, negatives=negatives, mode=mode, batch_size=batch_size, seed=seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bar = _progress_bar(epochs) if progress and sys.stderr.isatty() else None
    losses: list[float] = []
    model.train()
    for batch in steps:
        loss = _step_loss(model, x, batch, temperature, objective, options, guide, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) % steps_per_epoch == 0:
            mean = math.fsum(losses[-steps_per_epoch:]) / steps_per_epoch
            if bar is not None:
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                bar.update()
            elif progress:
                print(f"epoch {len(losses) // steps_per_epoch}/{epochs}  loss {mean:.4f}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    return History(losses, steps_per_epoch)


def article_recipe_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The recipe as the article publishes it, mis-pairing included.

    ``NTXentLoss`` over ``pt.concat_embeddings`` with ``repeat``-built indices. It compares anchor ``j % N`` with
    negative row ``j``, which belongs to anchor ``j // M``: anchors meet other anchors' negatives (possibly of their
    own class), not their own.

    Args:
        anchors: ``[N, d]``.
        positives: ``[N, d]``.
        negatives: ``[N, M, d]``.
        temperature: NT-Xent temperature.

    Returns:
        A 0-d tensor.
    """
    n, m = negatives.shape[:2]
    dev = anchors.device
    a = torch.arange(n, device=dev).repeat(m)  # the bug: repeat_interleave(m) is right
    p = torch.arange(n, 2 * n, device=dev).repeat(m)
    neg = torch.arange(2 * n, 2 * n + n * m, device=dev)
    emb = pt.concat_embeddings(anchors, positives, negatives)
    return cast(torch.Tensor, NTXentLoss(temperature=temperature)(emb, indices_tuple=(a, p, neg)))


def _check_loss_options(
    objective: str,
    loss_options: Mapping[str, Any] | None,
    guide: torch.Tensor | None,
    ids: torch.Tensor | None,
    n: int,
) -> dict[str, Any]:
    """The options to pass to every step, after checking them against ``objective`` and the training set size."""
    options = dict(loss_options or {})
    if objective not in ("infonce", "article-recipe"):
        raise ValueError(f"`objective` must be 'infonce' or 'article-recipe'; got {objective!r}")
    given = [
        name for name, value in (("loss_options", options or None), ("guide", guide), ("ids", ids)) if value is not None
    ]
    if objective == "article-recipe" and given:
        raise ValueError(f"`objective='article-recipe'` takes no loss options; got {', '.join(given)}")
    if clash := sorted(options.keys() & PER_BATCH.keys()):
        key = clash[0]
        raise ValueError(f"`loss_options` must not set {key!r}: train fills it in per batch from `{PER_BATCH[key]}`")
    if guide is not None and (guide.ndim != 2 or len(guide) != n):
        raise ValueError(f"`guide` must be [N, g] = [{n}, g], one row per training image; got {tuple(guide.shape)}")
    if ids is not None and (ids.ndim != 1 or len(ids) != n):
        raise ValueError(f"`ids` must be [N] = [{n}], one id per training image; got {tuple(ids.shape)}")
    return options


def _step_loss(
    model: nn.Module,
    x: torch.Tensor,
    batch: Batch,
    temperature: float,
    objective: Objective,
    options: Mapping[str, Any],
    guide: torch.Tensor | None,
    ids: torch.Tensor | None,
) -> torch.Tensor:
    """The loss of one step: embeds its ``[B]`` anchors, ``[B]`` positives and ``[B, M]`` negatives."""
    rows, pos, neg = batch
    a = model(x[rows])  # (B, d)
    p = model(x[pos])  # (B, d)
    n = model(x[neg.reshape(-1)]).reshape(*neg.shape, -1)  # (B, M, d)
    if objective == "article-recipe":
        return article_recipe_loss(a, p, n, temperature)
    per_batch: dict[str, Any] = {}
    if guide is not None:
        per_batch["guide"] = (guide[rows], guide[pos], guide[neg])  # (B, g), (B, g), (B, M, g)
    if ids is not None:
        per_batch |= {"positive_ids": ids[pos], "negative_ids": ids[neg]}  # (B,), (B, M)
    return pt.infonce(a, p, n, temperature=temperature, **options, **per_batch)


def _progress_bar(epochs: int) -> tqdm[int]:
    """A tqdm bar over epochs on stderr (tqdm is imported here: it is an optional dependency)."""
    from tqdm import tqdm

    return tqdm(total=epochs, desc="training", unit="epoch", file=sys.stderr)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
