"""Gathering in-batch candidates across ``torch.distributed`` ranks, with gradient.

PML's ``DistributedLossWrapper`` gathers without gradient; here every rank's loss reaches every rank's embeddings,
so DDP's gradient averaging gives the update of one process holding the whole batch.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist

__all__: list[str] = []  # private module


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient and keeps this rank's slice.

    Uses ``all_reduce`` in the backward rather than ``reduce_scatter``, which the gloo backend lacks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * rows, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _pad_rows(x: torch.Tensor, rows: int, value: Any = 0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def gather_rows(tensors: list[torch.Tensor | None], n: int) -> tuple[list[torch.Tensor | None], int, int]:
    """Concatenate each tensor's rows over all ranks (rank order), with gradient for floating tensors.

    Ranks may hold different ``n``: rows are padded to the largest ``n`` for the collective and dropped after.

    Returns:
        The gathered tensors (``None`` stays ``None``), the global index of this rank's first row, and the total
        number of rows.
    """
    rank, size = world()
    device = next(t.device for t in tensors if t is not None)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device))
    sizes = [int(c) for c in counts]
    widest = max(sizes)
    keep = torch.cat([torch.arange(widest, device=device) < s for s in sizes])  # (world * widest,)
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        padded = _pad_rows(t, widest)
        if t.is_floating_point():
            full = cast(torch.Tensor, _AllGather.apply(padded))  # type: ignore[no-untyped-call]
        else:
            parts = [torch.empty_like(padded) for _ in range(size)]
            dist.all_gather(parts, padded.contiguous())
            full = torch.cat(parts)
        out.append(full[keep])
    return out, sum(sizes[:rank]), sum(sizes)
