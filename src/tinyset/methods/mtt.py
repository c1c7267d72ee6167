"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022).

Needs expert trajectories made by ``tinyset experts`` (:mod:`tinyset.experts`); name their folder
with ``--set experts=DIR`` (or ``experts = "DIR"`` in a ``--config`` file). Every iteration:

1. draw an expert ``i`` uniformly among the complete ones and a start epoch ``t`` uniformly in
   ``[0, max_start_epoch)``;
2. start a student at the expert's parameters after ``t`` epochs, ``theta*_t``, and take
   ``syn_steps`` plain SGD steps on minibatches of ``batch_syn`` synthetic images (all of them by
   default; a fresh random order, then consecutive chunks), each augmented with DSA (one random
   transformation per image, as when a network is trained on the set), with the **learnable**
   learning rate ``lr``: ``theta_{k+1} = theta_k - lr * grad CE(theta_k)``;
3. loss ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` with ``M = expert_epochs``;
4. update the images (SGD, ``lr_img``, momentum ``momentum_img`` = 0.5) and the lr (its own SGD,
   ``lr_lr``, momentum ``momentum_lr`` = 0.5), both from the same backward pass.

The student runs functionally on one flat parameter vector (:func:`torch.func.functional_call` on a
single network object built once; the vector is split into views of the parameters' shapes), so
the unrolled steps are ordinary differentiable tensor operations: each step's gradient is taken
with ``create_graph=True`` and the final loss is differentiated through all of them.

Cost: like the reference, the autograd graph of all ``syn_steps`` student steps (their forward
activations and first-order backward) stays in memory until the loss is differentiated, so peak
memory grows linearly with ``syn_steps * batch_syn`` (times the activation size of the network);
lower ``syn_steps`` or set ``batch_syn`` when memory is short. The learned ``lr`` is stored in the
synthetic set (:attr:`tinyset.synset.SyntheticSet.lr`); evaluation protocols with ``lr = null``
train on it. The lr is learned directly (not through a log), as in the reference; if an update
makes it zero or negative the run stops with a :class:`~tinyset.errors.NumericalError` (the last
checkpoint is kept) and asks for a smaller ``lr_lr``.

The student runs in fp32 whatever ``--precision`` says (second-order gradients in bf16 are not
worth the risk). ZCA whitening, which the reference uses for most CIFAR rows, is not implemented in
tinyset: expert sets record ``zca: false`` and the paper rows apply without it. ``batch_real`` is
not used (MTT sees real images only through the experts and the ``init=real`` draw).

Architecture: the student is the experts' network (name and arguments from the expert set), and
``model`` must name the same architecture (a clear error otherwise). Deep ConvNets on tiny images
are a poor fit: on 8x8 digits the depth-3 ConvNet normalises 2x2 maps in its last block and the
unrolled gradients explode (measured ``d loss / d lr`` of 1e6..1e12 at losses below 1), which is
why the digits cpu preset uses ``convnet-d2``.

Random draws per iteration, in order: the expert, the start epoch, then for every student step
(a new permutation whenever the previous one is used up) its DSA transformation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from tinyset.augment import DSA
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp

_REF = "GeorgeCazenavette/mtt-distillation distill.py defaults (Cazenavette et al., CVPR 2022)"
_TABLE = ("per-setting values the author provided, as listed by DC-BENCH methods/tm/readme.md "
          "(../shared/reference.md 1.3)")


@dataclass
class MTTConfig(DistillConfig):
    iterations: int = hp(5000, "outer iterations", ge=1)
    experts: str | None = hp(None, "folder of expert trajectories made by `tinyset experts` (required; "
                                   "--set experts=DIR)", optional=True)
    syn_steps: int = hp(20, "student SGD steps on the synthetic images per iteration (N)", ge=1, le=100_000)
    expert_epochs: int = hp(3, "expert epochs the student's steps are matched against (M)", ge=1, le=100_000)
    max_start_epoch: int = hp(25, "start epochs are drawn uniformly from [0, max_start_epoch)", ge=1, le=100_000)
    lr_img: float = hp(1000.0, "learning rate of the synthetic images", gt=0)
    lr_lr: float = hp(1e-5, "learning rate of the learnable student lr", gt=0)
    momentum_lr: float = hp(0.5, "SGD momentum of the learnable student lr", ge=0, lt=1)
    lr_teacher: float = hp(0.01, "initial value of the learnable student lr", gt=0)
    batch_syn: int | None = hp(None, "synthetic images per student step (none: all of them)", ge=1,
                               le=1_000_000, optional=True)


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    family = dataset.lower().partition(":")[0]
    if family == "digits":
        return {"model": "convnet-d2", "iterations": 200, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 5,
                "final_eval": "quick"}
    if family in ("mnist", "fashion-mnist"):
        return {"model": "convnet-w32", "iterations": 200, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 8,
                "batch_syn": min(ipc * 10, 50), "final_eval": "quick"}
    return {}


def _early_dataset_check(values, dataset: str, ipc: int) -> dict:
    """Refuse experts of another dataset while settings are resolved, before any data is read (the
    full check, :func:`tinyset.experts.check_compatible`, runs again when the run starts). Fills nothing."""
    from tinyset.experts import ExpertSet

    path = values.get("experts")
    if not path or ":" in dataset:
        return {}
    try:
        experts = ExpertSet(path)
    except ArtifactError:
        return {}  # check_config reports it
    name = dataset.strip().lower().replace("_", "-")
    if experts.info.name != name:
        raise ConfigError(f"expert set {experts.path} was trained on dataset {experts.info.name!r}; this run "
                          f"distils {name!r}")
    return {}


def _unflatten(theta: torch.Tensor, names: Sequence[str], shapes: Sequence[torch.Size],
               numels: Sequence[int]) -> dict[str, torch.Tensor]:
    return {n: p.view(s) for n, p, s in zip(names, torch.split(theta, list(numels)), shapes)}


def unroll_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                start: torch.Tensor, target: torch.Tensor, syn_steps: int, batch_syn: int | None,
                gen: torch.Generator, augment: DSA | None = None) -> torch.Tensor:
    """The MTT loss of one start/target pair, differentiable in ``images`` and ``lr``.

    ``net`` supplies the function (its own parameter values are ignored): the student is the flat
    vector ``start`` split in ``net.named_parameters()`` order, trained ``syn_steps`` SGD steps of
    step size ``lr`` on ``(images, labels)`` (``batch_syn`` at a time, random order from ``gen``,
    DSA from ``gen`` when ``augment``). Returns ``||theta_N - target||^2 / ||start - target||^2``.
    """
    named = list(net.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    if start.numel() != sum(numels) or target.numel() != start.numel():
        raise ArtifactError(f"expert parameters have {start.numel()}/{target.numel()} values, the network "
                            f"has {sum(numels)}")
    start = start.detach()
    target = target.detach()
    denom = ((start - target) ** 2).sum()
    if not float(denom) > 0:
        raise NumericalError("the expert's start and target parameters are identical (||theta*_t - "
                             "theta*_{t+M}||^2 = 0); the expert set is broken (an epoch stored twice?)")
    n = images.shape[0]
    b = n if batch_syn is None else min(batch_syn, n)
    theta = start.clone().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).to(images.device).split(b))
        idx = chunks.pop(0)
        x, y = images[idx], labels[idx]
        if augment:
            x = augment(x, gen)
        out = functional_call(net, _unflatten(theta, names, shapes, numels), (x,))
        ce = F.cross_entropy(out, y)
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * grad
    return ((theta - target) ** 2).sum() / denom


@METHODS.register("mtt", help="matching training trajectories (Cazenavette et al. 2022); needs `tinyset experts`")
class TrajectoryMatching(Distiller):
    name = "mtt"
    Config = MTTConfig
    paper = Table((
        Row({"iterations": 5000, "init": "real", "lr_img": 1000.0, "momentum_img": 0.5, "lr_lr": 1e-5,
             "momentum_lr": 0.5, "lr_teacher": 0.01, "syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 25},
            f"{_REF}: 5000 iterations, real init, lr_img 1000, images and lr both SGD momentum 0.5, lr_lr 1e-5, "
            "lr_teacher 0.01, syn_steps 20, expert_epochs 3, max_start_epoch 25, batch_syn all, DSA "
            "color_crop_cutout_flip_scale_rotate"),
        Row({}, "no published MTT settings for MNIST, FashionMNIST, SVHN or digits (the paper and DC-BENCH cover "
                "CIFAR-10/100, Tiny ImageNet and ImageNet subsets): distill.py's defaults apply",
            datasets=("mnist", "fashion-mnist", "svhn", "digits")),
        Row({"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 2, "lr_img": 100.0, "lr_lr": 1e-7,
             "lr_teacher": 0.01}, f"{_TABLE}: CIFAR-10 ipc 1 (with ZCA there; tinyset does not whiten)",
            datasets=("cifar10",), ipcs=(1,)),
        Row({"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_img": 100.0, "lr_lr": 1e-5,
             "lr_teacher": 0.001}, f"{_TABLE}: CIFAR-10 ipc 10 (with ZCA there; tinyset does not whiten)",
            datasets=("cifar10",), ipcs=(10,)),
        Row({"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.001}, f"{_TABLE}: CIFAR-10 ipc 50 (no ZCA)", datasets=("cifar10",), ipcs=(50,)),
        Row({"syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.01}, f"{_TABLE}: CIFAR-100 ipc 1 (with ZCA there; tinyset does not whiten)",
            datasets=("cifar100",), ipcs=(1,)),
        Row({"syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.01}, f"{_TABLE}: CIFAR-100 ipc 10 (no ZCA)", datasets=("cifar100",), ipcs=(10,)),
        Row({"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 40, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.01, "batch_syn": 125},
            f"{_TABLE}: CIFAR-100 ipc 50, batch_syn 125 (with ZCA there; tinyset does not whiten)",
            datasets=("cifar100",), ipcs=(50,)),
    ))
    cpu_rule = Rule(
        "2-core CPU budget for digits, MNIST and FashionMNIST (no published row; chosen and measured by us, 1 "
        "thread on a ~3x oversubscribed CPU): 200 iterations, syn_steps 10, expert_epochs 2, quick final "
        "evaluation. digits: model convnet-d2 (the depth-3 ConvNet normalises 2x2 maps on 8x8 images and its "
        "unrolled gradients explode), max_start_epoch 5; experts `tinyset experts --dataset digits --model "
        "convnet-d2 --num-experts 5 --epochs 10 --batch-size 64` (~20 s, 95% validation accuracy), then ipc 1 "
        "~27 s (test accuracy 85% vs 68% for random real images), ipc 10 ~3 min (91% vs 90%). MNIST/"
        "FashionMNIST: model convnet-w32, batch_syn 50, max_start_epoch 8; experts `tinyset experts --dataset "
        "mnist --model convnet-w32 --num-experts 3 --epochs 10` (~2.5 min per expert epoch; width 128 costs ~7x "
        "more), then ~4 s and ~1.2 GB per iteration at ipc 10 (width 128 with 100 images per step: 46 s, 4.3 GB). "
        "Other datasets keep the paper values", _cpu_budget)
    complete = staticmethod(_early_dataset_check)

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        from tinyset.experts import ExpertSet

        super().check_config(cfg)
        assert isinstance(cfg, MTTConfig)
        if cfg.experts is None or not str(cfg.experts).strip():
            raise ConfigError("method mtt needs expert trajectories: --set experts=DIR, a folder made by "
                              "`tinyset experts --dataset D --model M --out DIR`")
        try:
            experts = ExpertSet(cfg.experts)
        except ArtifactError as exc:
            raise ConfigError(f"experts={cfg.experts!r}: {exc}") from None
        from tinyset.models import MODELS

        if experts.model != MODELS._key(cfg.model):
            raise ConfigError(f"expert set {experts.path} holds {experts.model!r} networks; this run matches with "
                              f"model={MODELS._key(cfg.model)!r} (set model={experts.model} or train experts of "
                              f"{MODELS._key(cfg.model)})")
        last = cfg.max_start_epoch - 1 + cfg.expert_epochs
        if last > experts.epochs:
            raise ConfigError(f"max_start_epoch={cfg.max_start_epoch} with expert_epochs={cfg.expert_epochs} needs "
                              f"experts trained for at least {last} epochs; {experts.path} has {experts.epochs} "
                              f"(lower max_start_epoch to {max(1, experts.epochs - cfg.expert_epochs + 1)} or "
                              f"train longer experts)")
        if not experts.complete():
            raise ConfigError(f"expert set {experts.path} has no finished expert (0 of {experts.num_experts}); "
                              f"finish it with `tinyset experts ... --out {experts.path} --resume`")

    def setup(self, gen: torch.Generator) -> None:
        from tinyset.experts import ExpertSet, check_compatible

        cfg = self.cfg
        self.experts = ExpertSet(cfg.experts)
        check_compatible(self.experts, self.info, cfg.model)
        self.pool_ids = self.experts.complete()
        self.net = self.experts.build_model(self.device)
        self.net.requires_grad_(False)  # its own weights are never used: the student is a flat vector
        self.net.train()
        self.labels = self.hard_labels().to(self.device)
        super().setup(gen)  # images + their SGD optimiser (lr_img, momentum_img)
        lr = self.learnable("lr", torch.tensor(float(cfg.lr_teacher), dtype=torch.float32))
        self.optimizer("lr", torch.optim.SGD([lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr))

    def draw(self, gen: torch.Generator) -> tuple[int, int]:
        """The expert and the start epoch of one iteration."""
        i = self.pool_ids[int(torch.randint(len(self.pool_ids), (1,), generator=gen))]
        t = int(torch.randint(self.cfg.max_start_epoch, (1,), generator=gen))
        return i, t

    def step(self, gen: torch.Generator) -> float:
        cfg = self.cfg
        i, t = self.draw(gen)
        start = self.experts.flat_params(i, t, self.device)
        target = self.experts.flat_params(i, t + cfg.expert_epochs, self.device)
        lr = self.tensors["lr"]
        loss = unroll_loss(self.net, self.images, self.labels, lr, start, target, cfg.syn_steps, cfg.batch_syn,
                           gen, self.augment)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        for opt in self.optimizers.values():
            opt.step()
        value = float(lr.detach())
        if not value > 0:
            raise NumericalError(f"the learned lr became {value:.4g} (<= 0; it started at {cfg.lr_teacher}); "
                                 f"lower lr_lr (now {cfg.lr_lr})")
        return float(loss.detach())

    def to_synset(self, meta):
        meta = dict(meta)
        if meta:
            meta["experts"] = {"path": str(self.experts.path), "model": self.experts.model,
                               "model_args": self.experts.model_args, "epochs": self.experts.epochs,
                               "complete": len(self.pool_ids)}
        return super().to_synset(meta)


__all__ = ["MTTConfig", "TrajectoryMatching", "unroll_loss"]
