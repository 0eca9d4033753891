"""Train a small MLP embedder on scikit-learn's digits with InfoNCE on predefined triplets.

``python -m pml_triplets demo`` runs :func:`main`: it splits the 1,797 bundled 8x8 digit images into a stratified
train set and a held-out set, builds per-anchor triplets (a same-class positive and M other-class negatives, hard
or random), trains a 64 -> 128 -> 64 MLP with :func:`pml_triplets.infonce`, and reports held-out retrieval
(precision@1 and MAP@R from PML's ``AccuracyCalculator``) for raw pixels, the untrained and the trained network.

The building blocks are public so that ``notebooks/train_digits.ipynb`` reuses them::

    split = load_digits_split()
    model = make_embedder(seed=0)
    history = train(model, split.x_train, split.y_train, epochs=20, negatives=8, mode="hard")
    evaluate(embed(model, split.x_test), split.y_test)  # {"precision_at_1": ..., "mean_average_precision_at_r": ...}

matplotlib, tqdm and scikit-learn (the ``demo`` extra) are imported inside the functions that need them, so this
module imports without them (``import pml_triplets`` never imports it); :func:`main` checks for all three before
any work and names the missing ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

from ._cli import run_command
from .indices import concat_embeddings
from .loss import infonce

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from tqdm import tqdm

__all__ = [
    "METRICS",
    "DigitsSplit",
    "History",
    "NegativeMode",
    "Objective",
    "Triplets",
    "add_arguments",
    "article_recipe_loss",
    "embed",
    "evaluate",
    "execute",
    "format_table",
    "hard_negative_pool",
    "load_digits_split",
    "main",
    "make_embedder",
    "make_triplets",
    "pca_2d",
    "plot_loss",
    "plot_projection",
    "save_figure",
    "train",
]

NegativeMode = Literal["hard", "random"]
Objective = Literal["infonce", "article-recipe"]

METRICS = ("precision_at_1", "mean_average_precision_at_r")
SPLIT_SEED = 0  # the held-out set does not move with --seed, so runs are compared on the same images
TEST_SIZE = 0.3
EPOCHS = 20
NEGATIVES = 8
TEMPERATURE = 0.1
BATCH_SIZE = 128
LR = 3e-3
HARD_POOL_FACTOR = 4  # hard negatives of an anchor are drawn from its HARD_POOL_FACTOR * M nearest


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train / held-out split of scikit-learn's digits, pixels scaled to ``[0, 1]``.

    Attributes:
        x_train: ``[N_train, 64]`` float32.
        y_train: ``[N_train]`` int64 class labels 0-9.
        x_test: ``[N_test, 64]`` float32.
        y_test: ``[N_test]`` int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Triplets:
    """One epoch of predefined triplets over a training set; anchor ``i`` is training image ``i``.

    Attributes:
        positives: ``[N]`` int64, a same-class image other than ``i``.
        negatives: ``[N, M]`` int64, images of other classes.
    """

    positives: torch.Tensor
    negatives: torch.Tensor


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


def load_digits_split(test_size: float = TEST_SIZE, seed: int = SPLIT_SEED) -> DigitsSplit:
    """Load the 1,797 digits bundled with scikit-learn (no download) and split them, stratified by class.

    Args:
        test_size: fraction held out.
        seed: ``random_state`` of ``train_test_split``.

    Returns:
        The split; with the defaults 1,257 training and 540 held-out images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)

    def pixels(a: object) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32) / 16.0  # 4-bit grey levels

    def labels(a: object) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return DigitsSplit(pixels(x_tr), labels(y_tr), pixels(x_te), labels(y_te))


def make_embedder(in_dim: int = 64, hidden: int = 128, out_dim: int = 64, seed: int = 0) -> nn.Sequential:
    """A two-layer MLP ``[B, in_dim] -> [B, out_dim]``, initialised from ``seed`` (the global RNG is left alone).

    Args:
        in_dim: input features (64 pixels).
        hidden: hidden width.
        out_dim: embedding size.
        seed: seed of the initial weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def hard_negative_pool(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's ``k`` nearest images of another class, by Euclidean distance between raw pixel vectors.

    Args:
        x: ``[N, D]`` features.
        labels: ``[N]`` integer classes.
        k: pool size per image; at most the smallest number of other-class images.

    Returns:
        ``[N, k]`` int64 indices into ``x``, nearest first.
    """
    _check_labels(labels, len(x))
    fewest = _fewest_other_class(labels)
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
    n = _check_labels(labels, None)
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


def article_recipe_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The recipe as the article publishes it, mis-pairing included.

    ``NTXentLoss`` over :func:`~pml_triplets.concat_embeddings` with ``repeat``-built indices. It compares anchor
    ``j % N`` with negative row ``j``, which belongs to anchor ``j // M``: anchors meet other anchors' negatives
    (possibly of their own class), not their own.

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
    emb = concat_embeddings(anchors, positives, negatives)
    return cast(torch.Tensor, NTXentLoss(temperature=temperature)(emb, indices_tuple=(a, p, neg)))


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
    progress: bool = False,
) -> History:
    """Train ``model`` in place with Adam on fresh triplets each epoch, every image an anchor once per epoch.

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
        objective: ``"infonce"`` (:func:`pml_triplets.infonce`) or ``"article-recipe"``
            (:func:`article_recipe_loss`, mis-paired).
        progress: report each epoch's mean loss on stderr: a tqdm bar when stderr is a terminal, otherwise one
            line per epoch (``epoch 3/20  loss 0.1234``), which logs and notebooks keep readable.

    Returns:
        The loss of every step (:class:`History`).
    """
    if objective not in ("infonce", "article-recipe"):
        raise ValueError(f"`objective` must be 'infonce' or 'article-recipe'; got {objective!r}")
    n = _check_labels(labels, len(x))
    generator = torch.Generator().manual_seed(seed)
    pool = None
    if mode == "hard":
        pool = hard_negative_pool(x, labels, min(HARD_POOL_FACTOR * negatives, _fewest_other_class(labels)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bar = _progress_bar(epochs) if progress and sys.stderr.isatty() else None
    losses: list[float] = []
    model.train()
    for e in range(1, epochs + 1):
        trip = make_triplets(labels, negatives, mode=mode, generator=generator, pool=pool)
        epoch = []
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            loss = _step_loss(model, x, rows, trip, temperature, objective)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch.append(loss.item())
        losses += epoch
        mean = math.fsum(epoch) / len(epoch)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            bar.update()
        elif progress:
            print(f"epoch {e}/{epochs}  loss {mean:.4f}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    model.eval()
    return History(losses, math.ceil(n / batch_size))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode without gradient: ``[N, D] -> [N, d]``."""
    model.eval()
    with torch.no_grad():
        return cast(torch.Tensor, model(x))


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out retrieval by cosine similarity: each image queries all the *other* images of the same set.

    PML's ``AccuracyCalculator`` with ``query = reference`` (each query excluded from its own neighbours) and a
    brute-force ``CustomKNN(CosineSimilarity())`` (no faiss needed).

    Args:
        embeddings: ``[N, d]``.
        labels: ``[N]``.

    Returns:
        ``{"precision_at_1": ..., "mean_average_precision_at_r": ...}``.
    """
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(include=METRICS, knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
    result = calc.get_accuracy(embeddings.detach().cpu().float(), labels.cpu())
    return {k: float(result[k]) for k in METRICS}


def format_table(rows: Mapping[str, Mapping[str, float]], first: str = "embedding", digits: int = 4) -> str:
    """A Markdown table: one row per entry of ``rows``, one column per key of its first value.

    >>> print(format_table({"a": {"x": 0.5, "y": 1.0}, "bb": {"x": 0.25, "y": 0.0}}))
    | embedding | x      | y      |
    |-----------|--------|--------|
    | a         | 0.5000 | 1.0000 |
    | bb        | 0.2500 | 0.0000 |
    """
    columns = list(next(iter(rows.values())))
    cells = [[first, *columns]] + [[name, *(f"{v[c]:.{digits}f}" for c in columns)] for name, v in rows.items()]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Exact PCA of the rows of ``x`` onto their two leading components: ``[N, D] -> [N, 2]``.

    Signs are fixed (each component's largest loading is positive) so the picture does not flip between runs.
    """
    centered = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    comps = vh[:2]  # (2, D)
    sign = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)).sign()
    return cast(torch.Tensor, (centered @ (comps * sign).T).float())


def plot_loss(ax: Axes, history: History) -> None:
    """Per-step loss (thin) and per-epoch mean (dots) against epochs, on a log scale."""
    k = history.steps_per_epoch
    steps = torch.arange(1, len(history.step_losses) + 1) / k
    ax.plot(steps.tolist(), history.step_losses, lw=0.7, alpha=0.5, label="step")
    epochs = list(range(1, len(history.epoch_losses) + 1))
    ax.plot(epochs, history.epoch_losses, "o-", ms=3, label="epoch mean")
    ax.set(xlabel="epoch", ylabel="InfoNCE loss", yscale="log", title="training loss")
    ax.legend()


def plot_projection(ax: Axes, embeddings: torch.Tensor, labels: torch.Tensor, title: str = "") -> None:
    """Scatter of the 2-D PCA of the L2-normalised ``[N, d]`` embeddings, one colour per class.

    A legend of the classes sits outside the axes on the right (labels drawn at the class centroids pile up where
    classes are mixed).
    """
    from matplotlib import colormaps

    xy = pca_2d(torch.nn.functional.normalize(embeddings.float(), dim=1))
    colours = colormaps["tab10"]
    for c in labels.unique().tolist():
        pts = xy[labels == c]
        ax.scatter(pts[:, 0].tolist(), pts[:, 1].tolist(), color=colours(c % 10), s=7, label=str(c))
    ax.legend(
        title="digit", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, markerscale=2.5, fontsize=9
    )
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title or "held-out embeddings (PCA)")


def save_figure(
    history: History, embeddings: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = ""
) -> Path:
    """Write a PNG with the loss curve and the held-out projection, side by side (Agg; pyplot is not touched).

    Args:
        history: from :func:`train`.
        embeddings: ``[N, d]`` held-out embeddings.
        labels: ``[N]``.
        path: the PNG to write; its directory is created.
        title: the figure's title (none if empty).

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    ax_loss, ax_proj = fig.subplots(1, 2)
    plot_loss(ax_loss, history)
    plot_projection(ax_proj, embeddings, labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m pml_triplets demo [options]``: train on digits, print held-out metrics, write a PNG.

    Returns:
        0 on success, 2 for bad arguments or a missing ``demo`` extra.
    """
    return run_command("python -m pml_triplets demo", DESCRIPTION, add_arguments, execute, argv)


SUMMARY = "train a small embedder on scikit-learn's digits with predefined triplets (needs the demo extra)"
DESCRIPTION = (
    "Train a 64-128-64 MLP on scikit-learn's handwritten digits with InfoNCE on predefined triplets "
    "(pml_triplets.infonce), print held-out precision@1 and MAP@R for raw pixels, the untrained and the trained "
    "network, and write the loss curve and a 2-D projection to DIR/digits_demo.png. "
    'Needs the demo extra: pip install "pml-triplets[demo]".'
)
# The demo extra of pyproject.toml: the module each distribution provides.
EXTRA = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``demo``, for its own parser and for the ``python -m pml_triplets`` subcommand.

    ``--hard`` and ``--random`` set one option, ``mode``; only ``--hard``, the default, says so.
    """
    p.add_argument("--epochs", type=_positive_int, default=EPOCHS, help="passes over the training anchors")
    p.add_argument("--negatives", "-m", metavar="M", type=_positive_int, default=NEGATIVES, help="negatives per anchor")
    p.set_defaults(mode="hard")  # before the two flags, whose own default is SUPPRESS: no "(default: ...)" on each
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--hard",
        dest="mode",
        action="store_const",
        const="hard",
        default=argparse.SUPPRESS,
        help=f"hard negatives: drawn from each anchor's {HARD_POOL_FACTOR}*M nearest other-class images in pixel "
        "space (the default)",
    )
    mode.add_argument(
        "--random",
        dest="mode",
        action="store_const",
        const="random",
        default=argparse.SUPPRESS,
        help="random negatives: drawn uniformly from all images of other classes",
    )
    p.add_argument("--temperature", type=_positive_float, default=TEMPERATURE, help="InfoNCE temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, triplets and batch order")
    p.add_argument("--out", metavar="DIR", default="demo_out", help="directory for the PNG")
    p.add_argument("--batch-size", type=_positive_int, default=BATCH_SIZE, help="anchors per step")
    p.add_argument("--lr", type=_positive_float, default=LR, help="Adam learning rate")
    # One thread: the matrices are tiny, and on a busy machine spinning intra-op threads cost up to 10x.
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")


def execute(args: argparse.Namespace) -> int:
    """Run the demo that ``args`` (from :func:`add_arguments`) describe; 2 if the ``demo`` extra is missing."""
    missing = [f"{module} (from {dist})" for module, dist in EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f'error: the demo needs its extra: pip install "pml-triplets[demo]"; missing: {", ".join(missing)}',
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    split = load_digits_split()
    if args.mode == "hard" and args.negatives > _fewest_other_class(split.y_train):
        print(f"error: --negatives must be at most {_fewest_other_class(split.y_train)} with --hard", file=sys.stderr)
        return 2
    print(
        f"digits: {len(split.y_train)} train / {len(split.y_test)} held-out images; MLP 64-128-64; "
        f"{args.mode} negatives, M={args.negatives}, temperature={args.temperature}, "
        f"{args.epochs} epochs, seed={args.seed}",
        flush=True,  # before the progress report on stderr
    )
    model = make_embedder(seed=args.seed)
    rows = {
        "raw pixels": evaluate(split.x_test, split.y_test),
        "untrained MLP": evaluate(embed(model, split.x_test), split.y_test),
    }
    history = train(
        model,
        split.x_train,
        split.y_train,
        epochs=args.epochs,
        negatives=args.negatives,
        mode=args.mode,
        temperature=args.temperature,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=True,
    )
    emb = embed(model, split.x_test)
    rows["trained MLP"] = evaluate(emb, split.y_test)
    print(f"\nHeld-out retrieval ({len(split.y_test)} images, each querying the others; cosine similarity):")
    print(format_table(rows))
    scores = rows["trained MLP"]
    title = (
        f"digits: {args.mode} negatives, M = {args.negatives}, τ = {args.temperature:g}, {args.epochs} epochs; "
        f"held-out precision@1 = {scores['precision_at_1']:.4f}, MAP@R = {scores['mean_average_precision_at_r']:.4f}"
    )
    path = save_figure(history, emb, split.y_test, Path(args.out) / "digits_demo.png", title=title)
    print(f"\nfinal epoch loss {history.epoch_losses[-1]:.4f}; figure written to {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _progress_bar(epochs: int) -> tqdm[int]:
    """A tqdm bar over epochs on stderr (tqdm is imported here: it is an optional dependency)."""
    from tqdm import tqdm

    return tqdm(total=epochs, desc="training", unit="epoch", file=sys.stderr)


def _step_loss(
    model: nn.Module, x: torch.Tensor, rows: torch.Tensor, trip: Triplets, temperature: float, objective: Objective
) -> torch.Tensor:
    """The loss of one minibatch of anchors ``rows`` ``[B]``: embeds ``[B]``, ``[B]`` and ``[B, M]`` images."""
    neg_rows = trip.negatives[rows]  # (B, M)
    a = model(x[rows])
    p = model(x[trip.positives[rows]])
    n = model(x[neg_rows.reshape(-1)]).reshape(*neg_rows.shape, -1)  # (B, M, d)
    if objective == "article-recipe":
        return article_recipe_loss(a, p, n, temperature)
    return infonce(a, p, n, temperature=temperature)


def _check_labels(labels: torch.Tensor, n: int | None) -> int:
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


def _fewest_other_class(labels: torch.Tensor) -> int:
    """The smallest number of other-class images any image has."""
    count = torch.bincount(labels)
    return len(labels) - int(count.max())


def _uniform_below(high: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in ``[0, high)``, elementwise (``high`` broadcasts to ``shape``).

    float64 keeps the product below ``high``.
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (u * high).long().clamp_max(high - 1)


if __name__ == "__main__":
    raise SystemExit(main())
