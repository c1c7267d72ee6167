"""Upstream files: where they come from, fetching and verifying them, and checks shared by readers.

Every downloadable dataset lists its :class:`Resource` s (URL, file name, md5) in
:data:`RESOURCES`. :func:`download_file` streams a URL to a temporary file beside the destination,
checks its md5 and only then renames it into place, so an interrupted or corrupt download never
leaves a half-written file under the real name. :func:`extract_tar` unpacks an archive, refusing
members that would land outside the destination (absolute paths, ``..``, links, device files).

The small helpers at the end (:func:`missing_file_error`, :func:`check_split`,
:func:`check_labels`) are shared by all the readers so that every reader reports problems the same
way: the file, what was found, and what was expected.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from tinyset.errors import ConfigError, DataError
from tinyset.files import atomic_path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One upstream file: the name it is saved under, where to fetch it, and its md5."""

    filename: str
    url: str
    md5: str


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _idx_resources(base_url: str, md5s: Sequence[str]) -> tuple[Resource, ...]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return tuple(Resource(n, base_url + n, m) for n, m in zip(names, md5s))


#: Upstream files of every downloadable dataset, keyed by registry name. The readers look their
#: entry up when a spec is created, so tests may point an entry at local ``file://`` URLs.
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": _idx_resources(_MNIST_URL, (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion-mnist": _idx_resources(_FASHION_URL, (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
    "cifar10": (Resource("cifar-10-python.tar.gz",
                         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (Resource("cifar-100-python.tar.gz",
                          "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          "eb9058c3a382ffc7106e4002c42a8d85"),),
    "svhn": (Resource("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                      "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Resource("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                      "eb5a983be6a315427106f1b164d9cef3")),
}


def md5sum(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read to check its md5 ({exc})") from None
    return h.hexdigest()


def verify_md5(path: str | Path, md5: str) -> bool:
    """True when ``path`` exists and its md5 equals ``md5`` (case-insensitive)."""
    return Path(path).is_file() and md5sum(path) == md5.lower()


def download_file(url: str, dest: str | Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically; with ``md5``, a mismatch raises :class:`DataError`.

    The data goes to a temporary file beside ``dest`` and is renamed over ``dest`` only once it is
    complete and its checksum is right; on any failure the temporary file is deleted and ``dest``
    is left as it was. Any URL scheme urllib knows works, including ``file://``.
    """
    dest = Path(dest)
    log.info("downloading %s -> %s", url, dest)
    with atomic_path(dest) as tmp:
        h = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(f"could not download {url} to {dest}: {exc}") from None
        got = h.hexdigest()
        if md5 is not None and got != md5.lower():
            raise DataError(f"bad checksum for {dest.name} downloaded from {url}: md5 is {got}, "
                            f"expected {md5.lower()}; the download was discarded (a changed "
                            f"mirror or a corrupted transfer), try again")
    return dest


def fetch_resources(resources: Iterable[Resource], dest_dir: str | Path) -> list[Path]:
    """Download every resource into ``dest_dir`` unless a file with the right md5 is already there."""
    dest_dir = Path(dest_dir)
    out = []
    for r in resources:
        dest = dest_dir / r.filename
        if not verify_md5(dest, r.md5):
            download_file(r.url, dest, r.md5)
        out.append(dest)
    return out


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path, or a :class:`DataError` if extracting it would be unsafe."""
    name = PurePosixPath(member.name.replace("\\", "/"))
    if not name.parts or name.is_absolute() or ":" in name.parts[0]:
        raise DataError(f"{archive}: refusing archive member {member.name!r}: absolute or empty path")
    if ".." in name.parts:
        raise DataError(f"{archive}: refusing archive member {member.name!r}: it contains '..'")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing archive member {member.name!r}: only regular files and "
                        f"folders are extracted, not links or special files")
    return name


def extract_tar(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a (possibly compressed) tar archive into ``dest``; return the files written.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    symbolic/hard links and special files are refused with a :class:`DataError`.
    """
    archive, dest = Path(archive), Path(dest)
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            paths = [_safe_member_path(m, archive) for m in members]
            for member, rel in zip(members, paths):
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise DataError(f"{archive}: member {member.name!r} has no data")
                with src, atomic_path(target) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                written.append(target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{archive}: not a valid tar archive, or truncated ({exc}); expected the "
                        f"upstream .tar.gz, delete it and download it again") from None
    except OSError as exc:
        raise DataError(f"{archive}: cannot extract into {dest} ({exc})") from None
    return written


# ---------------------------------------------------------------- shared by the readers


def missing_file_error(dataset: str, path: Path, url: str | None,
                       alternatives: Sequence[str] = ()) -> DataError:
    """The error for a required upstream file that is not on disk.

    Names the file and the full path it was expected at, and says that ``--download`` fetches it
    when the dataset has a download ``url``.
    """
    names = " or ".join([path.name, *alternatives])
    msg = f"{dataset}: file {names} not found; expected it at {path.resolve()}"
    if url:
        msg += f". Pass --download (the download argument in Python) to fetch it from {url}"
    else:
        msg += ". This dataset cannot be downloaded automatically; put the file there yourself"
    return DataError(msg)


def check_split(split: str) -> str:
    """``split`` itself if it is ``train`` or ``test``; else a :class:`ConfigError`."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    return split


def check_labels(labels: np.ndarray, num_classes: int, source: str | Path) -> np.ndarray:
    """``labels`` as a 1-D int64 array after checking they are integers in ``[0, num_classes)``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{source}: labels have shape {labels.shape}, expected a flat list")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating)
                and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
            raise DataError(f"{source}: labels are of type {labels.dtype}, expected integers")
    labels = labels.astype(np.int64)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(f"{source}: label {bad} is out of range; expected labels in "
                            f"0..{num_classes - 1}")
    return labels
