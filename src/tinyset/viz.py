"""Image grids of synthetic sets (Pillow only, no torchvision)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tinyset.errors import ConfigError
from tinyset.files import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from tinyset.synset import SyntheticSet

#: without an explicit ``upscale``, images are enlarged (nearest neighbour) to at least this size
MIN_CELL_PX = 32


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 (NaN -> 0, clamped, rounded to nearest)."""
    x = torch.nan_to_num(images01.detach().to("cpu", torch.float32), nan=0.0)
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def make_grid(images01: torch.Tensor, nrow: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images01: ``[N, C, H, W]`` with values in [0, 1], ``C`` in {1, 3}.
        nrow: images per grid row (the grid has ``ceil(N / nrow)`` rows).
        pad: pixels of padding between images and around the border.
        pad_value: padding colour in [0, 1].

    Returns:
        ``uint8`` array ``[rows*(H+pad)+pad, nrow*(W+pad)+pad, C]``.
    """
    if images01.dim() != 4 or images01.shape[1] not in (1, 3):
        raise ConfigError(f"make_grid expects [N, C, H, W] with C in (1, 3), got {tuple(images01.shape)}")
    if nrow < 1:
        raise ConfigError(f"make_grid: nrow must be >= 1, got {nrow}")
    if pad < 0:
        raise ConfigError(f"make_grid: pad must be >= 0, got {pad}")
    n, c, h, w = images01.shape
    if n == 0:
        raise ConfigError("make_grid: no images")
    rows = math.ceil(n / nrow)
    fill = int(round(min(max(float(pad_value), 0.0), 1.0) * 255))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    pixels = to_uint8(images01).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


#: the largest grid side written, in pixels (a bound on --upscale: 1000x on 100 MNIST images would be 313 GB)
MAX_GRID_PX = 16384
#: output suffix -> PIL format
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def check_image_suffix(path: str | os.PathLike) -> str:
    """The PIL format the suffix of ``path`` names; ConfigError for an unknown suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ConfigError(f"--out {path}: cannot tell the image format from the suffix {suffix or '(none)'!r}; "
                          f"use one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def upscale_factor(height: int, width: int, upscale: int | None = None) -> int:
    """``upscale`` if given (>= 1), else the smallest integer making both sides >= ``MIN_CELL_PX``."""
    if upscale is not None:
        if int(upscale) < 1:
            raise ConfigError(f"--upscale must be >= 1, got {upscale}")
        return int(upscale)
    return max(1, math.ceil(MIN_CELL_PX / max(1, min(height, width))))


def synset_grid(synset: "SyntheticSet", upscale: int | None = None, pad: int = 2,
                pad_value: float = 1.0) -> np.ndarray:
    """One grid row per class (in class order), that class's images left to right.

    Soft labels are grouped by their argmax; rows of classes with fewer images are padded with
    ``pad_value``. Images are un-whitened when the set carries a ZCA transform
    (:meth:`~tinyset.synset.SyntheticSet.normalized_images`), denormalised with ``synset.info``
    and enlarged by nearest neighbour (see :func:`upscale_factor`).
    """
    images01 = synset.info.denormalize(synset.normalized_images().detach().to("cpu", torch.float32))
    labels = synset.hard_labels().cpu()
    k = synset.num_classes
    per_class = [images01[labels == c] for c in range(k)]
    cols = max(1, max(p.shape[0] for p in per_class))
    _, c, h, w = images01.shape
    cells = torch.full((k * cols, c, h, w), float(pad_value))
    for cls, imgs in enumerate(per_class):
        cells[cls * cols: cls * cols + imgs.shape[0]] = imgs
    factor = upscale_factor(h, w, upscale)
    side = max(cols * (w * factor + pad) + pad, k * (h * factor + pad) + pad)
    if side > MAX_GRID_PX:
        largest = max(1, (MAX_GRID_PX - pad) // max(cols, k) - pad) // max(h, w)
        raise ConfigError(f"--upscale {factor} would make a grid {side} pixels wide; at most {MAX_GRID_PX} are "
                          f"written (the largest upscale for this set is {largest})")
    if factor > 1:
        cells = cells.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return make_grid(cells, nrow=cols, pad=pad, pad_value=pad_value)


def save_grid(synset: "SyntheticSet", path: str | os.PathLike, upscale: int | None = None) -> Path:
    """Write :func:`synset_grid` atomically in the format the suffix names (mode ``L`` for 1 channel,
    ``RGB`` for 3)."""
    from PIL import Image

    fmt = check_image_suffix(path)
    grid = synset_grid(synset, upscale=upscale)
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path


__all__ = ["make_grid", "save_grid", "synset_grid", "upscale_factor", "to_uint8", "check_image_suffix", "MIN_CELL_PX",
           "MAX_GRID_PX", "IMAGE_FORMATS"]
