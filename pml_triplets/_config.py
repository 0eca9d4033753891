"""One checked configuration of the loss, built once (per ``InfoNCE`` module, per ``infonce`` call).

Everything here is decided from Python values and object types only -- never from a tensor's value -- so building
it costs microseconds and traces cleanly under ``torch.compile``. The user's PML objects are read, never written.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

from ._similarity import Similarity
from ._validation import Temperature, check_size, check_temperature

__all__: list[str] = []  # private module

Engine = Literal["auto", "dense", "pml"]
ENGINES = ("auto", "dense", "pml")
Reduction = Literal["mean", "none", "pml"]
Partition = Literal["joint", "per_direction"]
HardnessMode = Literal["in_batch", "own", "all"] | None
MarginStrategy = Literal["absolute", "relative"]
DEFAULT_TEMPERATURE = 0.07
A2P, P2A, A2A, P2P = "anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"
DIRECTIONS = (A2P, P2A, A2A, P2P)
PARTITIONS = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch", "own", "all")
MARGIN_STRATEGIES = ("absolute", "relative")


@dataclass(frozen=True)
class Retrieval:
    """Which candidate blocks enter which softmax, and the additive or masking changes to their logits."""

    directions: tuple[str, ...] = (A2P,)
    partition: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    margin: float | None = None  # false-negative margin; None: no filtering
    margin_strategy: str = "absolute"

    @property
    def plain(self) -> bool:
        """Today's InfoNCE: anchor-to-positive only, no hardness, no filtering."""
        return self == _PLAIN


_PLAIN = Retrieval()
_DEFAULTS = ((A2P,), "joint", None, 0.0, None, "absolute")  # make_config's defaults: the plain loss, no checks


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
    retrieval: Retrieval = _PLAIN


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
    directions: object = (A2P,),
    partition: object = "joint",
    hardness_mode: object = None,
    hardness_strength: object = 0.0,
    false_negative_margin: object = None,
    margin_strategy: object = "absolute",
) -> Config:
    """Check every option and resolve the engine; raises ``TypeError``/``ValueError`` naming the argument."""
    if isinstance(loss_fn, CrossBatchMemory):
        raise TypeError(
            "`loss_fn` must be a pytorch_metric_learning NTXentLoss; got CrossBatchMemory. Pass its two parts: the "
            "memory bank of negatives as `shared_negatives=` (an [S, d] tensor, e.g. shared_negatives=queue) and the "
            f"loss inside it as `loss_fn=` (loss_fn=xbm.loss, here a {type(loss_fn.loss).__name__})"
        )
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
    defaults = (directions, partition, hardness_mode, hardness_strength, false_negative_margin, margin_strategy)
    retrieval = (
        _PLAIN
        if defaults == _DEFAULTS
        else _retrieval(
            in_batch=bool(in_batch),
            directions=directions,
            partition=partition,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            margin=false_negative_margin,
            margin_strategy=margin_strategy,
        )
    )
    if not retrieval.plain and not (plain and engine != "pml"):
        raise ValueError(
            "`directions`, `partition`, `hardness_mode` and `false_negative_margin` are computed by the dense "
            f"engine only; got engine={engine!r} with {type(loss_fn).__name__}"
        )
    return Config(
        loss_fn=loss_fn,
        temperature=tau,
        dense=plain and engine != "pml",
        similarity=Similarity.of(None if loss_fn is None else loss_fn.distance),
        reduction=reduction,
        in_batch=bool(in_batch),
        chunk_size=chunk_size,
        gather=bool(gather),
        retrieval=retrieval,
    )


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float; got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite; got {value}")
    return float(value)


def _retrieval(
    *,
    in_batch: bool,
    directions: object,
    partition: object,
    hardness_mode: object,
    hardness_strength: object,
    margin: object,
    margin_strategy: object,
) -> Retrieval:
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
        raise TypeError(f"`directions` must be a tuple of direction names from {DIRECTIONS}; got {directions!r}")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"`directions` may hold only {DIRECTIONS}; got unknown {unknown}")
    if A2P not in directions:
        raise ValueError(f"`directions` must contain {A2P!r} (it holds the positive pair); got {tuple(directions)}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"`directions` must not repeat a direction; got {tuple(directions)}")
    others = [d for d in directions if d != A2P]
    if others and not in_batch:
        raise ValueError(f"`directions` {others} draw their candidates from the batch: they need `in_batch=True`")
    if partition not in PARTITIONS:
        raise ValueError(f"`partition` must be one of {PARTITIONS}; got {partition!r}")
    if partition == "per_direction" and {A2A, P2P} & set(directions):
        raise ValueError(
            "`partition='per_direction'` needs the positive pair in every direction's softmax, and "
            f"{A2A!r} and {P2P!r} do not contain it (each would be a softmax without its target): "
            "use partition='joint'"
        )
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"`hardness_mode` must be one of {HARDNESS_MODES}; got {hardness_mode!r}")
    strength = _real("hardness_strength", hardness_strength)
    if strength < 0:
        raise ValueError(f"`hardness_strength` must be >= 0; got {strength}")
    if hardness_mode == "in_batch" and not in_batch:
        raise ValueError("`hardness_mode='in_batch'` weighs other rows' candidates: it needs `in_batch=True`")
    if margin is not None:
        margin = _real("false_negative_margin", margin)
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"`margin_strategy` must be one of {MARGIN_STRATEGIES}; got {margin_strategy!r}")
    return Retrieval(
        directions=tuple(sorted(directions, key=DIRECTIONS.index)),
        partition=str(partition),
        hardness_mode=None if strength == 0 else hardness_mode,
        hardness_strength=strength if hardness_mode is not None else 0.0,
        margin=margin,
        margin_strategy=str(margin_strategy),
    )
