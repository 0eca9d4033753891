"""The embedder: a two-layer MLP, seeded without touching the global RNG."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def make_embedder(in_dim: int = 64, hidden: int = 128, out_dim: int = 64, seed: int = 0) -> nn.Sequential:
    """A two-layer MLP ``[B, in_dim] -> [B, out_dim]``, initialised from ``seed`` (the global RNG is left alone).

    Args:
        in_dim: input features (64 pixels).
        hidden: hidden width.
        out_dim: embedding size.
        seed: seed of the initial weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode without gradient: ``[N, D] -> [N, d]``."""
    model.eval()
    with torch.no_grad():
        return cast(torch.Tensor, model(x))
