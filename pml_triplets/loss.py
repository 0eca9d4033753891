"""InfoNCE on predefined triplets, evaluated by pytorch-metric-learning's ``NTXentLoss``.

InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"): each anchor is
contrasted with its positive against its negatives, a softmax cross-entropy over similarities divided by a
temperature. PML calls it ``NTXentLoss``.
"""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

from ._engine import ENGINES, Engine, evaluate, uses_dense
from ._validation import check_inputs, check_size, check_temperature

__all__ = ["DEFAULT_TEMPERATURE", "InfoNCE", "infonce"]

DEFAULT_TEMPERATURE = 0.07
Temperature = float | torch.Tensor


def _check_options(loss_fn: object, chunk_size: object, engine: object, in_batch: object, gather: object) -> None:
    if not isinstance(loss_fn, NTXentLoss):
        raise TypeError(f"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got {type(loss_fn).__name__}")
    if chunk_size is not None and check_size("chunk_size", chunk_size) == 0:
        raise ValueError("`chunk_size` must be >= 1 or None (automatic); got 0")
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}; got {engine!r}")
    uses_dense(loss_fn, engine)  # type: ignore[arg-type]  # raises for a forced engine that cannot apply
    if not isinstance(in_batch, bool):
        raise TypeError(f"`in_batch` must be a bool; got {type(in_batch).__name__}")
    if not isinstance(gather, bool):
        raise TypeError(f"`gather_across_devices` must be a bool; got {type(gather).__name__}")
    if gather and not in_batch:
        raise ValueError(
            "`gather_across_devices=True` needs `in_batch=True`: per-anchor and shared negatives need no gathering"
        )


def _loss_fn(temperature: Temperature | None, loss_fn: NTXentLoss | None) -> NTXentLoss:
    """The user's instance, or a new ``NTXentLoss`` at ``temperature`` (default 0.07); never both."""
    if loss_fn is not None and temperature is not None:
        raise ValueError(
            "pass either `temperature` or `loss_fn` (whose temperature is used), not both; got "
            f"temperature={temperature!r} and loss_fn={type(loss_fn).__name__}(temperature={loss_fn.temperature!r})"
        )
    if loss_fn is not None:
        return loss_fn
    tau = DEFAULT_TEMPERATURE if temperature is None else temperature
    check_temperature(tau)
    return NTXentLoss(temperature=tau)


def infonce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: Temperature | None = None,
    loss_fn: NTXentLoss | None = None,
    negatives_mask: torch.Tensor | None = None,
    shared_negatives: torch.Tensor | None = None,
    in_batch: bool = False,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    engine: Engine = "auto",
    gather_across_devices: bool = False,
) -> torch.Tensor:
    r"""InfoNCE of each anchor against its positive(s) and negatives, through PML's ``NTXentLoss``.

    For each anchor ``i`` and each of its positives ``k``, with ``s`` the instance's similarity (a distance such as
    ``LpDistance`` enters negated) and ``τ`` its temperature:

    .. math::
        \ell_{ik} = -\log \frac{e^{s(a_i, p_{ik})/τ}}{e^{s(a_i, p_{ik})/τ} + \sum_{c \in Neg(i)} e^{s(a_i, c)/τ}}

    reduced by the instance's reducer (mean over the N*K pairs by default). ``Neg(i)`` holds anchor i's unmasked
    negatives, every shared negative, and with ``in_batch`` every other row's positives and unmasked negatives --
    minus any candidate whose id equals one of anchor i's positive ids. An anchor left with no negatives has
    ``ℓ = 0`` and still counts in the mean.

    The instance is evaluated on ``embeddings = anchors`` and ``ref_emb = cat([positives, negatives, shared])``
    with a 4-tuple of pairs, so its distance, temperature, reducer and embedding regularizer apply exactly as PML
    applies them to those pairs (the regularizer sees the anchors, as it sees ``embeddings`` in PML).

    Args:
        anchors: ``[N, d]``.
        positives: ``[N, d]``, or ``[N, K, d]`` for K positives per anchor (one loss term each; an anchor's other
            positives are not its negatives).
        negatives: ``[N, M, d]`` negatives of each anchor, or ``None`` when ``shared_negatives`` or ``in_batch``
            supply them. A 2-D tensor is rejected: use ``negatives.unsqueeze(1)`` for one negative per anchor.
        temperature: float, 0-d tensor or ``nn.Parameter`` (its gradient is computed). ``None`` means 0.07, or
            ``loss_fn.temperature`` when ``loss_fn`` is given; passing both is an error.
        loss_fn: a configured ``NTXentLoss`` (distance, reducer, embedding regularizer, temperature).
        negatives_mask: ``[N, M]`` bool, ``True`` for a real negative. Masked rows influence neither the loss nor
            any gradient, whatever values they hold.
        shared_negatives: ``[S, d]`` negatives of every anchor (a memory bank or a queue).
        in_batch: also use every other row's positives and unmasked negatives as negatives.
        positive_ids: ``[N]`` or ``[N, K]`` integer ids of the positives. A candidate with the same id as one of
            anchor i's positives is never its negative. Needs ``negative_ids`` or ``in_batch`` (else it would do
            nothing, which raises).
        negative_ids: ``[N, M]`` integer ids of ``negatives``; needs ``positive_ids``.
        chunk_size: anchors evaluated at a time; ``None`` picks it from the sizes and the device. The value does
            not depend on it.
        engine: ``"dense"`` computes one row of logits per anchor from the instance's distance and temperature
            (linear in the work); ``"pml"`` calls ``loss_fn.compute_loss`` on each chunk's pairs (quadratic in the
            chunk); ``"auto"`` takes ``"dense"`` for a plain ``NTXentLoss`` with ``CosineSimilarity``,
            ``DotProductSimilarity`` or ``LpDistance``, ``"pml"`` for anything else (subclasses, other distances).
        gather_across_devices: with ``in_batch`` under ``torch.distributed``, take every rank's positives and
            negatives (and masks and ids) as candidates, gathered with gradient. Per-anchor and shared negatives
            are never gathered: they need not be. Ranks may hold different N.

    Returns:
        A 0-d tensor with the inputs' dtype and device, differentiable w.r.t. all inputs and a tensor temperature.
        Float16/bfloat16 inputs (and ``torch.autocast`` regions) are computed in float32, then cast back.

    Raises:
        TypeError: a non-tensor or non-floating input, inputs of different dtypes (they are not promoted),
            a ``loss_fn`` that is not an ``NTXentLoss``.
        ValueError: a shape that disagrees (the message names the argument, the expected and the actual shape),
            an empty batch, no negatives at all, a temperature <= 0, inputs on different devices.

    Example:
        >>> import torch, pml_triplets as pt
        >>> e0, e1, e2 = torch.eye(3, dtype=torch.float64)
        >>> a, p, n = e0[None], e0[None], torch.stack([e1, e2])[None]  # [1, 3], [1, 3], [1, 2, 3]
        >>> loss = pt.infonce(a, p, n, temperature=0.5)
        >>> torch.isclose(loss, torch.log1p(2 * torch.exp(torch.tensor(-1 / 0.5, dtype=torch.float64)))).item()
        True
    """
    loss_fn = _loss_fn(temperature, loss_fn)
    _check_options(loss_fn, chunk_size, engine, in_batch, gather_across_devices)
    check_temperature(loss_fn.temperature)
    spec = check_inputs(
        anchors,
        positives,
        negatives,
        negatives_mask=negatives_mask,
        shared_negatives=shared_negatives,
        in_batch=in_batch,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
    )
    return evaluate(
        loss_fn,
        spec,
        anchors,
        positives,
        negatives,
        negatives_mask=negatives_mask,
        shared_negatives=shared_negatives,
        in_batch=in_batch,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        chunk_size=chunk_size,
        engine=engine,
        gather=gather_across_devices,
    )


class InfoNCE(nn.Module):
    """``nn.Module`` form of :func:`infonce`: configuration in the constructor, data in ``forward``.

    Args:
        temperature: as in :func:`infonce` (``None`` means 0.07, or ``loss_fn.temperature``).
        loss_fn: a configured ``NTXentLoss``; registered as a submodule, so ``.to(device)`` moves it.
        learnable_temperature: own a parameter ``log_temperature`` initialised to ``log(temperature)``; the
            temperature ``exp(log_temperature)`` stays positive. It is written into ``loss_fn.temperature`` on
            every call.
        in_batch, chunk_size, engine, gather_across_devices: as in :func:`infonce`.

    Example:
        >>> import torch, pml_triplets as pt
        >>> criterion = pt.InfoNCE(temperature=0.1, learnable_temperature=True)
        >>> a, p, n = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 5, 16)
        >>> loss = criterion(a, p, n)
        >>> loss.backward()
        >>> criterion.log_temperature.grad is not None
        True
    """

    def __init__(
        self,
        temperature: Temperature | None = None,
        *,
        loss_fn: NTXentLoss | None = None,
        learnable_temperature: bool = False,
        in_batch: bool = False,
        chunk_size: int | None = None,
        engine: Engine = "auto",
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__()
        loss_fn = _loss_fn(temperature, loss_fn)
        _check_options(loss_fn, chunk_size, engine, in_batch, gather_across_devices)
        self.loss_fn = loss_fn
        self.log_temperature: nn.Parameter | None = None
        if learnable_temperature:
            check_temperature(loss_fn.temperature)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(float(loss_fn.temperature))))
        self.in_batch = in_batch
        self.chunk_size = chunk_size
        self.engine: Engine = engine
        self.gather_across_devices = gather_across_devices

    @property
    def temperature(self) -> Temperature:
        """The temperature in use: ``exp(log_temperature)`` when learnable."""
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return self.loss_fn.temperature

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        *,
        negatives_mask: torch.Tensor | None = None,
        shared_negatives: torch.Tensor | None = None,
        positive_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss for one batch; arguments and shapes as in :func:`infonce`."""
        if self.log_temperature is not None:
            self.loss_fn.temperature = self.log_temperature.exp()
        return infonce(
            anchors,
            positives,
            negatives,
            loss_fn=self.loss_fn,
            negatives_mask=negatives_mask,
            shared_negatives=shared_negatives,
            in_batch=self.in_batch,
            positive_ids=positive_ids,
            negative_ids=negative_ids,
            chunk_size=self.chunk_size,
            engine=self.engine,
            gather_across_devices=self.gather_across_devices,
        )

    def extra_repr(self) -> str:
        learn = ", learnable" if self.log_temperature is not None else ""
        tau = float(torch.as_tensor(self.temperature).detach())
        return f"temperature={tau:.4g}{learn}, in_batch={self.in_batch}, engine={self.engine!r}"
