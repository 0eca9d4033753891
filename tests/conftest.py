"""Fixtures only: ``device`` (CUDA skipped with a reason when absent) and ``dtype``; their lists live in helpers.py.

Fast run: ``python -m pytest -m "not slow"`` deselects notebooks, multi-process runs, benchmarks and compile.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param  # type: ignore[no-any-return]
