"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: environment variable that overrides where the real datasets are looked for
SHARED_DATASETS_ENV = "TINYSET_SHARED_DATASETS"


def shared_datasets_path() -> Path:
    """``$TINYSET_SHARED_DATASETS``, else ``shared/datasets`` beside the repository root."""
    env = os.environ.get(SHARED_DATASETS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The folder of real datasets (torchvision layout); skips the test when it is missing."""
    path = shared_datasets_path()
    if not path.is_dir():
        pytest.skip(f"real datasets folder {path} not found (set {SHARED_DATASETS_ENV} to its "
                    f"location to run the realdata tests)")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: one intra-op thread is faster and avoids oversubscription."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_dataset(num_classes: int = 3, per_class: int = 20, channels: int = 1, size: int = 8,
                 seed: int = 0, split: str = "train"):
    """A small, learnable ImageDataset: each class is a distinct bright blob plus noise."""
    import torch

    from tinyset.data.base import DatasetInfo, ImageDataset

    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo("tiny", channels, (size, size), num_classes, tuple(f"c{i}" for i in range(num_classes)),
                       (0.5,) * channels, (0.25,) * channels)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = torch.rand(num_classes, channels, size, size, generator=g)
    imgs = base[labels] * 0.7 + 0.3 * torch.rand(len(labels), channels, size, size, generator=g)
    images = (imgs * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(info, split, images, labels, source="tiny")


#: the architecture of the tiny trajectory-matching experts (ConvNet depth 1; width 8 via TINY_EXPERT_ARGS)
TINY_EXPERT_MODEL = "convnet-d1"
TINY_EXPERT_ARGS = {"width": 8}


def tiny_experts(out: Path, train, epochs: int = 6, curriculum=None) -> Path:
    """3 tiny experts of ``train`` (TINY_EXPERT_MODEL, width 8, lr 0.05, batch 128, seed 1) written to
    ``out``: what the MTT and PAD tests distil against (PAD's with an EL2N ``curriculum``)."""
    import torch

    from tinyset.experts import ExpertSettings, train_experts

    torch.set_num_threads(1)
    settings = ExpertSettings(epochs=epochs, members=3, lr=0.05, batch_size=128, compile=False,
                              **({"curriculum": curriculum} if curriculum is not None else {}))
    train_experts(train, out, 3, TINY_EXPERT_MODEL, settings, seed=1, model_args=dict(TINY_EXPERT_ARGS))
    return out
