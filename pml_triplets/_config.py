"""One checked configuration of the loss, built once (per ``InfoNCE`` module, per ``infonce`` call).

Everything here is decided from Python values and object types only -- never from a tensor's value -- so building
it costs microseconds and traces cleanly under ``torch.compile``. The user's PML objects are read, never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

from ._similarity import Similarity
from ._validation import Temperature, check_size, check_temperature

__all__: list[str] = []  # private module

Engine = Literal["auto", "dense", "pml"]
ENGINES = ("auto", "dense", "pml")
Reduction = Literal["mean", "none", "pml"]
DEFAULT_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Config:
    """What to compute. ``temperature`` is ``None`` when it is read from ``loss_fn`` at each call."""

    loss_fn: NTXentLoss | None  # None: NTXentLoss's defaults (cosine, mean), with no object involved
    temperature: Temperature | None
    dense: bool
    similarity: Similarity
    reduction: Reduction  # "mean": a plain MeanReducer and no regularizer; "none": DoNothingReducer
    in_batch: bool
    chunk_size: int | None
    gather: bool


def plain_ntxent(loss_fn: NTXentLoss) -> bool:
    """Whether ``loss_fn`` computes NTXentLoss's own loss (a subclass that only configures it counts)."""
    cls = type(loss_fn)
    return cls._compute_loss is NTXentLoss._compute_loss and cls.compute_loss is NTXentLoss.compute_loss


def make_config(
    *,
    temperature: object,
    loss_fn: object,
    in_batch: object,
    chunk_size: object,
    engine: object,
    gather: object,
) -> Config:
    """Check every option and resolve the engine; raises ``TypeError``/``ValueError`` naming the argument."""
    if loss_fn is not None and not isinstance(loss_fn, NTXentLoss):
        raise TypeError(f"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got {type(loss_fn).__name__}")
    if loss_fn is not None and temperature is not None:
        raise ValueError(
            "pass either `temperature` or `loss_fn` (whose temperature is used), not both; got "
            f"temperature={temperature!r} and loss_fn={type(loss_fn).__name__}(temperature={loss_fn.temperature!r})"
        )
    if loss_fn is not None:
        check_temperature(loss_fn.temperature)
        tau: Temperature | None = None  # read from loss_fn at each call: a schedule that sets it is honoured
    else:
        tau = check_temperature(DEFAULT_TEMPERATURE if temperature is None else temperature)
    if chunk_size is not None:
        chunk_size = check_size("chunk_size", chunk_size)
        if chunk_size == 0:
            raise ValueError("`chunk_size` must be >= 1 or None (automatic); got 0")
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}; got {engine!r}")
    for name, flag in (("in_batch", in_batch), ("gather_across_devices", gather)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool; got {type(flag).__name__}")
    if gather and not in_batch:
        raise ValueError(
            "`gather_across_devices=True` needs `in_batch=True`: per-anchor and shared negatives need no gathering"
        )
    plain = loss_fn is None or plain_ntxent(loss_fn)
    if engine == "dense" and not plain:
        raise ValueError(
            f"`engine='dense'` computes NTXentLoss's own loss; {type(loss_fn).__name__} overrides it "
            "(use engine='auto' or 'pml')"
        )
    reduction: Reduction = "mean"
    if loss_fn is not None:
        reducer, regularizer = loss_fn.reducer, loss_fn.embedding_regularizer
        if isinstance(reducer, DoNothingReducer):
            if regularizer is not None:
                raise ValueError(
                    "`loss_fn` has a DoNothingReducer (per-pair losses) and an embedding_regularizer, whose term "
                    "cannot be added to per-pair losses: drop one of them, or use another reducer"
                )
            reduction = "none"
        elif type(reducer) is not MeanReducer or regularizer is not None:
            reduction = "pml"
    return Config(
        loss_fn=loss_fn,
        temperature=tau,
        dense=plain and engine != "pml",
        similarity=Similarity.of(None if loss_fn is None else loss_fn.distance),
        reduction=reduction,
        in_batch=bool(in_batch),
        chunk_size=chunk_size,
        gather=bool(gather),
    )
