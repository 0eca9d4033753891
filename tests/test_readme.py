"""Every Python block of the README runs on its own and prints what its ``# ->`` lines say.

A reader pastes one block into a fresh interpreter, whose torch generator starts from a random seed. The fast test
runs each block in a fresh namespace twice, after seeding torch's generator with two different values: a block that
draws a random number before its own ``torch.manual_seed`` prints different numbers and fails. The slow test runs
each block in its own fresh process, as a reader would.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
IDS = [f"block{i}" for i in range(len(BLOCKS))]


def expected(block: str) -> list[str]:
    lines = [line.split("# -> ", 1)[1] for line in block.splitlines() if line.startswith("# -> ")]
    assert lines, "every README block shows its expected output in a `# -> ` comment"
    return lines


def test_readme_has_the_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_block_prints_its_expected_output_whatever_the_generator_held(block: str) -> None:
    state = torch.get_rng_state()
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
            assert out.getvalue().splitlines() == expected(block), f"with torch's generator seeded {seed} before it"
    finally:
        torch.set_rng_state(state)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_block_alone_in_a_fresh_process(block: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected(block)
