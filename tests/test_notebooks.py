"""The notebooks: their cells come from notebooks/make_notebooks.py, they are committed with outputs (so they render
on GitHub), and they still execute without error.

Two teach (``notebooks/quickstart.ipynb``, ``notebooks/training.ipynb``) and two are five-seed studies
(``studies/``), whose tables docs/studies.md copies: a fast test keeps the page equal to the committed outputs. The
tutorial prints results, never ``claim`` lines: the numbers its markdown states are checked here, against its
committed outputs (fast) and against a fresh execution (slow).

The execution test runs a copy in a temporary directory and never rewrites the committed file. Every notebook pins
torch to one intra-op thread in its first code cell (tiny matrices: on a busy 2-core machine, spinning threads
made a training cell 10x slower), so ``OMP_NUM_THREADS`` (set to 2 here) changes nothing. How far each claim moves
with the thread count, the instruction set and the seeds is measured by notebooks/claim_spread.py
(notebooks/claim_spread.md), not here: executing every notebook twice cost the suite about 110 s. Each number a
notebook's markdown states is checked by ``claim`` (notebooks/claims.py) against its bound, so a change that breaks
a claim fails here, naming it.

They run on the ``python3`` kernel. jupyter_client launches a kernel spec whose ``argv[0]`` is ``python`` with
``sys.executable`` -- the spec ipykernel installs into ``<venv>/share/jupyter/kernels/python3`` is of that kind,
and inside a virtual environment jupyter prefers the environment's specs to the user's -- so the kernel is this
interpreter. ``test_python3_kernel_is_this_interpreter`` checks that rather than trusting it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

# The test extra installs these; a missing one must fail the suite, not skip it.
import ipykernel  # noqa: F401
import nbclient  # noqa: F401
import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TUTORIAL = "notebooks/training.ipynb"
STUDIES = ["studies/train_digits.ipynb", "studies/retrieval_options.ipynb"]
NAMES = ["notebooks/quickstart.ipynb", TUTORIAL, *STUDIES]  # paths from the repository root
PLOTTED = [name for name in NAMES if name != TUTORIAL]  # the tutorial prints, it draws nothing
MAX_KIB = 600  # committed outputs stay small: modest PNGs, no long text
TUTORIAL_SECONDS = 60  # the whole tutorial, on one thread (about 15 s measured on a busy 2-core machine)
REGENERATE = (
    "edit the cells (notebooks/make_notebooks.py, retrieval_cells.py); run `python notebooks/make_notebooks.py PATH`"
)


def load(name: str) -> ModuleType:
    """``notebooks/<name>.py``, loaded by path (notebooks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, NOTEBOOKS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {NOTEBOOKS / f'{name}.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generator() -> ModuleType:
    return load("make_notebooks")


def outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def pngs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def printed(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed (stdout and stderr), in order."""
    return "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / name, as_version=4)


def test_every_notebook_is_tested() -> None:
    assert list(generator().NOTEBOOKS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_cells_come_from_generator(name: str) -> None:
    gen = generator()
    cells, prefix = gen.NOTEBOOKS[name]
    expected = [(c.cell_type, c.id, c.source) for c in gen.build(cells, prefix).cells]
    committed = nbformat.read(ROOT / name, as_version=4)
    assert [(c.cell_type, c.id, c.source) for c in committed.cells] == expected, (
        f"{name} differs from its cells: {REGENERATE}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs(name: str) -> None:
    path = ROOT / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{name}: code cells executed out of order or not at all ({counts}); {REGENERATE}"
    )
    errors = [f"{o.ename}: {o.evalue}" for o in outputs(nb) if o.output_type == "error"]
    assert not errors, f"{name} was committed with errors {errors}"
    stderr = [o.text[:200] for o in outputs(nb) if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"{name} was committed with warnings or other stderr output {stderr}"
    assert (pngs(nb) >= 1) == (name in PLOTTED), f"{name}: image/png outputs expected only in {PLOTTED}"
    size_kib = path.stat().st_size / 1024
    assert size_kib < MAX_KIB, f"{name} is {size_kib:.0f} KiB; keep committed outputs under {MAX_KIB} KiB"


@pytest.mark.slow
def test_python3_kernel_is_this_interpreter(tmp_path: Path) -> None:
    probe = nbformat.v4.new_notebook()
    probe.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    out = generator().execute(probe, tmp_path).cells[0].outputs
    assert out, "the probe cell printed nothing"
    assert out[0].text.strip() == sys.prefix, "the python3 kernel spec resolves to another Python"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_executes(name: str, tmp_path: Path) -> None:
    """Execute the committed cells afresh (nbclient raises ``CellExecutionError`` on the first failing cell)."""
    notebook = nbformat.read(ROOT / name, as_version=4)
    nb = generator().execute(notebook, tmp_path, {"OMP_NUM_THREADS": "2"})
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert (pngs(nb) >= 1) == (name in PLOTTED)
    if name == TUTORIAL:
        check_tutorial(nb)


def tutorial_numbers(nb: nbformat.NotebookNode) -> dict[str, list[float]]:
    """The numbers the tutorial prints, by what they are: the per-epoch losses of the first training, each row
    of its retrieval tables (P@1, MAP@R), the per-seed MAP@R of hard and random negatives, and its run time."""
    text = printed(nb)
    rows = dict(re.findall(r"^(raw pixels|untrained network|trained, hard negatives) +(\S+ +\S+)$", text, re.M))
    seeds = [[float(v) for v in m] for m in re.findall(r"^ +\d+ +(\S+) +(\S+) +\S+$", text, re.M)]
    return {
        "losses": [float(v) for v in re.findall(r"^epoch +\d+ +loss (\S+)$", text, re.M)],
        **{name: [float(v) for v in row.split()] for name, row in rows.items()},
        "hard": [hard for hard, _ in seeds],
        "random": [rand for _, rand in seeds],
        "seconds": [float(v) for v in re.findall(r"^this notebook ran for (\S+) s after its imports$", text, re.M)],
    }


def check_tutorial(nb: nbformat.NotebookNode) -> None:
    """The sentences of the tutorial's markdown, as tolerant bounds on what it printed.

    Every bound is at least 0.01 from the printed value; run again with scalar kernels (``ATEN_CPU_CAPABILITY=default``,
    ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``), no printed loss moved and no retrieval number by more than 0.002.
    """
    n = tutorial_numbers(nb)
    assert len(n["losses"]) == 10, n
    assert len(n["hard"]) == len(n["random"]) == 3, n
    # "The loss falls from about 1.7 towards 0"
    assert 1.2 < n["losses"][0] < 2.2, n["losses"]
    assert n["losses"][-1] < 0.1, n["losses"]
    # "Raw pixels and the untrained network already find a same-digit nearest neighbour for more than 90 % of them
    # (precision@1), but [...] MAP@R near 0.5"
    for name in ("raw pixels", "untrained network"):
        p_at_1, map_at_r = n[name]
        assert p_at_1 > 0.9, (name, n[name])
        assert 0.35 < map_at_r < 0.65, (name, n[name])
    # "After training, MAP@R is above 0.9 and precision@1 about 0.98"
    p_at_1, map_at_r = n["trained, hard negatives"]
    assert map_at_r > 0.9, n["trained, hard negatives"]
    assert 0.96 < p_at_1 <= 1, n["trained, hard negatives"]
    # "retrieval moves by about 0.01 from one seed to the next"
    assert max(n["hard"]) - min(n["hard"]) < 0.03, n["hard"]
    # "Hard negatives end with a higher MAP@R on average, by about 0.02 over these three seeds"
    mean_gain = sum(h - r for h, r in zip(n["hard"], n["random"], strict=True)) / 3
    assert 0.005 < mean_gain < 0.04, (n["hard"], n["random"])
    assert len(n["seconds"]) == 1, n["seconds"]


def test_tutorial_states_what_it_printed() -> None:
    nb = committed(TUTORIAL)
    check_tutorial(nb)
    # "runs in well under a minute on one CPU thread" (the kernel's clock: starting it and the imports not counted).
    # Read from the committed run only: a fresh run's time says how busy the machine is, not what the text claims.
    assert tutorial_numbers(nb)["seconds"][0] < TUTORIAL_SECONDS


def test_tutorial_prints_results_not_checks() -> None:
    """No ``claim`` lines, no warnings in the reader's way, and one thread pinned before any work."""
    nb = committed(TUTORIAL)
    text = printed(nb)
    assert "holds:" not in text
    assert "warning" not in text.lower()
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "torch.set_num_threads(1)" in first.source
    assert "claim" not in "".join(c.source for c in nb.cells if c.cell_type == "code")


def markdown_tables(text: str) -> list[str]:
    """Each run of consecutive lines that start with ``|``, as one string."""
    tables: list[str] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append("\n".join(block))
            block = []
    return tables


def test_studies_page_tables_are_the_studies_outputs() -> None:
    """docs/studies.md shows every mean ± std table the studies print, copied from the committed outputs."""
    page = markdown_tables((ROOT / "docs" / "studies.md").read_text(encoding="utf-8"))
    printed_tables = [t for name in STUDIES for t in markdown_tables(printed(committed(name)))]
    studied = [t for t in printed_tables if "±" in t]
    assert len(studied) == 4, "expected four mean ± std tables in the studies' outputs"
    stale = [t.splitlines()[0] for t in page if t not in printed_tables]
    assert not stale, f"docs/studies.md has tables no study prints (copy them from the outputs): {stale}"
    missing = [t.splitlines()[0] for t in studied if t not in page]
    assert not missing, f"docs/studies.md lacks tables the studies print: {missing}"


def test_claim_holds_prints_and_records(capsys: pytest.CaptureFixture[str]) -> None:
    claims = load("claims")
    claims.claim("a share", 0.25, above=0.1, below=0.5)
    assert capsys.readouterr().out == "holds: a share: 0.25 (above 0.1 and below 0.5)\n"
    assert claims.RECORD == [{"claim": "a share", "value": 0.25, "above": 0.1, "below": 0.5}]


def test_claim_reads_a_tensor_that_requires_grad_without_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("claims").claim("a loss", torch.tensor(0.5, requires_grad=True) * 1, below=1)
    assert capsys.readouterr().out == "holds: a loss: 0.5 (below 1)\n"


@pytest.mark.parametrize(
    ("value", "bounds", "expected"),
    [
        pytest.param(0.05, {"above": 0.1}, "measured 0.05, expected above 0.1", id="below-the-lower-bound"),
        pytest.param(0.5, {"above": 0.1, "below": 0.5}, "measured 0.5, expected above 0.1 and below 0.5", id="at"),
        pytest.param(float("nan"), {"below": 1.0}, "measured nan, expected below 1", id="nan"),
    ],
)
def test_failed_claim_names_the_claim_the_number_and_the_bound(value: float, bounds: dict, expected: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(f"claim does not hold: a share: {expected}") + "$"):
        load("claims").claim("a share", value, **bounds)


def test_claim_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="needs a bound"):
        load("claims").claim("a share", 0.25)
