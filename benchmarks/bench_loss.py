"""Forward+backward time and peak extra memory of InfoNCE on predefined triplets, against a plain-torch floor.

Command (repository root, virtual environment active)::

    python benchmarks/bench_loss.py                       # default CPU grid, several minutes
    python benchmarks/bench_loss.py --threads 1           # a shared CPU: no OpenMP waits for a busy core
    python benchmarks/bench_loss.py --quick --repeats 1   # tiny grid, a smoke test
    python benchmarks/bench_loss.py --device cuda --dtype float32 --d 128 --repeats 7 --out benchmarks/out

Each configuration draws anchors (N, d), positives (N, d) and negatives (N, M, d) as leaf tensors with
``requires_grad``, at temperature 0.07. ``per-anchor``: anchor i's negatives are its own M; ``in-batch``: also every
other row's positive and negatives (``pt.infonce(..., in_batch=True)``). Methods, all computing the same loss
(checked against ``pt.reference_infonce`` at a small size before anything is timed):

* ``floor`` -- the formula in plain torch, written below (:func:`floor_loss`): the speed and memory to beat.
* ``pml_triplets`` -- ``pt.infonce(a, p, n)``, automatic engine; ``pml_triplets[pml]`` with ``engine="pml"``.
* ``recipe`` -- the article's recipe with its ordering fixed: ``NTXentLoss(temperature=0.07)(
  pt.concat_embeddings(a, p, n), indices_tuple=pt.build_indices(N, M))``, O(N²M²). In-batch: the same
  concatenation with a 4-tuple listing every (anchor, candidate) pair. Skipped when predicted to need more than
  ``--max-gb``.
* ``info-nce-pytorch`` -- ``info_nce.InfoNCE(temperature=0.07, negative_mode="paired")(a, p, n)``; per-anchor only
  (its unpaired/in-batch modes are a different loss).

Columns of the table (printed, and written to ``<out>/results.md``; ``<out>/results.png`` plots the time ratios):

* ``time ms`` -- median wall time of one forward+backward (loss, then ``loss.backward()`` into the inputs'
  ``.grad``), over ``--repeats`` repeats after one warm-up; methods are interleaved, each repeat in a rotated order,
  so load from other processes falls on all of them alike. A method whose warm-up takes over ``--slow-s`` seconds
  gets at most 3 repeats.
* ``time ×floor`` -- that median divided by the floor's median in the same configuration of the same run.
* ``peak MB`` -- peak memory above the level once the inputs exist. CUDA: ``torch.cuda.max_memory_allocated``
  minus ``memory_allocated`` before the call. CPU: each (configuration, method) in a fresh subprocess
  (``--worker``), which builds the inputs, runs one warm-up call, returns freed heap memory (``malloc_trim``),
  resets the high-water mark (``/proc/self/clear_refs``), reads the resident set size from ``/proc/self/statm``,
  runs the call and reports the new high-water mark (``VmHWM``; not ``ru_maxrss``, which keeps the parent's) minus
  that. glibc is told to serve allocations of 64 KiB and more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so that
  freed blocks leave the resident set at once: the figure is close to the live tensors' peak, not to what a caching
  allocator keeps. It includes the inputs' gradients. The subprocess runs first, with its address space capped at
  ``--max-gb`` above the inputs: a method that needs more is reported as skipped and not timed.
* ``mem ×floor`` -- peak MB divided by the floor's.
* ``note`` -- why a cell is empty (skipped, not applicable, failed).

The targets printed at the end (pass/fail) compare ``pml_triplets`` (automatic engine) with the floor and the
recipe: per-anchor time ratio, geometric mean over the per-anchor grid <= 1.5 and worst <= 2.0; in-batch time ratio
<= 3.0 at N=1024, M=8; peak memory <= 1.5x the floor's at N=4096, M=32; >= 50x faster than the recipe at N=512,
M=32. A target whose configuration is not in the grid (``--quick``) reads "n/a".
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
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt

try:
    from info_nce import InfoNCE as INCE
except ImportError:  # an optional comparison (the `dev` extra)
    INCE = None

TAU = 0.07
Mode = Literal["per-anchor", "in-batch"]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
METHODS = ("floor", "pml_triplets", "pml_triplets[pml]", "recipe", "info-nce-pytorch")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
MB = 1e6


@dataclass(frozen=True)
class Config:
    mode: Mode
    n: int
    m: int

    @property
    def label(self) -> str:
        return f"{'pa' if self.mode == 'per-anchor' else 'ib'} N={self.n} M={self.m}"


@dataclass
class Result:
    config: Config
    method: str
    times: list[float] = field(default_factory=list)  # seconds
    peak: float | None = None  # bytes
    note: str = ""

    @property
    def time(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def grid(quick: bool) -> list[Config]:
    if quick:
        per_anchor, in_batch = [(64, 4)], [(32, 4)]
    else:
        per_anchor = [(n, m) for n in (512, 2048, 4096) for m in (4, 8, 32, 64)]
        in_batch = [(256, 8), (1024, 8), (2048, 8)]
    return [Config("per-anchor", n, m) for n, m in per_anchor] + [Config("in-batch", n, m) for n, m in in_batch]


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


def in_batch_pairs(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """4-tuple over ``concat_embeddings``'s rows: anchor i with its positive, and with every candidate but it."""
    rows = torch.arange(n, device=device)
    refs = n + torch.arange(n * (m + 1), device=device)  # every positive, then every negative
    cand = refs.expand(n, -1)[refs[None, :] != (n + rows)[:, None]]  # (N * (N + N*M - 1),), row-major
    return rows, n + rows, rows.repeat_interleave(n * (m + 1) - 1), cand


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


def methods(mode: Mode) -> dict[str, LossFn | None]:
    """Each method's loss for ``mode``; ``None`` where the method does not compute this loss."""
    ib = mode == "in-batch"
    return {
        "floor": lambda a, p, n: floor_loss(a, p, n, ib),
        "pml_triplets": lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, in_batch=ib),
        "pml_triplets[pml]": lambda a, p, n: pt.infonce(a, p, n, temperature=TAU, in_batch=ib, engine="pml"),
        "recipe": lambda a, p, n: recipe_loss(a, p, n, ib),
        "info-nce-pytorch": None if ib or INCE is None else info_nce_loss,
    }


def recipe_bytes(cfg: Config, itemsize: int) -> float:
    """Predicted peak of the recipe: PML's (E, E) distance matrix (and its gradient) and its (P, Q) pair matrices.

    E = N(M+2) embeddings; P positive pairs x Q negative pairs (N*M x N*M per-anchor, N x N(N(M+1)-1) in-batch).
    Measured on the CPU at up to 1.3x below this for N <= 512 (about 1.5 E² + 4 to 4.5 PQ elements).
    """
    e = cfg.n * (cfg.m + 2)
    pq = (cfg.n * cfg.m) ** 2 if cfg.mode == "per-anchor" else cfg.n * cfg.n * (cfg.n * (cfg.m + 1) - 1)
    return float(itemsize * (2 * e * e + 5 * pq))


def check_methods(device: torch.device) -> None:
    """Every method computes the same loss as ``pt.reference_infonce`` (the floor to 1e-5), at a small size."""
    g = torch.Generator().manual_seed(1)
    a, p, n = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(12, 5, 16, generator=g)
    a, p, n = a.to(device), p.to(device), n.to(device)
    for mode in ("per-anchor", "in-batch"):
        ref = float(pt.reference_infonce(a, p, n, TAU, in_batch=mode == "in-batch"))
        for name, fn in methods(mode).items():
            if fn is None:
                continue
            got = float(fn(a, p, n))
            tol = 1e-5 * max(1.0, abs(ref))
            assert abs(got - ref) <= tol, f"{name} ({mode}) = {got} but reference_infonce = {ref}"


# --------------------------------------------------------------------------------------------------- measuring


def make_inputs(cfg: Config, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    shapes = [(cfg.n, d), (cfg.n, d), (cfg.n, cfg.m, d)]
    a, p, n = (torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes)
    return a, p, n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn: LossFn, inputs: Inputs) -> float:
    """Seconds for one forward+backward, gradients accumulating into freshly cleared ``.grad``."""
    for x in inputs:
        x.grad = None
    device = inputs[0].device
    sync(device)
    start = time.perf_counter()
    fn(*inputs).backward()
    sync(device)
    return time.perf_counter() - start


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
    cfg = Config(args.mode, args.n, args.m)
    fn = methods(cfg.mode)[args.method]
    assert fn is not None
    inputs = make_inputs(cfg, args.d, DTYPES[args.dtype], torch.device("cpu"))
    limit = vm_bytes() + int((8.0 if args.max_gb is None else args.max_gb) * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        resettable = reset_high_water_mark()
        if resettable:  # a warm-up keeps lazy one-time allocations (thread pools, kernels) out of the figure
            run_once(fn, inputs)
            for x in inputs:
                x.grad = None
            gc.collect()
            malloc_trim()
            reset_high_water_mark()
        base = rss_bytes()
        run_once(fn, inputs)
    except (RuntimeError, MemoryError):
        print(json.dumps({"over": True}))
        return
    print(json.dumps({"peak": peak_rss_bytes() - base, "warm": resettable, "over": False}))


def cpu_peak(cfg: Config, method: str, args: argparse.Namespace, max_bytes: float) -> tuple[float | None, str]:
    """Peak extra RSS measured in a fresh subprocess, and a note; ``None`` with a "skipped" note when over the cap."""
    cmd = [sys.executable, __file__, "--worker", "--mode", cfg.mode, "--n", str(cfg.n), "--m", str(cfg.m)]
    cmd += ["--method", method, "--d", str(args.d), "--dtype", args.dtype, "--max-gb", str(max_bytes / 1e9)]
    cmd += [] if args.threads is None else ["--threads", str(args.threads)]
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


def measure(cfg: Config, args: argparse.Namespace, device: torch.device, max_bytes: float) -> list[Result]:
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(cfg, args.d, dtype, device)
    results = {name: Result(cfg, name) for name in METHODS}
    ib = cfg.mode == "in-batch"
    active: dict[str, LossFn] = {}
    for name, fn in methods(cfg.mode).items():
        if fn is None:
            results[name].note = "n/a (not installed)" if INCE is None and not ib else "n/a (a different loss)"
        elif name == "recipe" and (need := recipe_bytes(cfg, dtype.itemsize)) > max_bytes:
            results[name].note = f"skipped (would need ~{need / 1e9:.3g} GB)"
        else:
            active[name] = fn
    if device.type == "cpu":  # memory first: a method over the cap is found in a subprocess, and not timed
        for name in list(active):
            results[name].peak, results[name].note = cpu_peak(cfg, name, args, max_bytes)
            if results[name].note.startswith("skipped"):
                del active[name]
    repeats = dict.fromkeys(active, args.repeats)
    for name, fn in list(active.items()):  # warm-up, and drop what cannot run
        try:
            if run_once(fn, inputs) > args.slow_s:
                repeats[name] = min(args.repeats, 3)
        except (RuntimeError, MemoryError) as err:
            results[name].note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:60]}"
            del active[name]
        gc.collect()
    names = list(active)
    for r in range(args.repeats if names else 0):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if len(results[name].times) < repeats[name]:
                results[name].times.append(run_once(active[name], inputs))
    if device.type == "cuda":
        for name, fn in active.items():
            results[name].peak = cuda_peak(fn, inputs)
    return list(results.values())


# --------------------------------------------------------------------------------------------------- reporting


def ratio(results: Sequence[Result], cfg: Config, method: str, what: Literal["time", "peak"]) -> float | None:
    by = {r.method: r for r in results if r.config == cfg}
    num, den = getattr(by[method], what), getattr(by["floor"], what)
    return None if num is None or den is None or den <= 0 else num / den


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(results: Sequence[Result]) -> str:
    lines = [
        "| mode | N | M | method | time ms | time ×floor | peak MB | mem ×floor | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.config
        t = None if r.time is None else r.time * 1e3
        peak = None if r.peak is None else r.peak / MB
        t_ratio, m_ratio = ratio(results, c, r.method, "time"), ratio(results, c, r.method, "peak")
        cells = [c.mode, str(c.n), str(c.m), r.method, fmt(t, ".1f"), fmt(t_ratio, ".2f")]
        cells += [fmt(peak, ".1f"), fmt(m_ratio, ".2f"), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: Sequence[Result]) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a) for the summary targets."""
    configs = list(dict.fromkeys(r.config for r in results))
    out: list[tuple[str, str, str]] = []

    def verdict(value: float | None, ok: Callable[[float], bool]) -> str:
        return "n/a (not measured)" if value is None else ("PASS" if ok(value) else "FAIL")

    per_anchor = [ratio(results, c, "pml_triplets", "time") for c in configs if c.mode == "per-anchor"]
    pa = [x for x in per_anchor if x is not None]
    geo = math.exp(statistics.fmean(math.log(x) for x in pa)) if pa else None
    worst = max(pa) if pa else None
    out.append(("per-anchor time ×floor, geometric mean ≤ 1.5", fmt(geo, ".2f"), verdict(geo, lambda x: x <= 1.5)))
    out.append(("per-anchor time ×floor, worst ≤ 2.0", fmt(worst, ".2f"), verdict(worst, lambda x: x <= 2.0)))

    def at(mode: Mode, n: int, m: int, method: str, what: Literal["time", "peak"]) -> float | None:
        cfg = Config(mode, n, m)
        return ratio(results, cfg, method, what) if cfg in configs else None

    ib = at("in-batch", 1024, 8, "pml_triplets", "time")
    out.append(("in-batch time ×floor ≤ 3.0 at N=1024, M=8", fmt(ib, ".2f"), verdict(ib, lambda x: x <= 3.0)))
    mem = at("per-anchor", 4096, 32, "pml_triplets", "peak")
    out.append(("peak memory ×floor ≤ 1.5 at N=4096, M=32", fmt(mem, ".2f"), verdict(mem, lambda x: x <= 1.5)))
    rec, ours = at("per-anchor", 512, 32, "recipe", "time"), at("per-anchor", 512, 32, "pml_triplets", "time")
    speedup = None if rec is None or ours is None else rec / ours
    out.append(("≥ 50× faster than recipe at N=512, M=32", fmt(speedup, ".0f"), verdict(speedup, lambda x: x >= 50)))
    return out


def targets_table(rows: Sequence[tuple[str, str, str]]) -> str:
    lines = ["| target (pml_triplets, auto engine) | measured | result |", "|---|---:|---|"]
    return "\n".join(lines + [f"| {t} | {v} | {ok} |" for t, v, ok in rows])


def plot(results: Sequence[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r.config for r in results))
    others = [m for m in METHODS if m != "floor"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.65 * len(configs) + 2), 4.5))
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
    ax.set_ylabel("time / floor time (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--quick", action="store_true", help="tiny grid (smoke test)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per method (default 5)")
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
    worker_args.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
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
        f"{name}, d={args.d}, {args.dtype}, τ={TAU}, median of {args.repeats} interleaved repeats; "
        f"{library_version()}, torch {torch.__version__}"
    )
    print(title, flush=True)
    results: list[Result] = []
    for cfg in grid(args.quick):
        start = time.perf_counter()
        rows = measure(cfg, args, device, max_bytes)
        results += rows
        summary = ", ".join(f"{r.method} {'-' if r.time is None else f'{r.time * 1e3:.1f}'} ms" for r in rows)
        print(f"[{time.perf_counter() - start:6.1f} s] {cfg.label}: {summary}", flush=True)

    body = table(results)
    goals = targets_table(targets(results))
    print("\n" + body + "\n\n" + goals, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"# bench_loss results\n\n{title}\n\n{body}\n\n## Targets\n\n{goals}\n")
    plot(results, args.out / "results.png", title)
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
