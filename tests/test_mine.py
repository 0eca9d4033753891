"""``mine_negatives`` against a brute-force reference written here from the semantics, in float64 Python loops.

The reference scores every (query, corpus item) pair with the full formula (no tiles, no top-k), drops the pairs
each filter names, ranks the survivors by (score descending, corpus id ascending) and cuts the window
``[range_min, range_max)``. The miner must return exactly its first ``M`` ids (``"top"``), or ``M`` distinct ids of
it (``"random"``), whatever the tile sizes. A slow test compares with ``sentence_transformers.util.
mine_hard_negatives`` itself, on the same embeddings, where its window covers the corpus.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
from helpers import CUDA, DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt

Q, C, D, M = 7, 53, 5, 4
FAISS = importlib.util.find_spec("faiss") is not None


def data(seed: int = 0, q: int = Q, c: int = C, d: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    queries, corpus = torch.randn(q, d, generator=g), torch.randn(c, d, generator=g)
    positive_ids = torch.randint(0, c, (q, 3), generator=g)
    positive_ids[0, 1:] = -1  # one positive only: -1 pads
    positive_ids[1:2, 2] = -1
    exclude_ids = torch.randint(0, c, (q, 2), generator=g)
    exclude_ids[2:3, 0] = -1
    return {"queries": queries, "corpus": corpus, "positive_ids": positive_ids, "exclude_ids": exclude_ids}


# ---------------------------------------------------------------------------------------------------------------
# the reference: Python floats, every pair, no tiles
# ---------------------------------------------------------------------------------------------------------------


def score(a: list[float], b: list[float], kind: str) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    if kind == "dot":  # DotProductSimilarity(normalize_embeddings=False)
        return dot
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if kind == "cosine":
        return dot / (na * nb)
    # LpDistance() enters the loss negated, on unit rows
    return -math.sqrt(sum((x / na - y / nb) ** 2 for x, y in zip(a, b, strict=True)))


def window(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    positive_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None = None,
    *,
    kind: str = "cosine",
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
) -> list[list[tuple[int, float]]]:
    """Each query's window: (id, score) of the surviving candidates of ranks [range_min, range_max)."""
    qs, cs = queries.double().tolist(), corpus.double().tolist()
    pids = positive_ids.reshape(len(qs), -1).tolist()
    eids = [[] for _ in qs] if exclude_ids is None else exclude_ids.tolist()
    out = []
    for a, q in enumerate(qs):
        banned = {j for j in pids[a] + eids[a] if j >= 0}
        positives = [score(q, cs[j], kind) for j in pids[a] if j >= 0]
        survivors = []
        for j, c in enumerate(cs):
            s = score(q, c, kind)
            if j in banned:
                continue
            if positives and absolute_margin is not None and s + absolute_margin > min(positives):
                continue
            if positives and relative_margin is not None and s > min(positives) - abs(min(positives)) * relative_margin:
                continue
            if (max_score is not None and s > max_score) or (min_score is not None and s < min_score):
                continue
            survivors.append((j, s))
        survivors.sort(key=lambda js: (-js[1], js[0]))
        out.append(survivors[range_min:range_max])
    return out


def top(windows: list[list[tuple[int, float]]], m: int = M) -> torch.Tensor:
    return torch.tensor([[j for j, _ in w[:m]] + [-1] * (m - len(w[:m])) for w in windows])


def top_scores(windows: list[list[tuple[int, float]]], m: int = M) -> torch.Tensor:
    return torch.tensor([[s for _, s in w[:m]] + [-math.inf] * (m - len(w[:m])) for w in windows])


# ---------------------------------------------------------------------------------------------------------------
# "top": equality with the reference, every filter, their combinations, tiles
# ---------------------------------------------------------------------------------------------------------------

FILTERS = [
    pytest.param({}, id="none"),
    pytest.param({"range_min": 3}, id="range_min"),
    pytest.param({"range_max": 9}, id="range_max"),
    pytest.param({"absolute_margin": 0.1}, id="absolute_margin"),
    pytest.param({"absolute_margin": -0.2}, id="negative_absolute_margin"),
    pytest.param({"relative_margin": 0.05}, id="relative_margin"),
    pytest.param({"max_score": 0.4}, id="max_score"),
    pytest.param({"min_score": -0.1}, id="min_score"),
    pytest.param({"max_score": 0.5, "min_score": 0.0, "range_min": 1}, id="score_band"),
    pytest.param({"absolute_margin": 0.0, "relative_margin": 0.1, "range_min": 2}, id="both_margins"),
    pytest.param(
        {"relative_margin": 0.3, "max_score": 0.2, "min_score": -0.6, "range_min": 1, "range_max": 12}, id="everything"
    ),
    pytest.param({"min_score": 0.55}, id="few_survivors"),
    pytest.param({"range_min": 60}, id="no_survivors"),
]
TILES = [
    pytest.param(None, None, id="auto"),
    pytest.param(3, 7, id="3x7"),  # divides neither Q=7 nor C=53
    pytest.param(7, 53, id="one_tile"),
    pytest.param(2, 1, id="2x1"),
    pytest.param(1, 10, id="1x10"),
]


@pytest.mark.sweep(fast=12)
@pytest.mark.parametrize("options", FILTERS)
@pytest.mark.parametrize(("query_chunk", "corpus_chunk"), TILES)
def test_top_equals_the_reference(options: dict[str, Any], query_chunk: int | None, corpus_chunk: int | None) -> None:
    x = data()
    expected = window(**x, **options)
    mined = pt.mine_negatives(num_negatives=M, query_chunk=query_chunk, corpus_chunk=corpus_chunk, **x, **options)
    assert torch.equal(mined.ids, top(expected))
    assert torch.equal(mined.mask, mined.ids >= 0)
    torch.testing.assert_close(mined.scores, top_scores(expected).float(), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 4), st.integers(1, 6)),  # Q, C, d, M
    range_min=st.integers(0, 5),
    # two decimals: a margin under float32's resolution (1e-12) is rounded away where the inputs' dtype scores
    margin=st.one_of(st.none(), st.integers(-50, 50).map(lambda v: v / 100)),
    band=st.tuples(*[st.one_of(st.none(), st.integers(-100, 100).map(lambda v: v / 100))] * 2),
    tiles=st.tuples(st.integers(1, 7), st.integers(1, 45)),
)
def test_any_case_equals_the_reference(
    seed: int,
    shape: tuple[int, int, int, int],
    range_min: int,
    margin: float | None,
    band: tuple[float | None, float | None],
    tiles: tuple[int, int],
) -> None:
    q, c, d, m = shape
    x = data(seed, q, c, d)
    options = {"range_min": range_min, "relative_margin": margin, "max_score": band[0], "min_score": band[1]}
    mined = pt.mine_negatives(num_negatives=m, query_chunk=tiles[0], corpus_chunk=tiles[1], **x, **options)
    assert torch.equal(mined.ids, top(window(**x, **options), m))


def test_the_filters_cut_something_and_leave_rows_short() -> None:
    """The cases above are not vacuous: each filter changes the window, and some rows come short."""
    x = data()
    plain = window(**x)
    for options in [p.values[0] for p in FILTERS[1:]]:
        assert window(**x, **options) != plain, options
    short = top(window(**x, min_score=0.55))
    assert (short == -1).any()
    assert (short >= 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kind", "loss_fn"),
    [
        pytest.param("cosine", None, id="cosine"),
        pytest.param("lp", NTXentLoss(distance=LpDistance()), id="lp"),
        pytest.param("dot", NTXentLoss(distance=DotProductSimilarity(normalize_embeddings=False)), id="dot"),
    ],
)
def test_the_loss_distance_decides_the_score(device: str, kind: str, loss_fn: NTXentLoss | None) -> None:
    x = {k: v.to(device) for k, v in data(1).items()}
    options = {"range_min": 2, "relative_margin": 0.05}
    expected = window(**x, kind=kind, **options)
    mined = pt.mine_negatives(num_negatives=M, loss_fn=loss_fn, corpus_chunk=8, **x, **options)
    assert mined.ids.device.type == device
    assert mined.scores.device.type == device
    assert torch.equal(mined.ids.cpu(), top(expected))
    torch.testing.assert_close(mined.scores.cpu(), top_scores(expected).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_scores_come_in_the_inputs_dtype(dtype: torch.dtype) -> None:
    x = data(2)
    x["queries"], x["corpus"] = x["queries"].to(dtype), x["corpus"].to(dtype)
    mined = pt.mine_negatives(num_negatives=M, **x)
    assert mined.ids.dtype == torch.int64
    assert mined.mask.dtype == torch.bool
    assert mined.scores.dtype == dtype
    assert torch.equal(mined.ids, top(window(**x)))  # the reference reads the same rounded values


def test_a_single_positive_per_query_may_be_a_vector() -> None:
    x = data(3)
    x["positive_ids"] = x["positive_ids"][:, 0]  # [Q]
    mined = pt.mine_negatives(num_negatives=M, absolute_margin=0.05, **x)
    assert torch.equal(mined.ids, top(window(**x, absolute_margin=0.05)))


def test_no_positive_ids_at_all() -> None:
    x = data(4)
    x["positive_ids"] = x["positive_ids"][:, :0]  # [Q, 0]
    mined = pt.mine_negatives(num_negatives=M, relative_margin=0.0, **x)
    assert torch.equal(mined.ids, top(window(**x)))


def test_a_query_without_positive_ids_has_no_margin() -> None:
    x = data(4)
    x["positive_ids"][3] = -1
    mined = pt.mine_negatives(num_negatives=M, absolute_margin=-0.5, **x)
    assert torch.equal(mined.ids, top(window(**x, absolute_margin=-0.5)))
    assert (mined.ids[3] >= 0).all()  # nothing above "the lowest positive" to drop


# ---------------------------------------------------------------------------------------------------------------
# ties: the lower corpus id first, whatever the tiles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus_chunk", [1, 2, 3, 4, 6, 64])
def test_ties_go_to_the_lower_corpus_id(corpus_chunk: int) -> None:
    corpus = torch.eye(8)[[1, 0, 0, 2, 0, 3, 0, 0, 4, 0]]  # items 1, 2, 4, 6, 7, 9 equal e0; the rest orthogonal
    queries, pos = torch.eye(8)[:1], torch.tensor([2])  # e0: the five copies left tie at score 1
    mined = pt.mine_negatives(queries, corpus, 3, positive_ids=pos, corpus_chunk=corpus_chunk)
    assert mined.ids.tolist() == [[1, 4, 6]]  # the cut falls inside the tie: by id
    assert mined.scores.tolist() == [[1.0] * 3]
    mined = pt.mine_negatives(queries, corpus, 3, positive_ids=pos, range_min=1, corpus_chunk=corpus_chunk)
    assert mined.ids.tolist() == [[4, 6, 7]]
    mined = pt.mine_negatives(queries, corpus, 7, positive_ids=pos, corpus_chunk=corpus_chunk)
    assert mined.ids.tolist() == [[1, 4, 6, 7, 9, 0, 3]]


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize("corpus_chunk", [1, 3, 64])
def test_random_skips_the_first_of_equal_scores_by_id(corpus_chunk: int) -> None:
    corpus = torch.eye(8)[[1, 0, 0, 2, 0, 3, 0, 0, 4, 0]]
    queries, pos = torch.eye(8)[:1], torch.tensor([2])
    seen: set[int] = set()
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        mined = pt.mine_negatives(queries, corpus, 2, positive_ids=pos, range_min=2, sampling="random",
                                  generator=g, corpus_chunk=corpus_chunk)  # fmt: skip
        seen.update(mined.ids[0].tolist())
    assert seen == {6, 7, 9, 0, 3, 5, 8}  # copies 1 and 4 are the two skipped: every other item is reachable


# ---------------------------------------------------------------------------------------------------------------
# "random": valid, distinct, in the window, reproducible, independent of tiles, covering the window
# ---------------------------------------------------------------------------------------------------------------

RANDOM = [
    pytest.param({}, id="whole_corpus"),
    pytest.param({"range_min": 5}, id="range_min"),
    pytest.param({"range_min": 2, "range_max": 12}, id="bounded"),
    pytest.param({"relative_margin": 0.1, "min_score": -0.3, "range_min": 1}, id="filtered"),
    pytest.param({"min_score": 0.55}, id="few_survivors"),
]


def draw(x: dict[str, torch.Tensor], seed: int, **options: Any) -> pt.MinedNegatives:
    g = torch.Generator().manual_seed(seed)
    return pt.mine_negatives(num_negatives=M, sampling="random", generator=g, **x, **options)


@pytest.mark.parametrize("options", RANDOM)
def test_random_draws_distinct_members_of_the_window_hardest_first(options: dict[str, Any]) -> None:
    x = data(5)
    windows = window(**x, **options)
    for seed in range(20):
        mined = draw(x, seed, **options)
        for row, w, scores in zip(mined.ids.tolist(), windows, mined.scores.tolist(), strict=True):
            members = dict(w)
            real = [j for j in row if j >= 0]
            assert len(real) == min(M, len(w)), (row, w)  # as many as the window allows, -1 after them
            assert row[len(real) :] == [-1] * (M - len(real))
            assert len(set(real)) == len(real)
            assert set(real) <= set(members)
            assert scores[: len(real)] == sorted(scores[: len(real)], reverse=True)  # hardest first
            for j, s in zip(real, scores, strict=False):
                assert s == pytest.approx(members[j], abs=1e-6)


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize("options", RANDOM[:4])
def test_random_reaches_every_member_of_the_window(options: dict[str, Any]) -> None:
    """A member is drawn with probability M/W >= 4/48 per draw: never in 200 draws has probability < 1e-7."""
    x = data(6)
    windows = window(**x, **options)
    seen: list[set[int]] = [set() for _ in windows]
    for seed in range(200):
        for row, ids in zip(seen, draw(x, seed, **options).ids.tolist(), strict=True):
            row.update(ids)
    assert [s - {-1} for s in seen] == [{j for j, _ in w} for w in windows]


def test_random_is_reproducible_and_independent_of_tiles() -> None:
    x = data(7)
    first = draw(x, 3, range_min=2)
    for tiles in [{"query_chunk": 2, "corpus_chunk": 5}, {"query_chunk": 7, "corpus_chunk": 1}, {}]:
        assert torch.equal(draw(x, 3, range_min=2, **tiles).ids, first.ids)
    assert torch.equal(draw(x, 3, range_min=2, range_max=C).ids, first.ids)  # a bounded window that holds all
    assert not torch.equal(draw(x, 4, range_min=2).ids, first.ids)


def test_random_advances_the_generator_it_is_given_and_no_other() -> None:
    x = data(8)
    g = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    a = pt.mine_negatives(num_negatives=M, sampling="random", generator=g, **x)
    b = pt.mine_negatives(num_negatives=M, sampling="random", generator=g, **x)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a.ids, b.ids)  # the second call continues the generator
    torch.manual_seed(11)
    c = pt.mine_negatives(num_negatives=M, sampling="random", **x)
    torch.manual_seed(11)
    assert torch.equal(pt.mine_negatives(num_negatives=M, sampling="random", **x).ids, c.ids)


def test_random_takes_the_whole_window_when_it_is_small() -> None:
    x = data(9)
    windows = window(**x, range_min=3, range_max=7)  # 4 = M members each
    mined = draw(x, 0, range_min=3, range_max=7)
    assert torch.equal(mined.ids, top(windows))


# ---------------------------------------------------------------------------------------------------------------
# into the loss
# ---------------------------------------------------------------------------------------------------------------


def test_the_result_plugs_into_the_loss() -> None:
    x = data(10)
    q, corpus, pos = x["queries"].double(), x["corpus"].double(), x["positive_ids"][:, 0]
    mined = pt.mine_negatives(q, corpus, M, positive_ids=pos, min_score=0.6)  # some rows come short
    assert (~mined.mask).any()
    assert mined.mask.any()
    ids = mined.ids
    loss = pt.infonce(q, corpus[pos], corpus[ids.clamp_min(0)], negatives_mask=mined.mask, positive_ids=pos,
                      negative_ids=ids, temperature=0.1)  # fmt: skip
    terms = []  # the formula on the explicitly gathered negatives
    for i in range(Q):
        sp = score(q[i].tolist(), corpus[pos[i]].tolist(), "cosine") / 0.1
        sn = [score(q[i].tolist(), corpus[j].tolist(), "cosine") / 0.1 for j in ids[i].tolist() if j >= 0]
        terms.append(-sp + math.log(math.exp(sp) + sum(math.exp(s) for s in sn)) if sn else 0.0)
    assert loss.item() == pytest.approx(sum(terms) / Q, rel=1e-12)


def test_inputs_that_need_a_gradient_are_read_not_changed() -> None:
    x = data(16)
    queries = x.pop("queries").requires_grad_()
    before = (queries.detach().clone(), x["corpus"].clone(), x["positive_ids"].clone())
    mined = pt.mine_negatives(queries, num_negatives=M, relative_margin=0.0, **x)
    assert not mined.scores.requires_grad
    assert torch.equal(mined.ids, top(window(queries.detach(), **x, relative_margin=0.0)))
    for old, new in zip(before, (queries.detach(), x["corpus"], x["positive_ids"]), strict=True):
        assert torch.equal(old, new)


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear error before any work
# ---------------------------------------------------------------------------------------------------------------

ERRORS = [
    pytest.param({"num_negatives": 0}, ValueError, r"`num_negatives` must be >= 1; got 0", id="no_negatives"),
    pytest.param({"num_negatives": 2.0}, TypeError, r"`num_negatives` must be an int", id="float_count"),
    pytest.param({"range_min": -1}, ValueError, r"`range_min` must be >= 0", id="negative_range_min"),
    pytest.param(
        {"range_min": 3, "range_max": 6},
        ValueError,
        r"\[3, 6\) holds 3 candidates, fewer than "
        r"num_negatives=4",
        id="small_window",
    ),
    pytest.param(
        {"positive_ids": torch.tensor([[0, C]] * Q)},
        ValueError,
        rf"`positive_ids` must index the corpus, "
        rf"0 <= id < C = {C} .*; got {C}",
        id="positive_out_of_range",
    ),
    pytest.param(
        {"exclude_ids": torch.full((Q, 2), 99)},
        ValueError,
        r"`exclude_ids` must index the corpus",
        id="exclusion_out_of_range",
    ),
    pytest.param(
        {"positive_ids": torch.zeros(Q + 1, dtype=torch.int64)},
        ValueError,
        rf"`positive_ids` must be \[Q\] or \[Q, P\] = \[{Q}\] or \[{Q}, P\]; got \({Q + 1},\)",
        id="positives_of_other_queries",
    ),
    pytest.param(
        {"exclude_ids": torch.zeros(Q, dtype=torch.int64)},
        ValueError,
        rf"`exclude_ids` must be \[Q, E\] = \[{Q}, E\]; got \({Q},\)",
        id="exclusions_1d",
    ),
    pytest.param(
        {"positive_ids": torch.zeros(Q)},
        TypeError,
        r"`positive_ids` must be an integer tensor; got dtype "
        r"torch.float32",
        id="float_ids",
    ),
    pytest.param(
        {"corpus": torch.randn(C, D + 1)},
        ValueError,
        rf"`corpus` must be \[C, d\] = \[C, {D}\] .*; got "
        rf"\({C}, {D + 1}\)",
        id="widths",
    ),
    pytest.param(
        {"corpus": torch.randn(C, D).double()}, TypeError, r"`corpus` must have the dtype of `queries`", id="dtypes"
    ),
    pytest.param({"queries": torch.randn(Q, 2, D)}, ValueError, r"`queries` must be \[Q, d\]; got", id="3d"),
    pytest.param(
        {"queries": torch.ones(Q, D, dtype=torch.int64)},
        TypeError,
        r"`queries` must hold floating-point",
        id="integer_embeddings",
    ),
    pytest.param(
        {"queries": torch.full((Q, D), math.nan)},
        ValueError,
        r"`queries` holds NaN or infinite values",
        id="nan_queries",
    ),
    pytest.param({"corpus": torch.full((C, D), math.inf)}, ValueError, r"`corpus` holds NaN", id="inf_corpus"),
    pytest.param(
        {"sampling": "bottom"}, ValueError, r"`sampling` must be 'top' or 'random'; got 'bottom'", id="sampling"
    ),
    pytest.param({"max_score": "0.5"}, TypeError, r"`max_score` must be a float or None; got str", id="max_score"),
    pytest.param({"relative_margin": math.nan}, ValueError, r"`relative_margin` must be finite", id="nan_margin"),
    pytest.param({"generator": 0}, TypeError, r"`generator` must be a torch.Generator", id="generator"),
    pytest.param(
        {"loss_fn": LpDistance()}, TypeError, r"`loss_fn` must be a pytorch_metric_learning NTXentLoss", id="loss_fn"
    ),
    pytest.param({"corpus_chunk": 0}, ValueError, r"`corpus_chunk` must be >= 1", id="chunk"),
    pytest.param({"progress": 1}, TypeError, r"`progress` must be a bool", id="progress"),
    pytest.param({"index": object()}, TypeError, r"`index` must be a FAISS index", id="index"),
]


@pytest.mark.parametrize(("change", "error", "match"), ERRORS)
def test_bad_input_is_named(change: dict[str, Any], error: type[Exception], match: str) -> None:
    x: dict[str, Any] = {**data(), "num_negatives": M, **change}
    with pytest.raises(error, match=match):
        pt.mine_negatives(**x)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
def test_inputs_on_two_devices_are_rejected() -> None:
    x = data()
    with pytest.raises(ValueError, match=r"`corpus` is on cuda:0 but `queries` is on cpu"):
        pt.mine_negatives(x["queries"], x["corpus"].cuda(), M, positive_ids=x["positive_ids"])


def test_a_progress_bar_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    x = data()
    mined = pt.mine_negatives(num_negatives=M, progress=True, query_chunk=3, **x)
    assert torch.equal(mined.ids, top(window(**x)))
    assert "mining negatives" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# a FAISS index
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not FAISS, reason="faiss-cpu is in the faiss and dev extras")
@pytest.mark.parametrize("options", [pytest.param(p.values[0], id=p.id) for p in FILTERS[:-2]])
def test_an_exact_index_gives_the_exact_ids_when_its_window_covers_the_corpus(options: dict[str, Any]) -> None:
    import faiss

    x = data(12)
    index = faiss.IndexFlatIP(D)
    index.add(torch.nn.functional.normalize(x["corpus"]).numpy())
    options = {**options, "range_max": C}
    via_index = pt.mine_negatives(num_negatives=M, index=index, **x, **options)
    assert torch.equal(via_index.ids, top(window(**x, **options)))
    assert torch.equal(via_index.ids, pt.mine_negatives(num_negatives=M, **x, **options).ids)


@pytest.mark.skipif(not FAISS, reason="faiss-cpu is in the faiss and dev extras")
def test_an_exact_index_draws_what_exact_search_draws() -> None:
    import faiss

    x = data(15)
    index = faiss.IndexFlatIP(D)
    index.add(torch.nn.functional.normalize(x["corpus"]).numpy())
    options = {"range_min": 3, "range_max": C, "relative_margin": 0.1}
    assert torch.equal(draw(x, 5, index=index, **options).ids, draw(x, 5, **options).ids)
    assert torch.equal(draw(x, 5, index=index, **options).ids, draw(x, 5, range_min=3, relative_margin=0.1).ids)


@pytest.mark.skipif(not FAISS, reason="faiss-cpu is in the faiss and dev extras")
def test_an_index_window_can_come_short_where_exact_search_does_not() -> None:
    import faiss

    x = data(13)
    index = faiss.IndexFlatIP(D)
    index.add(torch.nn.functional.normalize(x["corpus"]).numpy())
    exact = pt.mine_negatives(num_negatives=M, max_score=0.0, **x)  # the hardest candidates are dropped
    windowed = pt.mine_negatives(num_negatives=M, max_score=0.0, range_max=6, index=index, **x)
    assert exact.mask.all()
    assert not windowed.mask.all()
    assert torch.equal(exact.ids, top(window(**x, max_score=0.0)))
    with pytest.raises(ValueError, match=r"`index` must hold the corpus, \[C, d\] = \[53, 5\]; got ntotal=0"):
        pt.mine_negatives(num_negatives=M, index=faiss.IndexFlatIP(D), **x)


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers' own miner, on the same embeddings
# ---------------------------------------------------------------------------------------------------------------


class FixedModel:
    """A stand-in for a SentenceTransformer whose ``encode_*`` look texts up in a table of fixed embeddings."""

    device = torch.device("cpu")

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def encode_query(self, texts: list[str], **kwargs: Any) -> Any:
        rows = torch.stack([self.table[t] for t in texts])
        return torch.nn.functional.normalize(rows, dim=-1).numpy()  # normalize_embeddings=True, convert_to_numpy

    encode_document = encode_query

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        from sentence_transformers.util import cos_sim

        return cos_sim(torch.as_tensor(a), torch.as_tensor(b))

    def similarity_pairwise(self, a: Any, b: Any) -> torch.Tensor:
        from sentence_transformers.util import pairwise_cos_sim

        return pairwise_cos_sim(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [pytest.param(p.values[0], id=p.id) for p in FILTERS if "range_max" not in p.values[0] and p.id != "no_survivors"],
)
def test_sentence_transformers_miner_agrees_where_its_window_covers_the_corpus(options: dict[str, Any]) -> None:
    pytest.importorskip("datasets", reason="sentence-transformers' miner needs `datasets`")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    x = data(14)
    queries, corpus, pids = x["queries"], x["corpus"], x["positive_ids"]
    table = {f"q{i}": v for i, v in enumerate(queries)} | {f"c{j}": v for j, v in enumerate(corpus)}
    rows = [(f"q{i}", f"c{j}") for i in range(Q) for j in dict.fromkeys(pids[i].tolist()) if j >= 0]
    dataset = Dataset.from_dict({"query": [r[0] for r in rows], "answer": [r[1] for r in rows]})
    theirs = mine_hard_negatives(dataset, FixedModel(table), corpus=[f"c{j}" for j in range(C)],  # type: ignore[arg-type]
                                 num_negatives=M, range_max=C, output_format="labeled-list", verbose=False,
                                 **options)  # fmt: skip
    got: dict[int, list[int]] = {}
    for query, docs in zip(theirs["query"], theirs["answer"], strict=True):
        got[int(query[1:])] = [int(doc[1:]) for doc in docs[1:]]  # docs[0]: the row's positive
    mined = pt.mine_negatives(queries, corpus, M, positive_ids=pids, **options)  # no exclusions: theirs has none
    ours = {i: [j for j in row if j >= 0] for i, row in enumerate(mined.ids.tolist()) if row[0] >= 0}
    assert got == ours
    assert mined.ids.ne(-1).any()


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [{"range_min": 2}, {"relative_margin": 0.1, "min_score": -0.3}, {"min_score": 0.55}]
)
def test_sentence_transformers_random_draws_come_from_the_same_window(options: dict[str, Any]) -> None:
    pytest.importorskip("datasets", reason="sentence-transformers' miner needs `datasets`")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    x = data(17)
    queries, corpus, pids = x["queries"], x["corpus"], x["positive_ids"][:, 0]
    table = {f"q{i}": v for i, v in enumerate(queries)} | {f"c{j}": v for j, v in enumerate(corpus)}
    dataset = Dataset.from_dict({"query": [f"q{i}" for i in range(Q)], "answer": [f"c{j}" for j in pids.tolist()]})
    windows = window(queries, corpus, pids, **options)
    for _ in range(5):
        theirs = mine_hard_negatives(dataset, FixedModel(table), corpus=[f"c{j}" for j in range(C)],  # type: ignore[arg-type]
                                     num_negatives=M, range_max=C, sampling_strategy="random",
                                     output_format="labeled-list", verbose=False, **options)  # fmt: skip
        for query, docs in zip(theirs["query"], theirs["answer"], strict=True):
            drawn, members = [int(doc[1:]) for doc in docs[1:]], {j for j, _ in windows[int(query[1:])]}
            assert len(drawn) == min(M, len(members))
            assert set(drawn) <= members
