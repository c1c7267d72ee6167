"""Train freshly initialised networks on a (synthetic or real) set, several at once, and test them.

The M networks of one architecture live in one ``members=M`` module (see
:mod:`tinyset.models.layers`): each step every member draws its own mini-batch (its own shuffle)
and its own augmentation, the loss is the sum of the members' mean losses, and one SGD step updates
all of them. Gradients, weight decay and momentum are per parameter, so this is mathematically the
same as training the M networks one after another, only faster.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tinyset.augment import DSA
from tinyset.models.base import TinyNet
from tinyset.runtime import autocast


@dataclass
class TrainSettings:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5  # fraction of the epochs after which lr is multiplied by lr_decay_factor
    decay_epoch: int | None = None  # first epoch at the decayed lr; overrides lr_decay_at when given
    lr_decay_factor: float = 0.1
    precision: str = "fp32"  # fp32 | bf16 (autocast for the forward pass)
    compile: bool = False


def _ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for hard (int) or soft (probability rows) targets, mean over the batch."""
    return F.cross_entropy(out, target)


def _maybe_compile(model: TinyNet, enabled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if not enabled:
        return model
    try:
        return torch.compile(model, dynamic=False)
    except Exception as exc:  # pragma: no cover - platform without a working compiler
        warnings.warn(f"torch.compile unavailable ({exc}); training in eager mode")
        return model


def train_ensemble(model: TinyNet, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings,
                   generator: torch.Generator, augment: DSA | None = None,
                   on_epoch: Callable[[int, float, float], None] | None = None,
                   on_step: Callable[[int, int, int], None] | None = None) -> TinyNet:
    """Train every member of ``model`` on ``(images, labels)`` with SGD; returns the model.

    ``labels`` are int64 class indices ``[S]`` or soft labels ``[S, K]``. ``on_epoch(epoch, loss,
    train_acc)`` is called after each epoch and ``on_step(epoch, batches_done, batches_per_epoch)``
    after each optimiser step (for progress bars; an epoch over a full dataset is hundreds of steps).
    """
    device = images.device
    m = model.members
    s = images.shape[0]
    c, h, w = images.shape[1:]
    soft = labels.dim() == 2
    bs = min(settings.batch_size, s)
    decay_epoch = (settings.decay_epoch if settings.decay_epoch is not None
                   else int(settings.epochs * settings.lr_decay_at))
    forward = _maybe_compile(model, settings.compile)
    compiled = forward is not model
    member_of = torch.arange(m).repeat_interleave(bs)
    n_batches = -(-s // bs)
    model.train()

    def make_opt(lr: float) -> torch.optim.Optimizer:
        # a new optimiser at the decay, as the reference does (momentum restarts)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)

    opt = make_opt(settings.lr)
    for ep in range(settings.epochs):
        if ep == decay_epoch and ep > 0:
            opt = make_opt(settings.lr * settings.lr_decay_factor)
        perms = torch.argsort(torch.rand(m, s, generator=generator), dim=1)
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        for b0 in range(0, s, bs):
            idx = perms[:, b0:b0 + bs]  # [M, B]
            b = idx.shape[1]
            flat = idx.reshape(-1).to(device)
            x = images.index_select(0, flat)  # [M*B, C, H, W], member-major
            y = labels.index_select(0, flat)
            if augment:
                groups = member_of if b == bs else torch.arange(m).repeat_interleave(b)
                x = augment(x, generator, op_groups=groups)
            x = x.view(m, b, c, h, w).transpose(0, 1).reshape(b, m * c, h, w)
            try:
                with autocast(device, settings.precision):
                    out = forward(x)
            except Exception as exc:  # compile failures surface at the first call
                if not compiled:
                    raise
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training in eager mode")
                forward, compiled = model, False
                with autocast(device, settings.precision):
                    out = forward(x)
            out = out.float().reshape(b, m, -1).transpose(0, 1).reshape(m * b, -1)  # member-major
            loss = _ce(out, y) * m
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                tot_loss += float(loss) / m * b
                hard = y.argmax(1) if soft else y
                tot_correct += int((out.argmax(1) == hard).sum()) // max(m, 1)
                tot_n += b
            if on_step is not None:
                on_step(ep, b0 // bs + 1, n_batches)
        if not torch.isfinite(torch.tensor(tot_loss)):
            raise FloatingPointError(f"training loss became {tot_loss} at epoch {ep}")
        if on_epoch is not None:
            on_epoch(ep, tot_loss / tot_n, tot_correct / tot_n)
    return model


@torch.no_grad()
def test_accuracy(model: TinyNet, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
                  batch_size: int = 1000, compile: bool = False) -> list[float]:
    """Accuracy of every member on ``(images, labels)`` (normalised float images, int labels)."""
    model.eval()
    m = model.members
    forward = _maybe_compile(model, compile)
    correct = torch.zeros(m, dtype=torch.long)
    for b0 in range(0, images.shape[0], batch_size):
        x = images[b0:b0 + batch_size]
        y = labels[b0:b0 + batch_size]
        try:
            with autocast(images.device, precision):
                out = forward(x)
        except Exception as exc:  # compile failures surface at the first call
            if forward is model:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); testing in eager mode")
            forward = model
            with autocast(images.device, precision):
                out = forward(x)
        out = out.reshape(x.shape[0], m, -1)
        correct += (out.argmax(-1) == y.view(-1, 1)).sum(0).cpu()
    model.train()
    return (correct.double() / images.shape[0]).tolist()
