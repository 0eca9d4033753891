"""Batches bigger than memory: InfoNCE over an encoder with cached embedding gradients (GradCache).

Gao, Zhang, Han and Callan (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". A
contrastive loss depends on the encoder's parameters θ only through the embeddings e_b, so
``d loss / d θ = Σ_b (d loss / d e_b) · (d e_b / d θ)``: embed everything without a graph, take the loss's
gradient with respect to the (small) embeddings once, then re-embed one mini-batch at a time with a graph and push
its slice of that cached gradient through it. Memory: one mini-batch's activations plus the embeddings and their
gradients; time: one extra forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .loss import InfoNCE, infonce

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


def _got(x: object) -> str:
    """``x``'s type name, with the way to convert a NumPy array (as ``infonce``'s messages give it)."""
    numpy = sys.modules.get("numpy")  # an ndarray exists only if numpy was imported: never import it here
    hint = " (convert it with torch.from_numpy(...))" if numpy is not None and isinstance(x, numpy.ndarray) else ""
    return f"{type(x).__name__}{hint}"


def _as_dict(name: str, x: object) -> tuple[dict[str, torch.Tensor], bool]:
    """``{key: tensor}`` (key ``""`` for a plain tensor) and whether ``x`` was a plain tensor."""
    if isinstance(x, torch.Tensor):
        items, plain = {"": x}, True
    elif isinstance(x, Mapping):
        if not x:
            raise ValueError(f"`{name}` is an empty dict; pass the encoder's inputs (a tensor or a dict of tensors)")
        items, plain = dict(x), False
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor or a dict of tensors (as tokenizers return); got {_got(x)}")
    for key, t in items.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_label(name, key)} must be a torch.Tensor; got {_got(t)}")
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


@functools.cache
def _config_keywords() -> frozenset[str]:
    """The configuration keywords of ``InfoNCE.__init__``; ``infonce``'s others are ``InfoNCE.forward``'s data."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(InfoNCE.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.kind in kinds and p.name != "self")


def _criterion(criterion: object, options: dict[str, Any]) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """The loss to call on the embeddings and its keyword arguments, every check that needs no data made now.

    ``None`` is ``infonce``: its configuration keywords (temperature, directions, engine, ...) build an
    ``InfoNCE`` here, which validates them before any encoder call; the rest (masks, ids, ...) go to its ``forward``.
    Same numbers: ``infonce`` and ``InfoNCE.forward`` run one computation.
    """
    if criterion is None:
        _check_options(infonce, options)
        config = {key: v for key, v in options.items() if key in _config_keywords()}
        module = InfoNCE(**config)
        data = {key: v for key, v in options.items() if key not in config}
        _check_options(module, data)
        return module, data
    if not callable(criterion):
        raise TypeError(
            f"`criterion` must be callable (an InfoNCE module, say) or None; got {type(criterion).__name__}"
        )
    _check_options(criterion, options)
    return criterion, options


def _check_encoder(encoder: object) -> None:
    """Callable, and an ``nn.Module`` with parameters has one that requires grad (a plain callable: see pass 2)."""
    if not callable(encoder):
        raise TypeError(f"`encoder` must be callable (an nn.Module, say); got {type(encoder).__name__}")
    if isinstance(encoder, nn.Module):
        parameters = list(encoder.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            raise ValueError(
                f"`encoder` is frozen: none of its {len(parameters)} parameter tensors requires grad, so it would "
                "get no gradient. Unfreeze what you train (`requires_grad_(True)`); to train only the loss's "
                "parameters, embed under torch.no_grad() and call the loss yourself"
            )


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
        raise TypeError(f"`encoder` must return a tensor of embeddings [B, d]; got {_got(out)} for {where}")
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


def _leaves(root: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every leaf tensor that a backward from ``root`` writes a ``.grad`` into: its graph's AccumulateGrad nodes."""
    if root.grad_fn is None:
        if root.requires_grad:
            yield root
        return
    seen: set[Any] = set()
    stack: list[Any] = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if isinstance(variable, torch.Tensor):
            yield variable
        stack.extend(child for child, _ in node.next_functions)


class _Undo:
    """What the step writes outside itself, as it was before: ``.grad`` of every leaf it reaches, encoder buffers.

    A ``.grad`` is recorded (cloned if it exists) before the first backward that can reach it; the encoder's
    buffers once, before the first pass. Memory: a copy of the gradients that existed at the call (none after
    ``zero_grad()``) and of the encoder's buffers (BatchNorm's statistics, say).
    """

    def __init__(self, encoder: object) -> None:
        self.grads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        if isinstance(encoder, nn.Module):
            self.keep_grads(encoder.parameters())  # also those a reentrant checkpoint hides from the graph
            for module in encoder.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    if not is_lazy(buffer):
                        self.buffers.append((module, name, buffer, buffer.detach().clone()))

    def keep_grads(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t.requires_grad and t.is_leaf and id(t) not in self.grads:
                self.grads[id(t)] = (t, None if t.grad is None else t.grad.detach().clone())

    def reset_buffers(self) -> None:
        """The encoder's buffers as at the call: the same tensors (a forward may reassign one), the same values."""
        with torch.no_grad():
            for module, name, buffer, saved in self.buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
                else:  # resized in place: the copy is the state
                    buffer = saved
                module._buffers[name] = buffer

    def restore(self) -> None:
        for t, saved in self.grads.values():
            t.grad = saved
        self.reset_buffers()


def _first_pass(
    encoder: Callable[..., Any], plan: list[tuple[_Group, int, int]], cuda: bool
) -> tuple[list[_RngState], dict[str, torch.Tensor]]:
    """Pass 1: the RNG state before each mini-batch, and every group's embeddings ``(R, d)``, without a graph."""
    states: list[_RngState] = []
    parts: dict[str, list[torch.Tensor]] = {group.name: [] for group, _, _ in plan}
    d: int | None = None
    with torch.no_grad():
        for group, start, stop in plan:
            states.append(_get_rng(cuda))
            out = _embed(encoder, group, start, stop)
            d = _check_output(out, group, start, stop, d)
            parts[group.name].append(out)
    return states, {name: torch.cat(outs) for name, outs in parts.items() if outs}  # each (R, d)


def _cached_gradients(
    loss_fn: Callable[..., torch.Tensor],
    groups: list[_Group],
    embeddings: dict[str, torch.Tensor],
    data: dict[str, Any],
    scaler: _Scaler | None,
    undo: _Undo,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the embeddings, and its (scaled) gradient w.r.t. each group's ``(R, d)``.

    The loss's other leaves (a temperature, the criterion's parameters) accumulate theirs, recorded in ``undo`` first.
    """
    first = embeddings["anchors"]
    d = first.shape[1]
    leaves = {  # (R, d); an empty group (M = 0) has no mini-batch
        g.name: (embeddings[g.name] if g.name in embeddings else first.new_empty(0, d)).detach().requires_grad_()
        for g in groups
    }
    views: list[torch.Tensor | None] = [leaves[g.name].view(*g.lead, d) for g in groups]  # (N, d), (N, [K,] d), ..
    views += [None] * (3 - len(views))  # negatives=None
    loss = loss_fn(*views, **data)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        got = _shape(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"`criterion` must return a 0-d loss; got {got}")
    if not loss.requires_grad:
        raise ValueError("`criterion`'s loss does not depend on the embeddings (it does not require grad)")
    scaled = loss if scaler is None else scaler.scale(loss)
    own = {id(leaf) for leaf in leaves.values()}
    undo.keep_grads(t for t in _leaves(scaled) if id(t) not in own)
    scaled.backward()
    cached = {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}
    return loss.detach(), cached


def _moved(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """How far re-embedded rows moved: max over rows r of ``|new_r - old_r| / max(|old_r|, rms over rows)``, 0-d.

    On the device (no host sync); NaN where one pass gave NaN and the other did not.
    """
    wide = torch.promote_types(old.dtype, torch.float32)
    new, old = new.detach().to(wide), old.to(wide)
    same = (new == old) | (new.isnan() & old.isnan())  # equal infinities, and NaN in both, are no difference
    diff = torch.where(same, 0.0, new - old).norm(dim=1)  # (B,)
    size = old.norm(dim=1)  # (B,)
    scale = torch.maximum(size, size.square().mean().sqrt())  # (B,) a row near 0: the mini-batch's rms norm
    worst: torch.Tensor = (diff / scale.clamp_min(torch.finfo(wide).tiny)).max()
    return worst


def _fastpath_advice() -> str:
    mha = getattr(torch.backends, "mha", None)
    if mha is not None and hasattr(mha, "set_fastpath_enabled"):
        return "call torch.backends.mha.set_fastpath_enabled(False) or put the encoder in train() mode"
    return "put the encoder in train() mode"


def _check_same(moved: list[torch.Tensor], plan: list[tuple[_Group, int, int]], dtype: torch.dtype) -> None:
    """Raise if a mini-batch embedded with grad moved further from its first-pass embeddings than ``dtype`` allows."""
    tolerance = torch.finfo(dtype).eps ** 0.5  # float32: 3.5e-4; bfloat16: 8.8e-2; float64: 1.5e-8
    for (group, start, stop), value in zip(plan, torch.stack(moved).tolist(), strict=True):  # one host sync
        if not value <= tolerance:  # NaN fails too
            raise RuntimeError(
                f"`encoder` embedded the mini-batch of `{group.name}` rows {start}:{stop} differently with grad "
                f"(pass 2) than under no_grad (pass 1): a row moved by {value:.3g} of its norm (tolerance "
                f"{tolerance:.1e} for {dtype}), so the cached gradient does not belong to these embeddings. "
                "Likely cause: a forward that depends on grad mode, such as PyTorch's transformer fast path "
                "(nn.TransformerEncoder / nn.MultiheadAttention in eval() under no_grad returns 0 at padded "
                f"positions): {_fastpath_advice()}. Randomness not drawn from torch's global generators (not "
                "replayed) does it too. Nothing was written: the step is undone"
            )


def _second_pass(
    encoder: Callable[..., Any],
    plan: list[tuple[_Group, int, int]],
    states: list[_RngState],
    embeddings: dict[str, torch.Tensor],
    cached: dict[str, torch.Tensor],
    undo: _Undo,
    cuda: bool,
) -> None:
    """Pass 2: each mini-batch again, with a graph, and the backward of its slice of ``cached``.

    From its RNG state and the encoder's buffers as at the call; the re-embeddings are checked against pass 1's
    before the last backward (which triggers DDP's all-reduce).
    """
    # Under autocast, torch < 2.3 caches the weight casts made under no_grad and would reuse them here, without a
    # graph back to the weights: drop the cache (a cast costs little; existing graphs keep their own copies).
    torch.clear_autocast_cache()
    undo.reset_buffers()
    no_sync = getattr(encoder, "no_sync", None)
    devices = list(range(torch.cuda.device_count())) if cuda else []
    moved: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=devices):  # on exit: the state pass 1 left
        for i, ((group, start, stop), state) in enumerate(zip(plan, states, strict=True)):
            _set_rng(state, cuda)
            last = i == len(plan) - 1
            with contextlib.nullcontext() if last or not callable(no_sync) else no_sync():
                out = _embed(encoder, group, start, stop)
                old = embeddings[group.name][start:stop]
                _check_again(out, group, start, stop, old.shape[1])
                moved.append(_moved(out, old))
                if last:  # before DDP's all-reduce: a wrong gradient never leaves this rank
                    _check_same(moved, plan, old.dtype)
                undo.keep_grads(_leaves(out))
                out.backward(cached[group.name][start:stop])
            del out  # this mini-batch's graph is gone before the next one is built


def _check_again(out: object, group: _Group, start: int, stop: int, d: int) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != (stop - start, d):
        got = _shape(out) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"`encoder` returned {got} when re-embedding the mini-batch of `{group.name}` rows "
            f"{start}:{stop}, and ({stop - start}, {d}) in the first pass"
        )
    if not out.requires_grad:
        raise ValueError("`encoder`'s output does not require grad: does any of its parameters?")


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
    2. re-embed each mini-batch with a graph, from its recorded RNG state (and an ``nn.Module`` encoder from its
       buffers as they were at the call), and call ``embeddings.backward(cached_gradient)``: the encoder's
       parameters accumulate their full-batch gradient, and the mini-batch's activations are freed before the
       next one.

    So dropout and other randomness drawn from the global generators are replayed, and the gradient equals that of
    one backward over the same mini-batches embedded in the same order with a graph; encoders in ``train()`` or
    ``eval()`` mode both work. **RNG:** on return the global generators are where pass 1 and the loss left them,
    as after that one-graph step: the replay in pass 2 draws from saved states and leaves no trace. Randomness from
    an explicit ``torch.Generator``, Python or NumPy is not replayed (pass 2 then embeds differently: it raises).
    **State:** an ``nn.Module`` encoder's buffers are copied at the call and put back after pass 1, so pass 2
    replays that state too and BatchNorm's running statistics end updated once per mini-batch, as after the
    one-graph step. A plain callable's own state is updated by both passes.

    **Pass 2 must embed as pass 1 did.** Each re-embedded mini-batch is compared with its pass-1 embeddings, per
    row relative to the norm, within ``sqrt(eps)`` of their dtype (3.5e-4 in float32, 8.8e-2 in bfloat16: room
    for GPU nondeterminism), once before the last backward (one host sync per step); a difference raises instead
    of returning the gradient of other embeddings. The usual cause is a forward that depends on grad mode:
    ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` in ``eval()`` with a padding mask take a fast path under
    ``no_grad`` that returns 0 at padded positions; call ``torch.backends.mha.set_fastpath_enabled(False)`` or
    embed in ``train()`` mode.

    **A step that raises writes nothing.** Whatever fails (a bad option or input, the encoder, the loss, the
    comparison above), every ``.grad`` the step may have written is put back as it was at the call: the encoder's
    parameters and every other leaf that the graphs of pass 2 or of the loss reach (an ``nn.Parameter``
    temperature, an ``InfoNCE``'s ``log_temperature``, a ``loss_fn``'s parameters, a parameter a criterion closes
    over), and so are an ``nn.Module`` encoder's buffers. It costs a copy of the buffers and of the gradients
    that exist at the call (none after ``optimizer.zero_grad()``), and a walk of each graph. Not covered: the
    parameters of a plain-callable encoder that only a reentrant ``torch.utils.checkpoint`` reaches.

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
            ``infonce`` (the options that configure an ``InfoNCE`` build one
            before the encoder runs, so they are checked first; same numbers). Pass an
            ``InfoNCE`` module to use its configuration and its learnable temperature (its
            ``log_temperature`` gets its gradient), or any function of the embeddings (say, a loss multiplied by a
            per-rank weight).
        scaler: a ``torch.amp.GradScaler`` (anything with ``scale(tensor)``), or ``None``.
        **options: keyword arguments of ``criterion`` (for ``infonce``: ``temperature``, a float
            or an ``nn.Parameter``; ``loss_fn``; ``negatives_mask``; ``in_batch``; ids; ``gather_across_devices``;
            ...). Tensor options such as masks and ids are indexed by anchor, as in ``infonce``.

    Returns:
        The loss, a detached 0-d tensor (unscaled).

    Raises:
        TypeError: ``encoder`` not callable; an input that is neither a tensor nor a dict of tensors (a NumPy
            array: convert it with ``torch.from_numpy``), or a tensor where ``anchors`` is a dict (or the reverse);
            ``mini_batch_size`` not an int; an option that ``criterion`` does not take; an encoder output that is
            not a floating-point tensor.
        ValueError: inputs whose first dimensions (N, and K or M within a dict) disagree, or with the wrong number
            of dimensions; dicts with different keys; ``mini_batch_size`` < 1; an ``nn.Module`` encoder with
            parameters none of which requires grad (frozen); with ``criterion=None``, a bad configuration option
            (``temperature``, ``directions``, ``engine``, ...: ``InfoNCE``'s checks); an encoder output that is
            not ``[B, d]`` with one d. All but the encoder output checks are made before the encoder is called;
            the output is checked on every mini-batch of the no-grad pass, and the checks of the loss's data
            (masks, ids: ``infonce``'s) run after that pass, before any encoder call with grad. Also: a criterion
            that does not return a 0-d tensor depending on the embeddings; a plain-callable encoder whose output
            does not require grad (raised at its first call with grad).
        RuntimeError: grad disabled (``torch.no_grad()``); an encoder that returns another shape, or other
            embeddings (see above), when it re-embeds a mini-batch.

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
    _check_encoder(encoder)
    size = _check_mini_batch_size(mini_batch_size)
    groups = _groups(anchors, positives, negatives)
    loss_fn, data = _criterion(criterion, options)
    plan = list(_chunks(groups, size))
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    undo = _Undo(encoder)
    try:
        states, embeddings = _first_pass(encoder, plan, cuda)
        loss, cached = _cached_gradients(loss_fn, groups, embeddings, data, scaler, undo)
        _second_pass(encoder, plan, states, embeddings, cached, undo, cuda)
    except BaseException:
        undo.restore()
        raise
    return loss
