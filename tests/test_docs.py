"""Every Python block of the README and of the docs pages runs on its own and prints what its ``# ->`` lines say.

A reader pastes one block into a fresh interpreter, whose torch generator starts from a random seed. The fast test
runs each block in a fresh namespace twice, after seeding torch's generator with two different values: a block that
draws a random number before its own ``torch.manual_seed`` prints different numbers and fails. The slow test runs
each block in its own fresh process, as a reader would. A block whose first line is ``# needs: <module>`` is skipped
where that module is not installed (the lowest-versions run installs the test extra only), and runs in the slow
tests only, as the peers' own tests do.

The site itself: a slow test builds it with ``mkdocs build --strict`` (broken links and anchors fail) and checks that
the Reference shows the option list spliced into ``infonce``'s docstring at import time.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = re.compile(r"# needs: *([\w.]+)")


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


BLOCKS = [
    pytest.param(page, block, id=f"{page.relative_to(ROOT).as_posix()}:block{i}")
    for page in PAGES
    for i, block in enumerate(python_blocks(page))
]
# A block that runs a peer package (a `# needs:` line) is slow, as the peers' tests are: importing
# sentence-transformers alone is seconds of the quick run.
SEEDED_BLOCKS = [
    pytest.param(*param.values, id=param.id, marks=[pytest.mark.slow] if NEEDS.match(param.values[1]) else [])
    for param in BLOCKS
]


def expected(block: str) -> list[str]:
    """The block's ``# -> `` lines: what it prints, in order (a block without them prints nothing)."""
    return [line.split("# -> ", 1)[1] for line in block.splitlines() if line.startswith("# -> ")]


def require(block: str) -> None:
    """Skip a block whose first line says ``# needs: <module>`` when that module is not importable."""
    needs = NEEDS.fullmatch(block.splitlines()[0].strip()) if block.strip() else None
    if needs:
        pytest.importorskip(needs.group(1))


def test_the_pages_have_the_examples() -> None:
    per_page = {page.relative_to(ROOT).as_posix(): len(python_blocks(page)) for page in PAGES}
    assert per_page["README.md"] >= 2, per_page
    assert sum(per_page.values()) >= 15, per_page
    assert sum(bool(expected(block)) for page in PAGES for block in python_blocks(page)) >= 14


def test_a_needs_line_skips_only_where_the_module_is_missing() -> None:
    with pytest.raises(pytest.skip.Exception, match="no_such_module_here"):
        require("# needs: no_such_module_here\nprint(1)\n")
    require("# needs: torch\nprint(1)\n")  # installed: runs
    require("import torch  # needs: nothing, not on the first line\n")


@pytest.mark.parametrize(("page", "block"), SEEDED_BLOCKS)
def test_block_prints_its_expected_output_whatever_the_generator_held(page: Path, block: str) -> None:
    require(block)
    state = torch.get_rng_state()
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, str(page), "exec"), {"__name__": "__docs__"})
            assert out.getvalue().splitlines() == expected(block), f"with torch's generator seeded {seed} before it"
    finally:
        torch.set_rng_state(state)


@pytest.mark.slow
@pytest.mark.parametrize(("page", "block"), BLOCKS)
def test_block_alone_in_a_fresh_process(page: Path, block: str, tmp_path: Path) -> None:
    require(block)
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected(block)


@pytest.mark.slow
def test_the_site_builds_strict_with_the_spliced_options(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = {**os.environ, "PYTHONPATH": path, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert "{options}" not in reference, "a docstring shows the raw placeholder instead of the spliced options"
    assert "DEFAULT." not in reference, "a signature shows a symbolic default instead of its value"
    infonce = reference.split('id="pml_triplets.infonce"', 1)[1].split('id="pml_triplets.InfoNCE"', 1)[0]
    text = re.sub(r"<[^>]+>", " ", infonce)
    for option in ("temperature", "loss_fn", "in_batch", "chunk_size", "engine", "hardness_strength", "partition"):
        assert re.search(rf"\b{option}\b", text), f"the Reference's infonce does not document `{option}`"


def test_docstrings_use_no_sphinx_markup() -> None:
    """The Reference renders docstrings as Markdown: a Sphinx role or directive would show as raw text there."""
    sphinx = re.compile(r":(?:func|class|meth|attr|mod|data):`|^\s*\.\. \w+::", flags=re.M)
    found = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted((ROOT / "pml_triplets").glob("*.py"))
        for text in [path.read_text(encoding="utf-8")]
        for m in sphinx.finditer(text)
    ]
    assert not found, f"Sphinx markup (write ``name`` or an indented formula instead): {found}"
