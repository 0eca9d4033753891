"""The digits demo: an example application of ``pml_triplets``, not part of the library's API.

``python -m pml_triplets demo`` (or ``pml-triplets demo``) runs :func:`pml_triplets_demo.cli.main`: it splits the
1,797 8x8 digit images bundled with scikit-learn into a stratified train set and a held-out set, builds per-anchor
triplets (a same-class positive and M other-class negatives, hard or random), trains a 64 -> 128 -> 64 MLP with
``pt.infonce``, and reports held-out retrieval (precision@1 and MAP@R from PML's ``AccuracyCalculator``) for raw
pixels, the untrained and the trained network. One module per job:

- ``data``: the digits and their split;
- ``model``: the MLP, and embedding without gradient;
- ``triplets``: positives and hard or random negatives of every image;
- ``training``: the steps of each epoch and the training loop, which takes the loss's options;
- ``report``: retrieval scores, the table and the figure;
- ``cli``: the command line.

The notebooks use its building blocks, which the package re-exports (the rest is in the modules)::

    import pml_triplets_demo as demo

    split = demo.load_digits_split()
    model = demo.make_embedder(seed=0)
    history = demo.train(model, split.x_train, split.y_train, epochs=20, negatives=8, loss_options={"in_batch": True})
    demo.evaluate(demo.embed(model, split.x_test), split.y_test)  # {"precision_at_1": ..., ...}

It ships in the ``pml-triplets`` wheel beside ``pml_triplets`` (its source is ``examples/pml_triplets_demo/``), so
the command works from any install. matplotlib, tqdm and scikit-learn (the ``demo`` extra) are imported inside the
functions that need them: the package imports without them, and the command checks for all three before any work.
"""

from .data import DigitsSplit, load_digits_split
from .model import embed, make_embedder
from .report import METRICS, evaluate, format_table, pca_2d, plot_loss
from .training import TEMPERATURE, Batch, History, article_recipe_loss, batches, train

__all__ = [
    "METRICS",
    "TEMPERATURE",
    "Batch",
    "DigitsSplit",
    "History",
    "article_recipe_loss",
    "batches",
    "embed",
    "evaluate",
    "format_table",
    "load_digits_split",
    "make_embedder",
    "pca_2d",
    "plot_loss",
    "train",
]
