"""EL2N difficulty scores and the ``el2n`` selector.

Paul, Ganguli and Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training" (NeurIPS 2021): the *error L2-norm* of a training example ``(x, y)`` is
``|| softmax(f(x)) - onehot(y) ||_2``, the distance between a network's predicted class
probabilities and the one-hot label, taken **early** in training and averaged over several
independently initialised networks. Examples the networks already fit have scores near 0 (easy);
mislabelled, atypical or ambiguous examples score high (hard; the maximum is ``sqrt(2)``).

:func:`el2n_scores` trains ``members`` freshly initialised networks side by side for ``epochs``
epochs in the one training loop, :func:`tinyset.training.train_ensemble` (SGD lr 0.01, momentum
0.9, weight decay 5e-4, batch 256, constant lr, no augmentation: the short schedule of the
forgetting selector), then scores every training example with each network in eval mode and
averages. It is reused by the data-selection curriculum of expert trajectories
(:mod:`tinyset.experts`, PAD) to order the training data from easy to hard.

The ``el2n`` selector keeps, per class, the ``ipc`` hardest (``keep=hardest``, the default; the
paper's pruning keeps the high-score examples) or easiest (``keep=easiest``) examples. Its
selection scores are the EL2N values (negated for ``easiest``, so that higher = preferred as every
selector's scores are); ``-inf`` marks examples outside the ``max_train`` subsample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.hparams import hp
from tinyset.models import create_model
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, resolve_precision
from tinyset.select import SELECTORS
from tinyset.select.base import Selection, SelectorOptions, top_per_class, with_options
from tinyset.select.forgetting import stratified_subset
from tinyset.training import TrainSettings, model_forward, train_ensemble

#: what the keep option may say
KEEP = ("hardest", "easiest")


@torch.no_grad()
def el2n_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
            batch_size: int = 1000) -> torch.Tensor:
    """EL2N of every example under every member of ``model``: ``float64 [M, N]``.

    ``images`` are normalised ``[N, C, H, W]``, ``labels`` int64 ``[N]``; the model runs in eval mode
    without gradients (and is left in train mode)."""
    model.eval()
    m = getattr(model, "members", 1)
    forward = model_forward(model, "test", False)
    out = []
    for b0 in range(0, images.shape[0], batch_size):
        x = images[b0:b0 + batch_size]
        y = labels[b0:b0 + batch_size]
        with autocast(images.device, precision):
            logits = forward(x)
        probs = F.softmax(logits.float().reshape(x.shape[0], m, -1), dim=-1)  # [B, M, K]
        onehot = F.one_hot(y, probs.shape[-1]).to(probs.dtype).unsqueeze(1)
        out.append((probs - onehot).norm(dim=-1).transpose(0, 1).cpu().to(torch.float64))
    model.train()
    return torch.cat(out, dim=1)


def el2n_scores(train: ImageDataset, generator: torch.Generator, device: str | torch.device = "cpu", *,
                model: str = "convnet", members: int = 4, epochs: int = 3, batch_size: int = 256,
                lr: float = 0.01, precision: str = "auto", model_args: Mapping[str, Any] | None = None
                ) -> torch.Tensor:
    """EL2N score of every example of ``train`` (``float64 [N]``, higher = harder), see the module docstring.

    ``members`` networks of ``model`` (``model_args`` passed to :func:`tinyset.models.create_model`)
    are initialised from a child generator of ``generator`` and trained ``epochs`` epochs on all of
    ``train`` (shuffles from a second child generator); the score is the mean over the networks."""
    for name, value, low in (("members", members, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"el2n {name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"el2n lr must be a finite number > 0, got {lr!r}")
    if len(train) == 0:
        raise ConfigError("el2n: the training set is empty")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    info = train.info
    net = create_model(model, info.channels, info.num_classes, info.image_size, members=members,
                       generator=make_generator(derive_seed(generator)), device=device, **dict(model_args or {}))
    shuffle = make_generator(derive_seed(generator))
    x, y = train.normalized(device), train.labels.to(device)
    settings = TrainSettings(epochs=epochs, lr=lr, momentum=0.9, weight_decay=5e-4, batch_size=batch_size,
                             lr_decay_factor=1.0, precision=precision)
    train_ensemble(net, x, y, settings, shuffle)
    return el2n_of(net, x, y, precision).mean(dim=0)


def easy_to_hard(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per class, the dataset indices of that class ordered from the lowest score (easiest) to the
    highest; ties by index (a stable sort)."""
    scores, labels = torch.as_tensor(scores).cpu(), torch.as_tensor(labels).cpu()
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ConfigError(f"difficulty scores {tuple(scores.shape)} do not match the labels {tuple(labels.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ConfigError("difficulty scores contain NaN")
    order = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        order.append(idx[torch.sort(scores[idx], stable=True).indices])
    return order


@dataclass
class El2nOptions(SelectorOptions):
    """The options of ``el2n``."""

    model: str = hp("convnet", "network trained briefly on the real data to score the examples")
    members: int = hp(4, "independently initialised networks the score is averaged over", ge=1, le=64)
    epochs: int = hp(3, "training epochs before scoring (EL2N is taken early in training)", ge=1)
    batch_size: int = hp(256, "batch size", ge=1)
    lr: float = hp(0.01, "SGD learning rate (constant, momentum 0.9, weight decay 5e-4)", gt=0)
    precision: str = hp("auto", "autocast precision (auto: bf16 on a CPU with native bf16)",
                        choices=("auto", "fp32", "bf16"))
    keep: str = hp("hardest", "per class, keep the hardest (highest EL2N) or the easiest examples", choices=KEEP)
    max_train: int = hp(None, "class-stratified subsample trained on and scored (none: the whole training split)",
                        ge=1, optional=True)


@SELECTORS.register("el2n", help="per class, the hardest (or easiest) examples by EL2N early in training (Paul 2021)")
@with_options(El2nOptions)
def el2n_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
                model: str = "convnet", members: int = 4, epochs: int = 3, batch_size: int = 256, lr: float = 0.01,
                precision: str = "auto", keep: str = "hardest", max_train: int | None = None) -> Selection:
    """The ``ipc`` examples per class with the highest (``keep=hardest``) or lowest EL2N."""
    if keep not in KEEP:
        raise ConfigError(f"el2n keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if max_train is not None:
        subset = stratified_subset(train, int(max_train), ipc, make_generator(derive_seed(generator)))
        data = ImageDataset(train.info, train.split, train.images[subset], train.labels[subset], train.source)
    else:
        subset = torch.arange(len(train))
        data = train
    el2n = el2n_scores(data, generator, device, model=model, members=members, epochs=epochs,
                       batch_size=batch_size, lr=lr, precision=precision)
    scores = torch.full((len(train),), -math.inf, dtype=torch.float64)
    scores[subset] = el2n if keep == "hardest" else -el2n
    note = ("el2n: EL2N ||softmax(f(x)) - onehot(y)||_2 averaged over the networks"
            + (" (higher = harder)" if keep == "hardest" else ", negated (higher = easier)")
            + "; -inf = not in the max_train subsample")
    return Selection(top_per_class(scores, train.labels, ipc, train.info.num_classes), scores, order_note=note,
                     record={"el2n": {"keep": keep, "members": members, "epochs": epochs, "model": model}})


__all__ = ["El2nOptions", "KEEP", "el2n_of", "el2n_scores", "easy_to_hard", "el2n_select"]
