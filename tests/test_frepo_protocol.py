"""The training loop's Adam / squared-error / warm-up-cosine options and the ``frepo`` evaluation
protocol built on them (FRePo's evaluation of a set with learned regression targets)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from tinyset.errors import ConfigError
from tinyset.evaluate import Protocol, evaluate_synset, regression_targets
from tinyset.evaluate.krr import TARGETS_EXTRA
from tinyset.models import create_model
from tinyset.rng import make_generator
from tinyset.synset import SyntheticSet
from tinyset.training import TrainSettings, per_sample_squared_error, train_ensemble, warmup_cosine_lr

K = 3


@pytest.fixture(scope="module")
def data():
    return tiny_dataset(num_classes=K, per_class=10), tiny_dataset(num_classes=K, per_class=10, split="test", seed=0)


def _proto(**kw):
    base = {"num_models": 2, "precision": "fp32", "compile": False, "augment": "none", "epochs": 150,
            "warmup_steps": 10, "lr": 3e-3}
    return Protocol.preset("frepo", **{**base, **kw})


# ------------------------------------------------------------------------------------------ the loop
def test_warmup_cosine_schedule_values():
    lr = [warmup_cosine_lr(1.0, s, 100, 20, 0.01) for s in range(100)]
    assert lr[0] == 0.0 and lr[10] == pytest.approx(0.5) and lr[20] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lr[:20], lr[1:21]))              # rises during the warm-up
    assert all(a >= b for a, b in zip(lr[20:], lr[21:]))               # then only falls
    assert lr[60] == pytest.approx(0.01 + 0.99 * 0.5)                  # half-way down the cosine
    assert warmup_cosine_lr(1.0, 100, 100, 20, 0.01) == pytest.approx(0.01)  # the floor at the end
    assert warmup_cosine_lr(2.0, 5, 10, 0, 0.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_settings_reject_unknown_choices():
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adam, got 'rmsprop'"):
        TrainSettings(epochs=1, lr=0.1, optimizer="rmsprop")
    with pytest.raises(ConfigError, match="loss must be one of ce, mse"):
        TrainSettings(epochs=1, lr=0.1, loss="hinge")
    with pytest.raises(ConfigError, match="lr_schedule must be one of step, warmup_cosine"):
        TrainSettings(epochs=1, lr=0.1, lr_schedule="cyclic")
    with pytest.raises(ConfigError, match="final_lr_factor"):
        TrainSettings(epochs=1, lr=0.1, final_lr_factor=2)
    with pytest.raises(ConfigError, match="target rows"):
        per_sample_squared_error(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def _net(seed=0):
    return create_model("mlp", 1, K, 8, members=2, generator=make_generator(seed))


def test_the_schedule_is_applied_every_step(data):
    """One step whose scheduled lr is 0 (the first warm-up step) leaves Adam's weights unchanged; the
    same step without the warm-up moves them."""
    train, _ = data
    x, y = train.normalized(), regression_targets(train.labels, K)
    for warmup, moved in ((5, False), (0, True)):
        net = _net()
        before = [p.detach().clone() for p in net.parameters()]
        s = TrainSettings(epochs=1, lr=1e-2, batch_size=len(x), optimizer="adam", loss="mse",
                          lr_schedule="warmup_cosine", warmup_steps=warmup, weight_decay=0.0)
        train_ensemble(net, x, y, s, make_generator(1))
        changed = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert changed is moved


def test_adam_mse_training_fits_the_targets(data):
    train, _ = data
    x, y = train.normalized(), regression_targets(train.labels, K)
    losses = []
    s = TrainSettings(epochs=60, lr=3e-3, batch_size=10, optimizer="adam", loss="mse", lr_schedule="warmup_cosine",
                      warmup_steps=10, final_lr_factor=0.01, weight_decay=0.0)
    net = train_ensemble(_net(), x, y, s, make_generator(2), on_epoch=lambda ep, loss, acc: losses.append(loss))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    with torch.no_grad():
        out = net(x).reshape(len(x), 2, K)
    assert (out.argmax(-1) == train.labels.view(-1, 1)).float().mean() == 1.0


# ------------------------------------------------------------------------------------------ protocol
def test_frepo_preset_and_its_step_table():
    p = Protocol.preset("frepo")
    assert (p.optimizer, p.loss, p.lr_schedule, p.lr, p.warmup_steps, p.final_lr_factor, p.weight_decay) == \
        ("adam", "mse", "warmup_cosine", 3e-4, 500, 0.01, 0.0)
    assert p.for_set_size(10).epochs == 1000        # 10 images: one batch per epoch
    assert p.for_set_size(100).epochs == 2000
    assert p.for_set_size(500).epochs == 5000
    assert p.for_set_size(1000).epochs == 5000      # 10000 steps of two batches per epoch
    assert p.for_set_size(37) is p                  # not in the table: the preset's epochs
    assert Protocol.preset("frepo", epochs=7).for_set_size(100).epochs == 7  # --epochs wins
    assert Protocol.preset("dsa").for_set_size(100) is not None and Protocol.preset("dsa").steps_by_images is None
    with pytest.raises(ConfigError, match="steps_by_images"):
        Protocol.preset("frepo", steps_by_images={"ten": 5})
    with pytest.raises(ConfigError, match="steps_by_images"):
        Protocol.preset("frepo", steps_by_images={"10": 0})
    with pytest.raises(ConfigError, match="protocol optimizer must be one of"):
        Protocol.preset("dsa", optimizer="lbfgs")


def test_regression_targets_of_labels():
    hard = regression_targets(torch.tensor([0, 2]), 3)
    assert torch.allclose(hard, torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]]))
    soft = regression_targets(torch.tensor([[0.5, 0.5, 0.0]]), 3)
    assert torch.allclose(soft, torch.tensor([[0.5 - 1 / 3, 0.5 - 1 / 3, -1 / 3]]))


def test_learned_targets_are_used_not_the_labels(data):
    """A set whose stored (hard) labels name the next class but whose learned regression targets name
    the true one: under frepo the networks learn the targets (high accuracy); under the same protocol
    the set without the targets learns its labels (accuracy near 0)."""
    train, test = data
    x, y = train.normalized(), train.labels
    wrong = (y + 1) % K
    with_targets = SyntheticSet(x, wrong, train.info, meta={"method": "t"},
                                extras={TARGETS_EXTRA: 2.0 * (F.one_hot(y, K).float() - 1 / K)})
    without = SyntheticSet(x, wrong, train.info, meta={"method": "t"})
    a = evaluate_synset(with_targets, test, ["mlp"], _proto(), seed=0)
    b = evaluate_synset(without, test, ["mlp"], _proto(), seed=0)
    assert a.results[0].mean > 0.9, a.results[0].accuracies
    assert b.results[0].mean < 0.1, b.results[0].accuracies
    assert a.label_regime == "learned (regression targets)" and b.label_regime == "hard"
    assert a.protocol["name"] == "frepo" and a.protocol["loss"] == "mse" and a.protocol["optimizer"] == "adam"
