"""Tests of the mutual-information selector (tinyset.select.mi): formulas, planted cases, options, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tinyset.data
import tinyset.select.mi as mi
from conftest import tiny_dataset
from tinyset.cli import main
from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.rng import make_generator
from tinyset.select import SELECTORS, select, selector_options
from tinyset.synset import SyntheticSet

K, PER_CLASS = 3, 30
#: keeps one end-to-end run on the tiny data well under a second on a CPU
FAST = {"epochs": 1, "batch_size": 32, "precision": "fp32", "val_fraction": 0.2}


def planted(per_class: int = PER_CLASS, noise_images: int = 2, copies: int = 2):
    """``tiny_dataset`` plus planted samples; returns ``(dataset, prototype_idx, noise_idx)``.

    * prototypes: the noise-free centre ``0.7 * base_c + 0.15`` of every class (label ``c``): the
      most informative images about their label there are;
    * label noise: ``noise_images`` uniform-noise images, each present ``copies`` times *with every
      label*: the same pixels are equally often every class, so they carry no information about the
      label (their true pointwise MI is ``log(1/K) - log p(y) ~ 0``).
    """
    d = tiny_dataset(num_classes=K, per_class=per_class)
    base = torch.rand(K, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # tiny_dataset's class bases
    proto = ((base * 0.7 + 0.15) * 255).round().to(torch.uint8)
    noise = (torch.rand(noise_images, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    noise = noise.repeat_interleave(copies * K, 0)
    noise_labels = torch.arange(K).repeat(copies * noise_images)
    images = torch.cat([d.images, proto, noise])
    labels = torch.cat([d.labels, torch.arange(K), noise_labels])
    n0 = len(d)
    return (ImageDataset(d.info, "train", images, labels, "planted"), torch.arange(n0, n0 + K),
            torch.arange(n0 + K, len(labels)))


@pytest.fixture(scope="module")
def plant():
    return planted()


def run(data: ImageDataset, ipc: int = 5, seed: int = 0, **options):
    return select("mi", data, ipc, seed=seed, **{**FAST, **options})


# ---------------------------------------------------------------- formulas

def test_log_prob_of_label_matches_log_softmax_and_keeps_confident_rows_apart() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    expected = torch.log_softmax(logits, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    assert torch.allclose(mi.log_prob_of_label(logits, y), expected, atol=1e-12)
    assert mi.log_prob_of_label(logits, y)[1].item() == pytest.approx(-math.log(3))
    # margins 50 and 60: log_softmax rounds both to 0, the stable form keeps -exp(-margin)
    big = torch.tensor([[50.0, 0.0], [60.0, 0.0]], dtype=torch.float64)
    lp = mi.log_prob_of_label(big, torch.tensor([0, 0]))
    assert lp[0].item() == pytest.approx(-math.exp(-50), rel=1e-9)
    assert lp[1].item() == pytest.approx(-math.exp(-60), rel=1e-9)
    assert lp[1] > lp[0]


def test_label_log_odds_ranks_beyond_float64_saturation() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0], [900.0, 0.0, 0.0], [1000.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    odds = mi.label_log_odds(logits, y)
    p0 = math.e / (math.e + 2)
    assert odds[0].item() == pytest.approx(math.log(p0 / (1 - p0)))
    assert odds[1].item() == pytest.approx(900 - math.log(2)) and odds[2] > odds[1]
    lp = mi.log_prob_of_label(logits, y)
    assert lp[1].item() == 0.0 and lp[2].item() == 0.0  # log p rounds to 0 for both; the odds do not


def test_fit_temperature_recovers_the_temperature_of_the_labels() -> None:
    g = make_generator(0)
    logits = torch.randn(20000, 4, generator=g) * 3
    for t0 in (0.5, 2.0):
        y = torch.multinomial(torch.softmax(logits / t0, dim=1), 1, generator=g).squeeze(1)
        assert mi.fit_temperature(logits, y) == pytest.approx(t0, rel=0.08)
    # the fitted T is the NLL minimiser: nudging it either way does not help
    y = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=g).squeeze(1)
    t = mi.fit_temperature(logits, y)
    nll = lambda temp: float(F.cross_entropy(logits.double() / temp, y))  # noqa: E731
    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))


def test_fit_probe_is_logistic_regression() -> None:
    # two separable 1-d classes: the probe puts x = -2 in class 0 and x = +2 in class 1, confidently
    z = torch.tensor([[-2.0], [-1.5], [-1.0], [1.0], [1.5], [2.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    w, b = mi.fit_probe(z, y, 2, l2=1e-2, iters=100)
    p = torch.softmax(z @ w + b, dim=1)
    assert (p.argmax(1) == y).all()
    assert p[0, 0] > 0.9 and p[5, 1] > 0.9
    # the gradient of the objective vanishes at the returned point
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = F.cross_entropy(z @ w + b, y) + 0.5 * 1e-2 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_knn_log_likelihood_by_hand() -> None:
    # unit vectors at these angles: the nearest neighbours are the closest angles
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6, 0.15])
    u = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # the last point (angle 0.15) sits among the 0s
    lp = mi.knn_log_likelihood(u, labels, num_classes=2, k=2, alpha=1.0, block=4)
    # 2 nearest: 0 -> {1, 5}; 1 -> {5, 0 or 2}; 2 -> {5, 1}; 3 -> {4, 2}; 4 -> {3, 2}; 5 -> {1, 2}
    # same-label counts: 1, 1, 1, 1, 1, 0
    def expect(n_same):
        return math.log((n_same + 1.0) / (2 + 1.0 * 2))
    assert lp.tolist() == pytest.approx([expect(1), expect(1), expect(1), expect(1), expect(1), expect(0)])
    # a sample is never its own neighbour: with k = N - 1 every other sample votes
    lp_all = mi.knn_log_likelihood(u, labels, num_classes=2, k=5, alpha=0.5)
    assert lp_all[0].item() == pytest.approx(math.log((2 + 0.5) / (5 + 1.0)))
    with pytest.raises(ConfigError, match="k"):
        mi.knn_log_likelihood(u, labels, num_classes=2, k=6, alpha=1.0)
    # a reference set: only rows 0, 3, 4 can be neighbours (a row in it still never counts itself)
    ref = torch.tensor([0, 3, 4])
    lp_ref = mi.knn_log_likelihood(u, labels, num_classes=2, k=2, alpha=1.0, reference=ref)
    # 0 -> {3, 4}: 0 same; 1, 2 (label 0) and 5 (label 1) -> {0, 3}: 1 same; 3 -> {4, 0}, 4 -> {3, 0}: 1 same
    assert lp_ref.tolist() == pytest.approx([expect(0), expect(1), expect(1), expect(1), expect(1), expect(1)])


def test_holdout_and_folds_are_stratified_seeded_partitions() -> None:
    labels = torch.arange(3).repeat_interleave(torch.tensor([10, 20, 31]))
    fit, val = mi.holdout_indices(labels, 3, 0.1, make_generator(0))
    assert torch.bincount(labels[val], minlength=3).tolist() == [1, 2, 3]
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(61))
    fit2, val2 = mi.holdout_indices(labels, 3, 0.1, make_generator(0))
    assert torch.equal(val, val2) and torch.equal(fit, fit2)
    assert not torch.equal(val, mi.holdout_indices(labels, 3, 0.1, make_generator(1))[1])
    fold = mi.stratified_folds(labels, 3, 2, make_generator(0))
    for c, n in enumerate([10, 20, 31]):
        counts = torch.bincount(fold[labels == c], minlength=2).tolist()
        assert sorted(counts) == [n // 2, n - n // 2]
    with pytest.raises(ConfigError, match="val_fraction"):
        mi.holdout_indices(torch.tensor([0, 1, 1]), 2, 0.5, make_generator(0))


def test_diversity_criterion_by_hand() -> None:
    # rows 0 and 1 are the same direction; row 2 is orthogonal with a slightly lower score
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([1.0, 0.99, 0.9], dtype=torch.float64)
    from functools import partial

    from tinyset.select.greedy import greedy_order
    plain = greedy_order(e, 2, partial(mi.DiversityCriterion, scores=scores, weight=0.0))
    assert plain.tolist() == [0, 1]
    diverse = greedy_order(e, 3, partial(mi.DiversityCriterion, scores=scores, weight=0.5))
    assert diverse.tolist() == [0, 2, 1]  # 1 would pay 0.5 * cos 1 = 0.5; 2 pays 0


# ---------------------------------------------------------------- planted cases, end to end

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_rank_planted_prototypes_above_label_noise(plant, seed: int) -> None:
    data, proto, noise = plant
    log_k = math.log(K)  # the largest possible pointwise MI with balanced classes (~1.0986)
    for estimator in ("probe", "knn"):
        res = run(data, seed=seed, estimator=estimator, k=5)
        s = res.scores
        assert s.shape == (len(data),) and bool(torch.isfinite(s).all())
        assert s.max().item() <= log_k + 1e-9  # 35 images per class: -log p(y) = log 3
        # every prototype beats the typical noise sample by a wide margin, and on average by > 0.9 nat
        assert s[proto].min() > s[noise].median() + 0.5, (estimator, s[proto], s[noise])
        assert s[proto].mean() - s[noise].mean() > 0.9, (estimator, s[proto], s[noise])
        # the prototypes are near the top (> log K - 0.5); the noise averages at most ~0 nats
        assert s[proto].min() > log_k - 0.5 and s[noise].mean() < 0.1
        # top-k never picks a noise sample, and is class-balanced
        assert not set(res.indices) & set(noise.tolist())
        assert torch.bincount(data.labels[res.indices], minlength=K).tolist() == [5] * K
        if estimator == "knn":  # non-parametric: every prototype strictly above every noise sample
            assert s[proto].min() > s[noise].max()


def test_knn_and_probe_agree_in_direction(plant) -> None:
    data, proto, noise = plant
    probe = run(data, estimator="probe").scores
    knn = run(data, estimator="knn", k=5).scores
    planted_idx = torch.cat([proto, noise])
    # both order "prototype vs noise" the same way for every (prototype, noise) pair on average, and
    # their scores are positively rank-correlated over the planted samples
    for s in (probe, knn):
        assert s[proto].mean() > s[noise].mean()
    rp = probe[planted_idx].argsort().argsort().double()
    rk = knn[planted_idx].argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rp, rk]))[0, 1] > 0.5


def test_same_seed_same_selection_other_seed_other_scores(plant) -> None:
    data, _, _ = plant
    a, b = run(data, seed=3), run(data, seed=3)
    assert a.indices == b.indices and torch.equal(a.scores, b.scores)
    c = run(data, seed=4)
    assert not torch.equal(a.scores, c.scores)  # another network init, split and folds
    # the chosen indices are class by class and balanced for every ipc
    for ipc in (1, 7):
        r = run(data, ipc=ipc, seed=3)
        assert torch.bincount(data.labels[r.indices], minlength=K).tolist() == [ipc] * K
        assert r.indices == sorted(r.indices, key=lambda i: int(data.labels[i]))


def test_diversity_avoids_exact_duplicates() -> None:
    # every image twice. With one probe (folds=1) both copies of an image get the same logits, hence
    # the same score and log-odds: plain top-k takes them in pairs
    d = tiny_dataset(num_classes=K, per_class=PER_CLASS)
    data = ImageDataset(d.info, "train", torch.cat([d.images, d.images]), torch.cat([d.labels, d.labels]))

    def duplicated(indices) -> int:
        imgs = data.images[indices].flatten(1)
        return len(indices) - torch.unique(imgs, dim=0).shape[0]

    plain = run(data, ipc=4, seed=0, folds=1)
    assert duplicated(plain.indices) == 2 * K  # without the term: at least one pair of copies per class
    diverse = run(data, ipc=4, seed=0, folds=1, diversity=1.0)
    assert duplicated(diverse.indices) == 0
    assert torch.bincount(data.labels[diverse.indices], minlength=K).tolist() == [4] * K
    # the scores stay the pointwise MI (the same as without diversity)
    assert torch.equal(plain.scores, diverse.scores)
    # each class's first pick is its best-scored sample
    for c in range(K):
        first = [i for i in diverse.indices if int(data.labels[i]) == c][0]
        assert diverse.scores[first] == diverse.scores[data.labels == c].max()


def test_band_quotas_share_ipc_highest_bands_first() -> None:
    assert mi.band_quotas(10, 1) == [10]
    assert mi.band_quotas(10, 5) == [2, 2, 2, 2, 2]
    assert mi.band_quotas(10, 3) == [4, 3, 3]
    assert mi.band_quotas(3, 3) == [1, 1, 1]
    for ipc in range(1, 12):
        for s in range(1, ipc + 1):
            assert sum(mi.band_quotas(ipc, s)) == ipc


def test_strata_take_picks_from_every_score_band() -> None:
    # one class, 100 samples whose scores are their positions: 5 bands of 20, 2 picks each
    n, labels = 100, torch.zeros(100, dtype=torch.long)
    scores = torch.arange(n, dtype=torch.float64)
    tie = torch.randperm(n, generator=make_generator(0))
    emb = torch.randn(n, 4, generator=make_generator(1), dtype=torch.float64)
    plain = mi.choose(scores, scores, labels, 1, 10, emb, 0.0, tie)
    assert sorted(plain.tolist()) == list(range(90, 100))  # every pick from the top band
    banded = mi.choose(scores, scores, labels, 1, 10, emb, 0.0, tie, strata=5)
    assert banded.tolist() == [99, 98, 79, 78, 59, 58, 39, 38, 19, 18]  # the best two of each band, top band first
    # with the diversity term every band still gets its quota, and every pick lies in its band
    diverse = mi.choose(scores, scores, labels, 1, 10, emb, 5.0, tie, strata=5)
    assert [int(i) // 20 for i in diverse] == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    # uneven sizes: 10 samples, ipc 4, 3 bands of 4, 3 and 3 samples get 2, 1 and 1 picks
    small = mi.choose(scores[:10], scores[:10], labels[:10], 1, 4, emb[:10], 0.0, tie[tie < 10], strata=3)
    assert small.tolist() == [9, 8, 5, 2]
    with pytest.raises(ConfigError, match=r"strata=11: expected 1 to ipc \(10\)"):
        mi.choose(scores, scores, labels, 1, 10, emb, 0.0, tie, strata=11)


def test_strata_in_the_selector_keep_low_scored_samples(plant) -> None:
    data, _, _ = plant
    top = run(data, ipc=6, seed=0)
    banded = run(data, ipc=6, seed=0, strata=3)
    assert torch.equal(top.scores, banded.scores)  # the same scores, another choice
    assert torch.bincount(data.labels[banded.indices], minlength=K).tolist() == [6] * K
    assert banded.config["strata"] == 3
    for c in range(K):
        in_class = (data.labels == c).nonzero().flatten()
        median = in_class[torch.argsort(top.scores[in_class], descending=True)][len(in_class) // 2]
        chosen_top = [i for i in top.indices if int(data.labels[i]) == c]
        chosen_banded = [i for i in banded.indices if int(data.labels[i]) == c]
        # plain top-k stays above the class median; the bottom band reaches below it
        assert min(top.scores[chosen_top]) > top.scores[median]
        assert min(banded.scores[chosen_banded]) < top.scores[median]
    with pytest.raises(ConfigError, match="strata=7: expected 1 to ipc"):
        run(data, ipc=6, strata=7)


def test_max_train_and_folds_options_run(plant) -> None:
    data, _, noise = plant
    res = run(data, max_train=30, folds=3, epochs=2, probe_l2=1e-2)
    knn = run(data, estimator="knn", k=3, knn_reference=40)
    assert torch.bincount(data.labels[knn.indices], minlength=K).tolist() == [5] * K
    assert knn.scores[noise].mean() < knn.scores[:len(data) - noise.numel()].mean()
    assert torch.bincount(data.labels[res.indices], minlength=K).tolist() == [5] * K
    one = run(data, folds=1, epochs=0)  # a random network, one in-sample probe: still balanced and finite
    assert bool(torch.isfinite(one.scores).all())
    assert res.config["folds"] == 3 and res.config["max_train"] == 30


# ---------------------------------------------------------------- options and data

def test_options_and_defaults() -> None:
    opts = selector_options("mi")
    assert opts["estimator"] == "probe" and opts["diversity"] == 0.0 and opts["epochs"] == 1
    assert opts["model"] == "convnet-w32" and opts["k"] == 10 and opts["val_fraction"] == 0.1
    assert "mi" in SELECTORS.names()


@pytest.mark.parametrize("option, value, words", [
    ("diversity", -0.1, ["diversity", ">= 0", "-0.1"]),
    ("strata", 0, ["strata", ">= 1", "0"]),
    ("strata", 1.5, ["strata", "integer", "1.5"]),
    ("k", 0, ["k", ">= 1", "0"]),
    ("k", 2.5, ["k", "integer", "2.5"]),
    ("estimator", "mine", ["estimator", "'probe'", "'knn'", "'mine'"]),
    ("epochs", -1, ["epochs", ">= 0", "-1"]),
    ("alpha", 0.0, ["alpha", "> 0"]),
    ("val_fraction", 1.0, ["val_fraction", "(0, 1)"]),
    ("folds", 0, ["folds", ">= 1"]),
    ("max_train", 0, ["max_train", ">= 1"]),
    ("dim", -3, ["dim", ">= 0"]),
    ("knn_reference", 1, ["knn_reference", ">= 2"]),
    ("model", "nope", ["unknown model", "nope"]),
    ("precision", "fp16", ["precision", "fp16"]),
])
def test_bad_options_raise_config_errors_naming_them(plant, option, value, words) -> None:
    data, _, _ = plant
    with pytest.raises(ConfigError) as err:
        run(data, **{option: value})
    for w in words:
        assert w in str(err.value)


def test_knn_needs_fewer_neighbours_than_samples(plant) -> None:
    data, _, _ = plant
    with pytest.raises(ConfigError, match=r"mi k must be an integer in \[1, "):
        run(data, estimator="knn", k=len(data))


def test_refuses_the_test_split() -> None:
    test_split = tiny_dataset(num_classes=K, per_class=10, split="test")
    with pytest.raises(ConfigError, match="test split"):
        run(test_split, ipc=2)


def test_cli_select_mi_on_digits_reads_only_the_train_split(tmp_path, monkeypatch, capsys) -> None:
    real_load = tinyset.data.load_dataset
    splits: list[str] = []

    def spy(name, split, *args, **kwargs):
        splits.append(split)
        return real_load(name, split, *args, **kwargs)

    monkeypatch.setattr(tinyset.data, "load_dataset", spy)
    f, js = tmp_path / "mi.safetensors", tmp_path / "mi.json"
    assert main(["select", "--method", "mi", "--dataset", "digits", "--ipc", "3", "--threads", "1", "--out", str(f),
                 "--json", str(js)]) == 0
    assert splits == ["train"]
    assert "with mi" in capsys.readouterr().out
    s = SyntheticSet.load(f)
    assert len(s) == 30 and s.ipc == 3
    assert torch.bincount(s.labels, minlength=10).tolist() == [3] * 10
    res = json.loads(js.read_text())
    assert res["method"] == "mi" and len(res["indices"]) == 30 and len(set(res["indices"])) == 30
    assert res["config"]["estimator"] == "probe" and res["config"]["ipc"] == 3
    # the chosen digits are confidently recognised: every score is at least half of the maximum log 10
    train = real_load("digits", "train")
    again = select("mi", train, 3, seed=0)
    assert again.indices == res["indices"]
    assert again.scores[again.indices].min().item() > 0.5 * math.log(10)


def test_validate_sets_scores_on_held_out_training_images_only(tmp_path, capsys):
    """benchmarks/validate_sets.py (how docs/measurements.md chose mi's diversity): one validation split for all
    sets, drawn from the training split without any set's images; sets of two datasets are refused."""
    import importlib.util

    from tinyset.data import load_dataset

    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "validate_sets", Path(__file__).resolve().parents[1] / "benchmarks" / "validate_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    digits = load_dataset("digits")
    files = []
    for seed in (0, 1):
        f = tmp_path / f"r{seed}.safetensors"
        select("random", digits, 2, seed=seed).synset.save(f)
        files.append(str(f))
    out = tmp_path / "v.json"
    assert mod.main([*files, "--epochs", "2", "--models", "2", "--val", "60", "--threads", "1", "--precision", "fp32",
                     "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["set"] for r in rec["rows"]] == files and rec["val_images"] == 60
    assert all(0 <= r["val_mean"] <= 1 and len(r["accuracies"]) == 2 for r in rec["rows"])
    used = set()
    for f in files:
        used.update(SyntheticSet.load(f).meta["source_indices"])
    idx = mod.validation_indices(len(digits), used, 60, 12345)
    assert len(set(idx)) == 60 and used and not used & set(idx)  # no validation image is one of the sets' images
    assert mod.validation_indices(len(digits), used, 60, 12345) == idx  # seeded
    other = tmp_path / "other.safetensors"
    tiny = tiny_dataset()
    select("random", tiny, 1, seed=0).synset.save(other)
    assert mod.main([files[0], str(other), "--epochs", "1", "--threads", "1"]) == 2
    assert "different datasets" in capsys.readouterr().err
