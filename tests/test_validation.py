"""Bad input is rejected before any work, with a message naming the argument and the shapes."""

from __future__ import annotations

import inspect
import re
from typing import Any

import numpy as np
import pytest
import torch
from helpers import triplets
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss, TripletMarginLoss

import pml_triplets as pt
from pml_triplets._options import document

N, M, D = 4, 3, 5


def ok() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid float32 inputs; each test breaks one thing."""
    a, p, n = triplets(N, M, D)
    return a.float(), p.float(), n.float()


def call(**overrides: object) -> torch.Tensor:
    a, p, n = ok()
    args = {"anchors": a, "positives": p, "negatives": n} | overrides
    return pt.infonce(args.pop("anchors"), args.pop("positives"), args.pop("negatives"), **args)  # type: ignore[arg-type]


SHAPE_ERRORS = [
    pytest.param({"anchors": torch.randn(N)}, r"`anchors` must be \[N, d\]; got \(4,\)", id="anchors-1d"),
    pytest.param(
        {"anchors": torch.randn(0, D), "positives": torch.randn(0, D), "negatives": torch.randn(0, M, D)},
        r"`anchors` must hold at least one row.*got \(0, 5\)",
        id="empty-batch",
    ),
    pytest.param(
        {"positives": torch.randn(N + 1, D)},
        r"`positives` has N=5 but `anchors` has N=4; got \(5, 5\)",
        id="positives-N",
    ),
    pytest.param(
        {"positives": torch.randn(N, D + 1)},
        r"`positives` has d=6 but `anchors` has d=5; got \(4, 6\)",
        id="positives-d",
    ),
    pytest.param(
        {"negatives": torch.randn(N, D)},
        r"`negatives` must be \[N, M, d\] = \[4, M, 5\]; got \(4, 5\).*unsqueeze\(1\)",
        id="negatives-2d",
    ),
    pytest.param(
        {"negatives": torch.randn(N * M, D)},
        r"`negatives` must be .*got \(12, 5\).*reshape",
        id="negatives-flattened",
    ),
    pytest.param(
        {"negatives": torch.randn(N + 1, M, D)},
        r"`negatives` has N=5 but `anchors` has N=4; got \(5, 3, 5\)$",  # no transpose hint: dim 1 is not N
        id="negatives-N",
    ),
    pytest.param(
        {"negatives": torch.randn(M, N, D)},
        r"`negatives` has N=3 but `anchors` has N=4; got \(3, 4, 5\) "
        r"\(did you pass \[M, N, d\]\? use negatives\.transpose\(0, 1\)\)$",
        id="negatives-transposed",
    ),
    pytest.param(
        {"negatives": torch.randn(N, M, D + 2)},
        r"`negatives` has d=7 but `anchors` has d=5; got \(4, 3, 7\)",
        id="negatives-d",
    ),
    pytest.param({"negatives": torch.randn(N, 0, D)}, r"no negatives.*got \(4, 0, 5\)", id="M-zero"),
    pytest.param({"negatives": None}, r"no negatives.*got None", id="negatives-none"),
    pytest.param({"temperature": 0.0}, r"`temperature` must be positive.*got 0.0", id="temperature-zero"),
    pytest.param({"temperature": -1.0}, r"`temperature` must be positive.*got -1.0", id="temperature-negative"),
    pytest.param({"temperature": float("nan")}, r"`temperature` must be positive and finite", id="temperature-nan"),
    pytest.param(
        {"negatives_mask": torch.ones(N, M + 1, dtype=torch.bool)},
        r"`negatives_mask` has M=4 but `negatives` has M=3; got \(4, 4\)",
        id="mask-shape",
    ),
    pytest.param(
        {"shared_negatives": torch.randn(7, D + 1)},
        r"`shared_negatives` has d=6 but `anchors` has d=5; got \(7, 6\)",
        id="shared-d",
    ),
    pytest.param(
        {"positive_ids": torch.zeros(N + 1, dtype=torch.long), "in_batch": True},
        r"`positive_ids` has N=5 but `anchors` has N=4; got \(5,\)",
        id="pos-ids-shape",
    ),
    pytest.param(
        {
            "positive_ids": torch.zeros(N, dtype=torch.long),
            "negative_ids": torch.zeros(N, M + 1, dtype=torch.long),
        },
        r"`negative_ids` has M=4 but `negatives` has M=3; got \(4, 4\)",
        id="neg-ids-shape",
    ),
    pytest.param(
        {"positive_ids": torch.zeros(N, dtype=torch.long)},
        r"`positive_ids` has no effect",
        id="ids-no-effect",
    ),
    pytest.param(
        {"negative_ids": torch.zeros(N, M, dtype=torch.long)},
        r"`negative_ids` needs `positive_ids`",
        id="neg-ids-alone",
    ),
    pytest.param({"chunk_size": 0}, r"`chunk_size` must be >= 1", id="chunk-zero"),
    pytest.param({"chunk_size": -2}, r"`chunk_size` must be >= 1 or None \(automatic\); got -2", id="chunk-negative"),
    pytest.param({"engine": "fast"}, r"`engine` must be one of", id="engine"),
    pytest.param({"gather_across_devices": True}, r"`gather_across_devices=True` needs `in_batch=True`", id="gather"),
    pytest.param({"loss_fn": NTXentLoss(), "temperature": 0.1}, r"either `temperature` or `loss_fn`", id="both"),
]


@pytest.mark.parametrize(("overrides", "match"), SHAPE_ERRORS)
def test_value_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(**overrides)


TYPE_ERRORS = [
    pytest.param({"anchors": [[1.0] * D] * N}, r"`anchors` must be a torch.Tensor; got list$", id="list"),
    pytest.param(
        {"anchors": np.ones((N, D), dtype=np.float32)},
        r"`anchors` must be a torch.Tensor; got ndarray \(convert it with torch\.from_numpy\(\.\.\.\)\)$",
        id="numpy-anchors",
    ),
    pytest.param(
        {"negatives": np.ones((N, M, D), dtype=np.float32)},
        r"`negatives` must be a torch.Tensor; got ndarray \(convert it with torch\.from_numpy",
        id="numpy-negatives",
    ),
    pytest.param(
        {"negatives": np.float32(1.0)},
        r"`negatives` must be a torch.Tensor; got float32$",  # a NumPy scalar: torch.from_numpy would not take it
        id="numpy-scalar",
    ),
    pytest.param(
        {"anchors": torch.ones(N, D, dtype=torch.long)},
        r"`anchors` must hold floating-point.*int64",
        id="int-anchors",
    ),
    pytest.param(
        {"negatives": torch.ones(N, M, D, dtype=torch.int32)},
        r"`negatives` must hold floating-point",
        id="int-negatives",
    ),
    pytest.param(
        {"positives": torch.randn(N, D, dtype=torch.float64)},
        r"`positives` has dtype torch.float64 but `anchors` has torch.float32",
        id="mixed-dtype",
    ),
    pytest.param(
        {"negatives_mask": torch.ones(N, M)},
        r"`negatives_mask` must be a bool tensor.*float32",
        id="mask-dtype",
    ),
    pytest.param(
        {"positive_ids": torch.zeros(N), "in_batch": True},
        r"`positive_ids` must be an integer tensor",
        id="ids-float",
    ),
    pytest.param(
        {"temperature": "0.1"},
        r"`temperature` must be a float or a 0-d tensor; got str",
        id="temperature-str",
    ),
    pytest.param(
        {"temperature": torch.ones(2)},
        r"`temperature` must be a float or a 0-d floating tensor",
        id="temperature-vector",
    ),
    pytest.param(
        {"loss_fn": TripletMarginLoss()},
        r"`loss_fn` must be a pytorch_metric_learning NTXentLoss; got TripletMarginLoss$",
        id="loss-fn",
    ),
    pytest.param(
        {"loss_fn": CrossBatchMemory(NTXentLoss(), embedding_size=D, memory_size=8)},
        r"got CrossBatchMemory\. Pass its two parts: the memory bank of negatives as `shared_negatives=` "
        r"\(an \[S, d\] tensor, e\.g\. shared_negatives=queue\) and the loss inside it as `loss_fn=` "
        r"\(loss_fn=xbm\.loss, here a NTXentLoss\)",
        id="loss-fn-cross-batch-memory",
    ),
    pytest.param({"in_batch": 1}, r"`in_batch` must be a bool", id="in-batch-int"),
    pytest.param({"chunk_size": 2.5}, r"`chunk_size` must be an int", id="chunk-float"),
]


@pytest.mark.parametrize(("overrides", "match"), TYPE_ERRORS)
def test_type_errors(overrides: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        call(**overrides)


def test_checked_options_are_remembered_but_never_for_a_look_alike_or_a_tensor() -> None:
    # Options of plain values are checked once; the memo must not let an equal value of another type through
    # (1 == True), and a tensor temperature (whose value may change between calls) is checked at every call.
    call(in_batch=True)
    with pytest.raises(TypeError, match=r"`in_batch` must be a bool"):
        call(in_batch=1)
    tau = torch.tensor(0.1)
    call(temperature=tau)
    tau.fill_(-1.0)
    with pytest.raises(ValueError, match=r"`temperature` must be positive"):
        call(temperature=tau)
    both = ["anchor_to_positive", "anchor_to_anchor"]  # a list: unhashable, checked at every call
    assert torch.equal(call(in_batch=True, directions=both), call(in_batch=True, directions=tuple(both)))


def test_rejected_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from pml_triplets import _engine

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loss was laid out from bad input")

    monkeypatch.setattr(_engine, "_layout", boom)  # the first step after the checks
    with pytest.raises(ValueError, match="negatives"):
        call(negatives=torch.randn(N, D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put inputs on two devices")
def test_devices_differ() -> None:
    with pytest.raises(ValueError, match=r"`positives` is on cuda:0 but `anchors` is on cpu"):
        call(positives=torch.randn(N, D, device="cuda"))


def test_meta_device_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`negatives` is on the meta device"):
        call(negatives=torch.randn(N, M, D, device="meta"))


def test_module_rejects_both_and_bad_temperature() -> None:
    with pytest.raises(ValueError, match="either `temperature` or `loss_fn`"):
        pt.InfoNCE(0.1, loss_fn=NTXentLoss())
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        pt.InfoNCE(-0.5)
    with pytest.raises(ValueError, match=r"`negatives` must be \[N, M, d\]"):
        pt.InfoNCE()(*ok()[:2], torch.randn(N, D))
    with pytest.raises(TypeError, match=r"got CrossBatchMemory\. Pass its two parts"):
        pt.InfoNCE(loss_fn=CrossBatchMemory(NTXentLoss(), embedding_size=D, memory_size=8))


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        pytest.param((-1, 3), ValueError, r"`n` must be >= 0; got -1", id="n-negative"),
        pytest.param((2, -3), ValueError, r"`m` must be >= 0; got -3", id="m-negative"),
        pytest.param((2.0, 3), TypeError, r"`n` must be an int; got float", id="n-float"),
        pytest.param((True, 3), TypeError, r"`n` must be an int; got bool", id="n-bool"),
    ],
)
def test_build_indices_errors(args: tuple, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        pt.build_indices(*args)


def test_concat_embeddings_errors() -> None:
    a, p, n = ok()
    with pytest.raises(ValueError, match=r"`negatives` must be \[N, M, d\] = \[4, M, 5\]; got \(4, 5\)"):
        pt.concat_embeddings(a, p, n[:, 0])
    with pytest.raises(ValueError, match=r"`positives` must be \[N, d\] = \[4, 5\] here"):
        pt.concat_embeddings(a, torch.randn(N, 2, D), n)


def test_pairing_matrix_errors() -> None:
    with pytest.raises(TypeError, match="3-tuple"):
        pt.pairing_matrix((torch.arange(2),), 2, 1)
    with pytest.raises(TypeError, match="entry `p` must be a 1-D integer tensor"):
        pt.pairing_matrix((torch.arange(2), torch.ones(2), torch.arange(2)), 2, 1)


# ------------------------------------------------------------------ issue 30, item 4: messages that point the way


def test_labels_as_positives_point_to_the_pml_call() -> None:
    # b30fb93 said "cast with .float()", which only led to a shape error.
    a = torch.randn(N, D)
    with pytest.raises(
        TypeError, match=r"class labels\? `infonce` takes embeddings .* pt\.NTXentLoss\(\)\(embeddings, labels\)"
    ):
        pt.infonce(a, torch.randint(0, 3, (N,)))
    with pytest.raises(TypeError, match=r"got dtype torch.int64 with shape \(4, 5\) \(cast with \.float\(\)\)"):
        pt.infonce(a, torch.ones(N, D, dtype=torch.long), torch.randn(N, M, D))


@pytest.mark.parametrize(
    ("name", "stack"),
    [("negatives", r"torch\.stack\(negatives, dim=1\) makes the \[N, M, d\]"),
     ("positives", r"torch\.stack\(positives, dim=1\) makes the \[N, K, d\]")],
    ids=["negatives", "positives"],
)  # fmt: skip
def test_a_list_of_tensors_gets_the_stack_that_makes_it(name: str, stack: str) -> None:
    a, p, n = ok()
    args = {"anchors": a, "positives": p, "negatives": n}
    args[name] = [torch.randn(N, D) for _ in range(M)]
    with pytest.raises(
        TypeError, match=rf"`{name}` must be a torch\.Tensor; got list of 3 tensors \(\[4, 5\], .*{stack}"
    ):
        pt.infonce(**args)


PUBLIC = [getattr(pt, name) for name in pt.__all__ if callable(getattr(pt, name))]
WITH_ARGS = [e for e in PUBLIC if "\nArgs:\n" in (inspect.getdoc(e) or "")]


def args_section(entry: object) -> list[str]:
    """The lines of the docstring's ``Args:`` section, as ``help()`` shows them (dedented)."""
    return (inspect.getdoc(entry) or "").split("\nArgs:\n", 1)[1].split("\n\n", 1)[0].splitlines()


@pytest.mark.parametrize("entry", WITH_ARGS, ids=lambda e: e.__name__)
def test_help_lists_every_argument_at_one_indentation(entry: Any) -> None:
    # b30fb93: the spliced option list sat at another indentation than `anchors:` in help(). Every public entry
    # point documents each of its parameters once, in the signature's order, at one indentation.
    args = args_section(entry)
    names = [m.group(1) for line in args if (m := re.match(r"^    (\*{0,2}\w+): ", line))]
    signature = inspect.signature(entry).parameters.values()
    expected = [{p.VAR_KEYWORD: "**", p.VAR_POSITIONAL: "*"}.get(p.kind, "") + p.name for p in signature]
    assert names == expected, f"Args of {entry.__name__}: {names}; its signature: {expected}"
    assert all(re.match(r"^    \*{0,2}\w+: |^        \S", line) for line in args), args


def test_help_of_infonce_and_infonce_module_list_the_options_alike() -> None:
    # the options' entries come from one place (_options.DOCS), so both entry points show the same text
    def entries(entry: Any) -> dict[str, str]:
        text = "\n".join(args_section(entry))
        return dict(re.findall(r"^    (\w+): (.*?)(?=\n    \w|\Z)", text, flags=re.S | re.M))

    function, module = entries(pt.infonce), entries(pt.InfoNCE)
    shared = set(function) & set(module)
    assert shared >= {"temperature", "loss_fn", "directions", "margin_strategy"}
    assert all(function[name] == module[name] for name in shared)


@pytest.mark.parametrize("entry", PUBLIC, ids=lambda e: e.__name__)
def test_public_docstrings_are_rendered(entry: Any) -> None:
    # no placeholder left unfilled, a one-line summary first, and the spliced options never break a ``literal``
    # across lines (each line of an option's entry holds whole ``...`` spans)
    doc = inspect.getdoc(entry) or ""
    assert doc.strip(), f"{entry.__name__} has no docstring"
    assert "{options}" not in doc, doc
    assert doc.splitlines()[0].strip(), f"{entry.__name__}'s docstring does not start with a summary line"
    methods = [getattr(entry, m) for m in ("__init__", "forward", "enqueue") if m in getattr(entry, "__dict__", {})]
    assert all(inspect.getdoc(m) for m in methods), entry
    if entry in (pt.infonce, pt.InfoNCE):
        spliced = document(inspect.signature(entry).parameters).splitlines()
        assert all(line.count("``") % 2 == 0 for line in spliced), [x for x in spliced if x.count("``") % 2]
