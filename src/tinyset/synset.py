"""The synthetic-set artifact: a small labelled image set plus everything needed to reuse it.

A :class:`SyntheticSet` holds *normalised* float32 images ``[N, C, H, W]`` (the space networks
train in), hard (``int64 [N]``) or soft (``float32 [N, K]``, rows summing to 1) labels, the
:class:`~tinyset.data.base.DatasetInfo` of the dataset it was distilled from, an optional learned
learning rate and a dict of JSON-serialisable metadata.

File format
-----------
One ``.safetensors`` file. Tensors: ``images``, ``labels`` and, when present, ``lr`` (a 0-d float64
tensor) and any named extra tensors a method stores (``extra.<name>``, e.g. a learned per-step
learning-rate schedule), which loading returns in :attr:`SyntheticSet.extras`. The safetensors string metadata holds a single key, ``tinyset``, whose value is a JSON
document::

    {"format": "tinyset.synset", "format_version": 1, "info": {...DatasetInfo.to_dict()...},
     "meta": {...}, "label_kind": "hard" | "soft"}

A set distilled on ZCA-whitened data (:mod:`tinyset.data.zca`) holds its images in the whitened
space and carries the transform: tensors ``zca.mean``, ``zca.transform``, ``zca.inverse`` and the
header field ``"zca": {"eps": ..., "num_images": ..., "dim": ...}``. Such files are written with
``format_version`` 2, so that a tinyset that cannot apply the transform refuses them instead of
evaluating on unwhitened test images; files without ZCA stay version 1. Evaluation whitens the test
images with the stored transform; :meth:`SyntheticSet.normalized_images` un-whitens for display.

Loading only ever parses safetensors (never pickle) and validates everything it reads; any
problem raises :class:`~tinyset.errors.ArtifactError` naming the file.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from tinyset.data.base import DatasetInfo
from tinyset.data.zca import STATE_KEYS as ZCA_KEYS, Zca
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.files import json_default, atomic_path

#: value of the ``format`` field identifying a synthetic-set file
FORMAT = "tinyset.synset"
#: the format version of a set without ZCA (what older tinyset versions read)
FORMAT_VERSION = 1
#: the format version of a set that carries a ZCA transform
ZCA_FORMAT_VERSION = 2
#: the format versions this module reads
READ_VERSIONS = (FORMAT_VERSION, ZCA_FORMAT_VERSION)
#: safetensors metadata key holding the JSON header
METADATA_KEY = "tinyset"
#: allowed deviation of a soft-label row sum from 1
SOFT_LABEL_TOL = 1e-3


def _structure_problem(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> str | None:
    """Describe the first structural inconsistency between images, labels and info, or None."""
    if len(info.class_names) != info.num_classes:
        return (f"info lists {len(info.class_names)} class names for {info.num_classes} classes")
    if len(info.mean) != info.channels or len(info.std) != info.channels:
        return (f"info has {info.channels} channels but mean/std of length "
                f"{len(info.mean)}/{len(info.std)}")
    if images.dim() != 4:
        return f"images must be [N, C, H, W], got shape {tuple(images.shape)}"
    if not images.dtype.is_floating_point:
        return f"images must be floating point (normalised), got {images.dtype}"
    expected = (info.channels, *info.image_size)
    if tuple(images.shape[1:]) != expected:
        return (f"images have shape {tuple(images.shape)} but dataset {info.name!r} has images of "
                f"[C, H, W] = {list(expected)}")
    n = images.shape[0]
    if n == 0:
        return "the set has no images"
    k = info.num_classes
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            return f"hard labels must be integers, got {labels.dtype}"
        if labels.shape[0] != n:
            return f"{n} images but {labels.shape[0]} labels"
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            return (f"label values out of range: must be in [0, {k - 1}] ({k} classes), "
                    f"found values in [{lo}, {hi}]")
    elif labels.dim() == 2:
        if not labels.dtype.is_floating_point:
            return f"soft labels must be floating point, got {labels.dtype}"
        if tuple(labels.shape) != (n, k):
            return (f"soft labels must be [N, K] = [{n}, {k}] (one probability per class), "
                    f"got shape {tuple(labels.shape)}")
        if not bool(torch.isfinite(labels).all()):
            return "soft labels contain NaN or inf"
        if float(labels.min()) < -SOFT_LABEL_TOL or float(labels.max()) > 1 + SOFT_LABEL_TOL:
            return "soft label values out of range: must be probabilities in [0, 1]"
        dev = float((labels.to(torch.float64).sum(dim=1) - 1.0).abs().max())
        if dev > SOFT_LABEL_TOL:
            return f"soft label rows must sum to 1 (tolerance {SOFT_LABEL_TOL}), worst row is off by {dev:.3g}"
    else:
        return (f"labels must be hard [N] or soft [N, K], got shape {tuple(labels.shape)}")
    return None


def _finite_problem(images: torch.Tensor, lr: float | None) -> str | None:
    """Describe non-finite values in images or lr, or None."""
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        return f"images contain {bad} NaN/inf value(s)"
    if lr is not None and not math.isfinite(lr):
        return f"lr is {lr}"
    return None


@dataclass(eq=False)
class SyntheticSet(Dataset):
    """A distilled (or selected) image set: normalised images, labels, dataset info and metadata.

    Attributes:
        images: float32 ``[N, C, H, W]``, normalised with ``info.mean`` / ``info.std``.
        labels: ``int64 [N]`` hard labels or ``float32 [N, K]`` soft labels (rows sum to 1).
        info: the dataset the set stands for.
        lr: an optional learned learning rate.
        meta: JSON-serialisable metadata (``method``, ``config``, ``seed``, ``iterations``,
            ``wall_time_s``, ...). ``tinyset_version`` is filled in when saving.
        extras: named extra tensors a method stores.
        zca: the ZCA whitening the images live in (:class:`~tinyset.data.zca.Zca`), or ``None``.

    The constructor converts images to float32 and labels to int64/float32 and validates shapes,
    label ranges and finiteness (:class:`ConfigError` for inconsistent inputs,
    :class:`NumericalError` for NaN/inf). Tensors are kept on their device and not detached.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    lr: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    zca: Zca | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise ConfigError("SyntheticSet: images and labels must be torch tensors")
        if not isinstance(self.info, DatasetInfo):
            raise ConfigError(f"SyntheticSet: info must be a DatasetInfo, got {type(self.info).__name__}")
        problem = _structure_problem(self.images, self.labels, self.info)
        if problem:
            raise ConfigError(f"SyntheticSet: {problem}")
        self.images = self.images.to(torch.float32)
        self.labels = self.labels.to(torch.int64 if self.labels.dim() == 1 else torch.float32)
        if self.lr is not None:
            self.lr = float(self.lr)
        problem = _finite_problem(self.images, self.lr)
        if problem:
            raise NumericalError(f"SyntheticSet: {problem}")
        if not isinstance(self.meta, dict):
            raise ConfigError(f"SyntheticSet: meta must be a dict, got {type(self.meta).__name__}")
        for name, t in self.extras.items():
            if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
                raise ConfigError(f"SyntheticSet: extras must map non-empty names to tensors, got {name!r}")
        if self.zca is not None:
            if not isinstance(self.zca, Zca):
                raise ConfigError(f"SyntheticSet: zca must be a tinyset.data.zca.Zca, got {type(self.zca).__name__}")
            per = int(self.images[0].numel())
            if self.zca.dim != per:
                raise ConfigError(f"SyntheticSet: the ZCA transform is for images of {self.zca.dim} values, the "
                                  f"images have {per}")

    # ---------------------------------------------------------------- Dataset protocol and views
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, label)``: the label is an int64 class index for hard labels and the float32
        probability row ``[K]`` for soft labels. Images are as stored (whitened when :attr:`zca`)."""
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        lr = "" if self.lr is None else f", lr={self.lr:.4g}"
        zca = "" if self.zca is None else f", zca(eps={self.zca.eps:g})"
        return (f"SyntheticSet({self.info.name}, n={len(self)}, "
                f"image={list(self.images.shape[1:])}, labels={self.label_kind}{lr}{zca}, "
                f"method={self.meta.get('method')!r})")

    @property
    def label_kind(self) -> str:
        """``"hard"`` for ``[N]`` integer labels, ``"soft"`` for ``[N, K]`` probabilities."""
        return "hard" if self.labels.dim() == 1 else "soft"

    @property
    def is_soft(self) -> bool:
        return self.labels.dim() == 2

    def normalized_images(self) -> torch.Tensor:
        """The images in the dataset's normalised space: :attr:`images` un-whitened when the set
        carries a ZCA transform, else :attr:`images` itself. What display and export show."""
        return self.images if self.zca is None else self.zca.unwhiten(self.images.detach())

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def hard_labels(self) -> torch.Tensor:
        """``int64 [N]`` class indices (the argmax of soft labels)."""
        return self.labels if self.labels.dim() == 1 else self.labels.argmax(dim=1)

    def class_counts(self) -> list[int]:
        """Number of images of every class (by :meth:`hard_labels`)."""
        return torch.bincount(self.hard_labels().cpu(), minlength=self.num_classes).tolist()

    @property
    def ipc(self) -> int | None:
        """Images per class: the per-class count when every class has the same number of images
        (counting soft labels by their argmax), else ``None``."""
        counts = set(self.class_counts())
        return counts.pop() if len(counts) == 1 else None

    def class_images(self, c: int) -> torch.Tensor:
        """The images of class ``c`` (by :meth:`hard_labels`), in set order: ``[n_c, C, H, W]``."""
        if not 0 <= int(c) < self.num_classes:
            raise ConfigError(f"class index {c} out of range for {self.num_classes} classes")
        return self.images[self.hard_labels() == int(c)]

    def to(self, device: str | torch.device) -> "SyntheticSet":
        """A copy with images and labels on ``device`` (metadata is copied)."""
        return SyntheticSet(self.images.to(device), self.labels.to(device), self.info, self.lr,
                            copy.deepcopy(self.meta), {k: v.to(device) for k, v in self.extras.items()}, self.zca)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_real(cls, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                  meta: Mapping[str, Any] | None = None, lr: float | None = None) -> "SyntheticSet":
        """Wrap real images (e.g. a selected coreset) as a synthetic set.

        ``images`` may be ``uint8`` pixels (normalised here with ``info``) or an already
        normalised floating-point tensor (used as is). ``labels`` are hard ``[N]`` or soft ``[N, K]``.
        """
        if images.dtype == torch.uint8:
            images = info.normalize(images)
        elif not images.dtype.is_floating_point:
            raise ConfigError(f"from_real: images must be uint8 pixels or normalised floats, got {images.dtype}")
        return cls(images.detach().clone(), labels.detach().clone(), info, lr, dict(meta or {}))

    # ---------------------------------------------------------------- serialisation
    def header(self) -> dict[str, Any]:
        """The JSON header stored in the file (with ``tinyset_version`` filled in)."""
        from tinyset import __version__

        meta = copy.deepcopy(self.meta)
        meta["tinyset_version"] = __version__
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if self.zca is None else ZCA_FORMAT_VERSION,
            "info": self.info.to_dict(),
            "meta": meta,
            "label_kind": self.label_kind,
        }
        if self.zca is not None:
            header["zca"] = self.zca.describe()
        return header

    def header_json(self) -> str:
        """:meth:`header` as a JSON string; :class:`ConfigError` if meta is not serialisable."""
        try:
            return json.dumps(self.header(), default=json_default)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SyntheticSet meta is not JSON-serialisable: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set atomically to ``path`` (a ``.safetensors`` file). Returns the path.

        ``meta["tinyset_version"]`` is set to the running tinyset version in the file (``self.meta``
        itself is not modified).
        """
        from safetensors.torch import save_file

        path = Path(path)
        header = self.header_json()
        tensors = {
            "images": self.images.detach().to("cpu", torch.float32).contiguous(),
            "labels": self.labels.detach().cpu().contiguous(),
        }
        if self.lr is not None:
            tensors["lr"] = torch.tensor(self.lr, dtype=torch.float64)
        for name, t in self.extras.items():
            tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
        if self.zca is not None:
            tensors.update({f"zca.{k}": t for k, t in self.zca.state_dict().items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: header})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "SyntheticSet":
        """Read and validate a set written by :meth:`save`; never unpickles anything.

        Raises :class:`ArtifactError` (message starts with the file name) when the file is missing,
        not a (complete) safetensors file, lacks the ``tinyset`` header, has an unsupported format
        version, misses a tensor, or holds inconsistent shapes, out-of-range labels or NaN/inf.
        """
        from safetensors import safe_open

        path = Path(path)

        def fail(problem: str) -> ArtifactError:
            return ArtifactError(f"{path}: {problem}")

        if not path.exists():
            raise fail("no such file")
        if not path.is_file():
            raise fail("not a regular file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                keys = set(f.keys())
                if METADATA_KEY not in metadata:
                    raise fail(f"not a tinyset synthetic set (safetensors metadata has no "
                               f"{METADATA_KEY!r} entry)")
                header = _parse_header(metadata[METADATA_KEY], fail)
                for name in ("images", "labels"):
                    if name not in keys:
                        raise fail(f"missing tensor {name!r} (file has {sorted(keys)})")
                images = f.get_tensor("images").clone()
                labels = f.get_tensor("labels").clone()
                lr_t = f.get_tensor("lr").clone() if "lr" in keys else None
                extras = {k[len("extra."):]: f.get_tensor(k).clone() for k in sorted(keys) if k.startswith("extra.")}
                zca_t = {k[len("zca."):]: f.get_tensor(k) for k in sorted(keys) if k.startswith("zca.")}
        except ArtifactError:
            raise
        except PermissionError as exc:
            raise fail(f"cannot be read ({exc.strerror or 'permission denied'})") from None
        except Exception as exc:  # SafetensorError, OSError, ...: not a readable safetensors file
            raise fail(f"not a valid safetensors file ({type(exc).__name__}: {exc})") from None

        try:
            info = DatasetInfo.from_dict(header["info"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise fail(f"invalid dataset info in header ({type(exc).__name__}: {exc})") from None
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise fail(f"header 'meta' must be a JSON object, got {type(meta).__name__}")
        kind = header.get("label_kind")
        if kind not in ("hard", "soft"):
            raise fail(f"header 'label_kind' must be 'hard' or 'soft', got {kind!r}")
        if (kind == "hard") != (labels.dim() == 1):
            raise fail(f"header says {kind} labels but the labels tensor has shape {tuple(labels.shape)}")
        problem = _structure_problem(images, labels, info)
        if problem:
            raise fail(problem)
        lr: float | None = None
        if lr_t is not None:
            if lr_t.numel() != 1 or lr_t.dim() > 1 or not lr_t.dtype.is_floating_point:
                raise fail(f"tensor 'lr' must be a single float, got {lr_t.dtype} {tuple(lr_t.shape)}")
            lr = float(lr_t.reshape(()).item())
        problem = _finite_problem(images, lr)
        if problem:
            raise fail(problem)
        zca = _read_zca(header, zca_t, int(images[0].numel()), path)
        synset = cls(images, labels, info, lr, meta, extras, zca)
        return synset.to(map_location) if torch.device(map_location).type != "cpu" else synset


def _parse_header(text: str, fail: Callable[[str], ArtifactError]) -> dict[str, Any]:
    """Parse and check the JSON header's identity fields; ``fail(msg)`` builds the error."""
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise fail(f"the {METADATA_KEY!r} metadata must be a JSON object")
    if header.get("format") != FORMAT:
        raise fail(f"wrong format {header.get('format')!r} (expected {FORMAT!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        hint = " (written by a newer tinyset?)" if isinstance(version, int) and version > max(READ_VERSIONS) else ""
        raise fail(f"unsupported format_version {version!r}; this tinyset reads versions "
                   f"{', '.join(map(str, READ_VERSIONS))}{hint}")
    if "info" not in header:
        raise fail("header has no 'info'")
    return header


def _read_zca(header: dict[str, Any], tensors: dict[str, torch.Tensor], dim: int, path: Path) -> Zca | None:
    """The ZCA transform a file carries (header field ``zca`` and tensors ``zca.*``), checked, or None."""
    desc = header.get("zca")
    if desc is None and not tensors:
        return None
    if not isinstance(desc, dict):
        raise ArtifactError(f"{path}: has tensors {', '.join('zca.' + k for k in tensors)} but no 'zca' header "
                            f"object describing them" if desc is None else
                            f"{path}: header 'zca' must be a JSON object, got {type(desc).__name__}")
    if header.get("format_version") != ZCA_FORMAT_VERSION:
        raise ArtifactError(f"{path}: carries a ZCA transform but says format_version "
                            f"{header.get('format_version')!r}; sets with ZCA are version {ZCA_FORMAT_VERSION}")
    unknown = sorted(set(tensors) - set(ZCA_KEYS))
    if unknown:
        raise ArtifactError(f"{path}: unknown ZCA tensor(s) {', '.join('zca.' + k for k in unknown)}")
    n = desc.get("num_images", 0)
    return Zca.from_state_dict(tensors, desc.get("eps"), n if isinstance(n, int) else 0, dim, where=str(path))


__all__ = ["SyntheticSet", "FORMAT", "FORMAT_VERSION", "ZCA_FORMAT_VERSION", "READ_VERSIONS", "METADATA_KEY",
           "SOFT_LABEL_TOL"]
