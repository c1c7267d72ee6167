"""SVHN (cropped digits): ``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat``, as torchvision keeps them.

Each file is a MATLAB v5 file with ``X``, uint8 ``[32, 32, 3, N]`` (H, W, C, N), and ``y``,
``[N, 1]`` with labels 1..10 where 10 stands for the digit 0 (mapped to label 0 here).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

from tinyset.data.base import DATASETS, DatasetInfo, ImageDataset
from tinyset.data.download import (RESOURCES, Resource, check_labels, check_split, fetch_resources,
                                   missing_file_error)
from tinyset.errors import DataError

SVHN_INFO = DatasetInfo(
    name="svhn", channels=3, image_size=(32, 32), num_classes=10,
    class_names=tuple(str(i) for i in range(10)),
    mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 (0..9) from an SVHN .mat file."""
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many types for corrupt / HDF5 / non-.mat files
        raise DataError(f"{path}: cannot read as a MATLAB v5 .mat file "
                        f"({type(exc).__name__}: {exc})") from None
    for key in ("X", "y"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path}: missing variable {key!r}; found {found}, expected 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' is {x.dtype} of shape {x.shape}, expected uint8 "
                        f"(32, 32, 3, N)")
    n = x.shape[3]
    if y.size != n or (y.ndim == 2 and 1 not in y.shape) or y.ndim > 2:
        raise DataError(f"{path}: 'y' has shape {y.shape} but 'X' holds {n} images; expected "
                        f"({n}, 1)")
    labels = check_labels(y.reshape(-1), 11, f"{path} ('y')")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    return images, labels


@dataclass(frozen=True)
class SVHNSpec:
    """SVHN: one .mat file per split directly under the root."""

    info: DatasetInfo
    resources: tuple[Resource, ...]

    def _resource(self, split: str) -> Resource:
        return self.resources[0 if split == "train" else 1]

    def files(self, root: Path) -> list[Path]:
        return [Path(root) / r.filename for r in self.resources]

    def load(self, split: str, root: Path, download: bool = False) -> ImageDataset:
        res = self._resource(check_split(split))
        path = Path(root) / res.filename
        if not path.is_file():
            if not download:
                raise missing_file_error(self.info.name, path, res.url)
            fetch_resources([res], root)
        images, labels = read_svhn_mat(path)
        return ImageDataset(self.info, split, torch.from_numpy(images), torch.from_numpy(labels),
                            str(path))


def svhn() -> SVHNSpec:
    """SVHN street-view house numbers, 32x32 RGB, 73k train / 26k test."""
    return SVHNSpec(SVHN_INFO, RESOURCES["svhn"])


DATASETS.register("svhn", svhn)
