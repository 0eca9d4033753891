"""benchmarks/bench_mine.py: its floor and its FAISS wrapper against a loop written here, and a smoke run.

The floor and the FAISS row are what ``mine_negatives`` is timed against and compared with, so they are checked
against the top-k written from the definition (float64, one query at a time). The smoke run (slow) only shows that
the script runs end to end and writes its report: no timing targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_mine.py"


bench = load_script(SCRIPT)


def nearest_loop(queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int) -> list[list[int]]:
    """Each query's k corpus rows of highest cosine other than its positive: every pair, one at a time, float64."""
    out = []
    for i in range(len(queries)):
        q = queries[i].double()
        cos = []
        for j in range(len(corpus)):
            if j != int(pos[i]):
                c = corpus[j].double()
                cos.append((float(q @ c) / float(q.norm() * c.norm()), j))
        out.append([j for _, j in sorted(cos, key=lambda t: -t[0])[:k]])
    return out


def small() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bench.make_inputs(bench.Size(q=12, c=300, d=8, k=5), seed=2)


def args_for(floor_chunk: int) -> argparse.Namespace:
    return argparse.Namespace(floor_chunk=floor_chunk, query_chunk=None, corpus_chunk=None)


@pytest.mark.parametrize("chunk", [pytest.param(5, id="chunked"), pytest.param(1024, id="whole")])
def test_floor_equals_the_loop(chunk: int) -> None:
    queries, corpus, pos = small()
    ids, scores = bench.run_floor(queries, corpus, pos, 5, args_for(chunk))
    assert ids.tolist() == nearest_loop(queries, corpus, pos, 5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # highest first
    assert bench.reference(queries, corpus, pos, 5).tolist() == nearest_loop(queries, corpus, pos, 5)


@pytest.mark.slow  # imports faiss
def test_faiss_row_equals_the_loop() -> None:
    pytest.importorskip("faiss")
    queries, corpus, pos = small()
    # make_inputs puts each query near its positive (its nearest row, dropped from k + 1); a positive far away
    # (row 0's set to another query's) is not among the k + 1, and the last neighbour goes instead.
    pos = pos.clone()
    pos[0] = pos[1]
    ids, _ = bench.run_faiss(queries, corpus, pos, 5, args_for(1024))
    assert ids.tolist() == nearest_loop(queries, corpus, pos, 5)


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path: Path) -> None:
    # One thread: shorter on a busy machine. The timeout only guards against a hang (seconds normally).
    cmd = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "mine.md").read_text()
    assert table in done.stdout  # printed too
    for method in bench.METHODS:
        if method != "faiss" or importlib.util.find_spec("faiss") is not None:
            assert f"| {method} |" in table
    assert "| peak extra memory ≤ 256 MB |" in table
    assert "| ids equal to the floor's, first 512 queries | 0 rows differ | PASS |" in table
