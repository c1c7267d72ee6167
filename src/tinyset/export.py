"""Export a synthetic set to plain formats: an image folder of PNGs, or a NumPy ``.npz``.

* :func:`export_imagefolder` writes ``out_dir/<class index>_<class name>/<i>.png`` (one
  subfolder per class; the index is zero-padded so sorted folder names follow class order), a
  ``meta.json`` describing the set and, for soft labels, ``labels.json`` with every image's
  label row (the PNG is filed under the row's argmax).
* :func:`export_npz` writes normalised and ``uint8`` images, labels, normalisation and metadata.

A set that carries a ZCA transform is exported un-whitened (PNGs, ``images_uint8`` and
``images_normalized`` are in the dataset's normalised space); the npz also keeps the stored
whitened images and the transform (``images_whitened``, ``zca_mean``, ``zca_transform``,
``zca_inverse``), and ``meta.json`` / ``meta_json`` carry the header's ``zca`` entry.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyset.errors import ConfigError
from tinyset.synset import SyntheticSet
from tinyset.files import json_default, atomic_path
from tinyset.viz import to_uint8


def sanitize_name(name: str) -> str:
    """A class name made safe as part of a folder name: ``[A-Za-z0-9._-]``, no leading dot."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("_").lstrip(".")
    return clean[:64] or "class"


def class_folder_names(synset: SyntheticSet) -> list[str]:
    """``00_name``, ``01_name``, ...: zero-padded so that sorted names keep class order."""
    k = synset.num_classes
    width = max(2, len(str(k - 1)))
    return [f"{c:0{width}d}_{sanitize_name(n)}" for c, n in enumerate(synset.info.class_names)]


def describe(synset: SyntheticSet) -> dict[str, Any]:
    """The set's header (format, info, meta with version, label kind, ZCA when present) plus ``lr``,
    ``num_images`` and ``label_regime`` (under which ``tinyset evaluate`` trains on the stored
    labels with a protocol's own lr)."""
    from tinyset.results import label_regime

    d = synset.header()
    d["lr"] = synset.lr
    d["num_images"] = len(synset)
    d["label_regime"] = label_regime(synset.is_soft, False)
    return d


def _normalized(synset: SyntheticSet) -> torch.Tensor:
    """The images in the dataset's normalised space (un-whitened), float32 on the CPU."""
    return synset.normalized_images().detach().to("cpu", torch.float32)


def _pixels_nhwc(synset: SyntheticSet) -> np.ndarray:
    """Un-whitened, denormalised, rounded ``uint8 [N, H, W, C]``."""
    images01 = synset.info.denormalize(_normalized(synset))
    return to_uint8(images01).permute(0, 2, 3, 1).contiguous().numpy()


def _check_target_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"export target {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise ConfigError(f"export target {out_dir} exists and is not empty; choose a new folder, or "
                              f"replace it with --force (the overwrite argument in Python)")


def export_imagefolder(synset: SyntheticSet, out_dir: str | os.PathLike,
                       overwrite: bool = False) -> Path:
    """Write the set as a class-per-subfolder image folder of PNGs; returns ``out_dir``.

    Layout: ``out_dir/<kk>_<class name>/<i>.png`` where ``i`` counts the class's images in set
    order (zero-padded within a class so names sort numerically), ``out_dir/meta.json`` (see
    :func:`describe`) and, for soft labels, ``out_dir/labels.json`` mapping every PNG's relative
    path to its soft-label row (images are filed under the row's argmax). Every class gets a
    folder, even an empty one.

    The folder is built next to ``out_dir`` and renamed into place. An existing non-empty
    ``out_dir`` raises :class:`ConfigError` unless ``overwrite=True`` (then it is replaced).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    _check_target_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pixels = _pixels_nhwc(synset)
    labels = synset.hard_labels().cpu()
    folders = class_folder_names(synset)
    soft_rows: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for c, folder in enumerate(folders):
            (tmp / folder).mkdir()
            idx = (labels == c).nonzero().flatten().tolist()
            width = len(str(max(len(idx) - 1, 0)))
            for j, i in enumerate(idx):
                px = pixels[i]
                Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(
                    tmp / folder / f"{j:0{width}d}.png", format="PNG")
                if synset.is_soft:
                    soft_rows[f"{folder}/{j:0{width}d}.png"] = synset.labels[i].tolist()
        (tmp / "meta.json").write_text(json.dumps(describe(synset), indent=2, default=json_default) + "\n")
        if synset.is_soft:
            (tmp / "labels.json").write_text(json.dumps(
                {"class_names": list(synset.info.class_names), "soft_labels": soft_rows}, indent=1) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename directory ``new`` to ``target``, replacing ``target`` (moved aside first) if present."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_npz(synset: SyntheticSet, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the set to an uncompressed ``.npz`` (readable with ``allow_pickle=False``).

    Arrays: ``images_normalized`` float32 [N,C,H,W], ``images_uint8`` uint8 [N,H,W,C]
    (denormalised, rounded), ``labels`` (int64 [N] or float32 [N,K]), ``mean``, ``std``
    (float32 [C]), ``class_names`` (str [K]), ``meta_json`` (0-d str, see :func:`describe`) and,
    when the set has one, ``lr`` (0-d float64). A set with a ZCA transform adds
    ``images_whitened`` (the stored images, float32 [N,C,H,W]) and ``zca_mean`` [D],
    ``zca_transform`` and ``zca_inverse`` [D,D] (float32, ``D = C*H*W``); the other image arrays
    are un-whitened. Written atomically; an existing file raises
    :class:`ConfigError` unless ``overwrite=True``. The path is used exactly as given.
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise ConfigError(f"export target {out_path} already exists; choose another path, or replace it with "
                          f"--force (the overwrite argument in Python)")
    if out_path.is_dir():
        raise ConfigError(f"export target {out_path} is a directory")
    arrays: dict[str, np.ndarray] = {
        "images_normalized": _normalized(synset).numpy(),
        "images_uint8": _pixels_nhwc(synset),
        "labels": synset.labels.detach().cpu().numpy(),
        "mean": np.asarray(synset.info.mean, dtype=np.float32),
        "std": np.asarray(synset.info.std, dtype=np.float32),
        "class_names": np.asarray(list(synset.info.class_names), dtype=np.str_),
        "meta_json": np.asarray(json.dumps(describe(synset), default=json_default), dtype=np.str_),
    }
    if synset.lr is not None:
        arrays["lr"] = np.asarray(synset.lr, dtype=np.float64)
    if synset.zca is not None:
        arrays["images_whitened"] = synset.images.detach().to("cpu", torch.float32).numpy()
        arrays.update({f"zca_{k}": t.numpy() for k, t in synset.zca.state_dict().items()})
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez must not append ".npz" to the tmp name
            np.savez(fh, **arrays)
    return out_path


__all__ = ["export_imagefolder", "export_npz", "sanitize_name", "class_folder_names", "describe"]
