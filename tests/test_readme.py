"""Every Python block of the README runs on its own, in a fresh namespace, and prints what its ``# ->`` lines say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_block_runs_alone_and_prints_its_expected_output(block: str) -> None:
    expected = [line.split("# -> ", 1)[1] for line in block.splitlines() if line.startswith("# -> ")]
    assert expected, "every README block shows its expected output in a `# -> ` comment"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert out.getvalue().splitlines() == expected
