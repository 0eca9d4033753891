"""notebooks/retrieval_options.ipynb: its cells come from notebooks/make_retrieval_notebook.py, it is committed with
outputs (so it renders on GitHub), and it still executes without error.

The execution test runs a copy in a temporary directory and never rewrites the committed file. The notebook
``assert``s the direction of the claims its markdown makes, so a change that flips one fails here. It trains
30 small models: about a minute on two CPU cores, hence ``slow``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

# The test extra installs these; a missing one must fail the suite, not skip it.
import ipykernel  # noqa: F401
import nbclient  # noqa: F401
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "notebooks" / "make_retrieval_notebook.py"
NOTEBOOK = ROOT / "notebooks" / "retrieval_options.ipynb"
MAX_KIB = 300  # committed outputs stay small: one modest PNG, short tables
REGENERATE = "edit notebooks/make_retrieval_notebook.py and run `python notebooks/make_retrieval_notebook.py`"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_retrieval_notebook", GENERATOR)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {GENERATOR}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def pngs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def test_cells_come_from_generator() -> None:
    expected = [(c.cell_type, c.id, c.source) for c in generator().build().cells]
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.id, c.source) for c in committed.cells] == expected, (
        f"{NOTEBOOK.name} differs from {GENERATOR.name}: {REGENERATE}"
    )


def test_committed_with_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"code cells executed out of order or not at all ({counts}); {REGENERATE}"
    )
    errors = [f"{o.ename}: {o.evalue}" for o in outputs(nb) if o.output_type == "error"]
    assert not errors, f"{NOTEBOOK.name} was committed with errors {errors}"
    assert pngs(nb) >= 1, f"{NOTEBOOK.name} has no image/png output: {REGENERATE}"
    size_kib = NOTEBOOK.stat().st_size / 1024
    assert size_kib < MAX_KIB, f"{NOTEBOOK.name} is {size_kib:.0f} KiB; keep committed outputs under {MAX_KIB} KiB"


@pytest.mark.slow
def test_executes(tmp_path: Path) -> None:
    """Execute the committed cells afresh (nbclient raises ``CellExecutionError`` on the first failing cell)."""
    nb = generator().execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert pngs(nb) >= 1
