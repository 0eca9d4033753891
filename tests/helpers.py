"""What the test files share: random batches, the distance table, devices, dtypes and their tolerances.

Test files import it as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``, as for ``formula.py``).
Fixtures live in ``conftest.py``, which takes its parameter lists from here; no test imports ``conftest``.
Everything random is drawn from a seeded ``torch.Generator`` in float64 on the CPU: a test casts and moves it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import torch
from formula import infonce_loop
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import NTXentLoss
from torch import nn

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------------
# Devices, dtypes, engines
# ---------------------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")),
]
DTYPES = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]
ENGINES = [pytest.param("dense", id="dense"), pytest.param("pml", id="pml")]

# (rtol, atol) of a loss, or of a gradient entry, against tests/formula.py in float64, by input dtype. The formula
# always runs on the very values the library was given (half inputs are rounded first), so input rounding is not
# part of any of these: each covers the library's own arithmetic. "Observed" is the largest |got - want| / (1 + |want|)
# over test_core, test_options and test_numerics on CPU.
TOL: dict[torch.dtype, tuple[float, float]] = {
    # The same float64 numbers summed in another order (matmuls and logsumexp vs Python loops): about 1e3
    # roundings of at most eps = 2.2e-16 each, on logits s/tau of size <= 1/tau = 100, stay below
    # 1e3 * 100 * 2.2e-16 = 2e-11; 1e-9 is that bound with a 50x margin (observed: 3e-16).
    torch.float64: (1e-9, 1e-9),
    # float32 arithmetic, eps = 1.2e-7: a logit s/tau, with s a sum of d <= 8 products and 1/tau <= 20 in these
    # tests, carries at most about 8 * 20 * 1.2e-7 = 2e-5 absolute error, all roundings going one way; random
    # roundings stay far inside that (observed: 2e-7).
    torch.float32: (2e-5, 2e-5),
    # Half inputs are computed in float32 and the loss (and each gradient) is rounded once to the input dtype.
    # bfloat16 keeps 8 significant bits: that rounding is <= 2^-8 = 3.9e-3 relative; 2e-2 is five such roundings
    # (observed: 2.5e-3, under one rounding).
    torch.bfloat16: (2e-2, 2e-2),
    # float16 keeps 11 significant bits: one rounding is <= 2^-11 = 4.9e-4 relative; 5e-3 is ten of them
    # (observed: 3.6e-4).
    torch.float16: (5e-3, 5e-3),
}

# ---------------------------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _triplets(g: torch.Generator, n: int, m: int, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = (n, d) if k == 1 else (n, k, d)
    return randn(g, n, d), randn(g, *pos), randn(g, n, m, d)


def triplets(n: int, m: int, d: int, *, k: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors (N, d), positives (N, d) -- or (N, K, d) when k > 1 -- and negatives (N, M, d), float64."""
    return _triplets(gen(seed), n, m, d, k)


def batch(
    n: int = 5, m: int = 4, d: int = 6, *, k: int = 1, s: int = 3, seed: int = 0, keep: float = 0.65, ids: int = 4
) -> dict[str, torch.Tensor]:
    """A random float64 batch keyed by :func:`pml_triplets.infonce`'s argument names.

    ``anchors``, ``positives``, ``negatives`` as :func:`triplets` gives them (the same values for the same seed),
    then ``negatives_mask`` (N, M) keeping each negative with probability ``keep``, ``shared_negatives`` (S, d),
    and ``positive_ids`` ((N,) or (N, K)) and ``negative_ids`` (N, M) drawn from only ``ids`` values, so that
    id clashes happen.
    """
    g = gen(seed)
    a, p, neg = _triplets(g, n, m, d, k)
    return {
        "anchors": a,
        "positives": p,
        "negatives": neg,
        "negatives_mask": torch.rand(n, m, generator=g) < keep,
        "shared_negatives": randn(g, s, d),
        "positive_ids": torch.randint(0, ids, (n,) if k == 1 else (n, k), generator=g),
        "negative_ids": torch.randint(0, ids, (n, m), generator=g),
    }


def hard_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor opposite its positive and aligned with its negatives: cosines about -1 and +1.

    With cosine similarity every term is about 2/tau + log(M).
    """
    g = gen(seed)
    u = torch.nn.functional.normalize(randn(g, n, d), dim=1)
    return u, -u + 0.05 * randn(g, n, d), u[:, None] + 0.05 * randn(g, n, m, d)


def easy_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor aligned with its positive and opposite its negatives: every term about M e^{-2/tau}."""
    a, p, neg = hard_batch(seed, n, m, d)
    return a, -p, -neg


def random_batch(seed: int, n: int = 4, m: int = 3, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triplets(n, m, d, seed=seed)


BATCHES = {"hard": hard_batch, "easy": easy_batch, "random": random_batch}


def leaves(*xs: torch.Tensor | None) -> list[Any]:
    """Detached copies that require grad (``None`` stays ``None``)."""
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


# ---------------------------------------------------------------------------------------------------------------
# Distances, and the formula's arguments for a call of the library
# ---------------------------------------------------------------------------------------------------------------


class Dist(NamedTuple):
    """A PML distance and how tests/formula.py computes the same similarity."""

    make: Callable[[], BaseDistance]
    sim: str  # formula.similarity kind
    unit: bool  # the distance L2-normalizes its inputs first (cosine does so inside formula.similarity)


DIST = {
    "cosine": Dist(CosineSimilarity, "cosine", False),
    "dot-raw": Dist(lambda: DotProductSimilarity(normalize_embeddings=False), "dot", False),
    "lp-unit": Dist(LpDistance, "euclidean", True),
    "lp-raw": Dist(lambda: LpDistance(normalize_embeddings=False), "euclidean", False),
}
DISTANCES = [pytest.param(v, id=k) for k, v in DIST.items()]


def loss_fn(dist: Dist, tau: float | torch.Tensor) -> NTXentLoss:
    return NTXentLoss(temperature=tau, distance=dist.make())


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) row by row, as the normalizing distances define it (a zero row stays zero)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(1e-12)


# infonce's keyword -> infonce_loop's keyword
RETRIEVAL_OPTIONS = (
    "directions",
    "partition",
    "hardness_mode",
    "hardness_strength",
    "false_negative_margin",
    "margin_strategy",
    "guide",
)
FORMULA_NAMES = {
    "negatives_mask": "mask",
    "shared_negatives": "shared",
    "in_batch": "in_batch",
    "positive_ids": "pos_ids",
    "negative_ids": "neg_ids",
    "shared_negative_ids": "shared_ids",
    # the retrieval options have the same names in both
    **{name: name for name in RETRIEVAL_OPTIONS},
}


def formula(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    tau: float | torch.Tensor,
    dist: Dist = DIST["cosine"],
    **options: Any,
) -> torch.Tensor:
    """tests/formula.py in float64 for the call ``infonce(anchors, positives, negatives, **options)``.

    ``options`` use infonce's names (``negatives_mask``, ``shared_negatives``, ``in_batch``, ``positive_ids``,
    ``negative_ids``); tensors are used as given (already rounded to the input dtype, on any device) and stay
    differentiable.
    """

    def prep(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.cpu().double()
        return unit(x) if dist.unit else x

    kw = {FORMULA_NAMES[key]: value for key, value in options.items()}
    for key in ("mask", "pos_ids", "neg_ids", "shared_ids"):
        if kw.get(key) is not None:
            kw[key] = kw[key].cpu()
    kw["shared"] = prep(kw.get("shared"))
    if kw.get("guide") is not None:  # the formula takes the cosine of the guide: no normalization here
        kw["guide"] = tuple(None if g is None else g.cpu().double() for g in kw["guide"])
    return infonce_loop(prep(anchors), prep(positives), prep(negatives), tau, sim=dist.sim, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------------------------


def load_script(path: Path) -> ModuleType:
    """A script that is not in a package (``examples/*.py``, ``benchmarks/*.py``), loaded by path as its stem.

    Registered in ``sys.modules`` (dataclasses look their module up), with its folder on ``sys.path`` as when it
    runs as a script (``benchmarks/bench_mine.py`` imports ``bench_loss``).
    """
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def clip_loss_class() -> type[nn.Module]:
    """open_clip's ClipLoss from the installed package's ``loss.py``.

    The module needs only torch; it is loaded by file because ``import open_clip`` imports torchvision, whose PyPI
    wheels fail against a CPU-only torch ("operator torchvision::nms does not exist").
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (it is not in the dev extra: it pulls CUDA torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ClipLoss  # type: ignore[no-any-return]
