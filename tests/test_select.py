"""Tests of the coreset selectors (tinyset.select): random, herding, k-center, forgetting."""
from __future__ import annotations

import math

import pytest
import torch

from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.errors import ConfigError
from tinyset.select import SELECTORS, select
from tinyset.select._embed import embed_dataset
from tinyset.select.forgetting import count_forgetting, most_forgotten, stratified_subset
from tinyset.select.herding import herding_order
from tinyset.select.kcenter import kcenter_order
from tinyset.synset import SyntheticSet
from tinyset.rng import make_generator

INFO = DatasetInfo("tiny-sel", 1, (8, 8), 3, ("a", "b", "c"), (0.3,), (0.35,))
PER_CLASS = 30
METHODS = ["random", "herding", "k-center", "forgetting"]
#: options that keep every end-to-end run well under a second on a CPU
FAST = {"forgetting": {"epochs": 2, "batch_size": 32, "precision": "fp32"}}


def make_train(per_class: int = PER_CLASS, seed: int = 0) -> ImageDataset:
    """3 classes of 8x8 images: class c is a bright band of rows 2c..2c+2 plus noise.

    Labels are interleaved (0, 1, 2, 0, 1, 2, ...) so index bookkeeping errors show. The last
    image of class 0 is an outlier (all white).
    """
    g = torch.Generator().manual_seed(seed)
    n = 3 * per_class
    labels = torch.arange(n) % 3
    x = torch.rand(n, 1, 8, 8, generator=g) * 60
    for c in range(3):
        x[labels == c, :, 2 * c:2 * c + 3, :] += 150
    x[3 * (per_class - 1)] = 255  # outlier of class 0
    return ImageDataset(INFO, "train", x.round().clamp(0, 255).to(torch.uint8), labels)


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    return make_train()


# ---------------------------------------------------------------- pure algorithms

def test_herding_order_by_hand() -> None:
    # mean 2.25: first 2 (closest); then the mean of {2, e} closest to 2.25 -> e=1 (mean 1.5 vs
    # 1.0 / 4.0); then {2, 1, e} -> e=6 (mean 3.0, |0.75|) beats e=0 (mean 1.0, |1.25|); then 0.
    emb = torch.tensor([[0.0], [1.0], [2.0], [6.0]])
    assert herding_order(emb, 4).tolist() == [2, 1, 3, 0]
    assert herding_order(emb, 2).tolist() == [2, 1]
    # differs from "closest to the mean first", which would give [2, 1, 0, 3]


def test_herding_order_2d_and_ties() -> None:
    # square corners + centre: centre is the mean; then the running mean {centre, corner} is
    # best matched by the corner opposite the last one picked
    emb = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0], [1.0, -1.0], [-1.0, 1.0]])
    order = herding_order(emb, 5).tolist()
    assert order[0] == 2
    assert order[1] == 0  # four-way tie -> lowest index
    assert order[2] == 1  # the corner opposite 0 brings the running mean back to 0
    assert sorted(order) == [0, 1, 2, 3, 4]
    # all identical rows: every step is a tie -> index order
    assert herding_order(torch.ones(5, 3), 5).tolist() == [0, 1, 2, 3, 4]
    assert herding_order(torch.ones(5, 3), 0).tolist() == []
    with pytest.raises(ValueError):
        herding_order(torch.ones(3, 2), 4)


def test_kcenter_order_on_a_line() -> None:
    # mean 3.2 -> first 3 (index 3); farthest from it: 10; then 0 (distance 3); then 1 and 2
    # both at distance 1 -> lowest index first
    emb = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert kcenter_order(emb, 5).tolist() == [3, 4, 0, 1, 2]
    assert kcenter_order(emb, 2).tolist() == [3, 4]
    assert kcenter_order(emb, 0).tolist() == []


def test_kcenter_order_covers_clusters_and_duplicates() -> None:
    # three tight clusters in 2-d: three centers land in three different clusters
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [-0.1, 0.0]])
    emb = (centres[:, None, :] + offsets[None]).reshape(-1, 2)
    order = kcenter_order(emb, 3)
    assert sorted((order // 4).tolist()) == [0, 1, 2]
    # duplicates: every row can still be picked exactly once
    dup = torch.zeros(4, 2)
    assert kcenter_order(dup, 4).tolist() == [0, 1, 2, 3]


def test_count_forgetting_by_hand() -> None:
    history = torch.tensor([
        [1, 0, 1, 0, 1],
        [0, 0, 1, 1, 0],
        [1, 0, 1, 1, 0],
        [0, 0, 1, 0, 1],
    ], dtype=torch.bool)
    # ex0: 1->0, 1->0 = 2; ex1: never correct = inf; ex2: always correct = 0;
    # ex3: 0,1,1,0 = 1 (the first presentation is never an event); ex4: 1,0,0,1 = 1
    assert count_forgetting(history).tolist() == [2.0, math.inf, 0.0, 1.0, 1.0]
    assert count_forgetting(history[:1]).tolist() == [0.0, math.inf, 0.0, math.inf, 0.0]


def test_most_forgotten_order() -> None:
    counts = torch.tensor([1.0, math.inf, 0.0, 3.0, 1.0, math.inf, 3.0])
    assert most_forgotten(counts, 7).tolist() == [1, 5, 3, 6, 0, 4, 2]
    assert most_forgotten(counts, 3).tolist() == [1, 5, 3]


# ---------------------------------------------------------------- end to end via select()

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ipc", [1, 4])
def test_select_exact_ipc(train: ImageDataset, method: str, ipc: int) -> None:
    syn = select(method, train, ipc, seed=0, **FAST.get(method, {}))
    assert isinstance(syn, SyntheticSet)
    assert len(syn) == 3 * ipc
    assert syn.ipc == ipc
    src = torch.tensor(syn.meta["source_indices"])
    assert src.unique().numel() == src.numel()
    assert torch.equal(train.labels[src], syn.labels)
    assert torch.equal(syn.labels, torch.arange(3).repeat_interleave(ipc))
    assert torch.allclose(syn.images, INFO.normalize(train.images[src]))
    assert syn.meta["method"] == f"select:{method}"
    assert syn.meta["config"]["ipc"] == ipc


@pytest.mark.parametrize("method", METHODS)
def test_select_deterministic(train: ImageDataset, method: str) -> None:
    opts = FAST.get(method, {})
    a = select(method, train, 3, seed=5, **opts).meta["source_indices"]
    b = select(method, train, 3, seed=5, **opts).meta["source_indices"]
    assert a == b


def test_random_seed_changes_selection(train: ImageDataset) -> None:
    a = select("random", train, 3, seed=0).meta["source_indices"]
    b = select("random", train, 3, seed=1).meta["source_indices"]
    assert a != b


def test_all_selectors_registered() -> None:
    for method in METHODS:
        assert method in SELECTORS


def test_ipc_larger_than_class_is_config_error(train: ImageDataset) -> None:
    for method in METHODS:
        with pytest.raises(ConfigError):
            select(method, train, PER_CLASS + 1)


def test_herding_ipc1_is_closest_to_class_mean(train: ImageDataset) -> None:
    # the selector seeds its network exactly as embed_dataset does with the same generator
    emb = embed_dataset(train, "convnet", generator=make_generator(3), device="cpu")
    assert emb.shape[0] == len(train) and emb.dim() == 2
    expected = []
    for c in range(3):
        idx = (train.labels == c).nonzero().flatten()
        e = emb[idx].double()
        expected.append(int(idx[((e - e.mean(0)) ** 2).sum(1).argmin()]))
    assert select("herding", train, 1, seed=3).meta["source_indices"] == expected


def test_embed_dataset_batches_and_seed(train: ImageDataset) -> None:
    a = embed_dataset(train, generator=make_generator(0), batch_size=7)
    b = embed_dataset(train, generator=make_generator(0), batch_size=1000)
    c = embed_dataset(train, generator=make_generator(1))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)


def test_kcenter_picks_the_outlier(train: ImageDataset) -> None:
    syn = select("k-center", train, 2, seed=0)
    outlier = 3 * (PER_CLASS - 1)
    assert outlier in syn.meta["source_indices"]


def test_forgetting_max_train(train: ImageDataset) -> None:
    syn = select("forgetting", train, 2, seed=0, max_train=30, epochs=2, precision="fp32")
    assert syn.ipc == 2
    assert syn.meta["config"]["max_train"] == 30
    sub = stratified_subset(train, 30, 2, make_generator(0))
    assert torch.bincount(train.labels[sub]).tolist() == [10, 10, 10]
    # a class never drops below ipc
    sub = stratified_subset(train, 3, 4, make_generator(0))
    assert torch.bincount(train.labels[sub]).tolist() == [4, 4, 4]
