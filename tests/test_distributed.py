"""``gather_across_devices`` under a real 2-process gloo group, against one process holding the whole batch.

The multi-process tests are marked ``slow`` (they spawn two interpreters, or torchrun); the single-process checks
are not. All distributed cases run in ONE spawned pair of processes (a module-scoped fixture), so the suite pays the
spawn and the rendezvous once. The parent builds each global batch (fixed seed), hands every rank its rows through
files, and compares what the ranks return with ``pt.infonce(..., in_batch=True)`` on the concatenated batch and with
the loop-by-loop formula of ``formula.py``.

Ranks that disagree on their inputs (item 4 of issue 19) run in their own spawned pair each, under a 20 s
process-group timeout, so that a regression fails in seconds instead of hanging: every rank must raise the same
``ValueError``, and the group must still work afterwards.

Each rank backpropagates ``loss_r * N_r * W / N_total`` (just ``loss_r`` when the ranks hold equal N), so that
``Σ_r N_r loss_r / N_total`` is the global loss and the gradients divided by W -- what DDP's averaging does -- are
the global gradients.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import F64, TOL, batch, formula

import pml_triplets as pt
from pml_triplets import _distributed

WORLD = 2
FOUR_WAY = ("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive")
JOIN_TIMEOUT_S = 120.0  # the whole spawned run; it takes a few seconds
GROUP_TIMEOUT_S = 20  # of a collective, in the runs where ranks disagree: a regression fails instead of hanging
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the global batches


def make_case(
    sizes: tuple[int, ...],
    *,
    k: int = 1,
    m: int = 3,
    d: int = 5,
    masked: bool = False,
    ids: bool = False,
    tau: float = 0.1,
    learn_tau: bool = False,
    engine: str = "auto",
    seed: int = 0,
    options: dict[str, Any] | None = None,
    guide: bool = False,
) -> dict[str, Any]:
    """A global batch of sum(sizes) rows (fixed seed) and the call's options; rank r holds rows sizes[:r]...

    Ids take only 6 values, so many candidates (also on the other rank) share an id with some anchor's positive.
    """
    full = batch(sum(sizes), m, d, k=k, s=0, seed=seed, keep=0.7, ids=6)
    keys = ["anchors", "positives"] + (["negatives"] if m else [])
    keys += ["negatives_mask"] if masked else []
    keys += (["positive_ids"] + (["negative_ids"] if m else [])) if ids else []
    data = {key: full[key] for key in keys}
    if masked:
        data["negatives_mask"][0] = False  # a row with every negative masked
    if guide:  # guide embeddings of another width, as a second model would give
        g = batch(sum(sizes), m, 3, k=k, s=0, seed=seed + 100)
        data |= {"guide_anchors": g["anchors"], "guide_positives": g["positives"], "guide_negatives": g["negatives"]}
    return {
        "sizes": sizes,
        "data": data,
        "tau": tau,
        "learn_tau": learn_tau,
        "engine": engine,
        "options": options or {},
    }


CASES: dict[str, dict[str, Any]] = {
    "plain": make_case((4, 4), seed=1),
    "mask_ids_k2": make_case((4, 4), k=2, masked=True, ids=True, tau=0.2, learn_tau=True, seed=2),
    "unequal_5_3": make_case((5, 3), m=2, masked=True, ids=True, tau=0.15, learn_tau=True, seed=3),
    # rank 0 is the one padded here; no per-anchor negatives at all; the quadratic PML engine.
    "unequal_2_5_pml": make_case((2, 5), k=2, m=0, ids=True, tau=0.3, engine="pml", seed=4),
    # the retrieval options: anchors are gathered for the directions that contrast them, guides for filtering
    "four_directions_hardness": make_case(
        (4, 3),
        k=2,
        masked=True,
        ids=True,
        learn_tau=True,
        seed=5,
        options={"directions": FOUR_WAY, "hardness_mode": "all", "hardness_strength": 2.0},
    ),
    "symmetric_filtered_guide": make_case(
        (4, 4),
        seed=6,
        guide=True,
        options={
            "directions": FOUR_WAY[:2],
            "partition": "per_direction",
            "false_negative_margin": 0.05,
            "margin_strategy": "relative",
        },
    ),
    "filtered_own_embeddings": make_case((3, 5), m=2, seed=7, options={"false_negative_margin": 0.0}),
}
GRAD_NAMES = ("anchors", "positives", "negatives")
NAN_ROWS = ((1, 2), (5, 0))  # (row, negative): one on each rank


def nan_case(excluded_by: str) -> dict[str, Any]:
    """Each rank holds a NaN negative that no anchor on any rank may use (issue 19, item 1).

    ``"ids"``: its id is a positive id of every row, so no anchor may contrast it; ``"mask"``: it is masked.
    """
    case = make_case((4, 4), k=2, m=3, masked=True, ids=True, tau=0.2, learn_tau=True, seed=9)
    data = case["data"]
    if excluded_by == "ids":
        data["positive_ids"][:, 1] = 99  # the other ids are 0..5
    for row, j in NAN_ROWS:
        data["negatives"][row, j] = float("nan")
        data["negatives_mask"][row, j] = excluded_by != "mask"
        data["negative_ids"][row, j] = 99 if excluded_by == "ids" else 0
    return case


NAN_CASES = {"ids": nan_case("ids"), "mask": nan_case("mask")}


def finite(case: dict[str, Any]) -> dict[str, Any]:
    """The same case with every NaN replaced by a finite value: unusable rows hold anything."""
    return case | {"data": case["data"] | {"negatives": case["data"]["negatives"].nan_to_num(0.5)}}


def call(data: dict[str, torch.Tensor], case: dict[str, Any], tau: Any, **kw: Any) -> torch.Tensor:
    guide = None
    if "guide_anchors" in data:
        guide = (data["guide_anchors"], data["guide_positives"], data.get("guide_negatives"))
    return pt.infonce(
        data["anchors"],
        data["positives"],
        data.get("negatives"),
        temperature=tau,
        negatives_mask=data.get("negatives_mask"),
        positive_ids=data.get("positive_ids"),
        negative_ids=data.get("negative_ids"),
        in_batch=True,
        engine=case["engine"],
        guide=guide,
        **case["options"],
        **kw,
    )


def leaves(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: v.detach().clone().requires_grad_(key in GRAD_NAMES) if v.is_floating_point() else v.clone()
        for key, v in data.items()
    }


def temperature(case: dict[str, Any]) -> float | torch.Tensor:
    return torch.tensor(case["tau"], dtype=F64, requires_grad=True) if case["learn_tau"] else case["tau"]


def global_result(case: dict[str, Any]) -> dict[str, Any]:
    """One process, the concatenated batch, ``in_batch=True``, no gathering: value and gradients."""
    data = leaves(case["data"])
    tau = temperature(case)
    loss = call(data, case, tau)
    loss.backward()
    grads = {key: data[key].grad for key in GRAD_NAMES if key in data}
    if isinstance(tau, torch.Tensor):
        grads["tau"] = tau.grad
    return {"loss": loss.detach(), "grads": grads}


def rank_rows(case: dict[str, Any], rank: int) -> slice:
    start = sum(case["sizes"][:rank])
    return slice(start, start + case["sizes"][rank])


# ---------------------------------------------------------------- the spawned ranks


def done() -> None:
    """A rank's clean exit, once its results are saved: without interpreter finalization, where torch 2.13's gloo
    teardown aborts one rank (``terminate called without an active exception``) in about 1 run of 30."""
    dist.destroy_process_group()
    os._exit(0)


def _worker(rank: int, world: int, init_method: str, workdir: str) -> None:
    """One rank: every case, gathered, backpropagated with weight N_r * W / N_total; results to rank{r}.pt."""
    work = Path(workdir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        cases = torch.load(work / "cases.pt", weights_only=True)
        out: dict[str, Any] = {}
        for name, case in cases.items():
            try:
                out[name] = _gathered(rank, world, case)
            except Exception:  # raised on every rank alike, or the run hangs: a failing case names itself
                out[name] = {"error": traceback.format_exc()}
        torch.save(out, work / f"rank{rank}.pt")
        done()
    except BaseException:
        (work / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _gathered(rank: int, world: int, case: dict[str, Any]) -> dict[str, Any]:
    data = leaves({key: v[rank_rows(case, rank)] for key, v in case["data"].items()})
    tau = temperature(case)
    loss = call(data, case, tau, gather_across_devices=True)
    weight = case["sizes"][rank] * world / sum(case["sizes"])
    (loss * weight).backward()
    grads = {key: data[key].grad for key in GRAD_NAMES if key in data}
    if isinstance(tau, torch.Tensor):
        grads["tau"] = tau.grad
    return {"loss": loss.detach(), "grads": grads}


def run_ranks(
    target: Callable[..., None],
    args: tuple[Any, ...],
    workdir: Path,
    world: int = WORLD,
    timeout: float = JOIN_TIMEOUT_S,
) -> list[Any]:
    """Spawn ``target(rank, world, init_method, workdir, *args)`` on ``world`` ranks (gloo, 127.0.0.1), wait at
    most ``timeout`` seconds (then kill), return what each rank saved to ``rank{r}.pt``."""
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, init, str(workdir), *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    errors = "\n".join(f.read_text() for f in sorted(workdir.glob("rank*.err")))
    if hung:
        pytest.fail(f"ranks {hung} still running after {timeout:.0f} s, killed\n{errors}")
    codes = [p.exitcode for p in procs]
    if errors or any(codes):
        pytest.fail(f"ranks failed, exit codes {codes}\n{errors}")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("ddp")
    torch.save(CASES | NAN_CASES, workdir / "cases.pt")
    return run_ranks(_worker, (), workdir)


def results(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Every rank's result for case ``name``, failing with the ranks' traceback where it raised."""
    got = [ranks[r][name] for r in range(WORLD)]
    errors = [f"rank {r}:\n{g['error']}" for r, g in enumerate(got) if "error" in g]
    if errors:
        pytest.fail("\n".join(errors))
    return got


# ---------------------------------------------------------------- the checks


def close(x: torch.Tensor, y: torch.Tensor) -> None:
    # float64 on both sides; the ranks add the same terms in another order (all_gather, all_reduce): TOL[float64]
    rtol, atol = TOL[F64]
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_is_the_global_loss(ranks: list[dict[str, Any]], name: str) -> None:
    assert_global_loss(results(ranks, name), CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_gathered_gradients_are_the_global_gradients(ranks: list[dict[str, Any]], name: str) -> None:
    assert_global_gradients(results(ranks, name), CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NAN_CASES))
def test_gathered_nan_candidate_that_no_anchor_may_use_changes_nothing(ranks: list[dict[str, Any]], name: str) -> None:
    # Issue 19, item 1: as without gathering, a candidate no anchor on any rank may use reaches neither the loss
    # nor any gradient, whatever it holds: the ranks' results are those of one process where it holds 0.5.
    got = results(ranks, name)
    for r, g in enumerate(got):
        bad = [key for key, v in {"loss": g["loss"], **g["grads"]}.items() if not v.isfinite().all()]
        assert not bad, f"rank {r}: not finite: {bad}"
    assert_global_loss(got, finite(NAN_CASES[name]))
    assert_global_gradients(got, finite(NAN_CASES[name]))


def assert_global_loss(got: list[dict[str, Any]], case: dict[str, Any]) -> None:
    sizes = case["sizes"]
    losses = [g["loss"] for g in got]
    want = global_result(case)["loss"]
    # Each rank's loss is the mean over its own anchors: weighting by N_r gives the mean over all anchors.
    close(sum(n * v for n, v in zip(sizes, losses, strict=True)) / sum(sizes), want)
    if len(set(sizes)) == 1:
        close(torch.stack(losses).mean(), want)  # equal N: the plain mean DDP users log
    # And the global value is the formula's, written independently of the package.
    data = case["data"]
    options = {key: v for key, v in data.items() if key not in GRAD_NAMES and not key.startswith("guide_")}
    if "guide_anchors" in data:
        options["guide"] = (data["guide_anchors"], data["guide_positives"], data.get("guide_negatives"))
    options |= case["options"]
    close(
        want, formula(data["anchors"], data["positives"], data.get("negatives"), case["tau"], in_batch=True, **options)
    )


def assert_global_gradients(got: list[dict[str, Any]], case: dict[str, Any]) -> None:
    want = global_result(case)["grads"]
    for key in GRAD_NAMES:
        if key not in want:
            continue
        for r in range(WORLD):
            # Gradients reach every rank's rows from every rank's loss (the backward's all_reduce); DDP divides by W.
            close(got[r]["grads"][key] / WORLD, want[key][rank_rows(case, r)])
    if "tau" in want:  # a local leaf on each rank: DDP would average it, i.e. sum / W
        close(sum(got[r]["grads"]["tau"] for r in range(WORLD)) / WORLD, want["tau"])


@pytest.mark.slow
def test_the_cases_exercise_the_gathering(ranks: list[dict[str, Any]]) -> None:
    # Guards against checks that would pass without any gathering: each rank's local in-batch loss must differ
    # from its gathered one, and in the id cases ids must exclude candidates, some of them on the other rank.
    for name, case in CASES.items():
        data = case["data"]
        for r in range(WORLD):
            local = call({key: v[rank_rows(case, r)] for key, v in data.items()}, case, case["tau"])
            assert not torch.isclose(local, results(ranks, name)[r]["loss"]), (name, r)
        if "positive_ids" in data:
            no_ids = {key: v for key, v in data.items() if not key.endswith("_ids")}
            assert not torch.isclose(call(no_ids, case, case["tau"]), call(data, case, case["tau"])), name
            own = set(data["positive_ids"][rank_rows(case, 0)].reshape(-1).tolist())
            other = data["positive_ids"][rank_rows(case, 1)].reshape(-1).tolist()
            assert own & set(other), f"{name}: no positive id shared across the ranks"


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("name", ["plain", "mask_ids_k2"])
def test_without_process_group_gathering_changes_nothing(name: str) -> None:
    assert not dist.is_initialized()
    case = CASES[name]
    with_gather = call(case["data"], case, case["tau"], gather_across_devices=True)
    assert with_gather.item() == call(case["data"], case, case["tau"]).item()


def test_world_size_one_group_changes_nothing() -> None:
    case = CASES["mask_ids_k2"]
    want = global_result(case)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        data = leaves(case["data"])
        tau = temperature(case)
        loss = call(data, case, tau, gather_across_devices=True)
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert loss.item() == want["loss"].item()
    got = {key: data[key].grad for key in GRAD_NAMES}
    got["tau"] = tau.grad  # type: ignore[union-attr]
    assert got.keys() == want["grads"].keys()
    for key, grad in got.items():
        torch.testing.assert_close(grad, want["grads"][key], rtol=0, atol=0)


def test_gathering_needs_in_batch() -> None:
    a, p, n = (CASES["plain"]["data"][key] for key in GRAD_NAMES)
    with pytest.raises(ValueError, match=r"`gather_across_devices=True` needs `in_batch=True`"):
        pt.infonce(a, p, n, gather_across_devices=True)
    with pytest.raises(ValueError, match=r"`gather_across_devices=True` needs `in_batch=True`"):
        pt.InfoNCE(gather_across_devices=True)
    with pytest.raises(TypeError, match=r"`gather_across_devices` must be a bool; got int"):
        pt.infonce(a, p, n, in_batch=True, gather_across_devices=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ranks that disagree (issue 19, item 4)


def disagreeing_call(rank: int, *, m1: int = 3, dtype1: torch.dtype = F64, drop1: str = "") -> torch.Tensor:
    """Rank ``rank``'s gathered loss on N = 4, M = 3, d = 5 float64 rows with a mask and positive ids; rank 1
    holds ``m1`` negatives of ``dtype1``, without ``drop1``."""
    m, dtype, drop = (3, F64, "") if rank == 0 else (m1, dtype1, drop1)
    data = batch(4, m, 5, seed=20 + rank)
    a, p, neg = (data[key].to(dtype).requires_grad_() for key in GRAD_NAMES)
    mask = None if drop == "negatives_mask" else data["negatives_mask"]
    ids = None if drop == "positive_ids" else data["positive_ids"]
    return pt.infonce(
        a, p, neg, temperature=0.1, negatives_mask=mask, positive_ids=ids, in_batch=True, gather_across_devices=True
    )


def _gather_one_or_two(rank: int) -> None:
    """``gather_rows`` itself, with two inputs on rank 0 and one on rank 1 (no caller of the package does this)."""
    x = torch.ones(4, 3)
    _distributed.gather_rows([x, x] if rank == 0 else [x], 4)


# name: (what rank r runs, what every rank's message must say); rank 0's inputs are the same in every case.
DISAGREEING: dict[str, tuple[Callable[[int], object], str]] = {
    "different_m": (
        lambda r: disagreeing_call(r, m1=2),
        r"rank 0: float64 \[N, 3, 5\][^;]*; rank 1: float64 \[N, 2, 5\]",
    ),
    "different_dtype": (
        lambda r: disagreeing_call(r, dtype1=torch.float32),
        r"rank 0: float64 \[N[^\]]*\][^;\n]*; rank 1: float32 \[N",
    ),
    "negatives_mask_on_one_rank": (
        lambda r: disagreeing_call(r, drop1="negatives_mask"),
        r"rank 0: bool \[N, 3\]; rank 1: absent",
    ),
    "positive_ids_on_one_rank": (
        lambda r: disagreeing_call(r, drop1="positive_ids"),
        r"rank 0: int64 \[N(, 1)?\]; rank 1: absent",
    ),
    "number_of_inputs": (_gather_one_or_two, r"the number of inputs: rank 0: 2; rank 1: 1\n  input 1: rank 0: float"),
}


def _disagreeing_worker(rank: int, world: int, init_method: str, workdir: str, name: str) -> None:
    """Run case ``name``, keep the ``ValueError``'s message, then a call every rank agrees on: the group still works."""
    work = Path(workdir)
    try:
        torch.set_num_threads(1)
        timeout = timedelta(seconds=GROUP_TIMEOUT_S)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        message = None
        try:
            DISAGREEING[name][0](rank)
        except ValueError as e:
            message = str(e)
        after = disagreeing_call(rank)
        after.backward()  # the backward's all_reduce too
        torch.save({"message": message, "after": after.detach()}, work / f"rank{rank}.pt")
        done()
    except BaseException:
        (work / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISAGREEING))
def test_ranks_that_disagree_raise_the_same_error_on_every_rank(name: str, tmp_path: Path) -> None:
    # Before (HEAD 5f23f51): each case aborted one rank inside gloo (EnforceNotMet: the ranks' next collectives had
    # different sizes) and reset the other's connection; where no later collective follows, a rank instead blocks
    # until the process-group timeout (30 minutes by default, GROUP_TIMEOUT_S here).
    got = run_ranks(_disagreeing_worker, (name,), tmp_path, timeout=3 * GROUP_TIMEOUT_S)
    messages = [g["message"] for g in got]
    assert messages[0] is not None, "no ValueError on rank 0"
    assert messages == [messages[0]] * WORLD, messages
    assert messages[0].startswith("gather_across_devices: every rank must hold the same inputs"), messages[0]
    assert re.search(DISAGREEING[name][1], messages[0]), messages[0]
    assert all(g["after"].isfinite() for g in got)


def signatures(*ranks: list[torch.Tensor | None], n: tuple[int, ...] = ()) -> list[list[int]]:
    """What ``gather_rows`` exchanges when rank r passes ``ranks[r]`` (with ``n[r]`` rows, 4 by default)."""
    return [_distributed.signature(t, n[r] if n else 4) for r, t in enumerate(ranks)]


F = torch.zeros(4, 3, 5, dtype=F64)
MASK = torch.ones(4, 3, dtype=torch.bool)
NAMES = ["negatives", "negatives_mask", "positive_ids"]


@pytest.mark.parametrize(
    ("inputs", "n", "message"),
    [
        pytest.param(
            [[F], [F[:, :2]]],
            (),
            r"`negatives`: rank 0: float64 \[N, 3, 5\]; rank 1: float64 \[N, 2, 5\]$",
            id="M",
        ),
        pytest.param([[F], [F.float()]], (), r"`negatives`: rank 0: float64 \[N, 3, 5\]; rank 1: float32", id="dtype"),
        pytest.param(
            [[F, MASK], [F, None]], (), r"`negatives_mask`: rank 0: bool \[N, 3\]; rank 1: absent$", id="absent"
        ),
        pytest.param(
            [[F], [F.clone().requires_grad_()]],
            (),
            r"rank 0: float64 \[N, 3, 5\]; rank 1: float64 \[N, 3, 5\] with gradient$",
            id="gradient",
        ),
        pytest.param([[F], [F[:3]]], (4, 4), r"`negatives`: 3 rows on rank 1, which holds N = 4$", id="rows"),
        pytest.param(
            [[F], [F], [F], [F[:, :1]]],
            (),
            r"`negatives`: rank 0: float64 \[N, 3, 5\]; rank 1: float64 \[N, 3, 5\]; rank 2: float64 \[N, 3, 5\]; "
            r"rank 3: float64 \[N, 1, 5\]$",
            id="four ranks",
        ),
        pytest.param(
            [[F], [F, None, F]],
            (),
            r"the number of inputs: rank 0: 1; rank 1: 3\n  `positive_ids`: rank 0: absent; rank 1: float64",
            id="number of inputs",
        ),
    ],
)
def test_disagreement_is_named(inputs: list[list[torch.Tensor | None]], n: tuple[int, ...], message: str) -> None:
    sigs = signatures(*inputs, n=n)
    with pytest.raises(ValueError, match=message):
        _distributed.check_signatures(sigs, NAMES)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        pytest.param([MASK] * 17, r"at most 16 inputs can be gathered; got 17", id="17 inputs"),
        pytest.param([torch.zeros(4, 1, 2, 3, 4, 5)], r"at most 5 dims can be gathered", id="6 dims"),
    ],
)
def test_beyond_the_signature_is_refused(inputs: list[torch.Tensor], message: str) -> None:
    # never from user input (the engine gathers 9 inputs of at most 3 dims): a guard for the code
    with pytest.raises(ValueError, match=message):
        _distributed.signature(inputs, 4)


def test_signatures_that_agree_give_the_row_counts() -> None:
    x, mask = torch.zeros(5, 2, 3, requires_grad=True), torch.ones(5, 3, dtype=torch.bool)
    sigs = signatures([x, None, mask], [x[:3], None, mask[:3]], n=(5, 3))
    assert _distributed.check_signatures(sigs) == [5, 3]


@pytest.mark.parametrize("count", [0, 1, 16])
def test_the_signature_has_one_size_whatever_the_inputs(count: int) -> None:
    inputs = [torch.zeros(4, *[2] * (i % 5)) if i % 3 else None for i in range(count)]
    assert len(_distributed.signature(inputs, 4)) == 130  # the module docstring's number


def test_the_check_is_the_only_extra_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    all_gather = dist.all_gather

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].shape)
        return all_gather(*args, **kwargs)

    monkeypatch.setattr(dist, "all_gather", counted)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        out, offset, total = _distributed.gather_rows([None, torch.ones(3, 2), None, MASK[:3]], 3, names=NAMES)
    finally:
        dist.destroy_process_group()
    assert calls == [(130,), (3, 2), (3, 3)]  # the signatures, then each present input
    assert (offset, total) == (0, 3)
    assert [t is None for t in out] == [True, False, True, False]


# ---------------------------------------------------------------- the example, under torchrun


@pytest.mark.slow
def test_ddp_example_runs_under_torchrun() -> None:
    steps = 6
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the `torchrun` script runs
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "examples" / "ddp_train.py"),
        f"--steps={steps}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:  # run() has killed torchrun by now
        pytest.fail(f"torchrun still running after 120 s, killed\n{e.stdout!r}\n{e.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    # Rank 0 alone prints, once per step, the loss averaged over the ranks.
    assert [line.split()[1] for line in lines] == [f"{s}/{steps}" for s in range(1, steps + 1)], proc.stdout
    values = [float(line.split()[-1]) for line in lines]
    assert all(v > 0 and v == v for v in values), values
    assert values[-1] < values[0], values  # it trains
