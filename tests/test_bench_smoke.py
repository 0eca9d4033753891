"""benchmarks/bench_loss.py and benchmarks/gpu.sh: their floors against the loop formula, and smoke runs.

The floors are what every method's speed is measured against, so they are checked here against the independent
loop-by-loop formula (``formula.py``), value and gradients. The smoke runs (slow) only show that the scripts run end
to end and write their reports: no timing targets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formula import infonce_loop
from helpers import load_script

import pml_triplets as pt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_loss.py"
GPU_SCRIPT = ROOT / "benchmarks" / "gpu.sh"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


bench = load_script(SCRIPT)


@pytest.mark.sweep(fast=1)
@pytest.mark.parametrize(
    ("in_batch", "option"),
    [
        pytest.param(False, None, id="per-anchor"),
        pytest.param(True, None, id="in-batch"),
        pytest.param(True, "4dir", id="4dir"),
        pytest.param(True, "hardness", id="hardness"),
        pytest.param(True, "guide", id="guide"),
    ],
)
def test_floor_equals_the_loop_formula(in_batch: bool, option: str | None) -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = ((5, 6), (5, 6), (5, 3, 6))
    a, p, n = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)
    if option is None:
        got = bench.floor_loss(a, p, n, in_batch)
    else:
        got = bench.option_floor(a, p, n, option)
    # formula.py takes the same keyword names as pt.infonce.
    want = infonce_loop(a, p, n, bench.TAU, in_batch=in_batch, **bench.OPTIONS.get(option, {}))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got, (a, p, n))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (a, p, n)), rtol=1e-9, atol=1e-10)
    if option is not None:  # the option changes the loss: the test is not comparing two plain in-batch losses
        assert abs(got.item() - bench.floor_loss(a, p, n, True).item()) > 1e-3


def test_fused_reference_equals_the_loop_formula() -> None:
    # The bench's fused reference (its own autograd.Function): the per-anchor formula, gradients included.
    gen = torch.Generator().manual_seed(4)
    shapes = ((5, 6), (5, 6), (5, 3, 6))
    a, p, n = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)
    got = bench.fused_loss(a, p, n)
    want = infonce_loop(a, p, n, bench.TAU)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got, (a, p, n))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (a, p, n)), rtol=1e-9, atol=1e-10)


def test_traffic_limit_and_config_width() -> None:
    # The limit is a positive time; a config's own d is parsed, shown and used.
    traffic = bench.Traffic(torch.ones(64, 4, 8))
    traffic.sample(3)
    assert len(traffic.reads) == len(traffic.copies) == 3
    assert 0 < traffic.seconds < 1.0
    cfg = bench.parse_config("pa:16384:16:d256")
    assert (cfg.n, cfg.m, cfg.d, cfg.label) == (16384, 16, 256, "pa N=16384 M=16 d=256")
    assert cfg.dim(bench.parse(["--d", "64"])) == 256
    assert bench.parse_config("ib:8:2:4dir").dim(bench.parse(["--d", "64"])) == 64


def test_compiled_against_eager_is_read_within_the_compiled_table() -> None:
    # The compiled ≤ eager target divides compiled pml_triplets by pml_triplets[eager] of the same (compiled)
    # table: an eager table measured at another time, however slow or fast, does not enter it.
    a, b = bench.Config("per-anchor", 512, 4), bench.Config("in-batch", 256, 8)

    def row(cfg: object, method: str, ms: float) -> object:
        return bench.Result(cfg, method, [ms / 1e3])

    eager = [row(a, "floor", 1.0), row(a, "pml_triplets", 0.1), row(b, "floor", 1.0), row(b, "pml_triplets", 0.1)]
    compiled = [row(a, "floor", 2.0), row(a, "pml_triplets", 3.0), row(a, bench.EAGER, 4.0)]
    compiled += [row(b, "floor", 2.0), row(b, "pml_triplets", 6.0), row(b, bench.EAGER, 5.0)]

    def verdict() -> tuple[str, str, str]:
        (found,) = [t for t in bench.targets(eager, compiled) if t[0].startswith("compiled pml_triplets time ×")]
        return found

    assert verdict()[1:] == ("1.20", "FAIL")
    assert verdict()[0].endswith("(ib N=256 M=8)")
    compiled[-1] = row(b, bench.EAGER, 12.0)  # 6/12: now the worst is pa N=512 M=4, 3/4
    assert verdict()[1:] == ("0.75", "PASS")
    assert verdict()[0].endswith("(pa N=512 M=4)")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_quick_grid_writes_table_and_plot(tmp_path: Path) -> None:
    # One thread: the run is shorter on a busy machine. Time only: the memory subprocesses (two seconds each, most
    # of it importing torch) are run by the next test. The timeout only guards against a hang.
    cmd = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--many", "1", "--threads", "1", "--no-memory"]
    _run([*cmd, "--out", str(tmp_path)], timeout=600)
    table = (tmp_path / "results.md").read_text()
    for method in ("floor", "pml_triplets", "pml_triplets[pml]", "fused", "recipe"):
        assert f"| per-anchor | 64 | 4 | {method} |" in table
    for option in bench.OPTIONS:
        assert f"| in-batch + {option} | 32 | 4 | pml_triplets |" in table
    assert "## Targets" in table
    assert "## Compiled" not in table
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_memory_subprocesses_fill_the_peak_column(tmp_path: Path) -> None:
    # One configuration, two methods: each method's peak measured in its own subprocess (--worker).
    cmd = [sys.executable, str(SCRIPT), "--config", "pa:64:4", "--methods", "pml_triplets", "--d", "16"]
    _run([*cmd, "--repeats", "1", "--many", "1", "--threads", "1", "--out", str(tmp_path)], timeout=600)
    table = (tmp_path / "results.md").read_text()
    for method in ("floor", "pml_triplets"):
        (line,) = [x for x in table.splitlines() if x.startswith(f"| per-anchor | 64 | 4 | {method} |")]
        peak = line.split("|")[8].strip()  # | mode | N | M | method | time | ×floor | ×limit | peak MB | ...
        assert float(peak) >= 0.0, line


@pytest.mark.slow
def test_compiled_quick_run_reports_fullgraph(tmp_path: Path) -> None:
    # Two configurations, the floor and the fullgraph=True wrapper: two or four compilations (tens of seconds).
    cmd = [sys.executable, str(SCRIPT), "--compile", "only", "--config", "pa:16:2", "--config", "ib:8:2:guide"]
    cmd += ["--methods", "floor,pml_triplets[fullgraph]", "--d", "16", "--repeats", "1", "--threads", "1"]
    _run([*cmd, "--no-memory", "--out", str(tmp_path)], timeout=600)
    table = (tmp_path / "results.md").read_text()
    assert "## Compiled" in table
    assert "## Eager" not in table
    for kind, n in (("per-anchor", 16), ("in-batch + guide", 8)):
        assert f"| {kind} | {n} | 2 | floor |" in table
        assert f"| {kind} | {n} | 2 | pml_triplets[fullgraph] |" in table
    assert "| fullgraph=True compiles at every configuration |" in table


def test_queue_floor_equals_the_loop_formula() -> None:
    # The queue row's floor: own negatives plus every queued row but the one with the positive's id (row i).
    gen = torch.Generator().manual_seed(4)
    shapes = ((5, 6), (5, 6), (5, 3, 6))
    a, p, n = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)
    queue = pt.NegativeQueue(8, 6, dtype=torch.float64)
    queue.enqueue(torch.randn(8, 6, generator=gen, dtype=torch.float64), ids=torch.arange(8))
    got = bench.queue_floor(a, p, n, queue)
    want = infonce_loop(a, p, n, bench.TAU, shared=queue.negatives, shared_ids=queue.ids, pos_ids=torch.arange(5))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got, (a, p, n))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (a, p, n)), rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_queue_row_runs(tmp_path: Path) -> None:
    # The queue row (a full 65,536-row queue), eager, time only: its value is checked against its floor's.
    cmd = [sys.executable, str(SCRIPT), "--config", "pa:16:2:queue", "--methods", "pml_triplets", "--d", "16"]
    _run([*cmd, "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)], timeout=600)
    table = (tmp_path / "results.md").read_text()
    assert "| per-anchor + queue | 16 | 2 | pml_triplets |" in table
    assert "value" not in table.split("## Targets")[0]  # no "value ... but eager floor ..." note
    assert "| eager per-anchor + queue time ×floor ≤ 1.10 at N=256, M=8, S=65,536 |  | n/a (not measured) |" in table


@pytest.mark.slow
def test_gpu_script_quick_on_the_cpu(tmp_path: Path) -> None:
    # Every step of the GPU script at tiny sizes on the CPU (CUDA tests skip): about 2 minutes on a quiet machine.
    done = _run(["bash", str(GPU_SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)], timeout=900)
    for step in ("tests", "check", "eager", "compiled", "large-float32", "large-bfloat16"):
        assert f"{step}: exit 0" in done.stdout
        assert (tmp_path / f"{step}.log").is_file()
    for run in ("eager", "compiled", "large-float32", "large-bfloat16"):
        assert "## Targets" in (tmp_path / run / "results.md").read_text()
