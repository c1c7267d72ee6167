"""Forgetting-score selection: keep the examples a network forgets most often while training.

Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning"
(ICLR 2019): while a network trains, every presentation of an example records whether it was
classified correctly; a *forgetting event* is a presentation where the example is misclassified
after having been classified correctly at its previous presentation. Examples never classified
correctly count as forgotten infinitely often. Per class, the ``ipc`` examples with the most
forgetting events are kept (the selection used as a coreset baseline by DeepCore, Guo et al.,
DEXA 2022).

Here a freshly initialised one-member network (ConvNet by default) trains on the real training
set in the shared loop :func:`tinyset.training.train_ensemble` for ``epochs`` epochs (default 3;
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, constant lr, no augmentation), and the
loop's per-batch hook reads each sample's correctness from the forward pass of the training step it
was part of. The short schedule and ``max_train`` (a seeded, class-stratified subsample) keep it
affordable on a CPU. The selection's scores are the forgetting counts (``inf`` for never learned;
``-inf`` for samples outside the ``max_train`` subsample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.hparams import hp
from tinyset.models import create_model
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import resolve_precision
from tinyset.select import SELECTORS
from tinyset.select.base import Selection, SelectorOptions, per_class_indices, top_per_class, with_options
from tinyset.training import TrainSettings, train_ensemble


def count_forgetting(history: torch.Tensor) -> torch.Tensor:
    """Forgetting events per example from a correctness history.

    ``history`` is a bool ``[T, N]`` tensor: row ``t`` says whether each of the ``N`` examples was
    classified correctly at its ``t``-th presentation. Returns ``float64 [N]``: the number of
    ``True -> False`` transitions between consecutive presentations, or ``+inf`` for examples that
    were never classified correctly (Toneva et al.). The first presentation is never a forgetting
    event.
    """
    if history.dim() != 2:
        raise ValueError(f"history must be [T, N], got shape {tuple(history.shape)}")
    h = history.to(torch.bool)
    events = (h[:-1] & ~h[1:]).sum(dim=0).to(torch.float64)
    events[~h.any(dim=0)] = math.inf
    return events


def most_forgotten(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``int64 [k]`` of the ``k`` largest ``counts`` (``+inf`` first; ties: lowest position)."""
    if counts.dim() != 1:
        raise ValueError(f"counts must be [N], got shape {tuple(counts.shape)}")
    if not 0 <= k <= counts.numel():
        raise ValueError(f"cannot pick {k} of {counts.numel()} examples")
    return torch.sort(counts, descending=True, stable=True).indices[:k]


def stratified_subset(train: ImageDataset, max_train: int, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a random class-stratified subset of about ``max_train`` images.

    Class ``c`` keeps ``max(ipc, floor(max_train * n_c / N))`` of its ``n_c`` images (at most all),
    so every class can still supply ``ipc`` picks.
    """
    n = len(train)
    if max_train >= n:
        return torch.arange(n)
    keep = []
    for idx in per_class_indices(train):
        quota = min(idx.numel(), max(ipc, (max_train * idx.numel()) // n))
        keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:quota]])
    return torch.cat(keep).sort().values


def forgetting_history(train: ImageDataset, generator: torch.Generator, device: torch.device,
                       model: str = "convnet", epochs: int = 3, batch_size: int = 256, lr: float = 0.01,
                       precision: str = "auto") -> torch.Tensor:
    """Train a fresh ``model`` on all of ``train``; bool ``[epochs, N]`` correctness per presentation.

    Every epoch presents each example once (the loop's shuffle, drawn from a child generator of
    ``generator``); entry ``[e, i]`` is whether example ``i`` was classified correctly by the
    forward pass of the training step it was part of in epoch ``e`` (before that step's update).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    info = train.info
    net = create_model(model, info.channels, info.num_classes, info.image_size, members=1,
                       generator=make_generator(derive_seed(generator)), device=device)
    shuffle = make_generator(derive_seed(generator))
    n = len(train)
    settings = TrainSettings(epochs=epochs, lr=lr, momentum=0.9, weight_decay=5e-4, batch_size=batch_size,
                             lr_decay_factor=1.0, precision=precision)
    history = torch.zeros(epochs, n, dtype=torch.bool)
    labels_cpu = train.labels.cpu()

    def record(ep: int, idx: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor) -> None:
        history[ep, idx] = logits.argmax(dim=1).cpu() == labels_cpu[idx]

    steps_per_epoch = math.ceil(n / min(batch_size, n))
    with tqdm(total=epochs * steps_per_epoch, desc="forgetting", unit="batch", disable=None,
              leave=False) as bar:
        train_ensemble(net, train.normalized(device), train.labels.to(device), settings, shuffle,
                       on_batch=record, on_step=lambda *_: bar.update(1),
                       on_epoch=lambda ep, loss, acc: bar.set_postfix(epoch=ep + 1, loss=f"{loss:.3f}",
                                                                      refresh=False))
    return history


@dataclass
class ForgettingOptions(SelectorOptions):
    """The options of ``forgetting``."""

    model: str = hp("convnet", "network trained on the real data while forgetting events are counted")
    epochs: int = hp(3, "training epochs (presentations of every example)", ge=1)
    batch_size: int = hp(256, "batch size", ge=1)
    lr: float = hp(0.01, "SGD learning rate (constant)", gt=0)
    precision: str = hp("auto", "autocast precision (auto: bf16 on a CPU with native bf16)",
                        choices=("auto", "fp32", "bf16"))
    max_train: int = hp(None, "class-stratified subsample trained on (none: the whole training split)", ge=1,
                        optional=True)


@SELECTORS.register("forgetting", help="per class, the most-forgotten examples while training a ConvNet (Toneva 2019)")
@with_options(ForgettingOptions)
def forgetting_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
                      model: str = "convnet", epochs: int = 3, batch_size: int = 256, lr: float = 0.01,
                      precision: str = "auto", max_train: int | None = None) -> Selection:
    """The ``ipc`` examples per class with the most forgetting events (never learned first)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"forgetting needs epochs >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"forgetting batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"forgetting lr must be a finite number > 0, got {lr!r}")
    if max_train is not None:
        if max_train < 1:
            raise ConfigError(f"max_train must be >= 1, got {max_train}")
        subset = stratified_subset(train, int(max_train), ipc, make_generator(derive_seed(generator)))
        data = ImageDataset(train.info, train.split, train.images[subset], train.labels[subset], train.source)
    else:
        subset = torch.arange(len(train))
        data = train
    history = forgetting_history(data, generator, device, model=model, epochs=epochs,
                                 batch_size=batch_size, lr=lr, precision=precision)
    scores = torch.full((len(train),), -math.inf, dtype=torch.float64)
    scores[subset] = count_forgetting(history)
    return Selection(top_per_class(scores, train.labels, ipc, train.info.num_classes), scores,
                     order_note="forgetting: forgetting events while training (inf = never learned, "
                                "-inf = not in the max_train subsample)")


__all__ = ["ForgettingOptions", "count_forgetting", "most_forgotten", "stratified_subset", "forgetting_history",
           "forgetting_select"]
