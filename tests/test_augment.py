import math

import pytest
import torch

from tinyset.augment import DSA, default_strategy
from tinyset.errors import ConfigError
from tinyset.rng import make_generator


def _x(n=8, c=3, s=16, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_each_op_changes_images_keeps_shape_and_passes_gradients(op):
    x = _x().requires_grad_(True)
    y = DSA(op)(x, make_generator(1))
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_same_generator_same_result_no_global_rng():
    x = _x()
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = DSA()(x, make_generator(3))
    b = DSA()(x, make_generator(3))
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_siamese_groups_share_the_transformation():
    x = _x(n=1)
    batch = torch.cat([x, x, x, x])
    groups = torch.tensor([0, 0, 1, 1])
    for seed in range(10):
        y = DSA()(batch, make_generator(seed), op_groups=groups, param_groups=groups)
        assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])


def test_independent_params_per_image_by_default():
    x = _x(n=1).repeat(16, 1, 1, 1)
    y = DSA("rotate")(x, make_generator(0))
    assert not torch.allclose(y[0], y[1])


def test_crop_is_exact_integer_translation_with_zero_fill():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    for seed in range(20):
        y = DSA("crop")(x, make_generator(seed))
        # every non-zero output pixel is an input pixel, and the layout is a shifted copy
        nz = y[y != 0]
        assert set(nz.tolist()) <= set(x.flatten().tolist())
        r, c = (y[0, 0] != 0).nonzero()[0].tolist()
        v = int(y[0, 0, r, c])
        dy, dx = v // 8 - r, v % 8 - c
        assert abs(dy) <= 1 and abs(dx) <= 1  # round(0.125 * 8) = 1


def test_flip_and_identity_affine_are_exact():
    x = _x(n=64)
    y = DSA("flip")(x, make_generator(0))
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_cutout_zeroes_a_half_size_square():
    x = torch.ones(32, 1, 16, 16)
    y = DSA("cutout")(x, make_generator(0))
    zeros = (y == 0).flatten(1).sum(1)
    assert int(zeros.max()) == 64  # 8x8 square fully inside
    assert bool((zeros > 0).all())


def test_color_brightness_range():
    x = torch.zeros(256, 1, 4, 4)
    y = DSA("color")(x, make_generator(0))
    # one channel: saturation is a no-op, contrast keeps a constant image; brightness adds U(-0.5, 0.5)
    shift = y[:, 0, 0, 0]
    assert float(shift.min()) >= -0.5 and float(shift.max()) <= 0.5
    assert float(shift.std()) > 0.2


def test_single_mode_picks_one_op_per_op_group():
    x = _x(n=1).repeat(6, 1, 1, 1)
    dsa = DSA("flip_rotate")
    # with one op group, all images get the same op
    for seed in range(5):
        y = dsa(x, make_generator(seed))
        is_rot = ~((y == x) | (y == x.flip(3))).flatten(1).all(1)
        assert bool(is_rot.all()) or not bool(is_rot.any())


def test_strategy_parsing_and_defaults():
    assert not DSA("none")
    assert DSA("none")(_x(), make_generator(0)) is not None
    with pytest.raises(ConfigError, match="blur"):
        DSA("color_blur")
    assert "flip" not in default_strategy("mnist") and "flip" in default_strategy("cifar10")


def test_rotation_bounded():
    # a centred vertical bar rotated by at most 15 degrees stays near the centre column
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, :, 16] = 1.0
    y = DSA("rotate")(x, make_generator(0))
    top = y[:, 0, 2].argmax(1).float()
    assert float((top - 16).abs().max()) <= math.tan(math.radians(15)) * 16 + 1.5


def test_sample_then_apply_by_rows_equals_one_call():
    """Real and synthetic parts augmented separately get exactly the siamese transformation."""
    x = _x(n=6)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    dsa = DSA()
    for seed in range(8):
        whole = dsa(x, make_generator(seed), op_groups=groups, param_groups=groups)
        prm = dsa.sample(6, (16, 16), make_generator(seed), op_groups=groups, param_groups=groups)
        parts = torch.cat([dsa.apply(x[:4], prm.rows(0, 4)), dsa.apply(x[4:], prm.rows(4, 6))])
        assert torch.equal(whole, parts)
    with pytest.raises(ValueError, match="parameters for 4 images"):
        dsa.apply(x, prm.rows(0, 4))
