"""The notebooks: their cells come from notebooks/make_notebooks.py, they are committed with outputs (so they render
on GitHub), and they still execute without error.

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
from pathlib import Path
from types import ModuleType

# The test extra installs these; a missing one must fail the suite, not skip it.
import ipykernel  # noqa: F401
import nbclient  # noqa: F401
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart.ipynb", "train_digits.ipynb", "retrieval_options.ipynb"]
MAX_KIB = 600  # committed outputs stay small: modest PNGs, no long text
REGENERATE = (
    "edit the cells (notebooks/make_notebooks.py, retrieval_cells.py); run `python notebooks/make_notebooks.py NAME`"
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


@pytest.mark.parametrize("name", NAMES)
def test_cells_come_from_generator(name: str) -> None:
    gen = generator()
    cells, prefix = gen.NOTEBOOKS[name]
    expected = [(c.cell_type, c.id, c.source) for c in gen.build(cells, prefix).cells]
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert [(c.cell_type, c.id, c.source) for c in committed.cells] == expected, (
        f"{name} differs from its cells: {REGENERATE}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs(name: str) -> None:
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{name}: code cells executed out of order or not at all ({counts}); {REGENERATE}"
    )
    errors = [f"{o.ename}: {o.evalue}" for o in outputs(nb) if o.output_type == "error"]
    assert not errors, f"{name} was committed with errors {errors}"
    assert pngs(nb) >= 1, f"{name} has no image/png output: {REGENERATE}"
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
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb = generator().execute(notebook, tmp_path, {"OMP_NUM_THREADS": "2"})
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert pngs(nb) >= 1


def test_claim_holds_prints_and_records(capsys: pytest.CaptureFixture[str]) -> None:
    claims = load("claims")
    assert claims.claim("a share", 0.25, above=0.1, below=0.5) == 0.25
    assert capsys.readouterr().out == "holds: a share: 0.25 (above 0.1 and below 0.5)\n"
    assert claims.RECORD == [{"claim": "a share", "value": 0.25, "above": 0.1, "below": 0.5}]


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
