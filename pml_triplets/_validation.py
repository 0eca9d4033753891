"""Input checks shared by every public entry point.

Every check runs before any tensor work, and every message names the argument, the shape it expected (with the
sizes already known filled in) and the shape it got.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

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


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(x).__name__}")
    return x


def _floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must hold floating-point embeddings; got dtype {x.dtype} with shape {_shape(x)}"
            " (cast with .float())"
        )


def _ids(name: str, x: object, expected: tuple[int, ...], label: str) -> torch.Tensor:
    t = _tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor; got dtype {t.dtype}")
    if tuple(t.shape) != expected:
        raise ValueError(f"`{name}` must be {label} = {list(expected)}; got {_shape(t)}")
    return t


def check_temperature(temperature: object) -> None:
    """Reject a temperature that is not a positive finite float or a 0-d floating tensor."""
    if isinstance(temperature, torch.Tensor):
        if temperature.ndim != 0 or not temperature.is_floating_point():
            raise TypeError(
                "`temperature` must be a float or a 0-d floating tensor; got a tensor of shape "
                f"{_shape(temperature)} and dtype {temperature.dtype}"
            )
        value = float(temperature.detach())
    elif isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        value = float(temperature)
    else:
        raise TypeError(f"`temperature` must be a float or a 0-d tensor; got {type(temperature).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`temperature` must be positive and finite; got {value}")


def check_size(name: str, value: object) -> int:
    """A non-negative Python int (``bool`` excluded), for sizes such as ``build_indices(N, M)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0; got {value}")
    return int(value)


def check_inputs(
    anchors: object,
    positives: object,
    negatives: object = None,
    *,
    negatives_mask: object = None,
    shared_negatives: object = None,
    in_batch: bool = False,
    positive_ids: object = None,
    negative_ids: object = None,
) -> Spec:
    """Validate one call's data and return its sizes. Raises ``TypeError``/``ValueError`` naming the argument."""
    a = _tensor("anchors", anchors)
    p = _tensor("positives", positives)
    neg = None if negatives is None else _tensor("negatives", negatives)
    sh = None if shared_negatives is None else _tensor("shared_negatives", shared_negatives)
    named = [("anchors", a), ("positives", p), ("negatives", neg), ("shared_negatives", sh)]
    present = [(name, t) for name, t in named if t is not None]
    for name, t in present:
        _floating(name, t)

    if a.ndim != 2:
        raise ValueError(f"`anchors` must be [N, d]; got {_shape(a)}")
    n, d = a.shape
    if n == 0:
        raise ValueError(f"`anchors` must hold at least one row: [N, d] with N >= 1; got {_shape(a)}")
    if d == 0:
        raise ValueError(f"`anchors` must have d >= 1: [N, d]; got {_shape(a)}")

    if p.ndim == 2 and tuple(p.shape) == (n, d):
        k = 1
    elif p.ndim == 3 and p.shape[0] == n and p.shape[2] == d and p.shape[1] >= 1:
        k = p.shape[1]
    else:
        raise ValueError(f"`positives` must be [N, d] = [{n}, {d}] or [N, K, d] = [{n}, K, {d}]; got {_shape(p)}")

    m = 0
    if neg is not None:
        if neg.ndim != 3 or neg.shape[0] != n or neg.shape[2] != d:
            hint = ""
            if neg.ndim == 2 and neg.shape == (n, d):
                hint = " (one negative per anchor? pass negatives.unsqueeze(1))"
            elif neg.ndim == 2 and neg.shape[1] == d:
                hint = " (flattened negatives? pass negatives.reshape(N, M, d))"
            raise ValueError(f"`negatives` must be [N, M, d] = [{n}, M, {d}]; got {_shape(neg)}{hint}")
        m = neg.shape[1]

    s = 0
    if sh is not None:
        if sh.ndim != 2 or sh.shape[1] != d:
            raise ValueError(f"`shared_negatives` must be [S, d] = [S, {d}]; got {_shape(sh)}")
        s = sh.shape[0]

    for name, t in present[1:]:
        if t.dtype != a.dtype:
            raise TypeError(
                f"`{name}` has dtype {t.dtype} but `anchors` has {a.dtype}; inputs are not promoted, "
                "cast them to one dtype"
            )
        if t.device != a.device:
            raise ValueError(f"`{name}` is on {t.device} but `anchors` is on {a.device}; move them to one device")

    if negatives_mask is not None:
        if neg is None:
            raise ValueError("`negatives_mask` was given without `negatives`")
        mask = _tensor("negatives_mask", negatives_mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"`negatives_mask` must be a bool tensor (True = real negative); got dtype {mask.dtype}")
        if tuple(mask.shape) != (n, m):
            raise ValueError(f"`negatives_mask` must be [N, M] = [{n}, {m}]; got {_shape(mask)}")
        if mask.device != a.device:
            raise ValueError(f"`negatives_mask` is on {mask.device} but `anchors` is on {a.device}")

    if m == 0 and s == 0 and not in_batch:
        got = "None" if neg is None else _shape(neg)
        raise ValueError(
            f"no negatives: `negatives` must be [N, M, d] = [{n}, M, {d}] with M >= 1 (got {got}), "
            "or pass `shared_negatives` or `in_batch=True`"
        )

    if positive_ids is not None or negative_ids is not None:
        if positive_ids is None:
            raise ValueError(
                "`negative_ids` needs `positive_ids`: ids only exclude candidates that share a positive's id"
            )
        pid = _tensor("positive_ids", positive_ids)
        expected = (n,) if (p.ndim == 2 and pid.ndim == 1) else (n, k)
        pid = _ids("positive_ids", pid, expected, "[N]" if len(expected) == 1 else "[N, K]")
        if negative_ids is not None:
            if neg is None:
                raise ValueError("`negative_ids` was given without `negatives`")
            _ids("negative_ids", negative_ids, (n, m), "[N, M]")
        elif not in_batch:
            raise ValueError(
                "`positive_ids` has no effect without `negative_ids` or `in_batch=True`: nothing to compare it with"
            )
        for name, ids in (("positive_ids", positive_ids), ("negative_ids", negative_ids)):
            if isinstance(ids, torch.Tensor) and ids.device != a.device:
                raise ValueError(f"`{name}` is on {ids.device} but `anchors` is on {a.device}")

    return Spec(n=n, k=k, m=m, s=s, d=d, dtype=a.dtype, device=a.device)
