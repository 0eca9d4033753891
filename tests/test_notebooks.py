"""The notebooks: their cells come from notebooks/make_notebooks.py, they are committed with outputs (so they render
on GitHub), and they still execute without error.

The execution tests run a copy in a temporary directory and never rewrite the committed file. Each notebook
``assert``s the direction of the claims its markdown makes, so a change that flips one fails here.

They run on the ``python3`` kernel. jupyter_client launches a kernel spec whose ``argv[0]`` is ``python`` with
``sys.executable`` -- the spec ipykernel installs into ``<venv>/share/jupyter/kernels/python3`` is of that kind,
and inside a virtual environment jupyter prefers the environment's specs to the user's -- so the kernel is this
interpreter. ``test_python3_kernel_is_this_interpreter`` checks that rather than trusting it.
"""

from __future__ import annotations

import importlib.util
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


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {NOTEBOOKS / 'make_notebooks.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    nb = generator().execute(nbformat.read(NOTEBOOKS / name, as_version=4), tmp_path)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert pngs(nb) >= 1
