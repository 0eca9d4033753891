"""`python -m pml_triplets check` prints its table and fails on a mismatch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pml_triplets import check
from pml_triplets.__main__ import main


def test_check_passes_and_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--n", "5", "--m", "3", "--d", "4"]) == 0
    out = capsys.readouterr().out
    assert "|difference|" in out and "float64" in out and "bfloat16" in out
    assert " 0 failed" in out and " NO" not in out


def test_check_fails_on_mismatch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = check.infonce
    monkeypatch.setattr(check, "infonce", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    assert main(["check", "--n", "5", "--m", "3", "--d", "4"]) == 1
    assert " NO" in capsys.readouterr().out


def test_check_covers_every_device_and_dtype() -> None:
    rows = check.run_checks(4, 2, 3)
    devices = {r["device"] for r in rows}
    assert devices == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    assert {r["dtype"] for r in rows if r["device"] == "cpu"} == {"float64", "float32", "bfloat16"}


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "pml_triplets"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "usage: python -m pml_triplets" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pml_triplets", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown command 'nope'" in done.stderr
