"""The distiller contract: what every distillation method declares and implements.

A method is one class, registered in :data:`tinyset.methods.METHODS`, that

* names its typed configuration (``Config``, a :class:`DistillConfig` subclass), its published
  settings (``paper``, a :class:`~tinyset.hparams.Table`) and its ``cpu`` profile (``cpu_rule``);
* declares, in :meth:`Distiller.setup`, **all of its learnable state by name**: tensors
  (:meth:`~Distiller.learnable`; the synthetic ``images`` always, optionally soft labels, a learning
  rate, ...), modules whose parameters it trains (:meth:`~Distiller.module`) and one optimiser per
  group of them (:meth:`~Distiller.optimizer`, each with its own settings from the config);
* implements one outer iteration (:meth:`Distiller.step`) and, when it learns more than images and
  hard labels, how its state becomes a synthetic set (:meth:`Distiller.to_synset`).

The loop (:mod:`tinyset.methods.loop`) knows nothing else about a method: it checkpoints and
restores every declared tensor, module and optimiser state together with the random generator, so
``--resume`` is bit-exact on CPU for every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from tinyset.augment import DSA
from tinyset.data.base import DatasetInfo, RealPool
from tinyset.errors import ConfigError, NumericalError
from tinyset.hparams import HParams, Row, Rule, Table, hp


@dataclass
class DistillConfig(HParams):
    """Settings every distillation method has. Methods add their own fields in a subclass."""

    iterations: int = hp(1000, "outer iterations", ge=1)
    model: str = hp("convnet", "network the method matches with (see `tinyset models`)")
    init: str = hp("real", "initial synthetic images: random real images of the class, or Gaussian noise",
                   choices=("real", "noise"))
    lr_img: float = hp(1.0, "learning rate of the synthetic images", gt=0)
    momentum_img: float = hp(0.5, "SGD momentum of the synthetic images", ge=0, lt=1)
    batch_real: int = hp(256, "real images per class per iteration", ge=1, le=65536)
    dsa_strategy: str | None = hp(None, "DSA transformations ('none': off; none: the dataset's default)",
                                  optional=True)
    final_eval: str = hp("dsa", "protocol of the test evaluation after the run (see `tinyset evaluate --help`)",
                         choices=("quick", "dsa", "noaug"))


@dataclass
class DistillContext:
    """What a method is given: the dataset's description, the real images, ipc, device, precision,
    the augmentation (``None`` when off)."""

    info: DatasetInfo
    pool: RealPool
    ipc: int
    device: torch.device
    precision: str
    augment: DSA | None


class Distiller:
    """Base class of the distillation methods (see the module docstring)."""

    #: registry name (set by the subclass)
    name: ClassVar[str] = "base"
    Config: ClassVar[type[DistillConfig]] = DistillConfig
    paper: ClassVar[Table] = Table(())
    cpu_rule: ClassVar[Rule | None] = None
    #: whether the method augments its matching batches with DSA (``dsa_strategy`` decides which)
    uses_dsa: ClassVar[bool] = True
    #: ``complete(values, dataset, ipc) -> {field: (value, why)}`` fills fields no layer set
    complete: ClassVar[Callable[[dict, str, int], dict[str, tuple[Any, str]]] | None] = None

    def __init__(self, cfg: DistillConfig, ctx: DistillContext):
        self.cfg = cfg
        self.ctx = ctx
        self.info, self.pool, self.ipc = ctx.info, ctx.pool, ctx.ipc
        self.device, self.precision, self.augment = ctx.device, ctx.precision, ctx.augment
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # ------------------------------------------------------------------ declarations
    def learnable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Declare a learnable tensor (a leaf that requires grad); returns it."""
        if name in self.tensors:
            raise ValueError(f"{self.name}: tensor {name!r} is declared twice")
        t = value.detach().clone().to(self.device).requires_grad_(True)
        self.tensors[name] = t
        return t

    def module(self, name: str, net: nn.Module) -> nn.Module:
        """Declare a module whose whole state (parameters and buffers) is checkpointed."""
        if name in self.modules:
            raise ValueError(f"{self.name}: module {name!r} is declared twice")
        self.modules[name] = net
        return net

    def optimizer(self, name: str, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Declare an optimiser over declared tensors or module parameters."""
        if name in self.optimizers:
            raise ValueError(f"{self.name}: optimiser {name!r} is declared twice")
        self.optimizers[name] = opt
        return opt

    # ------------------------------------------------------------------ what a method implements
    def setup(self, gen: torch.Generator) -> None:
        """Declare the learnable state. The default: synthetic images (``init``) and one SGD optimiser
        (``lr_img``, ``momentum_img``) over them."""
        images = self.learnable("images", self.initial_images(gen))
        self.optimizer("images", torch.optim.SGD([images], lr=self.cfg.lr_img, momentum=self.cfg.momentum_img))

    def step(self, gen: torch.Generator) -> float:
        """One outer iteration: update the declared state, return the loss (mean per class)."""
        raise NotImplementedError

    def to_synset(self, meta: dict[str, Any]) -> Any:
        """The synthetic set this state stands for. The default: the ``images`` with hard labels,
        class by class, and a learned ``lr`` when one is declared."""
        from tinyset.synset import SyntheticSet

        lr = self.tensors.get("lr")
        return SyntheticSet(self.tensors["images"].detach().cpu(), self.hard_labels(), self.info,
                            lr=float(lr.detach()) if lr is not None else None, meta=meta)

    # ------------------------------------------------------------------ shared pieces
    @property
    def images(self) -> torch.Tensor:
        return self.tensors["images"]

    def hard_labels(self) -> torch.Tensor:
        """``ipc`` images per class, class by class."""
        return torch.arange(self.info.num_classes).repeat_interleave(self.ipc)

    def initial_images(self, gen: torch.Generator) -> torch.Tensor:
        """``ipc`` images per class: random real ones (``init=real``) or standard Gaussian noise."""
        if self.cfg.init == "real":
            return torch.cat([self.pool.sample_class(c, self.ipc, gen) for c in range(self.info.num_classes)])
        c, (h, w) = self.info.channels, self.info.image_size
        return torch.randn(self.info.num_classes * self.ipc, c, h, w, generator=gen).to(self.device)

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

    def frozen_network(self) -> nn.Module:
        """The ``model`` network with frozen weights in train mode (BatchNorm uses batch statistics, as
        the references do); methods that draw a fresh network every iteration re-initialise it in place
        (:func:`tinyset.models.layers.init_parameters`) so a compiled forward is reused."""
        from tinyset.models import create_model

        info = self.info
        net = create_model(self.cfg.model, info.channels, info.num_classes, info.image_size, device=self.device)
        net.requires_grad_(False)
        net.train()
        return net

    def compile_wanted(self, auto: bool) -> bool:
        """The ``compile`` setting (auto/on/off) resolved, ``auto`` being the method's own rule."""
        mode = getattr(self.cfg, "compile", "off")
        return auto if mode == "auto" else mode == "on"

    @staticmethod
    def check_finite(loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise NumericalError(f"the matching loss is {float(loss)}; stopping before the state is updated")

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Zero the optimiser ``name``'s gradients, backpropagate ``loss`` (checked finite), step."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        opt.step()

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        """Checks across fields or against registries (the ranges of single fields are in ``Config``)."""
        from tinyset.models import MODELS

        if cfg.model not in MODELS:
            raise ConfigError(f"model={cfg.model!r} is not a registered architecture; known: "
                              f"{', '.join(MODELS.names())}")


__all__ = ["Distiller", "DistillConfig", "DistillContext", "Row", "Rule", "Table", "hp"]
