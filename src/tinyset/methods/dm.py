"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network with frozen weights and, for every class,
matches the mean embedding of a real batch with the mean embedding of that class's synthetic
images: ``sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2``. Real and synthetic images of a
class undergo the same DSA transformation (one draw per class). All classes go through one
forward pass (the reference does this for BatchNorm networks; for the others it is the same
function, computed faster), and real embeddings are computed without autograd.

Speed: one network object is re-initialised in place every iteration (the same weights as a newly
built one from the same generator), so its forward can be compiled once with ``torch.compile``.
"""
from __future__ import annotations

import torch

from tinyset.methods import METHODS
from tinyset.methods.base import Method
from tinyset.models import create_model
from tinyset.models.layers import init_parameters
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast

#: compile the embedding network when a run has at least this many iterations (CPU, auto mode)
COMPILE_MIN_ITERATIONS = 200


@METHODS.register("dm", help="distribution matching (Zhao & Bilen 2023)")
class DistributionMatching(Method):
    name = "dm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.info
        self.net = create_model(self.cfg["model"], info.channels, info.num_classes, info.image_size,
                                device=self.device)
        self.net.requires_grad_(False)
        self.net.train()  # BatchNorm networks use batch statistics, as in the reference
        self.embed = self.net.embed
        if self.wants_compile():
            self.embed = torch.compile(self.net.embed, dynamic=False)

    def wants_compile(self) -> bool:
        mode = self.cfg.get("compile", "auto")
        if mode == "auto":
            return self.device.type == "cpu" and int(self.cfg["iterations"]) >= COMPILE_MIN_ITERATIONS
        return bool(mode)

    def step(self, images: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
        k, ipc, b = self.info.num_classes, self.ipc, int(self.cfg["batch_real"])
        init_parameters(self.net, make_generator(derive_seed(gen)))
        real, _ = self.pool.sample_classes(b, gen)  # [K*b], class by class
        real, x_syn = self.siamese(real, images, gen, torch.arange(k).repeat_interleave(b),
                                   torch.arange(k).repeat_interleave(ipc))
        with torch.no_grad(), autocast(self.device, self.precision):
            emb_real = self.embed(real)
        with autocast(self.device, self.precision):
            emb_syn = self.embed(x_syn)
        mean_real = emb_real.float().view(k, b, -1).mean(1)
        mean_syn = emb_syn.float().view(k, ipc, -1).mean(1)
        loss = ((mean_real - mean_syn) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        opt.step()
        return loss.item() / k
