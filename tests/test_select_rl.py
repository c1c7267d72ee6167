"""Tests of the RL selector (tinyset.select.rl), the recipes, --size, and selector options on the CLI."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from tinyset.cli import main
from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.errors import ArtifactError, ConfigError
from tinyset.models import create_model
from tinyset.rng import make_generator
from tinyset.select import RunControl, ipc_from_size, resolve_options, select, selector_options
from tinyset.select.recipes import RECIPES
from tinyset.select.rl import gumbel_top_k, plackett_luce_log_prob, split_indices
from tinyset.training import TrainSettings, train_ensemble

K = 3
INFO = DatasetInfo("toy-rl", 1, (8, 8), K, ("a", "b", "c"), (0.5,), (0.25,))
#: small, quick reward networks for the toy task
FAST = {"model": "mlp", "epochs": 8, "batch_size": 16, "lr": 0.05, "val_per_class": 10, "pool_size": 20,
        "precision": "fp32"}


def toy(per_class: int = 30, bad: int = 12, seed: int = 0) -> tuple[ImageDataset, torch.Tensor]:
    """3 classes of 8x8 images (class c: a bright band of rows 2c..2c+2, plus noise); in every class
    the ``bad`` last images are *mislabelled*: they carry the band of class c+1 but the label c.
    Returns the dataset and a bool mask of the mislabelled images (the best subset is known: none of
    them). The validation split the rewards use is drawn from the same data, so it is mislabelled in
    the same share: rewards are noisy, as on real data, and only the policy's average is informative."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(per_class)
    wrong = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(K):
        wrong[(labels == c).nonzero().flatten()[per_class - bad:]] = True
    band = torch.where(wrong, (labels + 1) % K, labels)
    x = torch.rand(len(labels), 1, 8, 8, generator=g) * 90
    for c in range(K):
        x[band == c, :, 2 * c:2 * c + 3, :] += 140
    return ImageDataset(INFO, "train", x.round().clamp(0, 255).to(torch.uint8), labels), wrong


def mode_set(scores: torch.Tensor, labels: torch.Tensor, ipc: int) -> torch.Tensor:
    """The final policy's most likely set: the ``ipc`` highest logits of every class."""
    return torch.cat([scores.masked_fill(labels != c, float("-inf")).topk(ipc).indices for c in range(K)])


# ---------------------------------------------------------------- pieces

def test_plackett_luce_probabilities_sum_to_one_and_match_by_hand() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    picks = torch.tensor([list(p) for p in itertools.permutations(range(4), 2)]).view(-1, 1, 2)
    probs = plackett_luce_log_prob(logits, picks).exp()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    w = logits[0].exp()
    by_hand = w[2] / w.sum() * w[0] / (w.sum() - w[2])  # pick 2 first, then 0
    got = plackett_luce_log_prob(logits, torch.tensor([[[2, 0]]])).exp()
    assert math.isclose(float(got), float(by_hand), rel_tol=1e-6)


def test_gumbel_top_k_draws_distinct_picks_following_the_logits() -> None:
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    picks = gumbel_top_k(logits, 2, 2000, make_generator(0))
    assert picks.shape == (2000, 2, 2)
    assert bool((picks[..., 0] != picks[..., 1]).all())
    first = picks[:, 0, 0]
    # P(first pick = 2) = e^3 / (e^3 + 4) = 0.834
    assert abs(float((first == 2).double().mean()) - math.exp(3) / (math.exp(3) + 4)) < 0.03
    assert torch.equal(picks, gumbel_top_k(logits, 2, 2000, make_generator(0)))


def test_split_holds_out_per_class_and_refuses_empty_rest() -> None:
    labels = torch.arange(K).repeat_interleave(5)
    rest, val = split_indices(labels, K, 2, make_generator(0))
    assert torch.bincount(labels[val], minlength=K).tolist() == [2] * K
    assert set(rest.tolist()).isdisjoint(val.tolist()) and rest.numel() + val.numel() == 15
    with pytest.raises(ConfigError, match="val_per_class=5"):
        split_indices(labels, K, 5, make_generator(0))


def test_member_data_trains_each_member_on_its_own_rows() -> None:
    """Two members on two copies of one set == two members sharing that set (bit for bit); a member
    whose rows differ ends with different weights."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 8, 8, generator=g), torch.arange(12) % K
    settings = TrainSettings(epochs=2, lr=0.1, batch_size=5)

    def trained(images, labels, member_data):
        net = create_model("mlp", 1, K, 8, members=2, seed=3)
        train_ensemble(net, images, labels, settings, make_generator(7), member_data=member_data)
        return [p.detach().clone() for p in net.parameters()]

    shared = trained(x, y, False)
    copies = trained(torch.cat([x, x]), torch.cat([y, y]), True)
    assert all(torch.equal(a, b) for a, b in zip(shared, copies))
    other = trained(torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)]), True)
    assert not all(torch.equal(a, b) for a, b in zip(shared, other))
    with pytest.raises(ConfigError, match="member_data"):
        trained(x[:11], y[:11], True)


# ---------------------------------------------------------------- the policy learns

@pytest.mark.slow
def test_reward_rises_and_policy_drops_mislabelled_samples() -> None:
    data, wrong = toy()
    res = select("rl", data, 3, seed=0, iterations=30, candidates=6, policy_lr=0.2, **FAST)
    rec = res.synset.meta["selector_record"]
    rewards = rec["mean_rewards"]
    assert len(rewards) == 30
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.08, rewards  # measured: 0.53 -> 0.67
    pool = res.scores > float("-inf")
    # measured: clean candidates' logits 1.9 above the mislabelled ones'; the policy's mode is clean
    assert float(res.scores[pool & ~wrong].mean() - res.scores[pool & wrong].mean()) > 1.0
    assert float(wrong[mode_set(res.scores, data.labels, 3)].double().mean()) == 0.0
    assert float(wrong[pool].double().mean()) > 0.3  # ... out of pools that are about 40% mislabelled
    assert rec["best_reward"] >= max(rewards)  # the output is the best single set seen, >= any iteration's mean
    assert torch.bincount(data.labels[res.indices], minlength=K).tolist() == [3] * K


def test_policy_improves_quickly_on_the_toy_task() -> None:
    data, wrong = toy()
    res = select("rl", data, 3, seed=3, iterations=12, candidates=6, policy_lr=0.3, **FAST)
    rec = res.synset.meta["selector_record"]
    pool = res.scores > float("-inf")
    assert int(pool.sum()) == K * 20  # the pools: 20 candidates per class
    # logits of clean candidates rise above those of mislabelled ones (measured: by 1.4)
    assert float(res.scores[pool & ~wrong].mean() - res.scores[pool & wrong].mean()) > 0.5
    assert float(wrong[mode_set(res.scores, data.labels, 3)].double().mean()) < float(wrong[pool].double().mean())
    assert rec["iterations"] == 12 and len(rec["mean_rewards"]) == 12
    assert res.config["sources"]["policy_lr"] == "flag: argument policy_lr"
    assert res.config["sources"]["baseline_decay"] == "default"


# ---------------------------------------------------------------- checkpoints

def test_resume_is_bit_exact(tmp_path: Path) -> None:
    data, _ = toy()
    opts = dict(candidates=3, **FAST)
    whole = select("rl", data, 2, seed=4, iterations=4, **opts)
    ckpt = tmp_path / "rl.ckpt.safetensors"
    seen: list[int] = []
    part = select("rl", data, 2, seed=4, iterations=2, run=RunControl(ckpt, on_iteration=lambda i, n, r: seen.append(i)),
                  **opts)
    assert seen == [1, 2] and ckpt.is_file() and len(part.synset.meta["selector_record"]["mean_rewards"]) == 2
    resumed = select("rl", data, 2, seed=4, iterations=4, run=RunControl(ckpt, resume=True), **opts)
    assert resumed.indices == whole.indices
    assert torch.equal(resumed.scores, whole.scores)
    assert resumed.synset.meta["selector_record"]["mean_rewards"] == whole.synset.meta["selector_record"]["mean_rewards"]
    # a finished run resumes to the same result without training again
    again = select("rl", data, 2, seed=4, iterations=4, run=RunControl(ckpt, resume=True), **opts)
    assert again.indices == whole.indices
    # another seed, another option, or a new run over the checkpoint are refused
    with pytest.raises(ConfigError, match="seed"):
        select("rl", data, 2, seed=5, iterations=4, run=RunControl(ckpt, resume=True), **opts)
    with pytest.raises(ConfigError, match="policy_lr"):
        select("rl", data, 2, seed=4, iterations=4, policy_lr=0.5, run=RunControl(ckpt, resume=True), **opts)
    with pytest.raises(ConfigError, match="already holds"):
        select("rl", data, 2, seed=4, iterations=4, run=RunControl(ckpt), **opts)
    with pytest.raises(ArtifactError, match="no checkpoint"):
        select("rl", data, 2, seed=4, run=RunControl(tmp_path / "none.safetensors", resume=True), **opts)


def test_same_seed_same_selection_other_seed_differs() -> None:
    data, _ = toy()
    a = select("rl", data, 2, seed=0, iterations=2, candidates=2, **FAST)
    b = select("rl", data, 2, seed=0, iterations=2, candidates=2, **FAST)
    c = select("rl", data, 2, seed=1, iterations=2, candidates=2, **FAST)
    assert a.indices == b.indices and torch.equal(a.scores, b.scores)
    assert a.indices != c.indices


def test_rl_refuses_bad_options_and_the_test_split() -> None:
    data, _ = toy()
    with pytest.raises(ConfigError, match=r"pool_size=0 .*>= 1"):
        select("rl", data, 2, pool_size=0)
    with pytest.raises(ConfigError, match="pool='best'"):
        select("rl", data, 2, pool="best")
    with pytest.raises(ConfigError, match="ipc=5 candidates per class"):
        select("rl", data, 5, iterations=1, **{**FAST, "pool_size": 4})
    test_split = ImageDataset(INFO, "test", data.images, data.labels)
    with pytest.raises(ConfigError, match="test split"):
        select("rl", test_split, 2, iterations=1, **FAST)


# ---------------------------------------------------------------- recipes and --size

def test_recipes_resolve_to_their_documented_options() -> None:
    assert set(RECIPES.names()) == {"mps1", "mps2", "mps2u", "mutual-info"}
    key, res = resolve_options(None, "mnist", 50, recipe="mps2u")
    v, src = res.values, res.sources
    assert key == "rl" and v.epochs == 6 and v.iterations == 20 and v.patience == 8 and v.train_patience == 4
    assert src["epochs"].startswith("paper: recipe mps2u: ") and "MPS2U" in src["epochs"]
    assert src["policy_lr"] == "default"
    _, cifar = resolve_options(None, "cifar10", 50, recipe="mps2u")
    assert cifar.values.epochs == 20 and cifar.values.iterations == 40
    _, mps1 = resolve_options(None, "mnist", 50, recipe="mps1")
    assert mps1.values.patience == 0 and mps1.values.train_patience == 0 and mps1.values.model == "convnet-w32"
    _, mps2 = resolve_options(None, "mnist", 50, recipe="mps2")
    assert mps2.values.patience == 8 and mps2.values.epochs == selector_options("rl")["epochs"]
    _, mi = resolve_options(None, "fashion-mnist", 50, recipe="mutual-info", sets={"pool_size": "80"})
    assert mi.values.pool == "mi" and mi.values.init == "mi" and mi.values.epochs == 6
    assert mi.values.pool_size == 80 and mi.sources["pool_size"] == "flag: --set pool_size"
    assert "top 1,000" in mi.sources["pool"]
    with pytest.raises(ConfigError, match="runs the rl selector"):
        resolve_options("mi", "mnist", 50, recipe="mps1")
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_options(None, "mnist", 50, recipe="mps1-gan")


def test_readme_table_names_every_recipe() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in RECIPES.names():
        assert f"| `{name}` |" in readme


def test_size_is_a_class_balanced_budget() -> None:
    assert ipc_from_size(1000, 10) == 100 and ipc_from_size(30, 3) == 10
    with pytest.raises(ConfigError, match=r"--size 1001 .* 10 classes of mnist: expected a multiple of 10 "
                                          r"\(e.g. 1000 = 100 per class"):
        ipc_from_size(1001, 10, "mnist")
    with pytest.raises(ConfigError, match="positive integer"):
        ipc_from_size(0, 10)


def test_cli_size_and_flag_validation(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.safetensors"
    assert main(["select", "--method", "random", "--dataset", "digits", "--size", "30", "--out", str(out)]) == 0
    assert "3 per class" in capsys.readouterr().out
    for argv, words in [
        (["--size", "25"], "multiple of 10"),
        (["--size", "30", "--ipc", "3"], "exactly one of --ipc"),
        ([], "exactly one of --ipc"),
        (["--ipc", "2", "--resume"], "iterative selectors only"),
        (["--ipc", "2", "--set", "model=mlp"], "unknown setting"),
    ]:
        assert main(["select", "--method", "random", "--dataset", "digits", "--out", str(tmp_path / "x.safetensors"),
                     *argv]) == 2
        assert words in capsys.readouterr().err
    assert main(["select", "--dataset", "digits", "--ipc", "2"]) == 2
    assert "--method NAME or --recipe NAME" in capsys.readouterr().err


# ---------------------------------------------------------------- options on the command line

def test_cli_sets_mi_options_with_provenance(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "mi.toml"
    cfg.write_text("k = 5\nepochs = 0\ndim = 16\n")
    out, js = tmp_path / "mi.safetensors", tmp_path / "mi.json"
    assert main(["select", "--method", "mi", "--dataset", "digits", "--ipc", "2", "--threads", "1",
                 "--config", str(cfg), "--set", "estimator=knn", "--set", "diversity=0.5",
                 "--out", str(out), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    c = res["config"]
    assert (c["estimator"], c["diversity"], c["k"], c["epochs"], c["dim"]) == ("knn", 0.5, 5, 0, 16)
    assert c["sources"]["estimator"] == "flag: --set estimator"
    assert c["sources"]["k"] == f"file: {cfg}" and c["sources"]["folds"] == "default"
    from tinyset.synset import SyntheticSet

    assert SyntheticSet.load(out).meta["config_sources"]["diversity"] == "flag: --set diversity"
    # the same selection from Python
    from tinyset.data import load_dataset

    again = select("mi", load_dataset("digits", "train"), 2, seed=0, estimator="knn", diversity=0.5, k=5, epochs=0,
                   dim=16)
    assert again.indices == res["indices"]
    # a bad value names the option, the value, where it came from and what is allowed
    assert main(["select", "--method", "mi", "--dataset", "digits", "--ipc", "2", "--set", "estimator=mine",
                 "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "estimator='mine' (--set estimator)" in err and "'probe', 'knn'" in err


def test_cli_help_options_lists_every_option(capsys) -> None:
    assert main(["select", "--method", "mi", "--help-options"]) == 0
    text = capsys.readouterr().out
    for name in selector_options("mi"):
        assert f"  {name} " in text
    assert main(["select", "--recipe", "mutual-info", "--dataset", "mnist", "--help-options"]) == 0
    text = capsys.readouterr().out
    assert "pool_size" in text and "'pool': 'mi'" in text and "top 1,000" in text
    assert main(["select", "--list-recipes"]) == 0
    text = capsys.readouterr().out
    assert "mps2u" in text and "--set refine=project" in text  # mps1-gan: the two commands that make it


def test_cli_rl_checkpoints_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rl.safetensors"
    base = ["select", "--method", "rl", "--dataset", "digits", "--ipc", "1", "--threads", "1", "--out", str(out),
            "--set", "model=mlp", "--set", "epochs=2", "--set", "candidates=2", "--set", "pool_size=5",
            "--set", "val_per_class=5", "--set", "precision=fp32"]
    assert main([*base, "--set", "iterations=1"]) == 0
    assert "best validation reward" in capsys.readouterr().out
    ckpt = tmp_path / "rl.checkpoint.safetensors"
    assert ckpt.is_file()
    assert main([*base, "--set", "iterations=2"]) == 2  # the checkpoint is not silently replaced
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--set", "iterations=2", "--resume"]) == 0
    from tinyset.synset import SyntheticSet

    assert SyntheticSet.load(out).meta["selector_record"]["iterations"] == 2
