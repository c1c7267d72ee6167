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

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.errors import ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import Method
from tinyset.models import create_model
from tinyset.models.layers import Conv2d, Linear
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast

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


@METHODS.register("dc", help="gradient matching (Zhao et al. 2021)")
class GradientMatching(Method):
    name = "dc"
    uses_dsa = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dist = self.cfg.get("distance", "layerwise")
        if dist not in DISTANCES:
            raise ConfigError(f"unknown distance {dist!r}; expected one of {', '.join(DISTANCES)}")
        self.distance = DISTANCES[dist]
        self.outer_loop = int(self.cfg["outer_loop"])
        self.inner_loop = int(self.cfg["inner_loop"])

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

    def step(self, images: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
        cfg, info, k, ipc = self.cfg, self.info, self.info.num_classes, self.ipc
        net = create_model(cfg["model"], info.channels, k, info.image_size,
                           generator=make_generator(derive_seed(gen)), device=self.device)
        net.train()
        layerwise = self.distance is distance_layerwise
        params = _weight_rows(net) if layerwise else list(net.parameters())
        net_opt = torch.optim.SGD(net.parameters(), lr=float(cfg["lr_net"]))
        total = 0.0
        for ol in range(self.outer_loop):
            self._set_bn_stats(net, gen)
            loss = images.new_zeros(())
            for c in range(k):
                real = self.pool.sample_class(c, int(cfg["batch_real"]), gen)
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.check_finite(loss)
            opt.step()
            total += loss.item()
            if ol == self.outer_loop - 1:
                break
            self._train_net(net, net_opt, images.detach(), gen)
        return total / (k * self.outer_loop)

    def _train_net(self, net: nn.Module, net_opt: torch.optim.Optimizer, images: torch.Tensor,
                   gen: torch.Generator) -> None:
        """``inner_loop`` epochs of SGD on the synthetic set (DSA per image for DSA)."""
        k, ipc = self.info.num_classes, self.ipc
        labels = torch.arange(k, device=self.device).repeat_interleave(ipc)
        bs = int(self.cfg.get("batch_train", 256))
        n = images.shape[0]
        for _ in range(self.inner_loop):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for b0 in range(0, n, bs):
                idx = perm[b0:b0 + bs]
                x = images[idx]
                if self.augment:
                    x = self.augment(x, gen)
                with autocast(self.device, self.precision):
                    out = net(x)
                loss = F.cross_entropy(out.float(), labels[idx])
                net_opt.zero_grad(set_to_none=True)
                loss.backward()
                net_opt.step()


@METHODS.register("dsa", help="gradient matching with siamese augmentation (Zhao & Bilen 2021)")
class SiameseGradientMatching(GradientMatching):
    name = "dsa"
    uses_dsa = True

