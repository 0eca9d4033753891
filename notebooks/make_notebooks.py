"""Write quickstart.ipynb and train_digits.ipynb from the cells below, without outputs.

Edit the cells here, then run ``python notebooks/make_notebooks.py``; tests/test_notebooks.py checks that the
committed notebooks match this script and carry no outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]  # ("md" | "code", source)

QUICKSTART: list[Cell] = [
    (
        "md",
        """# Quickstart: InfoNCE on predefined triplets

`pml_triplets` computes InfoNCE for predefined triplets -- anchors `[N, d]`, positives `[N, d]`, negatives
`[N, M, d]` -- through pytorch-metric-learning's `NTXentLoss`, pairing every anchor with *its own* negatives.""",
    ),
    (
        "code",
        """import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt

_ = torch.manual_seed(0)""",
    ),
    (
        "md",
        """## The three inputs

Each anchor gets a noisy copy as its positive and M *hard* negatives: points scattered around the anchor itself.""",
    ),
    (
        "code",
        """N, M, d = 6, 4, 16
anchors = torch.randn(N, d)
positives = anchors + 0.5 * torch.randn(N, d)
negatives = anchors[:, None] + 0.8 * torch.randn(N, M, d)  # negatives[i] belong to anchors[i]
print("anchors  ", tuple(anchors.shape))
print("positives", tuple(positives.shape))
print("negatives", tuple(negatives.shape))""",
    ),
    ("md", "## The one-line call"),
    ("code", "pt.infonce(anchors, positives, negatives, temperature=0.1)"),
    (
        "md",
        """## Which negatives does each anchor meet?

The recipe in circulation concatenates `[anchors, positives, negatives]` and builds its indices with `.repeat(M)`.
Negative row `j` belongs to anchor `j // M`, but `.repeat` pairs it with anchor `j % N`.
`pt.build_indices` uses `.repeat_interleave(M)`. `pt.pairing_matrix` marks which negative rows (columns) each
anchor (row) is compared with; the red lines separate the anchors' own blocks of M negatives.""",
    ),
    (
        "code",
        """recipe = (torch.arange(N).repeat(M), torch.arange(N, 2 * N).repeat(M), torch.arange(2 * N, 2 * N + N * M))
right = pt.build_indices(N, M)
print("recipe anchors:      ", recipe[0].tolist())
print("build_indices anchors:", right[0].tolist())""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True, layout="constrained")
for ax, (title, indices) in zip(axes, [("article: .repeat(M)", recipe), ("pt.build_indices", right)]):
    ax.imshow(pt.pairing_matrix(indices, N, M), cmap="Greys", aspect="auto", interpolation="nearest")
    ax.vlines([k * M - 0.5 for k in range(1, N)], -0.5, N - 0.5, colors="tab:red", lw=1)
    ax.set(title=title, xlabel="negative row j (owned by anchor j // M)", ylabel="anchor i")
plt.show()""",
    ),
    (
        "md",
        """The consequence: the recipe never compares an anchor with its own (hard) negatives, so it reports a much
lower loss than InfoNCE -- and trains on the wrong contrast. `build_indices` and `pt.infonce` match the
reference formula.""",
    ),
    (
        "code",
        """emb = pt.concat_embeddings(anchors, positives, negatives)  # [2N + N*M, d]
ntxent = NTXentLoss(temperature=0.1)
values = {
    "NTXentLoss, .repeat recipe": ntxent(emb, indices_tuple=recipe),
    "NTXentLoss, pt.build_indices": ntxent(emb, indices_tuple=right),
    "pt.infonce": pt.infonce(anchors, positives, negatives, temperature=0.1),
    "pt.reference_infonce": pt.reference_infonce(anchors, positives, negatives, temperature=0.1),
}
for name, value in values.items():
    print(f"{name:30s} {value.item():.4f}")""",
    ),
    (
        "md",
        """## Temperature

At a high temperature every candidate looks alike and the loss tends to `log(M + 1)`; at a low one it is driven
by the hardest candidate.""",
    ),
    (
        "code",
        """taus = torch.logspace(-2, 1, 40).tolist()
curve = [pt.infonce(anchors, positives, negatives, temperature=t).item() for t in taus]
plt.figure(figsize=(5, 3.2))
plt.semilogx(taus, curve, label="pt.infonce")
plt.axhline(math.log(M + 1), ls="--", c="grey", label="log(M + 1)")
plt.xlabel("temperature")
plt.ylabel("loss")
plt.legend()
plt.show()""",
    ),
    (
        "md",
        """## Number of negatives M

With random (unrelated) negatives the loss grows like `log(M + 1)`: InfoNCE is a softmax over M + 1 candidates.""",
    ),
    (
        "code",
        """big_a = torch.randn(256, d)
big_p = big_a + 0.5 * torch.randn(256, d)
ms = [1, 2, 4, 8, 16, 32, 64, 128]
plt.figure(figsize=(5, 3.2))
for tau in (0.1, 1.0):
    by_m = [pt.infonce(big_a, big_p, torch.randn(256, m, d), temperature=tau).item() for m in ms]
    plt.semilogx(ms, by_m, "o-", label=f"temperature {tau}")
plt.semilogx(ms, [math.log(m + 1) for m in ms], "--", c="grey", label="log(M + 1)")
plt.xlabel("negatives per anchor M")
plt.ylabel("loss")
plt.legend()
plt.show()""",
    ),
    (
        "md",
        """## Masks: a ragged number of negatives

`negatives_mask` (`[N, M]` bool, `True` = real) lets anchor `i` keep only its first `counts[i]` negatives.
It equals the mean of per-anchor losses on the sliced negatives.""",
    ),
    (
        "code",
        """counts = torch.tensor([1, 2, 3, 4, 1, 2])
mask = torch.arange(M) < counts[:, None]  # [N, M]
masked = pt.infonce(anchors, positives, negatives, temperature=0.1, negatives_mask=mask)
per_anchor = [
    pt.reference_infonce(anchors[i : i + 1], positives[i : i + 1], negatives[i : i + 1, :k], 0.1)
    for i, k in enumerate(counts.tolist())
]
one_by_one = torch.stack(per_anchor).mean()
print(f"masked {masked.item():.4f}   per-anchor slices {one_by_one.item():.4f}")""",
    ),
    (
        "md",
        "Masked slots are ignored whatever they hold -- padding with NaN changes neither the loss nor the gradient.",
    ),
    (
        "code",
        """padded = negatives.masked_fill(~mask[..., None], float("nan")).requires_grad_()
loss = pt.infonce(anchors, positives, padded, temperature=0.1, negatives_mask=mask)
loss.backward()
print(f"loss {loss.item():.4f}; NaN in gradient: {padded.grad.isnan().any().item()}")""",
    ),
    (
        "md",
        """## In-batch negatives

`in_batch=True` also uses every other row's positive and negatives as negatives of each anchor: more (and here
harder) candidates, so a higher loss.""",
    ),
    (
        "code",
        """own = pt.infonce(anchors, positives, negatives, temperature=0.1)
batch = pt.infonce(anchors, positives, negatives, temperature=0.1, in_batch=True)
ref = pt.reference_infonce(anchors, positives, negatives, 0.1, in_batch=True)
print(f"own negatives {own.item():.4f}   + in-batch {batch.item():.4f}   reference {ref.item():.4f}")""",
    ),
    (
        "md",
        """Without per-anchor negatives, in-batch InfoNCE is the familiar cross-entropy over the `N x N` matrix of
anchor-positive cosine similarities (one direction of CLIP's loss).""",
    ),
    (
        "code",
        """in_batch_only = pt.infonce(anchors, positives, temperature=0.1, in_batch=True)
logits = F.normalize(anchors, dim=1) @ F.normalize(positives, dim=1).T / 0.1  # [N, N]
clip_one_way = F.cross_entropy(logits, torch.arange(N))
print(f"pt.infonce {in_batch_only.item():.6f}   cross-entropy {clip_one_way.item():.6f}")""",
    ),
]

TRAIN_DIGITS: list[Cell] = [
    (
        "md",
        """# Training an embedder on digits with predefined triplets

A 64-128-64 MLP trained with `pt.infonce` on scikit-learn's bundled 8x8 digits, using the building blocks of
`pml_triplets.demo` (the code behind `python -m pml_triplets demo`). Retrieval is measured on the held-out
images, each querying all the others, with PML's `AccuracyCalculator` (precision@1 and MAP@R, cosine).""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt
import torch

from pml_triplets import demo

torch.set_num_threads(1)  # tiny matrices: more threads only add overhead (and stall on a busy machine)
EPOCHS = 10""",
    ),
    (
        "code",
        """split = demo.load_digits_split()
print("train", tuple(split.x_train.shape), "held-out", tuple(split.x_test.shape))""",
    ),
    (
        "md",
        """## Train

Every epoch, each training image is an anchor with a random same-class positive and M = 8 hard negatives, drawn
from its 32 nearest other-class images in pixel space.""",
    ),
    (
        "code",
        """model = demo.make_embedder(seed=0)
untrained = demo.embed(model, split.x_test)
history = demo.train(model, split.x_train, split.y_train, epochs=EPOCHS, negatives=8, mode="hard", seed=0)
trained = demo.embed(model, split.x_test)""",
    ),
    (
        "code",
        """rows = {
    "raw pixels": demo.evaluate(split.x_test, split.y_test),
    "untrained MLP": demo.evaluate(untrained, split.y_test),
    "trained MLP": demo.evaluate(trained, split.y_test),
}
print(demo.format_table(rows))""",
    ),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(5, 3.2))
demo.plot_loss(ax, history)
plt.show()""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
for ax, (title, emb) in zip(axes, [("raw pixels", split.x_test), ("untrained", untrained), ("trained", trained)]):
    demo.plot_projection(ax, emb, split.y_test, title=title)
plt.show()""",
    ),
    (
        "md",
        """## Hard vs random negatives, M, and the article's recipe

Same initial weights, seed and number of steps (`EPOCHS` epochs) for every row. The last two rows train with the
article's recipe as published: `NTXentLoss` over `concat_embeddings` with `.repeat` indices
(`demo.article_recipe_loss`), which contrasts each anchor with *other anchors'* negatives, some of them of its own
class. Its loss is a different quantity, so compare the retrieval columns, not the losses.""",
    ),
    (
        "code",
        """def run(mode, m, objective="infonce"):
    net = demo.make_embedder(seed=0)
    hist = demo.train(
        net, split.x_train, split.y_train, epochs=EPOCHS, negatives=m, mode=mode, seed=0, objective=objective
    )
    scores = demo.evaluate(demo.embed(net, split.x_test), split.y_test)
    return {**scores, "final_loss": hist.epoch_losses[-1]}""",
    ),
    (
        "code",
        """configs = {
    "hard, M=8, pt.infonce": ("hard", 8, "infonce"),
    "random, M=8, pt.infonce": ("random", 8, "infonce"),
    "hard, M=2, pt.infonce": ("hard", 2, "infonce"),
    "hard, M=32, pt.infonce": ("hard", 32, "infonce"),
    "hard, M=8, article recipe": ("hard", 8, "article-recipe"),
    "random, M=8, article recipe": ("random", 8, "article-recipe"),
}
table = {name: run(*config) for name, config in configs.items()}
print(demo.format_table(table, first="negatives, objective"))""",
    ),
]


def build(cells: list[Cell], prefix: str) -> NotebookNode:
    """A v4 notebook of ``cells`` with stable cell ids, no outputs, and the ``python3`` kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        nb.cells.append(make(source, id=f"{prefix}-{i:02d}"))
    nbformat.validate(nb)
    return nb


NOTEBOOKS = {"quickstart.ipynb": (QUICKSTART, "quickstart"), "train_digits.ipynb": (TRAIN_DIGITS, "digits")}


def main() -> int:
    for name, (cells, prefix) in NOTEBOOKS.items():
        path = HERE / name
        nbformat.write(build(cells, prefix), path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
