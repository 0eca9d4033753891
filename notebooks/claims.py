"""``claim``: how the notebooks check the sentences they print, where they print them.

A notebook sentence such as "removing the false negatives raises MAP@R by more than 0.02" is backed by one call,
``claim("label oracle: mean Δ MAP@R", delta, above=0.02)``, in the code cell next to it. A claim that fails raises
an ``AssertionError`` naming the claim, the measured number and the bound it missed, so the execution test
(tests/test_notebooks.py) says which sentence no longer holds. Every claim is also appended to ``RECORD``:
``notebooks/claim_spread.py`` reads it to measure how far each number moves under what changes between machines
(thread count, vector instruction set, seeds), which is how the bounds were chosen; it sets
``CLAIMS_RECORD_ONLY=1`` so that a claim that fails is recorded and printed, not raised, and the run goes on.
"""

from __future__ import annotations

import math
import os

__all__ = ["RECORD", "claim"]

RECORD: list[dict[str, float | str | None]] = []


def claim(text: str, value: float, *, above: float | None = None, below: float | None = None) -> None:
    """Check ``above < value < below`` (either bound may be omitted), print and record it.

    ``value`` is a number or a one-element tensor (detached here: a tensor that requires grad is read without
    torch's warning). Nothing is returned, so a claim that ends a cell adds no ``Out[...]`` value to it.

    >>> claim("a probability", 0.25, above=0.0, below=1.0)
    holds: a probability: 0.25 (above 0 and below 1)
    """
    if above is None and below is None:
        raise ValueError(f"claim {text!r} needs a bound: above=, below= or both")
    value = float(value.detach() if hasattr(value, "detach") else value)
    RECORD.append({"claim": text, "value": value, "above": above, "below": below})
    failed = math.isnan(value) or (above is not None and not value > above) or (below is not None and not value < below)
    bound = " and ".join(f"{name} {b:g}" for name, b in (("above", above), ("below", below)) if b is not None)
    if failed and not os.environ.get("CLAIMS_RECORD_ONLY"):
        raise AssertionError(f"claim does not hold: {text}: measured {value:.4g}, expected {bound}")
    print(f"{'FAILS' if failed else 'holds'}: {text}: {value:.4g} ({bound})")
