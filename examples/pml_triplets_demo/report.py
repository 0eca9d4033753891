"""The report: held-out retrieval scores, a Markdown table, and the figure (loss curve, 2-D projection).

matplotlib is imported inside the functions that draw, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from .training import History

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METRICS = ("precision_at_1", "mean_average_precision_at_r")


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
        history: from :func:`~pml_triplets_demo.training.train`.
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
