"""Data-parallel training with InfoNCE on predefined triplets, candidates gathered across ranks (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 20]

Each rank samples its own triplets (anchor, positive of the same class, M negatives of other classes) from one
synthetic data set, encodes them with a DDP-wrapped MLP, and calls ``pt.InfoNCE(in_batch=True,
gather_across_devices=True)``: every anchor is contrasted with its own negatives and with the positives and negatives
of every row on every rank (``world * B * (1 + M)`` candidates), and the gradient reaches the rank that encoded each
candidate. Class labels are passed as ids, so a candidate of the anchor's class is never its negative.

Run as a plain script (``python examples/ddp_train.py``) it trains in one process; the gathering is then a no-op.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pml_triplets as pt

CLASSES, PER_CLASS, DIM, EMB = 10, 50, 32, 16


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy clusters, one per class; samples sorted by class, PER_CLASS each. Identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(CLASSES, DIM, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return centers[labels] + 1.5 * torch.randn(len(labels), DIM, generator=g), labels


def sample_triplets(batch: int, m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample indices: anchors (B,), positives (B,) of the anchor's class, negatives (B, M) of other classes."""
    cls = torch.randint(0, CLASSES, (batch,), generator=g)
    slot = torch.randint(0, PER_CLASS, (batch,), generator=g)
    anchors = cls * PER_CLASS + slot
    positives = cls * PER_CLASS + (slot + torch.randint(1, PER_CLASS, (batch,), generator=g)) % PER_CLASS
    neg_cls = (cls[:, None] + torch.randint(1, CLASSES, (batch, m), generator=g)) % CLASSES
    negatives = neg_cls * PER_CLASS + torch.randint(0, PER_CLASS, (batch, m), generator=g)
    return anchors, positives, negatives


def train(args: argparse.Namespace, rank: int, world: int) -> nn.Module:
    """``args.steps`` steps of Adam on this rank's triplets; returns the trained (unwrapped) encoder."""
    x, labels = make_data(seed=0)
    torch.manual_seed(0)  # DDP broadcasts rank 0's initial weights anyway
    encoder = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, EMB))
    model = DistributedDataParallel(encoder) if world > 1 else encoder
    criterion = pt.InfoNCE(temperature=0.1, in_batch=True, gather_across_devices=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own triplets

    b, m = args.batch, args.negatives
    for step in range(1, args.steps + 1):
        a_idx, p_idx, n_idx = sample_triplets(b, m, g)
        # One forward over anchors, positives and negatives together (one DDP forward per backward).
        emb = model(x[torch.cat([a_idx, p_idx, n_idx.reshape(-1)])])
        anchors, positives, negatives = emb[:b], emb[b : 2 * b], emb[2 * b :].reshape(b, m, EMB)
        loss = criterion(
            anchors,
            positives,
            negatives,
            positive_ids=labels[p_idx],  # (B,)
            negative_ids=labels[n_idx],  # (B, M)
        )
        optimizer.zero_grad()
        loss.backward()  # on every rank: the gathering's backward is a collective
        optimizer.step()

        logged = loss.detach().clone()
        if world > 1:  # equal batches: the mean of the ranks' losses is the loss of the global batch
            dist.all_reduce(logged)
            logged /= world
        if rank == 0:
            print(f"step {step}/{args.steps}  loss {logged.item():.4f}", flush=True)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="triplets per rank and step")
    parser.add_argument("--negatives", type=int, default=4, help="negatives per anchor (M)")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if "RANK" not in os.environ:  # not launched by torchrun: one process, the gathering is a no-op
        train(args, 0, 1)
        return
    # gloo on CPU; on GPUs use "nccl" and put the model and the batch on f"cuda:{LOCAL_RANK}".
    dist.init_process_group("gloo")
    try:
        train(args, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
    # Workaround for torch (seen with 2.13, gloo): a DistributedDataParallel instance keeps the group's worker
    # threads alive after destroy_process_group, and one of them may still be releasing a finished collective's
    # tensors while the interpreter shuts down, which aborts the process ("terminate called without an active
    # exception"). Training is over and the output flushed: leave without the interpreter's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
