"""Where ``pt.mine_negatives``' time goes: its tiles, the top-k, and the tie check, against FAISS, in one process.

Command (repository root, virtual environment active, faiss-cpu installed)::

    python benchmarks/probe_mine.py [--q 2048] [--threads 2] [--repeats 3]

The first ``--q`` queries of ``bench_mine.py``'s inputs (its corpus of 200,000 rows, d = 64, top 16 but the
positive) -- a tenth of its run at the default -- searched by each row below, every row once per repeat, the order
reversed every other repeat (load from other processes falls on all alike); median wall and CPU time:

* ``faiss`` -- ``IndexFlatIP`` of the normalized corpus, searched for 17 neighbours (as ``bench_mine.py``);
* ``mine_negatives QxC`` -- ``pt.mine_negatives(..., query_chunk=Q, corpus_chunk=C)`` (``defaults``: its own);
* ``plain QxC, ...`` -- a running top-k written here in plain torch: each tile's scores, ``topk(17)``, merged into
  the running list by a stable sort; ``full tie pass`` adds one more pass over each tile,
  ``(s >= kth).sum(1) > k`` (does any value tie the k-th?), ``k+1 tie check`` answers the same question from the
  17th column of the top-k (a tie at the cut exists exactly when the (k+1)-th value equals the k-th);
* ``gemm QxC`` -- the tiles' matrix products alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import pml_triplets as pt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mine

K = 16


def plain(qn: torch.Tensor, cn: torch.Tensor, qc: int, cc: int, tie: str) -> Callable[[], None]:
    def run() -> None:
        for q0 in range(0, len(qn), qc):
            rows = qn[q0 : q0 + qc]
            best_v, best_i = rows.new_empty(len(rows), 0), torch.empty(len(rows), 0, dtype=torch.long)
            for c0 in range(0, len(cn), cc):
                s = rows @ cn[c0 : c0 + cc].T  # (qc, cc)
                v, i = s.topk(K + 1, dim=1)  # (qc, K + 1)
                if tie == "full":
                    (s >= v[:, K - 1 : K]).sum(1)
                elif tie == "k+1":
                    bool((v[:, K - 1] == v[:, K]).any())
                best_v, order = torch.cat([best_v, v[:, :K]], 1).sort(dim=1, descending=True, stable=True)
                best_i = torch.cat([best_i, i[:, :K] + c0], 1).gather(1, order)
                best_v, best_i = best_v[:, :K], best_i[:, :K]

    return run


def gemm(qn: torch.Tensor, cn: torch.Tensor, qc: int, cc: int) -> Callable[[], None]:
    def run() -> None:
        for q0 in range(0, len(qn), qc):
            for c0 in range(0, len(cn), cc):
                qn[q0 : q0 + qc] @ cn[c0 : c0 + cc].T  # (qc, cc)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--q", type=int, default=2048, help="queries (of bench_mine.py's 20,000)")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every row")
    args = parser.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries, corpus, pos = bench_mine.make_inputs(bench_mine.DEFAULT)
    q, pos = queries[: args.q], pos[: args.q]
    qn, cn = F.normalize(q, dim=-1), F.normalize(corpus, dim=-1)

    def search() -> None:
        xb, xq = corpus.numpy().copy(), q.numpy().copy()
        faiss.normalize_L2(xb)
        faiss.normalize_L2(xq)
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        index.search(xq, K + 1)

    def mine(qc: int | None, cc: int | None) -> Callable[[], None]:
        chunks = {"query_chunk": qc, "corpus_chunk": cc} if qc else {}

        def run() -> None:
            pt.mine_negatives(q, corpus, K, positive_ids=pos, **chunks)

        return run

    rows: dict[str, Callable[[], None]] = {
        "faiss": search,
        "mine_negatives defaults": mine(None, None),
        "mine_negatives 1024x16384": mine(1024, 16384),
        "mine_negatives 2048x65536": mine(2048, 65536),
        "plain 1024x4096, full tie pass": plain(qn, cn, 1024, 4096, "full"),
        "plain 1024x4096, k+1 tie check": plain(qn, cn, 1024, 4096, "k+1"),
        "plain 1024x16384, k+1 tie check": plain(qn, cn, 1024, 16384, "k+1"),
        "plain 2048x65536, k+1 tie check": plain(qn, cn, 2048, 65536, "k+1"),
        "gemm 1024x16384": gemm(qn, cn, 1024, 16384),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for run in rows.values():
        run()  # warm-up
    for r in range(args.repeats):
        for name, run in list(rows.items())[:: 1 if r % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"Q = {args.q:,} queries, C = {len(corpus):,}, d = {corpus.shape[1]}, k = {K}, {args.threads} thread(s)")
    print("\n| row | wall s | wall ×faiss | CPU s | CPU ×faiss |\n|---|---:|---:|---:|---:|")
    med = {n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()}
    for name, (wall, cpu) in med.items():
        print(f"| {name} | {wall:.2f} | {wall / med['faiss'][0]:.2f} | {cpu:.2f} | {cpu / med['faiss'][1]:.2f} |")


if __name__ == "__main__":
    main()
