"""The mining example (examples/mine_digits.py): its class-mate table, the pool it mines against a loop written
here, and (slow) its claim on a small run.

The claim test trains every compared arm on three seeds and asserts the ordering the docs state with a margin
large against the spread measured over ten seeds (docs/mining-study.md).
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest
import torch
from helpers import load_script

from pml_triplets_demo import DigitsSplit, load_digits_split, make_embedder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mine_digits.py"


md = load_script(EXAMPLE)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: as the command trains (the numbers used it)


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def test_class_members_lists_exactly_each_class(split: DigitsSplit) -> None:
    y = split.y_train
    members = md.class_members(y)
    assert members.shape == (len(y), int(torch.bincount(y).max()))
    for i in range(0, len(y), 97):
        want = sorted(j for j in range(len(y)) if y[j] == y[i])
        got = members[i]
        assert sorted(got[got >= 0].tolist()) == want
        assert bool((got[len(want) :] == -1).all())  # padding after the class-mates


@pytest.mark.slow
def test_mined_pool_is_the_nearest_other_class_images(split: DigitsSplit) -> None:
    # The untrained MLP's embeddings, float64 cosine, one anchor at a time: the `size` nearest images of another
    # class, nearest first. float32 scores may order a near-tie (cosines within 1e-6) either way: the pool's
    # cosines equal the loop's, and its ids too wherever no two of the first size + 1 are that close.
    x, y = split.x_train, split.y_train
    model = make_embedder(seed=5)
    size = 32
    pool = md.mine_pool(model, x, md.class_members(y), size)
    assert pool.shape == (len(y), size)
    with torch.no_grad():
        emb = model(x).double()
    checked = 0
    for i in range(0, len(y), 61):
        cos = {j: float(emb[i] @ emb[j] / (emb[i].norm() * emb[j].norm())) for j in range(len(y)) if y[j] != y[i]}
        ranked = sorted(cos, key=lambda j: -cos[j])
        got, want = [cos[j] for j in pool[i].tolist()], [cos[j] for j in ranked[:size]]
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-6, i
        top = [cos[j] for j in ranked[: size + 1]]
        if min(a - b for a, b in itertools.pairwise(top)) > 1e-6:
            checked += 1
            assert pool[i].tolist() == ranked[:size], i
    assert checked >= 15  # of the 21 rows looked at
    assert not bool((y[pool] == y[:, None]).any())  # no class-mate anywhere


def test_rejects_bad_settings(split: DigitsSplit) -> None:
    with pytest.raises(ValueError, match="`arm` must be one of mined, pixel, random, in-batch; got 'hard'"):
        md.train_arm(split.x_train, split.y_train, "hard", epochs=1)
    with pytest.raises(ValueError, match="`negatives` must be at most"):
        md.train_arm(split.x_train, split.y_train, "mined", negatives=2000, epochs=1)


@pytest.mark.slow  # 12 trainings of 20 epochs: about a minute on one idle core, longer on a busy machine
def test_mined_negatives_beat_pixel_random_and_in_batch(capsys: pytest.CaptureFixture[str]) -> None:
    # docs/mining-study.md: over seeds 0-4 and again over 5-9, MAP@R of `mined` minus each other arm's averaged
    # +0.0125 to +0.0178 (standard deviation of the seed-by-seed differences 0.003-0.009), and `mined` was higher
    # on every one of the ten seeds. The bound, 0.005 on the mean over three seeds, is far below what was measured.
    scores = md.main(["--seeds", "0", "1", "2"])
    out = capsys.readouterr().out
    assert "| arm | P@1 | MAP@R | Δ MAP@R vs mined, seed by seed |" in out
    mined = [s[md.MAP_R] for s in scores["mined"]]
    for arm in ("pixel", "random", "in-batch"):
        gain = statistics.fmean(m - s[md.MAP_R] for m, s in zip(mined, scores[arm], strict=True))
        assert gain > 0.005, (arm, scores)
    assert statistics.fmean(mined) > 0.955, mined  # measured 0.9665 and 0.9632 over five seeds
