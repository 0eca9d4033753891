"""Forward+backward time and peak extra memory of InfoNCE on predefined triplets, against a plain-torch floor.

Command (repository root, virtual environment active)::

    python benchmarks/bench_loss.py                       # default CPU grid, eager
    python benchmarks/bench_loss.py --compile             # the same grid eager, then under torch.compile
    python benchmarks/bench_loss.py --compile only        # torch.compile only
    python benchmarks/bench_loss.py --threads 1           # a shared CPU: no OpenMP waits for a busy core
    python benchmarks/bench_loss.py --quick --repeats 1   # tiny grid, a smoke test
    python benchmarks/bench_loss.py --device cuda --d 768 --dtype bfloat16 --config pa:8192:64 --config ib:8192:64

Each configuration draws anchors (N, d), positives (N, d) and negatives (N, M, d) as leaf tensors with
``requires_grad``, at temperature 0.07. ``per-anchor``: anchor i's negatives are its own M; ``in-batch``: also every
other row's positive and negatives (``pt.infonce(..., in_batch=True)``). Three in-batch rows add a retrieval option
of ``pt.infonce`` (semantics of sentence-transformers 6.2's ``MultipleNegativesRankingLoss``; "docs" are every
row's positive and negatives):

* ``4dir`` -- ``directions=("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor",
  "positive_to_positive"), partition="joint"``: one softmax over s(a_i, every doc), s(a_j, p_i) for every j,
  s(a_i, a_j) for j != i and s(p_i, docs of the other rows).
* ``hardness`` -- ``hardness_mode="all", hardness_strength=5.0``: 5 * s(a_i, c), detached and not divided by the
  temperature, added to every logit but the positive's.
* ``guide`` -- ``false_negative_margin=0.1`` (no guide: the embeddings themselves, detached): a candidate c is dropped
  when s(a_i, c) > s(a_i, p_i) - 0.1.

One per-anchor row adds a negative queue: ``queue`` -- a full ``pt.NegativeQueue`` of 65,536 rows (ids 0..65,535)
shared by every anchor, ``pt.infonce(a, p, n, queue=queue, positive_ids=arange(N))``: anchor i's positive has id
i, so queue row i (an earlier copy of it) is not its negative. Its floor concatenates the positive, the M
negatives and the (N, 65,536) queue block with that entry masked to -inf, and takes one cross-entropy.

An option that ``pt.infonce`` does not accept (a ``TypeError`` for the keyword) is reported as "n/a (option
missing)". Methods, all computing the same loss (checked before anything is timed: the base methods against
``pt.reference_infonce`` at a small size; ``pml_triplets`` with an option against that option's floor, in float64;
and at every measured configuration, each method's warm-up value against the eager floor's):

* ``floor`` -- the formula in plain torch, written below (:func:`floor_loss`, :func:`option_floor`): the speed and
  memory to beat.
* ``pml_triplets`` -- ``pt.infonce(a, p, n)``, automatic engine; ``pml_triplets[pml]`` with ``engine="pml"``.
* ``recipe`` -- the article's recipe with its ordering fixed: ``NTXentLoss(temperature=0.07)(
  pt.concat_embeddings(a, p, n), indices_tuple=pt.build_indices(N, M))``, O(N²M²). In-batch: the same
  concatenation with a 4-tuple listing every (anchor, candidate) pair. Skipped when predicted to need more than
  ``--max-gb``.
* ``info-nce-pytorch`` -- ``info_nce.InfoNCE(temperature=0.07, negative_mode="paired")(a, p, n)``; per-anchor only
  (its unpaired/in-batch modes are a different loss).
* ``fused`` -- the reference for the fused per-anchor cosine (:class:`FusedCosine`, 25 lines): the floor with its
  negatives' block as one ``autograd.Function`` that saves no normalized copy and writes the backward by hand;
  per-anchor only.

Every table also has a ``limit`` row: the memory-traffic limit, the time to read the negatives twice and write a
tensor of their size once (:class:`Traffic`, sampled between the methods' timed calls): what the forward
pass (one read) and the backward pass (one read, the gradient's write) cannot go below.

``--compile``: a second table (or, with ``--compile only``, the only one) in which every method is wrapped in
``torch.compile`` with its defaults (inductor), ratios to the *compiled* floor. ``torch._dynamo.reset()`` before each
configuration, so each one is compiled afresh for its shapes (no recompile limit, no dynamic shapes carried over).
Compilation happens in two warm-up calls, which are not timed. A method that fails to compile is reported as
"compile failed" (full messages at the end of ``results.md``). The compiled table has two more methods:
``pml_triplets[fullgraph]``, ``torch.compile(..., fullgraph=True)``, which raises at any graph break (its note says
whether it compiled), and ``pml_triplets[eager]``, the same call not compiled, timed in the same interleaved repeats
(with ``pml_triplets``): compiled against eager side by side.

Columns of the table (printed, and written to ``<out>/results.md`` after every configuration; ``<out>/results.png``
plots the time ratios):

* ``time ms`` -- median wall time of one forward+backward (loss, then ``loss.backward()`` into the inputs'
  ``.grad``), over ``--repeats`` repeats (``--many`` for the floor and ``pml_triplets`` at per-anchor N=128, M=4,
  whose fixed cost is a target) after the warm-up; methods are interleaved, each repeat in a rotated order, so load
  from other processes falls on all of them alike. CUDA: ``torch.cuda.synchronize`` before starting and before
  stopping the clock. A method whose last warm-up call takes over ``--slow-s`` seconds gets at most 3 repeats.
  Compiled: a note says so if a timed call compiled a graph (a guard failing on every call).
* ``time ×floor`` -- that median divided by the floor's median in the same configuration and table of the same run.
* ``time ×limit`` -- that median divided by the ``limit`` row's.
* ``peak MB`` -- peak memory above the level once the inputs exist (not measured with ``--no-memory``). CUDA:
  ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call, after a warm-up. CPU: each
  (configuration, method, eager or compiled) in a fresh subprocess (``--worker``), which builds the inputs, runs the
  warm-up calls (compiling, if compiled), returns freed heap memory (``malloc_trim``), resets the high-water mark
  (``/proc/self/clear_refs``), reads the resident set size from ``/proc/self/statm``, runs the call and reports the
  new high-water mark (``VmHWM``; not ``ru_maxrss``, which keeps the parent's) minus that. glibc is told to serve
  allocations of 64 KiB and more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so that freed blocks leave the resident
  set at once: the figure is close to the live tensors' peak, not to what a caching allocator keeps. It includes the
  inputs' gradients. The subprocess runs first, with its address space capped at ``--max-gb`` above the inputs: a
  method that needs more is reported as skipped and not timed.
* ``mem ×floor`` -- peak MB divided by the floor's.
* ``note`` -- why a cell is empty (skipped, not applicable, failed), or what else to know about it.

The targets printed at the end (PASS/FAIL; "n/a" where the configuration or table was not measured) concern
``pml_triplets`` (automatic engine); every ratio is to the floor of the same table of the same run:

* eager, per-anchor: worst time ratio over the per-anchor grid (N = 16384, d = 256 included) <= 1.0; worst over
  N >= 2048 <= 0.3; at N=4096, M=64 time <= 8x the limit; at N=128, M=4 the fixed cost, median time minus the
  floor's median time, <= 0.2 ms; peak memory at N=4096, M=32 <= 0.8x; >= 50x faster than the recipe at N=512,
  M=32.
* eager, in-batch at N=1024, M=8: time <= 1.10x and peak memory <= 1.10x.
* eager, each retrieval option (in-batch N=1024, M=8): time <= 1.3x its own floor.
* eager, per-anchor N=256, M=8 with the 65,536-row queue: time <= 1.10x and peak memory <= 1.10x its floor.
* compiled: time ratio's geometric mean over the per-anchor grid <= 1.0, and over the in-batch grid (no options)
  <= 1.0; compiled ``pml_triplets`` no slower than ``pml_triplets[eager]`` at any configuration of the compiled
  table; ``fullgraph=True`` compiles at every configuration of the compiled table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt

try:
    from info_nce import InfoNCE as INCE
except ImportError:  # an optional comparison (the `dev` extra)
    INCE = None

TAU = 0.07
HARDNESS_STRENGTH = 5.0
MARGIN = 0.1
DIRECTIONS = ("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive")
# The retrieval options of the in-batch option rows: pt.infonce's keyword arguments.
OPTIONS: dict[str, dict[str, Any]] = {
    "4dir": {"directions": DIRECTIONS, "partition": "joint"},
    "hardness": {"hardness_mode": "all", "hardness_strength": HARDNESS_STRENGTH},
    "guide": {"false_negative_margin": MARGIN},
}
QUEUE_ROWS = 65_536  # the per-anchor "queue" row: a full pt.NegativeQueue of this many rows, shared by every anchor
PA_OPTIONS = ("queue",)  # the per-anchor options
Mode = Literal["per-anchor", "in-batch"]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
FULLGRAPH = "pml_triplets[fullgraph]"
EAGER = "pml_triplets[eager]"  # the compiled table's uncompiled pml_triplets: compiled vs eager side by side
METHODS = ("floor", "pml_triplets", FULLGRAPH, EAGER, "pml_triplets[pml]", "fused", "recipe", "info-nce-pytorch")
COMPILED_ONLY = (FULLGRAPH, EAGER)
LIMIT = "limit"  # not a method: the memory-traffic limit, a row of every table
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# |value - floor's value| allowed at a measured configuration, relative (half precision: the floor runs in it).
VALUE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
MB = 1e6


@dataclass(frozen=True)
class Config:
    mode: Mode
    n: int
    m: int
    option: str | None = None  # a key of OPTIONS (in-batch), or one of PA_OPTIONS (per-anchor)
    d: int | None = None  # the embedding dimension, if not --d's

    @property
    def label(self) -> str:
        base = f"{'pa' if self.mode == 'per-anchor' else 'ib'} N={self.n} M={self.m}"
        base += "" if self.d is None else f" d={self.d}"
        return base if self.option is None else f"{base} {self.option}"

    def dim(self, args: argparse.Namespace) -> int:
        return args.d if self.d is None else self.d

    @property
    def kind(self) -> str:
        return self.mode if self.option is None else f"{self.mode} + {self.option}"


FIXED_COST = Config("per-anchor", 128, 4)  # timed --many times: its target is an absolute difference in ms
WIDE = Config("per-anchor", 16384, 16, d=256)  # the largest per-anchor row: 268 MB of negatives


@dataclass
class Result:
    config: Config
    method: str
    times: list[float] = field(default_factory=list)  # seconds
    peak: float | None = None  # bytes
    note: str = ""
    error: str = ""  # the full message of a failure to compile

    @property
    def time(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def grid(quick: bool) -> list[Config]:
    if quick:
        per_anchor, in_batch, options, queue = [(64, 4)], [(32, 4)], (32, 4), []
    else:
        per_anchor = [(128, 4)] + [(n, m) for n in (512, 2048, 4096) for m in (4, 8, 32, 64)]
        in_batch, options, queue = [(256, 8), (1024, 8), (2048, 8)], (1024, 8), [(256, 8)]
    return (
        [Config("per-anchor", n, m) for n, m in per_anchor]
        + ([] if quick else [WIDE])
        + [Config("per-anchor", n, m, "queue") for n, m in queue]  # its 65,536-row queue: not in the quick grid
        + [Config("in-batch", n, m) for n, m in in_batch]
        + [Config("in-batch", *options, option) for option in OPTIONS]
    )


def parse_config(text: str) -> Config:
    """``MODE:N:M[:OPTION][:dD]``, MODE ``pa`` (per-anchor) or ``ib`` (in-batch), OPTION of that mode (see the grid),
    D the embedding dimension (default ``--d``): ``pa:16384:16:d256``."""
    modes: dict[str, Mode] = {"pa": "per-anchor", "per-anchor": "per-anchor", "ib": "in-batch", "in-batch": "in-batch"}
    parts = text.split(":")
    d = None
    if len(parts) >= 4 and parts[-1][:1] == "d" and parts[-1][1:].isdigit() and int(parts[-1][1:]) >= 1:
        d, parts = int(parts[-1][1:]), parts[:-1]
    ok = len(parts) in (3, 4) and parts[0] in modes and parts[1].isdigit() and parts[2].isdigit()
    option = parts[3] if len(parts) == 4 else None
    allowed = (OPTIONS if modes.get(parts[0]) == "in-batch" else PA_OPTIONS) if ok else ()
    if not ok or int(parts[1]) < 1 or (option is not None and option not in allowed):
        raise argparse.ArgumentTypeError(
            f"expected MODE:N:M[:OPTION][:dD] with MODE pa or ib, N >= 1, M >= 0, OPTION one of "
            f"{', '.join(OPTIONS)} (ib) or {', '.join(PA_OPTIONS)} (pa) and D >= 1; got {text!r}"
        )
    return Config(modes[parts[0]], int(parts[1]), int(parts[2]), option, d)


# --------------------------------------------------------------------------------------------------- the methods


def floor_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, in_batch: bool) -> torch.Tensor:
    """The direct formula: one row of logits per anchor, the positive in the target column."""
    a, p, n = F.normalize(a, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    if not in_batch:
        pos = (a * p).sum(-1)  # (N,)
        neg = torch.einsum("nd,nmd->nm", a, n)  # (N, M)
        logits = torch.cat([pos[:, None], neg], 1) / TAU
        return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))
    # Anchor i's candidates are its own positive (the target, column i), its own negatives, and every other row's
    # positive and negatives: the whole pool, nothing masked.
    pool = torch.cat([p, n.reshape(-1, n.shape[-1])])  # (N + N*M, d)
    logits = a @ pool.T / TAU  # (N, N + N*M)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def option_floor(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, option: str) -> torch.Tensor:
    """An in-batch retrieval option as sentence-transformers writes it: similarity blocks, -inf masks, log-sum-exp."""
    a, p, n = F.normalize(a, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    rows = torch.arange(a.shape[0], device=a.device)
    docs = torch.cat([p, n.reshape(-1, n.shape[-1])])  # (R, d), R = N + N*M: the positives, then row by row negatives
    owner = torch.cat([rows, rows.repeat_interleave(n.shape[1])])  # (R,) the row each doc belongs to
    own_pos = torch.arange(docs.shape[0], device=a.device)[None, :] == rows[:, None]  # (N, R): column i of row i
    sim = a @ docs.T  # (N, R) anchor_to_positive: anchor i against every doc, its own positive included
    logits = sim / TAU
    if option == "hardness":  # + strength * raw cosine (detached, not / τ) on every logit but the own positive's
        logits = logits + HARDNESS_STRENGTH * sim.detach().masked_fill(own_pos, 0.0)
    elif option == "guide":  # the guide is the detached embeddings: drop c when g(a_i, c) > g(a_i, p_i) - margin
        g = sim.detach()
        logits = logits.masked_fill((g > g[:, : rows.shape[0]].diagonal()[:, None] - MARGIN) & ~own_pos, -math.inf)
    blocks = [logits]
    if option == "4dir":
        blocks.append(p @ a.T / TAU)  # (N, N) positive_to_anchor: row i holds s(a_j, p_i) for every j, j = i too
        blocks.append((a @ a.T / TAU).masked_fill(rows[:, None] == rows[None, :], -math.inf))  # anchor_to_anchor
        blocks.append((p @ docs.T / TAU).masked_fill(owner[None, :] == rows[:, None], -math.inf))  # other rows' docs
    lse = torch.logsumexp(torch.stack([torch.logsumexp(b, dim=1) for b in blocks], dim=1), dim=1)  # (N,) joint
    return (lse - sim[:, : rows.shape[0]].diagonal() / TAU).mean()


def queue_floor(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, queue: pt.NegativeQueue) -> torch.Tensor:
    """Per-anchor negatives plus every queued row but the one with the id of the anchor's positive (id = row i)."""
    a, p, n, bank = (
        F.normalize(a, dim=-1),
        F.normalize(p, dim=-1),
        F.normalize(n, dim=-1),
        F.normalize(queue.negatives, dim=-1),
    )
    rows = torch.arange(a.shape[0], device=a.device)
    pos = (a * p).sum(-1)  # (N,)
    neg = torch.einsum("nd,nmd->nm", a, n)  # (N, M)
    shared = (a @ bank.T).masked_fill(queue.ids[None, :] == rows[:, None], -math.inf)  # (N, S)
    logits = torch.cat([pos[:, None], neg, shared], 1) / TAU
    return F.cross_entropy(logits, torch.zeros_like(rows))


def queue_for(cfg: Config, d: int, dtype: torch.dtype, device: torch.device) -> pt.NegativeQueue | None:
    return queue_of(d, dtype, str(device)) if cfg.option in PA_OPTIONS else None


@cache
def queue_of(d: int, dtype: torch.dtype, device: str) -> pt.NegativeQueue:
    """A full queue of QUEUE_ROWS rows of width d, ids 0..S-1: anchor i's positive has id i (queue row i)."""
    queue = pt.NegativeQueue(QUEUE_ROWS, d, dtype=dtype, device=device)
    rows = torch.randn(QUEUE_ROWS, d, generator=torch.Generator().manual_seed(3))
    queue.enqueue(rows.to(device, dtype), ids=torch.arange(QUEUE_ROWS, device=device))
    return queue


def in_batch_pairs(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """4-tuple over ``concat_embeddings``'s rows: anchor i with its positive, and with every candidate but it."""
    rows = torch.arange(n, device=device)
    refs = n + torch.arange(n * (m + 1), device=device)  # every positive, then every negative
    cand = refs.expand(n, -1)[refs[None, :] != (n + rows)[:, None]]  # (N * (N + N*M - 1),), row-major
    return rows, n + rows, rows.repeat_interleave(n * (m + 1) - 1), cand


class FusedCosine(torch.autograd.Function):
    """The reference for the fused per-anchor cosine (issue 20's 40 lines): ``<â, n> / ‖n‖`` (N, M), no normalized
    copy of n; saves the inputs and (N, M) tensors; backward ``∂/∂n = u â - (u s / ‖n‖) n`` with ``u = g / ‖n‖``
    (one ``baddbmm`` into the gradient) and ``∂/∂â = Σ u n`` (one ``bmm``)."""

    @staticmethod
    def forward(ctx: Any, a_hat: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(n, dim=-1).clamp_min(1e-12)  # (N, M)
        s: torch.Tensor = torch.bmm(n, a_hat[:, :, None]).squeeze(-1) / norm
        ctx.save_for_backward(a_hat, n, norm, s)
        return s

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_hat, n, norm, s = ctx.saved_tensors
        u = g / norm
        grad_a = torch.bmm(u[:, None, :], n).squeeze(1)
        grad_n = torch.baddbmm(n * (-u * s / norm)[..., None], u[..., None], a_hat[:, None, :])
        return grad_a, grad_n


def fused_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    neg: torch.Tensor = FusedCosine.apply(a, n)  # type: ignore[no-untyped-call]
    logits = torch.cat([(a * p).sum(-1, keepdim=True), neg], 1) / TAU
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


def recipe_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, in_batch: bool) -> torch.Tensor:
    emb = pt.concat_embeddings(a, p, n)
    size, m = n.shape[0], n.shape[1]
    if in_batch:
        pairs = in_batch_pairs(size, m, a.device)
    else:
        pairs = pt.build_indices(size, m, device=a.device)
    loss: torch.Tensor = NTXentLoss(temperature=TAU)(emb, indices_tuple=pairs)
    return loss


def info_nce_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    assert INCE is not None
    loss: torch.Tensor = INCE(temperature=TAU, negative_mode="paired")(a, p, n)
    return loss


def floor_fn(cfg: Config, queue: pt.NegativeQueue | None = None) -> LossFn:
    ib = cfg.mode == "in-batch"
    if queue is not None:
        return lambda a, p, n: queue_floor(a, p, n, queue)
    if cfg.option is not None:
        option = cfg.option
        return lambda a, p, n: option_floor(a, p, n, option)
    return lambda a, p, n: floor_loss(a, p, n, ib)


def ours(cfg: Config, queue: pt.NegativeQueue | None = None, **kw: Any) -> LossFn:
    ib, opts = cfg.mode == "in-batch", OPTIONS.get(cfg.option or "", {})
    if queue is not None:  # anchor i's positive has id i, as queue row i
        return lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, queue=queue, positive_ids=ids(a), **kw)
    return lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, in_batch=ib, **opts, **kw)


def ours_fullgraph(cfg: Config, queue: pt.NegativeQueue | None = None) -> LossFn:
    # The same call as ours() but a separate code object: dynamo caches compiled code per code object, so the
    # fullgraph=True wrapper must not find the graph-broken code compiled for the default wrapper.
    ib, opts = cfg.mode == "in-batch", OPTIONS.get(cfg.option or "", {})
    if queue is not None:
        return lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, queue=queue, positive_ids=ids(a))
    return lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, in_batch=ib, **opts)


def ids(a: torch.Tensor) -> torch.Tensor:
    return torch.arange(a.shape[0], device=a.device)


def close(value: float, expected: float, rtol: float) -> bool:
    return math.isfinite(value) and abs(value - expected) <= rtol * max(1.0, abs(expected))


@cache
def option_status(option: str, device: str) -> str:
    """Why ``pt.infonce`` with ``option`` is not measured; "" if it takes it and agrees with its floor (float64)."""
    g = torch.Generator().manual_seed(2)
    a, p, n = (torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in ((10, 8), (10, 8), (10, 3, 8)))
    queue = None
    if option in PA_OPTIONS:  # a small queue whose rows 0..9 are copies of the anchors' positives by id
        queue = pt.NegativeQueue(20, 8, dtype=torch.float64, device=device)
        queue.enqueue(torch.randn(20, 8, generator=g, dtype=torch.float64).to(device), ids=torch.arange(20).to(device))
    cfg = Config("in-batch" if queue is None else "per-anchor", 10, 3, option)
    try:
        got = float(ours(cfg, queue)(a, p, n))
    except Exception as err:  # the option is being written: whatever it raises goes into the table
        missing = isinstance(err, TypeError) and "unexpected keyword argument" in str(err)
        return "n/a (option missing)" if missing else f"n/a ({first_line(err, 70)})"
    expected = float(floor_fn(cfg, queue)(a, p, n))
    return "" if close(got, expected, 1e-8) else f"n/a (wrong value: {got:.8g}, its floor {expected:.8g})"


def methods(cfg: Config, compiled: bool, device: str, queue: pt.NegativeQueue | None = None) -> dict[str, LossFn | str]:
    """Each method's loss for ``cfg`` (compiled or not), or a string: why the method is not measured there.

    ``queue``: the row's queue, for the per-anchor "queue" option (see :func:`queue_of`).
    """
    ib = cfg.mode == "in-batch"
    out: dict[str, LossFn | str] = {"floor": floor_fn(cfg, queue)}
    if cfg.option is not None:
        status = option_status(cfg.option, device)
        out["pml_triplets"] = status or ours(cfg, queue)
        out[FULLGRAPH] = status or ours_fullgraph(cfg, queue)
        for name in ("pml_triplets[pml]", "fused", "recipe", "info-nce-pytorch"):
            out[name] = "n/a (no such option)"
    else:
        out["pml_triplets"] = ours(cfg)
        out[FULLGRAPH] = ours_fullgraph(cfg)
        out["pml_triplets[pml]"] = ours(cfg, engine="pml")
        out["fused"] = "n/a (per-anchor only)" if ib else fused_loss
        out["recipe"] = lambda a, p, n: recipe_loss(a, p, n, ib)
        out["info-nce-pytorch"] = (
            "n/a (a different loss)" if ib else "n/a (not installed)" if INCE is None else info_nce_loss
        )
    if not compiled:
        del out[FULLGRAPH]
        return out
    fullgraph = out[FULLGRAPH]
    compiled_out: dict[str, LossFn | str] = {
        name: fn if isinstance(fn, str) else torch.compile(fn) for name, fn in out.items() if name != FULLGRAPH
    }
    compiled_out[FULLGRAPH] = fullgraph if isinstance(fullgraph, str) else torch.compile(fullgraph, fullgraph=True)
    compiled_out[EAGER] = out["pml_triplets"]  # not compiled (dynamo's cached code runs only inside its wrappers)
    return compiled_out


def recipe_bytes(cfg: Config, itemsize: int) -> float:
    """Predicted peak of the recipe: PML's (E, E) distance matrix (and its gradient) and its (P, Q) pair matrices.

    E = N(M+2) embeddings; P positive pairs x Q negative pairs (N*M x N*M per-anchor, N x N(N(M+1)-1) in-batch).
    Measured on the CPU at up to 1.3x below this for N <= 512 (about 1.5 E² + 4 to 4.5 PQ elements).
    """
    e = cfg.n * (cfg.m + 2)
    pq = (cfg.n * cfg.m) ** 2 if cfg.mode == "per-anchor" else cfg.n * cfg.n * (cfg.n * (cfg.m + 1) - 1)
    return float(itemsize * (2 * e * e + 5 * pq))


def check_methods(device: torch.device) -> None:
    """Every eager method computes the same loss as ``pt.reference_infonce`` (the floor to 1e-5), at a small size.

    The retrieval options are checked against their floors by :func:`option_status` (float64).
    """
    g = torch.Generator().manual_seed(1)
    a, p, n = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(12, 5, 16, generator=g)
    a, p, n = a.to(device), p.to(device), n.to(device)
    for mode in ("per-anchor", "in-batch"):
        ref = float(pt.reference_infonce(a, p, n, TAU, in_batch=mode == "in-batch"))
        for name, fn in methods(Config(mode, 12, 5), False, device.type).items():
            if isinstance(fn, str):
                continue
            got = float(fn(a, p, n))
            if not close(got, ref, 1e-5):
                raise SystemExit(f"{name} ({mode}) = {got} but reference_infonce = {ref}: nothing measured")


# --------------------------------------------------------------------------------------------------- measuring


def make_inputs(cfg: Config, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    shapes = [(cfg.n, d), (cfg.n, d), (cfg.n, cfg.m, d)]
    a, p, n = (torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes)
    return a, p, n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(fn: LossFn, inputs: Inputs) -> tuple[float, float]:
    """Seconds for one forward+backward, gradients accumulating into freshly cleared ``.grad``; and the loss."""
    for x in inputs:
        x.grad = None
    device = inputs[0].device
    sync(device)
    start = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    sync(device)
    return time.perf_counter() - start, float(loss.detach())


class Traffic:
    """The memory-traffic limit: seconds to read the negatives twice and write a tensor of their size once.

    Forward must read them once; backward read them once and write their gradient once. Median of ``x.sum()``
    plus median of ``y.copy_(x)`` (a read and a write) into a ``y`` already written, so no page faults. Sampled
    between the methods' timed calls (:func:`measure`), so that it sees the machine they see.
    """

    def __init__(self, negatives: torch.Tensor) -> None:
        self.x = negatives.detach()
        self.y = torch.empty_like(self.x).copy_(self.x)
        self.reads: list[float] = []
        self.copies: list[float] = []

    def sample(self, count: int) -> None:
        for _ in range(count):
            sync(self.x.device)
            start = time.perf_counter()
            self.x.sum()
            sync(self.x.device)
            middle = time.perf_counter()
            self.y.copy_(self.x)
            sync(self.x.device)
            self.reads.append(middle - start)
            self.copies.append(time.perf_counter() - middle)

    @property
    def seconds(self) -> float:
        return statistics.median(self.reads) + statistics.median(self.copies)


def run_once(fn: LossFn, inputs: Inputs) -> float:
    return call(fn, inputs)[0]


def warm_ups(compiled: bool) -> int:
    return 2 if compiled else 1  # compiled: the first call compiles the forward, then the backward


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS since the last reset: ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` is no use after a reset: it is at least the high-water mark that the parent's address space had
    when this process was spawned (the kernel carries it over ``exec``), which clear_refs does not reset.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water_mark() -> bool:
    """Reset the peak RSS that ``ru_maxrss`` reports to the current RSS (Linux >= 4.0); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc), so that it is not counted in the baseline."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """Child process: peak extra RSS of one method on one configuration, printed as JSON.

    Its address space may grow by at most ``--max-gb`` once the inputs exist (``RLIMIT_AS``): a method that needs
    more fails here, with ``"over": true``, instead of drawing the machine into the OOM killer.
    """
    cfg = Config(args.mode, args.n, args.m, args.option)
    fn = methods(cfg, args.compiled, "cpu", queue_for(cfg, args.d, DTYPES[args.dtype], torch.device("cpu")))[
        args.method
    ]
    assert not isinstance(fn, str)
    inputs = make_inputs(cfg, args.d, DTYPES[args.dtype], torch.device("cpu"))
    limit = vm_bytes() + int((8.0 if args.max_gb is None else args.max_gb) * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps(peak_report(lambda: run_once(fn, inputs), inputs, warm_ups(args.compiled))))


def peak_report(run: Callable[[], object], leaves: Sequence[torch.Tensor], warm_calls: int) -> dict[str, Any]:
    """Peak extra RSS of one ``run()``, as the JSON a memory worker prints; ``{"over": True}`` if it ran out.

    ``warm_calls`` calls first (where the high-water mark can be reset) keep lazy one-time allocations (thread
    pools, kernels, compiling) out of the figure; the ``leaves``' gradients are dropped after them.
    """
    try:
        resettable = reset_high_water_mark()
        if resettable:
            for _ in range(warm_calls):
                run()
            for x in leaves:
                x.grad = None
            gc.collect()
            malloc_trim()
            reset_high_water_mark()
        base = rss_bytes()
        run()
    except Exception as err:
        if not out_of_memory(err):
            raise
        return {"over": True}
    return {"peak": peak_rss_bytes() - base, "warm": resettable, "over": False}


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation refused (under ``RLIMIT_AS``, or by the device), not some other failure."""
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory")
    )


def cpu_peak(
    cfg: Config, method: str, compiled: bool, args: argparse.Namespace, max_bytes: float
) -> tuple[float | None, str]:
    """Peak extra RSS measured in a fresh subprocess, and a note; ``None`` with a "skipped" note when over the cap."""
    cmd = [sys.executable, __file__, "--worker", "--mode", cfg.mode, "--n", str(cfg.n), "--m", str(cfg.m)]
    cmd += ["--method", method, "--d", str(cfg.dim(args)), "--dtype", args.dtype, "--max-gb", str(max_bytes / 1e9)]
    cmd += [] if args.threads is None else ["--threads", str(args.threads)]
    cmd += [] if cfg.option is None else ["--option", cfg.option]
    cmd += ["--compiled"] if compiled else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"memory worker timed out ({args.worker_timeout:.0f} s)"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return None, f"memory worker failed: {last[:80]}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["over"]:
        return None, f"skipped (needs over {max_bytes / 1e9:.3g} GB)"
    return float(report["peak"]), "" if report["warm"] else "memory without warm-up"


def cuda_peak(fn: LossFn, inputs: Inputs) -> float:
    run_once(fn, inputs)
    for x in inputs:
        x.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(fn, inputs)
    return float(torch.cuda.max_memory_allocated() - base)


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (to notice a recompilation while timing)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def first_line(err: BaseException, width: int = 90) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= width else text[: width - 1] + "…"


def measure(
    cfg: Config, args: argparse.Namespace, device: torch.device, max_bytes: float, compiled: bool
) -> list[Result]:
    if compiled:  # each configuration compiled afresh, for its own shapes
        torch._dynamo.reset()
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(cfg, cfg.dim(args), dtype, device)
    asked = {"floor", *args.methods, *([EAGER] if "pml_triplets" in args.methods else [])}
    wanted = [m for m in METHODS if (compiled or m not in COMPILED_ONLY) and m in asked]
    results = {name: Result(cfg, name) for name in wanted}
    active: dict[str, LossFn] = {}
    queue = queue_for(cfg, cfg.dim(args), dtype, device)
    for name, fn in methods(cfg, compiled, device.type, queue).items():
        if name not in results:
            continue
        if isinstance(fn, str):
            results[name].note = fn
        elif name == "recipe" and (need := recipe_bytes(cfg, dtype.itemsize)) > max_bytes:
            results[name].note = f"skipped (would need ~{need / 1e9:.3g} GB)"
        else:
            active[name] = fn
    if device.type == "cpu" and args.memory:  # memory first: a method over the cap is found in a subprocess
        for name in list(active):
            results[name].peak, results[name].note = cpu_peak(cfg, name, compiled, args, max_bytes)
            if results[name].note.startswith("skipped"):
                del active[name]
    with torch.no_grad():
        expected = float(floor_fn(cfg, queue)(*inputs))  # every method's value is checked against the eager floor's
    repeats = dict.fromkeys(active, args.repeats)
    if cfg == FIXED_COST:  # its target is a difference of two medians in ms: many repeats of those two
        many = max(args.repeats, args.many)
        repeats.update({m: many for m in ("floor", "pml_triplets", *COMPILED_ONLY) if m in active})
    for name, fn in list(active.items()):  # warm-up (compiling), and drop what cannot run
        try:
            for _ in range(warm_ups(compiled)):
                seconds, value = call(fn, inputs)
        except Exception as err:  # a compile error can be of any type; eager: out of memory and the like
            if not compiled and not isinstance(err, (RuntimeError, MemoryError)):
                raise
            results[name].peak = None
            results[name].note = f"{'compile ' if compiled else ''}failed: {first_line(err)}"
            results[name].error = f"{type(err).__name__}: {err}"
            del active[name]
            gc.collect()
            continue
        if seconds > args.slow_s:
            repeats[name] = min(repeats[name], 3)
        if not close(value, expected, VALUE_RTOL[dtype]):
            results[name].note = f"value {value:.6g} but eager floor {expected:.6g}; " + results[name].note
        elif name == FULLGRAPH:
            results[name].note = f"fullgraph=True compiles; {results[name].note}".removesuffix("; ")
        gc.collect()
    names = list(active)
    recompiled: set[str] = set()
    traffic = Traffic(inputs[2])  # its samples are taken between the rounds of timed calls
    for r in range(max(repeats.values(), default=0)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if len(results[name].times) < repeats[name]:
                graphs = graphs_compiled()
                results[name].times.append(run_once(active[name], inputs))
                if graphs_compiled() != graphs:
                    recompiled.add(name)
        traffic.sample(3)
    if not traffic.reads:
        traffic.sample(max(3 * args.repeats, 15))
    for name in recompiled:  # its timed calls include compiling: a guard that fails on every call
        results[name].note = f"recompiled while timed; {results[name].note}".removesuffix("; ")
    if device.type == "cuda" and args.memory:
        for name, fn in active.items():
            results[name].peak = cuda_peak(fn, inputs)
    limit = Result(cfg, LIMIT, [traffic.seconds], note="2 reads + 1 write of the negatives")
    return [*results.values(), limit]


# --------------------------------------------------------------------------------------------------- reporting


def lookup(results: Sequence[Result], cfg: Config, method: str) -> Result | None:
    return next((r for r in results if r.config == cfg and r.method == method), None)


def ratio(
    results: Sequence[Result], cfg: Config, method: str, what: Literal["time", "peak"], to: str = "floor"
) -> float | None:
    num, den = lookup(results, cfg, method), lookup(results, cfg, to)
    a, b = (None if r is None else getattr(r, what) for r in (num, den))
    return None if a is None or b is None or b <= 0 else a / b


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(results: Sequence[Result]) -> str:
    lines = [
        "| mode | N | M | method | time ms | time ×floor | time ×limit | peak MB | mem ×floor | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.config
        t = None if r.time is None else r.time * 1e3
        peak = None if r.peak is None else r.peak / MB
        t_ratio, m_ratio = ratio(results, c, r.method, "time"), ratio(results, c, r.method, "peak")
        kind = c.kind if c.d is None else f"{c.kind}, d={c.d}"
        cells = [kind, str(c.n), str(c.m), r.method, fmt(t, ".2f" if t is not None and t < 10 else ".1f")]
        cells += [fmt(t_ratio, ".2f"), fmt(ratio(results, c, r.method, "time", LIMIT), ".1f")]
        cells += [fmt(peak, ".1f"), fmt(m_ratio, ".2f"), r.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geomean(values: Sequence[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(x) for x in values)) if values else None


def targets(eager: Sequence[Result], compiled: Sequence[Result]) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a) for the summary targets; each ratio from one table of one run."""
    out: list[tuple[str, str, str]] = []

    def add(what: str, value: float | None, limit: float, spec: str = ".2f", na: str = "not measured") -> None:
        """A target ``value <= limit`` (``>=`` for a speed-up, whose label says so)."""
        ok = value is not None and (value >= limit if "faster" in what else value <= limit)
        out.append((what, fmt(value, spec), f"n/a ({na})" if value is None else ("PASS" if ok else "FAIL")))

    def base(results: Sequence[Result], mode: Mode) -> list[Config]:
        return list(dict.fromkeys(r.config for r in results if r.config.mode == mode and r.config.option is None))

    def ratios(results: Sequence[Result], configs: Sequence[Config]) -> dict[Config, float]:
        pairs = ((c, ratio(results, c, "pml_triplets", "time")) for c in configs)
        return {c: x for c, x in pairs if x is not None}

    pa = ratios(eager, base(eager, "per-anchor"))

    def worst(what: str, values: dict[Config, float], limit: float) -> None:
        top = max(values, key=values.__getitem__, default=None)
        add(
            f"{what} ≤ {limit}" + ("" if top is None else f" ({top.label})"),
            None if top is None else values[top],
            limit,
        )

    worst("eager per-anchor time ×floor, worst over the grid", pa, 1.0)
    worst("eager per-anchor time ×floor, worst over N ≥ 2048", {c: x for c, x in pa.items() if c.n >= 2048}, 0.3)
    traffic = Config("per-anchor", 4096, 64)
    add("eager per-anchor time ×limit ≤ 8 at N=4096, M=64", ratio(eager, traffic, "pml_triplets", "time", LIMIT), 8)
    mine_s, floor_s = (
        None if r is None else r.time for r in (lookup(eager, FIXED_COST, m) for m in ("pml_triplets", "floor"))
    )
    fixed = None if mine_s is None or floor_s is None else (mine_s - floor_s) * 1e3
    add("eager per-anchor N=128, M=4: median time − floor's, ms ≤ 0.2", fixed, 0.2, ".3f")
    ib, big_pa = Config("in-batch", 1024, 8), Config("per-anchor", 4096, 32)
    add("eager in-batch time ×floor ≤ 1.10 at N=1024, M=8", ratio(eager, ib, "pml_triplets", "time"), 1.10)
    add("eager in-batch peak memory ×floor ≤ 1.10 at N=1024, M=8", ratio(eager, ib, "pml_triplets", "peak"), 1.10)
    big_mem = ratio(eager, big_pa, "pml_triplets", "peak")
    add("eager per-anchor peak memory ×floor ≤ 0.8 at N=4096, M=32", big_mem, 0.8, ".4f")
    rec, mine = (ratio(eager, Config("per-anchor", 512, 32), m, "time") for m in ("recipe", "pml_triplets"))
    speedup = None if rec is None or mine is None else rec / mine
    add("eager ≥ 50× faster than the recipe at N=512, M=32", speedup, 50, ".0f")
    queue = Config("per-anchor", 256, 8, "queue")
    add(
        "eager per-anchor + queue time ×floor ≤ 1.10 at N=256, M=8, S=65,536",
        ratio(eager, queue, "pml_triplets", "time"),
        1.10,
    )
    add(
        "eager per-anchor + queue peak memory ×floor ≤ 1.10 at N=256, M=8, S=65,536",
        ratio(eager, queue, "pml_triplets", "peak"),
        1.10,
    )
    for option in OPTIONS:
        cfg = Config("in-batch", 1024, 8, option)
        row = lookup(eager, cfg, "pml_triplets")
        na = row.note[5:-1] if row is not None and row.note.startswith("n/a (") else "not measured"
        value = ratio(eager, cfg, "pml_triplets", "time")
        add(f"eager in-batch + {option} time ×its floor ≤ 1.3 at N=1024, M=8", value, 1.3, na=na)
    na = "not measured" if compiled else "not measured: run with --compile"
    for mode in ("per-anchor", "in-batch"):
        values = list(ratios(compiled, base(compiled, mode)).values())
        add(f"compiled {mode} time ×compiled floor, geometric mean over the grid ≤ 1.0", geomean(values), 1.0, na=na)
    # Compiled against uncompiled pml_triplets in the same table: interleaved in the same repeats, not two tables
    # measured minutes apart.
    slower = {r.config: x for r in compiled if (x := ratio(compiled, r.config, "pml_triplets", "time", EAGER))}
    last = max(slower, key=slower.__getitem__, default=None)
    what = f"compiled pml_triplets time ×{EAGER} (the same table), worst over the grid ≤ 1.0"
    add(what + ("" if last is None else f" ({last.label})"), None if last is None else slower[last], 1.0, na=na)
    rows = [r for r in compiled if r.method == FULLGRAPH]
    tried = [r for r in rows if not r.note.startswith("n/a")]
    passed = sum(r.note.startswith("fullgraph=True compiles") for r in tried)
    count = f"{passed} of {len(tried)}" + (f" ({len(rows) - len(tried)} n/a)" if len(rows) > len(tried) else "")
    verdict = f"n/a ({na})" if not tried else ("PASS" if passed == len(tried) else "FAIL")
    out.append(("fullgraph=True compiles at every configuration", count if tried else "", verdict))
    return out


def targets_table(rows: Sequence[tuple[str, str, str]]) -> str:
    lines = ["| target (pml_triplets, auto engine) | measured | result |", "|---|---:|---|"]
    return "\n".join(lines + [f"| {t} | {v} | {ok} |" for t, v, ok in rows])


def plot(tables: dict[str, list[Result]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {name: results for name, results in tables.items() if results}
    width = max(len(dict.fromkeys(r.config for r in results)) for results in shown.values())
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 0.65 * width + 2), 4.5 * len(shown)), squeeze=False)
    for ax, (name, results) in zip(axes[:, 0], shown.items(), strict=True):
        configs = list(dict.fromkeys(r.config for r in results))
        others = [m for m in dict.fromkeys(r.method for r in results) if m != "floor"]
        for k, method in enumerate(others):
            xs, ys = [], []
            for i, c in enumerate(configs):
                value = ratio(results, c, method, "time")
                if value is not None:
                    xs.append(i + (k - (len(others) - 1) / 2) * 0.12)
                    ys.append(value)
            ax.plot(xs, ys, marker="o", linestyle="none", label=method)
        ax.axhline(1.0, color="black", linewidth=0.8, label="floor")
        ax.set_yscale("log")
        ax.set_xticks(range(len(configs)), [c.label for c in configs], rotation=45, ha="right")
        ax.set_ylabel(f"{name}: time / floor time (log)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(tables: dict[str, list[Result]], title: str) -> str:
    parts = [f"# bench_loss results\n\n{title}\n"]
    headings = {"eager": "Eager", "compiled": "Compiled (torch.compile, inductor; ratios to the compiled floor)"}
    for name, results in tables.items():
        if results:
            parts.append(f"## {headings[name]}\n\n{table(results)}\n")
    parts.append(f"## Targets\n\n{targets_table(targets(tables['eager'], tables['compiled']))}\n")
    errors = [r for r in tables["compiled"] if r.error]
    if errors:
        parts.append("## Compile errors\n")
        for r in errors:
            text = "\n".join(r.error.splitlines()[:40])
            parts.append(f"### {r.config.label}, {r.method}\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def library_version() -> str:
    """``pml_triplets <version>``, with the git commit (and ``+dirty`` for local edits of the package) if known."""
    root = Path(pt.__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "pml_triplets"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return f"pml_triplets {pt.__version__}"
    return f"pml_triplets {pt.__version__} ({commit.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''})"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="both",
        default="off",
        choices=("off", "both", "only"),
        help="torch.compile table: --compile (or --compile both) eager then compiled, --compile only (default off)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny grid (smoke test)")
    ap.add_argument(
        "--config",
        action="append",
        type=parse_config,
        help="MODE:N:M[:OPTION] instead of the grid, repeatable: pa:8192:64, ib:1024:8, ib:1024:8:4dir "
        f"(options: ib {', '.join(OPTIONS)}; pa {', '.join(PA_OPTIONS)})",
    )
    ap.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=list(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (the floor is always measured)",
    )
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="time only (CPU: no subprocesses)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per method (default 5)")
    ap.add_argument(
        "--many", type=int, default=200, help="repeats of floor and pml_triplets at pa N=128, M=4 (default 200)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="results.md and results.png")
    ap.add_argument("--d", type=int, default=128, help="embedding dimension (default 128)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--max-gb", type=float, default=None, help="skip what needs more (CPU 8, CUDA 80%% of free)")
    ap.add_argument("--slow-s", type=float, default=10.0, help="a slower warm-up caps that method at 3 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="seconds per memory subprocess")
    worker_args = ap.add_argument_group("internal: one memory measurement in this process")
    worker_args.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker_args.add_argument("--mode", choices=("per-anchor", "in-batch"), help=argparse.SUPPRESS)
    worker_args.add_argument("--n", type=int, help=argparse.SUPPRESS)
    worker_args.add_argument("--m", type=int, help=argparse.SUPPRESS)
    worker_args.add_argument("--option", choices=(*OPTIONS, *PA_OPTIONS), help=argparse.SUPPRESS)
    worker_args.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    worker_args.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.many < 1:
        ap.error("--repeats and --many must be >= 1")
    if unknown := [m for m in args.methods if m not in METHODS]:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    if args.max_gb is not None:
        max_bytes = args.max_gb * 1e9
    elif device.type == "cuda":
        max_bytes = 0.8 * torch.cuda.mem_get_info(device)[0]
    else:
        max_bytes = 8e9
    check_methods(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (
        f"{name}, d={args.d}, {args.dtype}, τ={TAU}, median of {args.repeats} interleaved repeats "
        f"({args.many} for the fixed cost at per-anchor N=128, M=4); {library_version()}, torch {torch.__version__}"
    )
    print(title, flush=True)
    configs = args.config or grid(args.quick)
    variants = {"off": ["eager"], "both": ["eager", "compiled"], "only": ["compiled"]}[args.compile]
    tables: dict[str, list[Result]] = {"eager": [], "compiled": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for cfg in configs:
            start = time.perf_counter()
            rows = measure(cfg, args, device, max_bytes, variant == "compiled")
            tables[variant] += rows
            summary = ", ".join(f"{r.method} {'-' if r.time is None else f'{r.time * 1e3:.2f}'} ms" for r in rows)
            print(f"[{time.perf_counter() - start:6.1f} s] {variant} {cfg.label}: {summary}", flush=True)
            for r in rows:
                if r.error:
                    print(f"    {r.method}: {r.note}", flush=True)
            (args.out / "results.md").write_text(report(tables, title))  # so far, in case the run is cut short

    text = report(tables, title)
    print("\n" + text.split("\n", 3)[3], flush=True)
    (args.out / "results.md").write_text(text)
    plot(tables, args.out / "results.png", title)
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
