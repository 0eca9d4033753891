"""Training a token encoder with ``pt.cached_step``: a large contrastive batch, embedded a few rows at a time.

    python examples/cached_train.py [--steps 20] [--batch 64] [--negatives 4] [--mini-batch-size 16]

Random "documents" of tokens from one of a few topics (each topic favours its own tokens), padded to different
lengths as a tokenizer would pad them: an anchor, a positive of the same topic and M negatives of other topics per
row. The encoder (token embedding, dropout, masked mean pooling, MLP) takes ``input_ids`` and ``attention_mask``;
``cached_step`` embeds the ``N * (2 + M)`` documents ``--mini-batch-size`` at a time in each of its two passes,
and the gradient is the full batch's. Prints the loss of every step; takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import pml_triplets as pt

VOCAB, TOPICS, EMB = 200, 8, 32


class Encoder(nn.Module):
    """Token embedding, dropout, mean over the unmasked tokens, a two-layer MLP: [B, L] ids -> [B, EMB]."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 64)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, EMB))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tokens(input_ids))  # (B, L, 64)
        w = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)  # (B, 64)
        return self.head(pooled)  # (B, EMB)


def documents(topics: torch.Tensor, length: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids [*topics.shape, length] (70 % from the topic's own 25 tokens) and a mask of random true lengths."""
    shape = (*topics.shape, length)
    own = topics.unsqueeze(-1) * (VOCAB // TOPICS) + torch.randint(0, VOCAB // TOPICS, shape, generator=g)
    ids = torch.where(torch.rand(shape, generator=g) < 0.7, own, torch.randint(0, VOCAB, shape, generator=g))
    lengths = torch.randint(length // 2, length + 1, (*topics.shape, 1), generator=g)
    mask = (torch.arange(length) < lengths).long()  # (*topics.shape, length)
    return {"input_ids": ids * mask, "attention_mask": mask}  # padding id 0, as a tokenizer pads


def batch(n: int, m: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], ...]:
    """Anchors [N, 12], positives [N, 16] of the anchor's topic, negatives [N, M, 16] of other topics."""
    topic = torch.randint(0, TOPICS, (n,), generator=g)
    other = (topic.unsqueeze(1) + torch.randint(1, TOPICS, (n, m), generator=g)) % TOPICS  # (N, M)
    return documents(topic, 12, g), documents(topic, 16, g), documents(other, 16, g)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="anchors per step (N)")
    parser.add_argument("--negatives", type=int, default=4, help="negatives per anchor (M)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="documents embedded at a time")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    encoder = Encoder()
    criterion = pt.InfoNCE(temperature=0.1, learnable_temperature=True, in_batch=True)
    optimizer = torch.optim.Adam([*encoder.parameters(), *criterion.parameters()], lr=args.lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, args.steps + 1):
        anchors, positives, negatives = batch(args.batch, args.negatives, g)
        optimizer.zero_grad()
        loss = pt.cached_step(
            encoder, anchors, positives, negatives, mini_batch_size=args.mini_batch_size, criterion=criterion
        )  # both passes and the backward; the encoder and log_temperature now hold the full-batch gradient
        optimizer.step()
        losses.append(loss.item())
        print(
            f"step {step}/{args.steps}  loss {loss.item():.4f}  tau {float(criterion.temperature.detach()):.4f}",
            flush=True,
        )
    return losses


if __name__ == "__main__":
    main()
