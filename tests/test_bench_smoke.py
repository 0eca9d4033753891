"""Smoke test of benchmarks/bench_loss.py: the tiny grid runs end to end and writes its report. No timing targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_grid_writes_table_and_plot(tmp_path: Path) -> None:
    # One thread: the run is shorter on a busy machine. The timeout only guards against a hang (about 1 min
    # normally, with a dozen short-lived memory subprocesses).
    cmd = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    for method in ("floor", "pml_triplets", "pml_triplets[pml]", "recipe"):
        assert f"| {method} |" in table
    assert "## Targets" in table
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
