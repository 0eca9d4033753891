"""pml_triplets: InfoNCE on predefined (anchor, positive, negatives) triplets, on top of pytorch-metric-learning.

>>> import torch, pml_triplets as pt
>>> a, p, n = torch.randn(32, 64), torch.randn(32, 64), torch.randn(32, 10, 64)
>>> loss = pt.infonce(a, p, n)  # PML's NTXentLoss, tau = 0.07, the right pairs
>>> loss.shape
torch.Size([])
"""

from .indices import build_indices, concat_embeddings, pairing_matrix
from .loss import DEFAULT_TEMPERATURE, InfoNCE, infonce
from .reference import reference_infonce

__all__ = [
    "DEFAULT_TEMPERATURE",
    "InfoNCE",
    "build_indices",
    "concat_embeddings",
    "infonce",
    "pairing_matrix",
    "reference_infonce",
]

__version__ = "0.1.0"
