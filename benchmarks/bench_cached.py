"""Peak memory and time per step of ``pt.cached_step`` against plain full-batch training, on a transformer encoder.

Command (repository root, virtual environment active)::

    python benchmarks/bench_cached.py --threads 1      # the default cases below; some 20 minutes on a busy 2-core box
    python benchmarks/bench_cached.py --quick          # tiny sizes, a smoke test
    python benchmarks/bench_cached.py --n 128 --dropout 0.1 --dropout 0   # N x dropout; also --m, --d, --layers,
        # --seq, --mini-batch-size, --repeats, --threads, --max-gb (memory cap of one step), --out DIR

The encoder: token embedding (vocabulary 1000), ``nn.TransformerEncoder`` of ``--layers`` layers
``nn.TransformerEncoderLayer(d, 4 heads, feed-forward 4d, dropout, batch_first=True)``, mean over the ``--seq``
tokens: ids ``[B, L]`` -> ``[B, d]``, in ``train()`` mode, float32, CPU. A step sees N anchors, N positives and
N*M negatives (``N * (2 + M)`` sequences) of random token ids, and InfoNCE at temperature 0.07 with each anchor's
own negatives. The two methods compute one step's gradient:

* ``full batch`` -- the plain step: ``pt.infonce(encoder(anchors), encoder(positives), encoder(negatives))`` with
  the whole graph alive, then ``backward()``.
* ``cached_step`` -- ``pt.cached_step(encoder, anchors, positives, negatives, mini_batch_size=...)``: two passes,
  one mini-batch's graph alive at a time.

Default cases (d = 256, 4 layers, sequences of 64 tokens, M = 16, mini-batch 32): N = 64 with dropout 0.1 and with
dropout 0, and N = 256 with dropout 0.1. The full batch of N = 256 (4608 sequences) needs some 33 GB, over the
default cap: it is reported as skipped -- which is what ``cached_step`` is for. Dropout matters to the time: on a
CPU, drawing its masks (``bernoulli_``) costs about as much as this encoder's matrix products, and the second pass
draws them again, so the extra forward pass costs more than a third of a plain step.

Before anything is measured the two methods are checked to give the same gradients (float64, ``eval()``, a small
batch, a mini-batch size that does not divide it).

Each measurement is one step in a fresh subprocess (``--worker``; ``--repeats`` rounds, the methods alternating):
it builds the encoder and the batch, runs a warm-up step on 4 anchors (thread pools, the parameters' ``.grad``),
returns freed heap memory (``malloc_trim``), resets the peak resident set size (``/proc/self/clear_refs``), reads
the resident set size, runs the full-size step and reports its wall time, its CPU time (``time.process_time``,
user + system: on a shared machine the wall time also counts other processes' turns) and the new peak (``VmHWM``)
minus that level -- what a step needs on top of the parameters, their gradients and the inputs, as the process
really holds it (glibc's default allocator, which keeps some freed memory: the figure is an upper bound of the
live tensors). The address space may grow by at most ``--max-gb`` during the step (``RLIMIT_AS``); a step that
needs more fails and is reported as skipped. Reported: the median times and the largest peak over the rounds, and
their ratios to the full batch's of the same case. Targets, at each case where both methods ran: peak memory
<= 1/4 and time <= 1.5x the full batch's. The table goes to stdout and to ``<out>/cached.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bench_loss import (  # the memory probes, one copy
    malloc_trim,
    peak_rss_bytes,
    reset_high_water_mark,
    rss_bytes,
    vm_bytes,
)
from torch import nn

import pml_triplets as pt

TAU = 0.07
VOCAB = 1000
METHODS = ("full batch", "cached_step")
MB = 1e6


@dataclass(frozen=True)
class Case:
    n: int
    m: int
    d: int
    layers: int
    seq: int
    mini_batch_size: int
    dropout: float

    @property
    def sequences(self) -> int:
        return self.n * (2 + self.m)


BASE = Case(n=64, m=16, d=256, layers=4, seq=64, mini_batch_size=32, dropout=0.1)
DEFAULT_CASES = (BASE, replace(BASE, dropout=0.0), replace(BASE, n=256))
QUICK = Case(n=16, m=2, d=32, layers=1, seq=8, mini_batch_size=4, dropout=0.1)


class Encoder(nn.Module):
    """Token embedding, a transformer encoder, mean pooling: ids [B, L] -> embeddings [B, d]."""

    def __init__(self, d: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(self.tokens(ids))  # (B, L, d)
        return out.mean(dim=1)  # (B, d)


def make_batch(c: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids: anchors [N, L], positives [N, L], negatives [N, M, L]."""
    g = torch.Generator().manual_seed(seed)
    a, p = (torch.randint(0, VOCAB, (c.n, c.seq), generator=g) for _ in range(2))
    return a, p, torch.randint(0, VOCAB, (c.n, c.m, c.seq), generator=g)


def full_step(encoder: nn.Module, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, mini_batch_size: int) -> float:
    """The plain step: every embedding with its graph, the loss, one backward."""
    emb_n = encoder(n.flatten(0, 1)).unflatten(0, n.shape[:2])  # (N*M, d) -> (N, M, d)
    loss = pt.infonce(encoder(a), encoder(p), emb_n, temperature=TAU)
    loss.backward()
    return float(loss.detach())


def cached_step(encoder: nn.Module, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, mini_batch_size: int) -> float:
    return float(pt.cached_step(encoder, a, p, n, mini_batch_size=mini_batch_size, temperature=TAU))


STEPS = {"full batch": full_step, "cached_step": cached_step}


def check() -> None:
    """Both methods give the same gradients: float64, eval() (no dropout), a small batch, a non-dividing size."""
    small = Case(n=6, m=2, d=16, layers=1, seq=5, mini_batch_size=4, dropout=0.1)
    a, p, n = make_batch(small, seed=1)
    grads = []
    for method in METHODS:
        torch.manual_seed(0)
        encoder = Encoder(small.d, small.layers, small.dropout).double().eval()
        STEPS[method](encoder, a, p, n, small.mini_batch_size)
        grads.append(torch.cat([w.grad.flatten() for w in encoder.parameters() if w.grad is not None]))
    err = float((grads[0] - grads[1]).abs().max())
    if not err <= 1e-9 * float(grads[0].abs().max()):
        raise SystemExit(f"cached_step's gradients differ from the full batch's by {err:.3g}")


# --------------------------------------------------------------------------------------------------- measuring


def worker(args: argparse.Namespace) -> None:
    """Child process: a warm-up step on 4 anchors, then one measured full-size step; prints JSON.

    The address space may grow by at most ``--max-gb`` during the step (``RLIMIT_AS``): a step that needs more
    fails here, reported as ``"over": true``, instead of drawing the machine into the OOM killer.
    """
    c = Case(args.n[0], args.m, args.d, args.layers, args.seq, args.mini_batch_size, args.dropout[0])
    step = STEPS[args.method]
    torch.manual_seed(0)
    encoder = Encoder(c.d, c.layers, c.dropout).train()
    a, p, n = make_batch(c)
    step(encoder, a[:4], p[:4], n[:4], c.mini_batch_size)  # warm-up; allocates the parameters' .grad
    for w in encoder.parameters():
        w.grad.zero_()  # type: ignore[union-attr]
    gc.collect()
    malloc_trim()
    limit = vm_bytes() + int(args.max_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resettable = reset_high_water_mark()
    base = rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        loss = step(encoder, a, p, n, c.mini_batch_size)
    except (RuntimeError, MemoryError):
        print(json.dumps({"over": True}))
        return
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_bytes() - base if resettable else None
    print(json.dumps({"over": False, "wall": wall, "cpu": cpu, "peak": peak, "base": base, "loss": loss}))


def measure(method: str, c: Case, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--n", str(c.n), "--m", str(c.m)]
    cmd += ["--d", str(c.d), "--layers", str(c.layers), "--seq", str(c.seq), "--dropout", str(c.dropout)]
    cmd += ["--mini-batch-size", str(c.mini_batch_size), "--max-gb", str(args.max_gb)]
    cmd += [] if args.threads is None else ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method} worker failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------------- report

Runs = dict[tuple[Case, str], list[dict[str, Any]]]  # (case, method) -> one result per round


def summary(runs: Runs, c: Case, method: str) -> dict[str, float] | None:
    """Median wall and CPU time, largest peak over the rounds; None when the step did not fit under the cap."""
    results = runs[(c, method)]
    if any(r["over"] for r in results):
        return None
    out = {key: statistics.median(r[key] for r in results) for key in ("wall", "cpu")}
    peaks = [r["peak"] for r in results]
    out["peak"] = max(peaks) if None not in peaks else math.nan
    return out


def report(runs: Runs, cases: Sequence[Case], args: argparse.Namespace, threads: int) -> str:
    c0 = cases[0]
    base = max(r["base"] for v in runs.values() for r in v if "base" in r)
    lines = [
        f"d = {c0.d}, {c0.layers} layers, sequences of {c0.seq} tokens, M = {c0.m} negatives per anchor "
        f"(N * (2 + M) sequences per step), mini-batch {c0.mini_batch_size}, float32, CPU, {threads} thread(s); "
        f"{args.repeats} step(s) per method and case (median time, largest peak), each in a fresh process; "
        f"RSS before the step about {base / MB:.0f} MB. Load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs.",
        "",
        "| N | sequences | dropout | method | wall s | wall ×full | CPU s | CPU ×full | peak extra MB | memory ×full |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    targets = []
    for c in cases:
        full = summary(runs, c, "full batch")
        for method in METHODS:
            row = summary(runs, c, method)
            head = f"| {c.n} | {c.sequences} | {c.dropout:g} | {method} |"
            if row is None:
                lines.append(f"{head} skipped: needs over {args.max_gb:g} GB | | | | | |")
                continue
            cells = [f"{row['wall']:.3g}", "", f"{row['cpu']:.3g}", "", f"{row['peak'] / MB:.4g}", ""]
            if full is not None:
                r = {key: row[key] / full[key] for key in ("wall", "cpu", "peak")}
                cells[1], cells[3], cells[5] = f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{r['peak']:.3f}"
                if method == "cached_step":
                    targets.append((c, r))
            lines.append(f"{head} {' | '.join(cells)} |")
    lines += ["", "| target (cached_step / full batch) | case | measured | result |", "|---|---|---:|---|"]
    for c, r in targets:
        for label, key, bound, spec in (
            ("peak memory ≤ 0.25", "peak", 0.25, ".3f"),
            ("time ≤ 1.5 (wall)", "wall", 1.5, ".2f"),
            ("time ≤ 1.5 (CPU)", "cpu", 1.5, ".2f"),
        ):
            verdict = "n/a" if math.isnan(r[key]) else ("PASS" if r[key] <= bound else "FAIL")
            lines.append(f"| {label} | N = {c.n}, dropout {c.dropout:g} | {r[key]:{spec}} | {verdict} |")
    if not targets:
        lines.append("| every target | | n/a | n/a (the full batch never fit) |")
    return "\n".join(lines) + "\n"


def cases_of(args: argparse.Namespace) -> list[Case]:
    """The cases to run: the defaults, or every (--n, --dropout) pair with the other sizes from the options."""
    defaults: tuple[Case, ...]
    if args.quick:
        base, defaults = QUICK, (QUICK,)
    else:
        base, defaults = BASE, DEFAULT_CASES
    sizes = {name: getattr(args, name) for name in ("m", "d", "layers", "seq", "mini_batch_size")}
    base = replace(base, **{k: v for k, v in sizes.items() if v is not None})
    if args.n is None and args.dropout is None:
        return [replace(c, **{k: v for k, v in sizes.items() if v is not None}) for c in defaults]
    return [replace(base, n=n, dropout=p) for n in args.n or [base.n] for p in args.dropout or [base.dropout]]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--n", type=int, action="append", help="anchors; repeatable")
    parser.add_argument("--dropout", type=float, action="append", help="the encoder's dropout; repeatable")
    parser.add_argument("--m", type=int, help=f"negatives per anchor (default {BASE.m})")
    parser.add_argument("--d", type=int, help=f"embedding size (default {BASE.d})")
    parser.add_argument("--layers", type=int, help=f"transformer layers (default {BASE.layers})")
    parser.add_argument("--seq", type=int, help=f"tokens per sequence (default {BASE.seq})")
    parser.add_argument("--mini-batch-size", type=int, help=f"cached_step's (default {BASE.mini_batch_size})")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (full batch, cached_step) processes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--max-gb", type=float, default=12.0, help="memory cap of one step; over it: skipped")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    cases = cases_of(args)
    check()
    runs: Runs = {(c, method): [] for c in cases for method in METHODS}
    for c in cases:
        for r in range(args.repeats):
            for method in METHODS if r % 2 == 0 else METHODS[::-1]:
                result = measure(method, c, args)
                runs[(c, method)].append(result)
                text = "over the memory cap" if result["over"] else f"{result['wall']:.1f} s"
                print(f"N={c.n} dropout={c.dropout:g} round {r + 1}: {method}: {text}", flush=True)
    text = report(runs, cases, args, args.threads or torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cached.md").write_text(text)
    print(text, end="")
    print(f"written to {args.out / 'cached.md'}")


if __name__ == "__main__":
    main()
