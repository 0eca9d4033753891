"""The digits demo (examples/pml_triplets_demo): CLI runs, triplet sampling, determinism, the loss options of
``train``, the mis-paired recipe, and the default run's targets."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pml_triplets as pt
from pml_triplets_demo import cli, data, model, report, training, triplets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A2P, P2A = "anchor_to_positive", "positive_to_anchor"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: as the commands train (the numbers used it)


@pytest.fixture(scope="module")
def split() -> data.DigitsSplit:
    return data.load_digits_split()


def table_row(out: str, name: str) -> dict[str, float]:
    """The metrics of row ``name`` of the table ``main`` prints."""
    match = re.search(rf"^\| {re.escape(name)} +\| ([0-9.]+) +\| ([0-9.]+) +\|$", out, re.MULTILINE)
    assert match, f"no table row {name!r} in:\n{out}"
    return dict(zip(report.METRICS, map(float, match.groups()), strict=True))


def test_split_is_stratified_and_fixed(split: data.DigitsSplit) -> None:
    assert split.x_train.shape == (1257, 64)
    assert split.x_test.shape == (540, 64)
    assert split.x_train.dtype == torch.float32
    assert split.x_train.min() >= 0
    assert split.x_train.max() <= 1
    assert torch.equal(split.y_test, data.load_digits_split().y_test)
    per_class = torch.bincount(torch.cat([split.y_train, split.y_test]))
    assert (torch.bincount(split.y_test) - 0.3 * per_class).abs().max() <= 1  # stratified


@pytest.mark.parametrize(
    ("flag", "draw"),
    [
        pytest.param("--hard", False, id="hard"),  # the figure not drawn: 1.2 s of matplotlib, drawn in the other case
        pytest.param("--random", True, id="random-drawn", marks=pytest.mark.slow),
    ],
)
def test_main_short_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flag: str, draw: bool
) -> None:
    titles: list[str] = []
    save_figure = report.save_figure

    def record_title(
        history: training.History, emb: torch.Tensor, labels: torch.Tensor, path: Path, title: str
    ) -> Path:
        titles.append(title)
        return save_figure(history, emb, labels, path, title=title) if draw else path

    monkeypatch.setattr(cli, "save_figure", record_title)
    code = cli.main(["--epochs", "2", "--negatives", "4", flag, "--out", str(tmp_path), "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    png = tmp_path / "digits_demo.png"
    assert str(png) in out
    if draw:
        assert png.read_bytes()[:8] == PNG_MAGIC
    for name in ("raw pixels", "untrained MLP", "trained MLP"):
        assert set(table_row(out, name)) == set(report.METRICS)
    # stderr is not a terminal here: one plain line per epoch, no bar redrawn with carriage returns.
    assert re.fullmatch(r"epoch 1/2  loss [0-9.]+\nepoch 2/2  loss [0-9.]+\n", err), err
    # The figure's title carries M, the temperature, the epochs and the held-out scores printed in the table.
    trained = table_row(out, "trained MLP")
    assert titles == [
        f"digits: {flag[2:]} negatives, M = 4, τ = 0.1, 2 epochs; held-out precision@1 = "
        f"{trained['precision_at_1']:.4f}, MAP@R = {trained['mean_average_precision_at_r']:.4f}"
    ]


def test_progress_bar_only_on_a_terminal(
    split: data.DigitsSplit, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = split.x_train[:200], split.y_train[:200]
    training.train(model.make_embedder(), x, y, epochs=2, negatives=2, mode="random", progress=True)
    assert "\r" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    training.train(model.make_embedder(), x, y, epochs=2, negatives=2, mode="random", progress=True)
    err = capsys.readouterr().err
    assert "\r" in err
    assert "training: 100%" in err
    assert "loss=" in err
    assert "epoch 1/2" not in err
    training.train(model.make_embedder(), x, y, epochs=1, negatives=2, mode="random")  # progress=False: silent
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("module", "dist"), [("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("sklearn", "scikit-learn")]
)
def test_missing_extra_stops_before_any_work(
    module: str, dist: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what importlib.util.find_spec reports for a missing module

    def no_work() -> None:
        raise AssertionError("the demo started work without its extra")

    monkeypatch.setattr(cli, "load_digits_split", no_work)
    assert cli.main(["--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err == f'error: the demo needs its extra: pip install "pml-triplets[demo]"; missing: {module} (from {dist})\n'
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.slow  # a subprocess
def test_missing_extra_through_the_command_line() -> None:
    """matplotlib is the one part of the extra that can be missing for real: PML itself needs tqdm and sklearn."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from pml_triplets.__main__ import main; raise SystemExit(main(['demo']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        'error: the demo needs its extra: pip install "pml-triplets[demo]"; missing: matplotlib (from matplotlib)\n'
    )


def test_projection_legend_labels_do_not_overlap(split: data.DigitsSplit) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    report.plot_projection(ax, model.embed(model.make_embedder(), split.x_test), split.y_test)  # classes mixed
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [str(c) for c in range(10)]
    assert len(ax.texts) == 0  # no labels drawn at the centroids
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [t.get_window_extent(renderer) for t in legend.get_texts()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))  # beside the points


@pytest.mark.slow  # (a training run; test_main_short_run is the fast one)
def test_main_restores_thread_count(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["--epochs", "1", "--negatives", "1", "--random", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--negatives", "-1"],
        ["--temperature", "0"],
        ["--temperature", "nan"],
        ["--hard", "--random"],
        ["--no-such-option"],
        ["--negatives", "5000"],  # more hard negatives than other-class images
    ],
)
def test_main_rejects_bad_arguments(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "digits_demo.png").exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "python -m pml_triplets demo" in capsys.readouterr().out


def readme_table() -> dict[str, dict[str, float]]:
    """The demo's table as the Getting started page states it ("about 0.987" read as 0.987)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "index.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (raw pixels|untrained MLP|trained MLP) +\| (?:about )?([0-9.]+) +\| (?:about )?([0-9.]+) +\|$", text, re.M
    )
    assert len(rows) == 3, f"docs/index.md's demo table has rows {rows}"
    return {name: dict(zip(report.METRICS, map(float, values), strict=True)) for name, *values in rows}


DOCS_TOLERANCE = 0.01  # docs/index.md states it: "checks every printed number against this table to ±0.01"


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_default_run_prints_the_readme_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], threads: str) -> None:
    """The default configuration (a few seconds on one core) prints docs/index.md's numbers, on 1 and 2 threads."""
    assert cli.main(["--out", str(tmp_path), "--threads", threads]) == 0
    out = capsys.readouterr().out
    for name, want in readme_table().items():
        got = table_row(out, name)
        for metric in report.METRICS:
            assert abs(got[metric] - want[metric]) <= DOCS_TOLERANCE, f"{name} {metric}: printed {got}, docs {want}"
    raw, untrained, trained = (table_row(out, name) for name in ("raw pixels", "untrained MLP", "trained MLP"))
    assert trained["mean_average_precision_at_r"] >= 0.90
    assert trained["precision_at_1"] >= 0.97
    assert trained["mean_average_precision_at_r"] > raw["mean_average_precision_at_r"] + 0.3
    assert untrained["mean_average_precision_at_r"] < 0.6


@pytest.mark.parametrize("mode", ["hard", "random"])
def test_training_is_deterministic(split: data.DigitsSplit, mode: triplets.NegativeMode) -> None:
    x, y = split.x_train[:300], split.y_train[:300]

    def run(seed: int) -> tuple[list[float], torch.Tensor]:
        net = model.make_embedder(seed=seed)
        history = training.train(net, x, y, epochs=2, negatives=3, mode=mode, batch_size=64, seed=seed)
        return history.step_losses, model.embed(net, split.x_test[:50])

    losses, emb = run(0)
    losses_again, emb_again = run(0)
    assert losses == losses_again
    assert torch.equal(emb, emb_again)
    assert run(1)[0] != losses


def test_make_embedder_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.make_embedder(seed=0)
    assert torch.equal(torch.rand(3), expected)


def check_triplets(trip: triplets.Triplets, labels: torch.Tensor, m: int) -> None:
    n = len(labels)
    assert trip.positives.shape == (n,)
    assert trip.negatives.shape == (n, m)
    assert (labels[trip.positives] == labels).all()
    assert (trip.positives != torch.arange(n)).all()
    assert (labels[trip.negatives] != labels[:, None]).all()


def test_random_triplets(split: data.DigitsSplit) -> None:
    y = split.y_train
    trip = triplets.make_triplets(y, 20, mode="random", generator=torch.Generator().manual_seed(0))
    check_triplets(trip, y, 20)
    # Every other class shows up among the negatives of class 0, and every image of class 3 among the positives.
    assert set(y[trip.negatives[y == 0]].unique().tolist()) == set(range(1, 10))
    many = [triplets.make_triplets(y, 1, mode="random", generator=torch.Generator().manual_seed(s)) for s in range(30)]
    seen = torch.cat([t.positives[y == 3] for t in many]).unique()
    assert torch.equal(seen, torch.nonzero(y == 3).squeeze(1))


def test_hard_triplets_come_from_the_pool(split: data.DigitsSplit) -> None:
    x, y = split.x_train, split.y_train
    pool = triplets.hard_negative_pool(x, y, 12)
    trip = triplets.make_triplets(y, 5, mode="hard", generator=torch.Generator().manual_seed(0), pool=pool)
    check_triplets(trip, y, 5)
    for i in range(0, len(y), 97):
        chosen = trip.negatives[i].tolist()
        assert len(set(chosen)) == 5
        assert set(chosen) <= set(pool[i].tolist())


def test_hard_negative_pool_is_nearest_other_class(split: data.DigitsSplit) -> None:
    x, y = split.x_train, split.y_train
    pool = triplets.hard_negative_pool(x, y, 6)
    for i in (0, 500, 1000):
        others = torch.nonzero(y != y[i]).squeeze(1)
        dist = (x[others] - x[i]).norm(dim=1).double()
        expected = dist.sort().values[:6]
        got = (x[pool[i]] - x[i]).norm(dim=1).double()
        assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="`k` must be in"):
        triplets.hard_negative_pool(x, y, len(y))


def test_triplet_errors() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="at least two images"):
        triplets.make_triplets(torch.tensor([0, 0, 1]), 1, mode="random", generator=g)
    with pytest.raises(ValueError, match="needs `pool`"):
        triplets.make_triplets(torch.tensor([0, 0, 1, 1]), 1, mode="hard", generator=g)
    with pytest.raises(ValueError, match="`mode`"):
        triplets.make_triplets(torch.tensor([0, 0, 1, 1]), 1, mode="semi-hard", generator=g)  # type: ignore[arg-type]


def test_article_recipe_is_mispaired() -> None:
    torch.manual_seed(0)
    a, p = torch.randn(6, 8), torch.randn(6, 8)
    n = a[:, None] + 0.3 * torch.randn(6, 4, 8)  # hard: each anchor's own negatives lie close to it
    recipe = training.article_recipe_loss(a, p, n, 0.1)
    right = pt.reference_infonce(a, p, n, 0.1)
    assert recipe < right - 0.5
    # With one negative per anchor, .repeat and .repeat_interleave coincide: the recipe is right.
    one = n[:, :1]
    assert torch.allclose(training.article_recipe_loss(a, p, one, 0.1), pt.reference_infonce(a, p, one, 0.1), atol=1e-5)


def test_article_recipe_objective_trains(split: data.DigitsSplit) -> None:
    net = model.make_embedder(seed=0)
    x, y = split.x_train[:256], split.y_train[:256]
    history = training.train(net, x, y, epochs=1, negatives=4, mode="random", objective="article-recipe")
    assert len(history.step_losses) == 2
    assert all(v > 0 for v in history.step_losses)
    with pytest.raises(ValueError, match="objective"):
        training.train(net, x, y, epochs=1, objective="triplet")  # type: ignore[arg-type]


def test_history_epoch_losses() -> None:
    history = training.History([1.0, 3.0, 2.0, 4.0], steps_per_epoch=2)
    assert history.epoch_losses == [2.0, 3.0]


def test_evaluate_perfect_and_pca() -> None:
    labels = torch.arange(4).repeat_interleave(5)
    emb = torch.nn.functional.one_hot(labels, 4).float() + 0.01 * torch.randn(20, 4)
    assert report.evaluate(emb, labels) == pytest.approx({m: 1.0 for m in report.METRICS})
    xy = report.pca_2d(torch.randn(30, 5) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1]))
    assert xy.shape == (30, 2)
    assert xy[:, 0].var() >= xy[:, 1].var()


def test_the_demo_is_not_in_the_library() -> None:
    assert importlib.util.find_spec("pml_triplets.demo") is None
    assert not {"cli", "demo", "train", "pml_triplets_demo"} & set(pt.__all__)


@pytest.mark.slow  # a subprocess
def test_the_library_and_its_command_line_do_not_import_the_demo() -> None:
    code = (
        "import sys, pml_triplets, pml_triplets.__main__; "
        "assert not [m for m in sys.modules if m.startswith('pml_triplets_demo')], 'the demo imported eagerly'; "
        "import pml_triplets_demo.cli; "
        "assert not {'matplotlib', 'sklearn'} & set(sys.modules), 'optional dependencies imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- `--out` is checked before any work (issue 19, item 10c: it used to train, then die with a traceback) ---


@pytest.mark.parametrize(
    "where",
    [
        "under-a-file",
        "figure-is-a-directory",
        pytest.param("proc", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")),
    ],
)
def test_unwritable_out_stops_before_any_work(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "taken" / "digits_demo.png").mkdir(parents=True)
    out, reason = {
        "under-a-file": (tmp_path / "file" / "figures", "cannot create the directory"),
        "figure-is-a-directory": (tmp_path / "taken", f"{tmp_path / 'taken' / 'digits_demo.png'} is a directory"),
        "proc": (Path("/proc/pml-triplets-test/figures.png"), "cannot create the directory /proc/pml-triplets-test: "),
    }[where]

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started work before checking --out")

    monkeypatch.setattr(cli, "load_digits_split", no_work)
    monkeypatch.setattr(cli, "train", no_work)
    assert cli.main(["--out", str(out)]) == 2
    stdout, err = capsys.readouterr()
    assert stdout == ""
    assert err.startswith(f"error: --out {out}: {reason}"), err
    assert err.endswith("\n")
    assert err.count("\n") == 1  # one line, no traceback


def test_out_check_leaves_nothing_behind(tmp_path: Path) -> None:
    assert cli.out_problem(tmp_path / "a" / "b") is None
    assert cli.out_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


# --- train takes the loss's options ---


def notebook_loop(
    x: torch.Tensor,
    y: torch.Tensor,
    options: dict[str, Any],
    guide: torch.Tensor | None,
    ids: torch.Tensor | None,
    *,
    seed: int,
    epochs: int,
    m: int,
    batch: int,
) -> tuple[list[float], nn.Module]:
    """The loop studies/retrieval_options.ipynb ran before ``train`` took the loss's options: its stored numbers need
    ``train`` to take exactly these steps (same draws, same operations, in the same order)."""
    generator = torch.Generator().manual_seed(seed)
    pool = triplets.hard_negative_pool(x, y, 4 * m)
    net = model.make_embedder(seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=training.LR)
    losses = []
    for _ in range(epochs):
        trip = triplets.make_triplets(y, m, mode="hard", generator=generator, pool=pool)
        for rows in torch.randperm(len(y), generator=generator).split(batch):
            pos, neg = trip.positives[rows], trip.negatives[rows]  # [B], [B, M]
            a, p = net(x[rows]), net(x[pos])  # [B, d]
            n = net(x[neg.reshape(-1)]).reshape(*neg.shape, -1)  # [B, M, d]
            extra: dict[str, Any] = {}
            if guide is not None:
                extra["guide"] = (guide[rows], guide[pos], guide[neg])
            if ids is not None:
                extra |= {"positive_ids": ids[pos], "negative_ids": ids[neg]}
            loss = pt.infonce(a, p, n, temperature=0.1, **options, **extra)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, net


@pytest.mark.sweep(fast=2)
@pytest.mark.parametrize(
    ("options", "per_image"),
    [
        pytest.param({}, {}, id="own-negatives"),
        pytest.param({"in_batch": True, "directions": (A2P, P2A), "partition": "per_direction"}, {}, id="symmetric"),
        pytest.param({"in_batch": True, "hardness_mode": "all", "hardness_strength": 5.0}, {}, id="hardness"),
        pytest.param({"in_batch": True, "false_negative_margin": 0.1}, {"guide": "pixels"}, id="guide"),
        pytest.param({"in_batch": True}, {"ids": "labels"}, id="ids"),
    ],
)
def test_train_takes_the_notebook_loops_steps(
    split: data.DigitsSplit, options: dict[str, Any], per_image: dict[str, str]
) -> None:
    """Bit for bit: the losses of every step and the final weights."""
    x, y = split.x_train[:300], split.y_train[:300]
    guide = x if per_image.get("guide") == "pixels" else None
    ids = y if per_image.get("ids") == "labels" else None
    losses, expected = notebook_loop(x, y, options, guide, ids, seed=3, epochs=2, m=4, batch=64)
    net = model.make_embedder(seed=3)
    history = training.train(
        net, x, y, epochs=2, negatives=4, batch_size=64, seed=3, loss_options=options, guide=guide, ids=ids
    )
    assert history.step_losses == losses
    assert not net.training
    for (name, want), got in zip(expected.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_batches_are_the_steps_of_train(split: data.DigitsSplit) -> None:
    x, y = split.x_train[:300], split.y_train[:300]
    steps = list(training.batches(x, y, epochs=2, negatives=3, batch_size=64, seed=0))
    assert len(steps) == 2 * 5
    for epoch in (steps[:5], steps[5:]):  # every image an anchor once per epoch
        assert torch.equal(torch.cat([s.anchors for s in epoch]).sort().values, torch.arange(300))
    first = steps[0]
    assert (first.anchors.shape, first.positives.shape, first.negatives.shape) == ((64,), (64,), (64, 3))
    assert (y[first.positives] == y[first.anchors]).all()
    assert (y[first.negatives] != y[first.anchors][:, None]).all()
    again = next(training.batches(x, y, epochs=1, negatives=3, batch_size=64, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(
            {"loss_options": {"temperature": 0.2}}, "must not set 'temperature'.*from `temperature`", id="tau"
        ),
        pytest.param({"loss_options": {"guide": None}}, "must not set 'guide'.*from `guide`", id="guide-option"),
        pytest.param(
            {"loss_options": {"negative_ids": None}}, "must not set 'negative_ids'.*from `ids`", id="ids-option"
        ),
        pytest.param(
            {"guide": torch.zeros(10, 3)}, r"`guide` must be \[N, g\] = \[300, g\].*got \(10, 3\)", id="guide"
        ),
        pytest.param({"ids": torch.zeros(300, 2)}, r"`ids` must be \[N\] = \[300\].*got \(300, 2\)", id="ids"),
        pytest.param(
            {"objective": "article-recipe", "loss_options": {"in_batch": True}},
            "'article-recipe'` takes no loss options; got loss_options",
            id="recipe",
        ),
    ],
)
def test_train_rejects_misplaced_loss_options(split: data.DigitsSplit, kwargs: dict[str, Any], match: str) -> None:
    x, y = split.x_train[:300], split.y_train[:300]
    with pytest.raises(ValueError, match=match):
        training.train(model.make_embedder(), x, y, epochs=1, **kwargs)
