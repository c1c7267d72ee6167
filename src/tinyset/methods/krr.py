"""KRR: kernel ridge regression distillation with a pool of online-trained networks, after FRePo
(Zhou, Nezhadarya & Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022).

The synthetic set ``(X_s, Y_s)`` is learned so that kernel ridge regression *on it* predicts real
data well. One outer iteration (:meth:`KernelRidge.step`):

1. draw one network ``f`` of a pool of ``pool_size`` networks;
2. features of the synthetic images ``F_s = f(X_s)`` (with autograd, to reach the images) and of a
   real batch ``F_t = f(X_t)`` (``batch_real`` images per class, without autograd);
3. the linear kernel of those features, ``K_ss = F_s F_s^T`` and ``K_ts = F_t F_s^T``, and the
   kernel ridge prediction of the real batch ``P = K_ts (K_ss + lambda I)^-1 Y_s``
   (:func:`tinyset.evaluate.krr.krr_predict`, shared with the KRR evaluation protocol) with
   ``lambda = ridge * tr(K_ss) / n`` (the ridge scaled by the mean eigenvalue, as FRePo does, so the
   same ``ridge`` fits any feature scale). The solve runs in ``solve_dtype`` (float64 by default;
   ``torch.linalg.cholesky_ex`` + ``cholesky_solve``, falling back to ``torch.linalg.solve`` when
   the factorisation fails); the features run under the run's precision (bf16 autocast where the
   CPU has native bf16) and are cast up before the kernel is formed;
4. loss ``sum_k (P - Y_t)^2`` averaged over the real batch, ``Y_t`` the real images' centred
   one-hot targets ``onehot - 1/K``, plus ``label_margin`` times FRePo's label term
   ``-min(top1(Y_s) - top2(Y_s), 1/K)`` per synthetic row (it keeps each learned label's own class
   ahead by at least ``1/K``); one Adam step on the images (``lr_img``) and the labels
   (``lr_label``), both decayed by a cosine from their value to ``lr_min_factor`` times it over
   ``iterations``;
5. ``online_steps`` training steps of the drawn network on the synthetic set itself (MSE of its
   outputs against ``Y_s``, Adam ``lr_net``, minibatches of ``batch_syn``); a network that has
   taken ``max_online_steps`` steps is re-initialised (weights from the run's generator, optimiser
   state cleared). The pool's ages start staggered (``i * max_online_steps / pool_size``) so that
   the pool always holds networks at every stage of training.

The learnable labels ``Y_s`` start as FRePo's: centred one-hot rows ``onehot - 1/K`` divided by
``sqrt(K / 10)``. The pool networks and their Adam optimisers are declared with
:meth:`~tinyset.methods.base.Distiller.module` / :meth:`~tinyset.methods.base.Distiller.optimizer`,
the pool's ages and the iteration count live in the buffers of a small declared module, so a
checkpoint holds all of the state and ``--resume`` is bit-exact on CPU. (The learning-rate cosine
spans ``iterations``: resuming with another ``iterations`` changes the schedule from there on.)

**What the artifact stores.** ``Y_s`` are regression targets, not probabilities (rows sum to about
0, entries may be negative). The set file keeps them unchanged as the named extra tensor
``extra.krr_targets`` (``SyntheticSet.extras["krr_targets"]``); that is what the KRR evaluation
protocol (:mod:`tinyset.evaluate.krr`, ``tinyset evaluate FILE --protocol krr``) regresses on. For
the SGD protocols the set's labels are ``softmax(Y_s / label_temperature)``, stored as ordinary
soft labels (probability rows), so the networks train with soft cross-entropy on the learned
labels; results say ``learned (soft labels)`` and are never put beside hard-label rows. With the
default temperature 0.2 a fresh centred one-hot row becomes about 94% on its class.

**KIP and why not here.** KIP (Nguyen, Chen & Lee, ICLR 2021 / NeurIPS 2021) also learns a set by
kernel ridge regression, but its kernel is the infinite-width neural tangent (or NNGP) kernel of a
ConvNet, computed exactly with JAX's ``neural_tangents``: no network is ever trained, and one
kernel entry of a convolutional NTK costs work quadratic in the number of pixels, which is why
KIP needed hundreds of GPUs' worth of compute for its ConvNet results. There is no JAX in tinyset
and no CPU budget for convolutional NTKs. FRePo replaces the NTK by the *finite* feature kernel of
the last layer of real networks of the evaluation architecture, kept at several stages of training
by the online pool; it reports accuracy at KIP's level (KIP's MNIST/FashionMNIST rows are in
../shared/reference.md 2.2; issue #11 quotes 98.6-98.9 / 86.2-88.5 at ipc 10 for learned-label
kernel methods) at a small fraction of the cost, and its distilled images transfer to SGD-trained networks because the kernel *is* such a network's
feature map. That is what we implement, in PyTorch, with our registry's ConvNets. The ``paper``
preset uses ``convnet-frepo``, FRePo's ``conv`` network (depth 3, no normalisation, channels doubling
per block: 128, 256, 512). The ``cpu`` rule uses the same network at half width (``width`` 32:
32/64/128 channels) for 12000 iterations on MNIST/FashionMNIST at ipc <= 10, and the constant-width
``convnet-nn`` elsewhere (width 64 on MNIST/FashionMNIST at larger ipc, 128 on digits): several times
cheaper on a CPU; that difference is ours.

**Semantics read from** yongchaoz/FRePo ``script/distill_torch.py`` (the authors' PyTorch port):
Adam for images and labels at 1e-3 with a cosine to 0.1x (the JAX version and the paper use LAMB),
pool 10, reset after 100 online steps, online Adam 3e-4 on MSE with minibatches of at most 500,
ridge 1e-6 times the mean diagonal, a real batch of 1024 (about 102 per class for ten classes),
no augmentation during distillation on MNIST-like data. Our own choices: class-balanced real
batches, a constant online learning rate (the port's warm-up is longer than a network's life),
one fp64 Cholesky solve, and the ``augment`` option (off by default): DSA on both sides of every
regression and on the pool networks' training batches, each image its own transformation, so the
images are learned under the augmentation the SGD evaluation protocols train with (on FashionMNIST ipc 10
it lowered held-out accuracy by 3 points, docs/measurements.md 2026-12-05).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.errors import ConfigError, NumericalError
from tinyset.evaluate.krr import TARGETS_EXTRA, krr_predict
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.models import MODELS, ConvNet, create_model
from tinyset.models.layers import init_parameters
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast

_REF = "yongchaoz/FRePo script/distill_torch.py (Zhou et al., NeurIPS 2022; the authors' PyTorch port)"
#: dtypes of the kernel solve
SOLVE_DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


@dataclass
class KRRConfig(DistillConfig):
    iterations: int = hp(20000, "outer iterations", ge=1)
    model: str = hp("convnet-nn", "architecture of the pool networks whose last-layer features make the kernel "
                                  "(convnet-frepo: FRePo's, widths doubling per block; convnet-nn: constant width; "
                                  "both without normalisation)")
    width: int | None = hp(None, "channels of the pool's ConvNet, of its first block for convnet-frepo (none: the "
                                 "architecture's own, 128); ConvNet-family models only", ge=1, le=4096,
                           optional=True)
    lr_img: float = hp(1e-3, "Adam learning rate of the synthetic images (cosine-decayed; momentum_img is "
                             "not used)", gt=0)
    lr_label: float = hp(1e-3, "Adam learning rate of the learned labels (cosine-decayed)", gt=0)
    lr_min_factor: float = hp(0.1, "the images' and labels' learning rates decay by a cosine to this factor at "
                                   "the last iteration", ge=0, le=1)
    learn_labels: bool = hp(True, "learn the labels Y_s (false: keep the initial centred one-hot targets)")
    label_margin: float = hp(1.0, "weight of FRePo's label term -min(top1 - top2, 1/K) per synthetic row", ge=0)
    label_temperature: float = hp(0.2, "the stored soft labels (for SGD evaluation) are softmax(Y_s / T)", gt=0)
    batch_real: int = hp(102, "real images per class per iteration (the kernel's regression targets)",
                         ge=1, le=65536)
    pool_size: int = hp(10, "networks in the online pool", ge=1, le=1000)
    max_online_steps: int = hp(100, "a pool network is re-initialised after this many training steps", ge=1)
    online_steps: int = hp(1, "training steps of the drawn pool network per iteration", ge=0, le=10000)
    lr_net: float = hp(3e-4, "Adam learning rate of the pool networks", gt=0)
    batch_syn: int = hp(500, "synthetic images per pool-network training step (all when the set is smaller)",
                        ge=1, le=1_000_000)
    ridge: float = hp(1e-6, "kernel ridge lambda relative to the mean diagonal of K_ss: lambda = ridge * "
                            "tr(K_ss) / n", gt=0, le=1e6)
    solve_dtype: str = hp("fp64", "dtype of the kernel and its solve", choices=tuple(SOLVE_DTYPES))
    augment: bool = hp(False, "DSA (dsa_strategy's transformations, each image its own draw) on the synthetic "
                              "and real images of every regression and on the pool networks' training "
                              "batches; ours: FRePo does not augment MNIST-like data")


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    family = dataset.lower().partition(":")[0]
    if family == "digits":
        return {"iterations": 300, "batch_real": 32, "model": "convnet-nn", "final_eval": "quick"}
    if family in ("mnist", "fashion-mnist") and ipc <= 10:
        values = {"iterations": 12000, "batch_real": 32, "model": "convnet-frepo", "width": 32, "final_eval": "quick"}
        if family == "mnist" and ipc == 10:  # from the mi selection (cpu_rule)
            values["init"] = "select:mi,diversity=0.1"
        return values
    if family in ("mnist", "fashion-mnist"):
        return {"iterations": 3000, "batch_real": 32, "model": "convnet-nn", "width": 64, "final_eval": "quick"}
    return {}


def centred_onehot(labels: torch.Tensor, num_classes: int, scale: float = 1.0) -> torch.Tensor:
    """FRePo's regression targets: ``(onehot(labels) - 1/K) / scale`` as float32 ``[N, K]``."""
    return (F.one_hot(labels, num_classes).float() - 1.0 / num_classes) / scale


def label_margin_loss(targets: torch.Tensor) -> torch.Tensor:
    """FRePo's label term, mean over rows of ``-min(top1 - top2, 1/K)``: it rewards a row's largest
    entry for leading the second, up to a lead of ``1/K`` (beyond it the term is constant)."""
    k = targets.shape[-1]
    if k < 2:
        return targets.new_zeros(())
    top = targets.topk(2, dim=-1).values
    return -(top[:, 0] - top[:, 1]).clamp(max=1.0 / k).mean()


class PoolState(nn.Module):
    """The non-learnable counters of the run (buffers, so the loop checkpoints them): every pool
    network's age in training steps and the number of finished outer iterations."""

    def __init__(self, pool_size: int):
        super().__init__()
        self.register_buffer("ages", torch.zeros(pool_size, dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))


@METHODS.register("krr", help="kernel ridge regression with an online network pool, learned labels (FRePo, "
                              "Zhou et al. 2022)")
class KernelRidge(Distiller):
    name = "krr"
    Config = KRRConfig
    uses_dsa = False  # FRePo does not augment while distilling MNIST-like data; `augment` turns DSA on
    paper = Table((
        Row({"iterations": 20000, "init": "real", "model": "convnet-frepo", "lr_img": 1e-3, "lr_label": 1e-3,
             "lr_min_factor": 0.1, "learn_labels": True, "label_margin": 1.0, "batch_real": 102, "pool_size": 10,
             "max_online_steps": 100, "online_steps": 1, "lr_net": 3e-4, "batch_syn": 500, "ridge": 1e-6},
            f"{_REF}: Adam 1e-3 on images and labels with a cosine to 0.1x, learned labels with the margin term, "
            "real init, pool of 10 networks (their conv network: depth 3, no normalisation, widths 128/256/512) "
            "reset after 100 online Adam(3e-4) steps, synthetic minibatch 500, ridge 1e-6 x tr(K)/n, real batch 1024 (102 per "
            "class here). The number of iterations is the script's argument (no default); 20000 is ours"),
    ))
    cpu_rule = Rule(
        "2-core CPU budget (chosen by us), 32 real images per class, quick final evaluation: digits "
        "convnet-nn (constant width, no normalisation), 300 iterations; MNIST/FashionMNIST ipc <= 10 "
        "FRePo's network at half width (convnet-frepo, width 32: 32/64/128 channels), 12000 iterations "
        "(about 0.25 CPU-s per iteration on an AMD EPYC with AVX512-BF16, bf16; on held-out MNIST training "
        "images 94.70 against 93.67 for the earlier rule, convnet-nn width 64 for 3000 iterations, "
        "docs/measurements.md 2026-12-05); on MNIST at ipc 10 from the mi selection (init "
        "select:mi,diversity=0.1): held-out 96.53 against 94.70 from random images, test 97.93 against 96.94 "
        "(docs/measurements.md, 2026-12-05, third session; on FashionMNIST that start was behind on held-out "
        "images, 81.03 against 82.07 after 4000 iterations, so it keeps random images); MNIST/FashionMNIST "
        "ipc > 10 convnet-nn width 64, 3000 "
        "iterations (benchmarks/bench_krr.py, MNIST ipc 10, EPYC AVX512-BF16, 2 threads, bf16: width 128 "
        "2.3 s per iteration, width 64 0.7-1.2 s)", _cpu_budget)

    @classmethod
    def augments(cls, cfg: DistillConfig) -> bool:
        return bool(getattr(cfg, "augment", False))

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        super().check_config(cfg)
        assert isinstance(cfg, KRRConfig)
        if cfg.width is not None and getattr(MODELS.get(cfg.model), "func", None) is not ConvNet:
            raise ConfigError(f"width={cfg.width} applies to ConvNet-family models; model={cfg.model!r} is not one "
                              f"(unset width or choose e.g. convnet-nn)")
        if cfg.online_steps > cfg.max_online_steps:
            raise ConfigError(f"online_steps={cfg.online_steps} exceeds max_online_steps={cfg.max_online_steps}: "
                              f"a pool network would be reset before it is ever used")

    # ------------------------------------------------------------------ state
    def setup(self, gen: torch.Generator) -> None:
        cfg, k = self.cfg, self.info.num_classes
        images = self.learnable("images", self.initial_images(gen))
        targets = self.learnable("targets", centred_onehot(self.hard_labels(), k, math.sqrt(k / 10)))
        targets.requires_grad_(bool(cfg.learn_labels))
        groups = [{"params": [images], "lr": cfg.lr_img, "base_lr": cfg.lr_img}]
        if cfg.learn_labels:
            groups.append({"params": [targets], "lr": cfg.lr_label, "base_lr": cfg.lr_label})
        self.optimizer("synthetic", torch.optim.Adam(groups))
        self.nets: list[nn.Module] = []
        for i in range(cfg.pool_size):
            net = self.pool_network(gen)
            self.nets.append(self.module(f"pool{i}", net))
            self.optimizer(f"pool{i}", torch.optim.Adam(net.parameters(), lr=cfg.lr_net))
        self.state = self.module("state", PoolState(cfg.pool_size).to(self.device))
        stride = cfg.max_online_steps / cfg.pool_size
        self.state.ages.copy_(torch.tensor([int(i * stride) for i in range(cfg.pool_size)]))
        self._last: dict[str, float] = {}

    def pool_network(self, gen: torch.Generator) -> nn.Module:
        """A ``model`` network (``width`` channels when set) initialised from ``gen``, weights frozen
        (they are unfrozen only for the network's own training steps)."""
        info = self.info
        kwargs = {"width": self.cfg.width} if self.cfg.width is not None else {}
        net = create_model(self.cfg.model, info.channels, info.num_classes, info.image_size,
                           generator=make_generator(derive_seed(gen)), device=self.device, **kwargs)
        net.requires_grad_(False)
        return net.train()

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors["targets"]

    def features(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Last-layer features of ``net`` under the run's precision, as float32 ``[N, D]``."""
        with autocast(self.device, self.precision):
            return net.embed(x).float().flatten(1)

    def schedule(self) -> float:
        """The cosine factor of the synthetic learning rates at the current iteration."""
        t = min(int(self.state.iteration), self.cfg.iterations) / max(self.cfg.iterations, 1)
        low = self.cfg.lr_min_factor
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))

    # ------------------------------------------------------------------ one iteration
    def augmented(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """``x`` under DSA with an independent transformation per image (``augment``), else ``x``."""
        if not self.augment or gen is None:
            return x
        n = x.shape[0]
        prm = self.augment.sample(n, self.info.image_size, gen, op_groups=torch.arange(n))
        return self.augment.apply(x, prm)

    def krr_loss(self, net: nn.Module, real: torch.Tensor, real_labels: torch.Tensor,
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(regression MSE of the real batch, label margin term)`` with ``net``'s feature kernel;
        with ``augment`` both sides are augmented from ``gen``."""
        k = self.info.num_classes
        with torch.no_grad():
            feat_real = self.features(net, self.augmented(real, gen))
        feat_syn = self.features(net, self.augmented(self.images, gen))
        pred = krr_predict(feat_syn, self.targets, feat_real, self.cfg.ridge, SOLVE_DTYPES[self.cfg.solve_dtype])
        mse = ((pred - centred_onehot(real_labels, k)) ** 2).sum(-1).mean()
        margin = label_margin_loss(self.targets) if self.cfg.learn_labels else mse.new_zeros(())
        return mse, margin

    def train_pool_network(self, i: int, gen: torch.Generator) -> None:
        """``online_steps`` Adam steps of pool network ``i`` on the synthetic set (MSE against the
        learned targets); re-initialise it once it is ``max_online_steps`` old."""
        cfg, net, opt = self.cfg, self.nets[i], self.optimizers[f"pool{i}"]
        x_all, y_all = self.images.detach(), self.targets.detach()
        n = x_all.shape[0]
        net.requires_grad_(True)
        for _ in range(cfg.online_steps):
            if n > cfg.batch_syn:
                idx = torch.randperm(n, generator=gen)[:cfg.batch_syn].to(self.device)
                x, y = x_all[idx], y_all[idx]
            else:
                x, y = x_all, y_all
            x = self.augmented(x, gen)
            with autocast(self.device, self.precision):
                out = net(x).float()
            loss = F.mse_loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not bool(torch.isfinite(loss)):
                raise NumericalError(f"pool network {i}: its training loss on the synthetic set is {float(loss)}; "
                                     f"lower lr_net (now {cfg.lr_net})")
            opt.step()
        net.requires_grad_(False)
        self.state.ages[i] += cfg.online_steps
        if int(self.state.ages[i]) >= cfg.max_online_steps:
            init_parameters(net, make_generator(derive_seed(gen)))
            opt.state.clear()
            self.state.ages[i] = 0

    def step(self, gen: torch.Generator) -> float:
        cfg = self.cfg
        factor = self.schedule()
        opt = self.optimizers["synthetic"]
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        i = int(torch.randint(cfg.pool_size, (1,), generator=gen))
        net = self.nets[i]
        real, real_labels = self.pool_real(gen)
        mse, margin = self.krr_loss(net, real, real_labels, gen)
        loss = mse + cfg.label_margin * margin
        self.update("synthetic", loss)
        if cfg.online_steps:
            self.train_pool_network(i, gen)
        self.state.iteration += 1
        self._last = {"krr_mse": float(mse.detach()), "label_margin": float(margin.detach()), "network": i,
                      "lr_factor": factor}
        return float(mse.detach())

    def pool_real(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_real`` real images of every class (class by class) and their labels."""
        real, labels = self.pool.sample_classes(self.cfg.batch_real, gen)
        return real, labels.to(self.device)

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    # ------------------------------------------------------------------ the artifact
    def soft_labels(self) -> torch.Tensor:
        """The stored probability rows: ``softmax(Y_s / label_temperature)``."""
        return torch.softmax(self.targets.detach().float() / self.cfg.label_temperature, dim=1)

    def to_synset(self, meta: dict[str, Any]) -> Any:
        from tinyset.synset import SyntheticSet

        meta = dict(meta)
        if meta:
            meta["labels"] = {"kind": "learned", "targets": f"extra.{TARGETS_EXTRA}",
                              "soft_labels": f"softmax(targets / {self.cfg.label_temperature:g})"}
        return SyntheticSet(self.images.detach().cpu(), self.soft_labels().cpu(), self.info, meta=meta,
                            extras={TARGETS_EXTRA: self.targets.detach().cpu().clone()}, zca=self.zca)


__all__ = ["KRRConfig", "KernelRidge", "PoolState", "SOLVE_DTYPES", "TARGETS_EXTRA", "centred_onehot", "krr_predict",
           "label_margin_loss"]
