"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), and
DSA: the same with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

Each outer iteration takes a freshly initialised network and alternates ``outer_loop`` times:
(a) for every class, the distance between the network's parameter gradients on a real batch and
on that class's synthetic images, summed over classes, then one SGD step on the images; (b)
``inner_loop`` epochs of SGD on the network over the synthetic set. BatchNorm running statistics
are set from 16 real images per class and then frozen, as in the reference. DSA applies the same
sampled augmentation to the real and synthetic batch of a class before each gradient.

How it is computed (the mathematics of the per-class loop, organised for speed):

* **Per-class gradients in one pass.** The weight gradient of a shared network is a sum over its
  batch, so one backward over all classes cannot tell the classes apart. The batched pass
  (:meth:`GradientMatching.class_gradients` with ``batched=True``) replicates the network ``K``
  times as one ``members=K`` module with identical weights (:mod:`tinyset.models.layers`): member
  ``k`` sees only class ``k``'s images, the loss is the sum over members of their mean
  cross-entropy, and one backward leaves class ``k``'s gradient in member ``k``'s slice of every
  weight (``create_graph=True`` on the synthetic side). Each member computes the network's
  function: InstanceNorm is per sample, and BatchNorm layers are frozen with the network's running
  statistics copied to every member.
* **Which pass runs where** (:func:`class_batching`, measured): on CUDA, where these small
  networks are bound by kernel launches, both sides use the batched pass (at most
  :data:`BATCHED_MAX_IMAGES` images per pass, for memory). On CPU the convolutions do the work,
  and oneDNN runs ``K`` dense convolutions of one class each faster than one grouped convolution
  of ``K`` groups (measured, 1 thread, bf16, MNIST ConvNet, 10 classes: real side of 64 images per
  class compiled, batched 1.25x slower; synthetic side batched 1.7x slower at ipc 10, 1.1x slower
  at ipc 3, 1.2x faster at ipc 1). So on CPU the real side runs class by class and the synthetic
  side is batched only up to :data:`CPU_BATCHED_SYN_MAX_IPC`. Both give the same numbers up to
  rounding (``tests/test_dc_batched.py``: loss and image gradients to 1e-5 relative).
* **Compiled forward passes** (``compile``): the real-side forward (whose backward is compiled
  with it) and the inner loop's training forward are compiled once per run (the network object
  is re-initialised in place every iteration instead of rebuilt, as in DM); compiled, the real
  side ran 1.7x faster than eager (bf16, 1 thread). The synthetic side needs a second
  derivative, which ``torch.compile``'d autograd graphs do not provide: it runs eagerly (with
  oneDNN's direct first convolution; eager code never takes the im2col path), or, class by class on
  CPU, as a compiled ``torch.func`` function (next point).
* **Compiled synthetic side** (CPU, class by class, when ``compile`` is on): instead of the eager
  double backward, :meth:`GradientMatching.functional_syn_loss` compiles, per class, the distance
  of the ``torch.func.grad`` of the cross-entropy and its gradient with respect to the augmented
  synthetic images (``torch.func.grad_and_value``) as one graph; the DSA augmentation is
  differentiated eagerly through a surrogate term. Measured on an AMX CPU (bf16, one thread, MNIST
  ipc 10): 0.2 s against 1.1 s per image update for that side, a DSA outer iteration 1.25x faster.
  ``tests/test_dc_batched.py`` checks loss and image gradients against the per-class loop to 1e-5.
* **Precision**: the run's resolved precision (``auto`` is bf16 only where the CPU runs it
  natively, see :func:`tinyset.runtime.resolve_precision`); gradients and distances are fp32.
* **Random draws** are those of the per-class loop, in its order: per outer step the BatchNorm
  batch (BatchNorm networks only), then for class 0, 1, ...: its real batch and its DSA draw
  (one transformation shared by the real and the synthetic images of the class), then the inner
  loop's shuffles and augmentations. The fresh network is drawn from ``derive_seed(gen)`` as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from tinyset.errors import ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import INIT_HELP, DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.models import TinyNet, create_model
from tinyset.models.layers import Conv2d, Linear, init_parameters
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, compile_function
from tinyset.training import CompiledForward, TrainSettings, compile_status, train_ensemble

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


def _unit_rows(shape: Sequence[int]) -> int:
    """Output units of one network's weight (the rows :func:`_rows` makes)."""
    return shape[1] if len(shape) == 3 and shape[0] == 1 else shape[0]


def class_distance(name: str, g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """The distance ``name`` of :data:`DISTANCES` summed over classes, for gradients stacked by class.

    ``g_syn[i]``, ``g_real[i]``: ``[K, *shape_i]``, row ``k`` the gradient of class ``k`` (``shape_i``
    the parameter's shape in one network). Equal to
    ``sum_k DISTANCES[name]([g[k] for g in g_syn], [g[k] for g in g_real])``.
    """
    if name not in DISTANCES:
        raise ConfigError(f"unknown distance {name!r}; expected one of {', '.join(DISTANCES)}")
    k = g_syn[0].shape[0]
    if DISTANCES[name] is distance_layerwise:
        total = g_syn[0].new_zeros(())
        for gs, gr in zip(g_syn, g_real):
            rows = _unit_rows(gs.shape[1:])
            gs, gr = gs.reshape(k, rows, -1), gr.reshape(k, rows, -1)
            cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    if name == "mse":
        return sum(((gs - gr) ** 2).sum() for gs, gr in zip(g_syn, g_real))  # type: ignore[return-value]
    gs = torch.cat([g.reshape(k, -1) for g in g_syn], 1)
    gr = torch.cat([g.reshape(k, -1) for g in g_real], 1)
    return (1 - (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)).sum()


#: on CPU, the synthetic gradients of all classes go through one batched pass up to this ipc
#: (a class's own batch is then too small for the convolutions; see the module docstring)
CPU_BATCHED_SYN_MAX_IPC = 1
#: at most this many images (summed over classes) go through one batched pass: the activations of
#: a pass are kept for its backward (10 classes x 256 CIFAR images in fp32 would hold several GB)
BATCHED_MAX_IMAGES = 2048
#: compile (``compile=auto``, CPU) when a run's matching sees at least this many real images
COMPILE_MIN_REAL_IMAGES = 100_000


def classes_per_pass(num_classes: int, per_class: int) -> int:
    """Classes per batched pass: the largest divisor of ``num_classes`` whose passes hold at most
    :data:`BATCHED_MAX_IMAGES` images (at least 1). A divisor, so that every pass has the same
    number of members and one replica serves them all."""
    cap = max(1, BATCHED_MAX_IMAGES // max(1, per_class))
    return max(d for d in range(1, num_classes + 1) if num_classes % d == 0 and d <= cap)


def class_batching(device: torch.device, ipc: int) -> tuple[bool, bool]:
    """Whether the real and the synthetic gradients of all classes go through one batched pass,
    ``(real, synthetic)``: both on CUDA and other accelerators; on CPU the real side class by class,
    the synthetic side batched while ``ipc <=`` :data:`CPU_BATCHED_SYN_MAX_IPC`."""
    if device.type != "cpu":
        return True, True
    return False, ipc <= CPU_BATCHED_SYN_MAX_IPC


_REF = "VICO-UoE/DatasetCondensation"


@dataclass
class DCConfig(DistillConfig):
    iterations: int = hp(1000, "outer iterations (each: a fresh network, outer_loop image updates)", ge=1)
    init: str = hp("noise", INIT_HELP)
    lr_img: float = hp(0.1, "learning rate of the synthetic images", gt=0)
    lr_net: float = hp(0.01, "learning rate of the network's inner updates", gt=0)
    batch_train: int = hp(256, "batch size of the network's inner updates", ge=1)
    distance: str = hp("layerwise", "gradient distance ('ours' is the reference's name for layerwise)",
                       choices=tuple(DISTANCES))
    outer_loop: int | None = hp(None, "image updates per iteration (none: the published value for the ipc, "
                                      "else min(ipc, 50))", ge=1, optional=True)
    inner_loop: int | None = hp(None, "inner network epochs between image updates (none: published value, "
                                      "else round(500 / ipc) clamped to [10, 50])", ge=1, optional=True)
    compile: str = hp("auto", "torch.compile the real-gradient and the inner-loop forward passes (auto: on CPU "
                              f"when the run matches at least {COMPILE_MIN_REAL_IMAGES} real images)",
                      choices=("auto", "on", "off"))


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
        cfg, info = self.cfg, self.info
        self.distance = DISTANCES[cfg.distance]
        self.layerwise = self.distance is distance_layerwise
        self.outer_loop = int(cfg.outer_loop)
        self.inner_loop = int(cfg.inner_loop)
        # one network object, re-initialised in place every iteration (the weights a newly built one
        # would get from the same seed), so that its compiled forward passes are reused
        self.net = create_model(cfg.model, info.channels, info.num_classes, info.image_size, device=self.device)
        self.compiled = self.wants_compile()
        self.batched_real, self.batched_syn = class_batching(self.device, self.ipc)
        self._replicas: dict[int, TinyNet] = {}  # members -> replica of ``_replicas_of``
        self._replicas_of: nn.Module | None = None
        self._real_forward = CompiledForward(cfg.model, "match") if self.compiled else None
        self._syn_fn = None  # the compiled synthetic-side function (built on first use)
        super().setup(gen)

    def wants_compile(self) -> bool:
        real = self.cfg.iterations * self.outer_loop * self.info.num_classes * self.cfg.batch_real
        return self.compile_wanted(self.device.type == "cpu" and real >= COMPILE_MIN_REAL_IMAGES)

    def describe_path(self) -> str:
        """Which computation runs, for benchmarks and logs."""
        side = {True: "batched over classes", False: "class by class"}
        still = [self._real_forward.compiled] if self._real_forward is not None else []
        still += list(compile_status(self.net).values())
        compiled = ("compiled" if all(still) else "compile fell back to eager") if self.compiled else "eager"
        syn = side[self.batched_syn] + (" (compiled torch.func)" if self._compiled_syn(self.batched_syn) else "")
        return f"{self.precision}, {compiled}, real gradients {side[self.batched_real]}, synthetic gradients {syn}"

    def _compiled_syn(self, batched_syn: bool) -> bool:
        """Whether the class-by-class synthetic side runs as one compiled torch.func function."""
        return self.compiled and not batched_syn

    # ------------------------------------------------------------------ one outer iteration
    def step(self, gen: torch.Generator) -> float:
        k, images, net = self.info.num_classes, self.images, self.net
        init_parameters(net, make_generator(derive_seed(gen)))
        net.train()
        total = 0.0
        for ol in range(self.outer_loop):
            self._set_bn_stats(net, gen)
            loss = self.matching_loss(*self.class_batches(gen))
            self.update("images", loss)
            total += loss.item()
            if ol == self.outer_loop - 1:
                break
            self._train_net(net, images.detach(), gen)
        return total / (k * self.outer_loop)

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

    def class_batches(self, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every class's real batch (``batch_real`` images) and synthetic images, augmented (DSA) with
        one draw per class shared by both; the draws in the per-class loop's order."""
        k, ipc, b = self.info.num_classes, self.ipc, self.cfg.batch_real
        reals, syns = [], []
        for c in range(k):
            real = self.pool.sample_class(c, b, gen)
            syn = self.images[c * ipc:(c + 1) * ipc]
            real, syn = self.siamese(real, syn, gen, torch.zeros(b, dtype=torch.long),
                                     torch.zeros(ipc, dtype=torch.long))
            reals.append(real)
            syns.append(syn)
        return reals, syns

    def matching_loss(self, reals: Sequence[torch.Tensor], syns: Sequence[torch.Tensor],
                      batched_real: bool | None = None, batched_syn: bool | None = None) -> torch.Tensor:
        """``sum_c distance(grad on syns[c], grad on reals[c])`` for the current network; the passes
        default to :func:`class_batching`'s choice."""
        g_real = self.class_gradients(reals, create_graph=False,
                                      batched=self.batched_real if batched_real is None else batched_real)
        batched_syn = self.batched_syn if batched_syn is None else batched_syn
        if self._compiled_syn(batched_syn):
            return self.functional_syn_loss(syns, g_real)
        g_syn = self.class_gradients(syns, create_graph=True, batched=batched_syn)
        return class_distance(self.cfg.distance, g_syn, g_real)

    # ------------------------------------------------------------------ compiled synthetic side
    def functional_syn_loss(self, syns: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_c distance(grad on syns[c], g_real[c])`` through one compiled function per class.

        The eager synthetic side differentiates through the network's gradient (create_graph) and
        later backpropagates through that graph: many small eager kernels, unfused (measured 1.1 s
        per image update on an AMX CPU, MNIST ipc 10, bf16). Here ``torch.func.grad_and_value`` of
        "distance of ``torch.func.grad`` of the cross-entropy" gives, for each class, the distance
        and its gradient with respect to the (augmented) synthetic images ``syns[c]``, compiled as
        one graph (0.2 s for the same work). The returned tensor has the distance's value and, by
        a surrogate term ``sum_c <syns[c], d distance / d syns[c]>`` (whose value is subtracted
        again), the same gradient with respect to whatever ``syns`` were computed from (the images
        and the differentiable DSA). Same mathematics as the eager path, up to rounding.
        """
        net = self.net
        name_of = {id(t): n for n, t in net.named_parameters()}
        params = {name_of[id(t)]: t.detach() for t in self._params(net)}  # in g_real's order
        rest = {n: t.detach() for n, t in net.named_parameters() if n not in params}
        rest.update(dict(net.named_buffers()))
        fn = self._syn_function(tuple(params))
        value = torch.zeros((), device=self.device)
        surrogate = torch.zeros((), device=self.device)
        for c, x in enumerate(syns):
            target = torch.full((x.shape[0],), c, dtype=torch.long, device=self.device)
            gx, v = fn(x.detach(), params, rest, target, [g[c] for g in g_real])
            value = value + v
            surrogate = surrogate + (x * gx).sum()
        return value.detach() + (surrogate - surrogate.detach())

    def _syn_function(self, names: tuple[str, ...]):
        if self._syn_fn is None or self._syn_fn[0] != names:
            net, device, precision, distance = self.net, self.device, self.precision, self.cfg.distance

            def cross_entropy(params, rest, x, target):
                with autocast(device, precision):
                    out = functional_call(net, {**params, **rest}, (x,))
                return F.cross_entropy(out.float(), target)

            def distance_to_real(x, params, rest, target, g_real):
                g = torch.func.grad(cross_entropy)(params, rest, x, target)
                return class_distance(distance, [g[n].float().unsqueeze(0) for n in names],
                                      [t.unsqueeze(0) for t in g_real])

            self._syn_fn = (names, compile_function(torch.func.grad_and_value(distance_to_real), dynamic=None))
        return self._syn_fn[1]

    # ------------------------------------------------------------------ per-class gradients
    def _params(self, net: nn.Module) -> list[torch.Tensor]:
        """The parameters the distance compares: conv/linear weights (layerwise) or all."""
        return _weight_rows(net) if self.layerwise else list(net.parameters())

    def class_gradients(self, xs: Sequence[torch.Tensor], create_graph: bool, batched: bool) -> list[torch.Tensor]:
        """Gradients of the mean cross-entropy of ``xs[c]`` (images of class ``c``) w.r.t. the compared
        parameters, one list entry per parameter, stacked by class: ``[K, *shape]`` in fp32.

        ``batched``: passes of a replica with one member per class (every ``xs[c]`` the same size),
        as many classes per pass as :func:`classes_per_pass` allows; else one pass per class.
        ``create_graph``: keep the graph (synthetic side); else detached.
        """
        if batched:
            step = classes_per_pass(len(xs), xs[0].shape[0])
            parts = [self._gradients_batched(xs[i:i + step], i, create_graph) for i in range(0, len(xs), step)]
            grads = [torch.cat(p) for p in zip(*parts)]
        else:
            per_class = [self._gradients_one(x, c, create_graph) for c, x in enumerate(xs)]
            grads = [torch.stack(gs) for gs in zip(*per_class)]
        return [g.float() if create_graph else g.detach().float() for g in grads]

    def _gradients_one(self, x: torch.Tensor, c: int, create_graph: bool) -> tuple[torch.Tensor, ...]:
        net = self.net
        params = self._params(net)
        # compiled graphs have no second derivative: the synthetic side runs eagerly
        forward = self._real_forward if (self._real_forward is not None and not create_graph) else None
        with autocast(self.device, self.precision):
            out = forward(net, x) if forward is not None else net(x)
        target = torch.full((x.shape[0],), c, dtype=torch.long, device=self.device)
        return torch.autograd.grad(F.cross_entropy(out.float(), target), params, create_graph=create_graph)

    def _gradients_batched(self, xs: Sequence[torch.Tensor], first: int, create_graph: bool) -> list[torch.Tensor]:
        """Classes ``first, first + 1, ...`` (images ``xs``) through one pass of the replica."""
        k, n = len(xs), xs[0].shape[0]
        if any(x.shape[0] != n for x in xs):
            raise ValueError("the batched pass needs the same number of images for every class")
        replica = self._sync_replica(k)
        c, h, w = xs[0].shape[1:]
        x = torch.stack(list(xs), 1).reshape(n, k * c, h, w)  # member m reads class first + m
        with autocast(self.device, self.precision):
            out = replica(x)
        out = out.float().reshape(n * k, -1)  # sample-major: row i*k + m is member m's i-th image
        target = torch.arange(first, first + k, device=self.device).repeat(n)
        loss = F.cross_entropy(out, target, reduction="sum") / n  # = sum over members of their mean
        grads = torch.autograd.grad(loss, self._params(replica), create_graph=create_graph)
        return [g.reshape(k, *p.shape) for g, p in zip(grads, self._params(self.net))]

    def _sync_replica(self, k: int) -> TinyNet:
        """The ``k``-member replica of the network: every member with the network's weights, buffers
        and train/eval modes (built on first use, one per member count)."""
        if self._replicas_of is not self.net:
            self._replicas, self._replicas_of = {}, self.net
        if k not in self._replicas:
            spec = self.net.spec()
            replica = create_model(spec.pop("name"), members=k, device=self.device, **spec)
            self._replicas[k] = replica
        replica, src = self._replicas[k], self.net.state_dict()
        with torch.no_grad():
            for key, t in replica.state_dict().items():
                v = src[key]
                t.copy_(v if v.dim() == 0 else v.repeat(k, *([1] * (v.dim() - 1))))
        for mine, theirs in zip(self.net.modules(), replica.modules()):
            theirs.training = mine.training
        return replica

    # ------------------------------------------------------------------ inner loop
    def _train_net(self, net: nn.Module, images: torch.Tensor, gen: torch.Generator) -> None:
        """``inner_loop`` epochs of plain SGD (``lr_net``, no momentum) on the synthetic set, through the
        shared training loop (DSA on every batch for DSA, as the reference's inner ``epoch('train')``)."""
        labels = self.hard_labels().to(self.device)
        settings = TrainSettings(epochs=self.inner_loop, lr=self.cfg.lr_net, momentum=0.0, weight_decay=0.0,
                                 batch_size=self.cfg.batch_train, lr_decay_factor=1.0, precision=self.precision,
                                 compile=self.compiled)
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

