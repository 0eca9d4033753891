"""ANCE-style hard negatives on the digits: re-mined every epoch by the model being trained, with ``pt.mine_negatives``.

    python examples/mine_digits.py [--seeds 0 1 2 3 4] [--epochs 20] [--negatives 8] [--arms mined,random,...]

ANCE (Xiong et al. 2021, "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval")
draws each query's negatives from its nearest neighbours under the model being trained, refreshed as the model
moves. Here, on the digits demo (``examples/pml_triplets_demo``: its split, 64-128-64 MLP, triplet schedule,
temperature and held-out MAP@R), four arms train the same MLP from the same seed with the same budget -- epochs,
batch size, Adam, learning rate, temperature, one same-class positive per anchor:

* ``mined`` -- at the start of every epoch the training images are embedded by the model being trained and
  ``pt.mine_negatives(emb, emb, POOL * M, positive_ids=<every image of the anchor's class>)`` returns each image's
  ``POOL * M`` nearest images by cosine similarity that are not of its class (exact, over the whole training set);
  each anchor's M negatives are drawn from that pool, as the demo draws its hard negatives.
* ``pixel`` -- the demo's default: the same draw from a pool mined once, before training, in pixel space.
* ``random`` -- M negatives drawn uniformly from all images of other classes.
* ``in-batch`` -- no negatives of the anchor's own: every other anchor's positive in the batch
  (``pt.infonce(a, p, None, in_batch=True)``), of whatever class, as a plain in-batch loss has them.

"Hard but not false" with labels: a negative is never of the anchor's class. The positives passed to the miner are
all the images of that class (its ``[N, P]`` argument, ``-1`` padding the smaller classes), so neither the anchor
itself nor any image of its class can be mined.

It prints held-out MAP@R and precision@1 per seed, their mean ± standard deviation per arm, and each arm's
difference from ``mined`` seed by seed (same seed: same initial weights), with how many seeds favour ``mined``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

import pml_triplets as pt
from pml_triplets_demo import embed, evaluate, load_digits_split, make_embedder
from pml_triplets_demo.training import BATCH_SIZE, EPOCHS, HARD_POOL_FACTOR, LR, NEGATIVES, TEMPERATURE, torch_threads
from pml_triplets_demo.triplets import NegativeMode, fewest_other_class, hard_negative_pool, make_triplets

ARMS = ("mined", "pixel", "random", "in-batch")
MAP_R, P_AT_1 = "mean_average_precision_at_r", "precision_at_1"


def class_members(labels: torch.Tensor) -> torch.Tensor:
    """Every image's class-mates, itself included: ``[N, P]`` int64 indices, ``-1`` padding (P, the largest class).

    >>> class_members(torch.tensor([0, 1, 0])).tolist()
    [[0, 2], [1, -1], [0, 2]]
    """
    n = len(labels)
    width = int(torch.bincount(labels).max())
    order = torch.argsort(labels, stable=True)  # images grouped by class
    sorted_labels = labels[order]
    start = torch.searchsorted(sorted_labels, sorted_labels, side="left")  # (N,) where each image's class begins
    rank = torch.arange(n) - start  # position inside its class
    table = torch.full((int(labels.max()) + 1, width), -1, dtype=torch.long)  # (classes, P)
    table[sorted_labels, rank] = order
    return table[labels]  # (N, P)


def mine_pool(model: nn.Module, x: torch.Tensor, members: torch.Tensor, size: int) -> torch.Tensor:
    """Each training image's ``size`` nearest other-class images under ``model``, by cosine: ``[N, size]`` indices.

    Args:
        model: the embedder being trained (put in eval mode for the embedding, left there).
        x: ``[N, D]`` training features, queries and corpus at once.
        members: ``[N, P]`` each image's class-mates (:func:`class_members`): never negatives.
        size: pool size per image, at most the fewest other-class images of any image.
    """
    emb = embed(model, x)  # (N, d)
    mined = pt.mine_negatives(emb, emb, size, positive_ids=members)
    if not bool(mined.mask.all()):
        raise RuntimeError(f"fewer than {size} other-class images for some image")
    return mined.ids


def train_arm(
    x: torch.Tensor,
    labels: torch.Tensor,
    arm: str,
    *,
    seed: int = 0,
    epochs: int = EPOCHS,
    negatives: int = NEGATIVES,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    temperature: float = TEMPERATURE,
) -> tuple[nn.Module, float]:
    """Train the demo's MLP on one arm (see the module doc); return it (eval mode) and the seconds spent mining.

    Args:
        x: ``[N, D]`` training features.
        labels: ``[N]`` training classes.
        arm: one of ``ARMS``.
        seed: seed of the weights, the triplets and the batch order.
        epochs: passes over the anchors; ``mined`` mines before each.
        negatives: negatives per anchor M (unused by ``in-batch``).
        batch_size: anchors per step.
        lr: Adam learning rate.
        temperature: InfoNCE temperature.
    """
    if arm not in ARMS:
        raise ValueError(f"`arm` must be one of {', '.join(ARMS)}; got {arm!r}")
    size = min(HARD_POOL_FACTOR * negatives, fewest_other_class(labels))
    if negatives > size:
        raise ValueError(f"`negatives` must be at most {size}; got {negatives}")
    model = make_embedder(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    members = class_members(labels)
    pool = hard_negative_pool(x, labels, size) if arm == "pixel" else None
    mining = 0.0
    for _ in range(epochs):
        if arm == "mined":
            start = time.perf_counter()
            pool = mine_pool(model, x, members, size)
            mining += time.perf_counter() - start
        mode: NegativeMode = "hard" if pool is not None else "random"
        trip = make_triplets(labels, negatives, mode=mode, generator=generator, pool=pool)
        model.train()
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            a = model(x[rows])  # (B, d)
            p = model(x[trip.positives[rows]])  # (B, d)
            if arm == "in-batch":
                loss = pt.infonce(a, p, None, in_batch=True, temperature=temperature)
            else:
                neg = trip.negatives[rows]  # (B, M)
                n = model(x[neg.reshape(-1)]).reshape(*neg.shape, -1)  # (B, M, d)
                loss = pt.infonce(a, p, n, temperature=temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, mining


def mean_std(values: Sequence[float]) -> str:
    """``mean ± standard deviation`` (sample; 0 for one value), four decimals."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def summary(scores: dict[str, list[dict[str, float]]]) -> str:
    """The table: per arm, mean ± std of P@1 and MAP@R, and MAP@R minus ``mined``'s seed by seed."""
    lines = ["| arm | P@1 | MAP@R | Δ MAP@R vs mined, seed by seed |", "|---|---|---|---|"]
    for arm, runs in scores.items():
        delta = ""
        if arm != "mined" and "mined" in scores:
            diffs = [r[MAP_R] - m[MAP_R] for r, m in zip(runs, scores["mined"], strict=True)]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            below = sum(d < 0 for d in diffs)
            delta = f"{statistics.fmean(diffs):+.4f} ± {sd:.4f}, mined higher on {below}/{len(diffs)}"
        p_at_1, map_r = mean_std([r[P_AT_1] for r in runs]), mean_std([r[MAP_R] for r in runs])
        lines.append(f"| {arm} | {p_at_1} | {map_r} | {delta} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Train every arm on every seed; print each run's held-out scores and the summary table.

    Returns:
        For each arm, one ``{"precision_at_1": ..., "mean_average_precision_at_r": ...}`` per seed, in order.
    """
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run per arm and seed")
    parser.add_argument("--epochs", type=_positive, default=EPOCHS, help="passes over the training anchors")
    parser.add_argument("--negatives", "-m", type=_positive, default=NEGATIVES, help="negatives per anchor M")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"a subset of {','.join(ARMS)}")
    parser.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads (tiny matrices: 1)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"--arms: unknown {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    with torch_threads(args.threads):
        return _run(args, arms)


def _run(args: argparse.Namespace, arms: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    start = time.perf_counter()
    split = load_digits_split()
    print(
        f"digits: {len(split.y_train)} train / {len(split.y_test)} held-out images; MLP 64-128-64; M={args.negatives}, "
        f"{args.epochs} epochs, temperature {TEMPERATURE}, batch {BATCH_SIZE}; seeds {' '.join(map(str, args.seeds))}",
        flush=True,
    )
    scores: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            model, mining = train_arm(
                split.x_train, split.y_train, arm, seed=seed, epochs=args.epochs, negatives=args.negatives
            )
            result = evaluate(embed(model, split.x_test), split.y_test)
            scores[arm].append(result)
            extra = f"  (mining {mining:.2f} s)" if arm == "mined" else ""
            print(f"seed {seed} {arm:8s} MAP@R {result[MAP_R]:.4f}  P@1 {result[P_AT_1]:.4f}{extra}", flush=True)
    print(f"\nHeld-out retrieval, mean ± std over {len(args.seeds)} seed(s):\n")
    print(summary(scores))
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return scores


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


if __name__ == "__main__":
    main()
    sys.exit(0)
