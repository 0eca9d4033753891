"""A queue of negatives with ids (MoCo, cross-batch memory) for ``infonce(..., queue=queue)``.

Memory banks give many negatives without big batches (He et al. 2020, "Momentum Contrast"; Wang et al. 2020,
"Cross-Batch Memory"). PML's ``CrossBatchMemory`` tells positives from negatives by labels; predefined triplets have
none, and a queue can hold an earlier copy of an anchor's own positive, which would then be its negative. Here each
queued row keeps the id of the item it embeds, and the loss drops a queued row whose id is one of the anchor's
positive ids, as ``negative_ids`` does for per-anchor negatives.

Writes are copy-on-write: ``enqueue`` puts new buffers in place of the old ones, so a loss computed before it keeps
the rows and ids it was computed with until its backward pass (MoCo's order: loss, enqueue, backward) -- with
chunks recomputed in the backward pass, too. It costs one copy of the buffers per ``enqueue``.
"""

from __future__ import annotations

import numbers
from typing import Any, cast

import torch
from torch import nn

from . import _distributed
from ._compat import is_compiling
from ._inputs import Inputs

__all__ = ["NegativeQueue"]

UNKNOWN = -1  # the id of a row enqueued without ids; a negative id is "unknown": it never clashes


class NegativeQueue(nn.Module):
    """A ring buffer of ``size`` detached embeddings ``[size, dim]`` and their int64 ids, oldest overwritten first.

    The embeddings and ids are registered buffers, and the fill count is saved with them (``get_extra_state``), so
    ``state_dict()``, ``.to(device)``, checkpoints and resuming work. Only filled rows are ever negatives: a fresh
    queue holds none, whatever its buffers contain.

    Pass it to ``infonce`` (or ``InfoNCE.forward``, or ``cached_step``) as ``queue=``: the same
    as ``shared_negatives=queue.negatives, shared_negative_ids=queue.ids``. Ids are the items' ids (the
    ``positive_ids`` of the loss); rows enqueued without ids get ``-1``, and a negative id means "unknown": it
    clashes with no positive id (a negative positive id clashes with nothing either).

    ``enqueue`` replaces the buffers by updated copies (copy-on-write): a loss computed before it keeps the rows it
    was computed with until its backward pass. Inside ``torch.compile`` the loss reads the whole buffer and, until
    the queue is full, a mask of the filled slots, never the fill count: filling the queue and wrapping around
    cost one recompilation at most (when it becomes full).

    Args:
        size: the number of rows the queue holds (>= 1).
        dim: the embedding width d (>= 1).
        dtype: the embeddings' dtype (enqueued rows are cast to it).
        device: where the buffers live (``.to()`` moves them later).

    Example:
        >>> import torch, pml_triplets as pt
        >>> queue = pt.NegativeQueue(size=6, dim=4)
        >>> queue.enqueue(torch.randn(4, 4), ids=torch.arange(4))
        >>> queue.enqueue(torch.randn(4, 4), ids=torch.arange(4, 8))  # overwrites the two oldest rows
        >>> len(queue), queue.ids.tolist()
        (6, [6, 7, 2, 3, 4, 5])
        >>> a, p = torch.randn(2, 4), torch.randn(2, 4)
        >>> loss = pt.infonce(a, p, queue=queue, positive_ids=torch.tensor([2, 9]))  # row id 2: not a[0]'s negative
    """

    embeddings: torch.Tensor
    item_ids: torch.Tensor
    filled: torch.Tensor

    def __init__(
        self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        """Allocate the buffers; the queue starts empty."""
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"`{name}` must be an int; got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1; got {value}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype; got {dtype!r}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim, dtype=dtype, device=device))
        self.register_buffer("item_ids", torch.full((self.size,), UNKNOWN, dtype=torch.long, device=device))
        # Which slots hold a row: what a compiled loss reads instead of the count (rebuilt from it on loading).
        self.register_buffer("filled", torch.zeros(self.size, dtype=torch.bool, device=device), persistent=False)
        self.count = 0  # rows enqueued since the last reset: a Python int, so reading it never syncs a device
        self.has_ids = False  # whether a row was enqueued with ids since the last reset
        self.full = False  # every slot filled: a compiled loss then needs no mask (a bool, which flips once)

    def __len__(self) -> int:
        """The number of filled rows, ``min(count, size)``."""
        return min(self.count, self.size)

    @property
    def negatives(self) -> torch.Tensor:
        """``[len(self), dim]``: the filled rows (a view of the buffer, in slot order)."""
        return self.embeddings[: len(self)]

    @property
    def ids(self) -> torch.Tensor:
        """``[len(self)]`` int64: the filled rows' ids, ``-1`` where unknown."""
        return self.item_ids[: len(self)]

    @torch.no_grad()
    def enqueue(
        self, embeddings: torch.Tensor, ids: torch.Tensor | None = None, *, gather_across_devices: bool = False
    ) -> None:
        """Store ``embeddings`` ``[B, dim]`` (detached) and their ``ids`` ``[B]`` (ints), oldest rows overwritten.

        Without ``ids``, the rows get the id ``-1``: unknown, never excluded from any anchor's negatives. The
        buffers are replaced by updated copies (a loss computed earlier keeps the rows it used). With
        ``gather_across_devices`` under ``torch.distributed``, every rank enqueues every rank's rows in rank order
        (ranks may hold different B), so the queues stay identical. Of more than ``size`` rows, the last ``size``
        are kept.
        """
        x, given = self._check(embeddings, ids), ids is not None
        ids = torch.full((x.shape[0],), UNKNOWN, dtype=torch.long, device=x.device) if ids is None else ids.long()
        if not isinstance(gather_across_devices, bool):
            raise TypeError(f"`gather_across_devices` must be a bool; got {type(gather_across_devices).__name__}")
        if gather_across_devices and _distributed.world()[1] > 1:
            gathered, _, _ = _distributed.gather_rows([x, ids], x.shape[0], names=("embeddings", "ids"))
            x, ids = cast(list[torch.Tensor], gathered)
        b = x.shape[0]
        kept = min(b, self.size)
        slots = (self.count + b - kept + torch.arange(kept, device=self.embeddings.device)) % self.size
        # Copies, not writes into the buffers: a loss computed before this call may still read the old ones.
        self.embeddings = self.embeddings.index_copy(0, slots, x[b - kept :].to(self.embeddings))
        self.item_ids = self.item_ids.index_copy(0, slots, ids[b - kept :].to(self.item_ids.device))
        if self.count < self.size:
            self.filled = self.filled.index_fill(0, slots, True)
        self.count += b
        self.has_ids, self.full = self.has_ids or given, self.count >= self.size

    def _check(self, embeddings: object, ids: object) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            got = embeddings.dtype if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise TypeError(f"`embeddings` must be a floating-point torch.Tensor; got {got}")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"`embeddings` must be [B, dim] = [B, {self.dim}]; got {list(embeddings.shape)}")
        if ids is not None:
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
                got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TypeError(f"`ids` must be an integer torch.Tensor; got {got}")
            if tuple(ids.shape) != (embeddings.shape[0],):
                raise ValueError(f"`ids` must be [B] = [{embeddings.shape[0]}]; got {list(ids.shape)}")
            if ids.device != embeddings.device:
                raise ValueError(f"`ids` is on {ids.device} but `embeddings` is on {embeddings.device}")
        return embeddings.detach()

    def reset(self) -> None:
        """Empty the queue (the buffers keep their values; no row is a negative until enqueued again)."""
        self.count, self.has_ids, self.full = 0, False, False
        self.filled = torch.zeros_like(self.filled)

    def get_extra_state(self) -> dict[str, Any]:
        """The fill count (and whether ids were given), saved in ``state_dict()`` beside the buffers."""
        return {"count": self.count, "has_ids": self.has_ids}

    def set_extra_state(self, state: Any) -> None:
        """Restore the fill count from ``state_dict()``."""
        self.count, self.has_ids = int(state["count"]), bool(state["has_ids"])
        self.full = self.count >= self.size
        self.filled = torch.arange(self.size, device=self.filled.device) < self.count

    def extra_repr(self) -> str:
        """Size, width, dtype and how many rows are filled."""
        return f"size={self.size}, dim={self.dim}, dtype={self.embeddings.dtype}, filled={len(self)}"


def from_queue(
    queue: object,
    shared: torch.Tensor | None,
    shared_ids: torch.Tensor | None,
    positive_ids: torch.Tensor | None,
    anchors: object,
    others: bool,
    static: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(shared_negatives, shared_negative_ids, shared_mask)`` as the loss takes them: from ``queue=`` if given.

    The filled rows, in the anchors' dtype (under autocast, say), and their ids whenever ``positive_ids`` are
    given. ``others``: the call has other negatives (its own, or in-batch), so an empty queue is no error.
    ``static`` (default: inside ``torch.compile``): the whole buffer and ``shared_mask`` ``[size]`` (True where a
    slot is filled; None once the queue is full), whose shapes never change as the queue fills; else the filled
    rows and no mask. A compiled loss then makes at most two graphs: while the queue fills, and once it is full.
    """
    if queue is None:
        return shared, shared_ids, None
    if not isinstance(queue, NegativeQueue):
        raise TypeError(f"`queue` must be a pml_triplets.NegativeQueue; got {type(queue).__name__}")
    if shared is not None or shared_ids is not None:
        raise ValueError("pass either `queue` or `shared_negatives` (and `shared_negative_ids`), not both")
    if positive_ids is None and queue.has_ids:  # (has_ids read only then: a compiled loss guards on what it reads)
        raise ValueError(
            "`queue` holds ids, which exclude the queued copies of an anchor's own positives: pass `positive_ids`"
        )
    a = anchors if isinstance(anchors, torch.Tensor) and anchors.is_floating_point() else None  # (else: rejected later)
    if a is not None and a.ndim == 2 and a.shape[1] != queue.dim:
        raise ValueError(
            f"`queue` holds rows of width dim={queue.dim} but `anchors` has d={a.shape[1]}: shape {tuple(a.shape)}"
        )
    static = is_compiling() if static is None else static
    if static:  # (no Python int read: a compiled loss would be specialized on the fill count)
        rows, ids, mask = queue.embeddings, queue.item_ids, None if queue.full else queue.filled
        if not others and mask is not None:
            torch._assert_async(mask.any(), _EMPTY)
    else:
        if len(queue) == 0 and not others:
            raise ValueError(_EMPTY + " (nothing enqueued yet)")
        rows, ids, mask = queue.negatives, queue.ids, None
    if a is not None and a.dtype != rows.dtype:
        rows = rows.to(a.dtype)
    return rows, None if positive_ids is None else ids, mask


def with_queue(queue: object, inputs: Inputs, in_batch: bool) -> Inputs:
    """``inputs`` with ``queue``'s rows as its shared negatives (see ``from_queue``)."""
    others = inputs.negatives is not None or in_batch
    shared, ids, mask = from_queue(queue, inputs.shared_negatives, inputs.shared_negative_ids, inputs.positive_ids,
                                   inputs.anchors, others)  # fmt: skip
    return inputs._replace(shared_negatives=shared, shared_negative_ids=ids, shared_mask=mask)


_EMPTY = (
    "`queue` is empty and the call has no other negatives: enqueue a batch before the first loss, or pass "
    "`negatives` or `in_batch=True` as well"
)
