"""Per-pair losses to the loss: the instance's embedding regularizer and reducer, as ``NTXentLoss.forward`` does."""

from __future__ import annotations

from typing import cast

import torch
from pytorch_metric_learning.reducers import PerAnchorReducer

from ._options import Options

__all__: list[str] = []  # private module


def _per_anchor(config: Options) -> bool:
    return config.loss_fn is not None and any(isinstance(r, PerAnchorReducer) for r in config.loss_fn.reducer.modules())


def check_reducer(config: Options, n: int, k: int) -> None:
    """Reject sizes the reducer cannot take, before any work."""
    if k > n and config.reduction == "pml" and _per_anchor(config):
        raise ValueError(f"PerAnchorReducer needs K <= N positives per anchor; got K={k}, N={n}")


def reduce(config: Options, losses: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """Reduce per-pair ``losses`` (N*K,) of ``anchors`` (N, d) with K positives each.

    A plain ``MeanReducer`` without a regularizer is the mean (what PML computes, without its bookkeeping);
    ``DoNothingReducer`` returns the per-pair losses; anything else goes through PML's own objects.
    """
    if config.reduction == "mean":
        return losses.mean()
    if config.reduction == "none":
        return losses
    loss_fn = config.loss_fn
    assert loss_fn is not None  # reduction "pml" is only chosen for a given loss_fn
    n = anchors.shape[0]
    dev = anchors.device
    a1 = torch.arange(n, device=dev).repeat_interleave(k)
    p = torch.arange(n * k, device=dev)  # the positive's row in ref_emb
    if k > 1 and _per_anchor(config):
        # PerAnchorReducer scatters pair losses into an N x N matrix sized from the anchors, not from ref_emb
        # (plain PML raises IndexError there): give it each positive's rank within its anchor instead.
        p = p % k
    loss_dict = {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}
    loss_fn.add_embedding_regularization_to_loss_dict(loss_dict, anchors)
    out = loss_fn.reducer(loss_dict, anchors, None)
    if isinstance(out, dict):  # a reducer that, like DoNothingReducer, returns the loss dict
        return cast(torch.Tensor, out["loss"]["losses"])
    return cast(torch.Tensor, out)
