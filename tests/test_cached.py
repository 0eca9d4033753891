"""``pt.cached_step`` (GradCache) against one backward through a graph that holds the whole batch.

The references never go through ``cached_step``'s machinery: they embed the batch with a graph -- all at once, or
(with dropout) the same mini-batches in the same order from the same RNG state -- evaluate the loss once
(``pt.infonce``, or the loop formula of ``formula.py``, which does not import the package) and call
``backward()``. Float64 throughout, so every gradient must agree to 1e-10.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from formula import infonce_loop
from helpers import DEVICES
from pytorch_metric_learning import distances, losses, regularizers
from torch import nn

import pml_triplets as pt

F64 = torch.float64
D_IN, D_OUT = 6, 5
ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("anchors", "positives", "negatives")
SIZES = [1, 3, 4, 7, 50]  # N = 7 anchors: 3 and 4 do not divide 7, 14 or 21 rows; 50 is one mini-batch


def close(x: torch.Tensor, y: torch.Tensor) -> None:
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- encoders and data


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, d_in: int = D_IN, d_out: int = D_OUT) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def make_encoder(dropout: float = 0.0, seed: int = 0, device: str = "cpu") -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(dropout).to(device, F64)


def make_data(n: int = 7, k: int = 1, m: int = 3, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Encoder *inputs*: anchors [N, D_IN], positives [N, D_IN] or [N, K, D_IN], negatives [N, M, D_IN]; and the
    per-anchor options (a mask with one fully masked row, few distinct ids so that some clash)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, m, generator=g) < 0.7
    mask[0] = False
    data = {
        "anchors": torch.randn(n, D_IN, generator=g, dtype=F64),
        "positives": torch.randn(*((n, D_IN) if k == 1 else (n, k, D_IN)), generator=g, dtype=F64),
        "negatives": torch.randn(n, m, D_IN, generator=g, dtype=F64),
        "negatives_mask": mask,
        "positive_ids": torch.randint(0, 5, (n,) if k == 1 else (n, k), generator=g),
        "negative_ids": torch.randint(0, 5, (n, m), generator=g),
        "shared": torch.randn(4, D_OUT, generator=g, dtype=F64),
    }
    return {key: v.to(device) for key, v in data.items()}


Options = Callable[[dict[str, torch.Tensor]], dict[str, Any]]


def tau_parameter(value: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value, dtype=F64))


# Each case: (k, options built afresh for every run -- a learnable temperature must not be shared by two runs).
CASES: dict[str, tuple[int, Options]] = {
    "plain": (1, lambda d: {"temperature": 0.1}),
    "mask": (1, lambda d: {"temperature": 0.2, "negatives_mask": d["negatives_mask"]}),
    "k2": (2, lambda d: {"temperature": 0.2, "negatives_mask": d["negatives_mask"]}),
    "in_batch_ids": (
        1,
        lambda d: {
            "in_batch": True,
            "positive_ids": d["positive_ids"],
            "negative_ids": d["negative_ids"],
        },
    ),
    "shared": (1, lambda d: {"temperature": 0.3, "shared_negatives": d["shared"]}),
    "tau_parameter": (2, lambda d: {"temperature": tau_parameter(0.15), "in_batch": True}),
    "loss_fn": (
        1,
        lambda d: {
            "loss_fn": losses.NTXentLoss(
                temperature=0.25,
                distance=distances.DotProductSimilarity(),
                embedding_regularizer=regularizers.LpRegularizer(),
            ),
        },
    ),
    "retrieval": (  # criterion=None: these configure the InfoNCE built up front; masks and ids go to forward
        2,
        lambda d: {
            "temperature": tau_parameter(0.2),
            "in_batch": True,
            "directions": ("anchor_to_positive", "positive_to_anchor", "anchor_to_anchor"),
            "hardness_mode": "in_batch",
            "hardness_strength": 0.5,
            "false_negative_margin": 0.1,
            "negatives_mask": d["negatives_mask"],
            "positive_ids": d["positive_ids"],
            "negative_ids": d["negative_ids"],
        },
    ),
    "module_all": (  # InfoNCE module: learnable temperature, K = 2, masks, ids, in-batch negatives
        2,
        lambda d: {
            "criterion": pt.InfoNCE(0.2, learnable_temperature=True, in_batch=True),
            "negatives_mask": d["negatives_mask"],
            "positive_ids": d["positive_ids"],
            "negative_ids": d["negative_ids"],
        },
    ),
}


def split(options: dict[str, Any]) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """The loss callable and its keyword options (``criterion`` taken out)."""
    rest = dict(options)
    return rest.pop("criterion", pt.infonce), rest


def learned(options: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors outside the encoder that get a gradient: a Parameter temperature, the criterion's parameters."""
    out = [v for v in options.values() if isinstance(v, nn.Parameter)]
    criterion = options.get("criterion")
    return out + (list(criterion.parameters()) if isinstance(criterion, nn.Module) else [])


def grads(encoder: nn.Module, options: dict[str, Any]) -> list[torch.Tensor]:
    tensors = [*encoder.parameters(), *learned(options)]
    assert all(t.grad is not None for t in tensors)
    return [t.grad.clone() for t in tensors]  # type: ignore[union-attr]


def full_batch(encoder: Callable[..., torch.Tensor], a: Any, p: Any, n: Any, options: dict[str, Any]) -> torch.Tensor:
    """The plain step: everything embedded at once with a graph, the loss, one ``backward()``."""
    loss_fn, rest = split(options)
    loss = loss_fn(encoder(a), encoder(p), None if n is None else encoder(n), **rest)
    loss.backward()
    return loss.detach()


def embed_chunks(encoder: nn.Module, x: torch.Tensor, size: int, lead: int) -> torch.Tensor:
    """``x`` [*lead dims, D_IN] embedded ``size`` rows at a time, with a graph: [*lead dims, D_OUT]."""
    rows = x.reshape(-1, x.shape[-1])  # (R, D_IN)
    out = torch.cat([encoder(rows[i : i + size]) for i in range(0, rows.shape[0], size)])  # (R, D_OUT)
    return out.reshape(*x.shape[:lead], -1)


def same_chunks(encoder: nn.Module, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, size: int, options: Any) -> Any:
    """The dropout reference: the same mini-batches, same order (anchors, positives, negatives), one graph."""
    loss_fn, rest = split(options)
    ea, ep = embed_chunks(encoder, a, size, 1), embed_chunks(encoder, p, size, p.ndim - 1)
    loss = loss_fn(ea, ep, embed_chunks(encoder, n, size, 2), **rest)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------- the gradient is the full batch's


@pytest.mark.sweep(fast=3)
@pytest.mark.parametrize("size", SIZES, ids=[f"mb{s}" for s in SIZES])
@pytest.mark.parametrize("name", list(CASES))
def test_eval_mode_gradients_equal_the_full_batch(name: str, size: int) -> None:
    k, make_options = CASES[name]
    data = make_data(k=k)
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    enc, ref = make_encoder().eval(), make_encoder().eval()
    opt_c, opt_r = make_options(data), make_options(data)

    loss = pt.cached_step(enc, a, p, n, mini_batch_size=size, **opt_c)
    want = full_batch(ref, a, p, n, opt_r)

    close(loss, want)
    assert not loss.requires_grad
    for got, expected in zip(grads(enc, opt_c), grads(ref, opt_r), strict=True):
        close(got, expected)


@pytest.mark.parametrize("size", [2, 5])
def test_gradients_equal_the_loop_formula(size: int) -> None:
    # A criterion that is not the package at all: the loop-by-loop formula, with a mask, K = 2 and in-batch.
    data = make_data(n=4, k=2, m=2, seed=3)
    a, p, n, mask = data["anchors"], data["positives"], data["negatives"], data["negatives_mask"]
    enc, ref = make_encoder().eval(), make_encoder().eval()
    criterion = functools.partial(infonce_loop, tau=0.3)

    loss = pt.cached_step(enc, a, p, n, mini_batch_size=size, criterion=criterion, mask=mask, in_batch=True)
    want = infonce_loop(ref(a), ref(p), ref(n), 0.3, mask=mask, in_batch=True)
    want.backward()

    close(loss, want.detach())
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)


def test_no_negatives_in_batch_and_one_anchor() -> None:
    data = make_data(n=5)
    a, p = data["anchors"], data["positives"]
    enc, ref = make_encoder().eval(), make_encoder().eval()
    loss = pt.cached_step(enc, a, p, mini_batch_size=2, in_batch=True, temperature=0.2)
    close(loss, full_batch(ref, a, p, None, {"in_batch": True, "temperature": 0.2}))
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)
    # M = 0 negatives per anchor: a group that no mini-batch embeds
    enc, ref = make_encoder().eval(), make_encoder().eval()
    empty = torch.zeros(5, 0, D_IN, dtype=F64)
    loss = pt.cached_step(enc, a, p, empty, mini_batch_size=2, in_batch=True, temperature=0.2)
    close(loss, full_batch(ref, a, p, empty, {"in_batch": True, "temperature": 0.2}))
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)
    # N = 1 and one row per mini-batch
    enc, ref = make_encoder().eval(), make_encoder().eval()
    one = {key: data[key][:1] for key in ("anchors", "positives", "negatives")}
    loss = pt.cached_step(enc, one["anchors"], one["positives"], one["negatives"], mini_batch_size=1)
    close(loss, full_batch(ref, one["anchors"], one["positives"], one["negatives"], {}))
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)


def test_gradients_accumulate_once_like_backward() -> None:
    # Existing .grad (the caller did not zero it) gains exactly one full-batch gradient, the temperature's too.
    data = make_data(k=2)
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    enc, ref = make_encoder().eval(), make_encoder().eval()
    tau_c, tau_r = tau_parameter(0.2), tau_parameter(0.2)
    for t in [*enc.parameters(), tau_c]:
        t.grad = torch.full_like(t, 0.5)
    pt.cached_step(enc, a, p, n, mini_batch_size=3, temperature=tau_c, in_batch=True)
    full_batch(ref, a, p, n, {"temperature": tau_r, "in_batch": True})
    for got, expected in zip([*enc.parameters(), tau_c], [*ref.parameters(), tau_r], strict=True):
        close(got.grad, expected.grad + 0.5)


# ---------------------------------------------------------------- dropout: the RNG is replayed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [3, 8])
def test_dropout_gradients_equal_the_same_mini_batches_with_one_graph(device: str, size: int) -> None:
    k, make_options = CASES["module_all"]
    data = make_data(k=k, device=device)
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    enc, ref = make_encoder(dropout=0.4, device=device).train(), make_encoder(dropout=0.4, device=device).train()
    opt_c, opt_r = make_options(data), make_options(data)
    for o in (opt_c, opt_r):
        o["criterion"].to(device)

    torch.manual_seed(123)
    loss = pt.cached_step(enc, a, p, n, mini_batch_size=size, **opt_c)
    after_cached = torch.rand(4, device=device)
    torch.manual_seed(123)
    want = same_chunks(ref, a, p, n, size, opt_r)
    after_ref = torch.rand(4, device=device)

    close(loss, want)
    for got, expected in zip(grads(enc, opt_c), grads(ref, opt_r), strict=True):
        close(got, expected)
    # The global RNG stream continues as after the one-graph step (the first pass's draws, not the replay's).
    assert torch.equal(after_cached, after_ref)

    # Controls: dropout is really on, and another RNG state gives another gradient.
    evaluated, other_seed = make_encoder(dropout=0.4, device=device).eval(), make_encoder(dropout=0.4, device=device)
    pt.cached_step(evaluated, a, p, n, mini_batch_size=size, **make_options(data))
    torch.manual_seed(7)
    pt.cached_step(other_seed, a, p, n, mini_batch_size=size, **make_options(data))
    w = next(enc.parameters()).grad
    assert (w - next(evaluated.parameters()).grad).abs().max() > 1e-3  # type: ignore[operator]
    assert (w - next(other_seed.parameters()).grad).abs().max() > 1e-3  # type: ignore[operator]


# ---------------------------------------------------------------- dict inputs, as tokenizers return them


class TokenEncoder(nn.Module):
    """Token embedding, dropout, mean over the unmasked tokens, a linear map: ids [B, L] -> [B, D_OUT]."""

    def __init__(self, vocab: int = 30, dropout: float = 0.0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.tokens = nn.Embedding(vocab, 8, dtype=F64)
            self.proj = nn.Linear(8, D_OUT, dtype=F64)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tokens(input_ids))  # (B, L, 8)
        w = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return self.proj((x * w).sum(-2) / w.sum(-2).clamp(min=1))  # type: ignore[no-any-return]


def tokens(lead: tuple[int, ...], length: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(1, length + 1, (*lead, 1), generator=g)
    mask = (torch.arange(length) < lengths).long()  # (*lead, L)
    return {"input_ids": torch.randint(1, 30, (*lead, length), generator=g) * mask, "attention_mask": mask}


def stacked(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([x["input_ids"], x["attention_mask"]], dim=-2)  # (*lead, 2, L)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["eval", "dropout"])
def test_dict_inputs_equal_tensor_inputs(dropout: float) -> None:
    g = torch.Generator().manual_seed(5)
    n, k, m = 6, 2, 3
    # Each group padded to its own length, as separate tokenizer calls would pad them.
    a, p, neg = tokens((n,), 7, g), tokens((n, k), 9, g), tokens((n, m), 5, g)
    mask = torch.rand(n, m, generator=g) < 0.7
    enc_dict, enc_tensor = TokenEncoder(dropout=dropout), TokenEncoder(dropout=dropout)
    enc_dict.train(dropout > 0)
    enc_tensor.train(dropout > 0)

    def tensor_encoder(x: torch.Tensor) -> torch.Tensor:
        return enc_tensor(input_ids=x[:, 0], attention_mask=x[:, 1])

    opts = {"negatives_mask": mask, "in_batch": True, "temperature": 0.2}
    torch.manual_seed(9)
    got = pt.cached_step(enc_dict, collections.UserDict(a), p, neg, mini_batch_size=4, **opts)
    torch.manual_seed(9)
    want = pt.cached_step(tensor_encoder, stacked(a), stacked(p), stacked(neg), mini_batch_size=4, **opts)

    close(got, want)
    for x, y in zip(enc_dict.parameters(), enc_tensor.parameters(), strict=True):
        close(x.grad, y.grad)
    if dropout == 0:  # and both are the full batch's
        ref = TokenEncoder().eval()
        full = pt.infonce(ref(**a), ref(**p), ref(**neg), **opts)
        full.backward()
        close(got, full.detach())
        for x, y in zip(enc_dict.parameters(), ref.parameters(), strict=True):
            close(x.grad, y.grad)


# ---------------------------------------------------------------- mixed precision


def autocast_reference(encoder: nn.Module, a: Any, p: Any, n: Any, options: dict[str, Any]) -> torch.Tensor:
    """The same mini-batches under bfloat16 autocast with one graph.

    ``cache_enabled=False``: with autocast's weight-cast cache, one graph casts each weight once and sums the
    mini-batches' weight gradients in bfloat16 before casting back; separate backward calls (``cached_step``'s
    second pass, or gradient accumulation) sum them in float32. Without the cache the one graph does too.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        return same_chunks(encoder, a, p, n, 4, options)  # type: ignore[no-any-return]


def test_autocast() -> None:
    data = make_data(k=2)
    a, p, n = (data[key].float() for key in ("anchors", "positives", "negatives"))
    enc, ref, fp32 = (make_encoder().float().eval() for _ in range(3))
    dtypes: list[torch.dtype] = []
    enc.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    opts = {"temperature": 0.2, "in_batch": True}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pt.cached_step(enc, a, p, n, mini_batch_size=4, **opts)
    want = autocast_reference(ref, a, p, n, opts)
    assert set(dtypes) == {torch.bfloat16}  # both passes ran under autocast
    assert len(dtypes) == 2 * (2 + 4 + 6)
    torch.testing.assert_close(loss, want)
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-7)
    # and bfloat16 is close to float32, without autocast
    full_batch(fp32, a, p, n, opts)
    for got, expected in zip(enc.parameters(), fp32.parameters(), strict=True):
        assert (got.grad - expected.grad).norm() < 0.03 * expected.grad.norm()  # type: ignore[operator]


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
def test_grad_scaler() -> None:
    data = make_data(k=2)
    a, p, n = (data[key].float() for key in ("anchors", "positives", "negatives"))
    enc, ref, plain = (make_encoder().float().eval() for _ in range(3))
    tau, tau_ref = (nn.Parameter(torch.tensor(0.2)) for _ in range(2))
    scale = 2.0**12
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    optimizer = torch.optim.SGD([*enc.parameters(), tau], lr=0.1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pt.cached_step(enc, a, p, n, mini_batch_size=4, scaler=scaler, temperature=tau, in_batch=True)
    # the reference: scaler.scale(loss).backward(), by hand
    want = autocast_reference(ref, a, p, n, {"temperature": tau_ref, "in_batch": True, "criterion": scaled(scale)})
    unscaled = autocast_reference(plain, a, p, n, {"temperature": 0.2, "in_batch": True})

    torch.testing.assert_close(loss, unscaled)  # the returned loss is not scaled
    torch.testing.assert_close(loss * scale, want)
    for got, expected in zip([*enc.parameters(), tau], [*ref.parameters(), tau_ref], strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-7 * scale)
    # The scaler owns the scaling: unscale_ gives the unscaled gradients, and step/update work.
    scaler.unscale_(optimizer)
    for got, expected in zip(enc.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-7)
    before = [t.detach().clone() for t in enc.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(x, y) for x, y in zip(before, enc.parameters(), strict=True))


def scaled(factor: float) -> Callable[..., torch.Tensor]:
    def criterion(*args: Any, **kwargs: Any) -> torch.Tensor:
        return pt.infonce(*args, **kwargs) * factor

    return criterion


# ---------------------------------------------------------------- memory: one mini-batch's activations at a time


@contextlib.contextmanager
def saved_tensor_census() -> Iterator[weakref.WeakSet[Any]]:
    """Every tensor autograd saves for backward is boxed; a box is alive as long as its graph keeps it."""

    class Box:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    alive: weakref.WeakSet[Any] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> Box:
        box = Box(t)
        alive.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        yield alive


class Census(nn.Module):
    """Records, at each forward with grad, how many saved tensors of earlier graphs are still alive."""

    def __init__(self, inner: nn.Module, alive: weakref.WeakSet[Any]) -> None:
        super().__init__()
        self.inner, self.alive, self.seen = inner, alive, []  # type: ignore[var-annotated]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen.append(len(self.alive))
        return self.inner(x)  # type: ignore[no-any-return]


def test_one_mini_batch_of_activations_alive_at_a_time() -> None:
    data = make_data(n=8, m=3)
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    with saved_tensor_census() as alive:
        enc = Census(make_encoder(dropout=0.2).train(), alive)
        pt.cached_step(enc, a, p, n, mini_batch_size=4, in_batch=True)
        assert enc.seen == [0] * (2 + 2 + 6)  # each mini-batch's graph is gone before the next one is built
        assert len(alive) == 0
        # Control: the one-graph reference keeps every earlier mini-batch's activations.
        ref = Census(make_encoder(dropout=0.2).train(), alive)
        same_chunks(ref, a, p, n, 4, {"in_batch": True})
        assert ref.seen[1:] == sorted(ref.seen[1:])
        assert ref.seen[-1] > 0


# ---------------------------------------------------------------- DistributedDataParallel's no_sync


class NoSyncRecorder(nn.Module):
    """An encoder with a ``no_sync()`` context, as DDP has: records, per forward with grad, whether inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.inside, self.calls = make_encoder(), False, []  # type: ignore[var-annotated]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls.append(self.inside)
        return self.inner(x)  # type: ignore[no-any-return]


def test_all_but_the_last_mini_batch_under_no_sync() -> None:
    data = make_data(n=5, m=2)
    enc = NoSyncRecorder()
    pt.cached_step(enc, data["anchors"], data["positives"], data["negatives"], mini_batch_size=4)
    assert enc.calls == [True] * 6 + [False]  # 2 + 2 + 3 mini-batches, one gradient synchronization


# ---------------------------------------------------------------- bad input, before any encoder call with grad


class Spy(nn.Module):
    """Records ``torch.is_grad_enabled()`` at every call; returns ``out(x)`` if given, else the MLP's output."""

    def __init__(self, out: Callable[[torch.Tensor], Any] | None = None) -> None:
        super().__init__()
        self.inner, self.out, self.calls = make_encoder(), out, []  # type: ignore[var-annotated]

    def forward(self, x: torch.Tensor) -> Any:
        self.calls.append(torch.is_grad_enabled())
        y = self.inner(x)
        return y if self.out is None else self.out(y)


def good() -> dict[str, Any]:
    data = make_data(n=4, m=2)
    return {"anchors": data["anchors"], "positives": data["positives"], "negatives": data["negatives"]}


def with_(**changes: Any) -> dict[str, Any]:
    return {**good(), **changes}


ids4 = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
INPUT_ERRORS = [
    pytest.param(with_(), {"mini_batch_size": 0}, ValueError, r"`mini_batch_size` must be >= 1; got 0", id="mbs0"),
    pytest.param(with_(), {"mini_batch_size": -2}, ValueError, r"`mini_batch_size` must be >= 1; got -2", id="mbs<0"),
    pytest.param(with_(), {"mini_batch_size": 2.0}, TypeError, r"`mini_batch_size` must be an int; got float", id="f"),
    pytest.param(with_(), {"mini_batch_size": True}, TypeError, r"`mini_batch_size` must be an int; got bool", id="b"),
    pytest.param(
        with_(positives=torch.zeros(5, D_IN, dtype=F64)),
        {},
        ValueError,
        r"`positives` has N=5 but `anchors` has N=4; got \(5, 6\)",
        id="positives-N",
    ),
    pytest.param(
        with_(negatives=torch.zeros(3, 2, D_IN, dtype=F64)),
        {},
        ValueError,
        r"`negatives` has N=3 but `anchors` has N=4; got \(3, 2, 6\)",
        id="negatives-N",
    ),
    pytest.param(
        with_(negatives=torch.zeros(4, D_IN, dtype=F64)),
        {},
        ValueError,
        r"`negatives` must be \[N, M, \.\.\.\]: 3 dims, as `anchors` \(4, 6\) has 2; got \(4, 6\)",
        id="negatives-2d",
    ),
    pytest.param(
        with_(positives=torch.zeros(4, 2, 2, D_IN, dtype=F64)),
        {},
        ValueError,
        r"`positives` must be \[N, \.\.\.\] or \[N, K, \.\.\.\]: 2 or 3 dims",
        id="positives-4d",
    ),
    pytest.param(
        with_(anchors=torch.zeros(0, D_IN, dtype=F64), positives=torch.zeros(0, D_IN, dtype=F64), negatives=None),
        {},
        ValueError,
        r"`anchors` is an empty batch \(N=0\)",
        id="empty",
    ),
    pytest.param(with_(anchors=[1.0, 2.0]), {}, TypeError, r"`anchors` must be a torch.Tensor or a dict", id="list"),
    pytest.param(
        with_(anchors=np.zeros((4, D_IN))),
        {},
        TypeError,
        r"`anchors` must be a torch.Tensor or a dict of tensors \(as tokenizers return\); got ndarray "
        r"\(convert it with torch\.from_numpy\(\.\.\.\)\)$",
        id="numpy",
    ),
    pytest.param(
        with_(anchors=ids4, positives={**ids4, "input_ids": np.zeros((4, 3))}, negatives=None),
        {},
        TypeError,
        r"`positives\['input_ids'\]` must be a torch.Tensor; got ndarray \(convert it with torch\.from_numpy",
        id="dict-numpy",
    ),
    pytest.param(
        with_(anchors=ids4, positives=ids4["input_ids"], negatives=None),
        {},
        TypeError,
        r"`positives` must be a dict of tensors, like `anchors`; got Tensor",
        id="dict-vs-tensor",
    ),
    pytest.param(
        with_(anchors=ids4, positives={"input_ids": ids4["input_ids"]}, negatives=None),
        {},
        ValueError,
        r"`positives` has keys \['input_ids'\] but `anchors` has keys \['attention_mask', 'input_ids'\]",
        id="dict-keys",
    ),
    pytest.param(
        with_(anchors={**ids4, "attention_mask": ids4["attention_mask"][:3]}, positives=ids4, negatives=None),
        {},
        ValueError,
        r"`anchors\['attention_mask'\]` has N=3 but `anchors\['input_ids'\]` has N=4; got \(3, 3\)",
        id="dict-N",
    ),
    pytest.param(
        with_(
            anchors=ids4,
            positives={"input_ids": torch.zeros(4, 2, 3), "attention_mask": torch.zeros(4, 3, 3)},
            negatives=None,
        ),
        {},
        ValueError,
        r"`positives\['attention_mask'\]` has K=3 but `positives\['input_ids'\]` has K=2; got \(4, 3, 3\)",
        id="dict-K",
    ),
    pytest.param(
        with_(anchors={"input_ids": [1, 2]}, positives=ids4, negatives=None),
        {},
        TypeError,
        r"`anchors\['input_ids'\]` must be a torch.Tensor; got list",
        id="dict-value",
    ),
    pytest.param(with_(), {"temprature": 0.1}, TypeError, r"`criterion` \(infonce\) does not take", id="option"),
    pytest.param(
        with_(),
        {"criterion": pt.InfoNCE(), "temperature": 0.1},
        TypeError,
        r"`criterion` \(InfoNCE.forward\) does not take these options",
        id="module-option",
    ),
    pytest.param(with_(), {"criterion": "infonce"}, TypeError, r"`criterion` must be callable", id="criterion"),
]


@pytest.mark.parametrize(("inputs", "kwargs", "error", "match"), INPUT_ERRORS)
def test_bad_input_raises_before_the_encoder_runs(inputs: dict[str, Any], kwargs: Any, error: type, match: str) -> None:
    spy = Spy()
    kwargs = {"mini_batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        pt.cached_step(spy, inputs["anchors"], inputs["positives"], inputs["negatives"], **kwargs)
    assert spy.calls == []


def test_encoder_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"`encoder` must be callable \(an nn.Module, say\); got str"):
        pt.cached_step("bert", *good().values(), mini_batch_size=2)  # type: ignore[arg-type]


OUTPUT_ERRORS = [  # mini_batch_size=3 over N = 4 anchors: rows 0:3, then 3:4
    pytest.param(
        lambda y: y.unsqueeze(-1),
        ValueError,
        r"`encoder` must return embeddings \[B, d\] = \[3, d\] for the mini-batch of `anchors` rows 0:3; "
        r"got \(3, 5, 1\)",
        id="3d",
    ),
    pytest.param(lambda y: y[:1], ValueError, r"= \[3, d\] .* got \(1, 5\)", id="rows"),
    pytest.param(
        lambda y: (y,), TypeError, r"`encoder` must return a tensor of embeddings \[B, d\]; got tuple", id="t"
    ),
    pytest.param(lambda y: y.long(), TypeError, r"`encoder` must return floating-point embeddings", id="int"),
    pytest.param(
        lambda y: y.numpy(),
        TypeError,
        r"got ndarray \(convert it with torch\.from_numpy\(\.\.\.\)\) for the mini-batch of `anchors` rows 0:3",
        id="numpy",
    ),
    pytest.param(
        lambda y: y if y.shape[0] == 3 else y[:, :3],  # d changes with the size of the mini-batch
        ValueError,
        r"`encoder` returned d=3 for the mini-batch of `anchors` rows 3:4 but d=5 before",
        id="d",
    ),
]


@pytest.mark.parametrize(("out", "error", "match"), OUTPUT_ERRORS)
def test_bad_encoder_output_raises_in_the_no_grad_pass(out: Callable[..., Any], error: type, match: str) -> None:
    spy = Spy(out)
    with pytest.raises(error, match=match):
        pt.cached_step(spy, *good().values(), mini_batch_size=3)
    assert spy.calls
    assert not any(spy.calls)
    assert all(t.grad is None for t in spy.parameters())


def test_loss_errors_raise_before_any_gradient() -> None:
    # infonce's own checks (here a mask of the wrong shape) run after the no-grad pass, before pass 2.
    spy = Spy()
    data = good()
    with pytest.raises(ValueError, match=r"negatives_mask"):
        pt.cached_step(spy, *data.values(), mini_batch_size=3, negatives_mask=torch.ones(4, 5, dtype=torch.bool))
    assert spy.calls
    assert not any(spy.calls)
    assert all(t.grad is None for t in spy.parameters())
    with pytest.raises(ValueError, match=r"`criterion` must return a 0-d loss; got \(4,\)"):
        pt.cached_step(spy, *data.values(), mini_batch_size=3, criterion=lambda a, p, n: (a * p).sum(-1))


def test_grad_disabled_or_frozen_encoder() -> None:
    spy = Spy()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"call it with grad enabled, not under torch.no_grad"):
        pt.cached_step(spy, *good().values(), mini_batch_size=3)
    assert spy.calls == []
    # A frozen nn.Module: known from its parameters, before any encoder call (and before tau gets a gradient).
    spy.requires_grad_(False)
    tau = tau_parameter(0.1)
    with pytest.raises(ValueError, match=r"`encoder` is frozen: none of its 4 parameter tensors requires grad"):
        pt.cached_step(spy, *good().values(), mini_batch_size=3, temperature=tau)
    assert spy.calls == []
    assert tau.grad is None
    # A plain callable: known at its first call with grad; tau's gradient, written by then, is taken back.
    with pytest.raises(ValueError, match=r"`encoder`'s output does not require grad: does any of its parameters\?"):
        pt.cached_step(lambda x: spy(x), *good().values(), mini_batch_size=3, temperature=tau)
    assert spy.calls == [False] * 7 + [True]  # 2 + 2 + 3 mini-batches, then the first with grad
    assert tau.grad is None


CONFIG_ERRORS = [
    pytest.param({"temperature": -0.1}, "temperature", id="temperature<0"),
    pytest.param({"temperature": 0.0}, "temperature", id="temperature0"),
    pytest.param({"directions": ("bogus",)}, "directions", id="directions"),
    pytest.param({"in_batch": True, "partition": "bogus"}, "partition", id="partition"),
    pytest.param({"margin_strategy": "bogus", "false_negative_margin": 0.1}, "margin_strategy", id="margin_strategy"),
    pytest.param({"hardness_mode": "own", "hardness_strength": -1.0}, "hardness_strength", id="hardness_strength"),
    pytest.param({"engine": "bogus"}, "engine", id="engine"),
    pytest.param({"chunk_size": 0}, "chunk_size", id="chunk_size"),
]


@pytest.mark.parametrize(("options", "name"), CONFIG_ERRORS)
def test_bad_configuration_raises_before_the_encoder_runs(options: dict[str, Any], name: str) -> None:
    # The same error as infonce's own (given embeddings), but with 0 encoder calls, not 2 * 8 first.
    data = good()
    with pytest.raises((ValueError, TypeError)) as want:
        pt.infonce(*(make_encoder()(data[key]) for key in GROUPS), **options)
    spy = Spy()
    with pytest.raises(type(want.value)) as got:
        pt.cached_step(spy, *data.values(), mini_batch_size=2, **options)
    assert f"`{name}`" in str(got.value)
    assert spy.calls == []


# ---------------------------------------------------------------- pass 2 must embed as pass 1 did


class PooledTransformer(nn.Module):
    """Token embedding, one nn.TransformerEncoder layer with a padding mask, the mean over every position."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.tokens = nn.Embedding(30, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.body(self.tokens(input_ids), src_key_padding_mask=attention_mask == 0)  # (B, L, 16)
        return x.mean(1)  # type: ignore[no-any-return]  # padded positions included: they differ between paths


@contextlib.contextmanager
def fastpath(enabled: bool) -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_fast_path_in_eval_raises_instead_of_a_wrong_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    a, p, neg = tokens((6,), 7, g), tokens((6,), 7, g), tokens((6, 2), 7, g)
    assert (a["attention_mask"][:4] == 0).any()  # the first mini-batch has padding
    enc, ref = PooledTransformer().eval(), PooledTransformer().eval()
    with torch.no_grad():
        fast = enc(**a)
    if torch.equal(fast, enc(**a)):
        pytest.skip("this torch embeds alike with and without grad (no transformer fast path to detect)")
    tau, tau_ref = (nn.Parameter(torch.tensor(0.1)) for _ in range(2))

    switch = hasattr(getattr(torch.backends, "mha", None), "set_fastpath_enabled")  # torch >= 2.3
    advice = r"torch\.backends\.mha\.set_fastpath_enabled\(False\)" if switch else r"train\(\) mode"
    with pytest.raises(
        RuntimeError,
        match=r"embedded the mini-batch of `anchors` rows 0:4 differently with grad \(pass 2\) than under no_grad "
        r"\(pass 1\): a row moved by [\d.e+-]+ of its norm \(tolerance 3\.5e-04 for torch\.float32\).*"
        r"transformer fast path.*" + advice,
    ):
        pt.cached_step(enc, a, p, neg, mini_batch_size=4, temperature=tau)
    assert all(t.grad is None for t in [*enc.parameters(), tau])  # nothing written
    if not switch:
        return

    # The advice works: without the fast path both passes embed alike, and the gradient is the full batch's.
    with fastpath(False):
        loss = pt.cached_step(enc, a, p, neg, mini_batch_size=4, temperature=tau)
    flat = {key: v.flatten(0, 1) for key, v in neg.items()}  # (12, L)
    want = pt.infonce(ref(**a), ref(**p), ref(**flat).view(6, 2, -1), temperature=tau_ref)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for got, expected in zip([*enc.parameters(), tau], [*ref.parameters(), tau_ref], strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_fast_path_without_padding_is_within_tolerance() -> None:
    # Without padding the fast path differs from the slow one by rounding only (~1e-7): no error, full-batch gradient.
    g = torch.Generator().manual_seed(3)
    a, p = (torch.randint(1, 30, (6, 7), generator=g) for _ in range(2))
    ones = torch.ones(6, 7, dtype=torch.long)
    enc, ref = PooledTransformer().eval(), PooledTransformer().eval()
    with torch.no_grad():
        fast = enc(a, ones)
    assert 0 < (fast - enc(a, ones)).norm() / fast.norm() < 1e-5  # the fast path ran, with rounding differences
    loss = pt.cached_step(
        enc,
        {"input_ids": a, "attention_mask": ones},
        {"input_ids": p, "attention_mask": ones},
        mini_batch_size=4,
        in_batch=True,
    )
    want = pt.infonce(ref(a, ones), ref(p, ones), in_batch=True)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6)


class GradModeShift(nn.Module):
    """The MLP, its output shifted by ``shift`` (relative to its norm) under no_grad in one-row mini-batches."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = make_encoder(), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if torch.is_grad_enabled() or x.shape[0] != 1:
            return y  # type: ignore[no-any-return]
        return y * (1 + self.shift)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("shift", "raises"), [(1e-10, False), (1e-6, True), (float("nan"), True)])
def test_float64_tolerance(shift: float, raises: bool) -> None:
    # mini_batch_size=3 over N = 4: rows 3:4 of the anchors are the first one-row mini-batch. float64: 1.5e-08.
    enc = GradModeShift(shift)
    tau = tau_parameter(0.1)
    if not raises:
        pt.cached_step(enc, *good().values(), mini_batch_size=3, temperature=tau)
        return
    value = "nan" if shift != shift else r"1e-06"
    with pytest.raises(
        RuntimeError,
        match=rf"mini-batch of `anchors` rows 3:4 differently .* moved by {value} of its norm \(tolerance 1\.5e-08 for "
        r"torch\.float64\)",
    ):
        pt.cached_step(enc, *good().values(), mini_batch_size=3, temperature=tau)
    assert all(t.grad is None for t in [*enc.parameters(), tau])


# ---------------------------------------------------------------- module state, as one backward would leave it


def make_bn_encoder() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, D_OUT)).to(F64)


def test_batchnorm_statistics_update_once_per_mini_batch() -> None:
    data = make_data(n=8, k=2, m=3)  # 8 + 16 + 24 rows: 2 + 4 + 6 mini-batches of 4
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    enc, ref = make_bn_encoder().train(), make_bn_encoder().train()

    loss = pt.cached_step(enc, a, p, n, mini_batch_size=4, in_batch=True)
    want = same_chunks(ref, a, p, n, 4, {"in_batch": True})

    close(loss, want)
    assert int(enc[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 12
    for got, expected in zip(enc.buffers(), ref.buffers(), strict=True):
        close(got.double(), expected.double())
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)


class Decaying(nn.Module):
    """The MLP's output times a gain that every call in train() decays: each forward reads the state it updates."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_encoder()
        self.register_buffer("gain", torch.ones((), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x) * self.gain.clone()  # the backward keeps the clone: the gain may change in place
        if self.training:
            self.gain.mul_(0.9)
        return y  # type: ignore[no-any-return]


def test_pass_2_replays_the_module_state_of_pass_1() -> None:
    data = make_data(k=2)  # 7 + 14 + 21 rows: 3 + 5 + 7 mini-batches of 3
    a, p, n = data["anchors"], data["positives"], data["negatives"]
    enc, ref = Decaying().train(), Decaying().train()
    gain = enc.gain

    loss = pt.cached_step(enc, a, p, n, mini_batch_size=3, in_batch=True)
    want = same_chunks(ref, a, p, n, 3, {"in_batch": True})

    close(loss, want)
    assert enc.gain is gain
    close(enc.gain, ref.gain)
    close(enc.gain, torch.tensor(0.9, dtype=F64) ** 15)
    for got, expected in zip(enc.parameters(), ref.parameters(), strict=True):
        close(got.grad, expected.grad)


# ---------------------------------------------------------------- a step that raises writes nothing


class ScaledDot(distances.DotProductSimilarity):
    """A distance with a learnable scale: a ``loss_fn`` with a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        return super().compute_mat(query_emb, ref_emb) * self.scale  # type: ignore[no-any-return]


class Failing(nn.Module):
    """A BatchNorm MLP that raises at its ``at``-th call with grad (``grad=True``) or without."""

    def __init__(self, grad: bool, at: int) -> None:
        super().__init__()
        self.inner, self.grad, self.at, self.calls = make_bn_encoder().train(), grad, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() == self.grad:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("the encoder failed")
        return self.inner(x)  # type: ignore[no-any-return]


def loss_side(kind: str) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Options whose loss has parameters, and those parameters."""
    if kind == "temperature":  # criterion=None
        tau = tau_parameter(0.2)
        return {"temperature": tau, "in_batch": True}, [tau]
    if kind == "loss_fn":
        loss_fn = losses.NTXentLoss(temperature=0.2, distance=ScaledDot())
        return {"loss_fn": loss_fn, "in_batch": True}, list(loss_fn.parameters())
    criterion = pt.InfoNCE(learnable_temperature=True, loss_fn=losses.NTXentLoss(0.2, distance=ScaledDot()))
    weight = tau_parameter(1.5)  # a parameter the criterion closes over

    def weighted_criterion(*args: Any, **kwargs: Any) -> torch.Tensor:
        return criterion(*args, **kwargs) * weight

    return {"criterion": weighted_criterion}, [*criterion.parameters(), weight]


FAILURES = [  # 8 + 8 + 16 rows in mini-batches of 4: 8 calls in each pass
    pytest.param(False, 2, id="pass1"),
    pytest.param(True, 1, id="pass2-first"),
    pytest.param(True, 4, id="pass2-middle"),
    pytest.param(True, 8, id="pass2-last"),
]


@pytest.mark.sweep(fast=6)
@pytest.mark.parametrize("kind", ["module", "callable"])
@pytest.mark.parametrize("side", ["temperature", "loss_fn", "criterion"])
@pytest.mark.parametrize(("grad", "at"), FAILURES)
def test_a_failing_step_writes_nothing(grad: bool, at: int, side: str, kind: str) -> None:
    data = make_data(n=8, m=2)
    enc = Failing(grad, at)
    options, loss_params = loss_side(side)
    tensors = [*enc.parameters(), *loss_params]
    for i, t in enumerate(tensors):  # half of them hold a gradient already (accumulation), half none
        t.grad = torch.full_like(t, 0.5) if i % 2 else None
    before = [None if t.grad is None else t.grad.clone() for t in tensors]
    buffers = [b.clone() for b in enc.buffers()]
    encoder = enc if kind == "module" else lambda x: enc(x)  # a plain callable: its leaves found from its graph

    with pytest.raises(RuntimeError, match=r"the encoder failed"):
        pt.cached_step(encoder, data["anchors"], data["positives"], data["negatives"], mini_batch_size=4, **options)

    assert enc.calls == at
    for t, old in zip(tensors, before, strict=True):
        assert (t.grad is None) if old is None else torch.equal(t.grad, old)
    if kind == "module":  # BatchNorm's statistics as at the call
        for got, expected in zip(enc.buffers(), buffers, strict=True):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------- two gloo ranks, gathered candidates

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DIST_CASES = {  # rows per rank, K, mini_batch_size
    "equal": {"sizes": (4, 4), "k": 1, "mbs": 3, "seed": 11},
    "equal_k2": {"sizes": (5, 5), "k": 2, "mbs": 4, "seed": 12},
    "unequal": {"sizes": (5, 3), "k": 1, "mbs": 2, "seed": 13},
}


def dist_data(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    data = make_data(n=sum(case["sizes"]), k=case["k"], m=2, seed=case["seed"])
    return {key: data[key] for key in ("anchors", "positives", "negatives", "negatives_mask", "positive_ids")}


def dist_options(data: dict[str, torch.Tensor], tau: torch.Tensor) -> dict[str, Any]:
    return {
        "temperature": tau,
        "in_batch": True,
        "negatives_mask": data["negatives_mask"],
        "positive_ids": data["positive_ids"],
    }


def weighted(weight: float) -> Callable[..., torch.Tensor]:
    def criterion(*args: Any, **kwargs: Any) -> torch.Tensor:
        return pt.infonce(*args, **kwargs) * weight

    return criterion


def _dist_worker(rank: int, init_method: str, workdir: str) -> None:
    """One rank: each case with the plain encoder and (equal N) with a DDP-wrapped one; results to rank{r}.pt."""
    work = Path(workdir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        out: dict[str, Any] = {}
        for name, case in DIST_CASES.items():
            start = sum(case["sizes"][:rank])
            rows = slice(start, start + case["sizes"][rank])
            data = {key: v[rows] for key, v in dist_data(case).items()}
            a, p, n = data["anchors"], data["positives"], data["negatives"]
            # Unequal N: weight the rank's loss by N_r * W / N_total (docs/how-to/multi-gpu.md), through a criterion.
            weight = case["sizes"][rank] * WORLD / sum(case["sizes"])
            tau = tau_parameter(0.2)
            enc = make_encoder().eval()
            loss = pt.cached_step(
                enc,
                a,
                p,
                n,
                mini_batch_size=case["mbs"],
                criterion=weighted(weight),
                gather_across_devices=True,
                **dist_options(data, tau),
            )
            out[name] = {"loss": loss / weight, "grads": [t.grad for t in [*enc.parameters(), tau]]}
            if len(set(case["sizes"])) == 1:
                ddp = nn.parallel.DistributedDataParallel(make_encoder().eval())
                tau = tau_parameter(0.2)
                pt.cached_step(
                    ddp, a, p, n, mini_batch_size=case["mbs"], gather_across_devices=True, **dist_options(data, tau)
                )
                out[name]["ddp"] = [t.grad for t in [*ddp.module.parameters(), tau]]
        torch.save(out, work / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (work / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # DDP + gloo may abort at interpreter exit under torch 2.13 (see examples/ddp_train.py): leave without it.
    sys.stdout.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    work = tmp_path_factory.mktemp("cached_ddp")
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, init, str(work)), daemon=True) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 120
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    errors = "\n".join(f.read_text() for f in sorted(work.glob("rank*.err")))
    if hung or errors or any(proc.exitcode for proc in procs):
        pytest.fail(f"ranks hung {hung}, exit codes {[proc.exitcode for proc in procs]}\n{errors}")
    return [torch.load(work / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIST_CASES))
def test_two_ranks_gathered_equal_one_process(dist_results: list[dict[str, Any]], name: str) -> None:
    case = DIST_CASES[name]
    data = dist_data(case)
    enc, tau = make_encoder().eval(), tau_parameter(0.2)
    want = full_batch(enc, data["anchors"], data["positives"], data["negatives"], dist_options(data, tau))
    want_grads = [t.grad for t in [*enc.parameters(), tau]]
    sizes = case["sizes"]

    got = sum(n * dist_results[r][name]["loss"] for r, n in enumerate(sizes)) / sum(sizes)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # Each rank's parameters hold the gradient of every rank's loss w.r.t. its own rows' embeddings; DDP's
    # averaging (sum / W) of them is the one-process gradient. The temperature is local: sum / W as well.
    for i, expected in enumerate(want_grads):
        summed = sum(dist_results[r][name]["grads"][i] for r in range(WORLD))
        torch.testing.assert_close(summed / WORLD, expected, rtol=1e-9, atol=1e-10)
    if len(set(sizes)) == 1:  # a DDP-wrapped encoder averaged its gradients itself, on each rank
        *params, tau_grads = zip(*(dist_results[r][name]["ddp"] for r in range(WORLD)), strict=True)
        for per_rank, expected in zip(params, want_grads[:-1], strict=True):
            for grad in per_rank:
                torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(sum(tau_grads) / WORLD, want_grads[-1], rtol=1e-9, atol=1e-10)
    # Control: without gathering, a rank's loss would be another one.
    for r in range(WORLD):
        start = sum(sizes[:r])
        rows = {key: v[start : start + sizes[r]] for key, v in data.items()}
        local = pt.infonce(*(enc(rows[key]) for key in GROUPS), **dist_options(rows, torch.tensor(0.2, dtype=F64)))
        assert not torch.isclose(local, dist_results[r][name]["loss"])


# ---------------------------------------------------------------- the example


@pytest.mark.slow  # a subprocess
def test_example_trains() -> None:
    steps = 8
    cmd = [sys.executable, str(ROOT / "examples" / "cached_train.py"), f"--steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/{steps}" for s in range(1, steps + 1)], done.stdout
    values = [float(line.split()[3]) for line in lines]
    assert all(v > 0 for v in values), values
    assert max(values[-3:]) < values[0], values  # it trains
