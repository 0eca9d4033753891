"""InfoNCE on predefined triplets, with pytorch-metric-learning's ``NTXentLoss`` conventions.

InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"): each anchor is
contrasted with its positive against its negatives, a softmax cross-entropy over similarities divided by a
temperature. PML calls it ``NTXentLoss``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

from ._engine import evaluate
from ._inputs import Guide, Inputs, Temperature
from ._options import (
    DEFAULT,
    DEFAULT_TEMPERATURE,
    NAMES,
    Direction,
    Distillation,
    Engine,
    HardnessMode,
    MarginStrategy,
    Partition,
    document,
    make_options,
    temperature_of,
)
from .queue import NegativeQueue, with_queue

__all__ = ["DEFAULT_TEMPERATURE", "InfoNCE", "infonce"]


def _options(arguments: dict[str, object]) -> dict[str, object]:
    """The options among a call's arguments (its ``locals()``), by name: each is spelled once, in Options."""
    return {name: arguments[name] for name in NAMES}


def infonce(  # noqa: D417 (the options' descriptions are filled in from _options.Options)
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    negatives_mask: torch.Tensor | None = None,
    shared_negatives: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    shared_negative_ids: torch.Tensor | None = None,
    queue: NegativeQueue | None = None,
    guide: Guide | None = None,
    teacher_scores: torch.Tensor | None = None,
    temperature: Temperature | None = DEFAULT.temperature,
    loss_fn: NTXentLoss | None = DEFAULT.loss_fn,
    in_batch: bool = DEFAULT.in_batch,
    chunk_size: int | None = DEFAULT.chunk_size,
    engine: Engine = DEFAULT.engine,
    gather_across_devices: bool = DEFAULT.gather_across_devices,
    directions: tuple[Direction, ...] = DEFAULT.directions,
    partition: Partition = DEFAULT.partition,
    hardness_mode: HardnessMode = DEFAULT.hardness_mode,
    hardness_strength: float = DEFAULT.hardness_strength,
    false_negative_margin: float | None = DEFAULT.false_negative_margin,
    margin_strategy: MarginStrategy = DEFAULT.margin_strategy,
    debias_prior: float = DEFAULT.debias_prior,
    hcl_beta: float = DEFAULT.hcl_beta,
    decoupled: bool = DEFAULT.decoupled,
    distillation: Distillation = DEFAULT.distillation,
    teacher_temperature: float | None = DEFAULT.teacher_temperature,
    infonce_weight: float = DEFAULT.infonce_weight,
) -> torch.Tensor:
    """InfoNCE of each anchor against its positive(s) and negatives, with ``NTXentLoss``'s conventions.

    For each anchor ``i`` and each of its positives ``k``, with ``s`` the similarity of ``loss_fn``'s distance
    (cosine by default; a distance such as ``LpDistance`` enters negated) and ``τ`` the temperature:

        ℓ_ik = −log( exp(s(a_i, p_ik)/τ) / (exp(s(a_i, p_ik)/τ) + Σ_{c ∈ Neg(i)} exp(s(a_i, c)/τ)) )

    reduced by ``loss_fn``'s reducer and embedding regularizer as ``NTXentLoss.forward`` applies them (mean over
    the N*K pairs by default; ``DoNothingReducer`` gives the (N*K,) per-pair losses, anchor-major). ``Neg(i)``
    holds anchor i's unmasked negatives, every shared negative, and with ``in_batch`` every other row's positives
    and unmasked negatives -- minus any candidate whose id equals one of anchor i's positive ids. An anchor left
    with no negatives has ``ℓ = 0`` and still counts in the mean.

    Which engine computes it: the default dense engine computes the logits itself from the distance (it never
    calls ``NTXentLoss``); ``engine="pml"`` (and any ``NTXentLoss`` subclass that overrides its loss) calls
    ``loss_fn.compute_loss`` on each chunk's pairs with a 4-tuple, ``embeddings = anchors`` and
    ``ref_emb = cat([positives, negatives, shared, in-batch])``. Both return the same value to float rounding.

    Args:
        anchors: ``[N, d]``.
        positives: ``[N, d]``, or ``[N, K, d]`` for K positives per anchor (one loss term each; an anchor's other
            positives are not its negatives).
        negatives: ``[N, M, d]`` negatives of each anchor, or ``None`` when ``shared_negatives`` or ``in_batch``
            supply them. A 2-D tensor is rejected: use ``negatives.unsqueeze(1)`` for one negative per anchor.
        negatives_mask: ``[N, M]`` bool, ``True`` for a real negative. Masked rows influence neither the loss nor
            any gradient, whatever values they hold.
        shared_negatives: ``[S, d]`` negatives of every anchor (a memory bank or a queue).
        positive_ids: ``[N]`` or ``[N, K]`` integer ids of the positives. A candidate with the same id as one of
            anchor i's positives is never its negative. A negative id means "unknown", here and in every other id
            argument: it clashes with nothing. Needs ``negative_ids``, ``shared_negative_ids`` or ``in_batch``.
        negative_ids: ``[N, M]`` integer ids of ``negatives``; needs ``positive_ids``.
        shared_negative_ids: ``[S]`` integer ids of ``shared_negatives``; needs ``positive_ids``.
        queue: a ``NegativeQueue``: its filled rows and ids as ``shared_negatives`` and
            ``shared_negative_ids`` (the rows in the anchors' dtype; the ids when ``positive_ids`` are given); not
            together with them.
        guide: ``(anchors [N, g], positives [N, g] or [N, K, g], negatives [N, M, g] or None)`` embeddings of a
            guide model (any width g; no gradient flows into them), for ``false_negative_margin``.
        teacher_scores: ``[N, K + M]`` a teacher's scores of each anchor with its K positives, then its M
            negatives (constants: no gradient flows into them), for ``distillation``.
        {options}

    Returns:
        A 0-d tensor with the inputs' dtype and device, differentiable w.r.t. all inputs and a tensor temperature.
        Float16/bfloat16 inputs (and ``torch.autocast`` regions) are computed in float32, then cast back.

    Raises:
        TypeError: a non-tensor, non-floating, sparse or nested input, inputs of different dtypes (they are
            not promoted), a ``loss_fn`` that is not an ``NTXentLoss``, an option of the wrong type.
        ValueError: a shape that disagrees (the message names the argument, the expected and the actual shape,
            and which argument fixed the size), an empty batch, no negatives at all, a temperature <= 0, inputs
            on different devices or on the meta device, an option that would do nothing. A tensor temperature on
            an accelerator or inside ``torch.compile`` is checked by a device-side assertion (``RuntimeError``),
            never by a host sync.

    Example:
        >>> import torch, pml_triplets as pt
        >>> e0, e1, e2 = torch.eye(3, dtype=torch.float64)
        >>> a, p, n = e0[None], e0[None], torch.stack([e1, e2])[None]  # [1, 3], [1, 3], [1, 2, 3]
        >>> loss = pt.infonce(a, p, n, temperature=0.5)
        >>> torch.isclose(loss, torch.log1p(2 * torch.exp(torch.tensor(-1 / 0.5, dtype=torch.float64)))).item()
        True
    """
    opts = make_options(**_options(locals()))
    inputs = Inputs(anchors=anchors, positives=positives, negatives=negatives, negatives_mask=negatives_mask,
                    shared_negatives=shared_negatives, positive_ids=positive_ids, negative_ids=negative_ids,
                    shared_negative_ids=shared_negative_ids, guide=guide, teacher_scores=teacher_scores,
                    temperature=temperature_of(opts))  # fmt: skip
    return evaluate(opts, inputs if queue is None else with_queue(queue, inputs, in_batch))


class InfoNCE(nn.Module):
    """``nn.Module`` form of ``infonce``: configuration in the constructor, data in ``forward``.

    A tensor ``temperature`` is registered on the module as ``tau``: an ``nn.Parameter`` as a parameter
    (``parameters()``, ``state_dict()``, ``.double()`` see it), any other tensor as a buffer.
    ``loss_fn`` is a registered submodule, so ``.to(device)`` moves it; nothing is ever written into it. Its
    current state is read at every call (its distance, temperature and reducer); assigning a new one
    (``module.loss_fn = fn``) is checked as the constructor checks it.

    Args:
        {options}

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
        temperature: Temperature | None = DEFAULT.temperature,
        *,
        loss_fn: NTXentLoss | None = DEFAULT.loss_fn,
        learnable_temperature: bool = False,
        in_batch: bool = DEFAULT.in_batch,
        chunk_size: int | None = DEFAULT.chunk_size,
        engine: Engine = DEFAULT.engine,
        gather_across_devices: bool = DEFAULT.gather_across_devices,
        directions: tuple[Direction, ...] = DEFAULT.directions,
        partition: Partition = DEFAULT.partition,
        hardness_mode: HardnessMode = DEFAULT.hardness_mode,
        hardness_strength: float = DEFAULT.hardness_strength,
        false_negative_margin: float | None = DEFAULT.false_negative_margin,
        margin_strategy: MarginStrategy = DEFAULT.margin_strategy,
        debias_prior: float = DEFAULT.debias_prior,
        hcl_beta: float = DEFAULT.hcl_beta,
        decoupled: bool = DEFAULT.decoupled,
        distillation: Distillation = DEFAULT.distillation,
        teacher_temperature: float | None = DEFAULT.teacher_temperature,
        infonce_weight: float = DEFAULT.infonce_weight,
    ) -> None:
        """Check the configuration once; see the class docstring for the arguments."""
        super().__init__()
        self.options = make_options(**_options(locals()))
        if not isinstance(learnable_temperature, bool):
            raise TypeError(f"`learnable_temperature` must be a bool; got {type(learnable_temperature).__name__}")
        self.loss_fn = loss_fn  # a submodule when given: .to(device) moves it; never written to
        if isinstance(temperature, nn.Parameter):
            self.tau: torch.Tensor | None = temperature
        elif isinstance(temperature, torch.Tensor):
            self.register_buffer("tau", temperature)
        else:
            self.tau = None
        self.log_temperature: nn.Parameter | None = None
        if learnable_temperature:
            start = float(torch.as_tensor(temperature_of(self.options)).detach().double())
            self.log_temperature = nn.Parameter(torch.tensor(math.log(start)))

    def __setattr__(self, name: str, value: Any) -> None:
        """``module.loss_fn = fn`` after construction is checked as the constructor checks it, then used."""
        if name == "loss_fn" and "options" in self.__dict__:
            given = {option: getattr(self.options, option) for option in NAMES}
            self.__dict__["options"] = make_options(**{**given, "loss_fn": value})
        super().__setattr__(name, value)

    @property
    def temperature(self) -> Temperature:
        """The temperature in use: ``exp(log_temperature)`` when learnable, else the given one (or loss_fn's)."""
        return temperature_of(self.options, self.log_temperature, self.tau)

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
        shared_negative_ids: torch.Tensor | None = None,
        queue: NegativeQueue | None = None,
        guide: Guide | None = None,
        teacher_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss for one batch: the data arguments of ``infonce``, with the same shapes and meaning.

        ``anchors [N, d]``, ``positives [N, d]`` or ``[N, K, d]``, ``negatives [N, M, d]`` or ``None``,
        ``negatives_mask [N, M]``, ``shared_negatives [S, d]``, ``positive_ids [N]`` or ``[N, K]``,
        ``negative_ids [N, M]``, ``shared_negative_ids [S]``, ``queue`` (a ``NegativeQueue``),
        ``guide`` (the guide model's embeddings of the three), ``teacher_scores [N, K + M]`` (with
        ``distillation``). Returns the 0-d loss (``(N*K,)`` per-pair losses
        with a ``DoNothingReducer``).
        """
        inputs = Inputs(anchors=anchors, positives=positives, negatives=negatives, negatives_mask=negatives_mask,
                        shared_negatives=shared_negatives, positive_ids=positive_ids, negative_ids=negative_ids,
                        shared_negative_ids=shared_negative_ids, guide=guide, teacher_scores=teacher_scores,
                        temperature=self.temperature)  # fmt: skip
        return evaluate(self.options, inputs if queue is None else with_queue(queue, inputs, self.options.in_batch))

    def extra_repr(self) -> str:
        """The temperature now, whether it is learnable, and every option that differs from its default."""
        learn = ", learnable" if self.log_temperature is not None else ""
        tau = float(torch.as_tensor(self.temperature).detach())
        changed = {k: v for k, v in self.options.changed().items() if k not in ("temperature", "loss_fn")}
        return f"temperature={tau:.4g}{learn}" + "".join(f", {k}={v!r}" for k, v in changed.items())


_NOT_OPTIONS = {  # InfoNCE's argument that is not an option of infonce
    "learnable_temperature": """own a parameter ``log_temperature`` initialised to ``log(temperature)``; the
        temperature ``exp(log_temperature)`` stays positive.""",
}
# Each entry point's Args list its options once, in the order of its signature (python -OO strips docstrings).
for _entry in (infonce, InfoNCE):
    _entry.__doc__ = (_entry.__doc__ or "").replace(
        "{options}", document(inspect.signature(_entry).parameters, _NOT_OPTIONS)
    )
del _entry
