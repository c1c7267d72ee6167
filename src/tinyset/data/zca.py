"""ZCA whitening of normalised images (as in MTT, Cazenavette et al. 2022, and KIP before it).

ZCA ("zero-phase component analysis", Bell & Sejnowski 1997) decorrelates the pixels of an image
while keeping it as close as possible to the original: with ``m`` the mean of the flattened
training images and ``C = U diag(lambda) U^T`` their covariance (unbiased, ``N - 1``),

    whiten(x)   = W (x - m),      W     = U diag(1 / sqrt(lambda + eps)) U^T
    unwhiten(y) = W^-1 y + m,     W^-1  = U diag(sqrt(lambda + eps)) U^T

``eps`` regularises the directions of tiny variance (the trajectory-matching reference uses 0.1 on
images already normalised with the dataset's mean and std, as here). The whitened training images
have covariance ``U diag(lambda / (lambda + eps)) U^T``: the identity on every direction whose
variance is well above ``eps``.

The fit reads the images in chunks (``chunk_size`` rows at a time) and accumulates the mean and
the covariance in float64 on the CPU, so MNIST's 60000 x 784 training split never exists as one
float64 matrix; the eigendecomposition is ``torch.linalg.eigh`` in float64. The same images and
chunk size always give the same transform (no random draw). The transform is kept and applied
in float32, on the device of the images it is applied to.

A :class:`Zca` is stored with a synthetic set (tensors ``zca.mean``, ``zca.transform``,
``zca.inverse``; see :mod:`tinyset.synset`) and with an expert set (``zca.safetensors``), and read
back from plain tensors (:meth:`Zca.from_state_dict`), never by unpickling.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from tinyset.errors import ArtifactError, ConfigError

#: regularisation of the eigenvalues (the MTT reference's ``ZCAWhitening(eps=0.1)``)
ZCA_EPS = 0.1
#: rows read (fit) or transformed (apply) at a time
ZCA_CHUNK = 4096
#: ``format`` of a stand-alone ZCA file (:meth:`Zca.save`)
ZCA_FORMAT = "tinyset.zca"
#: the tensors of :meth:`Zca.state_dict`
STATE_KEYS = ("mean", "transform", "inverse")


def _rows(images: Any) -> tuple[int, int]:
    """(number of images, values per image) of a ``[N, ...]`` tensor or an ``ImageDataset``."""
    from tinyset.data.base import ImageDataset

    x = images.images if isinstance(images, ImageDataset) else images
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ConfigError(f"ZCA: expected images [N, C, H, W] (a tensor or an ImageDataset), got "
                          f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    return int(x.shape[0]), int(torch.Size(x.shape[1:]).numel())


def _chunk64(images: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as float64 ``[n, D]`` on the CPU (uint8 datasets normalised here)."""
    from tinyset.data.base import ImageDataset

    if isinstance(images, ImageDataset):
        x = images.info.normalize(images.images[start:stop], dtype=torch.float64)
    else:
        x = images[start:stop]
        if not x.dtype.is_floating_point:
            raise ConfigError(f"ZCA: images must be normalised floats (or an ImageDataset), got {x.dtype}")
    return x.detach().to("cpu", torch.float64).reshape(stop - start, -1)


@dataclass(frozen=True, eq=False)
class Zca:
    """A fitted ZCA whitening transform (see the module docstring).

    Attributes:
        mean: float32 ``[D]``, the mean of the flattened training images.
        transform: float32 ``[D, D]``, symmetric: ``U diag(1/sqrt(lambda+eps)) U^T``.
        inverse: float32 ``[D, D]``, symmetric: ``U diag(sqrt(lambda+eps)) U^T``.
        eps: the regularisation.
        num_images: how many images it was fitted on (0 when unknown).
    """

    mean: torch.Tensor
    transform: torch.Tensor
    inverse: torch.Tensor
    eps: float = ZCA_EPS
    num_images: int = 0

    @property
    def dim(self) -> int:
        """Values per image (``C * H * W``)."""
        return int(self.mean.numel())

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, images: Any, eps: float = ZCA_EPS, chunk_size: int = ZCA_CHUNK) -> "Zca":
        """Fit on ``images``: normalised float ``[N, C, H, W]`` (any device), or an
        :class:`~tinyset.data.base.ImageDataset` (uint8, normalised chunk by chunk with its info).

        Two passes over the chunks (mean, then the centred covariance), float64 throughout, then
        ``torch.linalg.eigh``. Raises :class:`ConfigError` for fewer than two images, a bad ``eps``
        or ``chunk_size``.
        """
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < float(eps) < float("inf")):
            raise ConfigError(f"ZCA eps must be a finite number > 0, got {eps!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ConfigError(f"ZCA chunk_size must be an integer >= 1, got {chunk_size!r}")
        n, d = _rows(images)
        if n < 2:
            raise ConfigError(f"ZCA needs at least 2 images to estimate a covariance, got {n}")
        spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        total = torch.zeros(d, dtype=torch.float64)
        for s, e in spans:
            total += _chunk64(images, s, e).sum(0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64)
        for s, e in spans:
            centred = _chunk64(images, s, e) - mean
            cov.addmm_(centred.T, centred)
        cov /= n - 1
        cov = (cov + cov.T) / 2  # exactly symmetric for eigh
        if not bool(torch.isfinite(cov).all()):
            raise ConfigError("ZCA: the images contain NaN or inf")
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0.0) + float(eps)  # rounding can leave tiny negative eigenvalues
        transform = (u * lam.rsqrt()) @ u.T
        inverse = (u * lam.sqrt()) @ u.T
        return cls(mean.float(), ((transform + transform.T) / 2).float(), ((inverse + inverse.T) / 2).float(),
                   float(eps), n)

    # ------------------------------------------------------------------ apply
    def _apply(self, x: torch.Tensor, matrix: torch.Tensor, before: torch.Tensor | None,
               after: torch.Tensor | None, inplace: bool, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ConfigError(f"ZCA {what}: expected images [N, C, H, W], got {type(x).__name__} "
                              f"{list(getattr(x, 'shape', []))}")
        n = int(x.shape[0])
        per = int(torch.Size(x.shape[1:]).numel())
        if per != self.dim:
            raise ConfigError(f"ZCA {what}: images of shape {list(x.shape[1:])} have {per} values, the transform "
                              f"was fitted on images of {self.dim}")
        if not x.dtype.is_floating_point:
            raise ConfigError(f"ZCA {what}: images must be floating point (normalised), got {x.dtype}")
        m = matrix.to(x.device, torch.float32)
        b = None if before is None else before.to(x.device, torch.float32)
        a = None if after is None else after.to(x.device, torch.float32)

        def one(flat: torch.Tensor) -> torch.Tensor:
            flat = flat.float()
            if b is not None:
                flat = flat - b
            y = flat @ m  # the matrices are symmetric: row vectors times M is M times column vectors
            return y + a if a is not None else y

        if inplace:
            if x.requires_grad:
                raise ConfigError(f"ZCA {what}: cannot transform a tensor that requires grad in place")
            flat = x.view(n, -1)
            for s in range(0, n, ZCA_CHUNK):
                flat[s:s + ZCA_CHUNK] = one(flat[s:s + ZCA_CHUNK]).to(x.dtype)
            return x
        flat = x.reshape(n, -1)
        if n <= ZCA_CHUNK or flat.requires_grad:
            return one(flat).reshape(x.shape)
        out = torch.empty(n, self.dim, dtype=torch.float32, device=x.device)
        for s in range(0, n, ZCA_CHUNK):
            out[s:s + ZCA_CHUNK] = one(flat[s:s + ZCA_CHUNK])
        return out.reshape(x.shape)

    def whiten(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``W (x - m)`` for every image of ``x`` (normalised float ``[N, C, H, W]``), in float32 on
        ``x``'s device; ``inplace=True`` overwrites ``x`` chunk by chunk (no second copy)."""
        return self._apply(x, self.transform, self.mean, None, inplace, "whiten")

    def unwhiten(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``W^-1 y + m``: whitened images back to the dataset's normalised space."""
        return self._apply(x, self.inverse, None, self.mean, inplace, "unwhiten")

    def to(self, device: str | torch.device) -> "Zca":
        return Zca(self.mean.to(device), self.transform.to(device), self.inverse.to(device), self.eps,
                   self.num_images)

    # ------------------------------------------------------------------ storage
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"mean", "transform", "inverse"}``: contiguous float32 CPU tensors."""
        return {k: getattr(self, k).detach().to("cpu", torch.float32).contiguous() for k in STATE_KEYS}

    def describe(self) -> dict[str, Any]:
        """What a file header records next to the tensors."""
        return {"eps": self.eps, "num_images": self.num_images, "dim": self.dim}

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], eps: float = ZCA_EPS, num_images: int = 0,
                        dim: int | None = None, where: str = "ZCA") -> "Zca":
        """A :class:`Zca` from :meth:`state_dict` tensors, checked: the three tensors present, float,
        of shapes ``[D]``, ``[D, D]``, ``[D, D]`` (``D == dim`` when given), finite, and ``inverse``
        undoing ``transform`` (on a fixed probe vector, to 1e-3). Problems raise
        :class:`~tinyset.errors.ArtifactError` starting with ``where``."""
        def fail(problem: str) -> ArtifactError:
            return ArtifactError(f"{where}: {problem}")

        missing = [k for k in STATE_KEYS if k not in tensors]
        if missing:
            raise fail(f"ZCA tensor(s) {', '.join(missing)} missing (expected {', '.join(STATE_KEYS)})")
        mean, transform, inverse = (tensors[k] for k in STATE_KEYS)
        for k, t in zip(STATE_KEYS, (mean, transform, inverse)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise fail(f"ZCA tensor {k!r} must be floating point, got {getattr(t, 'dtype', type(t).__name__)}")
        d = int(mean.numel())
        if mean.dim() != 1 or tuple(transform.shape) != (d, d) or tuple(inverse.shape) != (d, d):
            raise fail(f"ZCA tensors must be mean [D], transform [D, D], inverse [D, D]; got "
                       f"{list(mean.shape)}, {list(transform.shape)}, {list(inverse.shape)}")
        if dim is not None and d != dim:
            raise fail(f"ZCA transform is for images of {d} values, the images have {dim}")
        if not all(bool(torch.isfinite(t).all()) for t in (mean, transform, inverse)):
            raise fail("ZCA tensors contain NaN or inf")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < float(eps) < float("inf")):
            raise fail(f"ZCA eps must be a finite number > 0, got {eps!r}")
        probe = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
        back = inverse.double() @ (transform.double() @ probe)
        err = float((back - probe).norm() / probe.norm())
        if not err < 1e-3:
            raise fail(f"ZCA inverse does not undo the transform (relative error {err:.3g} on a probe vector)")
        return cls(mean.float().clone(), transform.float().clone(), inverse.float().clone(), float(eps),
                   int(num_images))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the transform alone as a ``.safetensors`` file (atomically); see :meth:`load`."""
        from safetensors.torch import save_file

        from tinyset.files import atomic_path

        path = Path(path)
        header = {"format": ZCA_FORMAT, "format_version": 1, **self.describe()}
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata={"tinyset": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None) -> "Zca":
        """Read a file written by :meth:`save` (safetensors only, checked as :meth:`from_state_dict`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file; expected a ZCA transform ({ZCA_FORMAT})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {}).get("tinyset", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ArtifactError(f"{path}: not a readable ZCA file ({type(exc).__name__}: {exc})") from None
        if not isinstance(header, dict) or header.get("format") != ZCA_FORMAT or header.get("format_version") != 1:
            raise ArtifactError(f"{path}: not a tinyset ZCA file (expected format {ZCA_FORMAT!r} version 1)")
        return cls.from_state_dict(tensors, header.get("eps"), int(header.get("num_images") or 0), dim,
                                   where=str(path))


def fit_zca(images: Any, eps: float = ZCA_EPS, chunk_size: int = ZCA_CHUNK) -> Zca:
    """:meth:`Zca.fit` as a function."""
    return Zca.fit(images, eps, chunk_size)


__all__ = ["Zca", "fit_zca", "ZCA_EPS", "ZCA_CHUNK", "ZCA_FORMAT"]
