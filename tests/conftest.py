"""Fixtures (``device``, with CUDA skipped with a reason when absent, and ``dtype``; their lists live in helpers.py;
``one_thread``) and the ``sweep`` marker.

Fast run: ``python -m pytest -m "not slow"`` deselects notebooks, multi-process runs, subprocesses, benchmarks,
the peers and most cases of the exhaustive sweeps. A test marked ``@pytest.mark.sweep(fast=k)`` keeps ``k`` of its
parametrized cases, evenly spaced in collection order, in the fast run; its other cases are marked ``slow``. The
full run (``python -m pytest``) runs every case.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
import torch
from helpers import DEVICES, DTYPES


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """Every test runs on one intra-op thread unless it asks for more: the tensors are tiny, and on a busy machine
    spinning threads made single tests up to 10x slower (a test of thread counts sets its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one thread, as the demo's and the examples' commands do: faster for their tiny matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects by `-m`
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    sweeps: dict[tuple[str, str], list[pytest.Item]] = defaultdict(list)
    for item in items:
        if item.get_closest_marker("sweep") is not None and isinstance(item, pytest.Function):
            sweeps[item.path.name, item.originalname].append(item)
    for cases in sweeps.values():
        marker = cases[0].get_closest_marker("sweep")
        assert marker is not None
        fast = int(marker.kwargs["fast"])
        keep = {i * len(cases) // fast for i in range(min(fast, len(cases)))}
        for i, item in enumerate(cases):
            if i not in keep:
                item.add_marker(pytest.mark.slow)
