"""Retrieval options against the installed peers: sentence-transformers 6.2 and, when importable, open_clip.

Every test first checks the loop formula against the peer -- that validates the formula -- and then checks
``pt.infonce`` against the same peer, in float64 to 1e-12, loss and gradients. The peers are called as
installed (never a copy of their code); only their embedding step is replaced by a lookup, so that they score
the tensors given here.

Mapping: ST ``scale`` = 1/τ; ST queries = anchors, ``docs[0]`` = positives, ``docs[1 + m]`` = ``negatives[:, m]``.
ST always uses the other rows' docs, so ``in_batch=True`` throughout. ST directions and hardness modes:
query_to_doc = anchor_to_positive, doc_to_query = positive_to_anchor, query_to_query = anchor_to_anchor,
doc_to_doc = positive_to_positive; in_batch_negatives = "in_batch", hard_negatives = "own",
all_negatives = "all".
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from formula import infonce_loop
from helpers import clip_loss_class
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

import pml_triplets as pt

pytestmark = pytest.mark.slow  # the full run only: importing sentence-transformers alone takes seconds


def installed(module: str) -> Any:
    """The installed peer module, imported when a test first needs it (so the fast run, which deselects this
    file, does not pay for it), or a skip when it is missing."""
    return pytest.importorskip(module, reason="sentence-transformers>=6.2 is in the dev extra")


def st_losses() -> Any:
    return installed("sentence_transformers.sentence_transformer.losses")


F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
N, M, D, DG = 5, 3, 6, 4
SCALE = 4.0  # ST's scale; τ = 1/4 is exact in binary, so scale·s and s/τ round alike
TAU = 1.0 / SCALE

ST_DIRECTIONS = {
    "query_to_doc": "anchor_to_positive",
    "doc_to_query": "positive_to_anchor",
    "query_to_query": "anchor_to_anchor",
    "doc_to_doc": "positive_to_positive",
}
ST_HARDNESS = {None: None, "in_batch_negatives": "in_batch", "hard_negatives": "own", "all_negatives": "all"}


def data(seed: int, m: int = M) -> dict[str, torch.Tensor]:
    """Positives near their anchors and one near-duplicate negative per row, so that margins filter some."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=F64)
    p = a + 0.7 * torch.randn(N, D, generator=g, dtype=F64)
    n = torch.randn(N, m, D, generator=g, dtype=F64)
    if m:
        n[:, 0] = p + 0.3 * torch.randn(N, D, generator=g, dtype=F64)  # false negatives
    w = torch.randn(D, DG, generator=g, dtype=F64)  # the guide: another view of the same points, width DG
    guide = [x @ w + 0.2 * torch.randn(*x.shape[:-1], DG, generator=g, dtype=F64) for x in (a, p, n)]
    return {"a": a, "p": p, "n": n, "ga": guide[0], "gp": guide[1], "gn": guide[2]}


def leaves(b: dict[str, torch.Tensor], m: int) -> list[torch.Tensor]:
    """Fresh (anchors, positives, negatives or None) that collect gradients."""
    out = [b["a"].clone().requires_grad_(), b["p"].clone().requires_grad_()]
    return [*out, b["n"].clone().requires_grad_() if m else None]


Result = tuple[torch.Tensor, list[torch.Tensor]]  # (loss, gradients of anchors, positives, negatives)


def loss_and_grads(fn: Any, b: dict[str, torch.Tensor], m: int) -> Result:
    xs = leaves(b, m)
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs if x is not None]


def check(who: str, got: Result, want: Result) -> None:
    loss, grads = got
    torch.testing.assert_close(loss, want[0], **TOL, msg=lambda s: f"[{who}] loss differs from the peer: {s}")
    assert len(grads) == len(want[1]), f"[{who}] {len(grads)} gradients against the peer's {len(want[1])}"
    names = ("anchors", "positives", "negatives")[: len(grads)]  # no negatives: pairs only
    for name, x, y in zip(names, grads, want[1], strict=True):
        torch.testing.assert_close(x, y, **TOL, msg=lambda s, name=name: f"[{who}] d/d{name} differs: {s}")


class Lookup(nn.Module):
    """Stands in for a SentenceTransformer: 'embeds' a column by returning the tensor stored under ``key``.

    It carries the tokenizer and max_seq_length that GISTEmbedLoss's constructor inspects (a one-word vocabulary,
    built locally: no download), identical for model and guide, so GIST never re-tokenizes.
    """

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        tokenizers, transformers = installed("tokenizers"), installed("transformers")
        vocab = tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")
        self.tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(vocab))
        self.max_seq_length = 8

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": features[self.key]}


def dot_loss_fn() -> NTXentLoss:
    return NTXentLoss(temperature=TAU, distance=DotProductSimilarity(normalize_embeddings=False))  # raw dot


# ---------------------------------------------------------------- MultipleNegativesRankingLoss

ST_DIRS = [("query_to_doc", *rest) for r in range(4) for rest in itertools.combinations(list(ST_DIRECTIONS)[1:], r)]
MNRL_CASES = [
    pytest.param(dirs, part, mode, id=f"{'+'.join(d.replace('_to_', '2') for d in dirs)}-{part}-{mode}")
    for dirs in ST_DIRS
    for part in ("joint", "per_direction")
    for mode in ST_HARDNESS
    if part == "joint" or not set(dirs) & {"query_to_query", "doc_to_doc"}  # ST raises for the others
]


@pytest.mark.parametrize("m", [0, M], ids=["pairs", "negatives"])
@pytest.mark.parametrize(("dirs", "part", "mode"), MNRL_CASES)
def test_multiple_negatives_ranking(dirs: tuple[str, ...], part: str, mode: str | None, m: int) -> None:
    b = data(seed=len(dirs) + 7 * m)
    peer_loss = st_losses().MultipleNegativesRankingLoss(
        Lookup("emb"),
        scale=SCALE,
        directions=dirs,
        partition_mode=part,
        hardness_mode=mode,
        hardness_strength=2.5 if mode else 0.0,
    )
    peer = loss_and_grads(
        lambda a, p, n: peer_loss.compute_loss_from_embeddings([a, p, *([] if n is None else n.unbind(1))], None),
        b,
        m,
    )
    options = {
        "in_batch": True,
        "directions": tuple(ST_DIRECTIONS[d] for d in dirs),
        "partition": part,
        "hardness_mode": ST_HARDNESS[mode],
        "hardness_strength": 2.5 if mode else 0.0,
    }
    # 1. the formula against sentence-transformers: validates the formula
    check("formula", loss_and_grads(lambda a, p, n: infonce_loop(a, p, n, TAU, **options), b, m), peer)
    # 2. pml_triplets against sentence-transformers (needs the lead's implementation of these options)
    if options["hardness_mode"] == "own" and m == 0:  # a no-op that sentence-transformers warns about: raised here
        with pytest.raises(ValueError, match="hardness_mode='own'"):
            pt.infonce(b["a"], b["p"], None, temperature=TAU, **options)
        return
    check("pt.infonce", loss_and_grads(lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, **options), b, m), peer)


@pytest.mark.parametrize("mode", list(ST_HARDNESS)[1:])
def test_multiple_negatives_ranking_dot_product(mode: str) -> None:
    # hardness penalizes the raw similarity of the loss's own similarity function, here the dot product
    b = data(seed=3)
    peer_loss = st_losses().MultipleNegativesRankingLoss(
        Lookup("emb"),
        scale=SCALE,
        similarity_fct=installed("sentence_transformers.util").dot_score,
        directions=tuple(ST_DIRECTIONS),
        hardness_mode=mode,
        hardness_strength=0.5,
    )
    peer = loss_and_grads(lambda a, p, n: peer_loss.compute_loss_from_embeddings([a, p, *n.unbind(1)], None), b, M)
    options = {
        "in_batch": True,
        "directions": tuple(ST_DIRECTIONS.values()),
        "hardness_mode": ST_HARDNESS[mode],
        "hardness_strength": 0.5,
    }
    # 1. formula
    check("formula", loss_and_grads(lambda a, p, n: infonce_loop(a, p, n, TAU, sim="dot", **options), b, M), peer)
    # 2. pml_triplets (needs the lead's implementation)
    got = loss_and_grads(lambda a, p, n: pt.infonce(a, p, n, loss_fn=dot_loss_fn(), **options), b, M)
    check("pt.infonce", got, peer)


@pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated:DeprecationWarning")
@pytest.mark.parametrize("m", [0, M], ids=["pairs", "negatives"])
def test_multiple_negatives_symmetric_ranking(m: int) -> None:
    b = data(seed=11 + m)
    peer_loss = st_losses().MultipleNegativesSymmetricRankingLoss(Lookup("emb"), scale=SCALE)
    peer = loss_and_grads(
        lambda a, p, n: peer_loss.compute_loss_from_embeddings([a, p, *([] if n is None else n.unbind(1))], None),
        b,
        m,
    )
    options = {
        "in_batch": True,
        "directions": ("anchor_to_positive", "positive_to_anchor"),
        "partition": "per_direction",
    }
    # 1. formula
    check("formula", loss_and_grads(lambda a, p, n: infonce_loop(a, p, n, TAU, **options), b, m), peer)
    # 2. pml_triplets (needs the lead's implementation)
    check("pt.infonce", loss_and_grads(lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, **options), b, m), peer)


# ---------------------------------------------------------------- GISTEmbedLoss
#
# GIST's positive-positive block holds positives only, whereas positive_to_positive also holds the other rows'
# negatives: contrast_positives is compared on pairs only. GIST's anchor-anchor and positive-positive blocks
# contain the diagonal (a_i, a_i) and (p_i, p_i), which its filter drops whenever g(a_i, p_i) − margin < 1 --
# true for every input here (margins >= 0, no positive parallel to its anchor) -- while ours exclude it always.
# GIST's negative column is our negatives[:, 0] (M = 1); it filters each row's negative against every anchor.

GIST_CASES = [
    pytest.param(m, ca, cp, id=f"{'pairs' if m == 0 else 'negatives'}-aa{int(ca)}-pp{int(cp)}")
    for m in (0, 1)
    for ca in (False, True)
    for cp in (False, True)
    if not (m and cp)
]


@pytest.mark.parametrize("guided", [True, False], ids=["guide", "self-guided"])
@pytest.mark.parametrize(("strategy", "margin"), [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.2)])
@pytest.mark.parametrize(("m", "contrast_anchors", "contrast_positives"), GIST_CASES)
def test_gist_embed(
    m: int, contrast_anchors: bool, contrast_positives: bool, strategy: str, margin: float, guided: bool
) -> None:
    b = data(seed=7 + m, m=m)  # seeds where every block's filter drops some
    peer_loss = st_losses().GISTEmbedLoss(
        Lookup("emb"),
        Lookup("guide" if guided else "emb"),  # self-guided: the guide returns the model's own embeddings
        temperature=TAU,
        margin_strategy=strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
    )

    def peer_fn(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
        columns = [(a, b["ga"]), (p, b["gp"])] + ([] if n is None else [(n[:, 0], b["gn"][:, 0])])
        return peer_loss([{"emb": x, "guide": gx} for x, gx in columns], None)

    peer = loss_and_grads(peer_fn, b, m)
    guide = (b["ga"], b["gp"], b["gn"] if m else None) if guided else None
    directions = ("anchor_to_positive",)
    directions += ("anchor_to_anchor",) * contrast_anchors + ("positive_to_positive",) * contrast_positives
    options = {
        "in_batch": True,
        "directions": directions,
        "false_negative_margin": margin,
        "margin_strategy": strategy,
        "guide": guide,
    }
    # 1. formula
    check("formula", loss_and_grads(lambda a, p, n: infonce_loop(a, p, n, TAU, **options), b, m), peer)
    # 2. pml_triplets (needs the lead's implementation)
    check("pt.infonce", loss_and_grads(lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, **options), b, m), peer)


def test_gist_filter_is_not_vacuous() -> None:
    # the inputs above make GIST drop candidates (its near-duplicate negatives among them): without anchor-anchor
    # and positive-positive blocks it is MNRL minus the dropped candidates, hence strictly below MNRL
    b = data(seed=8, m=1)
    gist = st_losses().GISTEmbedLoss(
        Lookup("emb"), Lookup("guide"), temperature=TAU, margin=0.1, contrast_anchors=False, contrast_positives=False
    )
    columns = [(b["a"], b["ga"]), (b["p"], b["gp"]), (b["n"][:, 0], b["gn"][:, 0])]
    filtered = gist([{"emb": x, "guide": gx} for x, gx in columns], None)
    mnrl = st_losses().MultipleNegativesRankingLoss(Lookup("emb"), scale=SCALE)
    unfiltered = mnrl.compute_loss_from_embeddings([b["a"], b["p"], b["n"][:, 0]], None)
    assert 0.1 < filtered < unfiltered - 0.1


# ---------------------------------------------------------------- open_clip


def test_open_clip_loss() -> None:
    # symmetric image/text loss: the mean of the two directions, each a softmax over the batch, raw dot product
    clip_loss = clip_loss_class()()
    b = data(seed=13, m=0)
    b.update(a=nn.functional.normalize(b["a"], dim=-1), p=nn.functional.normalize(b["p"], dim=-1))  # as CLIP does
    peer = loss_and_grads(lambda a, p, n: clip_loss(a, p, logit_scale=SCALE), b, 0)
    options = {
        "in_batch": True,
        "directions": ("anchor_to_positive", "positive_to_anchor"),
        "partition": "per_direction",
    }
    # 1. formula
    check("formula", loss_and_grads(lambda a, p, n: infonce_loop(a, p, n, TAU, sim="dot", **options), b, 0), peer)
    # 2. pml_triplets (needs the lead's implementation)
    got = loss_and_grads(lambda a, p, n: pt.infonce(a, p, n, loss_fn=dot_loss_fn(), **options), b, 0)
    check("pt.infonce", got, peer)
