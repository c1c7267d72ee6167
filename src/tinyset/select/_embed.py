"""Shared helpers of the embedding-based selectors (herding, k-center).

:func:`embed_dataset` maps every training image to the features of a network (``model.embed``,
the layer before the classifier). By default that network is a *randomly initialised* ConvNet,
never trained (``pretrain_epochs=0``): the feature space DM (Zhao & Bilen, "Dataset Condensation
with Distribution Matching", WACV 2023) matches distributions in, which already separates classes
reasonably and makes selection run in seconds on a CPU. ``pretrain_epochs > 0`` first trains the
network briefly on the real data with :func:`tinyset.training.train_ensemble` (SGD, lr 0.01, batch
256), the setting of DeepCore (Guo et al., DEXA 2022) and of the coreset baselines of Zhao et al.
(ICLR 2021).

:func:`greedy_selection` runs the shared greedy loop (:func:`tinyset.select.greedy.greedy_order`)
with a criterion on the embeddings of each class and returns a :class:`~tinyset.select.base.Selection`.
Both stages show a tqdm progress bar (on stderr, hidden when it is not a terminal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.hparams import hp
from tinyset.models import create_model
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, resolve_precision
from tinyset.select import greedy
from tinyset.select.base import Selection, SelectorOptions, per_class_indices, with_options
from tinyset.training import TrainSettings, train_ensemble


def embed_dataset(train: ImageDataset, model_name: str = "convnet", *, generator: torch.Generator,
                  device: str | torch.device = "cpu", batch_size: int = 1000, precision: str = "fp32",
                  pretrain_epochs: int = 0) -> torch.Tensor:
    """Features ``float32 [N, D]`` (on ``device``) of every image of ``train``, in dataset order.

    The network ``model_name`` is built by :func:`tinyset.models.create_model` with weights drawn
    from a child generator of ``generator`` (so the same generator state gives the same features).
    With ``pretrain_epochs > 0`` it is first trained on the whole of ``train`` with
    :func:`tinyset.training.train_ensemble` (lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
    lr x0.1 after half the epochs, no augmentation). Features are computed in eval mode, without
    gradients, ``batch_size`` images at a time (each batch of uint8 images normalised with
    ``train.info.normalize`` on ``device``).
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
        settings = TrainSettings(epochs=pretrain_epochs, lr=0.01, batch_size=256, precision=precision)
        steps = -(-len(train) // min(256, len(train)))
        with tqdm(total=pretrain_epochs * steps, desc=f"pretraining {model_name}", unit="batch", disable=None,
                  leave=False) as bar:
            train_ensemble(model, train.normalized(device), train.labels.to(device), settings,
                           generator=make_generator(derive_seed(generator)),
                           on_step=lambda *_: bar.update(1),
                           on_epoch=lambda ep, loss, acc: bar.set_postfix(epoch=ep + 1, loss=f"{loss:.3f}",
                                                                          refresh=False))
    model.eval()
    feats: list[torch.Tensor] = []
    with torch.no_grad(), tqdm(total=len(train), desc=f"embedding ({model_name})", unit="img", disable=None,
                               leave=False) as bar:
        for b0 in range(0, len(train), batch_size):
            x = info.normalize(train.images[b0:b0 + batch_size].to(device))
            with autocast(device, precision):
                f = model.embed(x)
            feats.append(f.float().reshape(f.shape[0], -1))
            bar.update(x.shape[0])
    return torch.cat(feats)


def greedy_selection(train: ImageDataset, ipc: int, emb: torch.Tensor, criterion: greedy.CriterionFactory,
                     name: str = "greedy") -> Selection:
    """Per class, :func:`~tinyset.select.greedy.greedy_order` on that class's rows of ``emb``.

    Indices: the first ``ipc`` picks of every class, class by class, in pick order. Scores: a
    class's ``t``-th pick scores ``-t`` (0 for the first), samples never picked ``-inf``.
    """
    classes = per_class_indices(train)
    scores = torch.full((len(train),), float("-inf"), dtype=torch.float64)
    picks = []
    with tqdm(total=ipc * len(classes), desc=name, unit="pick", disable=None, leave=False) as bar:
        for c, idx in enumerate(classes):
            bar.set_postfix(cls=f"{c + 1}/{len(classes)}", refresh=False)
            order = greedy.greedy_order(emb[idx.to(emb.device)], ipc, criterion, name=name,
                                        on_pick=lambda _t: bar.update(1)).cpu()
            chosen = idx[order]
            scores[chosen] = greedy.pick_scores(ipc)
            picks.append(chosen)
    return Selection(torch.cat(picks), scores,
                     order_note=f"{name}: per class, -(pick step) for the picked samples (0 = first), "
                                f"-inf for samples never picked")


@dataclass
class EmbeddingOptions(SelectorOptions):
    """The options of the embedding selectors (herding, k-center)."""

    model: str = hp("convnet", "network whose embeddings (model.embed) are compared")
    pretrain_epochs: int = hp(0, "epochs of training on the real data first (0: a random network)", ge=0)
    batch_size: int = hp(1000, "images embedded (and trained on) per batch", ge=1)
    precision: str = hp("fp32", "autocast precision (auto: bf16 on a CPU with native bf16)",
                        choices=("auto", "fp32", "bf16"))


def embedding_selector(criterion: greedy.CriterionFactory, name: str, doc: str):
    """A selector that embeds the training set with a network and runs ``criterion`` greedily per class."""

    def selector(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
                 model: str = "convnet", pretrain_epochs: int = 0, batch_size: int = 1000,
                 precision: str = "fp32") -> Selection:
        emb = embed_dataset(train, model, generator=generator, device=device, batch_size=batch_size,
                            precision=precision, pretrain_epochs=pretrain_epochs)
        return greedy_selection(train, ipc, emb, criterion, name=name)

    selector.__doc__ = doc
    return with_options(EmbeddingOptions)(selector)


__all__ = ["EmbeddingOptions", "embed_dataset", "greedy_selection", "embedding_selector"]
