"""Gathering in-batch candidates across ``torch.distributed`` ranks, with gradient.

PML's ``DistributedLossWrapper`` gathers without gradient; here every rank's loss reaches every rank's embeddings,
so DDP's gradient averaging gives the update of one process holding the whole batch.

Before gathering, the ranks check that they agree with one ``all_gather`` of a 130-int64 signature per rank
(1,040 bytes, whatever the inputs): its row count and, per input, presence, dtype, gradient and shape. Ranks that
disagree would abort inside gloo or block until the process-group timeout (30 minutes by default); instead every
rank raises the same ``ValueError``, naming the input and what each rank holds. The row counts come from the same
signature, so the check adds no collective to gathering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist

__all__: list[str] = []  # private module

# The signature: a header, then one fixed-width slot per input (zeros for an absent input or an unused slot).
_SLOTS = 16  # inputs described (the engine gathers 9)
_DIMS = 4  # trailing dims described (the engine gathers at most 3 dims)
_HEADER = 2  # this rank's row count n, the number of inputs
_WIDTH = 4 + _DIMS  # dtype code (0: absent), carries a gradient, ndim, rows, trailing dims (zero padded)
_LENGTH = _HEADER + _SLOTS * _WIDTH  # 130 int64
# Every dtype of this torch build sorted by name; code = index + 1 (the ranks run the same build).
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))


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


def _slot(t: torch.Tensor | None) -> list[int]:
    """One input's ``_WIDTH`` signature entries: dtype code (0: absent), carries a gradient, ndim, rows, dims."""
    if t is None:
        return [0] * _WIDTH
    if t.dim() > 1 + _DIMS:
        raise ValueError(f"at most {1 + _DIMS} dims can be gathered; got {tuple(t.shape)}")
    trail = list(t.shape[1:])
    grad = t.requires_grad and torch.is_grad_enabled()  # then its gather runs an all_reduce in the backward
    return [_DTYPES.index(t.dtype) + 1, int(grad), t.dim(), t.shape[0] if t.dim() else 0, *trail] + [0] * (
        _DIMS - len(trail)
    )


def signature(tensors: Sequence[torch.Tensor | None], n: int) -> list[int]:
    """This rank's ``_LENGTH`` int64: ``[n, len(tensors)]``, then a slot per input, zeros after the last."""
    if len(tensors) > _SLOTS:
        raise ValueError(f"at most {_SLOTS} inputs can be gathered; got {len(tensors)}")
    slots = [x for t in tensors for x in _slot(t)]
    return [n, len(tensors), *slots, *[0] * (_SLOTS * _WIDTH - len(slots))]


def _text(slot: list[int]) -> str:
    """``float32 [N, 3, 5] with gradient``, or ``absent``."""
    code, grad, ndim, _, *trail = slot
    if code == 0:
        return "absent"
    shape = ", ".join(["N", *map(str, trail[: ndim - 1])]) if ndim else ""
    return f"{str(_DTYPES[code - 1]).removeprefix('torch.')} [{shape}]" + (" with gradient" if grad else "")


def check_signatures(signatures: list[list[int]], names: Sequence[str] | None = None) -> list[int]:
    """Every rank's row count, once the ranks' signatures agree; else the ``ValueError`` every rank raises."""
    ns, counts = [s[0] for s in signatures], [s[1] for s in signatures]
    problems = [] if len(set(counts)) == 1 else ["the number of inputs: " + _by_rank(map(str, counts))]
    for i in range(max(counts)):
        label = f"`{names[i]}`" if names is not None and i < len(names) else f"input {i}"
        slots = [s[_HEADER + i * _WIDTH : _HEADER + (i + 1) * _WIDTH] for s in signatures]
        if len({(code, grad, ndim, *trail) for code, grad, ndim, _, *trail in slots}) > 1:
            problems.append(f"{label}: " + _by_rank(map(_text, slots)))
        elif slots[0][0]:
            problems += [f"{label}: {s[3]} rows on rank {r}, which holds N = {n}"
                         for r, (s, n) in enumerate(zip(slots, ns, strict=True)) if s[3] != n]  # fmt: skip
    if problems:
        detail = "\n  ".join(problems)
        raise ValueError(
            "gather_across_devices: every rank must hold the same inputs (which are present, their dtypes, and "
            f"their shapes but for the rows N); every rank raises this error. They differ in\n  {detail}"
        )
    return ns


def _by_rank(texts: Iterable[str]) -> str:
    return "; ".join(f"rank {r}: {text}" for r, text in enumerate(texts))


def gather_rows(
    tensors: list[torch.Tensor | None], n: int, *, names: Sequence[str] | None = None
) -> tuple[list[torch.Tensor | None], int, int]:
    """Concatenate each tensor's rows over all ranks (rank order), with gradient for floating tensors.

    Ranks may hold different ``n`` (rows are padded to the largest for the collective, dropped after); all else
    must agree, or every rank raises a ``ValueError`` naming the input (``names``, else ``input i``).

    Returns:
        The gathered tensors (``None`` stays ``None``), the global index of this rank's first row, and the total.
    """
    rank, size = world()
    present = [t.device for t in tensors if t is not None]
    nccl = "nccl" in str(dist.get_backend())
    device = present[0] if present else torch.device("cuda", torch.cuda.current_device()) if nccl else None
    mine = torch.tensor(signature(tensors, n), dtype=torch.long, device=device)  # (_LENGTH,)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine)  # the check's one collective; one host sync, as the row counts need
    sizes = check_signatures(torch.stack(parts).tolist(), names)
    widest = max(sizes)
    keep = torch.cat([torch.arange(widest, device=mine.device) < s for s in sizes])  # (world * widest,)
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
