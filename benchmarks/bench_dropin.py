"""Forward+backward time and peak memory of ``pml_triplets.NTXentLoss`` against PML's ``NTXentLoss``, same call.

Command (repository root, virtual environment active)::

    python benchmarks/bench_dropin.py                        # the article's call, N=512, M=32; labels B=512, 2048
    python benchmarks/bench_dropin.py --threads 1            # a shared CPU: no OpenMP waits for a busy core
    python benchmarks/bench_dropin.py --quick --repeats 1    # tiny sizes, a smoke test (tests/test_ntxent.py)

Both methods are built with the same arguments (``temperature=0.07``, PML's defaults otherwise: cosine similarity,
``MeanReducer``) and called the same way, on the same inputs (d=128, float32; the embeddings are a leaf with
``requires_grad``):

* ``article (.repeat)`` -- the call exactly as the article writes it: ``NTXentLoss()(embeddings, indices_tuple=(a,
  p, n))`` with ``embeddings = cat([anchors, positives, negatives.reshape(-1, d)])`` ([2N + N*M, d]), ``a =
  arange(N).repeat(M)``, ``p = arange(N, 2N).repeat(M)``, ``n = arange(2N, 2N + N*M)``. P = Q = N*M pairs.
  ``pml_triplets`` warns about this layout (silenced here) and computes the tuple as given, like PML.
* ``labels`` -- ``NTXentLoss()(embeddings, labels)``, B embeddings, 4 per class: every pair of the batch,
  P = 3B positive and Q = B(B - 4) negative pairs.

Columns (printed, and written to ``--out``):

* ``time ms`` -- median wall time of one forward+backward over ``--repeats`` repeats after one warm-up; the two
  methods interleaved, so load from other processes falls on both alike.
* ``peak MB`` -- peak memory above the level once the inputs exist, measured as ``bench_loss.py`` measures it
  (its helpers are imported): each (case, method) in a fresh subprocess that warms up, returns freed heap memory,
  resets the high-water mark (``/proc/self/clear_refs``), runs the call and reports ``VmHWM`` minus the resident
  set before it, with ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB. It includes the gradient.
* ``time ×``, ``mem ×`` -- PML's figure divided by ``pml_triplets``'; on ``pml_triplets``' row.
* ``Δloss (abs)``, ``Δgrad (max abs)`` -- between the two methods' outputs on the same inputs (float32).
* ``note`` -- PML is skipped where its predicted peak, ``itemsize * (2*B*R + 4.5*P*Q)`` (its B x R distance matrix
  and gradient, and its P x Q pair tensors; measured 4.3 P*Q at labels B=256), exceeds ``--max-gb`` (default 8), or
  where its memory subprocess runs out of that much address space.

Targets printed at the end: on the article's call, ``pml_triplets`` >= 100x faster and >= 20x less peak memory than
PML (at N=512, M=32 only: ``--quick`` sizes report n/a); on labels, the same loss as PML wherever PML ran
(``|Δloss| <= 1e-5 * max(1, |loss|)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from bench_loss import library_version, peak_report, vm_bytes
from pytorch_metric_learning import losses

import pml_triplets as pt

TAU = 0.07
PER_CLASS = 4
METHODS = ("PML", "pml_triplets")
PML_PQ_FACTOR = 4.5  # P x Q tensors alive at PML's peak (measured 4.3 at labels B=256, float32)
Kind = Literal["article", "labels"]
Inputs = tuple[torch.Tensor, dict[str, Any]]


@dataclass(frozen=True)
class Case:
    kind: Kind
    n: int  # N anchors (article) or B embeddings (labels)
    m: int = 0  # M negatives per anchor (article)

    @property
    def label(self) -> str:
        return "article (.repeat)" if self.kind == "article" else "labels"

    @property
    def size(self) -> str:
        return f"N={self.n}, M={self.m}" if self.kind == "article" else f"B={self.n}"

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.n}:{self.m}"

    def shape(self) -> tuple[int, int, int]:
        """Embedding rows (= ref_emb rows), positive pairs P and negative pairs Q."""
        if self.kind == "article":
            return self.n * (self.m + 2), self.n * self.m, self.n * self.m
        b = self.n
        return b, b * (PER_CLASS - 1), b * (b - PER_CLASS)


@dataclass
class Result:
    case: Case
    method: str
    times: list[float] = field(default_factory=list)  # seconds
    peak: float | None = None  # bytes
    note: str = ""
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None

    @property
    def time(self) -> float | None:
        return statistics.median(self.times) if self.times else None


TARGET = Case("article", 512, 32)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("article", 16, 4), Case("labels", 64)]
    return [TARGET, Case("labels", 512), Case("labels", 2048)]


def parse_case(text: str) -> Case:
    kind, n, m = text.split(":")
    if kind not in ("article", "labels"):
        raise argparse.ArgumentTypeError(f"expected article:N:M or labels:B:0; got {text!r}")
    return Case(kind, int(n), int(m))  # type: ignore[arg-type]


def make_inputs(case: Case, d: int, seed: int = 0) -> Inputs:
    """The embeddings (a leaf) and the call's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    if case.kind == "labels":
        emb = torch.randn(case.n, d, generator=g).requires_grad_()
        return emb, {"labels": torch.arange(case.n) // PER_CLASS}
    n, m = case.n, case.m
    anchors, positives, negatives = (
        torch.randn(n, d, generator=g),
        torch.randn(n, d, generator=g),
        torch.randn(n, m, d, generator=g),
    )
    emb = torch.cat([anchors, positives, negatives.reshape(-1, d)], dim=0).requires_grad_()  # (2N + N*M, d)
    a = torch.arange(0, n).repeat(m)  # the article's indices, as printed
    p = torch.arange(n, n * 2).repeat(m)
    neg = torch.arange(n * 2, n * 2 + n * m)
    return emb, {"indices_tuple": (a, p, neg)}


def make_loss(method: str) -> torch.nn.Module:
    cls = losses.NTXentLoss if method == "PML" else pt.NTXentLoss
    loss: torch.nn.Module = cls(temperature=TAU)
    return loss


def pml_bytes(case: Case, itemsize: int) -> float:
    rows, p, q = case.shape()
    return float(itemsize * (2 * rows * rows + PML_PQ_FACTOR * p * q))


def call(fn: torch.nn.Module, inputs: Inputs) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds for one forward+backward into a cleared ``.grad``; the loss and the gradient."""
    emb, kwargs = inputs
    emb.grad = None
    start = time.perf_counter()
    loss = fn(emb, **kwargs)
    loss.backward()
    seconds = time.perf_counter() - start
    assert emb.grad is not None
    return seconds, loss.detach(), emb.grad


# ------------------------------------------------------------------------------------------------------ memory


def worker(args: argparse.Namespace) -> None:
    """Child process: peak extra RSS of one method on one case, printed as JSON (as bench_loss.worker)."""
    fn, inputs = make_loss(args.method), make_inputs(args.case, args.d)
    limit = vm_bytes() + int(args.max_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps(peak_report(lambda: call(fn, inputs), inputs[:1], 1)))


def cpu_peak(case: Case, method: str, args: argparse.Namespace) -> tuple[float | None, str]:
    cmd = [sys.executable, __file__, "--worker", "--case", case.spec, "--method", method, "--d", str(args.d)]
    cmd += ["--max-gb", str(args.max_gb)] + ([] if args.threads is None else ["--threads", str(args.threads)])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return None, f"memory worker failed: {last[:80]}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["over"]:
        return None, f"skipped (needs over {args.max_gb:g} GB)"
    return float(report["peak"]), "" if report["warm"] else "memory without warm-up"


# ----------------------------------------------------------------------------------------------------- measuring


def measure(case: Case, args: argparse.Namespace) -> list[Result]:
    results = {m: Result(case, m) for m in METHODS}
    need = pml_bytes(case, 4)
    if need > args.max_gb * 1e9:
        results["PML"].note = f"skipped (would need ~{need / 1e9:.3g} GB)"
    active = [m for m in METHODS if not results[m].note]
    for method in active if args.memory else []:
        results[method].peak, results[method].note = cpu_peak(case, method, args)
    active = [m for m in active if not results[m].note.startswith("skipped")]
    inputs = make_inputs(case, args.d)
    fns = {m: make_loss(m) for m in active}
    for method in active:  # warm-up; its loss and gradient are compared
        _, results[method].loss, grad = call(fns[method], inputs)
        results[method].grad = grad.clone()
    for r in range(args.repeats):  # interleaved, each repeat in a rotated order
        for method in active[r % len(active) :] + active[: r % len(active)]:
            results[method].times.append(call(fns[method], inputs)[0])
    return [results[m] for m in METHODS]


def differences(rows: list[Result]) -> tuple[float, float] | None:
    pml, ours = rows
    if pml.loss is None or ours.loss is None or pml.grad is None or ours.grad is None:
        return None
    return abs(float(pml.loss) - float(ours.loss)), float((pml.grad - ours.grad).abs().max())


# ------------------------------------------------------------------------------------------------------ reporting


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def fmt_ratio(value: float | None) -> str:
    return fmt(value, ".0f" if value is not None and value >= 100 else ".3g")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(rows: list[Result]) -> str:
    lines = [
        "| case | size | method | time ms | peak MB | time × | mem × | loss | Δloss (abs) | Δgrad (max abs) | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i in range(0, len(rows), 2):
        pml, ours = rows[i], rows[i + 1]
        diff = differences([pml, ours])
        for r in (pml, ours):
            mine = r is ours
            cells = [
                r.case.label,
                r.case.size,
                r.method,
                fmt(None if r.time is None else r.time * 1e3, ".1f"),
                fmt(None if r.peak is None else r.peak / 1e6, ".1f"),
                fmt_ratio(ratio(pml.time, ours.time) if mine else None),
                fmt_ratio(ratio(pml.peak, ours.peak) if mine else None),
                fmt(None if r.loss is None else float(r.loss), ".6f"),
                fmt(diff[0] if diff and mine else None, ".1e"),
                fmt(diff[1] if diff and mine else None, ".1e"),
                r.note,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[Result]) -> str:
    lines = ["| target | measured | result |", "|---|---:|---|"]
    for i in range(0, len(rows), 2):
        pml, ours = rows[i], rows[i + 1]
        case = pml.case
        if case.kind == "article":
            for what, value, want in (
                ("time", ratio(pml.time, ours.time), 100.0),
                ("peak memory", ratio(pml.peak, ours.peak), 20.0),
            ):
                verdict = "n/a" if value is None else "PASS" if value >= want else "FAIL"
                if case != TARGET:
                    verdict = f"n/a (targets are for {TARGET.size})"
                lines.append(f"| article {case.size}: {what} PML / ours >= {want:g} | {fmt_ratio(value)} | {verdict} |")
        else:
            diff = differences([pml, ours])
            ok = diff is not None and ours.loss is not None and diff[0] <= 1e-5 * max(1.0, abs(float(ours.loss)))
            verdict = "n/a (PML skipped)" if diff is None else "PASS" if ok else "FAIL"
            measured = "" if diff is None else f"{diff[0]:.1e}"
            lines.append(f"| labels {case.size}: same loss as PML | {measured} | {verdict} |")
    return "\n".join(lines)


def report(rows: list[Result], title: str) -> str:
    return f"# bench_dropin results\n\n{title}\n\n{table(rows)}\n\n## Targets\n\n{targets(rows)}\n"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--case", type=parse_case, action="append", help="article:N:M or labels:B:0 (repeatable)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method (default 3)")
    ap.add_argument("--d", type=int, default=128, help="embedding dimension (default 128)")
    ap.add_argument("--max-gb", type=float, default=8.0, help="skip PML where it needs more (default 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="time only")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="seconds per memory subprocess")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "dropin.md", help="the report")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.worker:
        args.case = args.case[0]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore", category=pt.RepeatLayoutWarning)  # the article's call, measured as written
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    title = (
        f"CPU, {torch.get_num_threads()} threads, d={args.d}, float32, τ={TAU}, median of {args.repeats} interleaved "
        f"repeats after one warm-up; {library_version()}, torch {torch.__version__}"
    )
    print(title, flush=True)
    rows: list[Result] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case in args.case or cases(args.quick):
        start = time.perf_counter()
        rows += measure(case, args)
        summary = ", ".join(
            f"{r.method} {fmt(None if r.time is None else r.time * 1e3, '.1f') or '-'} ms" for r in rows[-2:]
        )
        print(f"[{time.perf_counter() - start:6.1f} s] {case.label} {case.size}: {summary}", flush=True)
        args.out.write_text(report(rows, title))  # so far, in case the run is cut short
    text = report(rows, title)
    print("\n" + text.split("\n", 3)[3], flush=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
