"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network with frozen weights and, for every class,
matches the mean embedding of a real batch with the mean embedding of that class's synthetic
images: ``sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2``. Real and synthetic images of a
class undergo the same DSA transformation. All classes go through one forward pass (the
reference does this for BatchNorm networks; for the others it is the same function, computed
faster), and real embeddings are computed without autograd.
"""
from __future__ import annotations

import torch

from tinyset.methods import METHODS
from tinyset.methods.base import Method
from tinyset.models import create_model
from tinyset.utils import autocast, derive_seed, make_generator


@METHODS.register("dm", help="distribution matching (Zhao & Bilen 2023)")
class DistributionMatching(Method):
    name = "dm"

    def step(self, images: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
        cfg, info, pool = self.cfg, self.info, self.pool
        k, ipc, b = info.num_classes, self.ipc, int(cfg["batch_real"])
        net = create_model(cfg["model"], info.channels, k, info.image_size,
                           generator=make_generator(derive_seed(gen)), device=self.device)
        net.requires_grad_(False)
        net.train()
        real, _ = pool.sample_classes(b, gen)  # [K*b], class by class
        syn_labels = torch.arange(k).repeat_interleave(ipc)
        real_labels = torch.arange(k).repeat_interleave(b)
        x_syn = images
        if self.augment:
            groups = torch.cat([real_labels, syn_labels])
            both = self.augment(torch.cat([real, images]), gen, op_groups=groups, param_groups=groups)
            real, x_syn = both[: real.shape[0]], both[real.shape[0]:]
        with torch.no_grad(), autocast(self.device, self.precision):
            emb_real = net.embed(real.detach())
        with autocast(self.device, self.precision):
            emb_syn = net.embed(x_syn)
        mean_real = emb_real.float().view(k, b, -1).mean(1)
        mean_syn = emb_syn.float().view(k, ipc, -1).mean(1)
        loss = ((mean_real - mean_syn) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        opt.step()
        return loss.item() / k
