"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), and
DSA: the same with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

Each outer iteration takes a freshly initialised network and alternates ``outer_loop`` times:
(a) for every class, the distance between the network's parameter gradients on a real batch and
on that class's synthetic images, summed over classes, then one SGD step on the images; (b)
``inner_loop`` epochs of SGD on the network over the synthetic set. BatchNorm running statistics
are set from 16 real images per class and then frozen, as in the reference. DSA applies the same
sampled augmentation to the real and synthetic batch of a class before each gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.errors import ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.models import create_model
from tinyset.models.layers import Conv2d, Linear
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast
from tinyset.training import TrainSettings, train_ensemble

#: the published (outer_loop, inner_loop) per ipc (reference ``get_loops``)
PUBLISHED_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for(ipc: int) -> tuple[int, int]:
    """Outer/inner loop counts for any ipc.

    The published values where they exist; otherwise ``outer = min(ipc, 50)`` (the table has
    outer = ipc) and ``inner = clamp(round(500 / ipc), 10, 50)`` (the table's inner loop is about
    500 / ipc, between 10 and 50).
    """
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1, got {ipc}")
    if ipc in PUBLISHED_LOOPS:
        return PUBLISHED_LOOPS[ipc]
    return min(ipc, 50), max(10, min(50, round(500 / ipc)))


def _weight_rows(net: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weights: the parameters the layer-wise distance compares."""
    return [m.weight for m in net.modules() if isinstance(m, (Conv2d, Linear))]


def _rows(g: torch.Tensor) -> torch.Tensor:
    """A weight gradient as [output units, fan-in]. Linear weights are stored [members=1, out, in]."""
    if g.dim() == 3 and g.shape[0] == 1:
        g = g[0]
    return g.reshape(g.shape[0], -1)


def distance_layerwise(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference "ours" distance: per output unit, 1 - cosine of the weight gradients, summed."""
    total = g_syn[0].new_zeros(())
    for gs, gr in zip(g_syn, g_real):
        gs, gr = _rows(gs), _rows(gr)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def distance_mse(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(((gs - gr) ** 2).sum() for gs, gr in zip(g_syn, g_real))  # type: ignore[return-value]


def distance_cos(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    gs = torch.cat([g.reshape(-1) for g in g_syn])
    gr = torch.cat([g.reshape(-1) for g in g_real])
    return 1 - (gs * gr).sum() / (gs.norm() * gr.norm() + 1e-6)


DISTANCES = {"layerwise": distance_layerwise, "ours": distance_layerwise, "mse": distance_mse,
             "cos": distance_cos}


_REF = "VICO-UoE/DatasetCondensation"


@dataclass
class DCConfig(DistillConfig):
    iterations: int = hp(1000, "outer iterations (each: a fresh network, outer_loop image updates)", ge=1)
    init: str = hp("noise", "initial synthetic images: random real images of the class, or Gaussian noise",
                   choices=("real", "noise"))
    lr_img: float = hp(0.1, "learning rate of the synthetic images", gt=0)
    lr_net: float = hp(0.01, "learning rate of the network's inner updates", gt=0)
    batch_train: int = hp(256, "batch size of the network's inner updates", ge=1)
    distance: str = hp("layerwise", "gradient distance ('ours' is the reference's name for layerwise)",
                       choices=tuple(DISTANCES))
    outer_loop: int | None = hp(None, "image updates per iteration (none: the published value for the ipc, "
                                      "else min(ipc, 50))", ge=1, optional=True)
    inner_loop: int | None = hp(None, "inner network epochs between image updates (none: published value, "
                                      "else round(500 / ipc) clamped to [10, 50])", ge=1, optional=True)


def _loops_from_ipc(values, dataset: str, ipc: int) -> dict:
    out = {}
    for name, value in zip(("outer_loop", "inner_loop"), loops_for(ipc)):
        if values[name] is None:
            how = "paper: get_loops(ipc) of " + _REF if ipc in PUBLISHED_LOOPS else "rule: loops_for(ipc)"
            out[name] = (value, how)
    return out


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    return {"iterations": {1: 100, 10: 10, 50: 3}.get(ipc, 20), "final_eval": "quick"}


_DC_ROW = Row({"iterations": 1000, "lr_img": 0.1, "momentum_img": 0.5, "lr_net": 0.01, "batch_real": 256,
               "batch_train": 256, "init": "noise", "distance": "layerwise"},
              f"{_REF} main.py defaults (Zhao et al., ICLR 2021): 1000 iterations, lr_img 0.1, lr_net 0.01, "
              "batch_real 256, init noise, dis_metric ours, outer/inner loops from get_loops(ipc)")
_DIGITS_ROW = Row({"batch_real": 128}, "tinyset: digits has at most 143 training images per class",
                  datasets=("digits",))
_CPU_RULE = Rule("2-core CPU budget: 100 iterations at ipc 1, 10 at ipc 10, 3 at ipc 50, else 20; "
                 "quick final evaluation", _cpu_budget)


@METHODS.register("dc", help="gradient matching (Zhao et al. 2021)")
class GradientMatching(Distiller):
    name = "dc"
    Config = DCConfig
    paper = Table((_DC_ROW, _DIGITS_ROW))
    cpu_rule = _CPU_RULE
    uses_dsa = False
    complete = staticmethod(_loops_from_ipc)

    def setup(self, gen: torch.Generator) -> None:
        self.distance = DISTANCES[self.cfg.distance]
        self.outer_loop = int(self.cfg.outer_loop)
        self.inner_loop = int(self.cfg.inner_loop)
        super().setup(gen)

    def _set_bn_stats(self, net: nn.Module, gen: torch.Generator) -> None:
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            return
        real, _ = self.pool.sample_classes(16, gen)
        net.train()
        with torch.no_grad(), autocast(self.device, self.precision):
            net(real)
        for m in bns:
            m.eval()

    def step(self, gen: torch.Generator) -> float:
        cfg, info, k, ipc, images = self.cfg, self.info, self.info.num_classes, self.ipc, self.images
        net = create_model(cfg.model, info.channels, k, info.image_size,
                           generator=make_generator(derive_seed(gen)), device=self.device)
        net.train()
        layerwise = self.distance is distance_layerwise
        params = _weight_rows(net) if layerwise else list(net.parameters())
        total = 0.0
        for ol in range(self.outer_loop):
            self._set_bn_stats(net, gen)
            loss = images.new_zeros(())
            for c in range(k):
                real = self.pool.sample_class(c, cfg.batch_real, gen)
                syn = images[c * ipc:(c + 1) * ipc]
                real, syn = self.siamese(real, syn, gen, torch.zeros(real.shape[0], dtype=torch.long),
                                         torch.zeros(ipc, dtype=torch.long))
                with autocast(self.device, self.precision):
                    out_real = net(real)
                target = torch.full((real.shape[0],), c, dtype=torch.long, device=self.device)
                g_real = torch.autograd.grad(F.cross_entropy(out_real.float(), target), params)
                g_real = [g.detach() for g in g_real]
                with autocast(self.device, self.precision):
                    out_syn = net(syn)
                g_syn = torch.autograd.grad(F.cross_entropy(out_syn.float(), target[:ipc]), params,
                                            create_graph=True)
                loss = loss + self.distance([g.float() for g in g_syn], [g.float() for g in g_real])
            self.update("images", loss)
            total += loss.item()
            if ol == self.outer_loop - 1:
                break
            self._train_net(net, images.detach(), gen)
        return total / (k * self.outer_loop)

    def _train_net(self, net: nn.Module, images: torch.Tensor, gen: torch.Generator) -> None:
        """``inner_loop`` epochs of plain SGD (``lr_net``, no momentum) on the synthetic set, through the
        shared training loop (DSA on every batch for DSA, as the reference's inner ``epoch('train')``)."""
        labels = self.hard_labels().to(self.device)
        settings = TrainSettings(epochs=self.inner_loop, lr=self.cfg.lr_net, momentum=0.0, weight_decay=0.0,
                                 batch_size=self.cfg.batch_train, lr_decay_factor=1.0, precision=self.precision)
        train_ensemble(net, images, labels, settings, gen, self.augment)


@METHODS.register("dsa", help="gradient matching with siamese augmentation (Zhao & Bilen 2021)")
class SiameseGradientMatching(GradientMatching):
    name = "dsa"
    paper = Table((
        Row({**_DC_ROW.values, "init": "real"},
            f"{_REF} README command for DSA (Zhao & Bilen, ICML 2021): main.py with --init real --method DSA "
            "--dsa_strategy color_crop_cutout_flip_scale_rotate (no flip on MNIST/SVHN)"),
        _DIGITS_ROW))
    uses_dsa = True

