"""``python -m pml_triplets check`` passes as shipped and fails on each injected fault, on every device and dtype.

Each fault wraps the real :func:`pml_triplets.infonce` and is patched in as ``check.infonce``, the name the check
calls; the plain ``NTXentLoss + build_indices`` rows do not go through it and keep passing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import pml_triplets as pt
from pml_triplets import check

CASES = {"plain", "mask", "K=3 positives", "shared negatives+ids", "in-batch+ids+mask,K=2", *check.RETRIEVAL,
         *check.DEBIASED, "distill kl+mask", "distill margin_mse+mask"}  # fmt: skip
EXPECTED_DTYPES = {"float64", "float32", "float16", "bfloat16"}  # on every device, the CPU included
# Small sizes: the float64 loop reference dominates the check's time (8.7 s at its defaults N=16, M=8, d=32, 0.9 s
# here); CI runs `python -m pml_triplets check` at the defaults.
SMALL = {"n": 4, "m": 2, "d": 4}


@pytest.fixture(scope="module")
def clean_rows() -> list[check.Row]:
    return check.run_checks(**SMALL)


def infonce_rows(rows: list[check.Row], case: str | None = None) -> list[check.Row]:
    return [r for r in rows if r.method.startswith("infonce") and case in (None, r.case)]


def by_dtype(rows: list[check.Row]) -> dict[tuple[str, str], list[check.Row]]:
    groups: dict[tuple[str, str], list[check.Row]] = {}
    for r in rows:
        groups.setdefault((r.device, r.dtype), []).append(r)
    return groups


def test_clean_check_passes_every_row(clean_rows: list[check.Row]) -> None:
    failing = [r for r in clean_rows if not r.passed]
    assert not failing, failing
    devices = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    assert {r.device for r in clean_rows} == devices
    for device in devices:
        assert {r.dtype for r in clean_rows if r.device == device} == EXPECTED_DTYPES, device
    for (device, dtype), rows in by_dtype(clean_rows).items():
        assert {r.case for r in rows} == CASES, (device, dtype)
        assert {r.method for r in rows if r.case == "in-batch+ids+mask,K=2"} == {"infonce", "infonce[pml]"}
        assert {r.method for r in rows if r.case in check.RETRIEVAL} == {"infonce"}  # the dense engine's options
        assert {r.method for r in rows if r.case.startswith("distill")} == {"infonce"}
        recipe = {r.method for r in rows} >= {"NTXentLoss+build_indices"}
        assert recipe == (dtype in ("float32", "float64")), (device, dtype)


def test_half_precision_tolerance_is_well_below_one_percent(clean_rows: list[check.Row]) -> None:
    half = [r for r in clean_rows if r.dtype in ("bfloat16", "float16")]
    assert {(r.device, r.dtype) for r in half} >= {("cpu", "float16"), ("cpu", "bfloat16")}
    for r in half:
        assert r.value_tolerance < 0.005 * abs(r.reference), r
        assert r.grad_tolerance < 0.005, r


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(4.12, 2.0**-6, id="bf16-in-[4,8)"),  # ulp 4 * 2**-7
        pytest.param(1.0, 2.0**-8, id="bf16-at-1"),
        pytest.param(0.75, 2.0**-9, id="bf16-in-[0.5,1)"),
    ],
)
def test_half_ulp(value: float, expected: float) -> None:
    assert check._half_ulp(value, torch.bfloat16) == expected
    assert check._half_ulp(value, torch.float16) == expected * 2.0**-3


Fault = Callable[..., torch.Tensor]


def ignore_mask(*args: Any, negatives_mask: Any = None, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(*args, **kwargs)


def ignore_in_batch(*args: Any, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(*args, **{**kwargs, "in_batch": False})


def first_positive_only(anchors: torch.Tensor, positives: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(anchors, positives[:, :1] if positives.ndim == 3 else positives, *args, **kwargs)


def ignore_hardness(*args: Any, hardness_mode: Any = None, hardness_strength: Any = 0.0, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(*args, **kwargs)


def ignore_guide(*args: Any, guide: Any = None, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(*args, **kwargs)  # filters with the model's own embeddings instead


def doubled_gradients(*args: Any, **kwargs: Any) -> torch.Tensor:
    loss = pt.infonce(*args, **kwargs)
    return 2 * loss - loss.detach()  # the same value (exactly, in every dtype), twice the gradient


def one_percent_off(*args: Any, **kwargs: Any) -> torch.Tensor:
    return pt.infonce(*args, **kwargs) * 1.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_doubled_gradients_wrapper_keeps_the_value(dtype: torch.dtype) -> None:
    a, p, n = (torch.randn(*s).to(dtype).requires_grad_() for s in ((4, 8), (4, 8), (4, 3, 8)))
    assert torch.equal(doubled_gradients(a, p, n), pt.infonce(a, p, n))
    (g,) = torch.autograd.grad(doubled_gradients(a, p, n), a)
    (g_ref,) = torch.autograd.grad(pt.infonce(a, p, n), a)
    # Doubling is exact except below the smallest normal number, where rounding 2x and doubling round(x) can differ
    # by one subnormal step (float16's 2**-24; seen with torch 2.2 on the CPU).
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(g, 2 * g_ref, rtol=0, atol=tiny)


@pytest.mark.sweep(fast=3)
@pytest.mark.parametrize(
    ("fault", "case", "broken"),
    [
        pytest.param(ignore_mask, "mask", "value", id="mask-ignored"),
        pytest.param(ignore_in_batch, "in-batch+ids+mask,K=2", "value", id="in_batch-ignored"),
        pytest.param(first_positive_only, "K=3 positives", "value", id="first-of-K-positives"),
        pytest.param(ignore_hardness, "gte+hardness+shared", "value", id="hardness-ignored"),
        pytest.param(ignore_guide, "symmetric+guide,K=2", "value", id="guide-ignored"),
        pytest.param(doubled_gradients, None, "grad", id="gradients-doubled"),
        pytest.param(one_percent_off, None, "value", id="value-1%-off"),
    ],
)
def test_check_fails_on_fault(
    fault: Fault,
    case: str | None,
    broken: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The fault breaks every infonce row of ``case`` (all cases if None), on every device and dtype."""
    monkeypatch.setattr(check, "infonce", fault)
    rows = check.run_checks(**SMALL)
    assert check.report(rows) == 1
    assert " NO" in capsys.readouterr().out
    for (device, dtype), group in by_dtype(rows).items():
        hit = infonce_rows(group, case)
        assert hit, (device, dtype)
        for r in hit:
            assert r.error is None, r  # a numerical failure, not a crash
            error, tol = (r.value_error, r.value_tolerance) if broken == "value" else (r.grad_error, r.grad_tolerance)
            assert error > tol, (device, dtype, r)
        if broken == "grad":
            assert all(r.value_error <= r.value_tolerance for r in hit), "the doubled-gradient fault moved the value"
    assert all(r.passed for r in rows if r.method == "NTXentLoss+build_indices")  # not routed through the fault


def test_a_method_that_raises_fails_its_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(check, "infonce", broken)
    rows = check.run_checks(**SMALL)
    assert all(r.error == "RuntimeError: boom" and not r.passed for r in infonce_rows(rows))
    assert check.report(rows) == 1
    assert "raised RuntimeError: boom" in capsys.readouterr().out


def test_main_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [f"--{k}={v}" for k, v in SMALL.items()]
    assert check.main(argv) == 0
    out = capsys.readouterr().out
    assert "grad err" in out
    assert " 0 failed" in out
    assert " NO" not in out
    monkeypatch.setattr(check, "infonce", one_percent_off)
    assert check.main(argv) == 1
    assert " NO" in capsys.readouterr().out


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main(["--n", "many"]) == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err
