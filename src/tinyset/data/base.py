"""Dataset contract: what every registered dataset provides, and the in-memory form tinyset uses.

A *dataset spec* (registered in :data:`DATASETS`) knows the dataset's shape and normalisation and
how to read its upstream files. :func:`load_dataset` returns an :class:`ImageDataset`: the whole
split as a ``uint8`` tensor ``[N, C, H, W]`` plus ``int64`` labels. :class:`RealPool` holds a split
normalised in memory (float, on a device) with a per-class index for O(1) batch sampling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from tinyset.errors import ConfigError, DataError
from tinyset.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: tuple[int, int]  # (H, W)
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(
            name=str(d["name"]),
            channels=int(d["channels"]),
            image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
            num_classes=int(d["num_classes"]),
            class_names=tuple(str(c) for c in d["class_names"]),
            mean=tuple(float(m) for m in d["mean"]),
            std=tuple(float(s) for s in d["std"]),
        )

    def normalize(self, images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [N,C,H,W] -> float, ``(x/255 - mean) / std``."""
        x = images_uint8.to(dtype) / 255.0
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float -> [0, 1] pixel values (clamped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)


@dataclass
class ImageDataset:
    """One split held whole in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    info: DatasetInfo
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""  # where it was read from (file or folder), for messages and `tinyset datasets`

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.source or self.info.name}: images must be uint8 [N,C,H,W], "
                            f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.source or self.info.name}: {self.images.shape[0]} images but "
                            f"labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.info.num_classes).tolist()

    def normalized(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.info.normalize(self.images.to(device))


class RealPool:
    """A split normalised in memory with a per-class index: O(1) sampling of one class's batch."""

    def __init__(self, data: ImageDataset, device: str | torch.device = "cpu"):
        self.info = data.info
        #: the split the pool was made from (``images[i]`` is ``source``'s image ``i``, normalised)
        self.source = data
        self.device = torch.device(device)
        self.images = data.normalized(self.device)
        self.labels = data.labels.to(self.device)
        order = torch.argsort(data.labels, stable=True)
        counts = torch.bincount(data.labels, minlength=data.info.num_classes)
        self.class_index: list[torch.Tensor] = list(torch.split(order.to(self.device), counts.tolist()))
        self.counts = counts.tolist()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random images of class ``c`` (without replacement when the class has enough)."""
        idx = self.class_index[c]
        k = idx.numel()
        if k == 0:
            raise DataError(f"class {c} of {self.info.name} has no images")
        if n <= k:
            pick = torch.randperm(k, generator=generator)[:n]
        else:
            pick = torch.randint(0, k, (n,), generator=generator)
        return self.images[idx[pick.to(idx.device)]]

    def sample_classes(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images of every class, concatenated class by class: ([K*n, C, H, W], labels)."""
        parts = [self.sample_class(c, n, generator) for c in range(self.info.num_classes)]
        labels = torch.arange(self.info.num_classes, device=self.device).repeat_interleave(n)
        return torch.cat(parts), labels


class DatasetSpec(Protocol):
    """What a registered dataset provides."""

    info: DatasetInfo
    #: names of the upstream files, relative to the data root, for messages and `tinyset datasets`
    def files(self, root: Path) -> list[Path]: ...

    def load(self, split: str, root: Path, download: bool = False) -> ImageDataset: ...


DATASETS: Registry = Registry("dataset")
#: datasets named ``FAMILY:ARGUMENT`` (``imagefolder:PATH``): FAMILY -> constructor taking the argument
DATASET_FAMILIES: Registry = Registry("dataset family")


def default_data_root() -> Path:
    """``$TINYSET_DATA`` or ``./data``."""
    return Path(os.environ.get("TINYSET_DATA", "data"))


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name``; ``FAMILY:ARGUMENT`` (e.g. ``imagefolder:PATH``) builds one from a family."""
    family, sep, argument = name.partition(":")
    if sep:
        if family not in DATASET_FAMILIES:
            raise ConfigError(f"unknown dataset family {family!r} in {name!r}; known: "
                              f"{', '.join(f + ':...' for f in DATASET_FAMILIES.names())}")
        if not argument.strip():
            raise ConfigError(f"dataset {name!r} names no {family} argument; expected {family}:PATH")
        return DATASET_FAMILIES.get(family)(argument)
    factory = DATASETS.get(name)
    return factory()


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False) -> ImageDataset:
    """Read a whole split (``train`` or ``test``) of a registered dataset into memory."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    spec = get_spec(name)
    return spec.load(split, Path(root) if root is not None else default_data_root(), download=download)


def split_validation(data: ImageDataset, per_class: int, generator: torch.Generator
                     ) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``per_class`` training images of every class as a validation split.

    Anything that needs choosing (a learning rate, a checkpoint) is chosen on this split, never on
    the test set.
    """
    keep, held = [], []
    for c in range(data.info.num_classes):
        idx = (data.labels == c).nonzero().flatten()
        if idx.numel() <= per_class:
            raise ConfigError(f"class {c} of {data.info.name} has {idx.numel()} images; cannot hold "
                              f"out {per_class} for validation")
        perm = idx[torch.randperm(idx.numel(), generator=generator)]
        held.append(perm[:per_class])
        keep.append(perm[per_class:])
    k, h = torch.cat(keep).sort().values, torch.cat(held).sort().values
    return (ImageDataset(data.info, data.split, data.images[k], data.labels[k], data.source),
            ImageDataset(data.info, "val", data.images[h], data.labels[h], data.source))


def check_ipc(data: ImageDataset, ipc: int, what: str = "ipc") -> None:
    """Reject an images-per-class count that some class cannot supply."""
    if ipc < 1:
        raise ConfigError(f"{what} must be >= 1, got {ipc}")
    counts = data.class_counts()
    smallest = min(counts)
    if ipc > smallest:
        c = counts.index(smallest)
        raise ConfigError(f"{what}={ipc} but class {c} ({data.info.class_names[c]!r}) of "
                          f"{data.info.name} has only {smallest} training images")


__all__: Sequence[str] = [
    "DatasetInfo", "ImageDataset", "RealPool", "DatasetSpec", "DATASETS", "DATASET_FAMILIES", "default_data_root",
    "get_spec", "load_dataset", "split_validation", "check_ipc",
]
