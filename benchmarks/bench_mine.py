"""Exact hard-negative mining: ``pt.mine_negatives`` against FAISS exact search and a plain-torch floor.

Command (repository root, virtual environment active)::

    python benchmarks/bench_mine.py                     # Q=20,000 queries, C=200,000 corpus rows, d=64, 2 threads
    python benchmarks/bench_mine.py --quick             # Q=512, C=8,192: a smoke test
    python benchmarks/bench_mine.py --query-chunk 4096 --corpus-chunk 65536   # mine_negatives' tiles, to probe
    python benchmarks/bench_mine.py --repeats 3 --threads 2 --k 16 --q 20000 --c 200000 --d 64 --out DIR

The inputs, the same in every process (seed 0): a corpus ``[C, d]`` of standard normal rows, one positive per
query (``pos [Q]``, uniform over the corpus) and the queries ``corpus[pos] + 0.5 * noise`` ``[Q, d]``, float32.
Every method returns, for each query, the ``k`` corpus rows of highest cosine similarity other than its positive,
highest first -- exact top-k, no window (``range_max=None``), ``range_min=0``:

* ``mine_negatives`` -- ``pt.mine_negatives(queries, corpus, k, positive_ids=pos)`` (its own tiles unless
  ``--query-chunk`` / ``--corpus-chunk`` are given).
* ``faiss`` -- FAISS ``IndexFlatIP`` (exact, blocked inner products, a heap per query): normalized copies of the
  corpus (``faiss.normalize_L2``) added to the index, the normalized queries searched for ``k + 1`` neighbours,
  the positive dropped from each row (or the last neighbour where the positive is not among them).
  ``faiss.omp_set_num_threads(--threads)``.
* ``floor`` -- plain torch, the ``(Q, C)`` score matrix: ``--floor-chunk`` (default 1,024) query rows at a time
  against the whole normalized corpus (the whole matrix would take ``Q * C * 4`` bytes, 16 GB at the default
  size), the positive's column set to ``-inf``, ``topk``.
* ``gemm`` -- the matrix products alone (the same query chunks into one preallocated ``(chunk, C)`` buffer, no
  top-k): the arithmetic any exact search does, a lower bound on its time on this machine.

Each measurement is one fresh process (``--worker``; ``--repeats`` rounds, the order of the methods rotated each
round): it builds the inputs, makes one small warm-up call (thread pools, FAISS's first index), returns freed heap
memory (``malloc_trim``), resets the peak resident set size (``/proc/self/clear_refs``), reads the resident set
size, then makes the full-size call and reports its wall time, its CPU time (``time.process_time``; on a shared
machine the wall time also counts other processes' turns) and the new peak (``VmHWM``) minus that level: the
memory the call needs on top of its inputs (the corpus is ``C * d * 4`` bytes, 51 MB at the default size). The
allocator is glibc's default, as a user runs it (forcing ``mmap`` for large blocks, as ``bench_loss.py`` does for
its memory runs, made every fresh tile fault its pages in and cost ``mine_negatives`` some 10 % more CPU time here);
memory it keeps after a free counts, so the peak is an upper bound of the live tensors. The first round's ids are
saved (``<out>/ids-<method>.pt``) and compared: rows
whose ids differ from the floor's, over all queries and over the first ``--check-queries``.

Before anything is timed, the three methods are checked at a small size (Q=64, C=3,000) against a float64
brute force: the same ids in every row.

Reported (printed, and written to ``<out>/mine.md``): median wall and CPU time, largest peak, their ratios to FAISS
and to the floor; targets: ``mine_negatives`` time <= 1.5x FAISS's (wall and CPU), peak extra memory <= 256 MB,
and ids equal to the floor's on the first ``--check-queries`` queries.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_loss import malloc_trim, peak_rss_bytes, reset_high_water_mark, rss_bytes  # the memory probes, one copy

import pml_triplets as pt

METHODS = ("mine_negatives", "faiss", "floor", "gemm")
MB = 1e6
MEMORY_TARGET_MB = 256.0
TIME_TARGET = 1.5  # x FAISS
NOISE = 0.5


@dataclass(frozen=True)
class Size:
    q: int
    c: int
    d: int
    k: int


DEFAULT = Size(q=20_000, c=200_000, d=64, k=16)
QUICK = Size(q=512, c=8_192, d=32, k=8)


def make_inputs(s: Size, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[Q, d]``, corpus ``[C, d]`` (float32) and each query's positive ``[Q]`` (int64)."""
    g = torch.Generator().manual_seed(seed)
    corpus = torch.randn(s.c, s.d, generator=g)
    pos = torch.randint(0, s.c, (s.q,), generator=g)
    queries = corpus[pos] + NOISE * torch.randn(s.q, s.d, generator=g)
    return queries, corpus, pos


# --------------------------------------------------------------------------------------------------- the methods

Result = tuple[torch.Tensor, torch.Tensor]  # ids [Q, k] int64, scores [Q, k]


def run_mine(
    queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int, args: argparse.Namespace
) -> Result:
    chunks = {"query_chunk": args.query_chunk, "corpus_chunk": args.corpus_chunk}
    mined = pt.mine_negatives(queries, corpus, k, positive_ids=pos, **{n: v for n, v in chunks.items() if v})
    return mined.ids, mined.scores


def run_floor(
    queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int, args: argparse.Namespace
) -> Result:
    q, c = F.normalize(queries, dim=-1), F.normalize(corpus, dim=-1)
    ids, scores = [], []
    for rows in torch.arange(len(q)).split(args.floor_chunk):
        s = q[rows] @ c.T  # (chunk, C)
        s[torch.arange(len(rows)), pos[rows]] = -torch.inf
        top = s.topk(k, dim=1)  # (chunk, k), highest first
        ids.append(top.indices)
        scores.append(top.values)
    return torch.cat(ids), torch.cat(scores)


def run_gemm(
    queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int, args: argparse.Namespace
) -> Result:
    q, c = F.normalize(queries, dim=-1), F.normalize(corpus, dim=-1)
    buf = torch.empty(min(args.floor_chunk, len(q)), len(c))  # (chunk, C)
    for start in range(0, len(q), args.floor_chunk):
        rows = q[start : start + args.floor_chunk]
        torch.mm(rows, c.T, out=buf[: len(rows)])
    empty = torch.empty(len(q), 0)
    return empty.long(), empty


def run_faiss(
    queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int, args: argparse.Namespace
) -> Result:
    import faiss
    import numpy as np

    xb = corpus.numpy().copy()
    xq = queries.numpy().copy()
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    scores, ids = index.search(xq, k + 1)  # (Q, k + 1) each, highest first
    # Drop the positive from each row; where it is not among the k + 1, the last neighbour goes.
    is_pos = ids == pos.numpy()[:, None]
    keep = np.argsort(is_pos, axis=1, kind="stable")[:, :k]  # the non-positive columns, in order
    return (
        torch.from_numpy(np.take_along_axis(ids, keep, 1)).long(),
        torch.from_numpy(np.take_along_axis(scores, keep, 1)),
    )


RUN: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, argparse.Namespace], Result]] = {
    "mine_negatives": run_mine,
    "faiss": run_faiss,
    "floor": run_floor,
    "gemm": run_gemm,
}


def reference(queries: torch.Tensor, corpus: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k ids by a float64 brute force, row by row: the cosine of every pair, the positive left out."""
    q, c = queries.double(), corpus.double()
    out = torch.empty(len(q), k, dtype=torch.long)
    for i in range(len(q)):
        cos = (c @ q[i]) / (c.norm(dim=1) * q[i].norm())  # (C,)
        cos[pos[i]] = -torch.inf
        out[i] = torch.sort(cos, descending=True, stable=True).indices[:k]
    return out


def check(args: argparse.Namespace) -> None:
    """Every method's ids equal the float64 brute force's at a small size (no near-ties among random rows)."""
    small = Size(q=64, c=3_000, d=DEFAULT.d, k=DEFAULT.k)
    queries, corpus, pos = make_inputs(small, seed=1)
    want = reference(queries, corpus, pos, small.k)
    check_args = argparse.Namespace(**{**vars(args), "floor_chunk": 16})  # several chunks
    for method in METHODS:
        if method == "gemm" or (method == "faiss" and not has_faiss()):
            continue
        ids, _ = RUN[method](queries, corpus, pos, small.k, check_args)
        if not torch.equal(ids, want):
            bad = int((ids != want).any(1).sum())
            raise SystemExit(f"{method}: ids differ from the float64 brute force in {bad} of {small.q} rows")


def has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


# --------------------------------------------------------------------------------------------------- measuring


def worker(args: argparse.Namespace) -> None:
    """Child process: the inputs, a small warm-up call, then one measured full-size call; prints JSON."""
    size = Size(args.q, args.c, args.d, args.k)
    if args.method == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    run = RUN[args.method]
    queries, corpus, pos = make_inputs(size)
    run(queries[:64], corpus[:4096], pos[:64] % 4096, size.k, args)  # warm-up
    gc.collect()
    malloc_trim()
    resettable = reset_high_water_mark()
    base = rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    ids, scores = run(queries, corpus, pos, size.k, args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_bytes() - base if resettable else None
    if args.save is not None:
        torch.save({"ids": ids, "scores": scores}, args.save)
    print(json.dumps({"wall": wall, "cpu": cpu, "peak": peak, "base": base}))


def measure(method: str, args: argparse.Namespace, save: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--threads", str(args.threads)]
    cmd += ["--q", str(args.q), "--c", str(args.c), "--d", str(args.d), "--k", str(args.k)]
    cmd += ["--floor-chunk", str(args.floor_chunk)]
    cmd += ["--query-chunk", str(args.query_chunk)] if args.query_chunk else []
    cmd += ["--corpus-chunk", str(args.corpus_chunk)] if args.corpus_chunk else []
    cmd += ["--save", str(save)] if save is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{method} worker failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------------- report


def agreement(out: Path, methods: Sequence[str], first: int) -> dict[str, tuple[int, int, float]]:
    """For each method but the floor: (rows whose ids differ from the floor's, of them within the first ``first``
    queries, the largest gap between the two rows' k-th scores among differing rows)."""
    floor = torch.load(out / "ids-floor.pt")
    found = {}
    for method in methods:
        if method in ("floor", "gemm"):
            continue
        got = torch.load(out / f"ids-{method}.pt")
        differ = (got["ids"] != floor["ids"]).any(1)  # (Q,)
        gap = (got["scores"][differ].float() - floor["scores"][differ].float()).abs()
        found[method] = (int(differ.sum()), int(differ[:first].sum()), float(gap.max()) if len(gap) else 0.0)
    return found


def commit_of(path: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), "log", "-1", "--format=%h"], capture_output=True, text=True, check=False
    )
    status = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = " (with uncommitted changes)" if status.stdout.strip() else ""
    return (done.stdout.strip() or "unknown") + dirty


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, argv: Sequence[str]) -> str:
    here = Path(__file__).resolve().parent
    package = Path(pt.__file__).resolve().parent
    s = Size(args.q, args.c, args.d, args.k)
    summary = {
        m: {
            "wall": statistics.median(r["wall"] for r in rs),
            "cpu": statistics.median(r["cpu"] for r in rs),
            "peak": max(r["peak"] for r in rs) if all(r["peak"] is not None for r in rs) else float("nan"),
        }
        for m, rs in runs.items()
    }
    base = max(r["base"] for rs in runs.values() for r in rs)
    lines = [
        f"Command: `python benchmarks/bench_mine.py{''.join(' ' + a for a in argv)}`",
        "",
        f"Q = {s.q:,} queries, C = {s.c:,} corpus rows, d = {s.d}, top k = {s.k} (the positive excluded), float32, "
        f"cosine; corpus {s.c * s.d * 4 / MB:.0f} MB. {args.threads} thread(s) (torch and FAISS), "
        f"{os.cpu_count()} CPUs ({cpu_model()}); load average at the end {os.getloadavg()[0]:.1f}. "
        f"{args.repeats} round(s), each method in a fresh process per round (median time, largest peak); RSS with "
        f"the inputs about {base / MB:.0f} MB. Floor: {args.floor_chunk:,} query rows at a time against the whole "
        f"corpus ({min(args.floor_chunk, s.q) * s.c * 4 / MB:,.0f} MB of scores per chunk; the whole matrix would "
        f"be {s.q * s.c * 4 / MB:,.0f} MB). mine_negatives tiles: "
        f"{'query_chunk=' + str(args.query_chunk) if args.query_chunk else 'its default query_chunk'}, "
        f"{'corpus_chunk=' + str(args.corpus_chunk) if args.corpus_chunk else 'its default corpus_chunk'}.",
        "",
        f"pml_triplets at {commit_of(package)} ({package}); this script at {commit_of(here)}; torch "
        f"{torch.__version__}" + (f", faiss {_faiss_version()}" if "faiss" in runs else "") + ".",
        "",
        "| method | wall s | wall ×faiss | wall ×floor | CPU s | CPU ×faiss | peak extra MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(m: str, key: str, to: str) -> str:
        return f"{summary[m][key] / summary[to][key]:.2f}" if to in summary else ""

    for m in runs:
        r = summary[m]
        lines.append(
            f"| {m} | {r['wall']:.2f} | {ratio(m, 'wall', 'faiss')} | {ratio(m, 'wall', 'floor')} | {r['cpu']:.2f} | "
            f"{ratio(m, 'cpu', 'faiss')} | {r['peak'] / MB:.1f} |"
        )
    first = min(args.check_queries, s.q)
    agree = agreement(args.out, list(runs), first) if "floor" in runs else {}
    lines += ["", "| method | rows with other ids than the floor's | of the first " + f"{first:,} | largest gap |"]
    lines += ["|---|---:|---:|---:|"]
    for m, (rows, in_first, gap) in agree.items():
        lines.append(f"| {m} | {rows:,} of {s.q:,} | {in_first} | {gap:.2g} |")
    lines += ["", "| target (mine_negatives) | measured | result |", "|---|---:|---|"]
    mine = summary.get("mine_negatives")
    if mine is not None and "faiss" in summary:
        for key in ("wall", "cpu"):
            r = mine[key] / summary["faiss"][key]
            lines.append(f"| time ≤ {TIME_TARGET}× FAISS ({key}) | {r:.2f} | {verdict(r <= TIME_TARGET)} |")
    if mine is not None:
        mb = mine["peak"] / MB
        lines.append(
            f"| peak extra memory ≤ {MEMORY_TARGET_MB:.0f} MB | {mb:.1f} | {verdict(mb <= MEMORY_TARGET_MB)} |"
        )
    if "mine_negatives" in agree:
        bad = agree["mine_negatives"][1]
        lines.append(f"| ids equal to the floor's, first {first:,} queries | {bad} rows differ | {verdict(not bad)} |")
    return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _faiss_version() -> str:
    import faiss

    return str(faiss.__version__)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"Q={QUICK.q}, C={QUICK.c}, d={QUICK.d}, k={QUICK.k}")
    parser.add_argument("--q", type=int, help=f"queries (default {DEFAULT.q})")
    parser.add_argument("--c", type=int, help=f"corpus rows (default {DEFAULT.c})")
    parser.add_argument("--d", type=int, help=f"embedding size (default {DEFAULT.d})")
    parser.add_argument("--k", type=int, help=f"negatives per query (default {DEFAULT.k})")
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of " + ",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds, one process per method each")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--floor-chunk", type=int, default=1024, help="query rows per score matrix of the floor")
    parser.add_argument("--query-chunk", type=int, default=None, help="mine_negatives' query_chunk (default: its own)")
    parser.add_argument("--corpus-chunk", type=int, default=None, help="mine_negatives' corpus_chunk")
    parser.add_argument("--check-queries", type=int, default=1000, help="first queries to equal the floor's")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    for name in ("q", "c", "d", "k"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(base, name))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    if "faiss" in methods and not has_faiss():
        print("faiss is not installed (pip install faiss-cpu): its row is left out", file=sys.stderr)
        methods.remove("faiss")
    check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for i in range(len(methods)):
            m = methods[(i + r) % len(methods)]
            save = args.out / f"ids-{m}.pt" if r == 0 else None
            result = measure(m, args, save)
            runs[m].append(result)
            print(f"round {r + 1}: {m}: {result['wall']:.2f} s wall, peak {result['peak'] / MB:.1f} MB", flush=True)
    text = report(runs, args, argv)
    (args.out / "mine.md").write_text(text)
    print(text, end="")
    print(f"written to {args.out / 'mine.md'}")


if __name__ == "__main__":
    main()
