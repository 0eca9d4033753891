"""Every option of the loss, spelled once: name, type (a ``Literal`` for a choice), default and description.

``infonce``, ``InfoNCE``, ``cached_step`` and ``reference_infonce`` take these options; the signatures of
``infonce`` and ``InfoNCE`` read the defaults from ``DEFAULT``, their docstrings list them from
``document`` (once, in signature order), ``InfoNCE``'s ``repr`` prints the ones that differ from it, and
``make_options`` checks them all -- from Python values and object types only, never a tensor's value, so it
costs microseconds and traces cleanly under ``torch.compile``.
"""

from __future__ import annotations

import numbers
import re
import textwrap
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer

from ._compat import is_compiling
from ._inputs import Temperature
from ._similarity import Similarity
from ._validation import check_temperature
from .ntxent import NTXentLoss as DropInNTXentLoss

__all__: list[str] = []  # private module

Engine = Literal["auto", "dense", "pml"]
Direction = Literal["anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive"]
Partition = Literal["joint", "per_direction"]
HardnessMode = Literal["in_batch", "own", "all"] | None
MarginStrategy = Literal["absolute", "relative"]
Distillation = Literal["kl", "margin_mse"] | None
Reduction = Literal["mean", "none", "pml"]
A2P, P2A, A2A, P2P = typing.get_args(Direction)
DEFAULT_TEMPERATURE = 0.07


# Each option declares whether a value other than its default changes which terms the loss sums (more blocks,
# weights, filters): then the engine's fast paths, written for the plain formula, must not run (``Options.plain``).
# The others leave the formula's terms alone: the fast paths take any temperature, distance, chunk size, engine
# -- and any hardness strength, which is > 0 exactly with a hardness_mode (checked), itself declared.
CHANGES_FORMULA, KEEPS_FORMULA = {"formula": True}, {"formula": False}


@dataclass(frozen=True)
class Options:
    """One checked configuration: each option's name, type and default; ``DOCS`` below describes each."""

    temperature: Temperature | None = field(default=None, metadata=KEEPS_FORMULA)
    loss_fn: NTXentLoss | None = field(default=None, metadata=KEEPS_FORMULA)
    in_batch: bool = field(default=False, metadata=KEEPS_FORMULA)
    chunk_size: int | None = field(default=None, metadata=KEEPS_FORMULA)
    engine: Engine = field(default="auto", metadata=KEEPS_FORMULA)
    gather_across_devices: bool = field(default=False, metadata=KEEPS_FORMULA)
    directions: tuple[Direction, ...] = field(default=(A2P,), metadata=CHANGES_FORMULA)
    partition: Partition = field(default="joint", metadata=CHANGES_FORMULA)
    hardness_mode: HardnessMode = field(default=None, metadata=CHANGES_FORMULA)
    hardness_strength: float = field(default=0.0, metadata=KEEPS_FORMULA)  # (> 0 exactly with a hardness_mode: checked)
    false_negative_margin: float | None = field(default=None, metadata=CHANGES_FORMULA)
    margin_strategy: MarginStrategy = field(default="absolute", metadata=CHANGES_FORMULA)
    debias_prior: float = field(default=0.0, metadata=CHANGES_FORMULA)
    hcl_beta: float = field(default=0.0, metadata=CHANGES_FORMULA)
    decoupled: bool = field(default=False, metadata=CHANGES_FORMULA)
    distillation: Distillation = field(default=None, metadata=CHANGES_FORMULA)
    teacher_temperature: float | None = field(default=None, metadata=KEEPS_FORMULA)  # (only with a distillation)
    infonce_weight: float = field(default=1.0, metadata=CHANGES_FORMULA)

    @property
    def dense(self) -> bool:
        """Whether the dense engine computes the loss (``loss_fn`` computes NTXentLoss's own loss)."""
        return self.engine != "pml" and (self.loss_fn is None or plain_ntxent(self.loss_fn))

    @property
    def similarity(self) -> Similarity:
        # Made once per Options in eager mode (the engine asks a few times a call). Not while compiling, where it
        # costs nothing at run time and a traced map body may not mutate what it closes over; not with
        # functools.cached_property either, whose lock torch.compile cannot trace.
        # Remade when loss_fn's distance was replaced (its attributes are read by the Similarity when used).
        distance = None if self.loss_fn is None else self.loss_fn.distance
        sim: Similarity | None = self.__dict__.get("_similarity")
        if sim is None or sim.distance is not distance:
            sim = Similarity.of(distance)
            if not is_compiling():
                object.__setattr__(self, "_similarity", sim)
        return sim

    @property
    def reduction(self) -> Reduction:
        """How to reduce: a plain MeanReducer without regularizer ("mean"), DoNothingReducer, or PML's objects."""
        if self.loss_fn is None:
            return "mean"
        reducer, regularizer = self.loss_fn.reducer, self.loss_fn.embedding_regularizer
        if isinstance(reducer, DoNothingReducer):
            return "none"
        return "mean" if type(reducer) is MeanReducer and regularizer is None else "pml"

    @property
    def plain(self) -> bool:
        """Every option declared ``formula=True`` at its default: the plain formula, which the fast paths compute."""
        plain: bool | None = self.__dict__.get("_plain")  # (made once per Options in eager mode: see similarity)
        if plain is None:
            plain = not any(_differs(getattr(self, name), default) for name, default in _FORMULA)
            if not is_compiling():
                object.__setattr__(self, "_plain", plain)
        return plain

    @property
    def debiased(self) -> bool:
        """Whether the anchor-to-positive negatives' sum is the debiased family's estimator (any of its options)."""
        return self.debias_prior != 0 or self.hcl_beta != 0 or self.decoupled

    def changed(self) -> dict[str, object]:
        """The options that differ from their defaults, by name (a tensor differs unless it is the default)."""
        values = {f.name: (getattr(self, f.name), f.default) for f in fields(self)}
        return {k: v for k, (v, d) in values.items() if _differs(v, d)}


def _differs(value: object, default: object) -> bool:
    return value is not default and (isinstance(value, torch.Tensor) or value != default)


_FORMULA = tuple((f.name, f.default) for f in fields(Options) if f.metadata["formula"])
DEFAULT = Options()


def temperature_of(
    opts: Options, log_temperature: torch.Tensor | None = None, module_tau: torch.Tensor | None = None
) -> Temperature:
    """The call's temperature, resolved once from its one source, first that applies.

    An ``InfoNCE``'s learnable ``exp(log_temperature)``; its registered tensor ``module_tau`` (the ``temperature``
    tensor given, as ``.to()`` moved it); ``loss_fn.temperature`` as it is now (checked: a schedule may have set
    it); the ``temperature`` option; ``DEFAULT_TEMPERATURE``.

    Example:
        >>> temperature_of(Options()), temperature_of(Options(temperature=0.5))
        (0.07, 0.5)
    """
    if log_temperature is not None:
        return log_temperature.exp()
    if module_tau is not None:
        return module_tau
    if opts.loss_fn is not None:
        return check_temperature(opts.loss_fn.temperature)
    return DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature


DOCS = {  # the entry points' docstrings list these (see document)
    "temperature": f"""float, 0-d tensor or ``nn.Parameter`` (its gradient is computed). ``None`` means
        {DEFAULT_TEMPERATURE}, or ``loss_fn.temperature`` when ``loss_fn`` is given (read, and checked, at every call:
        a schedule that sets it is honoured). Passing both is an error.""",
    "loss_fn": """a configured ``NTXentLoss``: its distance, temperature, reducer and embedding regularizer apply
        as PML applies them to the same pairs.""",
    "in_batch": "also use every other row's positives and unmasked negatives as negatives.",
    "chunk_size": """anchors evaluated at a time; ``None`` picks it from the sizes and the device so that the
        largest intermediate stays under a budget. The value does not depend on it.""",
    "engine": """``"dense"`` computes each anchor's logits from the distance and temperature (linear in the pairs,
        uncapped); ``"pml"`` calls ``loss_fn.compute_loss`` on each chunk's pairs and returns its numbers: PML's
        own, including its ``log(num/den + tiny)`` cap (quadratic in the chunk), or ``pml_triplets.NTXentLoss``'s
        (uncapped, linear). ``"auto"`` is ``"dense"`` for every
        ``NTXentLoss`` that computes NTXentLoss's own loss, whatever its distance, and ``"pml"`` for subclasses
        that override ``compute_loss`` or ``_compute_loss``.""",
    "gather_across_devices": """with ``in_batch`` under ``torch.distributed``, take every rank's positives and
        negatives (and masks and ids) as candidates, gathered with gradient. Ranks may hold different N; they must
        agree on everything else (checked: every rank raises).""",
    "directions": """the softmax blocks of term (i, k): ``"anchor_to_positive"`` (always) and any of
        ``"positive_to_anchor"`` (``s(a_j, p_ik)`` for every row j), ``"anchor_to_anchor"`` (``s(a_i, a_j)``,
        ``j ≠ i``) and ``"positive_to_positive"`` (``s(p_ik, c)`` for the other rows' candidates); all but the first
        need ``in_batch``. As in sentence-transformers' MultipleNegativesRankingLoss.""",
    "partition": """``"joint"``: one softmax over every block; ``"per_direction"``: the mean over directions of one
        softmax each (anchor_to_positive and positive_to_anchor only).""",
    "hardness_mode": """``"in_batch"`` (other rows' candidates), ``"own"`` (the anchor's negatives) or ``"all"``
        (both, and the shared negatives): those anchor-to-positive logits get
        ``+ hardness_strength * s(a_i, c).detach()`` after the division by τ.""",
    "hardness_strength": "> 0 with a ``hardness_mode``, 0 without.",
    "false_negative_margin": """drop candidate c of term (i, k) when ``g(x, c) > g(a_i, p_ik) - margin``, with x
        the block's anchor or positive and g the cosine of ``guide``'s embeddings (of the model's own, detached,
        when ``guide`` is None); the positive pair is never dropped.""",
    "margin_strategy": """``"absolute"`` as above, or ``"relative"``: ``g(a_i, p_ik) - |g(a_i, p_ik)| * margin``;
        needs ``false_negative_margin``.""",
    "debias_prior": """τ⁺ in [0, 1), the class prior of Chuang et al.'s debiased estimator (DCL): the negatives' sum
        becomes ``G = max((Σ_c e^{L_c} − n τ⁺ e^P) / (1 − τ⁺), n e^{−1/τ})``, n the anchor's candidates after
        exclusions. Needs the cosine similarity (the clamp is n times the least ``e^{L}`` a cosine allows).""",
    "hcl_beta": """β >= 0, Robinson et al.'s hard-negative weights (HCL): ``Σ_c e^{L_c}`` becomes
        ``n Σ_c w_c e^{L_c} / Σ_c w_c`` with ``w_c = e^{β L_c}`` (not detached), with or without ``debias_prior``.""",
    "decoupled": """Yeh et al.'s decoupled loss (DCL): the positive leaves the denominator, ``ℓ = log G − P`` with G
        the negatives' sum (debiased or weighted as above); an anchor without candidates has ``ℓ = 0``. The three
        options change the anchor_to_positive softmax alone, on the dense engine: not with other ``directions``,
        ``partition="per_direction"``, ``hardness_mode`` or ``false_negative_margin``.""",
    "distillation": """add a term that distils ``teacher_scores`` (``[N, K + M]``: the teacher's score of each
        anchor with its positives, then its negatives) over each anchor's own group (its positives and its
        candidate negatives: masked ones and id clashes are left out). ``"kl"``: τ_s² times the batch mean over
        anchors of KL(softmax(t/τ_t) ‖ softmax(s/τ)), as sentence-transformers' ``DistillKLDivLoss``;
        ``"margin_mse"``: the mean over every (anchor, positive, negative) of ``((s_p - s_n) - (t_p - t_n))²``,
        as its ``MarginMSELoss``; τ_s is the temperature. The loss is ``infonce_weight * InfoNCE + term``, on the
        dense engine only: each anchor's share of the term joins its K per-pair losses, whose mean is then the loss
        (a ``DoNothingReducer`` returns them; other reducers are rejected).""",
    "teacher_temperature": """τ_t of ``distillation="kl"`` (``None``: the temperature); needs it.""",
    "infonce_weight": """the InfoNCE part's weight beside the distillation term (>= 0; 0 leaves the term
        alone); needs ``distillation``.""",
}
NAMES = tuple(f.name for f in fields(Options))


def document(parameters: Iterable[str] = NAMES, extra: Mapping[str, str] | None = None) -> str:
    """Google-style ``Args:`` entries (8-space indent) for an entry point's docstring, in its signature's order.

    ``parameters`` are the entry point's parameter names: each option among them gets its entry from ``DOCS``, each
    name of ``extra`` (an argument that is not an option) the text given there; the others are documented by hand.
    The first line is not indented: it replaces a ``{options}`` placeholder that stands at the entries' indent.
    Lines break between words, never inside a ``literal``.
    """
    docs = {**DOCS, **(extra or {})}
    return "\n".join(_entry(name, docs[name]) for name in parameters if name in docs).lstrip()


def _entry(name: str, text: str) -> str:
    # the spaces of a ``literal`` become U+00A0 while wrapping, so that a line never ends inside one
    text = re.sub(r"``.+?``", lambda m: m.group().replace(" ", "\N{NO-BREAK SPACE}"), " ".join(text.split()))
    lines = textwrap.fill(f"{name}: {text}", 116, initial_indent=" " * 8, subsequent_indent=" " * 12,
                          break_long_words=False, break_on_hyphens=False)  # fmt: skip
    return lines.replace("\N{NO-BREAK SPACE}", " ")


def plain_ntxent(loss_fn: NTXentLoss) -> bool:
    """Whether ``loss_fn`` computes NTXentLoss's own loss (a subclass that only configures it counts).

    PML's ``NTXentLoss`` does, and so does ``pml_triplets.NTXentLoss`` (the same terms, linear in the pairs, uncapped).
    """
    cls = type(loss_fn)
    return any(
        cls._compute_loss is base._compute_loss and cls.compute_loss is base.compute_loss
        for base in (NTXentLoss, DropInNTXentLoss)
    )


def _allowed(hint: object) -> tuple[object, ...]:
    """The values of a ``Literal[...]`` or ``Literal[...] | None`` annotation."""
    args = typing.get_args(hint) if typing.get_origin(hint) is not Literal else (hint,)
    return tuple(None if a is type(None) else v for a in args for v in (typing.get_args(a) or (a,)))


CHOICES = {
    name: _allowed(typing.get_type_hints(Options)[name])
    for name in ("engine", "partition", "hardness_mode", "margin_strategy", "distillation")
}


def _choice(name: str, value: object) -> None:
    if not any(value is a or (value == a and type(value) is type(a)) for a in CHOICES[name]):
        raise ValueError(f"`{name}` must be one of {CHOICES[name]}; got {value!r}")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float; got {type(value).__name__}")
    if not value - value == 0:  # not math.isfinite: it also takes a float that torch.compile traces (a schedule)
        raise ValueError(f"`{name}` must be finite; got {value}")
    return value  # type: ignore[return-value]


_CHECKED: dict[tuple[object, ...], Options] = {}  # options of plain Python values, by (name, type, value): checked


def make_options(**given: object) -> Options:
    """Check every option (unknown names included) and return them normalized; raises naming the argument.

    Options of plain Python values (no tensor, no ``loss_fn``: nothing that may change between calls) are checked
    once; a training loop's later calls look them up (a dict lookup instead of about 20 µs of checks).
    """
    key = _key(given)
    checked = None if key is None else _CHECKED.get(key)
    if checked is not None:
        return checked
    opts = _check(given)
    if key is not None and len(_CHECKED) < 256:
        _CHECKED[key] = opts
    return opts


def _key(given: dict[str, object]) -> tuple[object, ...] | None:
    if given.get("loss_fn") is not None or is_compiling() or any(isinstance(v, torch.Tensor) for v in given.values()):
        return None
    key = tuple((name, type(value), value) for name, value in given.items())  # (1 and True are equal, not alike)
    try:
        hash(key)
    except TypeError:  # a list of directions, say
        return None
    return key


def _check(given: dict[str, object]) -> Options:
    unknown = sorted(set(given) - set(NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {NAMES}")
    opts = replace(DEFAULT, **given)  # type: ignore[arg-type]
    if opts.loss_fn is not None:
        _check_loss_fn(opts.loss_fn, opts)
    elif opts.temperature is not None:  # numpy and Fraction scalars become floats
        opts = replace(opts, temperature=check_temperature(opts.temperature))
    for name in ("in_batch", "gather_across_devices"):
        if not isinstance(getattr(opts, name), bool):
            raise TypeError(f"`{name}` must be a bool; got {type(getattr(opts, name)).__name__}")
    if opts.gather_across_devices and not opts.in_batch:
        raise ValueError(
            "`gather_across_devices=True` needs `in_batch=True`: per-anchor and shared negatives need no gathering"
        )
    size = opts.chunk_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
        raise TypeError(f"`chunk_size` must be an int or None; got {type(size).__name__}")
    if size is not None and size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 or None (automatic); got {size}")
    for name in CHOICES:
        _choice(name, getattr(opts, name))
    opts = replace(opts, chunk_size=None if size is None else int(size), directions=_directions(opts))
    _check_hardness_and_margin(opts)
    _check_debiased(opts)
    _check_distillation(opts)
    if not opts.plain and not opts.dense:
        who = "no loss_fn" if opts.loss_fn is None else f"loss_fn={type(opts.loss_fn).__name__}"
        names = ", ".join(f"`{name}`" for name, _ in _FORMULA)
        raise ValueError(f"{names} are computed by the dense engine only; got engine={opts.engine!r} with {who}")
    return opts


def _check_distillation(opts: Options) -> None:
    weight, tau_t = _real("infonce_weight", opts.infonce_weight), opts.teacher_temperature
    if weight < 0:
        raise ValueError(f"`infonce_weight` must be >= 0; got {weight}")
    if tau_t is not None and _real("teacher_temperature", tau_t) <= 0:
        raise ValueError(f"`teacher_temperature` must be positive; got {tau_t}")
    if opts.distillation is None:
        for name, value in (("infonce_weight", weight), ("teacher_temperature", tau_t)):
            if value != getattr(DEFAULT, name):
                raise ValueError(f"`{name}={value!r}` does nothing without `distillation`: pass 'kl' or 'margin_mse'")
    elif opts.reduction == "pml":  # a reducer that weighs or drops pairs would weigh the term's shares with them
        raise ValueError(
            "`distillation` adds each anchor's share of its term to its per-pair losses: it takes the mean "
            "(MeanReducer) or the per-pair losses (DoNothingReducer); got a loss_fn with "
            f"{type(opts.loss_fn.reducer).__name__ if opts.loss_fn else None} / an embedding_regularizer"
        )
    elif tau_t is not None and opts.distillation != "kl":
        raise ValueError(f"`teacher_temperature` is the KL's τ_t; `distillation={opts.distillation!r}` has none")


def _check_loss_fn(loss_fn: object, opts: Options) -> None:
    name = type(loss_fn).__name__
    if isinstance(loss_fn, CrossBatchMemory):
        raise TypeError(
            "`loss_fn` must be a pytorch_metric_learning NTXentLoss; got CrossBatchMemory. Pass its two parts: the "
            "memory bank of negatives as `shared_negatives=` (an [S, d] tensor, e.g. shared_negatives=queue) and the "
            f"loss inside it as `loss_fn=` (loss_fn=xbm.loss, here a {type(loss_fn.loss).__name__})"
        )
    if not isinstance(loss_fn, NTXentLoss):
        raise TypeError(f"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got {name}")
    if opts.temperature is not None:
        raise ValueError(
            f"pass either `temperature` or `loss_fn` (whose temperature is used), not both; got "
            f"temperature={opts.temperature!r} and loss_fn={name}(temperature={loss_fn.temperature!r})"
        )
    check_temperature(loss_fn.temperature)
    if opts.engine == "dense" and not plain_ntxent(loss_fn):
        raise ValueError(
            f"`engine='dense'` computes NTXentLoss's own loss; {name} overrides it (use engine='auto' or 'pml')"
        )
    if isinstance(loss_fn.reducer, DoNothingReducer) and loss_fn.embedding_regularizer:
        raise ValueError(
            "`loss_fn` has a DoNothingReducer (per-pair losses) and an embedding_regularizer, whose term "
            "cannot be added to per-pair losses: drop one of them, or use another reducer"
        )


def _directions(opts: Options) -> tuple[Direction, ...]:
    directions, order = opts.directions, typing.get_args(Direction)
    if isinstance(directions, str) or not isinstance(directions, tuple | list):
        raise TypeError(f"`directions` must be a tuple of names from {order}; got {directions!r}")
    unknown = [d for d in directions if d not in order]
    if unknown:
        raise ValueError(f"`directions` may hold only {order}; got unknown {unknown}")
    if A2P not in directions:
        raise ValueError(f"`directions` must contain {A2P!r} (it holds the positive pair); got {tuple(directions)}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"`directions` must not repeat a direction; got {tuple(directions)}")
    others = [d for d in directions if d != A2P]
    if others and not opts.in_batch:
        raise ValueError(f"`directions` {others} draw their candidates from the batch: they need `in_batch=True`")
    if opts.partition == "per_direction" and {A2A, P2P} & set(directions):
        raise ValueError(
            "`partition='per_direction'` needs the positive pair in every direction's softmax, and "
            f"{A2A!r} and {P2P!r} do not contain it (each would be a softmax without its target): "
            "use partition='joint'"
        )
    return tuple(sorted(directions, key=order.index))


def _check_hardness_and_margin(opts: Options) -> None:
    strength, mode = _real("hardness_strength", opts.hardness_strength), opts.hardness_mode
    if strength < 0:
        raise ValueError(f"`hardness_strength` must be >= 0; got {strength}")
    if mode is not None and strength == 0:
        raise ValueError(f"`hardness_mode={mode!r}` does nothing with `hardness_strength=0`: pass a strength > 0")
    if mode is None and strength != 0:
        modes = CHOICES["hardness_mode"][:-1]
        raise ValueError(f"`hardness_strength={strength}` does nothing without `hardness_mode`: pass one of {modes}")
    if mode == "in_batch" and not opts.in_batch:
        raise ValueError("`hardness_mode='in_batch'` weighs other rows' candidates: it needs `in_batch=True`")
    if opts.false_negative_margin is not None:
        _real("false_negative_margin", opts.false_negative_margin)
    elif opts.margin_strategy != DEFAULT.margin_strategy:
        raise ValueError(f"`margin_strategy={opts.margin_strategy!r}` does nothing without `false_negative_margin`")


def _check_debiased(opts: Options) -> None:
    """The debiased family: its values, and only where its estimator is defined (A2P, joint, dense, cosine τ⁺)."""
    prior, beta = _real("debias_prior", opts.debias_prior), _real("hcl_beta", opts.hcl_beta)
    if not isinstance(opts.decoupled, bool):
        raise TypeError(f"`decoupled` must be a bool; got {type(opts.decoupled).__name__}")
    if not 0 <= prior < 1:
        raise ValueError(f"`debias_prior` (τ⁺, a class prior) must be in [0, 1); got {prior}")
    if beta < 0:
        raise ValueError(f"`hcl_beta` must be >= 0; got {beta}")
    if not opts.debiased:
        return
    given = ", ".join(f"{k}={v!r}" for k, v in opts.changed().items() if k in ("debias_prior", "hcl_beta", "decoupled"))
    if prior > 0 and not opts.similarity.cosine:
        raise ValueError(
            f"`debias_prior={prior}` clamps the negatives' sum at n·e^(−1/τ), n times the least e^(s/τ) of a cosine: "
            "it needs the cosine similarity, and an unbounded similarity has no such bound; got a "
            f"{type(opts.similarity.distance).__name__} (cosine: no loss_fn, or a CosineSimilarity)"
        )
    conflicts = {
        "directions": opts.directions != DEFAULT.directions,
        "partition": opts.partition != DEFAULT.partition,
        "hardness_mode": opts.hardness_mode is not None,
        "false_negative_margin": opts.false_negative_margin is not None,
    }
    clash = [name for name, differs in conflicts.items() if differs]
    if clash:
        raise ValueError(
            f"the debiased family ({given}) is defined on the anchor_to_positive softmax of the plain candidates "
            f"only; got {', '.join(f'{k}={getattr(opts, k)!r}' for k in clash)}: drop one or the other"
        )
    if not opts.dense:
        who = "no loss_fn" if opts.loss_fn is None else f"loss_fn={type(opts.loss_fn).__name__}"
        raise ValueError(
            f"the debiased family ({given}) is not NTXentLoss: the dense engine computes it; got "
            f"engine={opts.engine!r} with {who} (use engine='auto' or 'dense' with a plain NTXentLoss)"
        )
