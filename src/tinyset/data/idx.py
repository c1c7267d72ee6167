"""MNIST and FashionMNIST: the original idx files, laid out as torchvision keeps them.

``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (and the same names under
``ROOT/FashionMNIST/raw``); plain and gzipped files are both read, plain first when both exist.

The idx format: a big-endian 4-byte magic number ``0x000008NN`` (``08`` = unsigned bytes,
``NN`` = number of dimensions; 2051 for image files, 2049 for label files), then ``NN``
big-endian uint32 sizes, then the data, row-major. Files are parsed with one ``np.frombuffer``.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyset.data.base import DATASETS, DatasetInfo, ImageDataset
from tinyset.data.download import (RESOURCES, Resource, check_labels, check_split, fetch_resources,
                                   missing_file_error)
from tinyset.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim

_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_INFO = DatasetInfo(
    name="mnist", channels=1, image_size=(28, 28), num_classes=10,
    class_names=tuple(str(i) for i in range(10)), mean=(0.1307,), std=(0.3081,),
)
FASHION_MNIST_INFO = DatasetInfo(
    name="fashion-mnist", channels=1, image_size=(28, 28), num_classes=10,
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    mean=(0.2861,), std=(0.3530,),
)


def read_gz_or_plain(path: Path) -> bytes:
    """The content of ``path``, gunzipped when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc}); expected a complete gzip stream, "
                        f"delete it and download it again") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte idx file with ``ndim`` dimensions as a (read-only) uint8 array."""
    data = read_gz_or_plain(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an idx header "
                        f"({header} bytes expected); the file is truncated")
    magic = int.from_bytes(data[:4], "big")
    expected = 0x0800 | ndim
    if magic != expected:
        raise DataError(f"{path}: idx magic number is {magic} (0x{magic:08x}), expected {expected} "
                        f"(0x{expected:08x}: unsigned bytes, {ndim} dimension(s)); "
                        f"not an idx{ndim} file of this dataset")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    need = header + math.prod(dims)
    if len(data) != need:
        what = "is truncated" if len(data) < need else "has trailing data"
        raise DataError(f"{path}: header declares shape {dims}, i.e. {need} bytes, but the "
                        f"(uncompressed) file holds {len(data)} bytes; the file {what}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@dataclass(frozen=True)
class IdxSpec:
    """An MNIST-format dataset: four idx files under ``ROOT/<folder>/raw``."""

    info: DatasetInfo
    folder: str
    resources: tuple[Resource, ...]

    def raw_dir(self, root: Path) -> Path:
        return Path(root) / self.folder / "raw"

    def _find(self, root: Path, stem: str) -> Path | None:
        """The plain file if present, else the ``.gz`` one, else None."""
        raw = self.raw_dir(root)
        for name in (stem, stem + ".gz"):
            if (raw / name).is_file():
                return raw / name
        return None

    def files(self, root: Path) -> list[Path]:
        """The four idx files: the variant on disk, or the upstream ``.gz`` name when absent."""
        return [self._find(root, s) or self.raw_dir(root) / (s + ".gz")
                for split in ("train", "test") for s in _STEMS[split]]

    def _url(self, filename: str) -> str | None:
        return next((r.url for r in self.resources if r.filename == filename), None)

    def _locate(self, split: str, root: Path, download: bool) -> tuple[Path, Path]:
        found = [self._find(root, s) for s in _STEMS[split]]
        if None in found and download:
            wanted = {s + ".gz" for s, p in zip(_STEMS[split], found) if p is None}
            fetch_resources([r for r in self.resources if r.filename in wanted], self.raw_dir(root))
            found = [self._find(root, s) for s in _STEMS[split]]
        for stem, path in zip(_STEMS[split], found):
            if path is None:
                raise missing_file_error(self.info.name, self.raw_dir(root) / (stem + ".gz"),
                                         self._url(stem + ".gz"), alternatives=(stem,))
        images_path, labels_path = found
        assert images_path is not None and labels_path is not None
        return images_path, labels_path

    def load(self, split: str, root: Path, download: bool = False) -> ImageDataset:
        images_path, labels_path = self._locate(check_split(split), Path(root), download)
        images = read_idx(images_path, 3)
        labels = read_idx(labels_path, 1)
        n, h, w = images.shape
        if (h, w) != self.info.image_size:
            raise DataError(f"{images_path}: images are {h}x{w}, expected "
                            f"{self.info.image_size[0]}x{self.info.image_size[1]}")
        if labels.shape[0] != n:
            raise DataError(f"{labels_path}: {labels.shape[0]} labels but {images_path.name} "
                            f"holds {n} images; expected one label per image")
        y = check_labels(labels, self.info.num_classes, labels_path)
        x = torch.from_numpy(images.reshape(n, 1, h, w).copy())
        return ImageDataset(self.info, split, x, torch.from_numpy(y), str(self.raw_dir(root)))


def mnist() -> IdxSpec:
    """MNIST handwritten digits, 28x28 grey, 60k train / 10k test."""
    return IdxSpec(MNIST_INFO, "MNIST", RESOURCES["mnist"])


def fashion_mnist() -> IdxSpec:
    """Fashion-MNIST clothing images, 28x28 grey, 60k train / 10k test."""
    return IdxSpec(FASHION_MNIST_INFO, "FashionMNIST", RESOURCES["fashion-mnist"])


DATASETS.register("mnist", mnist)
DATASETS.register("fashion-mnist", fashion_mnist)
