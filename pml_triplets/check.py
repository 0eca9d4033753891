"""``python -m pml_triplets check``: ``pml_triplets.infonce`` against the float64 reference formula.

For every available device and dtype, and for each option of the loss (per-anchor negatives, a mask, K positives,
shared negatives, in-batch negatives with ids, the retrieval options: all four directions with hardness
weighting, and the symmetric per-direction loss with a guide's false-negative filter; the debiased family), the
value and the gradients
with respect to every embedding input are compared with ``pml_triplets.reference_infonce`` and its autograd
gradients, in float64, evaluated on the *same* inputs: half-precision inputs are rounded first, and the reference
sees the rounded values. The only error left is then the computation's, and the tolerances below bound it.

Tolerances. Let ``u`` be the unit roundoff (``eps / 2``) of the precision the loss is computed in: float64 for
float64 inputs, float32 for everything else (half-precision inputs are upcast, computed, and cast back). A logit is
a cosine similarity (a sum of ``d`` products, ``|s| <= 1``) divided by ``τ``, plus ``h * s`` with
``hardness_strength`` ``h`` where hardness applies, so ``|logit| <= 1/τ + h``; a loss term is a log-sum-exp over the
``T`` logits of one softmax (the positive and the candidates of every direction). Rounding errors of a sum of ``n``
terms grow like ``sqrt(n) * u`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 2.8), so
with a safety factor ``C = 4``::

    |Δ loss|                 <= C * sqrt(d + T) * u * (|loss| + 1/τ + h)  # logits are at most 1/τ + h in size
    max|Δ ∇x| / max|∇x ref|  <= C * sqrt(d + T) * u * (1 + 1/τ + h)       # softmax weights carry the logits' error

Half precision adds exactly one rounding of the float32 result to the output dtype: at most half a unit in the
last place of the value, ``ulp(loss) / 2 <= (eps / 2) * |loss|``, and ``(eps / 2) * max|∇x|`` per gradient element,
with ``eps`` the dtype's (bfloat16: ``eps / 2 = 2**-8 ≈ 0.39 %``; float16: ``2**-11 ≈ 0.05 %``). A 1 % error in
the value is at least 1.28 units in the last place of bfloat16 (an ulp is at most ``eps * |x| ≈ 0.78 %``), so the
rounded faulty value lands at least one ulp from the correctly rounded one, beyond the half-ulp bound unless the
reference sits within float32 noise of a rounding midpoint; ``tests/test_check.py`` shows it failing every dtype.

The false-negative filter is a comparison, so rounding could flip it for a candidate within float32 noise of its
threshold: the guide of that case is one-hot (every guide cosine is exactly 0 or 1, the threshold 0.9), which every
dtype represents exactly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from pytorch_metric_learning.losses import NTXentLoss

from . import DEFAULT_TEMPERATURE, build_indices, concat_embeddings, infonce, reference_infonce
from ._cli import run_command

__all__ = ["Row", "add_arguments", "execute", "main", "report", "run_checks"]

SUMMARY = "compare pml_triplets.infonce with the float64 reference formula on every available device and dtype"
DESCRIPTION = (
    "Compare pml_triplets.infonce (its default and pml engines) and plain NTXentLoss + build_indices with the "
    "float64 reference formula, value and gradients, for per-anchor negatives, a mask, K positives, shared "
    "negatives, in-batch negatives with ids and the retrieval options (directions, hardness, a guide's "
    "false-negative filter), on every available device and dtype. Exits 1 if any row fails."
)
SAFETY = 4.0  # the constant C of the module docstring
GTE = ("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor", "positive_to_positive")
RETRIEVAL = ("gte+hardness+shared", "symmetric+guide,K=2")  # cases only the default (dense) engine computes
DEBIASED = ("debias+hcl,in-batch", "decoupled+hcl+shared")  # the debiased family: dense engine only
HALF = (torch.float16, torch.bfloat16)
# Checked on every device: half-precision inputs are computed in float32, so all four run on the CPU too.
DTYPES = (torch.float64, torch.float32, *HALF)


@dataclass(frozen=True)
class Row:
    """One comparison: a loss evaluated by ``method`` on ``case``'s inputs in ``dtype`` on ``device``.

    Attributes:
        value, reference: the loss and the float64 reference on the same (rounded) inputs.
        value_error, value_tolerance: ``|value - reference|`` and its bound.
        grad_error, grad_tolerance: the largest ``max|∇x - ∇x ref| / max|∇x ref|`` over the inputs ``x``, and its
            bound.
        error: the exception the method raised, if any (the row then fails).
    """

    device: str
    dtype: str
    case: str
    method: str
    value: float = math.nan
    reference: float = math.nan
    value_error: float = math.nan
    value_tolerance: float = 0.0
    grad_error: float = math.nan
    grad_tolerance: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Both errors finite and within their tolerances, and no exception."""
        return (
            self.error is None and self.value_error <= self.value_tolerance and self.grad_error <= self.grad_tolerance
        )


@dataclass(frozen=True)
class _Case:
    """Inputs of one comparison: float64 embeddings (rounded to each dtype later) and the other options."""

    name: str
    embeddings: dict[str, torch.Tensor]
    options: dict[str, object] = field(default_factory=dict)

    def candidates(self) -> int:
        """T: the most logits in one softmax (the positive, twice with positive_to_anchor, and every candidate)."""
        n, m = self.embeddings["negatives"].shape[:2]
        k = self.embeddings["positives"].shape[1] if self.embeddings["positives"].ndim == 3 else 1
        s = len(self.embeddings.get("shared_negatives", ()))
        docs = (n - 1) * (k + m) if self.options.get("in_batch") else 0  # the other rows' positives and negatives
        directions = cast(tuple[str, ...], self.options.get("directions", ()))
        blocks = {"positive_to_anchor": n, "anchor_to_anchor": n - 1, "positive_to_positive": docs}
        return 1 + m + s + docs + sum(size for name, size in blocks.items() if name in directions)

    def logit_bound(self, tau: float) -> float:
        """The largest |logit|: a cosine over τ, plus the hardness term ``h * s``; (1 + β)/τ with ``hcl_beta`` β."""
        beta = cast(float, self.options.get("hcl_beta", 0.0))
        return (1 + beta) / tau + cast(float, self.options.get("hardness_strength", 0.0))


def _cases(n: int, m: int, d: int, seed: int) -> list[_Case]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a, p, neg = randn(n, d), randn(n, d), randn(n, m, d)
    # Masked slots hold near-copies of their anchor: a loss that ignored the mask would move a lot.
    mask = torch.rand(n, m, generator=gen) > 0.3
    mask[0] = False  # an anchor with no negatives at all: its term is 0
    masked_neg = torch.where(mask[..., None], neg, a[:, None] + 0.1 * randn(n, m, d))
    # Anchors 2j and 2j+1 share their two positive ids, so neither meets the other's positives; some negatives
    # carry an id of their own anchor's positives (false negatives, dropped) or of another anchor's.
    pos_ids = 2 * (torch.arange(n)[:, None] // 2) + torch.arange(2)  # (N, 2)
    neg_ids = torch.randint(0, 2 * n, (n, m), generator=gen)
    neg_ids[::3, 0] = pos_ids[::3, 0]
    # The debiased family. Where n τ⁺ e^P nears Σ e^L above the clamp, its estimator is a difference of nearly equal
    # numbers (ill-conditioned: float64 itself agrees to ~1e-9 there): τ⁺ only where the data keep it away.
    debiased = [
        _Case(
            DEBIASED[0],
            {"anchors": a, "positives": randn(n, 2, d), "negatives": masked_neg},
            {
                "negatives_mask": mask,
                "in_batch": True,
                "positive_ids": pos_ids,
                "negative_ids": neg_ids,
                "debias_prior": 0.1,
                "hcl_beta": 0.5,
            },
        ),
        _Case(
            DEBIASED[1],
            {"anchors": a, "positives": p, "negatives": neg, "shared_negatives": randn(m, d)},
            {"decoupled": True, "hcl_beta": 1.0},
        ),
    ]
    return [
        *_basic_cases(a, p, neg, masked_neg, mask, pos_ids, neg_ids, randn),
        *_retrieval_cases(a, neg, randn),
        *debiased,
    ]


def _basic_cases(
    a: torch.Tensor,
    p: torch.Tensor,
    neg: torch.Tensor,
    masked_neg: torch.Tensor,
    mask: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    randn: Callable[..., torch.Tensor],
) -> list[_Case]:
    n, m, d = neg.shape
    scores = torch.cat([randn(n, 1), randn(n, m).masked_fill(~mask, math.nan)], dim=1)  # (N, 1 + M)
    return [
        _Case("plain", {"anchors": a, "positives": p, "negatives": neg}),
        _Case("mask", {"anchors": a, "positives": p, "negatives": masked_neg}, {"negatives_mask": mask}),
        _Case("K=3 positives", {"anchors": a, "positives": randn(n, 3, d), "negatives": neg}),
        _Case(  # shared ids 0, 2, 4, ...: anchors 2j and 2j+1 (positive id 2j) each lose one shared negative
            "shared negatives+ids",
            {"anchors": a, "positives": p, "negatives": neg, "shared_negatives": randn(m, d)},
            {"positive_ids": pos_ids[:, 0], "shared_negative_ids": 2 * torch.arange(m)},
        ),
        _Case(
            "in-batch+ids+mask,K=2",
            {"anchors": a, "positives": randn(n, 2, d), "negatives": masked_neg},
            {"negatives_mask": mask, "in_batch": True, "positive_ids": pos_ids, "negative_ids": neg_ids},
        ),
        *(
            _Case(  # the teacher's scores of the masked slots are NaN: never read
                f"distill {kind}+mask",
                {"anchors": a, "positives": p, "negatives": masked_neg},
                {"negatives_mask": mask, "teacher_scores": teacher, "distillation": kind, "infonce_weight": 0.5},
            )
            for kind, teacher in (("kl", 10 * scores), ("margin_mse", scores))
        ),
    ]


def _retrieval_cases(a: torch.Tensor, neg: torch.Tensor, randn: Callable[..., torch.Tensor]) -> list[_Case]:
    """The retrieval options on at most 8 anchors and 4 negatives each: the reference's loops grow with N² (K + M)."""
    n, m, d = min(len(a), 8), min(neg.shape[1], 4), a.shape[1]
    a, neg = a[:n], neg[:n, :m]
    # A one-hot guide: rows 2j and 2j+1 share a class and each negative draws one, so g is exactly 0 or 1
    width = n // 2 + 1
    classes = torch.nn.functional.one_hot(torch.arange(n) // 2, width).double()  # (N, g)
    neg_classes = torch.nn.functional.one_hot(torch.arange(n * m).reshape(n, m) % width, width).double()  # (N, M, g)
    guide = (classes, classes[:, None].expand(n, 2, width).clone(), neg_classes)
    gte = {"in_batch": True, "directions": GTE, "hardness_mode": "all", "hardness_strength": 2.0}
    symmetric = {"in_batch": True, "directions": GTE[:2], "partition": "per_direction", "false_negative_margin": 0.1}
    return [
        _Case(
            RETRIEVAL[0],
            {"anchors": a, "positives": randn(n, d), "negatives": neg, "shared_negatives": randn(m, d)},
            gte,
        ),
        _Case(
            RETRIEVAL[1], {"anchors": a, "positives": randn(n, 2, d), "negatives": neg}, {**symmetric, "guide": guide}
        ),
    ]


def _half_ulp(x: float, dtype: torch.dtype) -> float:
    """Half a unit in the last place of ``x`` in ``dtype``: the largest error of rounding ``x`` to it."""
    info = torch.finfo(dtype)
    binade = 2.0 ** math.floor(math.log2(max(abs(x), info.tiny)))
    return binade * info.eps / 2


def _tolerances(case: _Case, dtype: torch.dtype, reference: float, tau: float) -> tuple[float, float]:
    """``(value, relative gradient)`` tolerances; see the module docstring."""
    d = case.embeddings["anchors"].shape[1]
    u = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    growth = SAFETY * math.sqrt(d + case.candidates()) * u
    bound = case.logit_bound(tau)
    value_tol, grad_tol = growth * (abs(reference) + bound), growth * (1 + bound)
    if dtype in HALF:  # one rounding of the float32 result to the output dtype
        value_tol += _half_ulp(reference, dtype)
        grad_tol += torch.finfo(dtype).eps / 2
    return value_tol, grad_tol


# The float64 references by (n, m, d, seed, case, dtype): they depend on nothing else, and the loop-by-loop formula
# is slow, so a process computes each one once (tests run the check many times).
_REFERENCES: dict[tuple[object, ...], tuple[float, dict[str, torch.Tensor]]] = {}

Method = Callable[[dict[str, torch.Tensor], dict[str, object]], torch.Tensor]


def _methods(case: _Case, dtype: torch.dtype, tau: float) -> dict[str, Method]:
    """The ways of computing the loss compared on ``case``; calls go through the module-level ``infonce``."""

    def default(x: dict[str, torch.Tensor], opt: dict[str, object]) -> torch.Tensor:
        return infonce(**x, **opt, temperature=tau)  # type: ignore[arg-type]

    def pml(x: dict[str, torch.Tensor], opt: dict[str, object]) -> torch.Tensor:
        return infonce(**x, **opt, temperature=tau, engine="pml")  # type: ignore[arg-type]

    def recipe(x: dict[str, torch.Tensor], opt: dict[str, object]) -> torch.Tensor:
        n, m = x["negatives"].shape[:2]
        emb = concat_embeddings(x["anchors"], x["positives"], x["negatives"])
        return cast(
            torch.Tensor, NTXentLoss(temperature=tau)(emb, indices_tuple=build_indices(n, m, device=emb.device))
        )

    methods: dict[str, Method] = {"infonce": default}
    # engine="pml" computes NTXentLoss's pairs, not the dense options
    if case.name not in RETRIEVAL + DEBIASED and "distillation" not in case.options:
        methods["infonce[pml]"] = pml
    # Plain PML over build_indices covers only [N, d] positives and [N, M, d] negatives, and computes in the
    # inputs' dtype (half precision included, where the bounds above do not hold): float32 and float64 only.
    if case.name == "plain" and dtype not in HALF:
        methods["NTXentLoss+build_indices"] = recipe
    return methods


def _loss_and_grads(
    method: Method, inputs: dict[str, torch.Tensor], options: dict[str, object]
) -> tuple[float, dict[str, torch.Tensor]]:
    """``method`` on fresh leaves copied from ``inputs``; an input that gets no gradient gets zeros."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    value = method(leaves, options)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    zeros_if_none = {
        k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)
    }
    return float(value.detach()), zeros_if_none


def _grad_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``max over x of max|∇x - ∇x ref| / max|∇x ref|``; NaN if any gradient holds a NaN (which fails)."""
    errors = [
        float((grads[k].cpu().double() - r).abs().max()) / max(float(r.abs().max()), 1e-300) for k, r in ref.items()
    ]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def run_checks(n: int = 16, m: int = 8, d: int = 32, seed: int = 0) -> list[Row]:
    """Compare every method with the reference on every case, device and dtype; one ``Row`` each.

    Args:
        n: anchors N.
        m: negatives per anchor M.
        d: embedding size d.
        seed: seed of the random embeddings.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: on a busy machine, intra-op threads made this 5x slower
    try:
        return _run_checks(n, m, d, seed)
    finally:
        torch.set_num_threads(threads)


def _run_checks(n: int, m: int, d: int, seed: int) -> list[Row]:
    tau = DEFAULT_TEMPERATURE

    def reference(x: dict[str, torch.Tensor], opt: dict[str, object]) -> torch.Tensor:
        return reference_infonce(**x, **opt, temperature=tau)  # type: ignore[arg-type]

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for dtype in DTYPES:
            for case in _cases(n, m, d, seed):
                rounded = {k: v.to(dtype) for k, v in case.embeddings.items()}
                rounded_options = {k: _to(v, "cpu", dtype) for k, v in case.options.items()}
                key = (n, m, d, seed, case.name, dtype)
                if key not in _REFERENCES:  # once per case and dtype, on the CPU, in float64
                    f64 = {k: v.double() for k, v in rounded.items()}
                    f64_options = {k: _to(v, "cpu", torch.float64) for k, v in rounded_options.items()}
                    _REFERENCES[key] = _loss_and_grads(reference, f64, f64_options)
                ref, ref_grads = _REFERENCES[key]
                value_tol, grad_tol = _tolerances(case, dtype, ref, tau)
                inputs = {k: v.to(device) for k, v in rounded.items()}
                options = {k: _to(v, device, dtype) for k, v in rounded_options.items()}
                where = Row(device, str(dtype).removeprefix("torch."), case.name, method="")
                for name, method in _methods(case, dtype, tau).items():
                    try:
                        value, grads = _loss_and_grads(method, inputs, options)
                    except Exception as exc:  # a method that raises fails its row, and the others still run
                        rows.append(replace(where, method=name, error=f"{type(exc).__name__}: {exc}"))
                        continue
                    rows.append(
                        replace(
                            where,
                            method=name,
                            value=value,
                            reference=ref,
                            value_error=abs(value - ref),
                            value_tolerance=value_tol,
                            grad_error=_grad_error(grads, ref_grads),
                            grad_tolerance=grad_tol,
                        )
                    )
    return rows


def _to(value: object, device: str, dtype: torch.dtype) -> object:
    """An option on ``device``; its floating tensors (a guide) in ``dtype``, like the embeddings; tuples entry-wise."""
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``check``, for its own parser and for the ``python -m pml_triplets`` subcommand."""
    parser.add_argument("--n", type=int, default=16, help="anchors N")
    parser.add_argument("--m", type=int, default=8, help="negatives per anchor M")
    parser.add_argument("--d", type=int, default=32, help="embedding size d")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random embeddings")


def execute(args: argparse.Namespace) -> int:
    """Run the checks that ``args`` (from ``add_arguments``) describe and ``report`` them."""
    return report(run_checks(args.n, args.m, args.d, args.seed))


def report(rows: list[Row]) -> int:
    """Print the table; return 0 when every row passes, 1 otherwise."""
    header = (
        f"{'device':<7}{'dtype':<10}{'case':<23}{'method':<26}{'loss':>12}{'reference':>12}"
        f"{'|d loss|':>10}{'tol':>9}{'grad err':>10}{'tol':>9}  pass"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.device:<7}{r.dtype:<10}{r.case:<23}{r.method:<26}{r.value:>12.6f}{r.reference:>12.6f}"
            f"{r.value_error:>10.1e}{r.value_tolerance:>9.1e}{r.grad_error:>10.1e}{r.grad_tolerance:>9.1e}"
            f"  {'yes' if r.passed else 'NO'}"
        )
    print(
        "\nloss, reference: the method and the float64 formula on the same (rounded) inputs; "
        "grad err: max over anchors, positives,\nnegatives (and shared negatives) of max|grad - grad ref| / "
        "max|grad ref|; tol: the bounds derived in pml_triplets/check.py."
    )
    for r in rows:
        if r.error is not None:
            print(f"{r.device} {r.dtype} {r.case} {r.method} raised {r.error}")
    failed = sum(not r.passed for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pml_triplets check [options]``; returns the exit status."""
    return run_command("python -m pml_triplets check", DESCRIPTION, add_arguments, execute, argv)
