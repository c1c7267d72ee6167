"""KRR distillation (FRePo-style, ``--method krr``) and the KRR evaluation protocols, on digits:
the kernel ridge prediction against a float64 closed form, the loss falls, the learned labels move,
are saved and are what the evaluators use, resume is bit-exact, protocols are named ``krr-...``."""
from __future__ import annotations

import dataclasses
import json
import signal

import numpy as np
import pytest
import torch

from tinyset.data import load_dataset
from tinyset.errors import ConfigError, Interrupted
from tinyset.evaluate.krr import PRESETS, TARGETS_EXTRA, KRRProtocol, evaluate_krr, krr_predict, set_targets
from tinyset.evaluate.protocol import EVALUATORS
from tinyset.methods import METHODS
from tinyset.methods.krr import KernelRidge, centred_onehot, label_margin_loss
from tinyset.methods.loop import distill, load_checkpoint, resolve_config
from tinyset.synset import SyntheticSet

#: small and fast: a pool of 3 ConvNets of width 32 reset every 4 steps, 16 real images per class
SETS = {"pool_size": "3", "max_online_steps": "4", "batch_real": "16", "model": "convnet-nn", "width": "32"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


def _run(digits, path, iterations, ipc=2, sets=None, **kw):
    return distill("krr", digits, ipc, path, preset="cpu", overrides={"iterations": iterations},
                   sets={**SETS, **(sets or {})}, seed=5, precision="fp32", **kw)


@pytest.fixture(scope="module")
def run30(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("krr") / "run"
    return out, _run(digits, out, 30, sets={"lr_label": "0.01"})


# ----------------------------------------------------------------------------- the kernel ridge prediction
def _numpy_krr(fs: np.ndarray, y: np.ndarray, fq: np.ndarray, ridge: float) -> np.ndarray:
    kss = fs @ fs.T
    lam = ridge * np.trace(kss) / kss.shape[0]
    return fq @ fs.T @ np.linalg.inv(kss + lam * np.eye(kss.shape[0])) @ y


@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 3.0])
def test_krr_prediction_matches_float64_closed_form(ridge):
    g = torch.Generator().manual_seed(0)
    fs, fq = torch.randn(7, 12, generator=g), torch.randn(5, 12, generator=g)
    y = torch.randn(7, 3, generator=g)
    got = krr_predict(fs, y, fq, ridge)
    want = _numpy_krr(fs.double().numpy(), y.double().numpy(), fq.double().numpy(), ridge)
    assert got.dtype == torch.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_krr_prediction_interpolates_when_ridge_is_tiny_and_survives_rank_deficiency():
    g = torch.Generator().manual_seed(1)
    fs, y = torch.randn(4, 10, generator=g), torch.randn(4, 2, generator=g)
    # predicting the synthetic points themselves: K (K + eps)^-1 Y ~ Y
    assert torch.allclose(krr_predict(fs, y, fs, 1e-9), y, atol=1e-4)
    # duplicated rows: K_ss is singular without the ridge; the ridge keeps it solvable and finite
    dup = torch.cat([fs, fs])
    out = krr_predict(dup, torch.cat([y, y]), fs, 1e-6)
    assert torch.isfinite(out).all() and torch.allclose(out, y, atol=1e-3)


def test_krr_prediction_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fq = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: krr_predict(a, b, fq, 1e-2), (fs, y), eps=1e-6, atol=1e-4)


def test_centred_onehot_and_label_margin():
    t = centred_onehot(torch.tensor([0, 2]), 4)
    assert torch.allclose(t, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.25, -0.25, 0.75, -0.25]]))
    assert torch.allclose(t.sum(1), torch.zeros(2))
    assert float(label_margin_loss(t)) == pytest.approx(-0.25)  # lead 1 >= 1/K: capped at -1/K
    flat = torch.tensor([[0.3, 0.2, 0.0, 0.0]])
    assert float(label_margin_loss(flat)) == pytest.approx(-0.1)  # lead 0.1 below 1/K counts as is


# ----------------------------------------------------------------------------- the method
def test_registered_with_typed_settings_and_sources():
    assert METHODS.get("krr") is KernelRidge
    res = resolve_config("krr", "digits", 10, "cpu")
    v, src = res.values, res.sources
    assert (v.pool_size, v.max_online_steps, v.ridge, v.lr_img, v.lr_label) == (10, 100, 1e-6, 1e-3, 1e-3)
    assert src["pool_size"].startswith("paper: yongchaoz/FRePo")
    assert v.iterations == 300 and src["iterations"].startswith("cpu:")
    mnist = resolve_config("krr", "mnist", 10, "cpu").values
    assert (mnist.batch_real, mnist.iterations, mnist.width, mnist.model) == (32, 12000, 32, "convnet-frepo")
    assert mnist.init == "select:mi,diversity=0.1"  # MNIST ipc 10 starts from the mi selection
    assert resolve_config("krr", "fashion-mnist", 10, "cpu").values.init == "real"
    assert resolve_config("krr", "mnist", 5, "cpu").values.init == "real"
    fashion50 = resolve_config("krr", "fashion-mnist", 50, "cpu").values  # larger sets keep the cheaper network
    assert (fashion50.batch_real, fashion50.iterations, fashion50.width, fashion50.model) == (32, 3000, 64, "convnet-nn")
    assert v.model == "convnet-nn" and src["model"].startswith("cpu:")
    paper = resolve_config("krr", "mnist", 10, "paper")  # FRePo's own network: widths doubling per block
    assert paper.values.model == "convnet-frepo" and paper.values.width is None
    assert paper.sources["model"].startswith("paper: yongchaoz/FRePo")
    with pytest.raises(ConfigError, match="width=16 applies to ConvNet-family models"):
        resolve_config("krr", "digits", 2, "cpu", sets={"width": "16", "model": "mlp"})
    with pytest.raises(ConfigError, match="online_steps=5 exceeds max_online_steps=4"):
        resolve_config("krr", "digits", 2, "cpu", sets={"online_steps": "5", "max_online_steps": "4"})
    with pytest.raises(ConfigError, match="solve_dtype"):
        resolve_config("krr", "digits", 2, "cpu", sets={"solve_dtype": "fp16"})


def test_loss_decreases(run30):
    out, _ = run30
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.8 * first, (first, last)


def test_learned_labels_move_and_are_saved(run30, digits):
    out, res = run30
    k = digits.info.num_classes
    loaded = SyntheticSet.load(out / "synset.safetensors")
    init = centred_onehot(torch.arange(k).repeat_interleave(2), k)
    targets = loaded.extras[TARGETS_EXTRA]
    assert targets.shape == (2 * k, k)
    assert (targets - init).abs().max() > 1e-3  # learned, not the initial centred one-hot
    assert torch.equal(targets, res.synset.extras[TARGETS_EXTRA])
    # the stored soft labels are the documented softmax of the targets
    assert loaded.label_kind == "soft"
    assert torch.allclose(loaded.labels, torch.softmax(targets / 0.2, 1), atol=1e-6)
    assert loaded.meta["labels"]["targets"] == f"extra.{TARGETS_EXTRA}"
    # pool state: ages stay below the reset age, the iteration count is in the checkpoint
    ckpt, _ = load_checkpoint(out / "checkpoint.safetensors")
    assert int(ckpt["module.state.iteration"]) == 30
    assert (ckpt["module.state.ages"] < 4).all() and ckpt["module.state.ages"].shape == (3,)


def test_fixed_labels_when_not_learned(digits, tmp_path):
    res = _run(digits, tmp_path / "fixed", 3, sets={"learn_labels": "false"})
    k = digits.info.num_classes
    assert torch.equal(res.synset.extras[TARGETS_EXTRA], centred_onehot(torch.arange(k).repeat_interleave(2), k))


def test_augment_is_an_option_off_by_default(digits, tmp_path):
    """``augment`` (ours, not FRePo's) gives the run a DSA object; the images then differ from a plain
    run's, the same seed still gives the same set, and the default run stays unaugmented."""
    plain = _run(digits, tmp_path / "plain", 3)
    aug = _run(digits, tmp_path / "aug", 3, sets={"augment": "true"})
    again = _run(digits, tmp_path / "again", 3, sets={"augment": "true"})
    runtime = {name: json.loads((tmp_path / name / "config.json").read_text())["runtime"]
               for name in ("plain", "aug")}
    assert runtime["plain"]["dsa_strategy"] == "none" and runtime["aug"]["dsa_strategy"] != "none"
    assert plain.synset.meta["config"]["augment"] is False and aug.synset.meta["config"]["augment"] is True
    assert not torch.equal(plain.synset.images, aug.synset.images)
    assert torch.equal(aug.synset.images, again.synset.images)
    assert torch.equal(aug.synset.extras[TARGETS_EXTRA], again.synset.extras[TARGETS_EXTRA])
    off = _run(digits, tmp_path / "off", 3, sets={"augment": "true", "dsa_strategy": "none"})
    assert torch.equal(off.synset.images, plain.synset.images)


def test_augmented_draws_a_transformation_per_image(digits, tmp_path):
    from tinyset.augment import DSA
    from tinyset.methods.base import DistillContext
    from tinyset.data.base import RealPool
    from tinyset.rng import make_generator

    cfg = resolve_config("krr", digits.info.name, 2, "cpu", sets={**SETS, "augment": "true"}).values
    assert KernelRidge.augments(cfg) and not KernelRidge.augments(dataclasses.replace(cfg, augment=False))
    ctx = DistillContext(digits.info, RealPool(digits, torch.device("cpu")), 2, torch.device("cpu"), "fp32",
                         DSA("color_flip"))
    impl = KernelRidge(cfg, ctx)
    x = torch.arange(8 * 8, dtype=torch.float32).view(1, 1, 8, 8).repeat(64, 1, 1, 1) / 64
    y = impl.augmented(x, make_generator(0))
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    recoloured = ~(flipped | kept)
    # one batch-wide op would give only flips and copies, or only recoloured images
    assert int(flipped.sum()) > 5 and int(recoloured.sum()) > 5, (flipped.sum(), kept.sum())
    assert torch.equal(impl.augmented(x, None), x)


def _stop_after(n):
    """An ``on_iteration`` callback that sends this process SIGINT after iteration ``n``: the loop
    checkpoints and stops, as when a user presses Ctrl-C."""
    def hook(it, total, loss, ev):
        if it == n:
            signal.raise_signal(signal.SIGINT)
    return hook


def test_resume_is_bit_exact(digits, tmp_path):
    """6 iterations at once vs a run of 6 stopped after 3 and resumed: pool networks are reset in
    between (age 4). (The learning-rate cosine spans ``iterations``, so both runs ask for 6.)"""
    full = _run(digits, tmp_path / "full", 6, checkpoint_every=1)
    with pytest.raises(Interrupted):
        _run(digits, tmp_path / "part", 6, checkpoint_every=100, on_iteration=_stop_after(3))
    assert load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")[1]["iteration"] == 3
    resumed = _run(digits, tmp_path / "part", 6, resume=True)
    a, ha = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, hb = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert set(a) == set(b)
    assert full.synset.meta["config"]["width"] == 32 and a["module.pool0.classifier.weight"].numel() == 10 * 32
    for key in ("tensor.images", "tensor.targets", "module.pool0.classifier.weight", "module.state.ages",
                "optim.synthetic.0.exp_avg", "optim.synthetic.1.exp_avg_sq", "generator"):
        assert key in a, key
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ha["optimizers"] == hb["optimizers"]
    assert torch.equal(full.synset.images, resumed.synset.images)
    assert torch.equal(full.synset.extras[TARGETS_EXTRA], resumed.synset.extras[TARGETS_EXTRA])


# ----------------------------------------------------------------------------- the KRR protocols
def test_protocols_registered_and_named_krr():
    assert "krr" in EVALUATORS and "krr-random" in EVALUATORS
    assert PRESETS["krr"].name == "krr-trained" and PRESETS["krr-random"].train_steps == 0
    with pytest.raises(ConfigError, match="start with 'krr-'"):
        KRRProtocol(name="dsa")
    with pytest.raises(ConfigError, match="ridge"):
        KRRProtocol(ridge=0.0)


def _real_set(digits, ipc=5):
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(digits.labels == c).flatten()[torch.randperm(int((digits.labels == c).sum()),
                                                                                  generator=g)[:ipc]]
                     for c in range(digits.info.num_classes)])
    return SyntheticSet(digits.normalized("cpu")[idx], digits.labels[idx], digits.info, meta={"method": "real"})


def test_krr_evaluator_uses_the_learned_targets(digits, digits_test):
    """Real images with their one-hot targets classify well; the same images with targets shifted to
    the next class (stored as learned targets) make the evaluator predict the shifted class."""
    base = _real_set(digits)
    proto = KRRProtocol(name="krr-random", train_steps=0, num_models=2)
    plain = evaluate_krr(base, digits_test, ["convnet-nn"], proto)
    k = digits.info.num_classes
    shifted = centred_onehot((base.labels + 1) % k, k)
    lying = dataclasses.replace(base, extras={TARGETS_EXTRA: shifted})
    res = evaluate_krr(lying, digits_test, ["convnet-nn"], proto)
    assert plain.label_regime == "krr (one-hot targets)" and res.label_regime == "krr (learned targets)"
    assert plain.results[0].mean > 0.7, plain.results[0].accuracies
    assert res.results[0].mean < 0.1, res.results[0].accuracies  # it follows the targets, not the labels
    assert res.protocol["name"] == "krr-random" and res.protocol["targets"] == f"extra.{TARGETS_EXTRA}"
    assert len(res.results[0].accuracies) == 2


def test_set_targets_of_soft_labels_and_bad_shape(digits):
    base = _real_set(digits, 1)
    k = digits.info.num_classes
    soft = dataclasses.replace(base, labels=torch.full((k, k), 1.0 / k))
    y, regime = set_targets(soft)
    assert regime == "krr (soft-label targets)" and torch.allclose(y, torch.zeros(k, k))
    bad = dataclasses.replace(base, extras={TARGETS_EXTRA: torch.zeros(k, k + 1)})
    with pytest.raises(ConfigError, match="krr_targets"):
        set_targets(bad)


@pytest.mark.slow
def test_trained_protocol_on_distilled_set_and_never_mixed(run30, digits_test):
    from tinyset.evaluate import Protocol, comparison_table, evaluate_synset

    _, res = run30
    krr = evaluate_krr(res.synset, digits_test, ["convnet-nn"], KRRProtocol(train_steps=20, num_models=1), seed=1)
    assert krr.protocol["name"] == "krr-trained" and krr.protocol["train_steps"] == 20
    assert krr.results[0].mean > 0.5
    sgd = evaluate_synset(res.synset, digits_test, ["convnet-d1"], Protocol.preset("quick", num_models=1, epochs=5))
    assert sgd.label_regime == "learned (soft labels)"
    with pytest.raises(ConfigError, match="different label regimes"):
        comparison_table([krr, sgd])


def test_cli_evaluate_protocol_krr(run30, tmp_path, capsys):
    from tinyset.cli import main

    out, _ = run30
    js = tmp_path / "krr.json"
    assert main(["evaluate", str(out / "synset.safetensors"), "--protocol", "krr-random", "--models", "convnet-w32",
                 "--num-models", "1", "--precision", "fp32", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "krr-random" in text and "krr (learned targets)" in text
    data = json.loads(js.read_text())
    assert data["protocol"]["name"] == "krr-random" and data["results"][0]["label_regime"] == "krr (learned targets)"
    assert data["set"]["method"] == "krr"


def test_bench_krr_races_tinyset_against_the_reference_iteration(tmp_path):
    import os
    import subprocess
    import sys

    bench = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_krr.py")
    out = tmp_path / "k.json"
    cmd = [sys.executable, bench, "--dataset", "digits", "--ipc", "2", "--iterations", "2", "--warmup", "0",
           "--threads", "1", "--precision", "fp32", "--configs", "cpu", "--set", "width=8", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "CPU:" in run.stdout and "speed-up" in run.stdout and "against reference" in run.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["cpu_s_per_iteration"] > 0 and row["reference_cpu_s_per_iteration"] > 0
    assert row["speedup_vs_reference"] > 0 and np.isfinite(row["reference_last_loss"])


def test_the_reference_krr_iteration_learns(digits):
    """The benchmark's reference-style iteration is a working KRR distillation, not an empty loop: its
    regression error on real batches falls over 60 iterations on digits."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_loop import ReferenceKRR
    from tinyset.data import RealPool

    cfg = resolve_config("krr", "digits", 2, "cpu", sets={"width": "16", "batch_real": "20",
                                                                  "lr_img": "1e-2"}).values
    pool = RealPool(digits, "cpu")
    g = torch.Generator().manual_seed(0)
    images, labels = pool.sample_classes(2, g)
    ref = ReferenceKRR(images, centred_onehot(labels, 10), pool, cfg, seed=0)
    losses = [ref.step(g) for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
