"""Smoke test of benchmarks/bench_cached.py: the tiny sizes run end to end and write the table. No timing targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cached.py"


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path: Path) -> None:
    # One thread: shorter on a busy machine. The timeout only guards against a hang (seconds normally).
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "cached.md").read_text()
    assert table in done.stdout  # printed too
    for method in ("full batch", "cached_step"):
        assert f"| 16 | 64 | 0.1 | {method} |" in table
    for target in ("peak memory ≤ 0.25", "time ≤ 1.5 (wall)", "time ≤ 1.5 (CPU)"):
        assert f"| {target} | N = 16, dropout 0.1 |" in table
