"""The notebooks: committed without outputs, in sync with their generator, and executing without error.

They run on the ``python3`` kernel. jupyter_client launches a kernel spec whose ``argv[0]`` is ``python`` with
``sys.executable`` -- the spec ipykernel installs into ``<venv>/share/jupyter/kernels/python3`` is of that kind,
and inside a virtual environment jupyter prefers the environment's specs to the user's -- so the kernel is this
interpreter. ``test_python3_kernel_is_this_interpreter`` checks that rather than trusting it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

# The test extra installs these; a missing one must fail the suite, not skip it.
import ipykernel  # noqa: F401
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart.ipynb", "train_digits.ipynb"]
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the kernel import this checkout's ``pml_triplets``, whether or not it is installed."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell on the ``python3`` kernel; nbclient raises ``CellExecutionError`` on the first error."""
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    return client.execute()


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_python3_kernel_is_this_interpreter(kernel_env: None, tmp_path: Path) -> None:
    probe = nbformat.v4.new_notebook()
    probe.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    out = execute(probe, tmp_path).cells[0].outputs
    assert out and out[0].text.strip() == sys.prefix, "the python3 kernel spec resolves to another Python"


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs of {cell.id}"


@pytest.mark.parametrize("name", NAMES)
def test_in_sync_with_generator(name: str) -> None:
    gen = generator()
    cells, prefix = gen.NOTEBOOKS[name]
    expected = gen.build(cells, prefix)
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    strip = [(c.cell_type, c.id, c.source) for c in committed.cells]
    assert strip == [(c.cell_type, c.id, c.source) for c in expected.cells], (
        f"{name} differs from notebooks/make_notebooks.py: edit the script and run it"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_executes(name: str, kernel_env: None, tmp_path: Path) -> None:
    nb = execute(nbformat.read(NOTEBOOKS / name, as_version=4), tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
