"""``python -m pml_triplets check``: the adapter against the reference on every available device and dtype."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import torch
from pytorch_metric_learning.losses import NTXentLoss

from .indices import build_indices, concat_embeddings
from .loss import infonce
from .reference import reference_infonce

__all__ = ["main", "run_checks"]

# Allowed |value - reference| relative to the reference, by input dtype (half precision rounds the result).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _cases(device: str) -> list[torch.dtype]:
    if device == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def run_checks(n: int = 16, m: int = 8, d: int = 32, seed: int = 0) -> list[dict[str, object]]:
    """One row per (device, dtype, method): the loss, the float64 reference on the same rounded inputs, the verdict.

    Methods: ``infonce`` (default engine), ``infonce[pml]`` (chunks through ``NTXentLoss.compute_loss``) and
    ``NTXentLoss+build_indices`` (plain PML over ``concat_embeddings``).
    """
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((n, d), (n, d), (n, m, d))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[dict[str, object]] = []
    for device in devices:
        for dtype in _cases(device):
            a, p, neg = (x.to(device=device, dtype=dtype) for x in base)
            ref = float(reference_infonce(a.double(), p.double(), neg.double()))
            methods: dict[str, Callable[[], torch.Tensor]] = {
                "infonce": partial(infonce, a, p, neg),
                "infonce[pml]": partial(infonce, a, p, neg, engine="pml"),
                "NTXentLoss+build_indices": partial(
                    NTXentLoss(), concat_embeddings(a, p, neg), indices_tuple=build_indices(n, m, device=device)
                ),
            }
            for name, fn in methods.items():
                value = float(fn())
                diff = abs(value - ref)
                ok = math.isfinite(value) and diff <= TOLERANCE[dtype] * max(1.0, abs(ref))
                rows.append(
                    {
                        "device": device,
                        "dtype": str(dtype).removeprefix("torch."),
                        "method": name,
                        "value": value,
                        "reference": ref,
                        "diff": diff,
                        "pass": ok,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table; return 0 when every row passes, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m pml_triplets check", description=__doc__)
    parser.add_argument("--n", type=int, default=16, help="anchors N")
    parser.add_argument("--m", type=int, default=8, help="negatives per anchor M")
    parser.add_argument("--d", type=int, default=32, help="embedding size d")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run_checks(args.n, args.m, args.d, args.seed)
    header = f"{'device':<7}{'dtype':<10}{'method':<26}{'value':>14}{'reference':>14}{'|difference|':>14}  pass"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['device']:<7}{r['dtype']:<10}{r['method']:<26}{r['value']:>14.8f}{r['reference']:>14.8f}"
            f"{r['diff']:>14.2e}  {'yes' if r['pass'] else 'NO'}"
        )
    failed = sum(not r["pass"] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
