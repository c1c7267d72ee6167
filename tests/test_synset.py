"""Tests of the synthetic-set artifact (tinyset.synset), image grids (tinyset.viz) and exports."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tinyset
from tinyset.data.base import DatasetInfo
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.export import export_imagefolder, export_npz
from tinyset.synset import SyntheticSet
from tinyset.viz import make_grid, save_grid

GRAY = DatasetInfo("tiny-gray", 1, (8, 8), 3, ("zero", "one", "two/slash"), (0.5,), (0.25,))
RGB = DatasetInfo("tiny-rgb", 3, (4, 4), 3, ("cat", "dog", "bird"),
                  (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def make_set(info: DatasetInfo = GRAY, ipc: int = 2, soft: bool = False, lr: float | None = None,
             seed: int = 0) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    k = info.num_classes
    images = torch.randn(k * ipc, info.channels, *info.image_size, generator=g)
    hard = torch.arange(k).repeat_interleave(ipc)
    if soft:
        logits = torch.randn(k * ipc, k, generator=g) + 4 * torch.nn.functional.one_hot(hard, k)
        labels = logits.softmax(dim=1)
    else:
        labels = hard
    meta = {"method": "dm", "config": {"ipc": ipc, "lr_img": 1.0, "nested": [1, 2]}, "seed": seed,
            "iterations": 10, "wall_time_s": 1.25}
    return SyntheticSet(images, labels, info, lr=lr, meta=meta)


def assert_same(a: SyntheticSet, b: SyntheticSet) -> None:
    assert torch.equal(a.images, b.images)
    assert a.images.dtype == b.images.dtype == torch.float32
    assert torch.equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype
    assert a.info == b.info
    assert a.lr == b.lr


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("info", [GRAY, RGB], ids=["gray8", "rgb4"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("lr", [None, 0.0123456789012345], ids=["nolr", "lr"])
def test_round_trip_exact(tmp_path: Path, info: DatasetInfo, soft: bool, lr: float | None) -> None:
    s = make_set(info, soft=soft, lr=lr)
    path = s.save(tmp_path / "syn.safetensors")
    t = SyntheticSet.load(path)
    assert_same(s, t)
    assert t.label_kind == ("soft" if soft else "hard")
    assert t.meta == {**s.meta, "tinyset_version": tinyset.__version__}
    assert "tinyset_version" not in s.meta  # saving does not modify the in-memory set
    # no temporary files left next to the artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.safetensors"]


def test_saved_version_overrides_stale_version(tmp_path: Path) -> None:
    s = make_set()
    s.meta["tinyset_version"] = "0.0.0"
    t = SyntheticSet.load(s.save(tmp_path / "a.safetensors"))
    assert t.meta["tinyset_version"] == tinyset.__version__


def test_file_header_layout(tmp_path: Path) -> None:
    from safetensors import safe_open

    s = make_set(soft=True, lr=0.5)
    s.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        assert set(f.keys()) == {"images", "labels", "lr"}
    assert header["format"] == "tinyset.synset"
    assert header["format_version"] == 1
    assert header["label_kind"] == "soft"
    assert DatasetInfo.from_dict(header["info"]) == GRAY


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    make_set(seed=1).save(path)
    s2 = make_set(seed=2)
    s2.save(path)
    assert_same(SyntheticSet.load(path), s2)


def test_non_json_meta_rejected_on_save(tmp_path: Path) -> None:
    s = make_set()
    s.meta["bad"] = object()
    with pytest.raises(ConfigError, match="JSON"):
        s.save(tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_meta_tensors_and_paths_serialised(tmp_path: Path) -> None:
    s = make_set()
    s.meta["loss"] = torch.tensor([1.0, 2.0])
    s.meta["where"] = tmp_path
    t = SyntheticSet.load(s.save(tmp_path / "a.safetensors"))
    assert t.meta["loss"] == [1.0, 2.0]
    assert t.meta["where"] == str(tmp_path)


# ------------------------------------------------------------------------------- API
def test_dataset_protocol_and_dataloader() -> None:
    s = make_set(RGB, ipc=3)
    assert len(s) == 9
    x, y = s[4]
    assert x.shape == (3, 4, 4) and int(y) == 1
    loader = torch.utils.data.DataLoader(s, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = 0
    for xb, yb in loader:
        assert xb.shape[1:] == (3, 4, 4) and yb.dtype == torch.int64
        seen += xb.shape[0]
    assert seen == 9
    soft = make_set(RGB, soft=True)
    xb, yb = next(iter(torch.utils.data.DataLoader(soft, batch_size=6)))
    assert yb.shape == (6, 3) and yb.dtype == torch.float32


def test_properties() -> None:
    s = make_set(ipc=2)
    assert s.num_classes == 3 and s.ipc == 2
    assert s.class_images(1).shape == (2, 1, 8, 8)
    assert torch.equal(s.class_images(2), s.images[4:6])
    assert torch.equal(s.hard_labels(), torch.tensor([0, 0, 1, 1, 2, 2]))
    soft = make_set(soft=True)
    assert torch.equal(soft.hard_labels(), soft.labels.argmax(1))
    unequal = SyntheticSet(torch.zeros(3, 1, 8, 8), torch.tensor([0, 0, 1]), GRAY)
    assert unequal.ipc is None
    assert unequal.class_images(2).shape == (0, 1, 8, 8)
    with pytest.raises(ConfigError):
        unequal.class_images(3)
    moved = s.to("cpu")
    assert_same(s, moved)
    assert moved.meta == s.meta and moved.meta is not s.meta


def test_from_real() -> None:
    pixels = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    s = SyntheticSet.from_real(pixels, labels, GRAY, {"method": "random"})
    assert torch.allclose(s.images, GRAY.normalize(pixels))
    assert s.meta == {"method": "random"} and s.ipc == 2
    pixels01 = GRAY.denormalize(s.images)
    assert torch.equal((pixels01 * 255).round().to(torch.uint8), pixels)


def test_constructor_validation() -> None:
    with pytest.raises(ConfigError, match="shape"):
        SyntheticSet(torch.zeros(3, 3, 8, 8), torch.tensor([0, 1, 2]), GRAY)
    with pytest.raises(ConfigError, match="labels"):
        SyntheticSet(torch.zeros(3, 1, 8, 8), torch.tensor([0, 1]), GRAY)
    with pytest.raises(ConfigError, match="range"):
        SyntheticSet(torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 3]), GRAY)
    with pytest.raises(ConfigError, match="sum to 1"):
        SyntheticSet(torch.zeros(2, 1, 8, 8), torch.full((2, 3), 0.5), GRAY)
    with pytest.raises(ConfigError, match=r"\[N, K\]"):
        SyntheticSet(torch.zeros(2, 1, 8, 8), torch.full((2, 2), 0.5), GRAY)
    with pytest.raises(NumericalError, match="NaN"):
        SyntheticSet(torch.full((1, 1, 8, 8), float("nan")), torch.tensor([0]), GRAY)
    # within tolerance is accepted
    SyntheticSet(torch.zeros(1, 1, 8, 8), torch.tensor([[0.5, 0.25, 0.2505]]), GRAY)


# ------------------------------------------------------------------------------- corrupt files
def _expect_artifact_error(path: Path, match: str | None = None) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        SyntheticSet.load(path)
    assert path.name in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _expect_artifact_error(tmp_path / "nope.safetensors", "no such file")


def test_truncated_file(tmp_path: Path) -> None:
    path = make_set().save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 7, 100, 5, 0):
        path.write_bytes(data[:cut])
        _expect_artifact_error(path, "not a valid safetensors file")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a tensor file at all" * 10)
    _expect_artifact_error(path, "not a valid safetensors file")


def test_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"images": torch.zeros(3, 1, 8, 8), "labels": torch.arange(3)}, str(path))
    _expect_artifact_error(path, "'tinyset'")
    save_file({"images": torch.zeros(3, 1, 8, 8), "labels": torch.arange(3)}, str(path),
              metadata={"other": "x"})
    _expect_artifact_error(path, "'tinyset'")


def _write(path: Path, tensors: dict, header: dict | str) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata={"tinyset": text})
    return path


def _good_parts(soft: bool = False) -> tuple[dict, dict]:
    s = make_set(soft=soft)
    return {"images": s.images.clone(), "labels": s.labels.clone()}, s.header()


def test_bad_header(tmp_path: Path) -> None:
    tensors, header = _good_parts()
    p = tmp_path / "h.safetensors"
    _expect_artifact_error(_write(p, tensors, "{not json"), "not valid JSON")
    _expect_artifact_error(_write(p, tensors, {**header, "format": "other"}), "wrong format")
    _expect_artifact_error(_write(p, tensors, {**header, "format_version": 3}), "unsupported format_version")
    _expect_artifact_error(_write(p, tensors, {**header, "format_version": "1"}), "unsupported format_version")
    _expect_artifact_error(_write(p, tensors, {k: v for k, v in header.items() if k != "info"}), "info")
    _expect_artifact_error(_write(p, tensors, {**header, "info": {"name": "x"}}), "dataset info")
    _expect_artifact_error(_write(p, tensors, {**header, "label_kind": "soft"}), "soft labels")


@pytest.mark.parametrize("missing", ["images", "labels"])
def test_missing_tensor(tmp_path: Path, missing: str) -> None:
    tensors, header = _good_parts()
    del tensors[missing]
    _expect_artifact_error(_write(tmp_path / "m.safetensors", tensors, header), f"missing tensor '{missing}'")


def test_shape_and_value_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.safetensors"
    tensors, header = _good_parts()
    cases = {
        "channels": ({**tensors, "images": torch.zeros(6, 3, 8, 8)}, "shape"),
        "size": ({**tensors, "images": torch.zeros(6, 1, 8, 7)}, "shape"),
        "rank": ({**tensors, "images": torch.zeros(6, 64)}, "[N, C, H, W]"),
        "length": ({**tensors, "labels": torch.arange(5) % 3}, "6 images but 5 labels"),
        "range": ({**tensors, "labels": torch.tensor([0, 1, 2, 3, 0, 1])}, "label values"),
        "negative": ({**tensors, "labels": torch.tensor([0, 1, 2, -1, 0, 1])}, "label values"),
        "nan": ({**tensors, "images": tensors["images"].clone().index_fill_(0, torch.tensor([2]), float("nan"))},
                "NaN"),
        "inf": ({**tensors, "images": torch.full((6, 1, 8, 8), float("inf"))}, "NaN/inf"),
        "lr_nan": ({**tensors, "lr": torch.tensor(float("nan"), dtype=torch.float64)}, "lr"),
        "lr_shape": ({**tensors, "lr": torch.zeros(2)}, "'lr'"),
    }
    for name, (ts, msg) in cases.items():
        _write(p, ts, header)
        err = _expect_artifact_error(p, msg)
        assert str(p) in str(err), name


def test_soft_label_errors(tmp_path: Path) -> None:
    p = tmp_path / "soft.safetensors"
    tensors, header = _good_parts(soft=True)
    _write(p, {**tensors, "labels": tensors["labels"][:, :2].contiguous()}, header)
    _expect_artifact_error(p, "[N, K]")
    _write(p, {**tensors, "labels": tensors["labels"] * 0.5}, header)
    _expect_artifact_error(p, "sum to 1")
    _write(p, {**tensors, "labels": tensors["labels"] * 2 - 0.5}, header)
    _expect_artifact_error(p, "out of range")
    _write(p, {**tensors, "labels": tensors["labels"][:4].contiguous()}, header)
    _expect_artifact_error(p, "[N, K]")


class _Bomb:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    # sanity: unpickling this payload really would create the marker
    pickle.loads(pickle.dumps(_Bomb(tmp_path / "sanity")))
    assert (tmp_path / "sanity").exists()

    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"images": _Bomb(marker)}))
    _expect_artifact_error(raw, "not a valid safetensors file")

    zipped = tmp_path / "torchsave.safetensors"
    torch.save({"images": _Bomb(marker)}, zipped)
    _expect_artifact_error(zipped, "not a valid safetensors file")
    assert not marker.exists()


# ------------------------------------------------------------------------------- viz
def test_make_grid_shape_and_padding() -> None:
    imgs = torch.zeros(5, 3, 4, 6)
    grid = make_grid(imgs, nrow=3, pad=2, pad_value=1.0)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert (grid[0] == 255).all() and (grid[2:6, 2:8] == 0).all()
    assert (grid[8:12, 18:24] == 255).all()  # the empty 6th cell is padding
    g1 = make_grid(torch.ones(2, 1, 3, 3), nrow=2, pad=0)
    assert g1.shape == (3, 6, 1) and (g1 == 255).all()
    with pytest.raises(ConfigError):
        make_grid(torch.zeros(2, 2, 3, 3), nrow=2)


def test_save_grid_gray(tmp_path: Path) -> None:
    s = make_set(GRAY, ipc=2)
    path = save_grid(s, tmp_path / "grid.png")
    img = Image.open(path)
    assert img.mode == "L"
    # 8x8 upscaled x4 to 32 px; 3 rows (classes) x 2 columns, pad 2
    assert img.size == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    arr = np.asarray(img)
    # row r shows class r: compare a cell with the nearest-neighbour upscaled image
    expected = (GRAY.denormalize(s.images[3:4]) * 255).round().to(torch.uint8)[0, 0].numpy()
    cell = arr[2 + 34: 2 + 34 + 32, 2 + 34: 2 + 34 + 32]
    assert np.array_equal(cell[::4, ::4], expected)


def test_save_grid_rgb_unequal_and_upscale(tmp_path: Path) -> None:
    images = torch.randn(4, 3, 4, 4)
    s = SyntheticSet(images, torch.tensor([0, 0, 0, 2]), RGB)
    img = Image.open(save_grid(s, tmp_path / "g.png", upscale=2))
    assert img.mode == "RGB"
    assert img.size == (3 * (8 + 2) + 2, 3 * (8 + 2) + 2)
    arr = np.asarray(img)
    assert (arr[12:20, 2:32] == 255).all()  # class 1 has no images: its row is blank
    assert (arr[22:30, 12:32] == 255).all()  # class 2 has one image; the rest of the row is blank
    soft = make_set(RGB, soft=True)
    img = Image.open(save_grid(soft, tmp_path / "soft.png"))
    assert img.size == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)


# ------------------------------------------------------------------------------- export
def test_export_imagefolder(tmp_path: Path) -> None:
    s = SyntheticSet(torch.randn(7, 1, 8, 8), torch.tensor([2, 0, 1, 0, 2, 2, 0]), GRAY,
                     meta={"method": "x"})
    out = export_imagefolder(s, tmp_path / "out")
    subdirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert subdirs == ["00_zero", "01_one", "02_two_slash"]
    counts = [len(list((out / d).glob("*.png"))) for d in subdirs]
    assert counts == s.class_counts() == [3, 1, 3]
    # class 0's images in set order: indices 1, 3, 6
    first = np.asarray(Image.open(out / "00_zero" / "0.png"))
    assert first.shape == (8, 8)
    expected = (GRAY.denormalize(s.images[1:2]) * 255).round().to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(first, expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["meta"]["method"] == "x" and meta["meta"]["tinyset_version"] == tinyset.__version__
    assert meta["info"] == GRAY.to_dict()
    assert not (out / "labels.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_imagefolder_many_classes_and_soft(tmp_path: Path) -> None:
    k = 12
    info = DatasetInfo("many", 3, (4, 4), k, tuple(f"c{i}" for i in range(k)), (0.5,) * 3, (0.5,) * 3)
    s = SyntheticSet(torch.randn(2 * k, 3, 4, 4),
                     torch.eye(k).repeat_interleave(2, dim=0) * 0.9 + 0.1 / k, info)
    out = export_imagefolder(s, tmp_path / "many")
    subdirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert subdirs == [f"{i:02d}_c{i}" for i in range(k)]
    assert all(len(list((out / d).glob("*.png"))) == 2 for d in subdirs)
    assert Image.open(out / "11_c11" / "1.png").mode == "RGB"
    soft = json.loads((out / "labels.json").read_text())
    assert len(soft["soft_labels"]) == 2 * k
    assert np.allclose(soft["soft_labels"]["03_c3/1.png"], s.labels[7].numpy())


def test_export_imagefolder_overwrite(tmp_path: Path) -> None:
    s = make_set()
    out = tmp_path / "out"
    out.mkdir()  # an empty directory may be filled
    export_imagefolder(s, out)
    with pytest.raises(ConfigError, match="out"):
        export_imagefolder(s, out)
    (out / "stale.txt").write_text("x")
    export_imagefolder(make_set(ipc=3), out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert len(list((out / "00_zero").glob("*.png"))) == 3
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        export_imagefolder(s, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("soft", [False, True])
def test_export_npz_round_trip(tmp_path: Path, soft: bool) -> None:
    s = make_set(RGB, soft=soft, lr=0.02)
    path = export_npz(s, tmp_path / "syn.npz")
    with np.load(path, allow_pickle=False) as z:
        assert z["images_normalized"].dtype == np.float32
        assert z["images_uint8"].shape == (len(s), 4, 4, 3) and z["images_uint8"].dtype == np.uint8
        meta = json.loads(str(z["meta_json"]))
        info = DatasetInfo.from_dict(meta["info"])
        back = SyntheticSet(torch.from_numpy(z["images_normalized"]), torch.from_numpy(z["labels"]),
                            info, lr=float(z["lr"]), meta=meta["meta"])
        assert list(z["class_names"]) == list(RGB.class_names)
        assert np.allclose(z["mean"], RGB.mean) and np.allclose(z["std"], RGB.std)
        expected = (RGB.denormalize(s.images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert np.array_equal(z["images_uint8"], expected.numpy())
    assert_same(s, back)
    assert meta["meta"]["method"] == "dm" and meta["label_kind"] == ("soft" if soft else "hard")
    with pytest.raises(ConfigError, match="syn.npz"):
        export_npz(s, path)
    export_npz(s, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.npz"]
