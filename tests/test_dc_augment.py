"""The DC paper's evaluation augmentation: per-op parity with the reference's per-image recipe,
seeding, the paper's rule, and the `dc` protocol end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyset.augment import AUGMENTATIONS, DCAugment, dc_rule, parse_dc_strategy
from tinyset.augment.dc import _rotate, _scale, _shift_fill
from tinyset.errors import ConfigError
from tinyset.evaluate import Protocol, evaluate_tensors, make_augment
from tinyset.rng import make_generator


@pytest.fixture(scope="module")
def digits():
    from tinyset.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _x(n=6, c=2, h=12, w=12, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------- per-image references (the recipe of utils.py augment)

def _ref_crop(img, crop, r, c, mean):
    ch, h, w = img.shape
    canvas = torch.empty(ch, h + 2 * crop, w + 2 * crop)
    canvas[:] = torch.tensor(mean).view(ch, 1, 1)
    canvas[:, crop:crop + h, crop:crop + w] = img
    return canvas[:, r:r + h, c:c + w]


def _ref_scale(img, nh, nw):
    ch, h, w = img.shape
    tmp = F.interpolate(img[None], [nh, nw])[0]  # nearest, as the reference
    side = max(nh, nw, h, w)
    canvas = torch.zeros(ch, side, side)
    r, c = int((side - nh) / 2), int((side - nw) / 2)
    canvas[:, r:r + nh, c:c + nw] = tmp
    r, c = int((side - h) / 2), int((side - w) / 2)
    return canvas[:, r:r + h, c:c + w]


def test_crop_is_the_reference_pad_and_cut_with_the_batch_mean():
    x = _x()
    mean = x.mean(dim=(0, 2, 3))
    for r, c in [(0, 0), (7, 7), (3, 5), (4, 4)]:
        ys = _shift_fill(x, torch.full((6,), r - 4), torch.full((6,), c - 4), mean.expand(6, -1))
        for i in range(6):
            assert torch.allclose(ys[i], _ref_crop(x[i], 4, r, c, mean.tolist()))


@pytest.mark.parametrize("fy,fx", [(0.8, 0.8), (1.2, 1.19), (0.85, 1.13), (1.0, 1.0), (0.99, 0.81)])
def test_scale_is_the_reference_nearest_resize_and_centre_cut(fy, fx):
    x = _x(n=3, h=28, w=28)
    ys = _scale(x, torch.full((3,), fy, dtype=torch.float64), torch.full((3,), fx, dtype=torch.float64))
    nh, nw = int(fy * 28), int(fx * 28)
    for i in range(3):
        assert torch.equal(ys[i], _ref_scale(x[i], nh, nw)), (fy, fx)


def test_rotate_zero_is_identity_and_quarter_turn_is_rot90():
    x = _x(n=2, h=10, w=10)
    fill = torch.zeros(2)
    assert torch.allclose(_rotate(x, torch.zeros(2, dtype=torch.float64), fill), x, atol=1e-5)
    quarter = _rotate(x, torch.full((2,), 90.0, dtype=torch.float64), fill)
    turned = torch.rot90(x, 1, dims=(2, 3))
    other = torch.rot90(x, -1, dims=(2, 3))
    assert torch.allclose(quarter, turned, atol=1e-4) or torch.allclose(quarter, other, atol=1e-4)


def test_rotate_is_close_to_scipy_inside_and_fills_outside():
    ndimage = pytest.importorskip("scipy.ndimage")
    # a smooth image (a Gaussian blob off centre): spline and bicubic interpolation agree closely inside
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    img = torch.exp(-((yy - 11) ** 2 + (xx - 16) ** 2) / 18.0)[None]
    for angle in (-45, -20, 30, 44):
        ref = ndimage.rotate(img.numpy(), angle=angle, axes=(-2, -1), cval=0.25)
        r, c = (ref.shape[-2] - 28) // 2, (ref.shape[-1] - 28) // 2
        ref = torch.tensor(ref[:, r:r + 28, c:c + 28])
        mine = _rotate(img[None], torch.tensor([float(angle)], dtype=torch.float64), torch.tensor([0.25]))[0]
        # compare where the source pixel lies 2+ pixels inside the image: at the image's edge scipy's
        # spline meets the fill value differently
        t = torch.tensor(angle * torch.pi / 180)
        sy = torch.cos(t) * (yy - 13.5) + torch.sin(t) * (xx - 13.5) + 13.5
        sx = -torch.sin(t) * (yy - 13.5) + torch.cos(t) * (xx - 13.5) + 13.5
        inside = (sy >= 2) & (sy <= 25) & (sx >= 2) & (sx <= 25)
        assert 200 < int(inside.sum()) < 784
        err = float((mine - ref)[0][inside].abs().max())
        assert err < 0.03, (angle, err)
        # same sense of rotation: the blob's centre lands where scipy puts it (+-1 px)
        w_ref, w_mine = (ref - 0.25).clamp(min=0), (mine - 0.25).clamp(min=0)
        cy = lambda t: float((t[0] * yy).sum() / t[0].sum())  # noqa: E731
        cx = lambda t: float((t[0] * xx).sum() / t[0].sum())  # noqa: E731
        assert abs(cy(w_ref) - cy(w_mine)) < 1.0 and abs(cx(w_ref) - cx(w_mine)) < 1.0
    corner = _rotate(torch.zeros(1, 1, 28, 28), torch.tensor([45.0], dtype=torch.float64), torch.tensor([0.7]))
    assert float(corner[0, 0, 0, 0]) == pytest.approx(0.7)  # uncovered corner gets the fill


def test_one_op_per_image_drawn_uniformly_and_seeded():
    x = _x(n=600, c=1, h=8, w=8)
    aug = DCAugment("crop_noise")
    a = aug(x, make_generator(1))
    b = aug(x, make_generator(1))
    c = aug(x, make_generator(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    diff = (a - x).abs().amax(dim=(1, 2, 3))
    noisy = (diff > 0) & (diff < 0.01)  # noise 0.001: tiny changes; a crop moves pixels by O(1)
    assert 240 < int(noisy.sum()) < 360  # one of two ops per image: about half
    est = float((a - x)[noisy].std())
    assert est == pytest.approx(0.001, rel=0.1)


def test_global_rng_untouched():
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    DCAugment("crop_scale_rotate_noise")(_x(), make_generator(0))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_crop_shift_range_is_the_references():
    # a single bright pixel: its displacement is the translation
    x = torch.zeros(2000, 1, 16, 16)
    x[:, 0, 8, 8] = 1.0
    groups = torch.arange(2000)  # each image its own batch: the fill is its own mean (tiny)
    y = DCAugment("crop")(x, make_generator(0), op_groups=groups)
    pos = y.view(2000, -1).argmax(1)
    dy, dx = pos // 16 - 8, pos % 16 - 8
    # offset r in {0..7}: the pixel moves by 4 - r, i.e. -3..+4
    assert set(dy.tolist()) == set(range(-3, 5)) and set(dx.tolist()) == set(range(-3, 5))


def test_fill_uses_each_groups_batch_mean():
    x = torch.cat([torch.full((4, 1, 8, 8), 2.0), torch.full((4, 1, 8, 8), -1.0)])
    y = DCAugment("crop")(x, make_generator(0), op_groups=torch.tensor([0] * 4 + [1] * 4))
    assert torch.equal(y[:4], x[:4]) and torch.equal(y[4:], x[4:])  # constant images, filled by their mean


def test_bad_strategies_are_refused():
    with pytest.raises(ConfigError, match="unknown DC augmentation operation.*flip"):
        parse_dc_strategy("crop_flip")
    with pytest.raises(ConfigError, match="ops joined"):
        parse_dc_strategy("")
    with pytest.raises(ConfigError, match="dc_strategy|unknown DC"):
        Protocol.preset("dc", dc_strategy="crop_cutout")
    with pytest.raises(ConfigError, match="augment must be one of"):
        Protocol(augment="mixup")


def test_the_papers_rule():
    assert dc_rule("MNIST", False) == "crop_scale_rotate"
    assert dc_rule("mnist", True) == "crop_noise"
    assert dc_rule("cifar10", True) == "crop_noise"
    assert dc_rule("fashionmnist", False) == "none"
    assert {"dsa", "dc", "none"} <= set(AUGMENTATIONS.names())


def test_dc_preset_and_make_augment_follow_the_rule():
    proto = Protocol.preset("dc")
    assert proto.augment == "dc" and proto.epochs == 1000 and proto.dc_strategy is None
    assert proto.train_epochs == 1001 and "get_daparam" in proto.source
    from tinyset.data.base import DatasetInfo

    info = DatasetInfo(name="mnist", num_classes=10, channels=1, image_size=(28, 28), mean=(0.1307,),
                       std=(0.3081,), class_names=tuple(str(k) for k in range(10)))
    assert make_augment(proto, "mnist", "convnet", info).strategy == "crop_scale_rotate"
    assert make_augment(proto, "mnist", "convnet-bn", info).strategy == "crop_noise"
    with pytest.raises(ConfigError, match="noaug"):
        make_augment(proto, "fashionmnist", "convnet", info)
    forced = Protocol.preset("dc", dc_strategy="crop")
    assert make_augment(forced, "fashionmnist", "convnet", info).strategy == "crop"
    assert make_augment(Protocol.preset("dsa"), "mnist", "convnet", info).strategy.startswith("color")


def test_evaluation_records_the_strategy_per_architecture(digits):
    train, test = digits
    idx = torch.cat([torch.nonzero(train.labels == k).flatten()[:2] for k in range(10)])
    images, labels = train.normalized()[idx], train.labels[idx]
    proto = Protocol.preset("dc", epochs=2, num_models=2, dc_strategy=None)
    info = train.info
    # digits is not MNIST: the rule refuses an InstanceNorm ConvNet and takes crop_noise for BatchNorm
    res = evaluate_tensors(images, labels, info, test, ["convnet-bn"], proto, seed=0)
    assert res.protocol["augment_strategy"] == "dc:crop_noise"
    res2 = evaluate_tensors(images, labels, info, test, ["convnet", "convnet-bn"],
                            Protocol.preset("dc", epochs=2, num_models=2, dc_strategy="crop_scale_rotate"), seed=0)
    assert res2.protocol["augment_strategy"] == "dc:crop_scale_rotate"
    json.dumps(res2.to_dict())
    with pytest.raises(ConfigError, match="noaug"):
        evaluate_tensors(images, labels, info, test, ["convnet-bn", "convnet"], proto, seed=0)


def test_cli_protocol_dc(tmp_path, capsys):
    from tinyset.cli import main

    out = tmp_path / "set.safetensors"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(out)]) == 0
    js = tmp_path / "ev.json"
    code = main(["evaluate", str(out), "--protocol", "dc", "--epochs", "2", "--num-models", "2",
                 "--models", "convnet-bn", "--json", str(js)])
    assert code == 0
    data = json.loads(js.read_text())
    assert data["protocol"]["name"] == "dc" and data["protocol"]["augment_strategy"] == "dc:crop_noise"
    code = main(["evaluate", str(out), "--protocol", "dc", "--epochs", "2", "--models", "convnet"])
    assert code == 2
    assert "noaug" in capsys.readouterr().err
    code = main(["evaluate", str(out), "--augment", "dc", "--dc-strategy", "crop_rotate", "--epochs", "2",
                 "--num-models", "1", "--models", "convnet", "--json", str(tmp_path / "b.json")])
    assert code == 0
    assert json.loads((tmp_path / "b.json").read_text())["protocol"]["augment_strategy"] == "dc:crop_rotate"
    assert np.isfinite(data["results"][0]["mean"])
