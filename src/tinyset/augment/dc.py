"""The DC paper's evaluation augmentation (Zhao, Mopuri & Bilen, ICLR 2021), batched and seeded.

The DC paper trains its evaluation networks on a DC-made set with a simple, non-differentiable
augmentation (``augment`` / ``get_daparam`` in VICO-UoE/DatasetCondensation ``utils.py``; see
../shared/reference.md section 1.1). For every image of a training batch ONE operation is drawn
uniformly from the strategy's list and applied with its own random parameters:

* ``crop``: pad the image by ``crop`` (4) pixels on every side with the batch's per-channel mean,
  then cut the original size at a random offset ``(r, c)``, each uniform in ``{0, ..., 2*crop-1}``:
  a translation by ``crop - r`` rows and ``crop - c`` columns, from -3 to +4 pixels;
* ``scale``: resize to ``int(u_h * H) x int(u_w * W)`` pixels (``u`` uniform in
  ``[1 - scale, 1 + scale]``, scale 0.2) by nearest-neighbour sampling, centre it on a zero
  canvas and cut the centre ``H x W`` back out (zero fill where a shrunk image does not reach);
* ``rotate``: rotate about the image centre by an integer angle uniform in
  ``{-rotate, ..., rotate-1}`` degrees (rotate 45), filling uncovered pixels with the mean of the
  batch's channel means, and keep the original size;
* ``noise``: add Gaussian noise of standard deviation ``noise`` (0.001).

The paper's rule (``get_daparam``): ``crop_scale_rotate`` for MNIST, ``crop_noise`` whenever the
evaluated network has BatchNorm (this wins over the MNIST rule), otherwise no augmentation; with
augmentation it trains 1000 epochs, without it 300 (our ``noaug`` protocol). :func:`dc_rule`
is that rule.

Differences from the reference, all deliberate:

* batched: no Python loop over images; one operation choice and one parameter draw per image from
  the ``torch.Generator`` given (the reference uses numpy's global RNG per image);
* the statistics the fill values come from are computed per *op group* (the ensemble trainer
  passes member ids: each member's batch is one reference batch, so this is the reference's
  per-batch mean);
* ``rotate`` resamples with PyTorch's bicubic convolution (``grid_sample``) where the reference
  calls ``scipy.ndimage.rotate`` (cubic B-spline with prefiltering, ``reshape=True`` followed by a
  centre crop). The geometry is the same rotation about the centre, in the same sense; when the
  enlarged scipy canvas and the image differ by an odd number of pixels, scipy's centre crop is
  half a pixel off the centre, ours is not. Interpolated values differ slightly inside the image
  (at most 0.022 on a unit-height smooth blob, tests/test_dc_augment.py) and more within two pixels
  of the border, where scipy's spline meets the fill value differently. No scipy dependency;
* ``scale`` draws the width factor against the width (the reference uses the height for both:
  identical for square images, which is every dataset the reference supports).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tinyset.errors import ConfigError

DC_OPS = ("crop", "scale", "rotate", "noise")


@dataclass(frozen=True)
class DCAugParams:
    """The reference's ``dc_aug_param`` values (``get_daparam``, utils.py)."""

    crop: int = 4  # pixels of padding
    scale: float = 0.2  # resize factor in [1 - scale, 1 + scale]
    rotate: int = 45  # integer degrees in [-rotate, rotate)
    noise: float = 0.001  # Gaussian std


def parse_dc_strategy(strategy: str) -> tuple[str, ...]:
    """``"crop_scale_rotate"`` -> ``("crop", "scale", "rotate")``; unknown names are an error."""
    if not isinstance(strategy, str) or not strategy.strip():
        raise ConfigError(f"a DC augmentation strategy must be ops joined by '_' (of {', '.join(DC_OPS)}), "
                          f"got {strategy!r}")
    ops = tuple(strategy.strip().lower().split("_"))
    bad = [o for o in ops if o not in DC_OPS]
    if bad:
        raise ConfigError(f"unknown DC augmentation operation(s) {bad} in strategy {strategy!r}; "
                          f"known: {', '.join(DC_OPS)} (the DC paper uses crop_scale_rotate and crop_noise)")
    return ops


def dc_rule(dataset: str, has_batchnorm: bool) -> str:
    """The DC paper's choice of strategy (``get_daparam``): ``crop_noise`` for a BatchNorm network,
    else ``crop_scale_rotate`` for MNIST, else ``none``."""
    if has_batchnorm:
        return "crop_noise"
    if dataset.lower() == "mnist":
        return "crop_scale_rotate"
    return "none"


class DCAugment:
    """A configured DC augmentation: ``aug(x, generator, op_groups=None)``; see the module docstring.

    ``op_groups[i]``: the batch image ``i`` belongs to (fill values are that batch's means); None:
    one batch. Not differentiable in the random parameters (the reference's is not either); the
    evaluator uses it under no autograd need.
    """

    def __init__(self, strategy: str, params: DCAugParams | None = None):
        self.ops = parse_dc_strategy(strategy)
        self.strategy = "_".join(self.ops)
        self.params = params or DCAugParams()

    def to_dict(self) -> dict:
        return {"kind": "dc", "strategy": self.strategy, **asdict(self.params)}

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"DCAugment(strategy={self.strategy!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator, op_groups: torch.Tensor | None = None,
                 param_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Augment ``x`` ``[N, C, H, W]``: one op per image. ``param_groups`` is accepted for the
        DSA call interface and ignored: every image draws its own parameters, as in the reference."""
        n, ch, h, w = x.shape
        if n == 0:
            return x
        p = self.params
        # every draw is made for the whole batch, in a fixed order, whatever the choices are
        choice = torch.randint(0, len(self.ops), (n,), generator=generator)
        shift = torch.randint(0, 2 * p.crop, (2, n), generator=generator) if p.crop > 0 else torch.zeros(2, n)
        factors = torch.rand(2, n, generator=generator, dtype=torch.float64) * 2 * p.scale + (1 - p.scale)
        angle = torch.randint(-p.rotate, p.rotate, (n,), generator=generator) if p.rotate > 0 else torch.zeros(n)
        noise = torch.randn(n, ch, h, w, generator=generator)

        groups = torch.zeros(n, dtype=torch.int64) if op_groups is None else op_groups.detach().cpu().long()
        means = _group_channel_means(x, groups.to(x.device))  # [N, C]: each image's batch means
        out = x.clone()
        for k, op in enumerate(self.ops):
            idx = (choice == k).nonzero().flatten()
            if idx.numel() == 0:
                continue
            d = idx.to(x.device)
            xs = x.index_select(0, d)
            if op == "crop":
                # padded[r + y, c + x] = x[y + r - crop, ...]: a shift by (r - crop, c - crop)
                ys = _shift_fill(xs, shift[0, idx] - p.crop, shift[1, idx] - p.crop, means.index_select(0, d))
            elif op == "scale":
                ys = _scale(xs, factors[0, idx], factors[1, idx])
            elif op == "rotate":
                ys = _rotate(xs, angle[idx].double(), means.index_select(0, d).mean(1))
            else:
                ys = xs + p.noise * noise.index_select(0, idx).to(x.device, x.dtype)
            out.index_copy_(0, d, ys)
        return out


def _group_channel_means(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per image, the per-channel mean over all images of its group (``[N, C]``)."""
    n, ch = x.shape[:2]
    g = int(groups.max()) + 1
    per_image = x.detach().float().mean(dim=(2, 3))  # [N, C]
    sums = torch.zeros(g, ch, device=x.device).index_add_(0, groups, per_image)
    counts = torch.zeros(g, device=x.device).index_add_(0, groups, torch.ones(n, device=x.device))
    return (sums / counts[:, None]).index_select(0, groups).to(x.dtype)


def _shift_fill(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``out[i, :, r, c] = x[i, :, r + dy_i, c + dx_i]``, ``fill[i]`` (per channel) outside the image."""
    n, ch, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).view(1, h) + dy.to(dev).view(n, 1)
    cols = torch.arange(w, device=dev).view(1, w) + dx.to(dev).view(n, 1)
    valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    flat = (rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)).view(n, 1, h * w)
    moved = torch.gather(x.reshape(n, ch, h * w), 2, flat.expand(n, ch, h * w)).view(n, ch, h, w)
    return torch.where(valid, moved, fill.view(n, ch, 1, 1))


def _scale(x: torch.Tensor, fy: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resize to ``int(f * size)`` pixels, centred on a zero canvas of side
    ``max(new, old)``, centre ``H x W`` cut (the reference's ``scalefun``), all images at once."""
    n, ch, h, w = x.shape
    dev = x.device

    # the reference's canvas is square: max(h', w', H, W) on both axes
    new_h, new_w = (fy * h).floor().long(), (fx * w).floor().long()
    side = torch.stack([new_h, new_w, torch.full_like(new_h, h), torch.full_like(new_h, w)]).amax(0)
    rows, rok = _scale_axis(h, new_h, side)
    cols, cok = _scale_axis(w, new_w, side)
    rows, rok, cols, cok = rows.to(dev), rok.to(dev), cols.to(dev), cok.to(dev)
    flat = (rows.view(n, h, 1) * w + cols.view(n, 1, w)).view(n, 1, h * w)
    out = torch.gather(x.reshape(n, ch, h * w), 2, flat.expand(n, ch, h * w)).view(n, ch, h, w)
    valid = rok.view(n, 1, h, 1) & cok.view(n, 1, 1, w)
    return out * valid.to(x.dtype)


def _scale_axis(size: int, new: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (``[N, size]``) and validity along one axis of :func:`_scale`."""
    n = new.shape[0]
    # output pixel j sits at canvas position j + (side - size)//2, i.e. at pixel
    # j + (side - size)//2 - (side - new)//2 of the resized image
    pos = torch.arange(size).view(1, size) + ((side - size) // 2).view(n, 1) - ((side - new) // 2).view(n, 1)
    ok = (pos >= 0) & (pos < new.view(n, 1))
    # F.interpolate(mode="nearest"): source index floor(dst * in / out), clamped to the image
    src = (pos.clamp(min=0).double() * size / new.clamp(min=1).view(n, 1).double()).floor().long()
    return src.clamp(max=size - 1), ok


def _rotate(x: torch.Tensor, degrees: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Rotate every image about its centre by ``degrees[i]`` (bicubic), ``fill[i]`` outside."""
    n, ch, h, w = x.shape
    t = -degrees * (math.pi / 180)  # scipy.ndimage.rotate's sense of a positive angle
    cos, sin = torch.cos(t).view(n, 1, 1), torch.sin(t).view(n, 1, 1)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy = torch.arange(h, dtype=torch.float64).view(1, h, 1) - cy
    xx = torch.arange(w, dtype=torch.float64).view(1, 1, w) - cx
    # the source of output pixel (y, x): the inverse rotation of its offset from the centre
    sy = cos * yy - sin * xx + cy
    sx = sin * yy + cos * xx + cx
    # grid_sample, align_corners=False: pixel i's centre is at (2i + 1) / size - 1
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1).to(x.device, x.dtype)
    f = fill.to(x.dtype).view(n, 1, 1, 1)
    return F.grid_sample(x - f, grid, mode="bicubic", padding_mode="zeros", align_corners=False) + f


__all__ = ["DCAugment", "DCAugParams", "DC_OPS", "parse_dc_strategy", "dc_rule"]
