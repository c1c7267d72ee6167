"""Any folder of class subfolders of images, as ``imagefolder:PATH``.

Layout: ``PATH/<class>/<image>`` (or ``PATH/train/<class>/...`` and ``PATH/test/<class>/...``).
Images are PNG, JPEG or BMP (extensions matched case-insensitively); class names are the sorted
train subfolder names. The ``train`` split reads ``PATH/train`` when it exists, else ``PATH``;
``test`` reads ``PATH/test``, whose subfolders must be train classes.

Images become RGB, or single-channel ``L`` when every train image is greyscale. Without
``image_size`` all images must have the size of the first train image; with it, images of another
size are resized with PIL's bilinear filter. Mean and std per channel are computed from the train
split's pixels the first time :attr:`ImageFolderSpec.info` is needed (kept in memory only).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinyset.data.base import DATASET_FAMILIES, DatasetInfo, ImageDataset
from tinyset.data.download import check_split
from tinyset.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: PIL modes that hold no colour
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _class_folders(folder: Path) -> list[Path]:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"image folder {folder} is a file, not a folder; expected a folder of class subfolders")
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; expected a folder of class subfolders")
    classes = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not classes:
        raise DataError(f"{folder}: no class subfolders found; expected {folder}/<class>/<image>")
    return classes


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); expected a "
                        f"PNG, JPEG or BMP file") from None


@DATASET_FAMILIES.register("imagefolder", help="imagefolder:PATH, a folder of class subfolders of PNG/JPEG images")
class ImageFolderSpec:
    """A dataset spec for a folder of class subfolders (see the module docstring)."""

    def __init__(self, path: str, image_size: int | None = None):
        if image_size is not None and int(image_size) < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        self.path = str(path)
        self.image_size = None if image_size is None else int(image_size)
        self._info: DatasetInfo | None = None

    def files(self, root: Path) -> list[Path]:
        """The image folder itself (``root`` is not used)."""
        return [Path(self.path)]

    def split_dir(self, split: str) -> Path:
        base = Path(self.path)
        if check_split(split) == "train":
            return base / "train" if (base / "train").is_dir() else base
        if not (base / "test").is_dir():
            raise DataError(f"image folder {base}: no test split; expected a folder {base / 'test'} "
                            f"of class subfolders")
        return base / "test"

    def _scan(self, split: str, class_names: tuple[str, ...] | None
              ) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
        """Class names and ``(file, label)`` pairs of a split; test labels follow the train names."""
        folder = self.split_dir(split)
        classes = _class_folders(folder)
        if class_names is None:
            class_names = tuple(c.name for c in classes)
        index = {name: i for i, name in enumerate(class_names)}
        items: list[tuple[Path, int]] = []
        for c in classes:
            if c.name not in index:
                raise DataError(f"{c}: class {c.name!r} of the test split is not a train class; "
                                f"expected one of {list(class_names)}")
            files = _image_files(c)
            if not files and split == "train":
                raise DataError(f"{c}: class folder has no images; expected PNG, JPEG or BMP files")
            items.extend((f, index[c.name]) for f in files)
        if not items:
            raise DataError(f"{folder}: no images found; expected PNG, JPEG or BMP files in "
                            f"class subfolders")
        return class_names, items

    def _read(self, items: list[tuple[Path, int]], mode: str | None,
              size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Images ``[N, C, H, W]`` uint8, labels and (H, W).

        ``mode`` None means L if every image is greyscale, else RGB. ``size`` (H, W) None means
        the size of the first image, which all others must then share.
        """
        if mode is None:
            modes = []
            for path, _ in items:
                with _open(path) as im:
                    modes.append(im.mode)
            mode = "L" if all(m in GREY_MODES for m in modes) else "RGB"
        if self.image_size is not None:
            size = (self.image_size, self.image_size)
        size_of = "the train images"
        arrays = []
        for path, _ in items:
            try:
                with _open(path) as im:
                    im = im.convert(mode)
                    if size is None:
                        size, size_of = (im.height, im.width), f"the first image, {path.name}"
                    if (im.height, im.width) != size:
                        if self.image_size is None:
                            raise DataError(
                                f"{path}: image is {im.height}x{im.width}, expected "
                                f"{size[0]}x{size[1]} (the size of {size_of}); all images must "
                                f"have one size, or give image_size to resize them")
                        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    arrays.append(np.asarray(im, dtype=np.uint8))
            except _READ_ERRORS as exc:
                raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        assert size is not None
        images = np.stack(arrays)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        labels = np.array([label for _, label in items], dtype=np.int64)
        return np.ascontiguousarray(images), labels, size

    def _train(self) -> tuple[DatasetInfo, np.ndarray, np.ndarray]:
        class_names, items = self._scan("train", None)
        images, labels, size = self._read(items, None, None)
        x = images.astype(np.float64) / 255.0
        mean = x.mean(axis=(0, 2, 3))
        std = x.std(axis=(0, 2, 3))
        std[std < 1e-6] = 1.0  # a constant channel: leave it unscaled rather than divide by 0
        info = DatasetInfo(
            name=f"imagefolder:{self.path}", channels=images.shape[1], image_size=size,
            num_classes=len(class_names), class_names=class_names,
            mean=tuple(round(float(m), 6) for m in mean), std=tuple(round(float(s), 6) for s in std),
        )
        return info, images, labels

    @property
    def info(self) -> DatasetInfo:
        """Shape, classes and normalisation, computed from the train split on first use."""
        if self._info is None:
            self._info = self._train()[0]
        return self._info

    def load(self, split: str, root: Path | None = None, download: bool = False) -> ImageDataset:
        """Read a split; ``root`` and ``download`` are ignored (the folder is given by ``path``)."""
        if check_split(split) == "train":
            info, images, labels = self._train()
            self._info = info
        else:
            info = self.info
            _, items = self._scan("test", info.class_names)
            mode = "L" if info.channels == 1 else "RGB"
            images, labels, _ = self._read(items, mode, info.image_size)
        return ImageDataset(info, split, torch.from_numpy(images), torch.from_numpy(labels),
                            str(self.split_dir(split)))
