"""Dataset readers: tiny files in each upstream format are written and read back exactly."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import tinyset.data as data
from tinyset.data import DATASETS, ImageFolderSpec, get_spec, load_dataset
from tinyset.data import download as dl
from tinyset.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from tinyset.data.digits import DIGITS_INFO, digits_arrays, split_indices
from tinyset.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ writers


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.tobytes()


def write(path: Path, content: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content, mtime=0)
    path.write_bytes(content)
    return path


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def make_idx(root: Path, folder: str = "MNIST", gz: bool = False,
             sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four idx files; return {split: (images [N,28,28], labels [N])}."""
    out = {}
    for split, n in (sizes or {"train": 7, "test": 3}).items():
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n, dtype=np.uint8)
        img_name, lab_name = IDX_NAMES[split]
        write(root / folder / "raw" / img_name, idx_bytes(x), gz)
        write(root / folder / "raw" / lab_name, idx_bytes(y), gz)
        out[split] = (x, y)
    return out


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 with ``bytes`` written as Python 2 wrote ``str`` (BINSTRING opcodes).

    That is how the official CIFAR files were made (cPickle, Python 2), and why they are read with
    ``encoding='bytes'``; Python 3's own protocol-2 encoding of bytes needs ``_codecs.encode``.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_pickle(path: Path, obj: object, numpy1: bool = False) -> Path:
    """Write ``obj`` like the official CIFAR files; ``numpy1`` names numpy 1's module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    content = buf.getvalue()
    if numpy1:
        content = content.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(content)
    return path


def cifar_batch(n: int, label_key: bytes, num_classes: int) -> tuple[dict, np.ndarray, list[int]]:
    x = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = [int(v) for v in RNG.integers(0, num_classes, n)]
    return {b"batch_label": b"test batch", b"data": x, label_key: y,
            b"filenames": [b"f%d.png" % i for i in range(n)]}, x, y


def make_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i, n in enumerate((2, 3, 1, 2, 2), start=1):
        d, x, y = cifar_batch(n, b"labels", 10)
        dump_pickle(folder / f"data_batch_{i}", d)
        xs.append(x)
        ys += y
    d, xt, yt = cifar_batch(4, b"labels", 10)
    dump_pickle(folder / "test_batch", d)
    dump_pickle(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"num_vis": 3072,
                                          b"label_names": [n.encode() for n in CIFAR10_CLASSES]})
    return {"train": (np.concatenate(xs), ys), "test": (xt, yt)}


def make_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    out = {}
    for split, n in (("train", 6), ("test", 3)):
        d, x, y = cifar_batch(n, b"fine_labels", 100)
        d[b"coarse_labels"] = [v // 5 for v in y]
        dump_pickle(folder / split, d)
        out[split] = (x, y)
    dump_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
                                  b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return out


def make_svhn(root: Path, split: str = "train", n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = RNG.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


def save_image(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- registry


def test_registry_names_and_specs() -> None:
    assert set(DATASETS.names()) >= {"mnist", "fashion-mnist", "svhn", "cifar10", "cifar100",
                                     "digits"}
    expected = {"mnist": (1, (28, 28), 10), "fashion-mnist": (1, (28, 28), 10),
                "svhn": (3, (32, 32), 10), "cifar10": (3, (32, 32), 10),
                "cifar100": (3, (32, 32), 100), "digits": (1, (8, 8), 10)}
    for name, (c, size, k) in expected.items():
        spec = get_spec(name)
        info = spec.info
        assert info.name == name
        assert (info.channels, info.image_size, info.num_classes) == (c, size, k)
        assert len(info.class_names) == k == len(set(info.class_names))
        assert len(info.mean) == len(info.std) == c
        assert isinstance(spec.files(Path("r")), list)
    assert get_spec("mnist").info.mean == (0.1307,) and get_spec("mnist").info.std == (0.3081,)
    assert get_spec("fashion_mnist").info.mean == (0.2861,)
    assert get_spec("fashion-mnist").info.class_names[0] == "T-shirt/top"
    assert get_spec("cifar10").info.std == (0.2023, 0.1994, 0.2010)
    assert get_spec("cifar100").info.mean == (0.5071, 0.4866, 0.4409)
    assert get_spec("svhn").info.mean == (0.4377, 0.4438, 0.4728)
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES) and len(CIFAR100_CLASSES) == 100


def test_package_exports() -> None:
    for name in ("DatasetInfo", "ImageDataset", "RealPool", "DATASETS", "load_dataset", "get_spec",
                 "default_data_root", "split_validation", "check_ipc"):
        assert hasattr(data, name), name


def test_bad_split_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError):
        get_spec("mnist").load("validation", tmp_path)


def test_files_lists_upstream_paths(tmp_path: Path) -> None:
    mnist_files = get_spec("mnist").files(tmp_path)
    assert tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz" in mnist_files
    assert len(mnist_files) == 4
    assert tmp_path / "cifar-10-batches-py" / "batches.meta" in get_spec("cifar10").files(tmp_path)
    assert tmp_path / "cifar-100-python" / "meta" in get_spec("cifar100").files(tmp_path)
    assert get_spec("svhn").files(tmp_path) == [tmp_path / "train_32x32.mat",
                                                tmp_path / "test_32x32.mat"]
    assert get_spec("digits").files(tmp_path) == []


# ----------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_roundtrip(tmp_path: Path, gz: bool, name: str, folder: str) -> None:
    written = make_idx(tmp_path, folder, gz)
    for split, (x, y) in written.items():
        ds = load_dataset(name, split, tmp_path)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(y), 1, 28, 28)
        assert np.array_equal(ds.images[:, 0].numpy(), x)
        assert ds.labels.tolist() == y.tolist()
        assert ds.split == split and ds.info.name == name
        assert ds.source == str(tmp_path / folder / "raw")
    suffix = ".gz" if gz else ""
    assert get_spec(name).files(tmp_path)[0] == (tmp_path / folder / "raw" /
                                                 f"train-images-idx3-ubyte{suffix}")


def test_idx_plain_preferred_over_gz(tmp_path: Path) -> None:
    plain = make_idx(tmp_path, gz=False)
    make_idx(tmp_path, gz=True)  # different random content
    ds = load_dataset("mnist", "train", tmp_path)
    assert np.array_equal(ds.images[:, 0].numpy(), plain["train"][0])


def test_idx_missing_file(tmp_path: Path) -> None:
    make_idx(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    load_dataset("mnist", "train", tmp_path)  # the train split is complete
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "test", tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert str((tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").resolve()) in msg
    assert "--download" in msg and "ossci-datasets" in msg


RAW = Path("MNIST") / "raw"


def _corrupt_idx(root: Path, name: str, content: bytes) -> Path:
    make_idx(root)
    return write(root / RAW / name, content)


@pytest.mark.parametrize("case,name,content,needle", [
    ("magic", "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28)), magic=2049), "magic"),
    ("magic-labels", "train-labels-idx1-ubyte", idx_bytes(np.zeros((2, 28, 28))), "magic"),
    ("truncated", "train-images-idx3-ubyte", idx_bytes(np.zeros((7, 28, 28)))[:-10], "truncated"),
    ("trailing", "train-labels-idx1-ubyte", idx_bytes(np.zeros(7)) + b"xx", "trailing"),
    ("header", "train-images-idx3-ubyte", b"\x00\x00\x08", "header"),
    ("count", "train-labels-idx1-ubyte", idx_bytes(np.zeros(6)), "6 labels"),
    ("range", "train-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 2, 3, 10, 5, 6])),
     "label 10"),
    ("size", "train-images-idx3-ubyte", idx_bytes(np.zeros((7, 20, 20))), "20x20"),
])
def test_idx_errors(tmp_path: Path, case: str, name: str, content: bytes, needle: str) -> None:
    path = _corrupt_idx(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "train", tmp_path)
    assert path.name in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("content", [b"this is not gzip data at all",
                                     gzip.compress(idx_bytes(np.zeros((7, 28, 28))), mtime=0)[:-30]])
def test_idx_corrupt_gzip(tmp_path: Path, content: bytes) -> None:
    make_idx(tmp_path, gz=True)
    path = write(tmp_path / RAW / "train-images-idx3-ubyte.gz", content)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "train", tmp_path)
    assert path.name in str(e.value) and "gzip" in str(e.value)


# --------------------------------------------------------------------------------------- cifar


def test_cifar10_roundtrip(tmp_path: Path) -> None:
    written = make_cifar10(tmp_path)
    for split, (x, y) in written.items():
        ds = load_dataset("cifar10", split, tmp_path)
        assert ds.images.shape == (len(y), 3, 32, 32) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.reshape(len(y), -1).numpy(), x)
        # channel planes: the first 1024 values are red, row-major
        assert np.array_equal(ds.images[0, 0].numpy(), x[0, :1024].reshape(32, 32))
        assert np.array_equal(ds.images[0, 2, 1].numpy(), x[0, 2048 + 32:2048 + 64])
        assert ds.labels.tolist() == y
        assert ds.info.class_names == CIFAR10_CLASSES
        assert ds.source == str(tmp_path / "cifar-10-batches-py")


def test_cifar100_roundtrip(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    for split, (x, y) in written.items():
        ds = load_dataset("cifar100", split, tmp_path)
        assert np.array_equal(ds.images.reshape(len(y), -1).numpy(), x)
        assert ds.labels.tolist() == y
        assert ds.info.num_classes == 100 and ds.info.class_names[4] == "beaver"


def test_cifar_numpy1_pickle(tmp_path: Path) -> None:
    """Files pickled by numpy 1 name ``numpy.core.multiarray._reconstruct``; both names load."""
    make_cifar100(tmp_path)
    x = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    path = dump_pickle(tmp_path / "cifar-100-python" / "test",
                       {b"data": x, b"fine_labels": [5, 7]}, numpy1=True)
    assert b"cnumpy.core.multiarray\n_reconstruct" in path.read_bytes()
    ds = load_dataset("cifar100", "test", tmp_path)
    assert np.array_equal(ds.images.reshape(2, -1).numpy(), x) and ds.labels.tolist() == [5, 7]


def test_cifar_str_keys_accepted(tmp_path: Path) -> None:
    """Pickles re-saved by Python 3 have str keys; they read the same."""
    make_cifar100(tmp_path)
    x = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    dump_pickle(tmp_path / "cifar-100-python" / "test", {"data": x, "fine_labels": [3, 99]})
    ds = load_dataset("cifar100", "test", tmp_path)
    assert ds.labels.tolist() == [3, 99]


@pytest.mark.parametrize("name,missing", [("cifar10", "batches.meta"), ("cifar10", "data_batch_3"),
                                          ("cifar100", "meta"), ("cifar100", "train")])
def test_cifar_missing_file(tmp_path: Path, name: str, missing: str) -> None:
    (make_cifar10 if name == "cifar10" else make_cifar100)(tmp_path)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    (tmp_path / folder / missing).unlink()
    with pytest.raises(DataError) as e:
        load_dataset(name, "train", tmp_path)
    msg = str(e.value)
    assert missing in msg and str((tmp_path / folder / missing).resolve()) in msg
    assert "--download" in msg and "cs.toronto.edu" in msg


def _batch_with(**changes: object) -> dict:
    d, _, _ = cifar_batch(3, b"labels", 10)
    for k, v in changes.items():
        if v is None:
            del d[k.encode()]
        else:
            d[k.encode()] = v
    return d


@pytest.mark.parametrize("batch,needle", [
    (_batch_with(labels=None), "'labels'"),
    (_batch_with(data=None), "'data'"),
    (_batch_with(data=np.zeros((3, 3000), np.uint8)), "(3, 3000)"),
    (_batch_with(data=np.zeros((3, 3072), np.float32)), "float32"),
    (_batch_with(data=b"\x00" * 3072 * 3), "bytes"),
    (_batch_with(labels=[1, 2]), "2 labels"),
    (_batch_with(labels=[1, 2, 10]), "label 10"),
    (_batch_with(labels=[1, -1, 2]), "label -1"),
    (_batch_with(labels=["a", "b", "c"]), "integers"),
    ([1, 2, 3], "list"),
])
def test_cifar_batch_errors(tmp_path: Path, batch: object, needle: str) -> None:
    make_cifar10(tmp_path)
    path = dump_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", "test", tmp_path)
    assert path.name in str(e.value) and needle in str(e.value)


def test_cifar100_meta_errors(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    meta = tmp_path / "cifar-100-python" / "meta"
    dump_pickle(meta, {b"coarse_label_names": []})
    with pytest.raises(DataError, match="fine_label_names") as e:
        load_dataset("cifar100", "train", tmp_path)
    assert str(meta) in str(e.value)
    names = [n.encode() for n in CIFAR100_CLASSES]
    names[0], names[1] = names[1], names[0]
    dump_pickle(meta, {b"fine_label_names": names})
    with pytest.raises(DataError, match="name 0 is 'aquarium_fish'"):
        load_dataset("cifar100", "train", tmp_path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["evil", "object", "garbage", "empty"])
def test_cifar_pickle_restricted(tmp_path: Path, kind: str) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    if kind == "evil":
        dump_pickle(path, {b"data": _Evil(marker)})
    elif kind == "object":
        dump_pickle(path, {b"data": Path("x")})
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02not really a pickle")
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", "test", tmp_path)
    assert "test_batch" in str(e.value)
    assert not marker.exists()
    if kind in ("evil", "object"):
        assert "not allowed" in str(e.value)


# ---------------------------------------------------------------------------------------- svhn


def test_svhn_roundtrip(tmp_path: Path) -> None:
    x, y = make_svhn(tmp_path, "train", 5)
    xt, yt = make_svhn(tmp_path, "test", 3)
    ds = load_dataset("svhn", "train", tmp_path)
    assert ds.images.shape == (5, 3, 32, 32)
    assert np.array_equal(ds.images.numpy(), x.transpose(3, 2, 0, 1))
    assert ds.images[1, 2, 5, 7].item() == x[5, 7, 2, 1]
    expected = y.ravel().astype(np.int64)
    expected[expected == 10] = 0
    assert ds.labels.tolist() == expected.tolist() and ds.labels[0].item() == 0
    assert ds.source == str(tmp_path / "train_32x32.mat")
    assert load_dataset("svhn", "test", tmp_path).images.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("mat,needle", [
    ({"y": np.ones((2, 1), np.uint8)}, "'X'"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "'y'"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "(3, 1)"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]])}, "label 11"),
    ({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}, "(28, 28, 3, 2)"),
    ({"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))}, "float64"),
])
def test_svhn_errors(tmp_path: Path, mat: dict, needle: str) -> None:
    scipy.io.savemat(tmp_path / "train_32x32.mat", mat)
    with pytest.raises(DataError) as e:
        load_dataset("svhn", "train", tmp_path)
    assert "train_32x32.mat" in str(e.value) and needle in str(e.value)


def test_svhn_not_a_mat_file_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("svhn", "test", tmp_path)
    assert "test_32x32.mat" in str(e.value) and "--download" in str(e.value)
    assert "ufldl.stanford.edu" in str(e.value)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage" * 50)
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", "test", tmp_path)


# -------------------------------------------------------------------------------------- digits


def test_digits_split() -> None:
    from sklearn.datasets import load_digits

    y_all = load_digits().target
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    assert (len(tr), len(te)) == (1433, 364)
    counts = np.bincount(y_all, minlength=10)
    assert tr.class_counts() == [int(c * 8 // 10) for c in counts]
    assert [a + b for a, b in zip(tr.class_counts(), te.class_counts())] == counts.tolist()
    idx = split_indices(y_all)
    assert not set(idx["train"]) & set(idx["test"])
    assert sorted([*idx["train"], *idx["test"]]) == list(range(len(y_all)))
    # first 80% of every class (in index order) is train
    for c in range(10):
        ci = np.flatnonzero(y_all == c)
        assert np.array_equal(np.sort(idx["train"][y_all[idx["train"]] == c]),
                              ci[:len(ci) * 8 // 10])
    again = load_dataset("digits", "train")
    assert torch.equal(tr.images, again.images) and torch.equal(tr.labels, again.labels)
    assert tr.images.shape[1:] == (1, 8, 8) and tr.source == "sklearn.datasets.load_digits"


def test_digits_pixels_and_constants() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().data.reshape(-1, 1, 8, 8)
    x, y = digits_arrays("train")
    idx = split_indices(load_digits().target)["train"]
    expected = np.floor(raw[idx] * 255 / 16 + 0.5).astype(np.uint8)
    assert np.array_equal(x, expected)
    assert x.max() == 255 and x.min() == 0
    assert np.floor(8 * 255 / 16 + 0.5) == 128
    p = x.astype(np.float64) / 255
    assert round(float(p.mean()), 4) == DIGITS_INFO.mean[0]
    assert round(float(p.std()), 4) == DIGITS_INFO.std[0]


# --------------------------------------------------------------------------------- imagefolder


def make_folder(base: Path, split_dirs: bool = True) -> dict[str, list[tuple[np.ndarray, int]]]:
    out: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split, n in (("train", 2), ("test", 1)):
        if split == "test" and not split_dirs:
            continue
        for label, cls in enumerate(("ant", "bee", "cat")):
            for i in range(n):
                arr = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                folder = base / split if split_dirs else base
                ext = ".PNG" if i == 1 else ".png"
                save_image(folder / cls / f"img{i}{ext}", arr)
                out[split].append((arr, label))
    return out


def test_imagefolder_roundtrip(tmp_path: Path) -> None:
    written = make_folder(tmp_path)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    spec = get_spec(f"imagefolder:{tmp_path}")
    assert isinstance(spec, ImageFolderSpec)
    for split in ("train", "test"):
        ds = spec.load(split, Path("unused"))
        arrs = [a for a, _ in written[split]]
        assert ds.images.shape == (len(arrs), 3, 6, 5)
        assert np.array_equal(ds.images.numpy(), np.stack(arrs).transpose(0, 3, 1, 2))
        assert ds.labels.tolist() == [label for _, label in written[split]]
        assert ds.source == str(tmp_path / split)
    info = spec.info
    assert info.name == f"imagefolder:{tmp_path}"
    assert info.class_names == ("ant", "bee", "cat") and info.channels == 3
    assert info.image_size == (6, 5) and info.num_classes == 3
    pix = np.stack([a for a, _ in written["train"]]).astype(np.float64) / 255
    assert np.allclose(info.mean, pix.mean(axis=(0, 1, 2)), atol=1e-6)
    assert np.allclose(info.std, pix.std(axis=(0, 1, 2)), atol=1e-6)
    assert load_dataset(f"imagefolder:{tmp_path}", "test").labels.tolist() == [0, 1, 2]


def test_imagefolder_flat_grey_and_formats(tmp_path: Path) -> None:
    a = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    b = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    c = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    save_image(tmp_path / "one" / "a.bmp", a, "BMP")
    save_image(tmp_path / "two" / "b.Png", b)
    save_image(tmp_path / "two" / "c.jpeg", c, "JPEG")
    spec = ImageFolderSpec(str(tmp_path))
    ds = spec.load("train", tmp_path)
    assert ds.images.shape == (3, 1, 4, 4) and spec.info.channels == 1
    assert np.array_equal(ds.images[0, 0].numpy(), a) and np.array_equal(ds.images[1, 0].numpy(), b)
    assert ds.labels.tolist() == [0, 1, 1] and ds.source == str(tmp_path)
    with pytest.raises(DataError, match="test"):
        spec.load("test", tmp_path)


def test_imagefolder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    save_image(tmp_path / "a" / "g.png", grey)
    save_image(tmp_path / "b" / "c.png", RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    ds = ImageFolderSpec(str(tmp_path)).load("train", tmp_path)
    assert ds.images.shape == (2, 3, 4, 4)
    assert all(np.array_equal(ds.images[0, ch].numpy(), grey) for ch in range(3))


def test_imagefolder_sizes(tmp_path: Path) -> None:
    save_image(tmp_path / "a" / "x.png", RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    save_image(tmp_path / "b" / "y.png", RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        ImageFolderSpec(str(tmp_path)).load("train", tmp_path)
    assert "y.png" in str(e.value) and "6x8" in str(e.value) and "image_size" in str(e.value)
    spec = ImageFolderSpec(str(tmp_path), image_size=5)
    ds = spec.load("train", tmp_path)
    assert ds.images.shape == (2, 3, 5, 5) and spec.info.image_size == (5, 5)
    with pytest.raises(ConfigError):
        ImageFolderSpec(str(tmp_path), image_size=0)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ImageFolderSpec(str(tmp_path / "nope")).load("train", tmp_path)
    make_folder(tmp_path)
    bad = tmp_path / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        ImageFolderSpec(str(tmp_path)).load("train", tmp_path)
    assert "broken.png" in str(e.value)
    bad.unlink()
    save_image(tmp_path / "test" / "dog" / "d.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match="'dog'"):
        ImageFolderSpec(str(tmp_path)).load("test", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderSpec(str(tmp_path / "empty")).load("train", tmp_path)


# ------------------------------------------------------------------------------------ download


def test_verify_md5(tmp_path: Path) -> None:
    f = write(tmp_path / "f.bin", b"hello")
    assert dl.verify_md5(f, md5(f)) and dl.verify_md5(f, md5(f).upper())
    assert not dl.verify_md5(f, "0" * 32)
    assert not dl.verify_md5(tmp_path / "missing", md5(f))


def test_download_file(tmp_path: Path) -> None:
    src = write(tmp_path / "src" / "blob.bin", os.urandom(3 * 1024 * 1024 + 17))
    dest = tmp_path / "out" / "blob.bin"
    assert dl.download_file(src.as_uri(), dest, md5(src)) == dest
    assert dest.read_bytes() == src.read_bytes()
    # bad checksum: DataError naming the file, nothing left behind, existing file untouched
    before = dest.read_bytes()
    with pytest.raises(DataError) as e:
        dl.download_file(src.as_uri(), dest, "0" * 32)
    assert "blob.bin" in str(e.value) and "checksum" in str(e.value) and "0" * 32 in str(e.value)
    assert dest.read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]
    with pytest.raises(DataError, match="missing.bin"):
        dl.download_file((tmp_path / "missing.bin").as_uri(), tmp_path / "out" / "m.bin")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_extract_tar(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar.gz", [(_member("top", tarfile.DIRTYPE), None),
                                            (_member("top/a.txt"), b"alpha"),
                                            (_member("top/sub/b.txt"), b"beta")])
    dest = tmp_path / "dest"
    written = dl.extract_tar(archive, dest)
    assert sorted(written) == [dest / "top" / "a.txt", dest / "top" / "sub" / "b.txt"]
    assert (dest / "top" / "sub" / "b.txt").read_bytes() == b"beta"


@pytest.mark.parametrize("member,needle", [
    (_member("/etc/evil.txt"), "absolute"),
    (_member("top/../../evil.txt"), "'..'"),
    (_member("top/link", tarfile.SYMTYPE, "/etc/passwd"), "links"),
    (_member("top/hard", tarfile.LNKTYPE, "top/a.txt"), "links"),
])
def test_extract_tar_refuses_unsafe_members(tmp_path: Path, member: tarfile.TarInfo,
                                            needle: str) -> None:
    content = b"x" if member.type == tarfile.REGTYPE else None
    archive = _tar(tmp_path / "bad.tar.gz", [(_member("top/a.txt"), b"alpha"), (member, content)])
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        dl.extract_tar(archive, dest)
    assert "bad.tar.gz" in str(e.value) and needle in str(e.value)
    assert not dest.exists()  # checked before anything is written
    assert not (tmp_path / "evil.txt").exists()


def test_extract_tar_corrupt(tmp_path: Path) -> None:
    archive = write(tmp_path / "c.tar.gz", b"not a tar file")
    with pytest.raises(DataError, match="c.tar.gz"):
        dl.extract_tar(archive, tmp_path / "dest")
    good = _tar(tmp_path / "t.tar.gz", [(_member("top/a.bin"), os.urandom(200_000))])
    truncated = write(tmp_path / "truncated.tar.gz", good.read_bytes()[:-5000])
    with pytest.raises(DataError, match="truncated.tar.gz"):
        dl.extract_tar(truncated, tmp_path / "dest")


def test_download_mnist_via_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    written = make_idx(mirror, gz=True)
    files = sorted((mirror / RAW).iterdir())
    resources = tuple(dl.Resource(f.name, f.as_uri(), md5(f)) for f in files)
    monkeypatch.setitem(dl.RESOURCES, "mnist", resources)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", "train", root)
    ds = load_dataset("mnist", "train", root, download=True)
    assert ds.labels.tolist() == written["train"][1].tolist()
    assert sorted(p.name for p in (root / RAW).iterdir()) == [  # only the split asked for
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert len(load_dataset("mnist", "test", root, download=True)) == 3
    assert sorted(p.name for p in (root / RAW).iterdir()) == [f.name for f in files]
    # a wrong checksum is refused and leaves nothing behind
    bad = tuple(dl.Resource(r.filename, r.url, "0" * 32) for r in resources)
    monkeypatch.setitem(dl.RESOURCES, "mnist", bad)
    other = tmp_path / "other"
    with pytest.raises(DataError, match="checksum"):
        load_dataset("mnist", "test", other, download=True)
    assert not any((other / RAW).iterdir())


def test_download_cifar10_via_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    written = make_cifar10(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (dl.Resource(archive.name, archive.as_uri(),
                                                              md5(archive)),))
    root = tmp_path / "root"
    ds = load_dataset("cifar10", "train", root, download=True)
    assert ds.labels.tolist() == written["train"][1]
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert (root / "cifar-10-batches-py" / "batches.meta").is_file()


def test_download_svhn_via_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    x, _ = make_svhn(src, "train", 4)
    make_svhn(src, "test", 2)
    resources = tuple(dl.Resource(f"{s}_32x32.mat", (src / f"{s}_32x32.mat").as_uri(),
                                  md5(src / f"{s}_32x32.mat")) for s in ("train", "test"))
    monkeypatch.setitem(dl.RESOURCES, "svhn", resources)
    ds = load_dataset("svhn", "train", tmp_path / "root", download=True)
    assert np.array_equal(ds.images.numpy(), x.transpose(3, 2, 0, 1))
    assert not (tmp_path / "root" / "test_32x32.mat").exists()  # only the split asked for


def test_upstream_checksums_listed() -> None:
    r = dl.RESOURCES
    assert [x.md5 for x in r["mnist"]] == [
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"]
    assert all(x.url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for x in r["mnist"])
    assert r["fashion-mnist"][0].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert r["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert r["cifar100"][0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert [x.md5 for x in r["svhn"]] == ["e26dedcc434d2e4c54c9b2d4a06d8373",
                                          "eb5a983be6a315427106f1b164d9cef3"]


# ------------------------------------------------------------------------------------ realdata


def _real_root(shared: Path, folder: str) -> Path:
    if not (shared / folder / "raw").is_dir():
        pytest.skip(f"{shared / folder / 'raw'} not found")
    return shared


def _mean_std(ds: data.ImageDataset) -> tuple[float, float]:
    x = ds.images.to(torch.float64) / 255
    return float(x.mean()), float(x.std(unbiased=False))


@pytest.mark.realdata
def test_real_mnist(shared_datasets: Path) -> None:
    root = _real_root(shared_datasets, "MNIST")
    start = time.perf_counter()
    train = load_dataset("mnist", "train", root)
    elapsed = time.perf_counter() - start
    test = load_dataset("mnist", "test", root)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.class_counts() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    mean, std = _mean_std(train)
    assert (round(mean, 4), round(std, 4)) == (0.1307, 0.3081)
    assert elapsed < 5.0, f"loading MNIST train took {elapsed:.2f}s"


@pytest.mark.realdata
def test_real_fashion_mnist(shared_datasets: Path) -> None:
    root = _real_root(shared_datasets, "FashionMNIST")
    train = load_dataset("fashion-mnist", "train", root)
    test = load_dataset("fashion-mnist", "test", root)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    mean, std = _mean_std(train)
    assert (round(mean, 3), round(std, 3)) == (0.286, 0.353)
    assert abs(mean - 0.2860) < 5e-4 and abs(std - 0.3530) < 5e-4
