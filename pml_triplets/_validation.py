"""Input checks shared by every public entry point, and the one normalized batch the engines consume.

Every check runs before any tensor work, reads shapes, dtypes, devices and layouts only (never a tensor's value),
and every message names the argument, the shape it expected (with the sizes already known filled in) and the
shape it got -- and, on a size mismatch, which argument fixed that size.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._compat import as_dtype, is_compiling, transformed
from ._inputs import WORK, Guide, Inputs, Temperature

__all__: list[str] = []  # private module


@dataclass(frozen=True)
class Spec:
    """Sizes of one validated call: N anchors, K positives and M negatives per anchor, S shared negatives, dim d."""

    n: int
    k: int
    m: int
    s: int
    d: int
    dtype: torch.dtype
    device: torch.device


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(v) for v in x.shape) + ("," if x.ndim == 1 else "") + ")"


_STACKED = {  # what a list of per-row tensors becomes
    "positives": "torch.stack(positives, dim=1) makes the [N, K, d] tensor of K positives per anchor",
    "negatives": "torch.stack(negatives, dim=1) makes the [N, M, d] tensor of M negatives per anchor",
}


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        numpy = sys.modules.get("numpy")  # an ndarray exists only if numpy was imported: never import it here
        hint = ""
        if numpy is not None and isinstance(x, numpy.ndarray):
            hint = " (convert it with torch.from_numpy(...))"
        elif isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
            shapes = ", ".join(str(list(t.shape)) for t in x[:3]) + (", ..." if len(x) > 3 else "")
            stack = _STACKED.get(name, "pass one tensor: torch.stack or torch.cat the list")
            hint = f" of {len(x)} tensors ({shapes}); {stack}"
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(x).__name__}{hint}")
    if x.is_nested:
        raise TypeError(f"`{name}` must be a dense tensor; got a nested tensor (pad it and pass a mask)")
    if x.layout != torch.strided:
        raise TypeError(f"`{name}` must be a dense tensor; got layout {x.layout} (call .to_dense())")
    if x.device.type == "meta":
        raise ValueError(f"`{name}` is on the meta device, which holds no values; pass real tensors")
    return x


def _floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        hint = " (cast with .float())"
        if name == "positives" and x.ndim == 1:  # infonce(embeddings, labels): PML's call, here
            hint = (
                ": class labels? `infonce` takes embeddings (anchors [N, d], positives [N, d], negatives [N, M, d]); "
                "for embeddings and labels, call the loss as PML does: pt.NTXentLoss()(embeddings, labels)"
            )
        raise TypeError(
            f"`{name}` must hold floating-point embeddings; got dtype {x.dtype} with shape {_shape(x)}{hint}"
        )


def _agree(name: str, t: torch.Tensor, dim: int, size: int, label: str, owner: str, hint: str = "") -> None:
    if t.shape[dim] != size:
        raise ValueError(f"`{name}` has {label}={t.shape[dim]} but `{owner}` has {label}={size}; got {_shape(t)}{hint}")


def _ids(name: str, x: object, ndims: tuple[int, ...], label: Callable[[], str], a: torch.Tensor) -> torch.Tensor:
    t = _tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor; got dtype {t.dtype}")
    if t.ndim not in ndims:
        raise ValueError(f"`{name}` must be {label()}; got {_shape(t)}")
    _same_device(name, t, a.device)
    return t


def check_temperature(temperature: object) -> Temperature:
    """A positive finite number as a float, or a 0-d floating tensor.

    A tensor's value is read only where that costs nothing: eagerly on the CPU. On an accelerator, and inside
    ``torch.compile``, the check is a device-side assertion (no host synchronisation, no graph break; it raises
    ``RuntimeError`` when the value is reached). Under ``torch.func`` transforms it is skipped.
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.ndim != 0 or not temperature.is_floating_point():
            raise TypeError(
                "`temperature` must be a float or a 0-d floating tensor; got a tensor of shape "
                f"{_shape(temperature)} and dtype {temperature.dtype}"
            )
        if transformed() or temperature.device.type == "meta":
            return temperature
        if temperature.device.type == "cpu" and not is_compiling():
            _check_positive(float(temperature.detach()))
        else:
            ok = torch.logical_and(temperature > 0, torch.isfinite(temperature))
            torch._assert_async(ok, "`temperature` must be positive and finite")
        return temperature
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        if is_compiling():  # a float that torch.compile traces (a schedule): checked in the graph, not read here
            torch._check(temperature > 0, lambda: "`temperature` must be positive")  # type: ignore[operator]
            return temperature  # type: ignore[return-value]
        return _check_positive(float(temperature))
    raise TypeError(f"`temperature` must be a float or a 0-d tensor; got {type(temperature).__name__}")


def _check_positive(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`temperature` must be positive and finite; got {value}")
    return value


def check_inputs(
    anchors: object,
    positives: object,
    negatives: object = None,
    negatives_mask: object = None,
    shared_negatives: object = None,
    positive_ids: object = None,
    negative_ids: object = None,
    shared_negative_ids: object = None,
    *,
    in_batch: bool = False,
) -> Spec:
    """Validate one call's data and return its sizes. Raises ``TypeError``/``ValueError`` naming the argument."""
    a, p = _tensor("anchors", anchors), _tensor("positives", positives)
    neg = None if negatives is None else _tensor("negatives", negatives)
    sh = None if shared_negatives is None else _tensor("shared_negatives", shared_negatives)
    for name, t in (("anchors", a), ("positives", p), ("negatives", neg), ("shared_negatives", sh)):
        if t is not None:
            _floating(name, t)
            if t.dtype != a.dtype:
                raise TypeError(
                    f"`{name}` has dtype {t.dtype} but `anchors` has {a.dtype}; inputs are not promoted, "
                    "cast them to one dtype"
                )
            _same_device(name, t, a.device)
    n, k, d = _check_pairs(a, p)
    m = 0 if neg is None else _check_negatives(neg, n, d)
    if sh is not None and sh.ndim != 2:
        raise ValueError(f"`shared_negatives` must be [S, d] = [S, {d}]; got {_shape(sh)}")
    if sh is not None:
        _agree("shared_negatives", sh, 1, d, "d", "anchors")
    if negatives_mask is not None:
        if neg is None:
            raise ValueError("`negatives_mask` was given without `negatives`")
        mask = _tensor("negatives_mask", negatives_mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"`negatives_mask` must be a bool tensor (True = real negative); got dtype {mask.dtype}")
        if mask.ndim != 2:
            raise ValueError(f"`negatives_mask` must be [N, M] = [{n}, {m}]; got {_shape(mask)}")
        _agree("negatives_mask", mask, 0, n, "N", "anchors")
        _agree("negatives_mask", mask, 1, m, "M", "negatives")
        _same_device("negatives_mask", mask, a.device)
    s = 0 if sh is None else sh.shape[0]
    if m == 0 and s == 0 and not in_batch:
        got = "None" if neg is None else _shape(neg)
        raise ValueError(
            f"no negatives: `negatives` must be [N, M, d] = [{n}, M, {d}] with M >= 1 (got {got}), "
            "or pass `shared_negatives` or `in_batch=True`"
        )
    if positive_ids is not None or negative_ids is not None or shared_negative_ids is not None:
        _check_ids(positive_ids, negative_ids, shared_negative_ids, a, p, m, neg is not None, sh, in_batch)
    return Spec(n=n, k=k, m=m, s=s, d=d, dtype=a.dtype, device=a.device)


def _check_pairs(a: torch.Tensor, p: torch.Tensor) -> tuple[int, int, int]:
    """N, K and d of anchors [N, d] and positives [N, d] or [N, K, d]."""
    if a.ndim != 2:
        raise ValueError(f"`anchors` must be [N, d]; got {_shape(a)}")
    n, d = a.shape
    if n == 0:
        raise ValueError(f"`anchors` must hold at least one row: [N, d] with N >= 1; got {_shape(a)}")
    if d == 0:
        raise ValueError(f"`anchors` must have d >= 1: [N, d]; got {_shape(a)}")
    if p.ndim not in (2, 3):
        raise ValueError(f"`positives` must be [N, d] = [{n}, {d}] or [N, K, d] = [{n}, K, {d}]; got {_shape(p)}")
    _agree("positives", p, 0, n, "N", "anchors")
    _agree("positives", p, -1, d, "d", "anchors")
    k = 1 if p.ndim == 2 else p.shape[1]
    if k == 0:
        raise ValueError(f"`positives` must hold K >= 1 positives per anchor: [N, K, d]; got {_shape(p)}")
    return n, k, d


def _check_negatives(neg: torch.Tensor, n: int, d: int) -> int:
    """M of negatives [N, M, d], with a hint for the usual wrong layouts."""
    if neg.ndim != 3:
        hint = ""
        if neg.ndim == 2 and tuple(neg.shape) == (n, d):
            hint = " (one negative per anchor? pass negatives.unsqueeze(1))"
        elif neg.ndim == 2 and neg.shape[1] == d:
            hint = " (flattened negatives? pass negatives.reshape(N, M, d))"
        raise ValueError(f"`negatives` must be [N, M, d] = [{n}, M, {d}]; got {_shape(neg)}{hint}")
    transposed = neg.shape[0] != n and neg.shape[1] == n
    _agree("negatives", neg, 0, n, "N", "anchors", " (did you pass [M, N, d]? use negatives.transpose(0, 1))"
           if transposed else "")  # fmt: skip
    _agree("negatives", neg, 2, d, "d", "anchors")
    return int(neg.shape[1])


def _check_ids(
    positive_ids: object,
    negative_ids: object,
    shared_negative_ids: object,
    a: torch.Tensor,
    p: torch.Tensor,
    m: int,
    negatives: bool,
    shared: torch.Tensor | None,
    in_batch: bool,
) -> None:
    if positive_ids is None:
        name = "negative_ids" if negative_ids is not None else "shared_negative_ids"
        raise ValueError(f"`{name}` needs `positive_ids`: ids only exclude candidates that share a positive's id")
    n, k = a.shape[0], 1 if p.ndim == 2 else p.shape[1]

    def shapes() -> str:  # built only to raise: formatting a size traced by torch.compile would fix it
        return (
            f"[N] or [N, K] = [{n}] or [{n}, {k}]" if p.ndim == 2 else f"[N, K] = [{n}, {k}] (positives are [N, K, d])"
        )

    pid = _ids("positive_ids", positive_ids, (1, 2) if p.ndim == 2 else (2,), shapes, a)
    _agree("positive_ids", pid, 0, n, "N", "anchors")
    if pid.ndim == 2:
        _agree("positive_ids", pid, 1, k, "K", "positives")
    if negative_ids is None and shared_negative_ids is None and not in_batch:
        raise ValueError(
            "`positive_ids` has no effect without `negative_ids`, `shared_negative_ids` or `in_batch=True`: "
            "nothing to compare it with"
        )
    if negative_ids is not None:
        if not negatives:
            raise ValueError("`negative_ids` was given without `negatives`")
        nid = _ids("negative_ids", negative_ids, (2,), lambda: f"[N, M] = [{n}, {m}]", a)
        _agree("negative_ids", nid, 0, n, "N", "anchors")
        _agree("negative_ids", nid, 1, m, "M", "negatives")
    if shared_negative_ids is not None:
        if shared is None:
            raise ValueError("`shared_negative_ids` was given without `shared_negatives`")
        sid = _ids("shared_negative_ids", shared_negative_ids, (1,), lambda: f"[S] = [{shared.shape[0]}]", a)
        _agree("shared_negative_ids", sid, 0, shared.shape[0], "S", "shared_negatives")


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but `anchors` is on {device}; move them to one device")


def prepare(
    x: Inputs, in_batch: bool, filtering: bool, hardness_mode: str | None, distillation: str | None = None
) -> tuple[Spec, Inputs]:
    """Validate the call's inputs ``x`` (one check per field), then bring them into the engine's form."""
    spec = check_inputs(
        x.anchors, x.positives, x.negatives, negatives_mask=x.negatives_mask, shared_negatives=x.shared_negatives,
        positive_ids=x.positive_ids, negative_ids=x.negative_ids, shared_negative_ids=x.shared_negative_ids,
        in_batch=in_batch,
    )  # fmt: skip
    check_teacher_scores(x.teacher_scores, spec, distillation)
    if hardness_mode == "own" and spec.m == 0:
        raise ValueError("`hardness_mode='own'` weighs each anchor's own negatives, and `negatives` is None")
    work = torch.float32 if spec.dtype in (torch.float16, torch.bfloat16) else spec.dtype
    guide = _check_guide(x.guide, spec, x.positives, filtering, x.shared_negatives is not None, work)
    n, k, pid = spec.n, spec.k, x.positive_ids
    shaped: dict[str, Any] = {"positives": x.positives.reshape(n, k, -1), "guide": guide}  # guide: unit, `work`
    if pid is not None:
        shaped["positive_ids"] = pid.reshape(n, k)  # (N, K)
    for name in WORK:  # each field declared "work": in the working dtype
        value = shaped.get(name, getattr(x, name))
        if isinstance(value, torch.Tensor):
            shaped[name] = as_dtype(value, work)
    return spec, x._replace(**shaped)


def check_teacher_scores(scores: object, spec: Spec, distillation: str | None) -> None:
    """``teacher_scores [N, K + M]``, floating, on the anchors' device: given exactly when ``distillation`` is."""
    if (scores is None) != (distillation is None):
        raise ValueError(
            "`teacher_scores` [N, K + M] must be given exactly when `distillation` is; got "
            f"teacher_scores={'None' if scores is None else 'a tensor'} and distillation={distillation!r}"
        )
    if scores is None:
        return
    t = _tensor("teacher_scores", scores)
    _floating("teacher_scores", t)
    if t.ndim != 2 or tuple(t.shape) != (spec.n, spec.k + spec.m):
        raise ValueError(
            f"`teacher_scores` must be [N, K + M] = [{spec.n}, {spec.k} + {spec.m}] (N anchors, K positives, "
            f"M negatives each, in that order); got {_shape(t)}"
        )
    _same_device("teacher_scores", t, spec.device)


def _check_guide(
    guide: object, spec: Spec, positives: torch.Tensor, filtering: bool, shared: bool, work: torch.dtype
) -> Guide | None:
    """``guide = (anchors [N, g], positives [N, g] or [N, K, g], negatives [N, M, g] or None)``, any width g.

    Returns them as detached unit rows in the working dtype, the positives as (N, K, g).
    """
    if guide is None:
        return None
    if not filtering:
        raise ValueError("`guide` has no effect without `false_negative_margin`: pass both, or neither")
    if not isinstance(guide, (tuple, list)) or len(guide) != 3:
        raise TypeError("`guide` must be a 3-tuple (anchors, positives, negatives or None) of guide embeddings")
    if shared:
        raise ValueError("`guide` holds no embeddings of `shared_negatives`: filter without a guide, or drop them")
    names = ("guide[0] (anchors)", "guide[1] (positives)", "guide[2] (negatives)")
    if (guide[2] is None) != (spec.m == 0):
        raise ValueError(f"`{names[2]}` must be given exactly when `negatives` is: [N, M, g] = [{spec.n}, {spec.m}, g]")
    ga, gp = _tensor(names[0], guide[0]), _tensor(names[1], guide[1])
    gn = None if guide[2] is None else _tensor(names[2], guide[2])
    g = ga.shape[-1] if ga.ndim else 0  # 0: rejected below, with the shapes
    shapes = ((spec.n, g), (*positives.shape[:-1], g), (spec.n, spec.m, g))
    for name, t, shape in zip(names, (ga, gp, gn), shapes, strict=True):
        if t is not None:
            _floating(name, t)
            if tuple(t.shape) != shape or g == 0:
                raise ValueError(
                    f"`{name}` must be {list(shape)} (the data's sizes, any width g >= 1); got {_shape(t)}"
                )
            _same_device(name, t, spec.device)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t.detach().to(work), dim=-1)

    return unit(ga), unit(gp).reshape(spec.n, spec.k, g), None if gn is None else unit(gn)
