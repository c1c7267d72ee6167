"""Tests of the coreset selectors (tinyset.select): random, herding, k-center, forgetting."""
from __future__ import annotations

import math

import pytest
import torch

import json

import tinyset.select.greedy as greedy
from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.errors import ConfigError
from tinyset.results import SelectionResult
from tinyset.select import SELECTORS, Selection, select, top_per_class
from tinyset.select._embed import embed_dataset
from tinyset.select.forgetting import count_forgetting, most_forgotten, stratified_subset
from tinyset.select.herding import HerdingCriterion, herding_order
from tinyset.select.kcenter import KCenterCriterion, kcenter_order
from tinyset.synset import SyntheticSet
from tinyset.rng import derive_seed, make_generator

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


def test_herding_order_towards_a_given_mean() -> None:
    # target 4.5 instead of the rows' mean 2.25: first 6 (|6 - 4.5| = 1.5 beats |2 - 4.5|); then {6, e}
    # closest to 4.5 -> e=2 (mean 4.0); then {6, 2, e} -> e=1 (mean 3.0) beats e=0 (mean 2.67)
    emb = torch.tensor([[0.0], [1.0], [2.0], [6.0]])
    assert herding_order(emb, 4, mu=torch.tensor([4.5])).tolist() == [3, 2, 1, 0]
    assert herding_order(emb, 4, mu=emb.mean(dim=0)).tolist() == herding_order(emb, 4).tolist()
    with pytest.raises(ValueError, match="target mean has shape"):
        herding_order(emb, 2, mu=torch.zeros(2))


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
    res = select(method, train, ipc, seed=0, **FAST.get(method, {}))
    assert isinstance(res, SelectionResult)
    syn = res.synset
    assert isinstance(syn, SyntheticSet)
    assert res.indices == syn.meta["source_indices"]
    assert (res.method, res.dataset, res.ipc, res.seed) == (method, "tiny-sel", ipc, 0)
    assert res.config == syn.meta["config"] and res.seconds >= 0
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
    a = select(method, train, 3, seed=5, **opts)
    b = select(method, train, 3, seed=5, **opts)
    assert a.synset.meta["source_indices"] == b.synset.meta["source_indices"]
    assert torch.equal(a.scores, b.scores)


def test_random_seed_changes_selection(train: ImageDataset) -> None:
    a = select("random", train, 3, seed=0).indices
    b = select("random", train, 3, seed=1).indices
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
    assert select("herding", train, 1, seed=3).synset.meta["source_indices"] == expected


def test_embed_dataset_batches_and_seed(train: ImageDataset) -> None:
    a = embed_dataset(train, generator=make_generator(0), batch_size=7)
    b = embed_dataset(train, generator=make_generator(0), batch_size=1000)
    c = embed_dataset(train, generator=make_generator(1))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)


def test_kcenter_picks_the_outlier(train: ImageDataset) -> None:
    res = select("k-center", train, 2, seed=0)
    outlier = 3 * (PER_CLASS - 1)
    assert outlier in res.synset.meta["source_indices"]


def test_forgetting_max_train(train: ImageDataset) -> None:
    res = select("forgetting", train, 2, seed=0, max_train=30, epochs=2, precision="fp32")
    syn = res.synset
    assert syn.ipc == 2
    assert syn.meta["config"]["max_train"] == 30
    # samples outside the training subsample were never seen: score -inf, never picked
    seen = torch.isfinite(res.scores) | (res.scores == math.inf)
    assert int(seen.sum()) == 30
    # the subsample is the selector's first child generator's draw
    subset = stratified_subset(train, 30, 2, make_generator(derive_seed(make_generator(0))))
    assert torch.equal(seen.nonzero().flatten(), subset)
    assert bool(seen[torch.tensor(res.indices)].all())
    sub = stratified_subset(train, 30, 2, make_generator(0))
    assert torch.bincount(train.labels[sub]).tolist() == [10, 10, 10]
    # a class never drops below ipc
    sub = stratified_subset(train, 3, 4, make_generator(0))
    assert torch.bincount(train.labels[sub]).tolist() == [4, 4, 4]


# ---------------------------------------------------------------- scores, top_per_class, the shared greedy loop

def test_top_per_class_by_hand() -> None:
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, -math.inf, 3.0, 1.0, 0.0, math.inf], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    # class 0: 2.0 at 1 and 3 (tie -> lower index first), then 1.0; class 1: 3.0, then 1.0 (never -inf)
    assert top_per_class(scores, labels, 2).tolist() == [1, 3, 5, 6, 8, 7]
    assert top_per_class(scores, labels, 1).tolist() == [1, 5, 8]
    assert top_per_class(scores, labels, 0).tolist() == []
    with pytest.raises(ValueError, match="class 1 has 2 samples with a score above -inf, cannot pick 3"):
        top_per_class(scores, labels, 3)
    with pytest.raises(ValueError, match="NaN"):
        top_per_class(torch.tensor([0.0, math.nan]), torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="scores"):
        top_per_class(scores[:-1], labels, 1)
    # an empty class among num_classes
    with pytest.raises(ValueError, match="class 3 has 0"):
        top_per_class(scores, labels, 1, num_classes=4)


@pytest.mark.parametrize("method", METHODS)
def test_selection_scores_rank_the_chosen_indices(train: ImageDataset, method: str) -> None:
    res = select(method, train, 4, seed=1, **FAST.get(method, {}))
    assert res.scores.dtype == torch.float64 and res.scores.shape == (len(train),)
    assert not bool(torch.isnan(res.scores).any())
    # the chosen indices are exactly the top 4 per class of the scores, in score order
    assert top_per_class(res.scores, train.labels, 4).tolist() == res.indices
    chosen = torch.zeros(len(train), dtype=torch.bool)
    chosen[torch.tensor(res.indices)] = True
    if method in ("herding", "k-center"):
        # picks score -(pick step), every other sample was never reached
        assert bool((res.scores[~chosen] == -math.inf).all())
        for c in range(3):
            picked = torch.tensor(res.indices[4 * c:4 * c + 4])
            assert res.scores[picked].tolist() == [0.0, -1.0, -2.0, -3.0]
    elif method == "random":
        assert bool(((res.scores >= 0) & (res.scores < 1)).all())
    else:  # forgetting counts: whole numbers >= 0 or inf (never learned)
        s = res.scores
        assert bool(((s >= 0) & ((s == math.inf) | (s == s.floor()))).all())
    # scores are a runtime field: not in the JSON form
    d = res.to_dict()
    assert "scores" not in d and "synset" not in d and d["indices"] == res.indices
    json.dumps(d)


def test_herding_and_kcenter_share_one_greedy_loop(monkeypatch, train: ImageDataset) -> None:
    calls = []
    real = greedy.greedy_order

    def spy(emb, k, criterion, *args, **kwargs):
        calls.append(criterion)
        return real(emb, k, criterion, *args, **kwargs)

    monkeypatch.setattr(greedy, "greedy_order", spy)
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(40, 5, generator=g)
    # pinned: the orders of the two separate loops tinyset had before they were merged
    assert herding_order(emb, 12).tolist() == [28, 0, 34, 9, 29, 16, 20, 5, 13, 39, 10, 22]
    assert kcenter_order(emb, 12).tolist() == [28, 23, 6, 2, 26, 3, 36, 14, 8, 17, 5, 11]
    assert calls == [HerdingCriterion, KCenterCriterion]
    calls.clear()
    assert select("herding", train, 4, seed=0).indices == [45, 48, 36, 69, 31, 13, 16, 34, 44, 38, 77, 17]
    assert select("k-center", train, 4, seed=0).indices == [45, 87, 84, 63, 31, 7, 88, 64, 44, 59, 68, 29]
    assert calls == [HerdingCriterion] * 3 + [KCenterCriterion] * 3  # one greedy run per class


def test_greedy_order_with_a_custom_criterion() -> None:
    class Largest:
        """Gain = the first coordinate: picks rows by decreasing value, ties to the lowest position."""

        def __init__(self, e):
            self.e = e
            self.added = []

        def gains(self, t):
            return self.e[:, 0]

        def add(self, i):
            self.added.append(i)

    emb = torch.tensor([[1.0], [3.0], [2.0], [3.0]])
    picks = []
    assert greedy.greedy_order(emb, 4, Largest, on_pick=picks.append).tolist() == [1, 3, 2, 0]
    assert picks == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot pick 5 of 4"):
        greedy.greedy_order(emb, 5, Largest)
    with pytest.raises(ValueError, match=r"expects embeddings \[n, D\]"):
        greedy.greedy_order(torch.ones(4), 1, Largest)


def test_selection_normalises_dtypes() -> None:
    sel = Selection([2, 0], torch.tensor([1.0, 0.0, 2.0], dtype=torch.float32))
    assert sel.indices.dtype == torch.long and sel.scores.dtype == torch.float64


def test_unknown_selector_option_is_config_error(train: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="selector herding has no option epochs; its options: model"):
        select("herding", train, 1, epochs=3)
    with pytest.raises(ConfigError, match="selector random has no option model; its options: none"):
        select("random", train, 1, model="mlp")
    with pytest.raises(ConfigError, match="unknown selector"):
        select("nope", train, 1)
