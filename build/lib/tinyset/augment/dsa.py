"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021), batched and explicitly seeded.

Operations and parameters follow the reference ``ParamDiffAug``:

* ``color``: brightness ``x + (u - 0.5) * 1.0``, saturation ``(x - mean_c) * 2u + mean_c``,
  contrast ``(x - mean_chw) * (u + 0.5) + mean_chw`` (u ~ U[0, 1) each);
* ``crop``: integer translation by up to ``round(0.125 * size)`` pixels, zero fill;
* ``cutout``: a zeroed square of half the image side at a random centre;
* ``flip``: horizontal flip with probability 0.5;
* ``scale``: independent x/y scale factors in ``[1/1.2, 1.2]`` (bilinear resampling);
* ``rotate``: rotation by up to +-15 degrees (bilinear resampling).

``mode='single'`` (the reference's ``aug_mode='S'``) draws one operation per call (or per
*op group*, see below) from the strategy string; ``mode='multiple'`` applies every listed op in
the canonical order color, crop, cutout, flip, scale/rotate.

Siamese sharing is expressed with two optional index tensors over the batch:
``op_groups[i]`` (images with equal ids share the operation choice) and ``param_groups[i]``
(images with equal ids share every random parameter). ``None`` means one op group for the whole
call and independent parameters per image, which is the reference's behaviour when a network is
trained on (synthetic) data. For matching, give a real batch and a synthetic batch of the same
class the same group id: they then undergo exactly the same transformation.

All randomness comes from the ``torch.Generator`` passed in; nothing touches the global RNG.
Everything is batched: there is no Python loop over images. Differences from the reference: the
x and y translation (and scale) are drawn independently also in Siamese mode (the reference
re-seeds between the two draws and makes them equal), and in ``multiple`` mode scale and rotate
are composed into one resampling instead of two.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tinyset.errors import ConfigError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    if strategy is None or strategy.lower() in ("", "none"):
        return ()
    ops = tuple(strategy.split("_"))
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ConfigError(f"unknown DSA operation(s) {bad} in strategy {strategy!r}; known: {', '.join(OPS)}")
    return ops


class DSA:
    """A configured augmentation: ``dsa(x, generator, op_groups=None, param_groups=None)``."""

    def __init__(self, strategy: str | None = DEFAULT_STRATEGY, mode: str = "single",
                 params: DSAParams | None = None):
        if mode not in ("single", "multiple"):
            raise ConfigError(f"DSA mode must be 'single' or 'multiple', got {mode!r}")
        self.strategy = strategy or "none"
        self.ops = parse_strategy(strategy)
        self.mode = mode
        self.params = params or DSAParams()

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "mode": self.mode, **asdict(self.params)}

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ sampling
    def __call__(self, x: torch.Tensor, generator: torch.Generator,
                 op_groups: torch.Tensor | None = None,
                 param_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Sample parameters for the batch and apply them (see :meth:`sample`)."""
        if not self.ops:
            return x
        n, _, h, w = x.shape
        return self.apply(x, self.sample(n, (h, w), generator, op_groups, param_groups))

    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator,
               op_groups: torch.Tensor | None = None,
               param_groups: torch.Tensor | None = None) -> "AugParams":
        """Draw the parameters of ``n`` images of ``size`` (H, W); rows can be split with ``rows``."""
        h, w = size
        pg = torch.arange(n) if param_groups is None else param_groups.detach().to("cpu", torch.int64)
        gp = int(pg.max().item()) + 1 if n else 0
        if self.mode == "single":
            og = torch.zeros(n, dtype=torch.int64) if op_groups is None else op_groups.detach().to("cpu", torch.int64)
            go = int(og.max().item()) + 1 if n else 0
            choice = torch.randint(0, len(self.ops), (go,), generator=generator)[og]
            active: dict[str, torch.Tensor] = {}
            for i, op in enumerate(self.ops):  # an op listed twice is simply drawn more often
                active[op] = active.get(op, torch.zeros(n, dtype=torch.bool)) | (choice == i)
        else:
            active = {op: torch.ones(n, dtype=torch.bool) for op in self.ops}

        def rand() -> torch.Tensor:  # one draw per parameter group, gathered per image
            return torch.rand(gp, generator=generator)[pg]

        p = self.params
        vals: dict[str, torch.Tensor] = {}
        if "color" in active:
            vals["bright"] = (rand() - 0.5) * p.brightness
            vals["sat"] = rand() * p.saturation
            vals["contrast"] = rand() + p.contrast
        if "crop" in active:
            sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
            vals["ty"] = (rand() * (2 * sh + 1)).floor().long().clamp(max=2 * sh) - sh
            vals["tx"] = (rand() * (2 * sw + 1)).floor().long().clamp(max=2 * sw) - sw
        if "cutout" in active:
            ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
            hi_y, hi_x = h + (1 - ch % 2), w + (1 - cw % 2)
            vals["oy"] = (rand() * hi_y).floor().long().clamp(max=hi_y - 1) - ch // 2
            vals["ox"] = (rand() * hi_x).floor().long().clamp(max=hi_x - 1) - cw // 2
        if "flip" in active:
            active["flip"] = active["flip"] & (rand() < p.prob_flip)
        if "scale" in active or "rotate" in active:
            eye = torch.eye(2).expand(n, 2, 2)
            scale_m, rot_m = eye, eye
            none = torch.zeros(n, dtype=torch.bool)
            if "scale" in active:
                r = p.ratio_scale
                sx = rand() * (r - 1.0 / r) + 1.0 / r
                sy = rand() * (r - 1.0 / r) + 1.0 / r
                on = active["scale"]
                scale_m = torch.diag_embed(torch.stack([torch.where(on, sx, 1.0), torch.where(on, sy, 1.0)], 1))
            if "rotate" in active:
                t = (rand() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
                t = torch.where(active["rotate"], t, 0.0)
                c, s = torch.cos(t), torch.sin(t)
                rot_m = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
            vals["theta"] = torch.cat([scale_m @ rot_m, torch.zeros(n, 2, 1)], 2)
            active["affine"] = active.pop("scale", none) | active.pop("rotate", none)
        return AugParams(n, (h, w), active, vals, (int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)))

    def apply(self, x: torch.Tensor, prm: "AugParams") -> torch.Tensor:
        """Apply sampled parameters; ``x`` has ``prm.n`` images. Differentiable in ``x``."""
        if x.shape[0] != prm.n or tuple(x.shape[2:]) != prm.size:
            raise ValueError(f"parameters for {prm.n} images of {prm.size}, got {tuple(x.shape)}")
        dev, a, v = x.device, prm.active, prm.values
        if "color" in a:
            x = _on_subset(x, a["color"], lambda xs, i: _color(
                xs, v["bright"][i].to(dev), v["sat"][i].to(dev), v["contrast"][i].to(dev)))
        if "crop" in a:
            x = _on_subset(x, a["crop"], lambda xs, i: _translate(xs, v["ty"][i].to(dev), v["tx"][i].to(dev)))
        if "cutout" in a:
            ch, cw = prm.cutout_size
            x = _on_subset(x, a["cutout"], lambda xs, i: _cutout(xs, v["oy"][i].to(dev), v["ox"][i].to(dev), ch, cw))
        if "flip" in a:
            x = _on_subset(x, a["flip"], lambda xs, i: xs.flip(3))
        if "affine" in a:
            x = _on_subset(x, a["affine"], lambda xs, i: _affine(xs, v["theta"][i].to(dev)))
        return x


@dataclass
class AugParams:
    """Sampled DSA parameters for ``n`` images: which ops are active per image, and their values."""

    n: int
    size: tuple[int, int]
    active: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    cutout_size: tuple[int, int]

    def rows(self, start: int, stop: int) -> "AugParams":
        """The parameters of images ``start:stop`` (e.g. the real or the synthetic part of a batch)."""
        return AugParams(stop - start, self.size, {k: t[start:stop] for k, t in self.active.items()},
                         {k: t[start:stop] for k, t in self.values.items()}, self.cutout_size)


def _on_subset(x: torch.Tensor, mask: torch.Tensor,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn(x[idx], idx)`` to the images where ``mask`` is set, leave the others untouched."""
    if bool(mask.all()):
        return fn(x, torch.arange(x.shape[0]))
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    idx_dev = idx.to(x.device)
    return x.index_copy(0, idx_dev, fn(x.index_select(0, idx_dev), idx))


def _color(x: torch.Tensor, b: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shape = (-1, 1, 1, 1)
    x = x + b.view(shape).to(x.dtype)  # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * s.view(shape).to(x.dtype) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c.view(shape).to(x.dtype) + m


def _translate(x: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
    """out[i, :, r, c] = x[i, :, r + ty_i, c + tx_i], zero outside the image (reference crop)."""
    n, ch, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h) + ty.view(n, 1)  # [n, h]
    cols = torch.arange(w, device=x.device).view(1, w) + tx.view(n, 1)  # [n, w]
    valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    flat = (rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)).view(n, 1, h * w)
    out = torch.gather(x.reshape(n, ch, h * w), 2, flat.expand(n, ch, h * w)).view(n, ch, h, w)
    return out * valid.to(x.dtype)


def _cutout(x: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """Zero the ``ch x cw`` square whose top-left corner is ``(y0, x0)`` (clipped to the image)."""
    n, _, h, w = x.shape
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    y0, x0 = y0.view(n, 1), x0.view(n, 1)
    rin = (r >= y0) & (r < y0 + ch)
    cin = (c >= x0) & (c < x0 + cw)
    keep = ~(rin.view(n, 1, h, 1) & cin.view(n, 1, 1, w))
    return x * keep.to(x.dtype)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
