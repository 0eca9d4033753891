"""pml_triplets: InfoNCE on predefined (anchor, positive, negatives) triplets, on top of pytorch-metric-learning.

>>> import torch, pml_triplets as pt
>>> a, p, n = torch.randn(32, 64), torch.randn(32, 64), torch.randn(32, 10, 64)
>>> loss = pt.infonce(a, p, n)  # NTXentLoss's loss (cosine, tau = 0.07) on the right pairs
>>> loss.shape
torch.Size([])
"""

from importlib.metadata import PackageNotFoundError, version

from .cached import cached_step
from .indices import build_indices, concat_embeddings, pairing_matrix
from .loss import DEFAULT_TEMPERATURE, InfoNCE, infonce
from .mine import MinedNegatives, mine_negatives
from .ntxent import NTXentLoss, RepeatLayoutWarning
from .queue import NegativeQueue
from .reference import reference_infonce

__all__ = [
    "DEFAULT_TEMPERATURE",
    "InfoNCE",
    "MinedNegatives",
    "NTXentLoss",
    "NegativeQueue",
    "RepeatLayoutWarning",
    "__version__",
    "build_indices",
    "cached_step",
    "concat_embeddings",
    "infonce",
    "mine_negatives",
    "pairing_matrix",
    "reference_infonce",
]

try:
    __version__ = version("pml-triplets")  # one source: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
