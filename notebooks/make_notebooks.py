"""Write the notebooks, execute them, and save them with outputs.

Two teach -- ``notebooks/quickstart.ipynb`` (the pairing bug and the API) and ``notebooks/training.ipynb`` (a
visible training loop on the digits) -- and two are studies over five seeds, ``studies/train_digits.ipynb`` and
``studies/retrieval_options.ipynb``, whose tables docs/studies.md presents.

Edit the cells here (retrieval_options.ipynb's in retrieval_cells.py), then run
``python notebooks/make_notebooks.py [PATH ...]`` with paths as in ``NOTEBOOKS`` (e.g.
``notebooks/training.ipynb``; a few minutes of CPU time for all, longer on a busy machine): the committed
notebooks carry their outputs so that they render on GitHub. tests/test_notebooks.py checks that the committed
cells are the ones here, that they carry outputs, and that they still execute without error.

In the quickstart and the studies, every number a markdown cell relies on is printed by the code cell next to it
and checked there by ``claim`` (notebooks/claims.py), with a bound far from what it measures on other machines
(notebooks/claim_spread.py), so a change that breaks a claim fails the execution test, naming it, instead of
leaving a false sentence. The tutorial prints results only: tests/test_notebooks.py checks the numbers its
markdown states against its outputs, out of the reader's way.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat
from nbformat.notebooknode import NotebookNode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CELL_TIMEOUT_S = 600  # 13x the slowest cell measured on one idle core (45 s): room for a 10x slower machine

Cell = tuple[str, str]  # ("md" | "code", source)

QUICKSTART: list[Cell] = [
    (
        "md",
        """# Quickstart: InfoNCE on predefined triplets

`pml_triplets` computes InfoNCE for predefined triplets -- anchors `[N, d]`, positives `[N, d]`, negatives
`[N, M, d]` -- through pytorch-metric-learning's `NTXentLoss`, pairing every anchor with *its own* negatives.
Everything below is seeded: running it again prints the same numbers, timings aside.""",
    ),
    (
        "code",
        """import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt
from claims import claim  # notebooks/claims.py: checks a sentence's number against its bound, says which failed

_ = torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors; one thread also makes the timings below comparable
plt.rcParams["figure.dpi"] = 80  # modest PNGs keep the notebook small""",
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
        """def recipe_indices(n, m):
    \"\"\"The article's indices over concat_embeddings: `.repeat(m)` where `.repeat_interleave(m)` is right.\"\"\"
    return torch.arange(n).repeat(m), torch.arange(n, 2 * n).repeat(m), torch.arange(2 * n, 2 * n + n * m)


recipe = recipe_indices(N, M)
right = pt.build_indices(N, M)
print("recipe anchors:       ", recipe[0].tolist())
print("build_indices anchors:", right[0].tolist())""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True, layout="constrained")
for ax, (title, indices) in zip(axes, [("article: .repeat(M)", recipe), ("pt.build_indices", right)]):
    ax.imshow(pt.pairing_matrix(indices, N, M), cmap="Greys", aspect="auto", interpolation="nearest")
    ax.vlines([k * M - 0.5 for k in range(1, N)], -0.5, N - 0.5, colors="tab:red", lw=1)
    ax.set(title=title, xlabel="negative row j (owned by anchor j // M)", ylabel="anchor i")
fig.suptitle(f"Negatives each anchor is compared with (black), N = {N}, M = {M}")
plt.show()""",
    ),
    (
        "md",
        """The recipe still gives every anchor M negatives, but mostly other anchors' ones: the cell below counts how
many of its own negatives each anchor meets, then evaluates the loss both ways on the same batch. Here every
anchor's own negatives are scattered around it (hard) and other anchors' negatives are far from it, so the
recipe's value is *lower* than InfoNCE: it is the loss of a different, easier problem.
`NTXentLoss` with `pt.build_indices`, `pt.infonce` and the float64 loop `pt.reference_infonce` agree.""",
    ),
    (
        "code",
        """own_met = (pt.pairing_matrix(recipe, N, M) & pt.pairing_matrix(right, N, M)).sum(dim=1)
print(f"own negatives met under .repeat, per anchor (out of M = {M}):", own_met.tolist())

emb = pt.concat_embeddings(anchors, positives, negatives)  # [2N + N*M, d]
ntxent = NTXentLoss(temperature=0.1)
values = {
    "NTXentLoss, .repeat recipe": ntxent(emb, indices_tuple=recipe),
    "NTXentLoss, pt.build_indices": ntxent(emb, indices_tuple=right),
    "pt.infonce": pt.infonce(anchors, positives, negatives, temperature=0.1),
    "pt.reference_infonce": pt.reference_infonce(anchors, positives, negatives, temperature=0.1),
}
for name, value in values.items():
    print(f"{name:30s} {value.item():.4f}")
reference = values["pt.reference_infonce"]
for name in ("pt.infonce", "NTXentLoss, pt.build_indices"):
    claim(f"|{name} - reference|", (values[name] - reference).abs(), below=1e-5)
claim("most own negatives an anchor meets under .repeat", own_met.max(), below=M / 2)
claim(".repeat recipe minus reference", values["NTXentLoss, .repeat recipe"] - reference, below=-0.1)""",
    ),
    (
        "md",
        """## What the concatenated layout costs: O(N²M²)

`NTXentLoss(embeddings, indices_tuple=...)` over `concat_embeddings` first computes the similarity of *every* row
with every row -- a `(2N + NM) x (2N + NM)` matrix -- and then builds a mask of which negative pair belongs to which
positive pair, `NM x NM` (each anchor's positive pair is repeated M times). Both grow like N²M², with the
`.repeat` recipe and with `pt.build_indices` alike. `pt.infonce` computes one row of M + 1 logits per anchor:
N(M + 1) similarities. The table computes the two matrices' sizes (float32) and times both calls on random
inputs (d = 64); the last row is a common training batch, computed only.""",
    ),
    (
        "code",
        """def best_time(fn, *args, repeats=3, **kwargs):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


header = f"{'N':>4} {'M':>4} {'NM':>6} | {'similarity matrix':>17} {'pair mask':>12} |"
lines = [header + f" {'NTXentLoss':>10} {'pt.infonce':>10}"]
for n, m in [(32, 8), (128, 8), (32, 32), (32, 64), (512, 64)]:
    sim_mib = 4 * (n * (m + 2)) ** 2 / 2**20  # float32 (2N + NM) x (2N + NM)
    mask_mib = 4 * (n * m) ** 2 / 2**20  # float32 NM x NM
    row = f"{n:4d} {m:4d} {n * m:6d} | {sim_mib:13.2f} MiB {mask_mib:8.2f} MiB |"
    if n * m <= 2048:
        a, p, neg = torch.randn(n, 64), torch.randn(n, 64), torch.randn(n, m, 64)
        cat = pt.concat_embeddings(a, p, neg)
        t_pml = best_time(ntxent, cat, indices_tuple=recipe_indices(n, m))
        t_pt = best_time(pt.infonce, a, p, neg, temperature=0.1)
        row += f" {1e3 * t_pml:7.1f} ms {1e3 * t_pt:7.2f} ms"
    else:
        row += f"  not run ({(sim_mib + mask_mib) / 1024:.1f} GiB for these two alone)"
    lines.append(row)
print("\\n".join(lines))""",
    ),
    (
        "md",
        """`(128, 8)` and `(32, 32)` have the same NM = 1024, hence the same pair mask (only the 2N anchor and
positive rows make their similarity matrices differ): what counts is the product NM, squared. Quadrupling M at
N = 32, from `(32, 8)` to `(32, 32)`, multiplies the pair mask by 16. The sizes are exact; the timings are this
machine's, on one thread.""",
    ),
    (
        "md",
        """## Keep your PML code: `pt.NTXentLoss`

Code that already calls PML's `NTXentLoss(embeddings, indices_tuple=...)` can keep that call and change the import:
`pt.NTXentLoss` is a subclass of PML's `NTXentLoss` with the same constructor, `forward`, pairs and loss dict, that
computes the distances of the listed pairs only and each anchor's negatives by segment, linear in the pairs. On
the article's `.repeat` tuple it also warns (`pt.RepeatLayoutWarning`, once per loss object) and computes the
tuple as given. The cell compares both classes on the same tuple at N = 128, M = 8 (d = 64): the same value and
the warning; it also prints the time of each call on this machine (forward only, best of 3, one thread; the
benchmark in docs/performance.md measures forward + backward and peak memory).""",
    ),
    (
        "code",
        """import warnings

n, m = 128, 8
a, p, neg = torch.randn(n, 64), torch.randn(n, 64), torch.randn(n, m, 64)
cat = pt.concat_embeddings(a, p, neg)
article = recipe_indices(n, m)  # the article's .repeat tuple, as printed there
drop_in = pt.NTXentLoss(temperature=0.1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours = drop_in(cat, indices_tuple=article)
theirs = ntxent(cat, indices_tuple=article)  # PML's NTXentLoss(temperature=0.1)
warned = [w for w in caught if issubclass(w.category, pt.RepeatLayoutWarning)]
t_pml, t_ours = best_time(ntxent, cat, indices_tuple=article), best_time(drop_in, cat, indices_tuple=article)
print(f"PML's NTXentLoss  {theirs.item():.6f}  {1e3 * t_pml:8.2f} ms")
print(f"pt.NTXentLoss     {ours.item():.6f}  {1e3 * t_ours:8.2f} ms")
print("warning:", str(warned[0].message)[:110], "...")
claim("|pt.NTXentLoss - PML's NTXentLoss| on the article's tuple", (ours - theirs).abs(), below=1e-5)
claim("RepeatLayoutWarnings on the article's tuple", len(warned), above=0.5, below=1.5)""",
    ),
    (
        "md",
        """## Temperature

The logits are cosine similarities divided by τ. At a high temperature they all tend to 0, the M + 1 candidates
look alike and the loss tends to `log(M + 1)` (dashed). At a low temperature the loss is set by the largest gap
between a negative and the positive: it tends to 0 for an anchor whose positive is more similar than all its
negatives, and grows like `(s_hardest - s_pos) / τ` for one where a negative is more similar. The dotted line,
the mean over anchors of `max(0, s_hardest - s_pos) / τ`, is a lower bound at every τ that the loss approaches as
τ → 0. Here one or more anchors are of the second kind (the cell prints how many), so the curve turns up again at
the smallest τ.""",
    ),
    (
        "code",
        """taus = torch.logspace(-2, 1, 40).tolist()
curve = [pt.infonce(anchors, positives, negatives, temperature=t).item() for t in taus]
s_pos = F.cosine_similarity(anchors, positives, dim=1)  # [N]
s_hardest = F.cosine_similarity(anchors[:, None], negatives, dim=2).amax(dim=1)  # [N]
gap = (s_hardest - s_pos).clamp(min=0).mean().item()  # mean over anchors of max(0, s_hardest - s_pos)
low_tau_limit = [gap / t for t in taus]
beaten = int((s_hardest > s_pos).sum())
print(f"anchors whose hardest negative is more similar than their positive: {beaten} of {N}")
print(f"loss at τ = {taus[0]:g}: {curve[0]:.4f};  mean max(0, s_hardest - s_pos) / τ = {low_tau_limit[0]:.4f}")
print(f"loss at τ = {taus[-1]:g}: {curve[-1]:.4f};  log(M + 1) = {math.log(M + 1):.4f}")
# log(1 + sum exp(x)) >= max(0, max x), per anchor: the dotted line is a lower bound
claim("smallest loss / low-τ bound over τ", min(c / lim for c, lim in zip(curve, low_tau_limit)), above=1)
claim("anchors whose hardest negative beats the positive", beaten, above=0)
claim("loss at the smallest τ minus the curve's minimum", curve[0] - min(curve), above=0)
claim("loss at the smallest τ / its low-τ bound", curve[0] / low_tau_limit[0], below=1.3)
claim("|loss at τ = 10 - log(M + 1)|", abs(curve[-1] - math.log(M + 1)), below=0.05)

plt.figure(figsize=(5.5, 3.4))
plt.semilogx(taus, curve, label="pt.infonce")
plt.axhline(math.log(M + 1), ls="--", c="grey", label="log(M + 1): high-τ limit")
plt.semilogx(taus, low_tau_limit, ":", c="k", label="mean max(0, s_hardest - s_pos) / τ")
plt.ylim(0, 1.15 * max([*curve, math.log(M + 1)]))
plt.title(f"Loss against temperature (N = {N}, M = {M})")
plt.xlabel("temperature τ")
plt.ylabel("InfoNCE loss")
plt.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.08))
plt.show()""",
    ),
    (
        "md",
        """## Number of negatives M

InfoNCE is a softmax over M + 1 candidates: `loss = log(1 + Σ_j exp((s_j - s_pos) / τ))`, averaged over anchors.
Whether it grows like `log(M + 1)` depends on how the positive compares with the negatives, so the cell draws two
cases (2,048 random anchors in d = 16, random negatives, three temperatures):

* **left -- the positive is no more similar to the anchor than a negative**, as for an untrained network. All
  M + 1 candidates are exchangeable, so the positive's softmax share is `1 / (M + 1)` on average and, by Jensen's
  inequality, the mean loss is *at least* `log(M + 1)`, with equality when all logits are equal (τ → ∞).
  At τ = 10 the curve lies on the line; at lower τ it lies above it.
* **right -- the positive is much more similar** (a noisy copy, cosine ≈ 0.9, against ≈ 0 for the negatives).
  Then `loss ≈ log(1 + M c)` with `c = E[exp((s_neg - s_pos) / τ)] ≪ 1`: far *below* `log(M + 1)`, growing about
  in proportion to M while `M c ≪ 1` (slope 1 on these log-log axes) and like `log M` only once `M c ≫ 1`,
  beyond the M the cell prints for τ = 0.1. At τ = 10 the logits are again nearly equal and the curve is within
  10 % of `log(M + 1)`.""",
    ),
    (
        "code",
        """_ = torch.manual_seed(1)  # this section's draws do not depend on the cells above
big_n = 2048
big_a = torch.randn(big_n, d)
cases = {
    "positive no closer than a negative": torch.randn(big_n, d),
    "positive = noisy copy of the anchor": big_a + 0.5 * torch.randn(big_n, d),
}
ms = [1, 2, 4, 8, 16, 32, 64, 128]
log_m1 = [math.log(m + 1) for m in ms]
big_negatives = torch.randn(big_n, max(ms), d)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
curves = {}
for ax, (case, big_p) in zip(axes, cases.items()):
    for tau in (0.1, 1.0, 10.0):
        by_m = [pt.infonce(big_a, big_p, big_negatives[:, :m], temperature=tau).item() for m in ms]
        curves[case, tau] = by_m
        ax.loglog(ms, by_m, "o-", ms=3, label=f"τ = {tau:g}")
    ax.loglog(ms, log_m1, "--", c="k", lw=1, zorder=3, label="log(M + 1)")
    ax.set(title=case, xlabel="negatives per anchor M", ylabel="InfoNCE loss (log scale)")
    ax.legend()
fig.suptitle("Loss against M with random negatives")
plt.show()

unrelated, copy = cases
ratio = {(case, tau): [loss / ref for loss, ref in zip(curves[case, tau], log_m1)] for case, tau in curves}
for tau in (0.1, 1.0, 10.0):
    left, right = ratio[unrelated, tau], ratio[copy, tau]
    print(
        f"τ = {tau:4g}  loss / log(M + 1): left {min(left):.3f} .. {max(left):.3f},"
        f" right {min(right):.4f} .. {max(right):.3f}"
    )
s_pos = F.cosine_similarity(big_a, cases[copy], dim=1)  # [big_n]
s_neg = F.cosine_similarity(big_a[:, None], big_negatives, dim=2)  # [big_n, 128]
c = ((s_neg - s_pos[:, None]) / 0.1).exp().mean().item()
growth = curves[copy, 0.1][-1] / curves[copy, 0.1][0]
print(
    f"right, τ = 0.1: c = {c:.4f}, so M c = 1 at M ≈ {1 / c:.0f}; loss(M = 128) / loss(M = 1) = {growth:.0f}"
    f" (proportional to M: 128; like log(M + 1): {log_m1[-1] / log_m1[0]:.1f})"
)
claim("left, τ = 0.1 and 1: smallest loss / log(M + 1)", min(ratio[unrelated, 0.1] + ratio[unrelated, 1.0]), above=1)
claim("left, τ = 10: largest |loss / log(M + 1) - 1|", max(abs(r - 1) for r in ratio[unrelated, 10.0]), below=0.01)
claim("right, τ = 0.1: largest loss / log(M + 1)", max(ratio[copy, 0.1]), below=0.1)
claim("right, τ = 0.1: loss(M = 128) / loss(M = 1)", growth, above=50)
claim("right, τ = 0.1: M at which M c = 1", 1 / c, above=128)
claim("right, τ = 10: smallest loss / log(M + 1)", min(ratio[copy, 10.0]), above=0.9)
claim("right, τ = 10: largest loss / log(M + 1)", max(ratio[copy, 10.0]), below=1)""",
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
print(f"masked {masked.item():.4f}   per-anchor slices {one_by_one.item():.4f}")
claim("|masked - per-anchor slices|", (masked - one_by_one).abs(), below=1e-5)""",
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
print(f"loss {loss.item():.4f}; NaN in gradient: {padded.grad.isnan().any().item()}")
claim("|NaN-padded - masked|", (loss - masked).abs(), below=1e-6)
claim("NaN entries in the gradient", padded.grad.isnan().sum(), below=1)""",
    ),
    (
        "md",
        """## In-batch negatives

`in_batch=True` also uses every other row's positive and negatives as negatives of each anchor:
(N - 1)(M + 1) = 25 more candidates here. Extra candidates only add terms to each softmax denominator, so the loss
can only rise. How much depends on how similar they are to the anchor: here they are points around *other*
anchors, unrelated to this one (unlike its own negatives, scattered around it), so it rises only slightly.""",
    ),
    (
        "code",
        """own = pt.infonce(anchors, positives, negatives, temperature=0.1)
batch = pt.infonce(anchors, positives, negatives, temperature=0.1, in_batch=True)
ref = pt.reference_infonce(anchors, positives, negatives, 0.1, in_batch=True)
print(f"own negatives {own.item():.4f}   + in-batch {batch.item():.4f}   reference {ref.item():.4f}")
print(f"increase: {batch.item() - own.item():.4f} ({100 * (batch.item() / own.item() - 1):.1f} %)")
claim("in-batch / own negatives only", batch / own, above=1, below=1.05)
claim("|in-batch - reference|", (batch - ref).abs(), below=1e-5)""",
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
print(f"pt.infonce {in_batch_only.item():.6f}   cross-entropy {clip_one_way.item():.6f}")
claim("|in-batch only - CLIP's one-way cross-entropy|", (in_batch_only - clip_one_way).abs(), below=1e-5)""",
    ),
]

TRAINING: list[Cell] = [
    (
        "md",
        """# Training with `pt.infonce`: a tutorial on handwritten digits

This notebook trains a small embedder so that images of the same digit land close together, with
`pt.infonce` as the loss, in a training loop you can read line by line. It uses scikit-learn's bundled 8x8 digits
(1,797 images, no download) and runs in well under a minute on one CPU thread.

The plan: load the digits, write a small network, build *triplets* (an anchor, a positive, M negatives), train,
and measure retrieval on images the network never saw in training -- before and after. Last, the same training
with easier negatives, to see what the choice of negatives does.""",
    ),
    (
        "code",
        """import time

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import pml_triplets as pt

torch.set_num_threads(1)  # tiny matrices: one thread is fastest and gives the same numbers on every machine
_ = torch.manual_seed(0)
start = time.perf_counter()""",
    ),
    (
        "md",
        """## The data

Each image is 64 grey levels (0 to 16), which we scale to [0, 1]. 30 % of the images are held out, with every
digit in the same proportion in both parts: the network trains on 1,257 images and is judged on the other 540.""",
    ),
    (
        "code",
        """x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
x_train, x_test = (torch.tensor(a, dtype=torch.float32) / 16 for a in (x_train, x_test))  # [N, 64] pixels
y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))  # [N] digits 0-9
print("train   ", tuple(x_train.shape), "labels", tuple(y_train.shape))
print("held out", tuple(x_test.shape), "labels", tuple(y_test.shape))""",
    ),
    (
        "md",
        """## The embedder

A two-layer perceptron maps an image's 64 pixels to a 64-dimensional *embedding*. Nothing in it is specific to
contrastive learning: any `nn.Module` that returns one vector per input works. `make_model(seed)` gives the same
initial weights for the same seed, so that two trainings can be compared from the same start.""",
    ),
    (
        "code",
        """def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


print(make_model(seed=0))""",
    ),
    (
        "md",
        """## Triplets: an anchor, a positive, M negatives

InfoNCE asks the network to pick the positive out of M + 1 candidates. Each training image is an *anchor*; its
*positive* is another image of the same digit, drawn at random; its M = 8 *negatives* are images of other digits.
Two ways to choose the negatives:

* **random**: any images of other digits. Most of them are easy: a 0 and a 7 look nothing alike.
* **hard**: among the 32 images of other digits *nearest to the anchor in pixel space* (a 3 and its nearest 5s and
  8s). They are the mistakes the network is likely to make, so they carry more to learn from.

`make_triplets` returns row indices into `x_train`: positives `[N]` and negatives `[N, M]`. It draws fresh
triplets every epoch.""",
    ),
    (
        "code",
        """M = 8  # negatives per anchor
same = y_train[:, None] == y_train[None, :]  # [N, N]: True where two images show the same digit
distance = torch.cdist(x_train.double(), x_train.double())  # [N, N]; float64: near-ties order alike everywhere
distance = distance.masked_fill(same, float("inf"))  # an image of the same digit is never a negative
nearest = distance.topk(4 * M, dim=1, largest=False).indices  # [N, 32]: each image's nearest other digits


def make_triplets(mode, generator):
    n = len(y_train)
    positives = torch.multinomial(same.float().fill_diagonal_(0), 1, generator=generator)[:, 0]  # [N]
    if mode == "hard":  # M distinct rows of the anchor's 32 nearest other-digit images
        pick = torch.rand(n, 4 * M, generator=generator).argsort(dim=1)[:, :M]  # [N, M] positions in `nearest`
        negatives = nearest.gather(1, pick)  # [N, M]
    else:  # "random": any other-digit images
        negatives = torch.multinomial((~same).float(), M, replacement=True, generator=generator)  # [N, M]
    return positives, negatives


positives, negatives = make_triplets("hard", torch.Generator().manual_seed(0))
print("anchor 0 shows a", y_train[0].item())
print("its positive shows a", y_train[positives[0]].item())
print("its hard negatives show", y_train[negatives[0]].tolist())""",
    ),
    (
        "md",
        """## Measuring retrieval

Each held-out image queries the other 539 by cosine similarity of their embeddings. **Precision@1**: how often the
nearest one shows the same digit. **MAP@R** (mean average precision at R): with R the number of other images of the
query's digit, how well those R images fill the top R places -- it asks for *all* same-digit images first, so it
shows what precision@1 hides. pytorch-metric-learning's `AccuracyCalculator` computes both.""",
    ),
    (
        "code",
        """calculator = AccuracyCalculator(
    include=("precision_at_1", "mean_average_precision_at_r"),
    knn_func=CustomKNN(CosineSimilarity()),  # rank by cosine similarity, as the loss does
    device=torch.device("cpu"),
)


def retrieval(embeddings):
    scores = calculator.get_accuracy(embeddings, y_test)  # each query excluded from its own neighbours
    return scores["precision_at_1"], scores["mean_average_precision_at_r"]


def embed(model, x):
    with torch.no_grad():
        return model(x)


print(f"{'':24s} {'P@1':>6s} {'MAP@R':>6s}")
for name, emb in {"raw pixels": x_test, "untrained network": embed(make_model(seed=0), x_test)}.items():
    p_at_1, map_at_r = retrieval(emb)
    print(f"{name:24s} {p_at_1:6.3f} {map_at_r:6.3f}")""",
    ),
    (
        "md",
        """## The training step

One epoch draws triplets, shuffles the anchors and walks through them 128 at a time. Each step embeds the
anchors, their positives and their negatives with the *same* network, then calls `pt.infonce`:

* `a`: the anchors' embeddings, `[B, 64]`;
* `p`: their positives', `[B, 64]` -- row `i` belongs to anchor `i`;
* `n`: their negatives', `[B, M, 64]` -- `n[i]` are anchor `i`'s own M negatives. Their pixels, `[B, M, 64]`, are
  flattened to `[B*M, 64]` to embed all B * M images in one call, and `unflatten` puts the result back in shape.

The temperature τ = 0.1 divides the cosine similarities before the softmax: lower τ sharpens it, so the loss
concentrates on the negatives that are closest to the anchor. Then the usual PyTorch step: `backward`, `step`.
The function prints the mean loss of every epoch.""",
    ),
    (
        "code",
        """EPOCHS, BATCH, TAU = 10, 128, 0.1


def train(mode, seed, verbose=True):
    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)  # triplets and batch order
    for epoch in range(1, EPOCHS + 1):
        positives, negatives = make_triplets(mode, generator)
        total = 0.0
        for rows in torch.randperm(len(y_train), generator=generator).split(BATCH):  # rows: [B] anchor indices
            b = len(rows)
            a = model(x_train[rows])  # [B, 64]
            p = model(x_train[positives[rows]])  # [B, 64]
            n = model(x_train[negatives[rows]].flatten(0, 1)).unflatten(0, (b, M))  # [B*M, 64] -> [B, M, 64]
            loss = pt.infonce(a, p, n, temperature=TAU)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * b
        if verbose:
            print(f"epoch {epoch:2d}  loss {total / len(y_train):.4f}")
    return model


hard_model = train("hard", seed=0)""",
    ),
    (
        "md",
        """The loss falls from about 1.7 towards 0: the network learns to rank each anchor's positive above its hard
negatives. What counts is the held-out images. Raw pixels and the untrained network already find a same-digit
nearest neighbour for more than 90 % of them (precision@1), but rank *all* same-digit images first much less well:
MAP@R near 0.5. After training, MAP@R is above 0.9 and precision@1 about 0.98.""",
    ),
    (
        "code",
        """print(f"{'':24s} {'P@1':>6s} {'MAP@R':>6s}")
for name, model in {"untrained network": make_model(seed=0), "trained, hard negatives": hard_model}.items():
    p_at_1, map_at_r = retrieval(embed(model, x_test))
    print(f"{name:24s} {p_at_1:6.3f} {map_at_r:6.3f}")""",
    ),
    (
        "md",
        """## Hard or random negatives?

The same training with random negatives, from the same three seeds (seed = initial weights, triplets and batch
order; seed 0 is the run above), without the per-epoch lines. One run is not enough to compare two settings:
retrieval moves by about 0.01 from one seed to the next, about the size of the effect. So each seed trains
both ways and we look at the difference seed by seed.""",
    ),
    (
        "code",
        """SEEDS = (0, 1, 2)
print(f"{'seed':>4s} {'MAP@R, hard':>12s} {'MAP@R, random':>14s} {'hard - random':>14s}")
differences = []
for seed in SEEDS:
    hard = retrieval(embed(hard_model if seed == 0 else train("hard", seed, verbose=False), x_test))[1]
    rand = retrieval(embed(train("random", seed, verbose=False), x_test))[1]
    differences.append(hard - rand)
    print(f"{seed:4d} {hard:12.3f} {rand:14.3f} {hard - rand:+14.3f}")
print(f"mean difference over {len(SEEDS)} seeds: {sum(differences) / len(differences):+.3f}")
print(f"this notebook ran for {time.perf_counter() - start:.0f} s after its imports")""",
    ),
    (
        "md",
        """Hard negatives end with a higher MAP@R on average, by about 0.02 over these three seeds. The study
`studies/train_digits.ipynb` (its tables are on the docs' studies page, `docs/studies.md`) repeats this comparison
over five seeds, adds M = 2 and the article's `.repeat` recipe, and reports each difference with its spread.

**Where to go next**: the quickstart (`notebooks/quickstart.ipynb`) shows why `pt.infonce` pairs each anchor with
its *own* negatives; `pt.infonce`'s docstring lists its options (shared negatives, in-batch negatives, a queue,
masks).""",
    ),
]

TRAIN_DIGITS: list[Cell] = [
    (
        "md",
        """# Training an embedder on digits with predefined triplets

A 64-128-64 MLP trained with `pt.infonce` on scikit-learn's bundled 8x8 digits, using the building blocks of the
digits demo, `pml_triplets_demo` (the example application behind `python -m pml_triplets demo`). Retrieval is
measured on the 540 held-out images, each querying all the others, with PML's `AccuracyCalculator` (precision@1
and MAP@R, cosine).
Weights, triplets and batch order are seeded; comparisons are repeated over seeds and reported as
mean ± standard deviation over the seeds.""",
    ),
    (
        "code",
        """import statistics

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt
import pml_triplets_demo as demo  # the digits demo: data, MLP, triplets, training loop, retrieval scores
from claims import claim  # notebooks/claims.py: checks a sentence's number against its bound, says which failed

torch.set_num_threads(1)  # tiny matrices: one thread, as the demo trains (no thread contention on a busy machine)
plt.rcParams["figure.dpi"] = 80  # modest PNGs keep the notebook small
EPOCHS = 10
TAU = 0.1  # demo.train's default temperature""",
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
from its 32 nearest other-class images in pixel space. Raw pixels already have a high precision@1 (the nearest
image is usually of the same digit); MAP@R, which asks for *all* same-class images to rank first, is where
training shows.""",
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
print(demo.format_table(rows))
map_r = {name: row["mean_average_precision_at_r"] for name, row in rows.items()}
claim("MAP@R, trained MLP minus raw pixels", map_r["trained MLP"] - map_r["raw pixels"], above=0.2)
claim("MAP@R, trained MLP minus untrained MLP", map_r["trained MLP"] - map_r["untrained MLP"], above=0.2)""",
    ),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
demo.plot_loss(ax, history)
ax.set_title(f"Training loss (hard negatives, M = 8, τ = {TAU})")
plt.show()""",
    ),
    (
        "md",
        """The held-out images projected on the two leading principal components of their L2-normalised embeddings,
coloured by digit. This is a linear 2-D view of 64-D embeddings: digits that overlap in it can still be apart in
64-D, as the trained MLP's precision@1 above says.""",
    ),
    (
        "code",
        """def plot_embedding(ax, emb, labels, title):
    xy = demo.pca_2d(F.normalize(emb, dim=1))  # [N, 2]
    for c in range(10):
        ax.scatter(xy[labels == c, 0], xy[labels == c, 1], s=5, color=plt.cm.tab10(c), label=str(c))
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")


fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
panels = {"raw pixels": split.x_test, "untrained MLP": untrained, "trained MLP": trained}
for ax, (title, emb) in zip(axes, panels.items()):
    plot_embedding(ax, emb, split.y_test, title)
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="digit", markerscale=2.5)
fig.suptitle("Held-out embeddings, PCA of the normalised vectors")
plt.show()""",
    ),
    (
        "md",
        """## Hard vs random negatives, two values of M, and the article's recipe -- over five seeds

Each row trains from the same seeds (weights, triplets and batch order from seeds 0 to 4) for `EPOCHS` = 10
epochs; the table shows mean ± standard deviation over the five runs. The last row trains with the article's recipe
as published (`demo.article_recipe_loss`: `NTXentLoss` over `concat_embeddings` with `.repeat` indices), which
compares each anchor mostly with *other anchors'* hard negatives. Below the table, each row is compared with the
first seed by seed (same seed, same initial weights): the mean and standard deviation of the differences, and on
how many seeds the first row is higher.""",
    ),
    (
        "code",
        """METRICS = {"precision_at_1": "P@1", "mean_average_precision_at_r": "MAP@R"}


def run(x_train, y_train, x_test, y_test, *, mode, m, objective, seed):
    net = demo.make_embedder(seed=seed)
    demo.train(net, x_train, y_train, epochs=EPOCHS, negatives=m, mode=mode, seed=seed, objective=objective)
    emb = demo.embed(net, x_test)
    return {**demo.evaluate(emb, y_test), **class_cosines(emb, y_test)}


def class_cosines(emb, labels):
    \"\"\"Mean cosine similarity of the same-class pairs and of the different-class pairs of a held-out set.\"\"\"
    e = F.normalize(emb, dim=1)
    sim = e @ e.T  # [n, n]
    same = labels[:, None] == labels[None, :]
    other = ~same
    same.fill_diagonal_(False)
    return {"same_class_cos": sim[same].mean().item(), "other_class_cos": sim[other].mean().item()}


def mean_std(runs, metric):
    values = [r[metric] for r in runs]
    return statistics.mean(values), statistics.stdev(values)


def table(results, metrics, first):
    lines = [f"| {first:30s} | " + " | ".join(f"{metrics[k]:16s}" for k in metrics) + " |"]
    lines.append("|" + "-" * 32 + "|" + "|".join("-" * 18 for _ in metrics) + "|")
    for name, runs in results.items():
        cells = " | ".join("{:7.4f} ± {:.4f}".format(*mean_std(runs, k)) for k in metrics)
        lines.append(f"| {name:30s} | {cells} |")
    return "\\n".join(lines)


def paired(results, a, b, metric):
    \"\"\"Row a minus row b on `metric`, seed by seed: mean, standard deviation, seeds where a is higher.\"\"\"
    diffs = [ra[metric] - rb[metric] for ra, rb in zip(results[a], results[b])]
    return statistics.mean(diffs), statistics.stdev(diffs), sum(d > 0 for d in diffs)


def compare(results, a, b, metrics):
    for metric, label in metrics.items():
        mean, std, up = paired(results, a, b, metric)
        print(f"{label:15s} {a} minus {b}: {mean:+.4f} ± {std:.4f} ({up}/{len(SEEDS)} seeds higher)")""",
    ),
    (
        "code",
        """SEEDS = (0, 1, 2, 3, 4)
configs = {
    "hard, M=8, pt.infonce": ("hard", 8, "infonce"),
    "random, M=8, pt.infonce": ("random", 8, "infonce"),
    "hard, M=2, pt.infonce": ("hard", 2, "infonce"),
    "hard, M=8, article recipe": ("hard", 8, "article-recipe"),
}
data = (split.x_train, split.y_train, split.x_test, split.y_test)
results = {
    name: [run(*data, mode=mode, m=m, objective=objective, seed=s) for s in SEEDS]
    for name, (mode, m, objective) in configs.items()
}
print(table(results, METRICS, "negatives, objective"), end="\\n\\n")
hard, rand, m2, art = configs
for other in (rand, m2, art):
    compare(results, hard, other, METRICS)""",
    ),
    (
        "md",
        """What the five seeds say, on all ten digits, as bounds on the mean paired differences that the next cell
checks (each bound is far from the values measured with 1 or 2 threads, AVX2 or AVX-512 kernels and five other
seeds: `notebooks/claim_spread.md`):

* **hard vs random negatives, and M = 8 vs M = 2**: the MAP@R of hard negatives with M = 8 is higher than both
  on average. Precision@1 hardly separates the rows: every row's mean is above 0.95, near its ceiling, where one
  image in 540 moves it by 0.0019; no claim is made on its differences.
* **the article's recipe**: its MAP@R is lower than `pt.infonce`'s on average. With ten
  digits, few of the negatives it hands an anchor are of the anchor's own class; what the recipe loses is
  hardness -- another anchor's hard negatives are, for this anchor, images of some other digit, about as far from
  it as random ones. The next section measures both.""",
    ),
    (
        "code",
        """for other in (rand, m2, art):
    claim(f"MAP@R, {hard} minus {other}", paired(results, hard, other, "mean_average_precision_at_r")[0], above=0)
lowest = min(mean_std(runs, "precision_at_1")[0] for runs in results.values())
claim("lowest mean P@1 of the four rows", lowest, above=0.95)""",
    ),
    (
        "md",
        """## The article's recipe where mis-pairing should matter

Mis-pairing hurts most when another anchor's negative is often a *false* negative -- an image of this anchor's
own class. That happens with few classes and per-anchor hard negatives: restrict the digits to three that look
alike, 3, 5 and 8, and draw each anchor's M = 8 negatives among its nearest images of the *other two*. Under
`.repeat`, anchor `i` meets the negatives of anchors `j // M` for rows `j ≡ i (mod N)`; those negatives avoid
*their* anchor's class, not anchor `i`'s. On the first batch of 128 anchors of an epoch, the cell measures the
(anchor, negative) pairs each pairing makes, with ten digits and with three: the share of negatives of the
anchor's own class, and the mean pixel distance from the anchor to the other-class ones (lower = harder).""",
    ),
    (
        "code",
        """CLASSES = (3, 5, 8)
keep_train, keep_test = (torch.isin(y, torch.tensor(CLASSES)) for y in (split.y_train, split.y_test))
small = (split.x_train[keep_train], split.y_train[keep_train], split.x_test[keep_test], split.y_test[keep_test])
print(f"digits {CLASSES}: {len(small[1])} train, {len(small[3])} held-out images")


def recipe_indices(n, m):
    return torch.arange(n).repeat(m), torch.arange(n, 2 * n).repeat(m), torch.arange(2 * n, 2 * n + n * m)


def first_batch(x, y, mode):
    \"\"\"The first step demo.train takes with seed 0, M = 8 and 128 anchors: anchor, positive, negative rows.\"\"\"
    return next(demo.batches(x, y, epochs=1, negatives=8, mode=mode, batch_size=128, seed=0))


def negatives_met(x, y, batch, indices):
    \"\"\"Over the (anchor, negative) pairs `indices` makes: the share whose negative is of the anchor's class, and
    the mean pixel distance from the anchor to the negatives of other classes.\"\"\"
    rows, _, negs = batch  # [B], [B], [B, M]
    met = pt.pairing_matrix(indices(*negs.shape), *negs.shape)  # [B, B*M]
    same = y[rows][:, None] == y[negs.reshape(-1)][None, :]  # [B, B*M]
    dist = torch.cdist(x[rows], x[negs.reshape(-1)])  # [B, B*M]
    return (met & same).sum().item() / met.sum().item(), dist[met & ~same].mean().item()


pairings = {
    "own hard negatives": ("hard", pt.build_indices),
    ".repeat recipe, hard": ("hard", recipe_indices),
    "own random negatives": ("random", pt.build_indices),
}
met = {}
lines = ["", f"{'':16s} {'negatives met':22s} {'own class':>9s} {'pixel distance, other classes':>30s}"]
for data_name, (x, y) in {"ten digits": (split.x_train, split.y_train), f"digits {CLASSES}": small[:2]}.items():
    for pairing, (mode, indices) in pairings.items():
        share, dist = met[data_name, pairing] = negatives_met(x, y, first_batch(x, y, mode), indices)
        lines.append(f"{data_name:16s} {pairing:22s} {share:9.1%} {dist:30.2f}")
print("\\n".join(lines))
(_, d_hard), (share_10, d_recipe), (_, d_random) = (met["ten digits", p] for p in pairings)
claim("ten digits, .repeat recipe: share of negatives of the anchor's class", share_10, below=0.15)
claim(f"digits {CLASSES}, .repeat recipe: same share", met[f"digits {CLASSES}", ".repeat recipe, hard"][0], above=0.25)
claim("ten digits: pixel distance, random minus hard negatives", d_random - d_hard, above=0)
# the recipe's negatives are closer to random than to hard: past the midpoint of the two distances
claim("ten digits: recipe's distance, hard = 0, random = 1", (d_recipe - d_hard) / (d_random - d_hard), above=0.5)""",
    ),
    (
        "md",
        """On that batch, embedded by the untrained network, the recipe's loss value is not InfoNCE: it differs from
`pt.infonce`, from `NTXentLoss` with `pt.build_indices` and from the float64 loop `pt.reference_infonce`, which
agree. It *is* InfoNCE of a different problem -- `pt.infonce` with each anchor's negatives regrouped the way
`.repeat` regroups them (anchor `i` gets rows `i, i + N, i + 2N, ...`). The recipe's cost is the O(N²M²) of the
concatenated layout (see the quickstart's table): at N = 128, M = 8, a 1280 x 1280 similarity matrix and a
1024 x 1024 pair mask per step.""",
    ),
    (
        "code",
        """x, y = small[:2]
rows, pos_rows, neg_rows = first_batch(x, y, "hard")  # [B], [B], [B, M]
net = demo.make_embedder(seed=0)
with torch.no_grad():
    a, p = net(x[rows]), net(x[pos_rows])  # [B, 64]
    neg = net(x[neg_rows.reshape(-1)]).reshape(len(rows), 8, -1)  # [B, M, 64]
b, m = neg.shape[:2]
regrouped = neg.reshape(b * m, -1)[torch.arange(b * m).reshape(m, b).T]  # [B, M, 64]: anchor i gets rows i + kB
values = {
    "article recipe": demo.article_recipe_loss(a, p, neg, TAU),
    "NTXentLoss, pt.build_indices": NTXentLoss(temperature=TAU)(
        pt.concat_embeddings(a, p, neg), indices_tuple=pt.build_indices(b, m)
    ),
    "pt.infonce": pt.infonce(a, p, neg, temperature=TAU),
    "pt.reference_infonce": pt.reference_infonce(a, p, neg, TAU),
    "pt.infonce, regrouped negatives": pt.infonce(a, p, regrouped, temperature=TAU),
}
for name, value in values.items():
    print(f"{name:32s} {value.item():.4f}")
ref = values["pt.reference_infonce"]
for name in ("NTXentLoss, pt.build_indices", "pt.infonce"):
    claim(f"|{name} - reference|", (values[name] - ref).abs(), below=1e-4)
recipe = values["article recipe"]
claim("|article recipe - regrouped pt.infonce|", (recipe - values["pt.infonce, regrouped negatives"]).abs(), below=1e-4)
claim("|article recipe - reference|", (recipe - ref).abs(), above=0.05)""",
    ),
    (
        "md",
        """Now train on the three digits with each objective, five seeds each (small set, cheap runs). Besides
retrieval, the table shows the geometry of the held-out embeddings: the mean cosine similarity of same-class
pairs and of different-class pairs. False negatives ask the model to push same-class images apart, so the
same-class column is where one would first look for them.""",
    ),
    (
        "code",
        """small_results = {
    name: [run(*small, mode="hard", m=8, objective=objective, seed=s) for s in SEEDS]
    for name, objective in {"pt.infonce": "infonce", "article recipe": "article-recipe"}.items()
}
small_metrics = {**METRICS, "same_class_cos": "same-class cos", "other_class_cos": "other-class cos"}
print(table(small_results, small_metrics, f"digits {CLASSES}, hard, M=8"), end="\\n\\n")
compare(small_results, "pt.infonce", "article recipe", small_metrics)""",
    ),
    (
        "md",
        """What the five seeds say (mean paired differences, bounds checked by the next cell): on held-out retrieval
among 3, 5 and 8 the recipe is **not** clearly worse -- its precision@1 and MAP@R are within ±0.03 of
`pt.infonce`'s -- although close to a third of the negatives it hands an anchor are of the anchor's own class
(measured above). Nor does the recipe push same-class images apart: their mean cosine under it is at least
`pt.infonce`'s minus 0.02. What
differs is the other classes: under the recipe they stay far more similar to each other (by more than 0.3 of
cosine), while `pt.infonce` pushes them apart (negative cosine). A likely reason, not measured
here: false negatives are the most similar candidates in the recipe's softmax and take most of its weight,
leaving little to push the other classes away. Nearest-neighbour ranking on this small, easy set does not punish
that. So the case against the recipe does not rest on retrieval scores (on ten digits it cost MAP@R through lost
hardness, here nothing beyond ±0.03): its loss value is not InfoNCE (shown above), it trains each anchor against
other anchors' negatives, and it costs O(N²M²) in time and memory.""",
    ),
    (
        "code",
        """diff = {k: paired(small_results, "pt.infonce", "article recipe", k)[0] for k in small_metrics}
for metric, label in METRICS.items():
    claim(f"|{label}, pt.infonce minus article recipe|", abs(diff[metric]), below=0.03)
claim("same-class cos, pt.infonce minus article recipe", diff["same_class_cos"], below=0.02)
claim("other-class cos, pt.infonce minus article recipe", diff["other_class_cos"], below=-0.3)
claim("other-class cos, pt.infonce", mean_std(small_results["pt.infonce"], "other_class_cos")[0], below=0)""",
    ),
    (
        "md",
        """## A queue of negatives: MoCo

`examples/moco_queue.py` trains the same MLP MoCo-style (He et al. 2020): the anchors are embedded by a *query*
encoder trained by Adam; the positives and the mined hard negatives by a *key* encoder, the query encoder's
exponential moving average (momentum 0.99, no gradient); and a `pt.NegativeQueue` of the key embeddings of earlier
steps' positives adds shared negatives to every anchor: `pt.infonce(a, p, n, queue=queue, positive_ids=ids)`. Each
queued row keeps its image's index as its id, so a queued copy of an anchor's own positive is not its negative.
The cell trains with no queue and with queues of 256, 1,024 and 4,096 rows (the training set has 1,257 images: 4,096
rows hold about three copies of each), for 20 epochs (the example's default) from each of the five seeds, each
paired with the no-queue run of the same seed. The last row passes class labels as ids instead (the label oracle of
`retrieval_options.ipynb`): then no queued image of the positive's class is a negative. Below the comparison, for
the first 128 anchors of an epoch and each final queue of seed 0, the rows per anchor that its ids exclude and the
rows of the anchor's own class, which stay negatives (false negatives).""",
    ),
    (
        "code",
        """import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(demo.__file__).parents[1]))  # examples/: moco_queue.py sits beside the demo package
import moco_queue

QUEUES = {  # row -> (queue rows, class labels as ids)
    "no queue": (0, False),
    "queue 256": (256, False),
    "queue 1024": (1024, False),
    "queue 4096": (4096, False),
    "queue 1024, class ids": (1024, True),
}


def moco_run(size, class_ids, seed):
    ids = split.y_train if class_ids else None  # None: each image's index
    moco = moco_queue.train_moco(split.x_train, split.y_train, queue_size=size, ids=ids, seed=seed)
    return moco.queue, demo.evaluate(demo.embed(moco.query, split.x_test), split.y_test)


moco_results, final_queue, seconds = {}, {}, {}
for name, (size, class_ids) in QUEUES.items():
    start = time.perf_counter()
    runs = [moco_run(size, class_ids, s) for s in SEEDS]
    seconds[name] = (time.perf_counter() - start) / len(SEEDS)
    moco_results[name] = [scores for _, scores in runs]
    final_queue[name] = runs[0][0]  # seed SEEDS[0]'s queue after training
print(table(moco_results, METRICS, "MoCo, 20 epochs"), end="\\n\\n")
for name in list(QUEUES)[1:]:
    compare(moco_results, name, "no queue", METRICS)

rows, pos, _ = first_batch(split.x_train, split.y_train, "hard")  # [B] anchors, [B] positives
y = split.y_train
excluded, same_class = {}, {}
print(f"\\n{'':22s} {'s / run':>7s} {'queued':>7s} {'excluded by ids':>16s} {'own class, still negatives':>27s}")
for name, queue in final_queue.items():
    if queue is not None:
        classes = queue.ids if QUEUES[name][1] else y[queue.ids]  # [S] the class of each queued row
        match = queue.ids[None, :] == (y[pos] if QUEUES[name][1] else pos)[:, None]  # [B, S] excluded rows
        same = classes[None, :] == y[rows][:, None]  # [B, S] rows of the anchor's class
        excluded[name] = match.sum(dim=1).double().mean().item()
        same_class[name] = (same & ~match).sum(dim=1).double().mean().item()
        print(f"{name:22s} {seconds[name]:7.1f} {len(queue):7d} {excluded[name]:16.1f} {same_class[name]:27.1f}")
    else:
        print(f"{name:22s} {seconds[name]:7.1f} {0:7d}")""",
    ),
    (
        "md",
        """What the five seeds say (mean paired differences; bounds checked by the next cell, each far from the values
measured with 1 and 2 threads, other kernels and five other seeds):

* **with image ids, the queue does not measurably change held-out MAP@R**: at every size the mean difference from
  no queue is within ±0.04 -- a wide band, because the differences move with the seeds (above, each with its
  standard deviation over the seeds). Precision@1 is near its ceiling in every row (each row's mean is above 0.96).
* **why not**: more negatives are not more *useful* negatives here. The ids exclude only the copies of an anchor's
  positive -- fewer than 3 rows per anchor on average in a queue of 1,024 -- while about a tenth of the queue
  (between 5 % and 15 % of the 1,024 rows) is of the anchor's own class: false negatives, which the loss pushes
  away from the anchor.
* **with class labels as ids**, those rows are excluded too (none of the anchor's class is left), and the same
  1,024-row queue raises MAP@R by more than 0.01 on average, on every seed, and by more than 0.01 beyond the best
  image-id queue.

So the ids do their job -- no image is the negative of its own queued copy -- but with ten classes that is not
what limits a queue: it helps once the false negatives are kept out, here by labels, which an unlabelled setting
lacks (`false_negative_margin` with a guide is the label-free option: `retrieval_options.ipynb`). The seconds per
run are this machine's.""",
    ),
    (
        "code",
        """image_ids = [name for name, (size, class_ids) in QUEUES.items() if size and not class_ids]
oracle = "queue 1024, class ids"
map_delta = {name: paired(moco_results, name, "no queue", "mean_average_precision_at_r") for name in QUEUES}
for name in image_ids:
    claim(f"MoCo: MAP@R, {name} minus no queue", map_delta[name][0], above=-0.04, below=0.04)
lowest = min(mean_std(runs, "precision_at_1")[0] for runs in moco_results.values())
claim("MoCo: lowest mean P@1", lowest, above=0.96)
claim("MoCo: rows excluded per anchor by image ids, queue 1024", excluded["queue 1024"], below=3)
claim("MoCo: share of the 1024 rows of the anchor's class", same_class["queue 1024"] / 1024, above=0.05, below=0.15)
claim(f"MoCo: rows of the anchor's class left as negatives, {oracle}", same_class[oracle], below=0.5)
claim(f"MoCo: MAP@R, {oracle} minus no queue", map_delta[oracle][0], above=0.01)
claim(f"MoCo: seeds with MAP@R above no queue, {oracle}", map_delta[oracle][2], above=len(SEEDS) - 0.5)
best_image_ids = max(map_delta[name][0] for name in image_ids)
claim(f"MoCo: MAP@R, {oracle} minus the best image-id queue", map_delta[oracle][0] - best_image_ids, above=0.01)""",
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


def execute(nb: NotebookNode, cwd: Path, env: dict[str, str] | None = None) -> NotebookNode:
    """Run every cell, in order, on the ``python3`` kernel with this checkout and ``notebooks/`` (for ``claims``)
    first on ``PYTHONPATH``, in this process's environment updated with ``env``.

    nbclient raises ``CellExecutionError`` on the first cell that fails (a failed ``claim`` included). No timing
    metadata is recorded, so re-running changes only what the cells print.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        record_timing=False,
    )
    return client.execute(env=env)


def _retrieval_cells() -> list[Cell]:
    # Loaded by path: this file is run as a script and also loaded by path from the tests.
    spec = importlib.util.spec_from_file_location("retrieval_cells", HERE / "retrieval_cells.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / 'retrieval_cells.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells: list[Cell] = module.CELLS
    return cells


NOTEBOOKS = {  # path from the repository root -> (cells, cell id prefix)
    "notebooks/quickstart.ipynb": (QUICKSTART, "quickstart"),
    "notebooks/training.ipynb": (TRAINING, "training"),
    "studies/train_digits.ipynb": (TRAIN_DIGITS, "digits"),
    "studies/retrieval_options.ipynb": (_retrieval_cells(), "retrieval"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="PATH", help=f"of {list(NOTEBOOKS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := set(args.names) - set(NOTEBOOKS):
        parser.error(f"unknown notebooks {sorted(unknown)}; expected some of {list(NOTEBOOKS)}")
    for name in args.names or NOTEBOOKS:
        cells, prefix = NOTEBOOKS[name]
        path = ROOT / name
        start = time.perf_counter()
        nb = execute(build(cells, prefix), path.parent)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, executed in {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
