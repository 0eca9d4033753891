"""The inputs of one call as one frozen record, built by keyword; each field declares how the engine treats it.

Every field declares its ``axis`` (``"row"``: dim 0 is the anchors' N, split into chunks and gathered along it;
``"shared"``: the same for every anchor; ``"none"``: a value, not a tensor of rows), whether it is ``gathered``
across ranks (``gather_across_devices``) and its ``cast`` (``"work"``: brought to the working dtype, float32 for
half inputs, when checked; ``"kept"``: as given -- the negatives are cast block by block, masks and ids are not
floating). Checking and casting (``_validation.prepare``) and gathering (``gather``) loop over these declarations:
a new input is one field here, one check in ``_validation.py`` and one use where it enters the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from . import _distributed

__all__: list[str] = []  # private module

Axis = Literal["row", "shared", "none"]
Cast = Literal["work", "kept"]
Temperature = float | torch.Tensor
Guide = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
UnitGuide = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # the engine's form


def _declare(axis: Axis, *, gathered: bool = False, cast: Cast = "kept", parts: int = 1) -> dict[str, object]:
    """The declaration of a field of ``Inputs`` (``parts``: a tuple of that many tensors, gathered one by one)."""
    return {"axis": axis, "gathered": gathered, "cast": cast, "parts": parts}


_ROW, _SHARED = _declare("row", gathered=True), _declare("shared")


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """One call's data, by name. As given by the caller until ``prepare`` checks it; then in the engine's form.

    The engine's form: ``positives`` (N, K, d) and ``positive_ids`` (N, K) whatever K, the ``"work"`` fields in
    the working dtype, ``guide`` as detached unit rows ((N, g), (N, K, g), (N, M, g) or None), and
    ``temperature`` resolved (the option, ``loss_fn``'s, or the module's learnable one: see
    ``_options.temperature_of``).

    Example:
        >>> import torch
        >>> x = Inputs(anchors=torch.ones(2, 3), positives=torch.ones(2, 3), temperature=0.1)
        >>> [f.name for f in fields(x) if f.metadata["gathered"]][:3]
        ['anchors', 'positives', 'negatives']
    """

    anchors: torch.Tensor = field(metadata=_declare("row", gathered=True, cast="work"))  # (N, d)
    positives: torch.Tensor = field(metadata=_declare("row", gathered=True, cast="work"))  # (N, d) or (N, K, d)
    negatives: torch.Tensor | None = field(default=None, metadata=_ROW)  # (N, M, d), cast block by block
    negatives_mask: torch.Tensor | None = field(default=None, metadata=_ROW)  # (N, M) bool, True: a negative
    positive_ids: torch.Tensor | None = field(default=None, metadata=_ROW)  # (N,) or (N, K)
    negative_ids: torch.Tensor | None = field(default=None, metadata=_ROW)  # (N, M)
    # (N, g), (N, K, g), (N, M, g) or None
    guide: Guide | UnitGuide | None = field(default=None, metadata=_declare("row", gathered=True, cast="work", parts=3))
    shared_negatives: torch.Tensor | None = field(default=None, metadata=_declare("shared", cast="work"))  # (S, d)
    shared_negative_ids: torch.Tensor | None = field(default=None, metadata=_SHARED)  # (S,)
    shared_mask: torch.Tensor | None = field(default=None, metadata=_SHARED)  # (S,) True: a queue's filled slot
    temperature: Temperature = field(metadata=_declare("none"))  # a positive float or a 0-d floating tensor


FIELDS = fields(Inputs)
GATHERED = tuple(f for f in FIELDS if f.metadata["gathered"])
WORK = tuple(f.name for f in FIELDS if f.metadata["cast"] == "work")  # cast by _validation.prepare


def gather(x: Inputs, n: int) -> tuple[Inputs, int, int]:
    """Every gathered field's rows over all ranks, with gradient; ``(record, this rank's offset, total rows)``.

    A tuple field is gathered part by part (``guide[0]``, ...). ``gather_rows`` checks that the ranks agree and
    names the field where they do not.
    """
    names: list[str] = []
    tensors: list[torch.Tensor | None] = []
    for f in GATHERED:
        value, parts = getattr(x, f.name), f.metadata["parts"]
        if parts == 1:
            names.append(f.name)
            tensors.append(value)
        else:
            names += [f"{f.name}[{i}]" for i in range(parts)]
            tensors += list(value) if value is not None else [None] * parts
    out, offset, total = _distributed.gather_rows(tensors, n, names=names)
    values, start = {}, 0
    for f in GATHERED:
        parts = f.metadata["parts"]
        values[f.name] = out[start] if parts == 1 else tuple(out[start : start + parts])
        start += parts
    return replace(x, **values), offset, total  # type: ignore[arg-type]
