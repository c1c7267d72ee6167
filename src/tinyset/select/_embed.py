"""Shared helpers of the embedding-based selectors (herding, k-center).

:func:`embed_dataset` maps every training image to the features of a network (``model.embed``,
the layer before the classifier). By default that network is a *randomly initialised* ConvNet,
never trained (``pretrain_epochs=0``): the feature space DM (Zhao & Bilen, "Dataset Condensation
with Distribution Matching", WACV 2023) matches distributions in, which already separates classes
reasonably and makes selection run in seconds on a CPU. ``pretrain_epochs > 0`` first trains the
network briefly on the real data (SGD, lr 0.01, batch 256, as :mod:`tinyset.evaluate.trainer`), the
setting of DeepCore (Guo et al., DEXA 2022) and of the coreset baselines of Zhao et al. (ICLR 2021).

:func:`select_by_order` runs a per-class ordering function (``order_fn(emb, k) -> positions``) on
the embeddings of each class and maps the positions back to dataset indices.
"""
from __future__ import annotations

from typing import Callable

import torch

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.models import create_model
from tinyset.select import per_class_indices
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, resolve_precision

#: ``order_fn(emb [n, D], k) -> LongTensor [k]`` of row positions, in selection order
OrderFn = Callable[[torch.Tensor, int], torch.Tensor]


def embed_dataset(train: ImageDataset, model_name: str = "convnet", *, generator: torch.Generator,
                  device: str | torch.device = "cpu", batch_size: int = 1000, precision: str = "fp32",
                  pretrain_epochs: int = 0) -> torch.Tensor:
    """Features ``float32 [N, D]`` (on ``device``) of every image of ``train``, in dataset order.

    The network ``model_name`` is built by :func:`tinyset.models.create_model` with weights drawn
    from a child generator of ``generator`` (so the same generator state gives the same features).
    With ``pretrain_epochs > 0`` it is first trained on the whole of ``train`` with
    :func:`tinyset.evaluate.trainer.train_ensemble` (lr 0.01, batch 256, no augmentation). Features
    are computed in eval mode, without gradients, ``batch_size`` images at a time (each batch of
    uint8 images normalised with ``train.info.normalize`` on ``device``).
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if pretrain_epochs < 0:
        raise ConfigError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
    precision = resolve_precision(precision, device)
    info = train.info
    model = create_model(model_name, info.channels, info.num_classes, info.image_size, members=1,
                         generator=make_generator(derive_seed(generator)), device=device)
    if pretrain_epochs > 0:
        from tinyset.evaluate.trainer import TrainSettings, train_ensemble

        settings = TrainSettings(epochs=pretrain_epochs, lr=0.01, batch_size=256, precision=precision)
        train_ensemble(model, train.normalized(device), train.labels.to(device), settings,
                       generator=make_generator(derive_seed(generator)))
    model.eval()
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        for b0 in range(0, len(train), batch_size):
            x = info.normalize(train.images[b0:b0 + batch_size].to(device))
            with autocast(device, precision):
                f = model.embed(x)
            feats.append(f.float().reshape(f.shape[0], -1))
    return torch.cat(feats)


def select_by_order(train: ImageDataset, ipc: int, emb: torch.Tensor, order_fn: OrderFn) -> torch.Tensor:
    """Apply ``order_fn`` to each class's rows of ``emb``; the first ``ipc`` picks of every class.

    Returns dataset indices (``int64``, CPU), class by class, each class in selection order.
    """
    picks = []
    for idx in per_class_indices(train):
        order = order_fn(emb[idx.to(emb.device)], ipc).cpu()
        picks.append(idx[order])
    return torch.cat(picks)


__all__ = ["OrderFn", "embed_dataset", "select_by_order"]


def embedding_selector(order_fn: OrderFn, doc: str):
    """A selector that embeds the training set with a ConvNet and orders each class with ``order_fn``."""

    def selector(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
                 model: str = "convnet", pretrain_epochs: int = 0, batch_size: int = 1000,
                 precision: str = "fp32") -> torch.Tensor:
        emb = embed_dataset(train, model, generator=generator, device=device, batch_size=batch_size,
                            precision=precision, pretrain_epochs=pretrain_epochs)
        return select_by_order(train, ipc, emb, order_fn)

    selector.__doc__ = doc
    return selector

