"""THE network-training loop of tinyset: SGD (or Adam) on a (synthetic or real) set, several networks at once.

Everything in tinyset that trains a network's weights on a fixed set of images goes through
:func:`train_ensemble`: the evaluator (fresh networks on a synthetic set), the embedding
pretraining and the forgetting statistics of the coreset selectors, and the inner network updates of
the distillation methods (DC/DSA). One optimiser step is :func:`sgd_step`; networks are tested with
:func:`test_accuracy`.

The M networks of one architecture live in one ``members=M`` module (see
:mod:`tinyset.models.layers`): each step every member draws its own mini-batch (its own shuffle)
and its own augmentation, the loss is the sum of the members' mean losses, and one SGD step updates
all of them. Gradients, weight decay and momentum are per parameter, so this is mathematically the
same as training the M networks one after another, only faster.

Hooks (all optional) let callers observe training without copying the loop:

* ``on_epoch(epoch, mean_loss, train_acc)`` after every epoch;
* ``on_step(epoch, batches_done, batches_per_epoch)`` after every optimiser step (progress bars);
* ``on_batch(epoch, indices, losses, logits)`` after every step, with the sample indices of the
  batch (into ``images``), the per-sample cross-entropy and the logits, all member-major (member 0's
  ``B`` samples, then member 1's, ...). The forgetting selector reads per-sample correctness from it.

Early stopping (optional, ``early_stop=``): an :class:`EarlyStopping` tests every member on a
validation split every few epochs, stops each member on its own when its validation accuracy has
not improved for ``patience`` epochs, ends the loop when every member has stopped, and gives each
member back the weights of its best validation epoch (see the class).

``torch.compile`` (``TrainSettings.compile``): each network gets its own compiled callable per mode
(``"train"``: the forward pass of a training step; ``"test"``: the no-grad forward of a test pass),
each wrapping a code object of its own. torch's compiler keeps its cache, and its recompile limit
(8), per code object; compiling ``model`` itself would pile the graphs of every architecture, both
grad modes and every batch shape onto ``TinyNet.forward`` and silently fall back to eager once the
limit is hit. Compiler logging and warnings are silenced during our compiled calls; when compiling
fails (or the compiler gives up on a frame), the network quietly runs in eager mode and
:func:`compile_status` reports ``False`` for that mode.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from tinyset.augment import DSA
from tinyset.errors import ConfigError, NumericalError
from tinyset.hparams import describe_range
from tinyset.models.base import TinyNet
from tinyset.runtime import autocast, compile_function, forward_chunk

#: ``on_epoch(epoch, mean_loss, train_acc)``
EpochHook = Callable[[int, float, float], None]
#: ``on_step(epoch, batches_done, batches_per_epoch)``
StepHook = Callable[[int, int, int], None]
#: ``on_batch(epoch, indices [M*B] int64 CPU, losses [M*B] float32, logits [M*B, K] float32)``
BatchHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

#: torch.compile backend of :func:`model_forward` (tests switch to ``"eager"`` for speed)
COMPILE_BACKEND = "inductor"
#: silence torch's compiler logging and warnings during compiled calls
QUIET_COMPILER = True


# ---------------------------------------------------------------- validation

def check_number(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> int | float:
    """Check one numeric setting; returns it (integral floats as ``int`` when ``integer``).

    Raises :class:`~tinyset.errors.ConfigError` ``"{owner} {name} must be {what}, got {value!r}"``
    for non-numbers, booleans, nan/inf, non-integers (``integer=True``) and values outside
    ``[low, high]`` (``low_open``/``high_open`` exclude the bound).
    """
    what = describe_range(integer, low, high, low_open, high_open)
    bad = ConfigError(f"{owner} {name} must be {what}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    try:
        if not math.isfinite(value) or abs(value) > 3.4e38:  # float32 tensors hold every setting
            raise bad
    except OverflowError:  # an int beyond the float range
        raise bad from None
    if integer:
        if value != int(value):
            raise bad
        value = int(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise bad
    if high is not None and (value > high or (high_open and value == high)):
        raise bad
    return value


# ---------------------------------------------------------------- settings

@dataclass
class TrainSettings:
    """How :func:`train_ensemble` trains: plain SGD, with an optional one-time lr decay.

    The decay: from epoch ``decay_epoch`` (or ``int(epochs * lr_decay_at)`` when ``decay_epoch`` is
    None) on, the lr is ``lr * lr_decay_factor``, with a new optimiser (momentum restarts, as in the
    DC/DSA/DM reference). ``lr_decay_factor=1.0`` means **no decay**: one optimiser for the whole
    run (what the distillation methods' inner loops use). A decay at epoch 0 never happens.
    ``precision`` must be resolved already (``fp32`` or ``bf16``, see
    :func:`tinyset.runtime.resolve_precision`).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5  # fraction of the epochs after which lr is multiplied by lr_decay_factor
    decay_epoch: int | None = None  # first epoch at the decayed lr; overrides lr_decay_at when given
    lr_decay_factor: float = 0.1  # 1.0: no decay at all
    precision: str = "fp32"  # fp32 | bf16 (autocast for the forward pass)
    compile: bool = False
    #: a name of :data:`OPTIMIZERS`: sgd (momentum, weight decay) | adam (torch's Adam, betas (0.9,
    #: 0.999), L2 weight decay; momentum unused)
    optimizer: str = "sgd"
    #: a name of :data:`LOSSES`: ce (cross-entropy on class indices or probability rows) | mse (half the
    #: squared error summed over classes, against target rows ``[S, K]``)
    loss: str = "ce"
    #: step (the one-time decay above) | warmup_cosine (the lr rises linearly from 0 over
    #: ``warmup_steps`` optimiser steps, then follows a cosine down to ``lr * final_lr_factor`` at the
    #: last step; FRePo's evaluation schedule; the decay fields are then unused)
    lr_schedule: str = "step"
    warmup_steps: int = 0
    final_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        own = "TrainSettings"
        self.warmup_steps, self.final_lr_factor = check_loop_choices(own, self)
        self.epochs = check_number(own, "epochs", self.epochs, low=0, integer=True)
        self.lr = check_number(own, "lr", self.lr, low=0, low_open=True)
        self.momentum = check_number(own, "momentum", self.momentum, low=0, high=1, high_open=True)
        self.weight_decay = check_number(own, "weight_decay", self.weight_decay, low=0)
        self.batch_size = check_number(own, "batch_size", self.batch_size, low=1, integer=True)
        self.lr_decay_at = check_number(own, "lr_decay_at", self.lr_decay_at, low=0, high=1)
        if self.decay_epoch is not None:
            self.decay_epoch = check_number(own, "decay_epoch", self.decay_epoch, low=0, integer=True)
        self.lr_decay_factor = check_number(own, "lr_decay_factor", self.lr_decay_factor, low=0, high=1)
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{own} precision must be 'fp32' or 'bf16' (resolve 'auto' with "
                              f"tinyset.runtime.resolve_precision first), got {self.precision!r}")

    @property
    def first_decayed_epoch(self) -> int | None:
        """Index of the first epoch at the decayed lr, or None when the lr never changes (or changes
        every step: ``lr_schedule="warmup_cosine"``)."""
        if self.lr_decay_factor == 1.0 or self.lr_schedule != "step":
            return None
        ep = self.decay_epoch if self.decay_epoch is not None else int(self.epochs * self.lr_decay_at)
        return ep if 0 < ep < self.epochs else None


# ---------------------------------------------------------------- compiled forward passes

#: torch's compiler loggers inherit their level from "torch" (unless TORCH_LOGS asks for more, which
#: is then honoured); raising it for the duration of a call silences them at the cost of one setLevel
_COMPILER_LOGGERS = ("torch",)


@contextlib.contextmanager
def quiet_compiler() -> Iterator[None]:
    """Hide torch's compiler logging and warnings (no-op when :data:`QUIET_COMPILER` is False)."""
    if not QUIET_COMPILER:
        yield
        return
    loggers = [logging.getLogger(n) for n in _COMPILER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _failed_frames() -> int:
    """Frames torch's compiler gave up on so far (they ran in eager mode), when it counts them."""
    try:
        from torch._dynamo.utils import counters

        frames = counters["frames"]
        return int(frames["total"]) - int(frames["ok"])
    except Exception:  # pragma: no cover - torch without these counters
        return 0


def _call_model(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


class CompiledForward:
    """One network's forward pass for one mode (``"train"`` or ``"test"``), compiled once.

    The compiled function is a copy of :func:`_call_model` with a code object of its own (named
    ``tinyset_<mode>_<architecture>``), so its compiler cache holds only this network's graphs for
    this mode: one per input shape (a full and a short last batch), never near the recompile limit.
    It holds no reference to the network (called as ``forward(model, x)``). :attr:`compiled` turns
    False for good, and calls run eagerly, when compiling raises or the compiler skips the frame
    (:attr:`error` says why).
    """

    def __init__(self, name: str, mode: str):
        self.mode = mode
        self.compiled = True
        self.error: str | None = None
        tag = "".join(ch if ch.isalnum() else "_" for ch in f"tinyset_{mode}_{name}")
        code = _call_model.__code__.replace(co_name=tag, co_qualname=tag) if hasattr(
            _call_model.__code__, "co_qualname") else _call_model.__code__.replace(co_name=tag)
        fn = types.FunctionType(code, _call_model.__globals__, tag)
        try:
            with quiet_compiler():
                self._fn = compile_function(fn, backend=COMPILE_BACKEND)
        except Exception as exc:  # platform without a working compiler
            self._fail(exc)

    def _fail(self, exc: BaseException | str) -> None:
        self.compiled = False
        self.error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self._fn = None

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return model(x)
        with quiet_compiler():
            failed = _failed_frames()
            try:
                out = self._fn(model, x)
            except Exception as exc:  # compile failures surface at the first call
                self._fail(exc)
                return model(x)
            if _failed_frames() > failed:  # the compiler ran this call eagerly (e.g. gave up)
                self._fail("torch.compile skipped the forward pass; running in eager mode")
        return out


_FORWARDS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, CompiledForward]]" = weakref.WeakKeyDictionary()


def model_forward(model: TinyNet, mode: str, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward pass for ``mode`` (``"train"`` or ``"test"``): ``model`` itself, or
    its :class:`CompiledForward` for that mode (created on first use, then reused) when ``compile``."""
    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    if not compile:
        return model
    per_mode = _FORWARDS.setdefault(model, {})
    if mode not in per_mode:
        per_mode[mode] = CompiledForward(getattr(model, "name", type(model).__name__), mode)
    return functools.partial(per_mode[mode], model)


def compile_status(model: torch.nn.Module) -> dict[str, bool]:
    """``{mode: still compiled}`` for every mode ``model`` was run compiled in (empty if none)."""
    return {mode: f.compiled for mode, f in _FORWARDS.get(model, {}).items()}


def compile_errors(model: torch.nn.Module) -> dict[str, str]:
    """``{mode: reason}`` for every mode in which compiling ``model`` failed."""
    return {mode: f.error for mode, f in _FORWARDS.get(model, {}).items() if f.error}


# ---------------------------------------------------------------- the loop

def make_sgd(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The SGD optimiser of the loop over all of ``model``'s parameters."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_adam(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over all of ``model``'s parameters (torch's default betas; ``momentum`` is not used).
    Adam's update is per parameter element, so the members of an ensemble stay independent."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def warmup_cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int, final_factor: float) -> float:
    """The lr of optimiser step ``step`` (0-based) of ``total_steps``, FRePo's evaluation schedule
    (optax's linear schedule joined to its cosine decay): ``base_lr * step / warmup_steps`` during
    the warm-up (the first step at lr 0), then ``base_lr * (f + (1 - f) * (1 + cos(pi * t)) / 2)``
    with ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` and ``f = final_factor``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return base_lr * (final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t)))


def sgd_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``: clear the gradients, backpropagate, update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row (``reduction="none"``) for hard (int ``[N]``) or soft (``[N, K]``) targets."""
    return F.cross_entropy(logits, target, reduction="none")


def per_sample_squared_error(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half the squared error per row, summed over the classes, against target rows ``[N, K]``
    (regression targets, e.g. centred one-hot rows or a method's learned targets)."""
    if target.dim() != 2:
        raise ConfigError(f"the mse loss needs target rows [N, K]; got labels of shape {tuple(target.shape)}")
    return 0.5 * (logits - target).pow(2).sum(-1)


#: optimiser name -> ``make(model, lr, momentum, weight_decay)``
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": make_sgd, "adam": make_adam}
#: loss name -> per-sample loss ``(logits [N, K], targets) -> [N]``
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": per_sample_loss, "mse": per_sample_squared_error}
#: lr schedules of :class:`TrainSettings` (what each does is in its docstring)
LR_SCHEDULES = ("step", "warmup_cosine")


def check_loop_choices(own: str, obj: Any) -> tuple[int, float]:
    """Check ``obj``'s ``optimizer``, ``loss`` and ``lr_schedule`` names (a :class:`TrainSettings` or an
    evaluation protocol) against :data:`OPTIMIZERS`, :data:`LOSSES` and :data:`LR_SCHEDULES`; returns its
    checked ``(warmup_steps, final_lr_factor)``. ``own`` names the owner in the error."""
    for name, table in (("optimizer", OPTIMIZERS), ("loss", LOSSES), ("lr_schedule", LR_SCHEDULES)):
        if getattr(obj, name) not in table:
            raise ConfigError(f"{own} {name} must be one of {', '.join(table)}, got {getattr(obj, name)!r}")
    return (check_number(own, "warmup_steps", obj.warmup_steps, low=0, integer=True),
            check_number(own, "final_lr_factor", obj.final_lr_factor, low=0, high=1))


def train_ensemble(model: TinyNet, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings,
                   generator: torch.Generator, augment: DSA | None = None,
                   on_epoch: EpochHook | None = None, on_step: StepHook | None = None,
                   on_batch: BatchHook | None = None, early_stop: EarlyStopping | None = None,
                   member_data: bool = False) -> TinyNet:
    """Train every member of ``model`` on ``(images, labels)``; returns the model. The optimiser
    (SGD by default), the loss and the lr schedule are ``settings``' (:class:`TrainSettings`).

    ``member_data=True``: every member trains on its own set of ``S`` images, given member-major
    (``images [M*S, ...]``: member ``m`` owns rows ``m*S:(m+1)*S``; the same for ``labels``);
    shuffles, batches and everything else are as with one shared set of ``S`` images (the hooks'
    indices are rows of ``images``).

    ``images`` are normalised float ``[S, C, H, W]``; ``labels`` are int64 class indices ``[S]`` or
    soft labels ``[S, K]`` (probability rows; with ``loss="mse"``, regression target rows ``[S, K]``,
    whose argmax counts as the class for the training accuracy). The model is put in train mode. Every epoch each
    member draws a shuffle (``torch.argsort(torch.rand(M, S, generator=generator))``), then for every
    batch: gather, augment (``augment(x, generator, op_groups=member ids)``), forward, per-sample
    loss (cross-entropy by default), loss = the members' mean losses summed, :func:`sgd_step`. See the module
    docstring for the hooks. With ``early_stop`` (an :class:`EarlyStopping`), the members are
    validated after every ``early_stop.every`` epochs, the loop ends once every member has stopped,
    and every member ends with the weights of its best validation epoch; the stopper holds the
    record (stop and best epochs, validation accuracies). Raises
    :class:`~tinyset.errors.NumericalError` when the loss becomes nan or inf.
    """
    device = images.device
    m = model.members
    s = images.shape[0]
    if s == 0:
        raise ConfigError("train_ensemble: the training set is empty")
    if labels.shape[0] != s:
        raise ConfigError(f"train_ensemble: {s} images but {labels.shape[0]} labels")
    offsets = None
    if member_data:
        if s % m:
            raise ConfigError(f"train_ensemble: member_data needs {m} equal per-member sets, got {s} images")
        s //= m
        offsets = (torch.arange(m) * s).view(m, 1)  # member m's rows start at m*S
    c, h, w = images.shape[1:]
    soft = labels.dim() == 2
    bs = min(settings.batch_size, s)
    decay_epoch = settings.first_decayed_epoch
    forward = model_forward(model, "train", settings.compile)
    member_of = torch.arange(m).repeat_interleave(bs)
    n_batches = -(-s // bs)
    model.train()

    make_opt = OPTIMIZERS[settings.optimizer]
    loss_fn = LOSSES[settings.loss]
    opt = make_opt(model, settings.lr, settings.momentum, settings.weight_decay)
    cosine = settings.lr_schedule == "warmup_cosine"
    total_steps, step = settings.epochs * n_batches, 0
    if early_stop is not None:
        early_stop.start(model, settings)
    for ep in range(settings.epochs):
        if ep == decay_epoch:
            # a new optimiser at the decay, as the reference does (momentum restarts)
            opt = make_opt(model, settings.lr * settings.lr_decay_factor, settings.momentum,
                           settings.weight_decay)
        perms = torch.argsort(torch.rand(m, s, generator=generator), dim=1)
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        for b0 in range(0, s, bs):
            idx = perms[:, b0:b0 + bs]  # [M, B]
            if offsets is not None:
                idx = idx + offsets
            b = idx.shape[1]
            flat = idx.reshape(-1).to(device)
            x = images.index_select(0, flat)  # [M*B, C, H, W], member-major
            y = labels.index_select(0, flat)
            if augment:
                groups = member_of if b == bs else torch.arange(m).repeat_interleave(b)
                x = augment(x, generator, op_groups=groups)
            x = x.view(m, b, c, h, w).transpose(0, 1).reshape(b, m * c, h, w)
            with autocast(device, settings.precision):
                out = forward(x)
            out = out.float().reshape(b, m, -1).transpose(0, 1).reshape(m * b, -1)  # member-major
            losses = loss_fn(out, y)
            loss = losses.mean() * m
            if cosine:
                lr = warmup_cosine_lr(settings.lr, step, total_steps, settings.warmup_steps, settings.final_lr_factor)
                for group in opt.param_groups:
                    group["lr"] = lr
            sgd_step(opt, loss)
            step += 1
            with torch.no_grad():
                value = float(loss) / m
                if not math.isfinite(value):
                    raise NumericalError(f"training loss became {value} at epoch {ep}, step {b0 // bs + 1}")
                tot_loss += value * b
                hard = y.argmax(1) if soft else y
                tot_correct += int((out.argmax(1) == hard).sum()) // max(m, 1)
                tot_n += b
            if on_batch is not None:
                on_batch(ep, idx.reshape(-1), losses.detach(), out.detach())
            if on_step is not None:
                on_step(ep, b0 // bs + 1, n_batches)
        if on_epoch is not None:
            on_epoch(ep, tot_loss / tot_n, tot_correct / tot_n)
        if early_stop is not None and early_stop.after_epoch(model, ep + 1, last=ep + 1 == settings.epochs):
            break  # every member has stopped
    if early_stop is not None:
        early_stop.finish(model)
    return model


@torch.no_grad()
def test_accuracy(model: TinyNet, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
                  batch_size: int | None = None, compile: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Accuracy of every member on ``(images, labels)`` (normalised float images, int labels).

    Runs in eval mode without gradients, ``batch_size`` images at a time (None: the device's choice,
    :func:`tinyset.runtime.forward_chunk` on a CPU, 1000 elsewhere), and leaves the model in train
    mode. A compiled forward gets the last batch padded to full size (eval mode treats images
    independently), so it is not compiled a second time for a smaller one.
    ``progress(batches_done, batches_total)`` is called after every batch.
    """
    model.eval()
    m = model.members
    n = images.shape[0]
    if batch_size is None:
        batch_size = forward_chunk(images.device, m) or 1000
    forward = model_forward(model, "test", compile)
    correct = torch.zeros(m, dtype=torch.long)
    total = -(-n // batch_size)
    for k, b0 in enumerate(range(0, n, batch_size)):
        x = images[b0:b0 + batch_size]
        y = labels[b0:b0 + batch_size]
        short = batch_size - x.shape[0] if compile and n > batch_size else 0
        with autocast(images.device, precision):
            out = forward(torch.cat([x, x.new_zeros(short, *x.shape[1:])]) if short else x)
        out = out[:x.shape[0]].reshape(x.shape[0], m, -1)
        correct += (out.argmax(-1) == y.view(-1, 1)).sum(0).cpu()
        if progress is not None:
            progress(k + 1, total)
    model.train()
    return (correct.double() / n).tolist()


# not a pytest test, although its name starts with "test"
test_accuracy.__test__ = False  # type: ignore[attr-defined]


# ---------------------------------------------------------------- early stopping

def member_state(model: torch.nn.Module, m: int, members: int) -> dict[str, torch.Tensor]:
    """A copy of member ``m``'s slice of every parameter and buffer of a ``members``-wide model.

    Every per-member tensor of :mod:`tinyset.models.layers` is laid out member-major along its
    first dimension (``members * n`` rows, member ``m`` owns rows ``m*n:(m+1)*n``); 0-dim entries
    (a BatchNorm's batch counter) are shared by all members and left out.
    """
    out = {}
    for key, value in model.state_dict().items():
        if value.dim() == 0:
            continue
        if value.shape[0] % members:
            raise RuntimeError(f"cannot split {key} of shape {tuple(value.shape)} into {members} members")
        n = value.shape[0] // members
        out[key] = value[m * n:(m + 1) * n].detach().clone()
    return out


def load_member_state(model: torch.nn.Module, m: int, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (from :func:`member_state`) back into member ``m``'s slices, in place."""
    current = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            n = value.shape[0]
            current[key][m * n:(m + 1) * n].copy_(value)


class EarlyStopping:
    """Early stopping on a validation split, decided for every member of an ensemble on its own.

    The patience rule of early stopping (Prechelt, "Early Stopping -- But When?", 1998; the
    "early stopping" that the issue's source report adds in its MPS2 pipeline): after every
    ``every`` epochs, and after the last epoch, every member still running is tested on the
    validation images (eval mode, no augmentation, :func:`test_accuracy`). A member *improves*
    when its validation accuracy is strictly above its best so far (a tie keeps the earlier, shorter
    trained weights); its weights -- its slice of every parameter and buffer -- are then copied. A
    member whose best validation epoch is ``patience`` or more epochs behind the current one
    *stops*: it is not validated again and its later updates are thrown away.

    Members stop independently; the ensemble stops when all of them have. Until then the batched
    pass keeps computing the stopped members (their slices of the grouped layers cost the same as
    before); their weights are discarded at the end, when :meth:`finish` gives every member -- the
    stopped ones and those that ran to the last epoch -- the weights of its best validation epoch.
    Members never interact and validation draws nothing from the generator, so a member's stop
    epoch does not depend on when the others stop, and up to a member's stop the training is
    exactly the training without early stopping. Only the images given here are looked at: the
    caller holds them out of the training data (never the test set).

    After training: ``best_accuracy[m]`` (validation accuracy of the weights member ``m`` ends
    with), ``best_epoch[m]`` (epochs trained for those weights), ``stop_epoch[m]`` (epochs trained
    when member ``m`` stopped, or the last epoch run when it never did), ``stopped[m]`` (whether
    the rule stopped it), ``epochs_run`` (epochs the ensemble trained), ``history`` (``(epoch,
    [accuracy or None per member])`` for every validation) and ``seconds`` (time spent in
    validation passes).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, patience: int, every: int = 1,
                 batch_size: int | None = None):
        own = "early stopping"
        self.patience = check_number(own, "patience", patience, low=1, integer=True)
        self.every = check_number(own, "every", every, low=1, integer=True)
        self.batch_size = None if batch_size is None else check_number(own, "batch_size", batch_size, low=1,
                                                                       integer=True)
        if images.dim() != 4 or images.shape[0] == 0 or labels.shape != (images.shape[0],):
            raise ConfigError(f"early stopping needs a non-empty validation split: images [N, C, H, W] and "
                              f"labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels = images, labels
        self._reset(0)

    def _reset(self, members: int) -> None:
        self.members = members
        self.best_accuracy: list[float] = [float("-inf")] * members
        self.best_epoch: list[int] = [0] * members
        self.stop_epoch: list[int] = [0] * members
        self.stopped: list[bool] = [False] * members
        self.epochs_run = 0
        self.history: list[tuple[int, list[float | None]]] = []
        self.seconds = 0.0
        self._best_state: list[dict[str, torch.Tensor] | None] = [None] * members
        self._precision, self._compile = "fp32", False

    def start(self, model: TinyNet, settings: TrainSettings) -> None:
        """Called by :func:`train_ensemble` before the first epoch: forget any earlier run."""
        if self.images.device != next(model.parameters()).device:
            raise ConfigError(f"the validation images are on {self.images.device} but the model is on "
                              f"{next(model.parameters()).device}")
        self._reset(model.members)
        self._precision, self._compile = settings.precision, settings.compile

    def validate(self, model: TinyNet) -> list[float]:
        """Validation accuracy of every member (the whole split)."""
        return test_accuracy(model, self.images, self.labels, precision=self._precision,
                             batch_size=self.batch_size, compile=self._compile)

    def after_epoch(self, model: TinyNet, epochs_done: int, last: bool = False) -> bool:
        """Apply the rule after ``epochs_done`` epochs; True when every member has stopped."""
        self.epochs_run = epochs_done
        if epochs_done % self.every and not last:
            return False
        start = time.perf_counter()
        accs = self.validate(model)
        self.seconds += time.perf_counter() - start
        row: list[float | None] = [None] * self.members
        for m in range(self.members):
            if self.stopped[m]:
                continue
            row[m] = accs[m]
            if accs[m] > self.best_accuracy[m]:
                self.best_accuracy[m], self.best_epoch[m] = accs[m], epochs_done
                self._best_state[m] = member_state(model, m, self.members)
            elif epochs_done - self.best_epoch[m] >= self.patience:
                self.stopped[m], self.stop_epoch[m] = True, epochs_done
        self.history.append((epochs_done, row))
        return all(self.stopped)

    def finish(self, model: TinyNet) -> None:
        """Give every member the weights of its best validation epoch (called after the last epoch)."""
        for m in range(self.members):
            if not self.stopped[m]:
                self.stop_epoch[m] = self.epochs_run
            state = self._best_state[m]
            if state is not None:
                load_member_state(model, m, state)
        self._best_state = [None] * self.members

    def record(self) -> dict[str, Any]:
        """The outcome as plain data (what the evaluator stores per architecture)."""
        return {"stop_epochs": list(self.stop_epoch), "best_epochs": list(self.best_epoch),
                "stopped": list(self.stopped), "val_accuracies": [a if math.isfinite(a) else None
                                                                  for a in self.best_accuracy],
                "epochs_run": self.epochs_run, "val_seconds": self.seconds}

__all__ = ["TrainSettings", "train_ensemble", "test_accuracy", "EarlyStopping", "member_state", "load_member_state", "sgd_step", "make_sgd", "per_sample_loss",
           "model_forward", "CompiledForward", "compile_status", "compile_errors", "quiet_compiler",
           "check_number", "COMPILE_BACKEND", "QUIET_COMPILER"]
