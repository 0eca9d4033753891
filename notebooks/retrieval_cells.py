"""The cells of studies/retrieval_options.ipynb; ``python notebooks/make_notebooks.py`` writes and executes it.

The notebook trains the digits embedder with each retrieval option of ``pt.infonce`` over five seeds (under a
minute on two CPU cores). Every number a markdown cell states is a ``claim`` (notebooks/claims.py) checked in the
code cell next to it, with a bound far from what it measures on any machine tried (notebooks/claim_spread.md), so
a change that breaks one fails the execution test (tests/test_notebooks.py) and says which.
"""

from __future__ import annotations

Cell = tuple[str, str]  # ("md" | "code", source)

CELLS: list[Cell] = [
    (
        "md",
        """# Retrieval options of `pt.infonce` on digits

`pt.infonce` can change *which similarity blocks enter which softmax*, following sentence-transformers 6.2
(`MultipleNegativesRankingLoss`, `GISTEmbedLoss`):

* `directions` -- besides anchor -> candidates (`anchor_to_positive`), also positive -> anchors
  (`positive_to_anchor`), anchor -> other anchors and positive -> other candidates; `partition="joint"` puts them
  in one softmax (GTE), `"per_direction"` averages one softmax per direction (symmetric, CLIP-like);
* `hardness_mode` / `hardness_strength` -- adds `strength * s(a, c)` (detached) to each negative logit, so harder
  negatives weigh more;
* `false_negative_margin` with a `guide` -- drops every candidate whose guide cosine to the anchor exceeds the
  anchor-positive guide cosine minus the margin; `guide=None` uses the model's own (detached) embeddings.

This notebook trains the 64-128-64 MLP of the digits demo (`pml_triplets_demo`, the example application behind
`python -m pml_triplets demo`) on scikit-learn's digits with each option and measures held-out retrieval
(precision@1 and MAP@R on the 540 held-out images, cosine). Every configuration is trained from the same
seeds -- same initial weights, triplets and batch order -- so each one is compared with the baseline *seed by
seed* (paired differences).""",
    ),
    (
        "code",
        """import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import pml_triplets as pt
import pml_triplets_demo as demo  # the digits demo: data, MLP, triplets, training loop, retrieval scores
from claims import claim  # notebooks/claims.py: checks a sentence's number against its bound, says which failed

torch.set_num_threads(1)  # tiny matrices: one thread, as the demo trains (no thread contention on a busy machine)
plt.rcParams["figure.dpi"] = 80  # modest PNGs keep the notebook small
A2P, P2A, A2A, P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"
SEEDS = (0, 1, 2, 3, 4)
EPOCHS = 8
M = 4  # hard negatives per anchor
BATCH = 128  # anchors per step
TAU = demo.TEMPERATURE
MARGIN = 0.1  # false_negative_margin, absolute

split = demo.load_digits_split()
x, y = split.x_train, split.y_train
print(f"train {tuple(x.shape)}, held-out {tuple(split.x_test.shape)}, {len(y.unique())} classes")""",
    ),
    (
        "md",
        """## In-batch negatives on ten classes are often false negatives

Each anchor has a random same-class positive and M hard negatives of *other* classes, drawn from its 4M nearest
other-class images in pixel space: its own negatives are never of its class. With `in_batch=True` it also meets
every other row's positive and negatives -- and with ten digits about one in ten of those is of its own class.
The loss pushes such *false negatives* away from the anchor, against the retrieval goal. The cell counts them on
the first batch of seed 0.""",
    ),
    (
        "code",
        """# the first step demo.train takes with seed 0: anchor rows [B], positive rows [B], negative rows [B, M]
rows, pos, neg = next(demo.batches(x, y, epochs=1, negatives=M, batch_size=BATCH, seed=0))
docs_y = torch.cat([y[pos][:, None], y[neg]], dim=1)  # [B, 1 + M]: the class of each row's positive and negatives
same = y[rows][:, None, None] == docs_y[None]  # [B, B, 1 + M]: candidate (j, k) is of anchor i's class
other_row = ~torch.eye(len(rows), dtype=torch.bool)[:, :, None]  # [B, B, 1]
false_neg = (same & other_row).flatten(1).sum(1).float()  # [B] false negatives per anchor
own_same = (y[rows][:, None] == y[neg]).sum().item()
print(
    f"in-batch candidates per anchor: (B - 1)(1 + M) = {(len(rows) - 1) * (1 + M)}, of which of its own class: "
    f"{false_neg.mean():.1f} on average (min {false_neg.min():.0f}, max {false_neg.max():.0f})"
)
claim("own negatives of the anchor's class", own_same, below=1)
claim("fewest false negatives among the in-batch candidates of an anchor", false_neg.min(), above=0)""",
    ),
    (
        "md",
        """## Training loop

`demo.train` runs Adam for `EPOCHS` epochs of `BATCH`-anchor steps, each embedding anchors `[B]`, positives `[B]`
and negatives `[B, M]` and calling `pt.infonce` with the configuration's `loss_options`. A guide is a tensor of
guide embeddings of all training images (`guide=`), and `ids=` an id of each training image; `demo.train` indexes
both like each batch. Two rows of the comparison are not guides:

* **own negatives only** (`in_batch=False`): no in-batch candidates, so no false negatives -- a reference.
* **label oracle**: `positive_ids` / `negative_ids` set to the class labels, so that every in-batch candidate of
  the anchor's class is dropped (a candidate sharing an id with the anchor's positive is never its negative).
  It needs the labels, which a real false-negative filter does not have: it shows what removing exactly the
  false negatives is worth here.

The guides of the filter rows: **raw pixels**; a **1-epoch model** (same MLP, own negatives, one epoch, another
seed); `guide=None`, the **model's own** embeddings as it trains; and a **trained model**, the
"own negatives only" model of the same seed -- GISTEmbed's setting, a guide trained beforehand.""",
    ),
    (
        "code",
        """def train_with(seed, options, epochs=EPOCHS):
    \"\"\"A fresh demo embedder trained by demo.train with pt.infonce's `options`; the entries "guide" (a [N_train, g]
    tensor) and "ids" (a [N_train] tensor) go to demo.train's `guide` and `ids`.\"\"\"
    options = dict(options)
    per_image = {"guide": options.pop("guide", None), "ids": options.pop("ids", None)}  # indexed like each batch
    model = demo.make_embedder(seed=seed)
    demo.train(model, x, y, epochs=epochs, negatives=M, batch_size=BATCH, seed=seed, loss_options=options, **per_image)
    return model  # in eval mode


IN_BATCH = {"in_batch": True}
FILTER = {"in_batch": True, "false_negative_margin": MARGIN}
CONFIGS = {
    "own negatives only": {},
    "in-batch (baseline)": IN_BATCH,
    "symmetric A2P+P2A, per_direction": {**IN_BATCH, "directions": (A2P, P2A), "partition": "per_direction"},
    "GTE: 4 directions, joint": {**IN_BATCH, "directions": (A2P, P2A, A2A, P2P)},
    "hardness 'all', strength 5": {**IN_BATCH, "hardness_mode": "all", "hardness_strength": 5.0},
    "filter, guide = raw pixels": {**FILTER, "guide": "raw pixels"},
    "filter, guide = 1-epoch model": {**FILTER, "guide": "1-epoch model"},
    "filter, guide = None (own)": FILTER,
    "filter, guide = trained model": {**FILTER, "guide": "trained model"},
    "label oracle (ids = classes)": {**IN_BATCH, "ids": y},
}
BASELINE = "in-batch (baseline)"
METRICS = {"precision_at_1": "P@1", "mean_average_precision_at_r": "MAP@R"}""",
    ),
    (
        "md",
        """## Train every configuration on every seed

The "trained model" guide of seed `s` is the "own negatives only" model of seed `s`, so that row runs first.""",
    ),
    (
        "code",
        """start = time.perf_counter()
guides = {"raw pixels": {s: x for s in SEEDS}}
guides["1-epoch model"] = {s: demo.embed(train_with(100 + s, {}, epochs=1), x) for s in SEEDS}
results, models = {}, {}
for name, options in CONFIGS.items():
    if options.get("guide") == "trained model" and "trained model" not in guides:
        guides["trained model"] = {s: demo.embed(models["own negatives only", s], x) for s in SEEDS}
    results[name] = []
    for s in SEEDS:
        opts = options if "guide" not in options else {**options, "guide": guides[options["guide"]][s]}
        models[name, s] = train_with(s, opts)
        results[name].append(demo.evaluate(demo.embed(models[name, s], split.x_test), split.y_test))
print(f"{len(CONFIGS)} configurations x {len(SEEDS)} seeds trained in {time.perf_counter() - start:.0f} s")""",
    ),
    (
        "code",
        """def values(name, metric):
    return [r[metric] for r in results[name]]


def paired(name, metric):
    \"\"\"Seed-by-seed difference from the baseline: mean, standard deviation, and how many seeds are higher.\"\"\"
    diffs = [v - b for v, b in zip(values(name, metric), values(BASELINE, metric))]
    return statistics.mean(diffs), statistics.stdev(diffs), sum(d > 0 for d in diffs)


def pm(v):
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


header = f"| {'configuration':34s} | " + " | ".join(
    f"{label:15s} | {'Δ ' + label + ' vs baseline':24s}" for label in METRICS.values()
)
lines = [header + " |", "|" + "|".join("-" * (w + 2) for w in [34] + [15, 24] * len(METRICS)) + "|"]
for name in CONFIGS:
    cells = []
    for metric in METRICS:
        mean, std, up = paired(name, metric)
        delta = "" if name == BASELINE else f"{mean:+.4f} ± {std:.4f}, {up}/{len(SEEDS)} up"
        cells += [f"{pm(values(name, metric)):15s}", f"{delta:24s}"]
    lines.append(f"| {name:34s} | " + " | ".join(cells) + " |")
print(f"Held-out retrieval, mean ± std over seeds {SEEDS} ({EPOCHS} epochs, M = {M}, B = {BATCH}, τ = {TAU}).")
print("Δ: paired difference from the baseline, same seed, mean ± std; 'up': seeds above the baseline.")
print("\\n".join(lines))""",
    ),
    (
        "code",
        """names = [n for n in CONFIGS if n != BASELINE]
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
for ax, (metric, label) in zip(axes, METRICS.items()):
    stats = [paired(n, metric) for n in names]
    means, stds = [m for m, _, _ in stats], [s for _, s, _ in stats]
    ax.barh(range(len(names)), means, xerr=stds, color="tab:blue", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    for i, (m, sd) in enumerate(zip(means, stds)):
        ax.annotate(
            f"{m:+.3f}",
            (m + sd if m >= 0 else m - sd, i),  # beyond the error bar
            xytext=(4 if m >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if m >= 0 else "right",
            va="center",
            fontsize=7,
        )
    ax.margins(x=0.18)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set(xlabel=f"Δ held-out {label} vs baseline", title=f"{label} (baseline {pm(values(BASELINE, metric))})")
axes[0].set_yticks(range(len(names)), names)
axes[0].invert_yaxis()
fig.suptitle(
    f"Change from the in-batch baseline, paired by seed: mean ± std over {len(SEEDS)} seeds"
)
plt.show()""",
    ),
    (
        "md",
        """## What each guide drops

Which candidates does the filter remove? The cell applies the rule of the docstring -- candidate `c` is dropped
from anchor `a`'s softmax when `g(a, c) > g(a, p) - margin`, `g` the guide cosine -- to the first batch of seed 0
and counts the dropped share of three kinds of candidates: in-batch candidates of the anchor's class (false
negatives: dropping them is the point), in-batch candidates of other classes, and the anchor's own hard negatives
(true negatives, chosen to be hard). "guide = None" is shown with the untrained model, the guide it is at the
first step; the rule's loss is checked against `pt.infonce` on that batch.""",
    ),
    (
        "code",
        """def dropped(guide, margin=MARGIN):
    \"\"\"[B, B, 1 + M] bool: candidate (row j, doc k) dropped for anchor i -- the docstring's rule.\"\"\"
    g = F.normalize(guide, dim=-1)
    ga, docs = g[rows], torch.cat([g[pos][:, None], g[neg]], dim=1)  # [B, g], [B, 1 + M, g]
    cos = torch.einsum("ig,jkg->ijk", ga, docs)  # [B, B, 1 + M]
    threshold = (ga * g[pos]).sum(-1) - margin  # [B]
    return cos > threshold[:, None, None]


own_neg = torch.zeros(len(rows), len(rows), 1 + M, dtype=torch.bool)
own_neg[torch.arange(len(rows)), torch.arange(len(rows)), 1:] = True  # [B, B, 1 + M]
kinds = {"in-batch, same class": same & other_row, "in-batch, other class": ~same & other_row, "own negatives": own_neg}
untrained = demo.make_embedder(seed=0).eval()
with torch.no_grad():
    first_step = untrained(x)
diag_guides = {  # name -> the guides to average over: the trained ones of every seed
    "raw pixels": [x],
    "1-epoch model": [guides["1-epoch model"][s] for s in SEEDS],
    "None (untrained model, step 1)": [first_step],
    "trained model": [guides["trained model"][s] for s in SEEDS],
}
print(f"share of each kind dropped at margin {MARGIN}, first batch of seed 0 (trained guides: mean over the seeds):")
print(f"{'guide':32s}" + "".join(f"{k:>24s}" for k in kinds))
share = {}
for name, guide_list in diag_guides.items():
    drops = [dropped(guide) for guide in guide_list]
    share[name] = {k: statistics.mean((d & m).sum().item() / m.sum().item() for d in drops) for k, m in kinds.items()}
    print(f"{name:32s}" + "".join(f"{v:24.2f}" for v in share[name].values()))

# the rule reproduces pt.infonce: the loss over the kept candidates, with the raw-pixel guide and without a guide
with torch.no_grad():
    e = F.normalize(first_step, dim=1)
    a_e, docs_e = e[rows], torch.cat([e[pos][:, None], e[neg]], dim=1)  # [B, d], [B, 1 + M, d]
    logits = torch.einsum("id,jkd->ijk", a_e, docs_e) / TAU  # [B, B, 1 + M]
    target = (a_e * e[pos]).sum(-1) / TAU  # [B]
    for guide, kw in ((x, {"guide": (x[rows], x[pos], x[neg])}), (first_step, {})):
        keep = (own_neg | other_row) & ~dropped(guide)  # the anchor's own positive is the target, not a candidate
        cand = logits.masked_fill(~keep, float("-inf")).flatten(1)  # [B, B(1 + M)]
        by_rule = (torch.logsumexp(torch.cat([target[:, None], cand], 1), 1) - target).mean()
        by_pt = pt.infonce(first_step[rows], first_step[pos], first_step[neg], temperature=TAU, **FILTER, **kw)
        claim("rule's loss vs pt.infonce's, relative difference", ((by_rule - by_pt) / by_pt).abs(), below=1e-4)
print("the rule's loss matches pt.infonce on this batch (raw-pixel guide and guide=None)")""",
    ),
    (
        "md",
        """The positive is drawn at random among the images of the anchor's digit, and the margin is 0.1 of cosine.
With a guide that does not already separate the digits -- raw pixels, or the untrained network -- most of the
anchor's own hard negatives are, by the guide, within the margin of the positive, and are dropped along with the
false negatives: the filter removes the training signal the hard negatives were drawn for. The 1-epoch models
drop a sizeable share of them too (more than a tenth, on average over the five seeds' models); the trained models
drop almost none of them (under 5 %) and most false negatives (over half). `guide = None` is the model grading
itself: it drops every candidate whose logit is within margin / τ = 1 of the positive's -- the candidates the loss
weighs most -- so at every step it removes the negatives the model currently confuses with the positive.""",
    ),
    (
        "code",
        """own = {name: s["own negatives"] for name, s in share.items()}
claim("share of own negatives dropped, raw-pixel guide", own["raw pixels"], above=0.5)
claim("share of own negatives dropped, untrained model", own["None (untrained model, step 1)"], above=0.5)
claim("share of own negatives dropped, 1-epoch models", own["1-epoch model"], above=0.1)
claim("share of own negatives dropped, trained models", own["trained model"], below=0.05)
claim("share of false negatives dropped, trained models", share["trained model"]["in-batch, same class"], above=0.5)""",
    ),
    (
        "md",
        """## What the numbers say

Each sentence below is a bound on numbers of the table, checked by the cell after it (`claim` prints each check).
Training results move from machine to machine -- with the thread count, the vector instructions the kernels use
and the seeds -- so every bound was set far from the values measured under all of these
(`python notebooks/claim_spread.py`, table in `notebooks/claim_spread.md`), and a sentence that no bound can carry
on every machine is not made.

* **False negatives cost retrieval here**: removing exactly them (the label oracle) raises MAP@R by more than
  0.02 on average over the seeds, and on every seed.
* **A guide-based filter did not deliver that gain.** With raw pixels, a 1-epoch model or the model itself as
  guide it *lowered* MAP@R on average (by more than 0.1, 0.02 and 0.01); along with the false negatives, these
  guides drop true ones (most of the own hard negatives with raw pixels or the untrained model, in the counts
  above). With a trained guide it drops almost no true negative, and its change stays more than 0.01 below the
  oracle's.
* **Directions and hardness leave both metrics within ±0.02 of the baseline** (mean paired change over five
  seeds; symmetric, GTE, hardness "all" at strength 5; the table shows each spread). None of them removes false
  negatives; the extra directions even add some (other anchors of the anchor's class).""",
    ),
    (
        "code",
        """map_r = "mean_average_precision_at_r"
oracle, trained = "label oracle (ids = classes)", "filter, guide = trained model"
claim("label oracle: mean Δ MAP@R", paired(oracle, map_r)[0], above=0.02)
claim("label oracle: seeds with MAP@R above the baseline", paired(oracle, map_r)[2], above=len(SEEDS) - 0.5)
for guide, bound in (("raw pixels", -0.1), ("1-epoch model", -0.02), ("None (own)", -0.01)):
    claim(f"filter, guide = {guide}: mean Δ MAP@R", paired(f"filter, guide = {guide}", map_r)[0], below=bound)
gap = paired(oracle, map_r)[0] - paired(trained, map_r)[0]
claim("label oracle minus trained-guide filter: mean Δ MAP@R", gap, above=0.01)
for name in ("symmetric A2P+P2A, per_direction", "GTE: 4 directions, joint", "hardness 'all', strength 5"):
    for metric, label in METRICS.items():
        claim(f"{name}: |mean Δ {label}|", abs(paired(name, metric)[0]), below=0.02)""",
    ),
]
