"""The inputs of one call as one immutable record, built by keyword; each field declares how the engine treats it.

Every field's annotation carries its ``Declared``: its ``axis`` (``"row"``: dim 0 is the anchors' N, split into
chunks and gathered along it; ``"shared"``: the same for every anchor; ``"none"``: a value, not a tensor of rows),
whether it is ``gathered`` across ranks (``gather_across_devices``) and its ``cast`` (``"work"``: brought to the
working dtype, float32 for half inputs, when checked; ``"kept"``: as given -- the negatives are cast block by
block, masks and ids are not floating). Checking and casting (``_validation.prepare``) and gathering (``gather``)
loop over these declarations: a new input is one field here, one check in ``_validation.py`` and one use where it
enters the loss.

A ``NamedTuple``, not a frozen dataclass: built and updated (``_replace``) in about 2 µs each, against 4 and 7 µs,
on every call; ``torch.compile`` traces both. Its fields are read by name only, never by position.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import torch

from . import _distributed

__all__: list[str] = []  # private module

Axis = Literal["row", "shared", "none"]
Cast = Literal["work", "kept"]
Temperature = float | torch.Tensor
Guide = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
UnitGuide = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # the engine's form


@dataclass(frozen=True)
class Declared:
    """How the engine treats one field of ``Inputs`` (``parts``: a tuple of that many tensors, gathered one by one)."""

    axis: Axis
    gathered: bool = False
    cast: Cast = "kept"
    parts: int = 1


_ROW = Declared("row", gathered=True)
_WORK_ROW = Declared("row", gathered=True, cast="work")
_SHARED = Declared("shared")


class Inputs(NamedTuple):
    """One call's data, by name. As given by the caller until ``prepare`` checks it; then in the engine's form.

    The engine's form: ``positives`` (N, K, d) and ``positive_ids`` (N, K) whatever K, the ``"work"`` fields in
    the working dtype, ``guide`` as detached unit rows ((N, g), (N, K, g), (N, M, g) or None), and
    ``temperature`` resolved (the option, ``loss_fn``'s, or the module's learnable one: see
    ``_options.temperature_of``).

    Example:
        >>> import torch
        >>> x = Inputs(anchors=torch.ones(2, 3), positives=torch.ones(2, 3), temperature=0.1)
        >>> [name for name, declared in DECLARED.items() if declared.gathered][:3]
        ['anchors', 'positives', 'negatives']
    """

    anchors: Annotated[torch.Tensor, _WORK_ROW]  # (N, d)
    positives: Annotated[torch.Tensor, _WORK_ROW]  # (N, d) or (N, K, d)
    temperature: Annotated[Temperature, Declared("none")]  # a positive float or a 0-d floating tensor
    negatives: Annotated[torch.Tensor | None, _ROW] = None  # (N, M, d), cast block by block
    negatives_mask: Annotated[torch.Tensor | None, _ROW] = None  # (N, M) bool, True: a real negative
    positive_ids: Annotated[torch.Tensor | None, _ROW] = None  # (N,) or (N, K)
    negative_ids: Annotated[torch.Tensor | None, _ROW] = None  # (N, M)
    guide: Annotated[Guide | UnitGuide | None, Declared("row", gathered=True, cast="work", parts=3)] = None
    shared_negatives: Annotated[torch.Tensor | None, Declared("shared", cast="work")] = None  # (S, d)
    shared_negative_ids: Annotated[torch.Tensor | None, _SHARED] = None  # (S,)
    shared_mask: Annotated[torch.Tensor | None, _SHARED] = None  # (S,) True: a queue's filled slot
    teacher_scores: Annotated[torch.Tensor | None, Declared("row", cast="work")] = None  # (N, K + M), own group


def _declared() -> dict[str, Declared]:
    """Each field's ``Declared``, read from its annotation; a field without one fails at import."""
    hints = typing.get_type_hints(Inputs, globalns=globals(), include_extras=True)
    out: dict[str, Declared] = {}
    for name in Inputs._fields:
        found = [m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, Declared)]
        if not found:
            raise TypeError(f"`Inputs.{name}` has no Declared annotation: Annotated[type, Declared(...)]")
        out[name] = found[0]
    return out


DECLARED = _declared()  # field name -> its declaration, in field order
GATHERED = tuple(name for name, declared in DECLARED.items() if declared.gathered)
WORK = tuple(name for name, declared in DECLARED.items() if declared.cast == "work")  # cast by _validation.prepare


def gather(x: Inputs, n: int) -> tuple[Inputs, int, int]:
    """Every gathered field's rows over all ranks, with gradient; ``(record, this rank's offset, total rows)``.

    A tuple field is gathered part by part (``guide[0]``, ...). ``gather_rows`` checks that the ranks agree and
    names the field where they do not.
    """
    names: list[str] = []
    tensors: list[torch.Tensor | None] = []
    for name in GATHERED:
        value, parts = getattr(x, name), DECLARED[name].parts
        if parts == 1:
            names.append(name)
            tensors.append(value)
        else:
            names += [f"{name}[{i}]" for i in range(parts)]
            tensors += list(value) if value is not None else [None] * parts
    out, offset, total = _distributed.gather_rows(tensors, n, names=names)
    values: dict[str, object] = {}
    start = 0
    for name in GATHERED:
        parts = DECLARED[name].parts
        values[name] = out[start] if parts == 1 else tuple(out[start : start + parts])
        start += parts
    return x._replace(**values), offset, total  # type: ignore[arg-type]
