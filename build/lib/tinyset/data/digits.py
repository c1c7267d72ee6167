"""scikit-learn's 8x8 handwritten digits (1797 images), a tiny dataset that needs no download.

Pixels are 0..16 in scikit-learn; they are scaled to uint8 by ``round(v * 255 / 16)`` (halves
rounded up). The split is fixed and deterministic: for each class, that class's indices in
``load_digits()`` order are sorted and the first ``floor(0.8 * n_c)`` go to ``train``, the rest to
``test`` (1433 train / 364 test images). Each split keeps the original order.

The normalisation constants were computed once from the train split, over all pixels in [0, 1]
(population std)::

    x = digits_arrays("train")[0] / 255.0;  x.mean() -> 0.30538,  x.std() -> 0.37533

and are checked by ``tests/test_data.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinyset.data.base import DATASETS, DatasetInfo, ImageDataset
from tinyset.data.download import check_split

DIGITS_INFO = DatasetInfo(
    name="digits", channels=1, image_size=(8, 8), num_classes=10,
    class_names=tuple(str(i) for i in range(10)), mean=(0.3054,), std=(0.3753,),
)

TRAIN_FRACTION = 0.8
SOURCE = "sklearn.datasets.load_digits"


def split_indices(labels: np.ndarray, num_classes: int = 10) -> dict[str, np.ndarray]:
    """The fixed per-class 80/20 split: ``{'train': idx, 'test': idx}``, each sorted."""
    train, test = [], []
    for c in range(num_classes):
        idx = np.sort(np.flatnonzero(labels == c))
        k = int(np.floor(TRAIN_FRACTION * len(idx)))
        train.append(idx[:k])
        test.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 1, 8, 8]`` uint8 and labels ``[N]`` int64 of one split."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    pixels = np.floor(np.asarray(bunch.data, dtype=np.float64) * 255.0 / 16.0 + 0.5)
    images = pixels.astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = split_indices(labels)[check_split(split)]
    return images[idx], labels[idx]


class DigitsSpec:
    """scikit-learn's digits; bundled with scikit-learn, so ``root`` and ``download`` are unused."""

    info = DIGITS_INFO

    def files(self, root: Path) -> list[Path]:
        return []

    def load(self, split: str, root: Path, download: bool = False) -> ImageDataset:
        images, labels = digits_arrays(split)
        return ImageDataset(self.info, split, torch.from_numpy(images), torch.from_numpy(labels),
                            SOURCE)


def digits() -> DigitsSpec:
    """scikit-learn 8x8 digits, 1 channel, 1433 train / 364 test, no download."""
    return DigitsSpec()


DATASETS.register("digits", digits)
