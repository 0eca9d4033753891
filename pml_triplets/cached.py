"""Batches bigger than memory: InfoNCE over an encoder with cached embedding gradients (GradCache).

Gao, Zhang, Han and Callan (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". A
contrastive loss depends on the encoder's parameters θ only through the embeddings e_b, so
``d loss / d θ = Σ_b (d loss / d e_b) · (d e_b / d θ)``: embed everything without a graph, take the loss's
gradient with respect to the (small) embeddings once, then re-embed one mini-batch at a time with a graph and push
its slice of that cached gradient through it. Memory: one mini-batch's activations plus the embeddings; time: one
extra forward pass.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .loss import infonce

__all__ = ["cached_step"]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
_GROUPS = ("anchors", "positives", "negatives")


class _Scaler(Protocol):
    """What ``cached_step`` uses of a ``torch.amp.GradScaler``."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Group:
    """One of anchors / positives / negatives: its inputs flattened to ``R`` rows, and its embeddings' shape."""

    name: str
    inputs: dict[str, torch.Tensor]  # key "" for a plain tensor; each (R, ...)
    plain: bool  # a tensor, not a dict: the encoder is called as encoder(x), not encoder(**x)
    lead: tuple[int, ...]  # leading dims of the embeddings: (N,), (N, K) or (N, M); R = prod(lead)

    @property
    def rows(self) -> int:
        return int(torch.Size(self.lead).numel())


def _label(name: str, key: str) -> str:
    return f"`{name}`" if key == "" else f"`{name}[{key!r}]`"


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(v) for v in x.shape) + ("," if x.ndim == 1 else "") + ")"


def _as_dict(name: str, x: object) -> tuple[dict[str, torch.Tensor], bool]:
    """``{key: tensor}`` (key ``""`` for a plain tensor) and whether ``x`` was a plain tensor."""
    if isinstance(x, torch.Tensor):
        items, plain = {"": x}, True
    elif isinstance(x, Mapping):
        if not x:
            raise ValueError(f"`{name}` is an empty dict; pass the encoder's inputs (a tensor or a dict of tensors)")
        items, plain = dict(x), False
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor or a dict of tensors (as tokenizers return); got {type(x)}")
    for key, t in items.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_label(name, key)} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"{_label(name, key)} must be batched on dim 0; got a 0-d tensor")
    return items, plain


def _common(name: str, items: dict[str, torch.Tensor], dim: int, label: str) -> int:
    """The size of ``dim`` shared by every tensor of ``items``; raises naming the first one that disagrees."""
    first, ref = next(iter(items.items()))
    for key, t in items.items():
        if t.shape[dim] != ref.shape[dim]:
            raise ValueError(
                f"{_label(name, key)} has {label}={t.shape[dim]} but {_label(name, first)} has "
                f"{label}={ref.shape[dim]}; got {_shape(t)}"
            )
    return int(ref.shape[dim])


def _groups(anchors: object, positives: object, negatives: object) -> list[_Group]:
    """Check the three inputs against each other (types, keys, N, K, M) and flatten them to rows."""
    a, plain = _as_dict("anchors", anchors)
    n = _common("anchors", a, 0, "N")
    if n == 0:
        raise ValueError(f"`anchors` is an empty batch (N=0); got {_shape(next(iter(a.values())))}")
    groups = [_Group("anchors", a, plain, (n,))]
    for name, x in (("positives", positives), ("negatives", negatives)):
        if x is None:
            if name == "positives":
                raise TypeError("`positives` must be a torch.Tensor or a dict of tensors; got None")
            continue
        items, this_plain = _as_dict(name, x)
        if this_plain != plain:
            want = "a torch.Tensor" if plain else "a dict of tensors"
            raise TypeError(f"`{name}` must be {want}, like `anchors`; got {type(x).__name__}")
        if items.keys() != a.keys():
            raise ValueError(f"`{name}` has keys {sorted(items)} but `anchors` has keys {sorted(a)}")
        for key, t in items.items():
            extra = t.ndim - a[key].ndim  # positives: 0 ([N, ...]) or 1 ([N, K, ...]); negatives: 1 ([N, M, ...])
            allowed = (0, 1) if name == "positives" else (1,)
            if extra not in allowed:
                want = "[N, ...] or [N, K, ...]" if name == "positives" else "[N, M, ...]"
                raise ValueError(
                    f"{_label(name, key)} must be {want}: {' or '.join(str(a[key].ndim + e) for e in allowed)} "
                    f"dims, as {_label('anchors', key)} {_shape(a[key])} has {a[key].ndim}; got {_shape(t)}"
                )
            if t.shape[0] != n:
                raise ValueError(f"{_label(name, key)} has N={t.shape[0]} but `anchors` has N={n}; got {_shape(t)}")
        nested = next(iter(items.values())).ndim > next(iter(a.values())).ndim
        if any((t.ndim > a[key].ndim) != nested for key, t in items.items()):
            raise ValueError(f"the tensors of `{name}` must all be [N, ...] or all be [N, K, ...]")
        if not nested:
            groups.append(_Group(name, items, plain, (n,)))
            continue
        per_row = _common(name, items, 1, "K" if name == "positives" else "M")
        if per_row == 0 and name == "positives":
            raise ValueError(f"`positives` has K=0 positives per anchor; got {_shape(next(iter(items.values())))}")
        flat = {key: t.flatten(0, 1) for key, t in items.items()}  # (N*K, ...) or (N*M, ...)
        groups.append(_Group(name, flat, plain, (n, per_row)))
    return groups


def _check_mini_batch_size(mini_batch_size: object) -> int:
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, numbers.Integral):
        raise TypeError(f"`mini_batch_size` must be an int; got {type(mini_batch_size).__name__}")
    if mini_batch_size < 1:
        raise ValueError(f"`mini_batch_size` must be >= 1; got {mini_batch_size}")
    return int(mini_batch_size)


def _check_options(criterion: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise ``TypeError`` now, before any encoding, for an option that ``criterion`` does not take."""
    target = criterion.forward if isinstance(criterion, nn.Module) else criterion
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (a builtin): the call itself will tell
        return
    try:
        signature.bind(None, None, None, **options)
    except TypeError as err:
        who = getattr(target, "__qualname__", type(criterion).__name__)
        raise TypeError(f"`criterion` ({who}) does not take these options: {err}") from None


def _chunks(groups: list[_Group], size: int) -> Iterator[tuple[_Group, int, int]]:
    """Every mini-batch, in the order both passes embed them: anchors, positives, negatives, rows in order."""
    for group in groups:
        for start in range(0, group.rows, size):
            yield group, start, min(start + size, group.rows)


def _embed(encoder: Callable[..., Any], group: _Group, start: int, stop: int) -> Any:
    rows = {key: t[start:stop] for key, t in group.inputs.items()}
    return encoder(rows[""]) if group.plain else encoder(**rows)


def _check_output(out: object, group: _Group, start: int, stop: int, d: int | None) -> int:
    """The embedding size d of one mini-batch's output, which must be [B, d] floating point (and d as before)."""
    where = f"the mini-batch of `{group.name}` rows {start}:{stop}"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"`encoder` must return a tensor of embeddings [B, d]; got {type(out).__name__} for {where}")
    if out.ndim != 2 or out.shape[0] != stop - start:
        raise ValueError(
            f"`encoder` must return embeddings [B, d] = [{stop - start}, d] for {where}; got {_shape(out)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"`encoder` must return floating-point embeddings; got {out.dtype} for {where}")
    if d is not None and out.shape[1] != d:
        raise ValueError(f"`encoder` returned d={out.shape[1]} for {where} but d={d} before; got {_shape(out)}")
    return int(out.shape[1])


_RngState = tuple[torch.Tensor, list[torch.Tensor]]


def _get_rng(cuda: bool) -> _RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else []


def _set_rng(state: _RngState, cuda: bool) -> None:
    torch.set_rng_state(state[0])
    if cuda:
        torch.cuda.set_rng_state_all(state[1])


def cached_step(
    encoder: Callable[..., torch.Tensor],
    anchors: Inputs,
    positives: Inputs,
    negatives: Inputs | None = None,
    *,
    mini_batch_size: int,
    criterion: Callable[..., torch.Tensor] | None = None,
    scaler: _Scaler | None = None,
    **options: Any,
) -> torch.Tensor:
    r"""One full-batch InfoNCE backward through ``encoder``, holding one mini-batch's activations at a time.

    The gradient that ``infonce(encoder(anchors), encoder(positives), encoder(negatives), **options).backward()``
    would accumulate, in two passes (GradCache, Gao et al. 2021):

    1. embed every input in mini-batches of ``mini_batch_size`` rows under ``torch.no_grad()`` -- anchors, then
       positives, then negatives, rows in order -- recording the global RNG state (CPU, and CUDA when it is
       initialized) before each mini-batch; evaluate the loss once on detached copies of the embeddings that
       require grad, and backpropagate it: this caches ``d loss / d embeddings`` (and accumulates the gradient of
       a temperature that requires grad, or of the criterion's ``log_temperature``, exactly once);
    2. re-embed each mini-batch with a graph, from its recorded RNG state, and call
       ``embeddings.backward(cached_gradient)``: the encoder's parameters accumulate their full-batch gradient,
       and the mini-batch's activations are freed before the next one.

    So dropout and other randomness drawn from the global generators are replayed, and the gradient equals that of
    one backward over the same mini-batches embedded in the same order with a graph; encoders in ``train()`` or
    ``eval()`` mode both work. **RNG:** on return the global generators are where pass 1 and the loss left them,
    as after that one-graph step: the replay in pass 2 draws from saved states and leaves no trace. Randomness from
    an explicit ``torch.Generator``, Python or NumPy is not replayed.

    **What the caller still does:** ``optimizer.zero_grad()`` before (gradients accumulate into ``.grad``, as with
    ``backward()``) and ``optimizer.step()`` after (``scaler.step(optimizer); scaler.update()`` with a scaler).
    **Under DistributedDataParallel every rank calls it** each step, with the same number of mini-batches (equal
    N, same ``mini_batch_size``): with ``gather_across_devices=True`` the loss all-gathers and its backward
    all-reduces, and the forward of a DDP encoder may synchronize buffers. An encoder with a ``no_sync()`` context
    (DDP, FSDP) re-embeds all but the last mini-batch inside it, so its gradients are all-reduced once. A
    learnable temperature is local to each rank: all-reduce its gradient yourself, as with ``infonce``.

    **Mixed precision:** call it inside ``torch.autocast(...)``: both passes embed under it and the loss computes
    in float32 inside. Pass ``scaler`` (a ``torch.amp.GradScaler``) and the loss's backward in pass 1 runs on
    ``scaler.scale(loss)``: the cached gradients, hence the encoder's (and the temperature's) gradients, are scaled
    exactly as ``scaler.scale(loss).backward()`` would scale them.

    Args:
        encoder: a callable (usually an ``nn.Module``) mapping a mini-batch of inputs, ``[B, ...]`` or a dict of
            ``[B, ...]`` tensors passed as keyword arguments (``encoder(**batch)``), to embeddings ``[B, d]``.
        anchors: the anchors' inputs, ``[N, ...]``, or a dict of such tensors (``input_ids``, ``attention_mask``).
        positives: ``[N, ...]`` (as many dimensions as ``anchors``) or ``[N, K, ...]`` (one more), or a dict with
            ``anchors``' keys. Trailing sizes may differ from the anchors' (another padded length).
        negatives: ``[N, M, ...]`` (one dimension more than ``anchors``), a dict with ``anchors``' keys, or
            ``None``.
        mini_batch_size: rows embedded at a time, in each pass (need not divide N, N*K or N*M).
        criterion: the loss of the embeddings, called once as ``criterion(anchors [N, d], positives [N, d] or
            [N, K, d], negatives [N, M, d] or None, **options)``; must return a 0-d tensor. ``None`` means
            :func:`~pml_triplets.infonce`. Pass an :class:`~pml_triplets.InfoNCE` module to use its configuration
            and its learnable temperature (its ``log_temperature`` gets its gradient), or any function of the
            embeddings (say, a loss multiplied by a per-rank weight).
        scaler: a ``torch.amp.GradScaler`` (anything with ``scale(tensor)``), or ``None``.
        **options: keyword arguments of ``criterion`` (for :func:`~pml_triplets.infonce`: ``temperature``, a float
            or an ``nn.Parameter``; ``loss_fn``; ``negatives_mask``; ``in_batch``; ids; ``gather_across_devices``;
            ...). Tensor options such as masks and ids are indexed by anchor, as in ``infonce``.

    Returns:
        The loss, a detached 0-d tensor (unscaled).

    Raises:
        TypeError: ``encoder`` not callable; an input that is neither a tensor nor a dict of tensors, or a tensor
            where ``anchors`` is a dict (or the reverse); ``mini_batch_size`` not an int; an option that
            ``criterion`` does not take; an encoder output that is not a floating-point tensor.
        ValueError: inputs whose first dimensions (N, and K or M within a dict) disagree, or with the wrong number
            of dimensions; dicts with different keys; ``mini_batch_size`` < 1; an encoder output that is not
            ``[B, d]`` with one d. All but the encoder checks are made before the encoder is called; the encoder's
            output is checked on every mini-batch of the no-grad pass, and the loss's own checks (``infonce``'s)
            run after that pass -- before any encoder call with grad, and before any gradient is written. Also: a
            criterion that does not return a 0-d tensor depending on the embeddings; an encoder whose output does
            not require grad (raised at its first call with grad).
        RuntimeError: grad disabled (``torch.no_grad()``); an encoder that returns another shape when it
            re-embeds a mini-batch.

    Example:
        >>> import torch, pml_triplets as pt
        >>> _ = torch.manual_seed(0)
        >>> encoder = torch.nn.Linear(8, 4)
        >>> a, p, n = torch.randn(10, 8), torch.randn(10, 8), torch.randn(10, 3, 8)  # inputs: [N, ...], [N, M, ...]
        >>> loss = pt.cached_step(encoder, a, p, n, mini_batch_size=4, temperature=0.1)
        >>> full = pt.infonce(encoder(a), encoder(p), encoder(n), temperature=0.1)  # one graph over everything
        >>> grad = torch.autograd.grad(full, encoder.weight)[0]
        >>> torch.allclose(loss, full), torch.allclose(encoder.weight.grad, grad)
        (True, True)
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("`cached_step` computes gradients: call it with grad enabled, not under torch.no_grad()")
    if not callable(encoder):
        raise TypeError(f"`encoder` must be callable (an nn.Module, say); got {type(encoder).__name__}")
    size = _check_mini_batch_size(mini_batch_size)
    groups = _groups(anchors, positives, negatives)
    loss_fn: Callable[..., torch.Tensor] = infonce if criterion is None else criterion
    if not callable(loss_fn):
        raise TypeError(
            f"`criterion` must be callable (an InfoNCE module, say) or None; got {type(criterion).__name__}"
        )
    _check_options(loss_fn, options)
    plan = list(_chunks(groups, size))
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()

    # Pass 1: every embedding, without a graph; the RNG state before each mini-batch.
    states: list[_RngState] = []
    parts: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    d: int | None = None
    with torch.no_grad():
        for group, start, stop in plan:
            states.append(_get_rng(cuda))
            out = _embed(encoder, group, start, stop)
            d = _check_output(out, group, start, stop, d)
            parts[group.name].append(out)
    first = parts["anchors"][0]  # N >= 1: there is always one
    assert d is not None
    leaves = {
        g.name: (torch.cat(parts[g.name]) if parts[g.name] else first.new_empty(0, d)).requires_grad_()  # (R, d)
        for g in groups
    }
    del parts
    views: list[torch.Tensor | None] = [leaves[g.name].view(*g.lead, d) for g in groups]  # (N, d), (N, [K,] d), ...
    views += [None] * (3 - len(views))  # negatives=None

    loss = loss_fn(*views, **options)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        got = _shape(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"`criterion` must return a 0-d loss; got {got}")
    if not loss.requires_grad:
        raise ValueError("`criterion`'s loss does not depend on the embeddings (it does not require grad)")
    (loss if scaler is None else scaler.scale(loss)).backward()
    cached = {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}
    del leaves, views

    # Pass 2: each mini-batch again, with a graph, from its RNG state; its slice of the cached gradient.
    # Under autocast, torch < 2.3 caches the weight casts made under no_grad and would reuse them here, without a
    # graph back to the weights: drop the cache (a cast costs little; existing graphs keep their own copies).
    torch.clear_autocast_cache()
    no_sync = getattr(encoder, "no_sync", None)
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):  # on exit: the state pass 1 left
        for i, ((group, start, stop), state) in enumerate(zip(plan, states, strict=True)):
            _set_rng(state, cuda)
            last = i == len(plan) - 1
            with contextlib.nullcontext() if last or not callable(no_sync) else no_sync():
                out = _embed(encoder, group, start, stop)
                if not isinstance(out, torch.Tensor) or out.shape != (stop - start, d):
                    got = _shape(out) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise RuntimeError(
                        f"`encoder` returned {got} when re-embedding the mini-batch of `{group.name}` rows "
                        f"{start}:{stop}, and ({stop - start}, {d}) in the first pass"
                    )
                if not out.requires_grad:
                    raise ValueError("`encoder`'s output does not require grad: does any of its parameters?")
                out.backward(cached[group.name][start:stop])
            del out  # this mini-batch's graph is gone before the next one is built
    return loss.detach()
