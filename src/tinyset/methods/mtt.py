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

The student runs functionally on one flat parameter vector (:class:`Student`:
:func:`torch.func.functional_call` on a single network object built once; the vector is split into
views of the parameters' shapes), so the unrolled steps are ordinary tensor operations. Soft labels
(probability rows) and a mask over the matched parameters are supported by :func:`unroll_loss` for
methods built on it (PAD); MTT itself uses hard labels and every parameter.

Two exact ways to differentiate the unroll (``memory``):

* ``full``: as the reference, each step's gradient is taken with ``create_graph=True`` and the final
  loss is differentiated through all of them; the autograd graph of all ``syn_steps`` student steps
  (forward activations and first-order backward) stays in memory, so peak memory grows linearly
  with ``syn_steps * batch_syn`` (times the activation size of the network);
* ``recompute`` (the default): the unroll runs forward without a graph, keeping only the
  ``syn_steps + 1`` flat parameter vectors and each step's minibatch indices and DSA parameters;
  the backward pass walks the steps in reverse, recomputes one step at a time and carries the
  adjoint back with a Hessian-vector product (the memory-saving recomputation TESLA, Cui et al.
  2023, describes for MTT; our own implementation). Memory no longer grows with ``syn_steps``
  (beyond one parameter vector per step); the price is one more forward and first-order backward
  of the student per step. Its per-step functions are pure, so on CPU they are compiled with
  :func:`torch.compile` (``compile``; the full path's double backward through a graph cannot be
  compiled), which more than pays for that extra work on runs of a few hundred iterations.

Gradients of both paths agree to rounding (tested to 1e-5 relative, eager fp32). The student runs
under the run's ``precision``, losses and the parameter vectors in fp32; ``--precision auto`` follows
the runtime's rule (bf16 where the CPU has native bf16). On MNIST with a trained expert, bf16 moved the
first loss by about 3e-3 relative against fp32, and along a whole run its image gradients kept a cosine
of 0.98-1.00 with fp32's; the unrolled gradients through InstanceNorm are ill-conditioned enough that
even compiled fp32 (other kernels, other rounding) moves image gradients by ~1e-2 relative. Set
``--precision fp32`` for the reference's arithmetic.

**Spikes** (``spike_clip``, :class:`SpikeGuard`). As the learned lr grows, the unrolled student
occasionally explodes on a minibatch, in either precision, and that iteration's hypergradient is up to
~1000x the usual. One such update wrecked a bf16 MNIST ``cpu`` run at iteration 186. The guard
caps those updates; the ``cpu`` rule turns it on for MNIST and FashionMNIST.

The learned ``lr`` is stored in the synthetic set (:attr:`tinyset.synset.SyntheticSet.lr`); evaluation
protocols with ``lr = null`` train on it. The lr is learned directly (not through a log), as in the reference; if an update
makes it zero or negative the run stops with a :class:`~tinyset.errors.NumericalError` (the last
checkpoint is kept) and asks for a smaller ``lr_lr``.

ZCA whitening, which the reference uses for most CIFAR rows, is the data layer's (``--set zca=true``,
with experts made by ``tinyset experts --zca``; a mismatch is refused); the paper rows below do not
switch it on, so they run without it unless asked. ``batch_real`` is not used (MTT
sees real images only through the experts and the ``init=real`` draw).

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from tinyset.augment import DSA
from tinyset.augment.dsa import AugParams
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.runtime import autocast, compile_function

_REF = "GeorgeCazenavette/mtt-distillation distill.py defaults (Cazenavette et al., CVPR 2022)"
#: how :func:`unroll_loss` differentiates the unrolled student (see there)
MEMORY_MODES = ("full", "recompute")
#: compile the student's step functions when a run has at least this many iterations (CPU, ``compile=auto``)
COMPILE_MIN_ITERATIONS = 100
#: iterations whose gradient norms :class:`SpikeGuard` keeps (the median of the last ``SPIKE_WINDOW``)
SPIKE_WINDOW = 50
#: iterations :class:`SpikeGuard` records before it may clip
SPIKE_WARMUP = 10
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
    memory: str = hp("recompute", "how the unrolled student is differentiated: full (one autograd graph of all "
                                  "syn_steps; memory grows with syn_steps) or recompute (exact, same gradients; keeps "
                                  "only the syn_steps+1 parameter vectors and recomputes one step at a time "
                                  "backwards; one more forward and backward of the student per step)",
                     choices=MEMORY_MODES)
    compile: str = hp("auto", "torch.compile the student's per-step functions (memory=recompute only; auto: on CPU "
                              f"for runs of at least {COMPILE_MIN_ITERATIONS} iterations)", choices=("auto", "on", "off"))
    spike_clip: float | None = hp(None, "cap the norm of the images' gradient at this multiple of the median norm of "
                                        f"the previous {SPIKE_WINDOW} iterations, scaling the gradients of every "
                                        "learned tensor alike (none: off, as the reference); guards against the rare "
                                        "exploding unroll that ruins a set in one update", gt=0, optional=True)


def _cpu_budget(values, dataset: str, ipc: int, wide_from: int | None = 10) -> dict:
    """The ``cpu`` rule's values; on MNIST/FashionMNIST the student is the width-128 ``convnet`` from
    ``wide_from`` images per class on (``None``: the width-32 ``convnet-w32`` at every ipc)."""
    family = dataset.lower().partition(":")[0]
    if family == "digits":
        return {"model": "convnet-d2", "iterations": 200, "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 5,
                "final_eval": "quick", "memory": "full", "compile": "off"}
    if family in ("mnist", "fashion-mnist"):
        # early segments only, one expert epoch in 20 steps, lr_img 100: chosen on MNIST ipc 1 (cpu_rule);
        # from ipc 10 the evaluation's own width-128 ConvNet (chosen on held-out images at ipc 10, cpu_rule)
        wide = wide_from is not None and ipc >= wide_from
        iterations = 300 if wide else (500 if ipc == 1 else 200)
        values = {"model": "convnet" if wide else "convnet-w32", "iterations": iterations, "lr_img": 100.0,
                  "syn_steps": 20, "expert_epochs": 1, "max_start_epoch": 2, "batch_syn": min(ipc * 10, 50),
                  "final_eval": "quick", "spike_clip": 10.0}
        if wide and family == "mnist" and ipc == 10:  # from the mi selection, 100 iterations (cpu_rule)
            values.update(init="select:mi,diversity=0.1", iterations=100)
        return values
    return {}


class SpikeGuard(nn.Module):
    """Caps rare gradient spikes: the images' gradient norm ``n`` of an iteration is compared with
    the median ``m`` of the previous ``SPIKE_WINDOW`` norms (once ``SPIKE_WARMUP`` are recorded), and
    when ``n > factor * m`` every learned tensor's gradient is scaled by ``factor * m / n``, so the
    update keeps its direction at a usual size. The unclipped norm enters the history. Why: an
    unrolled student occasionally explodes inside its ``syn_steps`` (a minibatch on which the learned
    lr is too large), and the hypergradient of that one iteration is ~1000x the usual; with
    ``lr_img`` 100 that single update throws pixels 60-120 standard deviations out and the set never
    recovers (measured on MNIST ipc 10 at iteration 186 of a bf16 run; docs/measurements.md). The
    history is a buffer, so checkpoints carry it and resume stays bit-exact."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)
        self.register_buffer("norms", torch.zeros(SPIKE_WINDOW, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def clip_(self, norm: torch.Tensor, grads: list[torch.Tensor]) -> tuple[float, float]:
        """Record ``norm`` and scale ``grads`` in place when it is a spike; returns ``(norm, scale)``."""
        n, k = float(norm), int(self.count)
        scale = 1.0
        if k >= SPIKE_WARMUP:
            cap = self.factor * float(self.norms[:min(k, SPIKE_WINDOW)].median())
            if n > cap > 0:
                scale = cap / n
                for g in grads:
                    g.mul_(scale)
        self.norms[k % SPIKE_WINDOW] = n
        self.count += 1
        return n, scale


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


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability rows: ``mean_n -sum_k target[n, k] * log_softmax(logits)[n, k]``.

    Equals ``F.cross_entropy(logits, y)`` when ``target`` is the one-hot encoding of ``y``; it is
    differentiable in ``target`` as well (learned soft labels)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class Student:
    """The student network of trajectory matching as pure functions of one flat parameter vector.

    ``net`` supplies the function only (its own parameter values are ignored): a vector ``theta``
    is split into views of the parameters' shapes in ``net.named_parameters()`` order and run with
    :func:`torch.func.functional_call`, so no module is rebuilt or reloaded per step. The network
    runs under the autocast of ``precision`` (``"fp32"`` or ``"bf16"``, see
    :func:`tinyset.runtime.autocast`); logits and the loss are computed in fp32.

    * :meth:`loss`: the cross-entropy of a batch, hard (int64 ``[B]``) or soft labels (float
      probability rows ``[B, K]``, :func:`soft_cross_entropy`);
    * :meth:`grad`: ``d loss / d theta`` (:func:`torch.func.grad`);
    * :meth:`vjp`: that gradient and its vector-Jacobian product with a cotangent ``a`` with respect
      to ``theta`` (a Hessian-vector product), the batch's images and (optionally) its soft labels:
      what the exact low-memory unroll needs for one step of its backward walk.

    ``compile=True`` wraps :meth:`grad` and :meth:`vjp` in :func:`torch.compile` (static shapes: at
    most two batch sizes per run, the full one and the last chunk). They return their derivatives
    as values (:mod:`torch.func`), so autograd never differentiates through the compiled code; the
    ``full`` unroll instead differentiates each step's backward pass again (``create_graph=True``),
    which torch.compile does not support for a compiled network (no double backward).
    """

    def __init__(self, net: nn.Module, precision: str = "fp32", compile: bool = False):
        named = list(net.named_parameters())
        if not named:
            raise ConfigError(f"the student network {type(net).__name__} has no parameters")
        self.net = net
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.num_classes = getattr(net, "num_classes", None)
        self.device = named[0][1].device
        self.precision = precision
        self.compiled = bool(compile)
        self._grad_fn = torch.func.grad(self.loss)
        self.grad = compile_function(self._grad_fn) if compile else self._grad_fn
        self.vjp = compile_function(self._vjp) if compile else self._vjp

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``theta`` split into views named and shaped like the network's parameters, plus fresh copies
        of the network's buffers: BatchNorm in train mode normalises with batch statistics and its
        running-statistics update then writes into the copies (the network is left unchanged, and
        :mod:`torch.func` transforms do not allow writes into captured tensors)."""
        named = {n: p.view(s) for n, p, s in zip(self.names, torch.split(theta, self.numels), self.shapes)}
        named.update({n: b.clone() for n, b in self.net.named_buffers()})
        return named

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the network with parameters ``theta`` on ``(x, y)``."""
        with autocast(self.device, self.precision):
            out = functional_call(self.net, self.params(theta), (x,))
        out = out.float() if out.dtype != theta.dtype else out
        if y.is_floating_point():
            return soft_cross_entropy(out, y.to(out.dtype))
        return F.cross_entropy(out, y)

    def _vjp(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cotangent: torch.Tensor,
             need_x: bool = True, need_y: bool = False):
        """``(g, a^T dg/dtheta, a^T dg/dx or None, a^T dg/dy or None)`` with ``g = grad(theta, x, y)``
        and ``a = cotangent``: one forward, one backward and their backward."""
        if need_x and need_y:
            g, pull = torch.func.vjp(self._grad_fn, theta, x, y)
            return (g, *pull(cotangent))
        if need_x:
            g, pull = torch.func.vjp(lambda t, xx: self._grad_fn(t, xx, y), theta, x)
            d_theta, d_x = pull(cotangent)
            return g, d_theta, d_x, None
        if need_y:
            g, pull = torch.func.vjp(lambda t, yy: self._grad_fn(t, x, yy), theta, y)
            d_theta, d_y = pull(cotangent)
            return g, d_theta, None, d_y
        g, pull = torch.func.vjp(lambda t: self._grad_fn(t, x, y), theta)
        return g, pull(cotangent)[0], None, None


@dataclass
class _Unroll:
    """Everything one unroll needs besides the differentiable inputs (images, labels, lr)."""

    student: Student
    start: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None  # the match mask/weight as floats, or None (every parameter)
    denom: torch.Tensor
    steps: list[tuple[torch.Tensor, AugParams | None]]  # minibatch indices and DSA parameters per step
    augment: DSA | None

    def distance(self, theta: torch.Tensor) -> torch.Tensor:
        diff = theta - self.target
        if self.weight is not None:
            diff = diff * self.weight
        return (diff * diff).sum() / self.denom

    def batch(self, images: torch.Tensor, k: int) -> torch.Tensor:
        idx, prm = self.steps[k]
        x = images[idx]
        return self.augment.apply(x, prm) if prm is not None else x


def _plan(n: int, b: int, syn_steps: int, gen: torch.Generator, augment: DSA | None, size: tuple[int, int],
          device: torch.device) -> list[tuple[torch.Tensor, AugParams | None]]:
    """The random draws of an unroll, in order: a permutation of the ``n`` images whenever the
    previous one is used up (consecutive chunks of ``b``), and each step's DSA parameters."""
    steps: list[tuple[torch.Tensor, AugParams | None]] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).to(device).split(b))
        idx = chunks.pop(0)
        steps.append((idx, augment.sample(len(idx), size, gen) if augment else None))
    return steps


def _full_unroll(u: _Unroll, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """One autograd graph over all steps (each step's gradient taken with ``create_graph=True``)."""
    theta = u.start.clone().requires_grad_(True)
    for k, (idx, _) in enumerate(u.steps):
        ce = u.student.loss(theta, u.batch(images, k), labels[idx])
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * grad
    return u.distance(theta)


class _RecomputeUnroll(torch.autograd.Function):
    """The exact low-memory unroll: forward without a graph, backward one step at a time.

    Forward: ``theta_{k+1} = theta_k - lr * g_k`` with ``g_k = grad CE(theta_k; x_k, y_k)``, keeping
    only the flat vectors ``theta_0..theta_N`` (the minibatch indices and DSA parameters of every
    step are already in the plan, so each batch can be rebuilt exactly). Backward (reverse-mode by
    hand): with the adjoint ``a_N = dL/dtheta_N``, for ``k = N-1 .. 0``, from one recomputed step
    (:meth:`Student.vjp`):

    * ``dL/dlr   += -<a_{k+1}, g_k>``
    * ``dL/dx_k   = -lr * (dg_k/dx_k)^T a_{k+1}``, carried back through the DSA transformation
      (recomputed with autograd) into the images; likewise ``dL/dy_k`` into soft labels;
    * ``a_k = a_{k+1} - lr * H_k a_{k+1}`` (``H_k`` the Hessian of the step's loss in ``theta``).
    """

    @staticmethod
    def forward(ctx, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, u: _Unroll) -> torch.Tensor:
        images, labels, lr_value = images.detach(), labels.detach(), lr.detach()
        thetas = [u.start]
        theta = u.start
        for k, (idx, _) in enumerate(u.steps):
            theta = theta - lr_value * u.student.grad(theta, u.batch(images, k), labels[idx])
            thetas.append(theta)
        ctx.u, ctx.thetas = u, thetas
        ctx.save_for_backward(images, labels, lr_value)
        return u.distance(theta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.u is None:
            raise RuntimeError("the recompute unroll frees its parameter vectors in its backward pass: differentiate "
                               "its loss once (retain_graph=True cannot keep them)")
        u: _Unroll = ctx.u
        thetas: list[torch.Tensor] = ctx.thetas
        images, labels, lr = ctx.saved_tensors
        need_img, need_lab, need_lr = ctx.needs_input_grad[:3]
        need_lab = need_lab and labels.is_floating_point()
        diff = thetas[-1] - u.target
        if u.weight is not None:
            diff = diff * (u.weight * u.weight)
        a = diff * (2 * grad_out / u.denom)
        d_images = torch.zeros_like(images) if need_img else None
        d_labels = torch.zeros_like(labels) if need_lab else None
        d_lr = torch.zeros((), dtype=a.dtype, device=a.device)
        for k in range(len(u.steps) - 1, -1, -1):
            idx, prm = u.steps[k]
            raw = images[idx]
            if need_img and prm is not None:
                with torch.enable_grad():
                    raw = raw.requires_grad_(True)
                    x = u.augment.apply(raw, prm)
                x_in = x.detach()
            else:
                x_in = u.batch(images, k)
            g, d_theta, d_x, d_y = u.student.vjp(thetas[k], x_in, labels[idx], a, need_img, need_lab)
            if need_lr:
                d_lr = d_lr - (a * g).sum()
            if need_img:
                if prm is not None:
                    (d_x,) = torch.autograd.grad(x, raw, d_x)
                d_images.index_add_(0, idx, d_x, alpha=-float(lr))
            if need_lab:
                d_labels.index_add_(0, idx, d_y.to(labels.dtype), alpha=-float(lr))
            a = a - lr * d_theta
        ctx.u = ctx.thetas = None  # free the stored vectors
        return d_images, d_labels, (d_lr.reshape(lr.shape).to(lr.dtype) if need_lr else None), None


def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None) -> None:
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[0] != n or (num_classes is not None and labels.shape[1] != num_classes):
            k = num_classes if num_classes is not None else "K"
            raise ConfigError(f"soft labels must be probability rows of shape [{n}, {k}] (one per image); got "
                              f"{tuple(labels.shape)}")
        with torch.no_grad():
            sums = labels.sum(1)
            bad = ((sums - 1).abs() > 1e-3) | (labels < 0).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ConfigError(f"soft labels must be probability rows (non-negative, summing to 1; pass logits "
                              f"through softmax first); row {row} sums to {float(sums[row]):.4g} with minimum "
                              f"{float(labels[row].min()):.4g}")
    elif labels.shape != (n,):
        raise ConfigError(f"hard labels must be class indices of shape [{n}]; got {tuple(labels.shape)}")


def unroll_loss(net: nn.Module | Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                start: torch.Tensor, target: torch.Tensor, syn_steps: int, batch_syn: int | None,
                gen: torch.Generator, augment: DSA | None = None, *, match: torch.Tensor | None = None,
                memory: str = "full") -> torch.Tensor:
    """The MTT loss of one start/target pair, differentiable in ``images``, ``lr`` and soft ``labels``.

    The student is the flat vector ``start`` split in ``net.named_parameters()`` order (``net`` may be
    a :class:`Student` built once, for its precision and compiled functions; a module is run in
    fp32, eagerly), trained ``syn_steps`` SGD steps of step size ``lr`` on ``(images, labels)``
    (``batch_syn`` at a time, random order from ``gen``, DSA from ``gen`` when ``augment``).

    ``labels``: hard (int64 ``[N]``) or soft (float ``[N, K]``, **probability rows**: pass learned
    logits through ``softmax`` first; the student's loss is then :func:`soft_cross_entropy`), and
    gradients reach float labels that require grad.

    ``match``: optional bool or float mask/weight ``m`` over the flat parameter vector; the loss is
    ``||m * (theta_N - target)||^2 / ||m * (start - target)||^2`` (``None``: every parameter, weight 1).

    ``memory``: ``"full"`` keeps one autograd graph of all steps (memory grows with ``syn_steps``);
    ``"recompute"`` is the exact low-memory path (:class:`_RecomputeUnroll`): it keeps only the
    ``syn_steps + 1`` flat parameter vectors and recomputes one step's graph at a time in the
    backward pass. It returns a loss whose ``.backward()`` gives the same gradients, at the cost of
    one more forward and first-order backward of the network per student step (the graph-free
    forward unroll). Both paths make the same random draws from ``gen``.
    """
    if memory not in MEMORY_MODES:
        raise ConfigError(f"memory={memory!r}: expected one of {', '.join(MEMORY_MODES)}")
    student = net if isinstance(net, Student) else Student(net)
    if start.numel() != student.num_params or target.numel() != start.numel():
        raise ArtifactError(f"expert parameters have {start.numel()}/{target.numel()} values, the network "
                            f"has {student.num_params}")
    n = images.shape[0]
    _check_labels(labels, n, student.num_classes)
    start = start.detach().reshape(-1)
    target = target.detach().reshape(-1)
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=start.dtype, device=start.device)
    weight = None
    if match is not None:
        if match.numel() != start.numel() or not (match.dtype == torch.bool or match.is_floating_point()):
            raise ConfigError(f"match must be a bool or float mask over the {start.numel()} flat parameters; got "
                              f"{match.dtype} with {match.numel()} values")
        weight = match.detach().reshape(-1).to(start.device, start.dtype)
    diff = start - target if weight is None else (start - target) * weight
    denom = (diff * diff).sum()
    if not float(denom) > 0:
        where = "" if weight is None else " on the matched parameters"
        raise NumericalError(f"the expert's start and target parameters are identical{where} (||theta*_t - "
                             "theta*_{t+M}||^2 = 0); the expert set is broken (an epoch stored twice?)"
                             + (" or the match mask selects nothing that moves" if weight is not None else ""))
    b = n if batch_syn is None else min(batch_syn, n)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    u = _Unroll(student, start, target, weight, denom, _plan(n, b, syn_steps, gen, augment, size, images.device),
                augment if augment else None)
    if memory == "full":
        return _full_unroll(u, images, labels, lr)
    return _RecomputeUnroll.apply(images, labels, lr, u)


@METHODS.register("mtt", help="matching training trajectories (Cazenavette et al. 2022); needs `tinyset experts`")
class TrajectoryMatching(Distiller):
    name = "mtt"
    Config = MTTConfig
    expert_kind = "plain"
    # `auto` follows the runtime (bf16 on a CPU with native bf16). It ran fp32 from 2026-12-04 until a
    # bf16 MNIST ipc 10 run was found wrecked by one exploding unroll (iteration 186, an image gradient
    # 1357x the median), not by bf16 arithmetic. With spike_clip 10 the same bf16 run scored 94.20 +- 0.42
    # (dsa-learned-lr), against 94.11 +- 0.29 for fp32 without it (docs/measurements.md).
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
        "thread on a ~3x oversubscribed CPU), quick final evaluation. digits: 200 iterations, syn_steps 10, "
        "expert_epochs 2, model convnet-d2 (the depth-3 ConvNet normalises 2x2 maps on 8x8 images and its "
        "unrolled gradients explode), max_start_epoch 5; experts `tinyset experts --dataset digits --model "
        "convnet-d2 --num-experts 5 --epochs 10 --batch-size 64` (~20 s, 95% validation accuracy), then ipc 1 "
        "~27 s (test accuracy 85% vs 68% for random real images), ipc 10 ~3 min (91% vs 90%); memory full and "
        "compile off there (runs of a few minutes do not repay ~80 s of compilation, and uncompiled the full "
        "graph is the faster path). MNIST/FashionMNIST: batch_syn min(10*ipc, 50), syn_steps 20, expert_epochs "
        "1, max_start_epoch 2, lr_img 100; model convnet-w32 below ipc 10 (500 iterations at ipc 1, 200 at ipc "
        "2-9); from ipc 10 the evaluation's width-128 convnet for 300 iterations (~7 CPU-s each, AMD EPYC, "
        "AVX512-BF16, bf16) with experts `tinyset experts --dataset D --model convnet --num-experts 3 --epochs 3 "
        "--members 3` (~900 CPU-s), chosen at ipc 10 on held-out training images (quick protocol): MNIST 94.20, "
        "95.10, 95.17 after 100, 200, 300 iterations against 93.37, 93.17, 93.03 for width 32; FashionMNIST "
        "81.83, 82.00, 81.97 against 79.47, 79.90, 79.47 (docs/measurements.md, 2026-12-05); on MNIST at ipc "
        "10 from the mi selection (init select:mi,diversity=0.1) for 100 iterations: held-out 95.40 after 100 "
        "against 94.87 after 50 (from a file of that selection 95.33 after 100, 95.17 after 200), test 96.28 "
        "against 95.63 from random images (docs/measurements.md, 2026-12-05, third session; FashionMNIST keeps "
        "random images: the same start scored 80.88 against 80.87 there); spike_clip 10 "
        "(on MNIST ipc 10 one exploding unroll, at iteration 186 of a bf16 run, "
        "had an image gradient ~1000x the usual and threw pixels 60-120 standard deviations out; "
        "docs/measurements.md). Why: before any learning, a student unrolled from a late expert epoch overshoots "
        "(initial matching loss 1.3-1.8 from epochs 4-8 at lr 0.01, syn_steps 20, MNIST ipc 1), while from epochs "
        "0-1 it reaches 0.86-0.88 (benchmarks/probe_mtt_start.py, training data only); the earlier preset "
        "(max_start_epoch 8, expert_epochs 2, syn_steps 10) left the loss at 0.97 after 500 iterations and the "
        "set at random-image level. Chosen on MNIST ipc 1 by the mean best validation accuracy of 5 ConvNets "
        "under the dsa-early protocol (1000 images held out of the training split): 0.852 with lr_img 100, 0.843 "
        "with 1000, against 0.563 for the earlier preset (AMD EPYC, AVX2, fp32, 2026-12-03; FashionMNIST uses "
        "the MNIST choice). Below ipc 10, experts `tinyset experts --dataset mnist --model convnet-w32 "
        "--num-experts 3 --epochs 2` suffice (epochs 0..2 are matched; ~2.5 min per expert epoch); memory "
        "recompute, compiled: measured by benchmarks/bench_mtt.py at ipc 10 with the earlier syn_steps 10 and "
        "width 32 (AMD EPYC, AVX512-BF16, 1 thread, bf16): 0.44 s per iteration after a one-time compilation "
        "(~70-90 s with a cold cache) against 0.89 s for a reference-style fp32 loop, 0.47 GiB peak whatever "
        "syn_steps (the full graph: 0.65 GiB at 10 steps, 1.3 GiB at 40); width 128 with 100 images per step "
        "and syn_steps 20: 14.7 s (reference-style 28.6 s), 1.3 GiB (full graph 4.5 GiB). Other datasets keep "
        "the paper values", _cpu_budget)
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
        if cfg.compile == "on" and cfg.memory != "recompute":
            raise ConfigError(f"compile=on needs memory=recompute (memory={cfg.memory!r}: the full unroll "
                              "differentiates twice through the student's graph, which torch.compile does not "
                              "support); set memory=recompute or compile=off")
        if not experts.complete():
            raise ConfigError(f"expert set {experts.path} has no finished expert (0 of {experts.num_experts}); "
                              f"finish it with `tinyset experts ... --out {experts.path} --resume`")

    def setup(self, gen: torch.Generator) -> None:
        from tinyset.experts import ExpertSet, check_compatible

        cfg = self.cfg
        self.experts = ExpertSet(cfg.experts)
        check_compatible(self.experts, self.info, cfg.model, zca=cfg.zca)
        self.pool_ids = self.experts.complete()
        self.net = self.experts.build_model(self.device)
        self.net.requires_grad_(False)  # its own weights are never used: the student is a flat vector
        self.net.train()
        self.student = Student(self.net, precision=self.precision, compile=self.wants_compile())
        self.labels = self.hard_labels().to(self.device)
        super().setup(gen)  # images + their SGD optimiser (lr_img, momentum_img)
        lr = self.learnable("lr", torch.tensor(float(cfg.lr_teacher), dtype=torch.float32))
        self.optimizer("lr", torch.optim.SGD([lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr))
        self.guard = None if cfg.spike_clip is None else self.module("spike_guard", SpikeGuard(cfg.spike_clip))
        self._last: dict[str, float] = {}

    def wants_compile(self) -> bool:
        """Whether the student's step functions are compiled (only the recompute path can be)."""
        auto = self.device.type == "cpu" and self.cfg.iterations >= COMPILE_MIN_ITERATIONS
        return self.cfg.memory == "recompute" and self.compile_wanted(auto)

    def draw(self, gen: torch.Generator) -> tuple[int, int]:
        """The expert and the start epoch of one iteration."""
        i = self.pool_ids[int(torch.randint(len(self.pool_ids), (1,), generator=gen))]
        t = int(torch.randint(self.cfg.max_start_epoch, (1,), generator=gen))
        return i, t

    #: which parameters the matching loss compares (None: all of them; PAD masks the shallow ones)
    mask: torch.Tensor | None = None

    def student_labels(self) -> torch.Tensor:
        """The labels the student trains on (hard class indices here; PAD's learned soft labels)."""
        return self.labels

    def matching_loss(self, gen: torch.Generator) -> torch.Tensor:
        """One draw of expert and start epoch, the student's unroll from it, and the normalised
        parameter distance to the expert ``expert_epochs`` later (differentiable)."""
        cfg = self.cfg
        i, t = self.draw(gen)
        start = self.experts.flat_params(i, t, self.device)
        target = self.experts.flat_params(i, t + cfg.expert_epochs, self.device)
        return unroll_loss(self.student, self.images, self.student_labels(), self.tensors["lr"], start, target,
                           cfg.syn_steps, cfg.batch_syn, gen, self.augment, match=self.mask, memory=cfg.memory)

    def step_all(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (checked finite), cap a gradient spike (``spike_clip``, :class:`SpikeGuard`)
        and step every optimiser."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        if self.guard is not None:
            grads = [t.grad for t in self.tensors.values() if t.grad is not None]
            norm, scale = self.guard.clip_(self.images.grad.norm(), grads)
            self._last.update(grad_norm=norm, clip_scale=scale)
        for opt in self.optimizers.values():
            opt.step()

    def check_lr(self) -> None:
        value = float(self.tensors["lr"].detach())
        if not value > 0:
            raise NumericalError(f"the learned lr became {value:.4g} (<= 0; it started at {self.cfg.lr_teacher}); "
                                 f"lower lr_lr (now {self.cfg.lr_lr})")

    def step(self, gen: torch.Generator) -> float:
        loss = self.matching_loss(gen)
        self.step_all(loss)
        self.check_lr()
        return float(loss.detach())

    def metrics(self) -> dict[str, float]:
        """The images' gradient norm and the spike guard's scale (1: not clipped) when ``spike_clip`` is set."""
        return dict(self._last)

    def to_synset(self, meta):
        meta = dict(meta)
        if meta:
            meta["experts"] = {"path": str(self.experts.path), "model": self.experts.model,
                               "model_args": self.experts.model_args, "epochs": self.experts.epochs,
                               "complete": len(self.pool_ids)}
        return super().to_synset(meta)


__all__ = ["MEMORY_MODES", "MTTConfig", "SpikeGuard", "Student", "TrajectoryMatching", "soft_cross_entropy",
           "unroll_loss"]
