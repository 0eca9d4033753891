"""The carrier of a call: one named input record, declared options, one similarity dispatch, the group's logits.

Each declaration is checked against what it declares: the gathered fields against a gather, the options' formula
flags against the fast-path gate, the one dispatch against every module that asks it, the own group's logits
against s(a, c)/τ written out here in float64, loop by loop.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields
from typing import NamedTuple

import pytest
import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from pytorch_metric_learning.losses import NTXentLoss

import pml_triplets as pt
from pml_triplets import _distributed, _engine, _inputs, _options, _similarity, ntxent

# ------------------------------------------------------------------------------------------- the input record


def test_every_input_declares_its_axis_gathering_and_cast() -> None:
    assert tuple(_inputs.DECLARED) == _inputs.Inputs._fields
    for name, declared in _inputs.DECLARED.items():
        assert declared.axis in ("row", "shared", "none"), name
        assert declared.cast in ("work", "kept"), name
        assert not declared.gathered or declared.axis == "row", f"{name}: only rows are gathered"


def test_a_field_without_a_declaration_fails_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    class Undeclared(NamedTuple):
        anchors: torch.Tensor

    monkeypatch.setattr(_inputs, "Inputs", Undeclared)
    with pytest.raises(TypeError, match=r"`Inputs.anchors` has no Declared annotation"):
        _inputs._declared()


def test_the_gathered_inputs_fit_the_distributed_signature() -> None:
    parts = sum(_inputs.DECLARED[name].parts for name in _inputs.GATHERED)
    assert parts <= _distributed._SLOTS


@pytest.mark.parametrize("entry", [pt.infonce, pt.InfoNCE.forward], ids=["infonce", "InfoNCE.forward"])
def test_every_data_argument_is_a_field(entry: object) -> None:
    names = set(_inputs.Inputs._fields)
    data = set(inspect.signature(pt.InfoNCE.forward).parameters) - {"self", "queue"}  # queue: shared_* fields
    options = set(_options.NAMES)
    arguments = set(inspect.signature(entry).parameters) - {"self", "queue"}  # type: ignore[arg-type]
    assert arguments - options == data
    assert data <= names
    assert names - data == {"shared_mask", "temperature"}  # the queue's filled slots; the resolved temperature


def test_gathering_loops_over_the_gathered_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def two_ranks(tensors: list[torch.Tensor | None], n: int, *, names: list[str]) -> object:
        seen.append(list(names))  # a second rank holding a copy of this one's rows
        return [None if t is None else torch.cat([t, t]) for t in tensors], n, 2 * n

    monkeypatch.setattr(_distributed, "gather_rows", two_ranks)
    n, k, m, d, g = 3, 2, 4, 5, 6
    x = _inputs.Inputs(
        anchors=torch.randn(n, d),
        positives=torch.randn(n, k, d),
        negatives=torch.randn(n, m, d),
        positive_ids=torch.arange(n * k).reshape(n, k),
        guide=(torch.randn(n, g), torch.randn(n, k, g), None),
        shared_negatives=torch.randn(7, d),
        temperature=0.1,
    )
    out, offset, total = _inputs.gather(x, n)
    assert (offset, total) == (n, 2 * n)
    assert seen == [["anchors", "positives", "negatives", "negatives_mask", "positive_ids", "negative_ids",
                     "guide[0]", "guide[1]", "guide[2]"]]  # fmt: skip
    for name in _inputs.GATHERED:
        given, gathered = getattr(x, name), getattr(out, name)
        multi = _inputs.DECLARED[name].parts > 1
        for a, b in zip(*((given, gathered) if multi else ((given,), (gathered,))), strict=True):
            assert (a is None and b is None) or torch.equal(b, torch.cat([a, a])), name
    assert out.shared_negatives is x.shared_negatives  # shared and none: as they were
    assert out.temperature == 0.1


# ---------------------------------------------------------------------------------------- the options' gate


def test_every_option_declares_whether_it_changes_the_formula() -> None:
    for f in fields(_options.Options):
        assert isinstance(f.metadata.get("formula"), bool), f"{f.name} declares neither"


CHANGED = {  # a valid call with one option (or one mode and what it needs) away from its default
    "temperature": {"temperature": 0.5},
    "loss_fn": {"loss_fn": NTXentLoss(0.2, distance=LpDistance())},
    "in_batch": {"in_batch": True},
    "chunk_size": {"chunk_size": 2},
    "engine": {"engine": "dense"},
    "gather_across_devices": {"in_batch": True, "gather_across_devices": True},
    "directions": {"in_batch": True, "directions": ("anchor_to_positive", "anchor_to_anchor")},
    "partition": {"in_batch": True, "partition": "per_direction"},
    "hardness_mode": {"hardness_mode": "own", "hardness_strength": 1.0},
    "hardness_strength": {"hardness_mode": "own", "hardness_strength": 1.0},
    "false_negative_margin": {"false_negative_margin": 0.1},
    "margin_strategy": {"false_negative_margin": 0.1, "margin_strategy": "relative"},
    "debias_prior": {"debias_prior": 0.1},
    "hcl_beta": {"hcl_beta": 0.5},
    "decoupled": {"decoupled": True},
    "distillation": {"distillation": "kl"},
    "teacher_temperature": {"distillation": "kl", "teacher_temperature": 0.5},
    "infonce_weight": {"distillation": "margin_mse", "infonce_weight": 0.5},
}


def test_the_fast_path_gate_follows_the_declarations() -> None:
    assert set(CHANGED) == set(_options.NAMES)
    declared = {f.name: f.metadata["formula"] for f in fields(_options.Options)}
    for name, given in CHANGED.items():
        opts = _options.make_options(**given)
        changes = any(declared[option] for option in given)
        assert opts.plain is not changes, name


@pytest.mark.parametrize("name", [n for n, v in CHANGED.items() if not any(
    f.metadata["formula"] for f in fields(_options.Options) if f.name in v)])  # fmt: skip
def test_an_option_that_keeps_the_formula_keeps_the_fast_paths_right(name: str) -> None:
    torch.manual_seed(1)
    a, p, n = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 3, 8)
    given = {k: v for k, v in CHANGED[name].items() if k != "gather_across_devices"}
    got = pt.infonce(a, p, n.double(), **given)  # type: ignore[arg-type]
    want = pt.reference_infonce(a, p, n.double(), **given)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


# --------------------------------------------------------------------------------------- one similarity kind


class OwnMatrix(CosineSimilarity):
    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return 2 * (query_emb @ ref_emb.T)


class OwnForward(CosineSimilarity):
    def forward(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(query_emb, ref_emb)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(CosineSimilarity, "dot", id="cosine"),
        pytest.param(lambda: DotProductSimilarity(normalize_embeddings=False), "dot", id="dot"),
        pytest.param(LpDistance, "lp", id="lp"),
        pytest.param(SNRDistance, "snr", id="snr"),
        pytest.param(OwnMatrix, "generic", id="own-compute_mat"),
        pytest.param(OwnForward, "dot", id="own-forward"),
    ],
)
def test_one_dispatch_for_the_engine_and_the_drop_in(make: type[BaseDistance], kind: str) -> None:
    distance = make()
    assert _similarity.kind_of(distance) == kind
    assert _similarity.Similarity.of(distance).kind == kind  # the engine
    own_forward = type(distance).forward is not BaseDistance.forward  # the drop-in: PML's matrix, through forward
    assert ntxent.distance_kind(distance) == ("generic" if own_forward else kind)


def test_the_reference_names_its_similarities_from_the_same_table() -> None:
    hint = inspect.signature(pt.reference_infonce).parameters["similarity"].annotation
    assert "SimilarityName" in str(hint)
    assert set(_similarity.NAMED) == {"cosine", "dot", "euclidean"}


# ------------------------------------------------------------------------------------ the own group's logits


def _s(distance: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """s(x, y) of two vectors, from the definitions."""
    if distance == "cosine":
        return float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))
    if distance == "dot":
        return float(x @ y)
    return -math.sqrt(float(((x - y) ** 2).sum()))  # minus the Euclidean distance


LOSS_FNS = {
    "cosine": lambda tau: {"temperature": tau},
    "dot": lambda tau: {"loss_fn": NTXentLoss(tau, distance=DotProductSimilarity(normalize_embeddings=False))},
    "lp": lambda tau: {"loss_fn": NTXentLoss(tau, distance=LpDistance(normalize_embeddings=False))},
}


@pytest.mark.parametrize("in_batch", [False, True], ids=["per-anchor", "in-batch"])
@pytest.mark.parametrize("similarity", ["cosine", "dot", "lp"])
def test_own_logits_are_the_similarities_over_tau(similarity: str, in_batch: bool) -> None:
    torch.manual_seed(2)
    n, k, m, d, tau = 4, 2, 3, 5, 0.3
    a, p, neg = torch.randn(n, d).double(), torch.randn(n, k, d).double(), torch.randn(n, m, d).double()
    mask = torch.rand(n, m) > 0.3
    opts = _options.make_options(in_batch=in_batch, **LOSS_FNS[similarity](tau))
    x = _inputs.Inputs(anchors=a, positives=p, negatives=neg, negatives_mask=mask, temperature=tau)
    logits, valid = _engine.own_logits(opts, x)
    kind = "lp" if similarity == "lp" else similarity
    want = torch.tensor([[_s(kind, a[i], c) / tau for c in [*p[i], *neg[i]]] for i in range(n)], dtype=torch.float64)
    assert valid is not None
    assert torch.equal(valid, mask)
    keep = torch.cat([torch.ones(n, k, dtype=torch.bool), mask], dim=1)  # (a masked row is zeroed before any use)
    torch.testing.assert_close(logits[keep], want[keep], rtol=1e-12, atol=1e-12)


def test_own_logits_of_a_tensor_temperature_carry_its_gradient() -> None:
    torch.manual_seed(3)
    a, p, neg = torch.randn(3, 4).double(), torch.randn(3, 4).double(), torch.randn(3, 2, 4).double()
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = _inputs.Inputs(anchors=a, positives=p, negatives=neg, temperature=tau)
    logits, valid = _engine.own_logits(_options.make_options(), x)
    logits.sum().backward()
    cos = torch.tensor([[_s("cosine", a[i], c) for c in [p[i], *neg[i]]] for i in range(3)], dtype=torch.float64)
    assert valid is None
    assert tau.grad is not None
    assert tau.grad.item() == pytest.approx(-cos.sum().item() / 0.25, rel=1e-12)  # d(s/τ)/dτ = -s/τ²


def test_the_temperature_is_resolved_once_from_its_sources() -> None:
    fn = NTXentLoss(temperature=0.3)
    assert _options.temperature_of(_options.make_options(loss_fn=fn)) == 0.3
    fn.temperature = 0.4  # a schedule: read at each call
    assert _options.temperature_of(_options.make_options(loss_fn=fn)) == 0.4
    module = pt.InfoNCE(temperature=torch.tensor(0.2))
    assert module.temperature is module.tau  # the registered tensor, as .to() moves it
    learnable = pt.InfoNCE(temperature=0.25, learnable_temperature=True)
    assert learnable.temperature.item() == pytest.approx(0.25)
