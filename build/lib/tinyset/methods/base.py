"""What a distillation method implements: one outer iteration that updates the synthetic images."""
from __future__ import annotations

from typing import Any

import torch

from tinyset.augment import DSA
from tinyset.data.base import DatasetInfo, RealPool
from tinyset.errors import NumericalError


class Method:
    """Base class. Subclasses implement :meth:`step`.

    The runner (:mod:`tinyset.methods.runner`) owns the synthetic images, their optimiser, the
    random generator, checkpoints, logging and evaluation; a method only computes its matching
    loss and updates the images (and, for DC, its own network) from the generator it is given.
    """

    name = "base"
    #: whether the method uses DSA on the matching batches (DM and DSA do, DC does not)
    uses_dsa = True

    def __init__(self, cfg: dict[str, Any], info: DatasetInfo, pool: RealPool, ipc: int,
                 device: torch.device, precision: str, augment: DSA | None):
        self.cfg = cfg
        self.info = info
        self.pool = pool
        self.ipc = ipc
        self.device = device
        self.precision = precision
        self.augment = augment

    def step(self, images: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
        """One outer iteration; returns the mean matching loss per class."""
        raise NotImplementedError

    def siamese(self, real: torch.Tensor, syn: torch.Tensor, gen: torch.Generator,
                real_groups: torch.Tensor, syn_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment real and synthetic images so that equal group ids share one transformation.

        The real images are augmented without autograd; gradients flow to ``syn`` only.
        """
        if not self.augment:
            return real, syn
        groups = torch.cat([real_groups, syn_groups])
        prm = self.augment.sample(len(groups), self.info.image_size, gen, op_groups=groups, param_groups=groups)
        n = real.shape[0]
        with torch.no_grad():
            real = self.augment.apply(real, prm.rows(0, n))
        return real, self.augment.apply(syn, prm.rows(n, len(groups)))

    @staticmethod
    def check_finite(loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise NumericalError(f"the matching loss is {float(loss)}; stopping before the images are updated")
