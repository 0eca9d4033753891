"""The data: scikit-learn's 1,797 bundled 8x8 digit images (no download), split into train and held-out sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLIT_SEED = 0  # the held-out set does not move with --seed, so runs are compared on the same images
TEST_SIZE = 0.3


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train / held-out split of scikit-learn's digits, pixels scaled to ``[0, 1]``.

    Attributes:
        x_train: ``[N_train, 64]`` float32.
        y_train: ``[N_train]`` int64 class labels 0-9.
        x_test: ``[N_test, 64]`` float32.
        y_test: ``[N_test]`` int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_size: float = TEST_SIZE, seed: int = SPLIT_SEED) -> DigitsSplit:
    """Load the digits and split them, stratified by class (scikit-learn is imported here: the ``demo`` extra).

    Args:
        test_size: fraction held out.
        seed: ``random_state`` of ``train_test_split``.

    Returns:
        The split; with the defaults 1,257 training and 540 held-out images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)

    def pixels(a: object) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32) / 16.0  # 4-bit grey levels

    def labels(a: object) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return DigitsSplit(pixels(x_tr), labels(y_tr), pixels(x_te), labels(y_te))
