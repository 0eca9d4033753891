"""How far each notebook claim moves under what changes from one machine to another, against its bound.

Training results move with floating-point reduction order, which a machine changes through its thread count and
its vector instruction set, and with the seeds a run happens to use. This script executes each notebook (from the
cells in make_notebooks.py, nothing written back) under:

* ``1 thread`` and ``2 threads`` (``OMP_NUM_THREADS``; claim_spread.md was measured when the notebooks took
  torch's default thread count: every notebook now pins one thread, so these two rows run alike),
* ``2 threads, AVX2``: ATen's kernels and MKL limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
  ``MKL_ENABLE_INSTRUCTIONS=AVX2``), the code path of a machine without AVX-512,
* ``1 thread, no SIMD``: ATen's scalar kernels and MKL's SSE4.2 path (``ATEN_CPU_CAPABILITY=default``,
  ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``), the farthest from this machine's own path,
* ``other seeds``: one thread, every seed set of the notebook shifted by 10,

collects every ``claim(...)`` (notebooks/claims.py) with its value, and prints one row per claim: its bound, the
value in each run, the spread (max - min over the runs) and the margin (the distance from the nearest value to
the bound) in units of that spread. A bound is kept when its margin is at least twice the spread (or the value
does not move at all); the script lists the claims below that.

    python notebooks/claim_spread.py [PATH ...] [--out notebooks/claim_spread.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import make_notebooks as gen  # beside this script, so on sys.path when it runs
import nbformat

MARKER = "CLAIMS-JSON "
SEED_SHIFT = {  # notebook -> (source text, its replacement) for the "other seeds" run
    "studies/train_digits.ipynb": [("SEEDS = (0, 1, 2, 3, 4)", "SEEDS = (10, 11, 12, 13, 14)")],
    "studies/retrieval_options.ipynb": [("SEEDS = (0, 1, 2, 3, 4)", "SEEDS = (10, 11, 12, 13, 14)")],
}
# The notebooks that make claims (the tutorial, notebooks/training.ipynb, makes none: its test checks its numbers).
CLAIMED = [name for name, (cells, _) in gen.NOTEBOOKS.items() if any("claim(" in src for _, src in cells)]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
NO_SIMD = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
RUNS: dict[str, tuple[dict[str, str], bool]] = {  # label -> (environment, shift the seeds)
    "1 thread": ({"OMP_NUM_THREADS": "1"}, False),
    "2 threads": ({"OMP_NUM_THREADS": "2"}, False),
    "2 threads, AVX2": ({"OMP_NUM_THREADS": "2", **AVX2}, False),
    "1 thread, no SIMD": ({"OMP_NUM_THREADS": "1", **NO_SIMD}, False),
    "other seeds": ({"OMP_NUM_THREADS": "1"}, True),
}


def claims_of(name: str, env: dict[str, str], shift: bool) -> list[dict]:
    """Execute notebook ``name`` under ``env`` (seeds shifted if ``shift``) and return its recorded claims."""
    cells, prefix = gen.NOTEBOOKS[name]
    nb = gen.build(cells, prefix)
    for old, new in SEED_SHIFT.get(name, []) if shift else []:
        sources = [c for c in nb.cells if old in c.source]
        if len(sources) != 1:
            raise SystemExit(f"{name}: expected `{old}` in exactly one cell, found {len(sources)}")
        sources[0].source = sources[0].source.replace(old, new)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json, claims\nprint({MARKER!r} + json.dumps(claims.RECORD))"))
    with tempfile.TemporaryDirectory() as tmp:
        out = gen.execute(nb, Path(tmp), {**env, "CLAIMS_RECORD_ONLY": "1"})
    text = "".join(o.get("text", "") for o in out.cells[-1].outputs)
    return json.loads(text.split(MARKER, 1)[1])


def bound_text(c: dict) -> str:
    return " and ".join(f"{k} {c[k]:g}" for k in ("above", "below") if c[k] is not None)


def rows(name: str, runs: dict[str, list[dict]]) -> list[tuple[str, float]]:
    """One markdown row per claim, with its margin / spread (inf when the value does not move)."""
    labels = list(runs)
    first = runs[labels[0]]
    lines = []
    for i, c in enumerate(first):
        values = [runs[label][i]["value"] for label in labels]
        if any(runs[label][i]["claim"] != c["claim"] for label in labels):
            raise SystemExit(f"{name}: the runs made different claims at position {i}")
        spread = max(values) - min(values)
        margins = [v - c["above"] for v in values if c["above"] is not None]
        margins += [c["below"] - v for v in values if c["below"] is not None]
        margin = min(margins)
        ratio = math.inf if spread < 1e-12 else margin / spread  # equal up to float64 rounding: no spread
        cells = " | ".join(f"{v:.4g}" for v in values)
        text = c["claim"].replace("|", "\\|")  # a literal bar inside a markdown table cell
        shown = "∞" if ratio == math.inf else f"{ratio:.1f}"
        row = f"| {name} | {text} | {bound_text(c)} | {cells} | {spread:.3g} | {margin:.3g} | {shown} |"
        lines.append((row, ratio))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="PATH", help=f"of {CLAIMED} (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    header = [
        "| notebook | claim | bound | " + " | ".join(RUNS) + " | spread | margin | margin / spread |",
        "|---|---|---|" + "---:|" * (len(RUNS) + 3),
    ]
    lines: list[tuple[str, float]] = []
    if unknown := set(args.names) - set(CLAIMED):
        parser.error(f"unknown notebooks {sorted(unknown)}; expected some of {CLAIMED}")
    for name in args.names or CLAIMED:
        runs = {}
        for label, (env, shift) in RUNS.items():
            start = time.perf_counter()
            runs[label] = claims_of(name, env, shift)
            print(f"{name}, {label}: {len(runs[label])} claims in {time.perf_counter() - start:.0f} s", flush=True)
        new = rows(name, runs)
        lines += new
        print("\n".join(header + [row for row, _ in new]), flush=True)
    worst = min((ratio for _, ratio in lines), default=math.inf)
    low = [row.split(" | ")[1] for row, ratio in lines if ratio < 2]
    summary = f"smallest margin / spread: {worst:.1f}; claims below 2: {', '.join(low) or 'none'}"
    table = "\n".join(header + [row for row, _ in lines])
    print(f"{table}\n\n{summary}")
    if args.out:
        command = "python notebooks/claim_spread.py" + "".join(f" {n}" for n in args.names)
        args.out.write_text(f"`{command}`\n\n{table}\n\n{summary}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
