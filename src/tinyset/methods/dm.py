"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network with frozen weights and, for every class,
matches the mean embedding of a real batch with the mean embedding of that class's synthetic
images: ``sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2``. Real and synthetic images of a
class undergo the same DSA transformation (one draw per class). All classes go through one
forward pass (the reference does this for BatchNorm networks; for the others it is the same
function, computed faster), and real embeddings are computed without autograd, in chunks on a CPU
(:meth:`~tinyset.methods.base.Distiller.forward_real`).

Speed: one network object is re-initialised in place every iteration (the same weights as a newly
built one from the same generator), so its forward can be compiled once with ``torch.compile``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.models.layers import init_parameters
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, compile_function

#: compile the embedding network when a run has at least this many iterations (CPU, ``compile=auto``)
COMPILE_MIN_ITERATIONS = 200

_REF = "VICO-UoE/DatasetCondensation main_DM.py defaults and README (Zhao & Bilen, WACV 2023)"


@dataclass
class DMConfig(DistillConfig):
    iterations: int = hp(20000, "outer iterations", ge=1)
    lr_img: float = hp(1.0, "learning rate of the synthetic images", gt=0)
    compile: str = hp("auto", "torch.compile the embedding network (auto: on CPU for runs of at least "
                              f"{COMPILE_MIN_ITERATIONS} iterations)", choices=("auto", "on", "off"))


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    return {"iterations": 500 if dataset == "digits" else 1000, "final_eval": "quick"}


@METHODS.register("dm", help="distribution matching (Zhao & Bilen 2023)")
class DistributionMatching(Distiller):
    name = "dm"
    Config = DMConfig
    paper = Table((
        Row({"iterations": 20000, "lr_img": 1.0, "momentum_img": 0.5, "batch_real": 256, "init": "real"},
            f"{_REF}: lr_img 1, batch_real 256, 20000 iterations, init real, DSA "
            "color_crop_cutout_flip_scale_rotate (no flip for digit datasets, as the DSA README advises)"),
        Row({"batch_real": 128}, "tinyset: digits has at most 143 training images per class", datasets=("digits",)),
    ))
    cpu_rule = Rule("2-core CPU budget: 1000 iterations (500 on digits), quick final evaluation", _cpu_budget)

    def setup(self, gen: torch.Generator) -> None:
        self.net = self.frozen_network()
        self.embed = self.net.embed
        if self.wants_compile():
            self.embed = compile_function(self.net.embed)
        super().setup(gen)

    def wants_compile(self) -> bool:
        return self.compile_wanted(self.device.type == "cpu" and self.cfg.iterations >= COMPILE_MIN_ITERATIONS)

    def step(self, gen: torch.Generator) -> float:
        k, ipc, b = self.info.num_classes, self.ipc, self.cfg.batch_real
        init_parameters(self.net, make_generator(derive_seed(gen)))
        real, _ = self.pool.sample_classes(b, gen)  # [K*b], class by class
        real, x_syn = self.siamese(real, self.images, gen, torch.arange(k).repeat_interleave(b),
                                   torch.arange(k).repeat_interleave(ipc))
        with torch.no_grad(), autocast(self.device, self.precision):
            emb_real = self.forward_real(self.embed, real, self.net)
        with autocast(self.device, self.precision):
            emb_syn = self.embed(x_syn)
        mean_real = emb_real.float().view(k, b, -1).mean(1)
        mean_syn = emb_syn.float().view(k, ipc, -1).mean(1)
        loss = ((mean_real - mean_syn) ** 2).sum()
        self.update("images", loss)
        return loss.item() / k
