"""InfoNCE on predefined triplets, evaluated by pytorch-metric-learning's ``NTXentLoss``.

InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"): each anchor is
contrasted with its positive against its negatives, a softmax cross-entropy over similarities divided by a
temperature. PML calls it ``NTXentLoss``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

from ._config import DEFAULT_TEMPERATURE, Config, Engine, HardnessMode, MarginStrategy, Partition, make_config
from ._engine import evaluate
from ._reduce import check_reducer, reduce
from ._validation import Batch, Guide, Temperature, autocast_enabled, prepare

__all__ = ["DEFAULT_TEMPERATURE", "InfoNCE", "infonce"]


def _temperature(config: Config) -> Temperature:
    """The configured temperature, or the loss_fn's as it is now (a schedule that sets it is honoured)."""
    if config.temperature is not None:
        return config.temperature
    assert config.loss_fn is not None  # make_config leaves temperature None only for a given loss_fn
    return cast(Temperature, config.loss_fn.temperature)


def _compute(
    config: Config,
    tau: Temperature,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    negatives_mask: torch.Tensor | None,
    shared_negatives: torch.Tensor | None,
    positive_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    guide: Guide | None,
) -> torch.Tensor:
    """Validate, evaluate, reduce: the whole loss, for ``infonce`` and ``InfoNCE.forward`` alike."""
    batch = prepare(
        anchors,
        positives,
        negatives,
        negatives_mask=negatives_mask,
        shared_negatives=shared_negatives,
        in_batch=config.in_batch,
        positive_ids=positive_ids,
        negative_ids=negative_ids,
        gather=config.gather,
        guide=guide,
        filtering=config.retrieval.margin is not None,
    )
    check_reducer(config, batch.spec.n, batch.spec.k)
    device = batch.spec.device.type
    if autocast_enabled(device):  # half inputs are computed in float32, so is everything under autocast
        with torch.autocast(device, enabled=False):
            return _evaluate_and_reduce(config, batch, tau)
    return _evaluate_and_reduce(config, batch, tau)


def _evaluate_and_reduce(config: Config, batch: Batch, tau: Temperature) -> torch.Tensor:
    losses = evaluate(config, batch, tau)  # (N*K,)
    return reduce(config, losses, batch.anchors, batch.spec.k).to(batch.spec.dtype)


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
    directions: tuple[str, ...] = ("anchor_to_positive",),
    partition: Partition = "joint",
    hardness_mode: HardnessMode = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    margin_strategy: MarginStrategy = "absolute",
    guide: Guide | None = None,
) -> torch.Tensor:
    r"""InfoNCE of each anchor against its positive(s) and negatives, through PML's ``NTXentLoss``.

    For each anchor ``i`` and each of its positives ``k``, with ``s`` the instance's similarity (a distance such as
    ``LpDistance`` enters negated) and ``τ`` its temperature:

    .. math::
        \ell_{ik} = -\log \frac{e^{s(a_i, p_{ik})/τ}}{e^{s(a_i, p_{ik})/τ} + \sum_{c \in Neg(i)} e^{s(a_i, c)/τ}}

    reduced by the instance's reducer (mean over the N*K pairs by default; ``DoNothingReducer`` gives the (N*K,)
    per-pair losses, anchor-major). ``Neg(i)`` holds anchor i's unmasked
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
            (linear in the work, never capped); ``"pml"`` calls ``loss_fn.compute_loss`` on each chunk's pairs
            and returns PML's own numbers, including its ``log(num/den + tiny)``, which caps a term at
            ``-log(tiny)`` (87.3 in float32, 708.4 in float64) with zero gradient there; it is quadratic in the
            chunk. ``"auto"`` takes ``"dense"`` for every ``NTXentLoss`` that computes NTXentLoss's own loss,
            whatever its distance (subclasses of PML's distances, ``SNRDistance``, your own ``BaseDistance``), and
            ``"pml"`` only for subclasses that override ``compute_loss`` or ``_compute_loss``.
        gather_across_devices: with ``in_batch`` under ``torch.distributed``, take every rank's positives and
            negatives (and masks and ids) as candidates, gathered with gradient. Per-anchor and shared negatives
            are never gathered: they need not be. Ranks may hold different N.
        directions: the softmax blocks of term (i, k), a tuple holding ``"anchor_to_positive"`` (the above) and
            any of ``"positive_to_anchor"`` (``s(a_j, p_ik)`` for every row j; j = i is the positive pair again),
            ``"anchor_to_anchor"`` (``s(a_i, a_j)``, j != i) and ``"positive_to_positive"`` (``s(p_ik, c)`` for
            the other rows' positives and negatives). All but the first need ``in_batch``. Names and values as in
            sentence-transformers' MultipleNegativesRankingLoss.
        partition: ``"joint"``, one softmax over every block; ``"per_direction"``, the mean over directions of
            one softmax each (anchor_to_positive and positive_to_anchor only: the others lack the positive pair).
        hardness_mode: ``None``, ``"in_batch"`` (other rows' candidates), ``"own"`` (the anchor's negatives) or
            ``"all"`` (both, and the shared negatives): those anchor-to-positive logits get
            ``+ hardness_strength * s(a_i, c).detach()``, after the division by τ.
        hardness_strength: >= 0.
        false_negative_margin: drop candidate c of term (i, k) when ``g(x, c) > g(a_i, p_ik) - margin``, with x
            the block's anchor or positive and g the cosine of ``guide``'s embeddings (of the model's own, detached,
            when ``guide`` is None); the positive pair is never dropped. It applies to every candidate, the
            anchor's own negatives included: a weak guide also drops true hard negatives.
        margin_strategy: ``"absolute"`` as above, or ``"relative"``: ``g(a_i, p_ik) - |g(a_i, p_ik)| * margin``.
        guide: ``(anchors [N, g], positives [N, g] or [N, K, g], negatives [N, M, g] or None)`` embeddings of a
            guide model (any width g; no gradient flows into them), for ``false_negative_margin``.

    Returns:
        A 0-d tensor with the inputs' dtype and device, differentiable w.r.t. all inputs and a tensor temperature.
        Float16/bfloat16 inputs (and ``torch.autocast`` regions) are computed in float32, then cast back.

    Raises:
        TypeError: a non-tensor, non-floating, sparse or nested input, inputs of different dtypes (they are
            not promoted), a ``loss_fn`` that is not an ``NTXentLoss``.
        ValueError: a shape that disagrees (the message names the argument, the expected and the actual shape,
            and which argument fixed the size), an empty batch, no negatives at all, a temperature <= 0, inputs
            on different devices or on the meta device. A tensor temperature on an accelerator or inside
            ``torch.compile`` is checked by a device-side assertion (``RuntimeError``), never by a host sync.

    Example:
        >>> import torch, pml_triplets as pt
        >>> e0, e1, e2 = torch.eye(3, dtype=torch.float64)
        >>> a, p, n = e0[None], e0[None], torch.stack([e1, e2])[None]  # [1, 3], [1, 3], [1, 2, 3]
        >>> loss = pt.infonce(a, p, n, temperature=0.5)
        >>> torch.isclose(loss, torch.log1p(2 * torch.exp(torch.tensor(-1 / 0.5, dtype=torch.float64)))).item()
        True
    """
    config = make_config(
        temperature=temperature,
        loss_fn=loss_fn,
        in_batch=in_batch,
        chunk_size=chunk_size,
        engine=engine,
        gather=gather_across_devices,
        directions=directions,
        partition=partition,
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        false_negative_margin=false_negative_margin,
        margin_strategy=margin_strategy,
    )
    return _compute(
        config,
        _temperature(config),
        anchors,
        positives,
        negatives,
        negatives_mask,
        shared_negatives,
        positive_ids,
        negative_ids,
        guide,
    )


class InfoNCE(nn.Module):
    """``nn.Module`` form of :func:`infonce`: configuration in the constructor, data in ``forward``.

    Args:
        temperature: as in :func:`infonce` (``None`` means 0.07, or ``loss_fn.temperature``).
        loss_fn: a configured ``NTXentLoss``; registered as a submodule, so ``.to(device)`` moves it.
        learnable_temperature: own a parameter ``log_temperature`` initialised to ``log(temperature)``; the
            temperature ``exp(log_temperature)`` stays positive. It is handed to the computation on every call;
            nothing is ever written into ``loss_fn`` (which may be shared, copied or used on its own).
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
        directions: tuple[str, ...] = ("anchor_to_positive",),
        partition: Partition = "joint",
        hardness_mode: HardnessMode = None,
        hardness_strength: float = 0.0,
        false_negative_margin: float | None = None,
        margin_strategy: MarginStrategy = "absolute",
    ) -> None:
        """Check the configuration once; see the class docstring for the arguments."""
        super().__init__()
        self.config = make_config(
            temperature=temperature,
            loss_fn=loss_fn,
            in_batch=in_batch,
            chunk_size=chunk_size,
            engine=engine,
            gather=gather_across_devices,
            directions=directions,
            partition=partition,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            false_negative_margin=false_negative_margin,
            margin_strategy=margin_strategy,
        )
        self.loss_fn = loss_fn  # a submodule when given: .to(device) moves it; never written to
        self.log_temperature: nn.Parameter | None = None
        if learnable_temperature:
            start = torch.as_tensor(_temperature(self.config)).detach().double()
            self.log_temperature = nn.Parameter(torch.tensor(math.log(float(start))))

    @property
    def temperature(self) -> Temperature:
        """The temperature in use: ``exp(log_temperature)`` when learnable."""
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return _temperature(self.config)

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
        guide: Guide | None = None,
    ) -> torch.Tensor:
        """The loss for one batch; arguments and shapes as in :func:`infonce`."""
        return _compute(
            self.config,
            self.temperature,
            anchors,
            positives,
            negatives,
            negatives_mask,
            shared_negatives,
            positive_ids,
            negative_ids,
            guide,
        )

    def extra_repr(self) -> str:
        """The temperature now, whether it is learnable, and whether in-batch negatives are used."""
        learn = ", learnable" if self.log_temperature is not None else ""
        tau = float(torch.as_tensor(self.temperature).detach())
        return f"temperature={tau:.4g}{learn}, in_batch={self.config.in_batch}"
