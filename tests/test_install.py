"""Installing into one's own project, as the README and docs/index.md say: from the clone's path, or a wheel.

Both run offline here: no dependencies (torch and PML are in this environment already) and no build isolation
(``build`` and ``hatchling`` come with the ``dev`` extra). What is checked is where the package is imported from
afterwards: the install's folder, not the clone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GETTING_STARTED = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")  # names the wheel


def run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def imported_from(site: Path, cwd: Path) -> list[str]:
    """Where ``pml_triplets`` and the demo come from, and the version, with ``site`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import pml_triplets as pt, pml_triplets_demo as demo; print(pt.__file__, demo.__file__, pt.__version__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.slow
def test_install_from_the_clone_path(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    site = tmp_path / "site"
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        site,
        ROOT,
        cwd=tmp_path,
    )
    package, demo, version = imported_from(site, tmp_path)
    assert Path(package).is_relative_to(site)
    assert Path(demo).is_relative_to(site)
    assert version != "0+unknown"


@pytest.mark.slow
def test_the_wheel_the_docs_name_installs(tmp_path: Path) -> None:
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    (wheel_name,) = set(re.findall(r"dist/(pml_triplets-[\w.]+-py3-none-any\.whl)", GETTING_STARTED))
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", ROOT, cwd=tmp_path)
    wheel = tmp_path / "dist" / wheel_name
    assert wheel.exists(), sorted(p.name for p in (tmp_path / "dist").iterdir())
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, wheel, cwd=tmp_path)
    package, demo, _ = imported_from(site, tmp_path)
    assert Path(package).is_relative_to(site)
    assert Path(demo).is_relative_to(site)
