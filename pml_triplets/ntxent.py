"""A drop-in ``NTXentLoss``: pytorch-metric-learning's loss on the same pairs, linear in the pairs.

PML's ``NTXentLoss`` (through ``GenericPairLoss.compute_loss``) computes the whole ``len(embeddings) x
len(ref_emb)`` distance matrix, and ``NTXentLoss._compute_loss`` compares each of the P positive pairs with each
of the Q negative pairs through P x Q tensors (``n_per_p = a2 == a1[:, None]`` and four more). With the
recipe that concatenates ``[anchors, positives, negatives]`` (``pt.concat_embeddings``) that is O(N²M²) memory.

``NTXentLoss`` here keeps PML's constructor, ``forward``, pairs (``lmu.convert_to_pairs``), reducers,
regularizers and loss dict, and computes the same terms from

* the distance of the listed pairs only -- row by row for PML's own distances (a dot product, a p-norm of the
  difference, a variance ratio), in every dtype, or PML's full matrix when that is no larger than the rows gathered;
* each anchor's log-sum-exp over its negatives by segment (sort by anchor, ``scatter_reduce`` max,
  ``index_add`` of the shifted exponentials, in float32 for half inputs): O((P + Q) log Q) time and O(P + Q)
  memory.

It also warns, once per instance, when a 3-tuple ``(a, p, n)`` or a 4-tuple ``(a1, p, a2, n)`` has the recipe's
``arange(N).repeat(M)`` layout, which pairs each anchor with other anchors' negatives (see
``pml_triplets.indices``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ._compat import as_dtype, is_compiling
from ._similarity import Kind, kind_of

__all__ = ["NTXentLoss", "RepeatLayoutWarning"]

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LossDict = dict[str, dict[str, Any]]
_NAMES = {3: ("a", "p", "n"), 4: ("a1", "p", "a2", "n")}
_INDEX_DTYPES = (torch.int64, torch.int32)  # what PML's indexing takes as indices (uint8 and bool are masks)
_HALF = (torch.float16, torch.bfloat16)
_MAX_FINE_LAYOUTS = 16  # tuple signatures an instance remembers as checked fine; then it stops checking


class RepeatLayoutWarning(UserWarning):
    """An ``indices_tuple`` with the recipe's ``arange(N).repeat(M)`` anchors over negatives stored anchor by anchor."""


class NTXentLoss(losses.NTXentLoss):  # type: ignore[misc]  # PML ships no type information
    """PML's ``NTXentLoss``, computed in time and memory linear in the pairs instead of P x Q.

    The constructor (``temperature``, ``distance``, ``reducer``, ``embedding_regularizer``, ...) and ``forward(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)`` are PML's own; so are the pairs
    (a 3-tuple ``(a, p, n)`` becomes ``(a, p, a, n)``; labels give every pair, ``lmu.get_all_pairs_indices``) and
    the loss dict handed to the reducer: ``{"loss": {"losses": (P,), "indices": (a1, p), "reduction_type":
    "pos_pair"}}``. For each positive pair ``i`` (repeated pairs are repeated terms), with ``s`` the distance's
    value (negated for a distance that is not inverted, such as ``LpDistance``) and ``τ`` the temperature:

        ℓ_i = −log( exp(s(a1_i, p_i)/τ) / (exp(s(a1_i, p_i)/τ) + Σ_{j: a2_j = a1_i} exp(s(a2_j, n_j)/τ)) )

    so a negative pair listed twice counts twice, and an anchor without negative pairs gets ``-log 1 = 0``. Where
    PML takes ``-log(num / den + tiny)`` (a term can never exceed ``-log(tiny)``: 87.3 in float32), this is the
    exact value ``log(den) - log(num)`` with PML's detached shift: equal to PML's wherever PML is not capped.
    Like PML it returns zero losses when every index tensor has length <= 1 or there is no positive or no negative
    pair.

    The distance is evaluated on the listed pairs only, row by row, for ``DotProductSimilarity`` /
    ``CosineSimilarity``, ``LpDistance`` and ``SNRDistance`` (subclasses that keep their ``compute_mat`` and
    ``forward``), with the distance's ``maybe_normalize`` and ``power``, in every dtype (``LpDistance`` in float16
    through its ``pairwise_distance``, as PML's ``compute_mat`` does there); for any other distance, or where the
    ``B x R`` matrix is no larger than the rows gathered (``B * R <= 2 * (P + Q) * d``: pairs from labels), it is
    PML's ``distance(embeddings, ref_emb)``, read at the pairs. In float16 and bfloat16 the distances are PML's,
    in the input dtype; the loss terms, and the gradients of a row or matrix entry gathered once per pair, are
    summed in float32 (a half-precision sum of many terms stops growing: bfloat16 near 256), and the losses are
    returned in the input dtype, as PML returns them.

    Shapes:
        * ``embeddings``: ``[B, d]``; ``ref_emb``: ``[R, d]`` (default: ``embeddings``).
        * ``indices_tuple``: three ``[T]`` int64/int32 tensors ``(a, p, n)`` or four ``(a1 [P], p [P], a2 [Q],
          n [Q])``; rows index ``embeddings``, columns (``p``, ``n``) index ``ref_emb``.
        * cost: O((P + Q) d) time and memory for the distances, O((P + Q) log Q) for the loss.

    Checks, before any work: the tuple has 3 or 4 one-dimensional int64/int32 tensors on the embeddings' device
    with matching lengths (``TypeError``/``ValueError`` naming the entry); every index lies in ``[-B, B)`` (rows)
    or ``[-R, R)`` (columns), the range PML's indexing accepts (``ValueError``; on an accelerator or inside
    ``torch.compile`` a device-side assertion instead, so that no host synchronisation is added).

    Warns ``RepeatLayoutWarning``, once per instance, when the tuple has the recipe's ``.repeat`` layout over
    negatives stored anchor by anchor (``negatives.reshape(-1, d)`` of an ``[N, M, d]`` tensor), which compares
    anchor ``j % N`` with negative row ``n[j]`` of anchor ``j // M`` (N, M >= 2, ``n`` consecutive rows):

    * a 3-tuple ``(a, p, n)`` with ``a = a[0] + arange(N).repeat(M)`` and ``p`` repeating with the same period;
      the fix is ``repeat_interleave(M)`` for ``a`` and ``p``, or ``pml_triplets.build_indices(N, M)``;
    * a 4-tuple ``(a1, p, a2, n)`` with ``a2 = a2[0] + arange(N).repeat(M)`` and one of those N anchors in ``a1``
      (PML's form: ``(arange(N), arange(N, 2N), arange(N).repeat(M), 2N + arange(N*M))``); the fix is ``a2 =
      a2[0] + arange(N).repeat_interleave(M)``.

    The loss is still computed for the tuple as given. The test costs nothing until it reads index values: a tuple
    with fewer than 4 negative pairs or more than ``len(ref_emb)`` (most miners') is dismissed from its lengths, as
    is every tuple once the instance has warned, and inside ``torch.compile``. Otherwise it reads one value (a
    host synchronisation on an accelerator) and remembers a layout found fine by its signature -- tuple length,
    ``len(a1)``, ``len(n)`` and ``len(ref_emb)`` -- so that a later call with that signature reads nothing; after
    16 such signatures (tuples whose lengths keep changing come from a miner, not from the recipe) it stops
    reading altogether.

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses
        >>> from pml_triplets import NTXentLoss, build_indices, concat_embeddings
        >>> g = torch.Generator().manual_seed(0)
        >>> N, M, d = 4, 3, 8
        >>> a, p = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
        >>> n = torch.randn(N, M, d, generator=g)
        >>> emb = concat_embeddings(a, p, n)  # [2N + N*M, d]
        >>> idx = build_indices(N, M)  # three [N*M] tensors, a = arange(N).repeat_interleave(M)
        >>> ours = NTXentLoss(temperature=0.1)(emb, indices_tuple=idx)
        >>> theirs = losses.NTXentLoss(temperature=0.1)(emb, indices_tuple=idx)
        >>> torch.allclose(ours, theirs, rtol=1e-5)
        True
    """

    _warned_layout = False  # set on the instance once it has warned
    _fine_layouts: frozenset[tuple[int, int, int, int]] = frozenset()  # signatures read and found fine, <= 16

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Sequence[torch.Tensor] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> LossDict:
        """PML's pairs (``lmu.convert_to_pairs``), their distances, and ``_compute_loss`` on them."""
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        kind = _check_embeddings(embeddings, ref_emb, self.distance)
        given = None if indices_tuple is None else _check_tuple(indices_tuple, embeddings.device)
        pairs: Pairs = tuple(lmu.convert_to_pairs(given, labels, ref_labels))
        if all(len(x) <= 1 for x in pairs):  # as GenericPairLoss: zero losses, whatever the indices hold
            return self.zero_losses()  # type: ignore[no-any-return]
        _check_range(pairs, len(embeddings), len(ref_emb), given)
        if given is not None and not self._warned_layout and not is_compiling():
            self._warn_repeat_layout(given, len(ref_emb))
        pos, neg = pair_values(self.distance, kind, embeddings, ref_emb, pairs)
        return self._compute_loss(pos, neg, pairs)

    def _compute_loss(self, pos_pairs: torch.Tensor, neg_pairs: torch.Tensor, indices_tuple: Pairs) -> LossDict:
        """NT-Xent of each positive pair from the pairs' distances (PML's hook, its arguments): losses (P,)."""
        a1, p, a2, _ = indices_tuple
        if len(a1) == 0 or len(a2) == 0:
            return self.zero_losses()  # type: ignore[no-any-return]
        dtype = pos_pairs.dtype
        if dtype in _HALF:  # a half sum of exponentials stops growing (bfloat16 near 256 terms): float32 terms
            pos_pairs, neg_pairs = pos_pairs.float(), neg_pairs.float()
        if not self.distance.is_inverted:  # a distance enters negated, as in PML
            pos_pairs, neg_pairs = -pos_pairs, -neg_pairs
        nll = segment_nll(pos_pairs / self.temperature, neg_pairs / self.temperature, a1, a2)
        nll = as_dtype(nll, dtype)  # PML's losses have the distances' dtype
        return {"loss": {"losses": nll, "indices": (a1, p), "reduction_type": "pos_pair"}}

    def _warn_repeat_layout(self, given: tuple[torch.Tensor, ...], ref_rows: int) -> None:
        """Warn if ``given`` has the recipe's layout; see the class docstring for when values are read."""
        negatives = len(given[-1])
        if negatives < 4 or negatives > ref_rows or len(given[0]) == 0:  # no read: cannot be the layout
            return
        signature = (len(given), len(given[0]), negatives, ref_rows)
        if signature in self._fine_layouts or len(self._fine_layouts) >= _MAX_FINE_LAYOUTS:
            return
        n_anchors = repeat_layout(given, ref_rows)
        if not n_anchors:
            self._fine_layouts = self._fine_layouts | {signature}  # a new set: never a set shared with a copy
            return
        m = negatives // n_anchors
        if len(given) == 3:
            names, fix = "a", "Build a and p with .repeat_interleave(M) -- or use pml_triplets.build_indices(N, M)."
        else:
            start = int(given[2][0])
            names, offset = "a2", f"{start} + " if start else ""
            fix = (
                f"Build a2 with .repeat_interleave(M): a2 = {offset}torch.arange({n_anchors}).repeat_interleave({m}) "
                "-- or use the 3-tuple pml_triplets.build_indices(N, M) over [anchors, positives, negatives]."
            )
        warnings.warn(
            f"`indices_tuple` has the recipe's layout {names} = arange(N).repeat(M) (N={n_anchors}, M={m}) over "
            f"consecutive negative rows: if the negatives are stored anchor by anchor (negatives.reshape(-1, d) "
            f"of an [N, M, d] tensor), negative row n[j] belongs to anchor j // M but is compared with anchor "
            f"j % N. {fix} The loss is computed for the tuple as given. (If the negatives are stored negative by "
            "negative, negatives.transpose(0, 1).reshape(-1, d), this layout is right: filter RepeatLayoutWarning.)",
            RepeatLayoutWarning,
            stacklevel=6,  # the line calling loss_fn(...): _warn, compute_loss, forward, and two of nn.Module
        )
        self._warned_layout = True


def segment_nll(pos: torch.Tensor, neg: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``-log(e^pos_i / (e^pos_i + Σ_{j: a2_j = a1_i} e^neg_j))`` for every i: (P,) from pos (P,), neg (Q,).

    Negatives are grouped by sorting their anchors (any integer values, negative ones included, grouped by value
    as PML's ``a2 == a1[:, None]`` groups them); each group is shifted by its detached maximum, and each term by
    PML's ``max(pos_i, max of its negatives)``, so the sum is at least 1 and its logarithm finite.
    """
    keys, order = torch.sort(a2.long())  # (Q,) negatives grouped by anchor
    vals = neg[order]  # (Q,)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    group = torch.cumsum(first, 0) - 1  # (Q,) each sorted negative's group, 0 .. groups-1
    top = torch.full_like(vals, -math.inf).scatter_reduce(0, group, vals.detach(), "amax")  # (Q,) group max
    sums = torch.zeros_like(vals).index_add(0, group, torch.exp(vals - top[group]))  # (Q,) Σ e^(neg - max)
    anchors = a1.long()
    at = torch.searchsorted(keys, anchors).clamp_max(len(keys) - 1)  # (P,) where a1_i's group starts, if any
    has = keys[at] == anchors  # (P,) anchor a1_i has negatives
    top_i = torch.where(has, top[group[at]], -math.inf)  # (P,)
    shift = torch.maximum(pos.detach(), top_i)  # (P,) PML's max_val
    den = torch.exp(pos - shift) + torch.where(has, sums[group[at]], 0.0) * torch.exp(top_i - shift)  # (P,) >= 1
    return torch.log(den) - (pos - shift)


def pair_values(
    distance: BaseDistance, kind: Kind, embeddings: torch.Tensor, ref_emb: torch.Tensor, pairs: Pairs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``distance(embeddings, ref_emb)[rows, cols]`` at the positive and negative pairs: (P,), (Q,)."""
    a1, p, a2, n = pairs
    gathered = 2 * (len(a1) + len(a2)) * embeddings.shape[1]  # elements of the rows gathered for the pairs
    rows, cols = torch.cat([a1, a2]), torch.cat([p, n])  # (P + Q,)
    if kind == "generic" or len(embeddings) * len(ref_emb) <= gathered:
        mat = distance(embeddings, ref_emb)  # (B, R), as PML computes it
        vals = _take(mat, rows, cols)  # (P + Q,)
        return vals[: len(a1)], vals[len(a1) :]
    q = distance.maybe_normalize(embeddings)  # (B, d)
    r = q if ref_emb is embeddings else distance.maybe_normalize(ref_emb)  # (R, d)
    distance.reset_stats()  # what BaseDistance.forward records, when its collect_stats is on
    distance.set_default_stats(embeddings, ref_emb, q, r)
    vals = _rowwise(kind, distance, _take(q, rows), _take(r, cols))  # (P + Q,)
    if distance.power != 1:
        vals = vals**distance.power
    return vals[: len(a1)], vals[len(a1) :]


def _take(x: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """``x[index]``, whose backward sums the gradients of a repeated index in float32 for a half ``x``.

    The values are ``x``'s; only the backward changes: ``index_put_``'s half sum stops growing (bfloat16 near 256
    terms), and an anchor's row, or a positive pair repeated in a 3-tuple, is gathered once per pair.
    """
    if x.dtype in _HALF:
        return x.float()[index].to(x.dtype)
    return x[index]


def _rowwise(kind: Kind, distance: BaseDistance, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``compute_mat``'s value for each row pair ``(x[k], y[k])``: (K,) from (K, d), (K, d)."""
    if kind == "dot":
        dot: torch.Tensor = torch.linalg.vecdot(x, y)  # not einsum: a batch of 1 x 1 matmuls, 5x slower on the CPU
        return dot
    if kind == "lp" and x.dtype == torch.float16:  # PML's compute_mat: pairwise_distance on row pairs (an eps)
        pairwise: torch.Tensor = distance.pairwise_distance(x, y)
        return pairwise
    if kind == "lp":  # PML's compute_mat: cdist
        norm: torch.Tensor = torch.linalg.vector_norm(x - y, ord=distance.p, dim=1)
        return norm
    return torch.var(x - y, dim=1) / torch.var(x, dim=1)  # SNRDistance


def distance_kind(distance: BaseDistance) -> Kind:
    """How ``pair_values`` evaluates ``distance``: row by row for PML's own ``compute_mat``, else the matrix.

    The kind is ``kind_of``'s; a distance with a ``forward`` of its own is ``"generic"`` here: its matrix through
    ``distance(...)``. Row by row in every dtype: ``_rowwise`` follows ``compute_mat``'s float16 branch where it
    has one.
    """
    return "generic" if type(distance).forward is not BaseDistance.forward else kind_of(distance)


def repeat_layout(given: tuple[torch.Tensor, ...], ref_rows: int) -> int:
    """N when ``given`` is the recipe's ``.repeat`` layout, else 0; reads one value.

    The layout, with T negative pairs (``a2 = a`` in a 3-tuple): ``a2[j] = a2[0] + j % N`` with N >= 2 and M =
    T / N >= 2 an integer, and ``n[j] = n[0] + j``, consecutive rows, which fit in ``ref_emb`` only if T <=
    ``ref_rows`` (the caller dismisses longer tuples, most miners', from their lengths). In a 3-tuple ``p[j] =
    p[j % N]`` too; in a 4-tuple ``a1`` must hold one of the N anchors: a negative pair enters the loss only through
    a positive pair of its anchor (PML's ``a2 == a1``), so one such anchor is enough for the mis-pairing to change
    the loss -- requiring all N would miss the recipe run on some anchors' positives -- and with none these
    negatives enter no term. A few vectorized comparisons, one read.
    """
    a1, p, a2, n = (given[0], given[1], given[0], given[2]) if len(given) == 3 else given
    size = len(a2)
    k = torch.arange(size, device=a2.device)  # (T,)
    period = a2.max() - a2[0] + 1  # N, as a 0-d tensor
    phase = k % period  # (T,) j % N
    ok = (period >= 2) & (size % period == 0) & (2 * period <= size)
    ok = ok & (a2 == a2[0] + phase).all() & (n == n[0] + k).all()
    if len(given) == 3:
        ok = ok & (p == p[phase]).all()
    else:
        ok = ok & ((a1 >= a2[0]) & (a1 < a2[0] + period)).any()
    return int(period) if bool(ok) else 0


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    return type(x).__name__


def _check_embeddings(embeddings: torch.Tensor, ref_emb: torch.Tensor, distance: BaseDistance) -> Kind:
    for name, x in (("embeddings", embeddings), ("ref_emb", ref_emb)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor [batch_size, d]; got {_describe(x)}")
        if x.ndim != 2:
            raise ValueError(f"`{name}` must be [batch_size, d]; got shape {tuple(x.shape)}")
    if ref_emb.device != embeddings.device:
        raise ValueError(f"`ref_emb` is on {ref_emb.device} but `embeddings` on {embeddings.device}")
    kind = distance_kind(distance)
    if kind != "generic" and ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"`ref_emb` must be [R, d] with the embeddings' d={embeddings.shape[1]}; got shape {tuple(ref_emb.shape)}"
        )
    return kind


def _check_tuple(indices_tuple: object, device: torch.device) -> tuple[torch.Tensor, ...]:
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            "`indices_tuple` must be a tuple (a, p, n) or (a1, p, a2, n) of index tensors; "
            f"got {_describe(indices_tuple)}"
        )
    if len(indices_tuple) not in _NAMES:
        raise ValueError(f"`indices_tuple` must hold 3 tensors (a, p, n) or 4 (a1, p, a2, n); got {len(indices_tuple)}")
    names = _NAMES[len(indices_tuple)]
    for name, t in zip(names, indices_tuple, strict=True):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"`indices_tuple` entry `{name}` must be an int64 or int32 tensor; got {_describe(t)}")
        if t.ndim != 1:
            raise ValueError(f"`indices_tuple` entry `{name}` must be one-dimensional; got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"`indices_tuple` entry `{name}` is on {t.device} but `embeddings` on {device}")
    lengths = [len(t) for t in indices_tuple]
    if len(lengths) == 3 and len(set(lengths)) != 1:
        raise ValueError(f"`indices_tuple` entries a, p, n must have one length (one per triplet); got {lengths}")
    if len(lengths) == 4 and (lengths[0] != lengths[1] or lengths[2] != lengths[3]):
        raise ValueError(
            f"`indices_tuple` entries a1, p must have one length (positive pairs), and a2, n one length "
            f"(negative pairs); got {lengths}"
        )
    return tuple(indices_tuple)


def _check_range(pairs: Pairs, rows: int, cols: int, given: tuple[torch.Tensor, ...] | None) -> None:
    """Every row index in ``[-rows, rows)`` and column index in ``[-cols, cols)``, as PML's indexing takes them."""
    source = "labels" if given is None else "indices_tuple"
    names = ("a1", "p", "a2", "n") if given is None or len(given) == 4 else ("a", "p", "a", "n")
    bounds = (rows, cols, rows, cols)
    if pairs[0].device.type != "cpu" or is_compiling():  # checked where the values are: no host synchronisation
        ok = torch.stack([((t >= -b) & (t < b)).all() for t, b in zip(pairs, bounds, strict=True)]).all()
        torch._assert_async(ok, f"`{source}` holds an index out of range for `embeddings` or `ref_emb`")
        return
    for name, t, b, owner in zip(names, pairs, bounds, ("embeddings", "ref_emb") * 2, strict=True):
        bad = (t < -b) | (t >= b)
        if bool(bad.any()):
            raise ValueError(
                f"`{source}` entry `{name}` holds {int(t[bad][0])}, out of range for `{owner}` with {b} rows "
                f"(valid: {-b} to {b - 1})"
            )
