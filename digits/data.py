"""The 8×8 handwritten digits that ship inside scikit-learn (``sklearn.datasets.load_digits``, no download).

Pixel values 0…16 are mapped to [-1, 1] (ink = +1); the train/test split is stratified and fixed by
``SPLIT_SEED``, so the classifier, the diffusion model and the metrics all hold out the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
TEST_FRACTION = 0.2


class DigitsDataError(RuntimeError):
    """scikit-learn is missing; the message says how to install it."""


@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # [N, 1, 8, 8] in [-1, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor


def pixels_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """0…16 grey levels → [-1, 1]."""
    return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0


def load_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DigitsDataError("Guidance Kit digits: scikit-learn is needed for the digits data set "
                              "(it ships the images, no download): pip install scikit-learn") from None
    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                                        stratify=labels)
    return DigitsSplit(pixels_to_unit(train_x).unsqueeze(1), torch.as_tensor(train_y),
                       pixels_to_unit(test_x).unsqueeze(1), torch.as_tensor(test_y))
