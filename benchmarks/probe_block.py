"""Does a fused cosine *block* pay? ``(C, d) x (R, d) -> (C, R)`` with the R rows normalized on the fly.

The per-anchor rows (``pml_triplets._fused``) pay because their normalized copy is as big as the work itself:
(C, M, d) against (C, M) logits. A block's rows are shared by all C queries: normalizing them once costs an (R, d)
pass, while normalizing on the fly costs passes over the (C, R) logits (a column scaling forward; ``g / ‖r‖`` and
``Σ_c g s`` backward), which are bigger whenever C > d. So the dense engine keeps normalized blocks (normalized once
per call, outside the chunks) and fuses only the per-anchor rows. This script measures the two side by side, forward
+ backward through a log-sum-exp, eager, float32::

    python benchmarks/probe_block.py --threads 2

On the 2-core CPU of the issue 20 session it printed (ms, median of 7)::

    C=256 R=65536 (a 65,536-row queue)       normalized 181.6   fused 274.9
    C=1024 R=9216 (in-batch N=1024, M=8)     normalized 115.7   fused 137.3
    C=2048 R=18432 (in-batch N=2048, M=8)    normalized 443.2   fused 536.9
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

EPS = 1e-12


class FusedBlock(torch.autograd.Function):
    """``<q[c], r[j]> / max(‖r[j]‖, eps)``: the block with its columns scaled, analytic backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(r, dim=-1)
        out = (q @ r.T).div_(norm.clamp_min(EPS))
        ctx.save_for_backward(q, r, norm, out)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, r, norm, out = ctx.saved_tensors
        den = norm.clamp_min(EPS)
        u = g / den  # (C, R)
        gq = u @ r
        if not ctx.needs_input_grad[1]:
            return gq, None
        w = torch.where(norm > EPS, -(g * out).sum(0) / den.square(), 0.0)  # (R,)
        return gq, torch.addmm(r * w[:, None], u.T, q)


def median_ms(step: Any, repeats: int = 7) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = [(256, 65536, False, "a 65,536-row queue"), (1024, 9216, True, "in-batch N=1024, M=8")]
    cases.append((2048, 18432, True, "in-batch N=2048, M=8"))
    for c, rows, grad, what in cases:
        q = torch.randn(c, 128, requires_grad=True)
        r = torch.randn(rows, 128, requires_grad=grad)
        plain, fused = median_ms(lambda q=q, r=r: step(q, r, False)), median_ms(lambda q=q, r=r: step(q, r, True))
        print(f"{f'C={c} R={rows} ({what})':40s} normalized {plain:6.1f}   fused {fused:6.1f}", flush=True)


def step(q: torch.Tensor, r: torch.Tensor, fused: bool) -> None:
    """Forward + backward of ``Σ logsumexp`` over the block, normalized first or fused."""
    qn = F.normalize(q, dim=-1)
    s = FusedBlock.apply(qn, r) if fused else qn @ F.normalize(r, dim=-1).T  # type: ignore[no-untyped-call]
    torch.logsumexp(s, -1).sum().backward()


if __name__ == "__main__":
    main()
