"""CIFAR-10 and CIFAR-100: the official "python version" pickles, laid out as torchvision keeps them.

``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``ROOT/cifar-100-python/{train, test, meta}``. Each batch is a pickled dict with ``data`` (a uint8
array ``[N, 3072]``: 1024 red, then 1024 green, then 1024 blue values, row-major) and ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100). The files were written by Python 2, so they are read
with ``encoding='bytes'`` and their keys come back as ``bytes``; keys are decoded here. The class
names in ``batches.meta`` / ``meta`` (``label_names`` / ``fine_label_names``) are read on every
load and must equal the official names, which are also hard-coded so that ``info`` is available
without any files.

Pickles can run arbitrary code, so they are read with :class:`RestrictedUnpickler`, which
resolves only the numpy globals an ndarray needs and refuses every other one.
"""
from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tinyset.data.base import DATASETS, DatasetInfo, ImageDataset
from tinyset.data.download import (RESOURCES, Resource, check_labels, check_split, extract_tar,
                                   fetch_resources, missing_file_error)
from tinyset.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")

#: CIFAR-100 fine label names, in label order (as in the ``meta`` file's ``fine_label_names``).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

CIFAR10_INFO = DatasetInfo(
    name="cifar10", channels=3, image_size=(32, 32), num_classes=10, class_names=CIFAR10_CLASSES,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
)
CIFAR100_INFO = DatasetInfo(
    name="cifar100", channels=3, image_size=(32, 32), num_classes=100,
    class_names=CIFAR100_CLASSES,
    mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762),
)

_PIXELS = 3 * 32 * 32


def _numpy_reconstruct() -> Callable[..., Any]:
    """``_reconstruct`` from numpy's core module (``numpy._core`` in numpy 2, ``numpy.core`` in 1)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy has no multiarray._reconstruct")  # pragma: no cover


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild numpy arrays.

    Allowed: ``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``. Any other global raises ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        return resolve()


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys, read with :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    except Exception as exc:  # unpickling can fail in many ways on a corrupt or hostile file
        raise DataError(f"{path}: not a valid CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _get(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise DataError(f"{path}: missing key {key!r}; found keys {sorted(d)}")
    return d[key]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 of one batch file."""
    d = load_pickle(path)
    data = _get(d, "data", path)
    raw_labels = _get(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {found}, expected a uint8 numpy array")
    if data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, {_PIXELS}) "
                        f"(N images of 3x32x32)")
    try:
        labels = np.asarray(raw_labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {label_key!r} is not a list of integers ({exc})") from None
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.size} {label_key} but {data.shape[0]} images in 'data'; "
                        f"expected one label per image")
    labels = check_labels(labels, num_classes, f"{path} ({label_key!r})")
    return data.reshape(-1, 3, 32, 32), labels


def _check_class_names(path: Path, key: str, expected: tuple[str, ...]) -> None:
    """Check that the class names in a meta pickle are the official ones, in label order."""
    raw = _get(load_pickle(path), key, path)
    try:
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw)
    except (TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {key!r} is not a list of names ({exc})") from None
    if names != expected:
        if len(names) != len(expected):
            found = f"{len(names)} names"
        else:
            i = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
            found = f"name {i} is {names[i]!r} where {expected[i]!r} is expected"
        raise DataError(f"{path}: {key!r} does not match the official {len(expected)} class names "
                        f"({found}); not the official file")


@dataclass(frozen=True)
class CifarSpec:
    """A CIFAR-format dataset: batch pickles and a meta pickle in one folder under the root."""

    info: DatasetInfo
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    resource: Resource

    def dir(self, root: Path) -> Path:
        return Path(root) / self.folder

    def files(self, root: Path) -> list[Path]:
        names = (*self.train_files, *self.test_files, self.meta_file)
        return [self.dir(root) / n for n in names]

    def load(self, split: str, root: Path, download: bool = False) -> ImageDataset:
        root = Path(root)
        batches = self.train_files if check_split(split) == "train" else self.test_files
        needed = [self.dir(root) / n for n in (*batches, self.meta_file)]
        if download and not all(p.is_file() for p in needed):
            (archive,) = fetch_resources([self.resource], root)
            extract_tar(archive, root)
        for p in needed:
            if not p.is_file():
                raise missing_file_error(self.info.name, p, self.resource.url)
        _check_class_names(self.dir(root) / self.meta_file, self.names_key, self.info.class_names)
        parts = [_read_batch(self.dir(root) / b, self.label_key, self.info.num_classes)
                 for b in batches]
        images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ImageDataset(self.info, split, torch.from_numpy(images), torch.from_numpy(labels),
                            str(self.dir(root)))


def cifar10() -> CifarSpec:
    """CIFAR-10 natural images, 32x32 RGB, 10 classes, 50k train / 10k test."""
    return CifarSpec(CIFAR10_INFO, "cifar-10-batches-py",
                     tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                     "batches.meta", "labels", "label_names", RESOURCES["cifar10"][0])


def cifar100() -> CifarSpec:
    """CIFAR-100 natural images, 32x32 RGB, 100 fine classes, 50k train / 10k test."""
    return CifarSpec(CIFAR100_INFO, "cifar-100-python", ("train",), ("test",), "meta",
                     "fine_labels", "fine_label_names", RESOURCES["cifar100"][0])


DATASETS.register("cifar10", cifar10)
DATASETS.register("cifar100", cifar100)
