import json
import math

import pytest
import torch

import tinyset.evaluate as evaluate_mod
from conftest import tiny_dataset
from tinyset.errors import ConfigError
from tinyset.evaluate import Protocol, evaluate_full, evaluate_synset, evaluate_tensors, format_table
from tinyset.models import create_model, extract_member
from tinyset.results import EvaluationResult, ModelScore, result_from_dict
from tinyset.rng import make_generator
from tinyset.synset import SyntheticSet
from tinyset.training import TrainSettings, train_ensemble


def test_presets_load_with_source_and_overrides():
    p = Protocol.preset("dsa")
    assert (p.epochs, p.lr, p.momentum, p.weight_decay, p.batch_size, p.augment, p.num_models) == (
        1000, 0.01, 0.9, 0.0005, 256, "dsa", 5)
    assert "DatasetCondensation" in p.source
    assert Protocol.preset("noaug").epochs == 300
    q = p.with_overrides(epochs=3, num_models=None)
    assert q.epochs == 3 and q.num_models == 5 and q.overrides == {"epochs": 3}
    with pytest.raises(ConfigError, match="no evaluate preset"):
        Protocol.preset("nope")
    with pytest.raises(ConfigError, match="epochs"):
        Protocol.preset("dsa", epochs=0)


def test_ensemble_training_equals_separate_training():
    """Training M members together is the same computation as training them one by one."""
    torch.set_num_threads(1)
    data = tiny_dataset(per_class=6)
    x = data.normalized()
    y = data.labels
    s = TrainSettings(epochs=3, lr=0.05, batch_size=8)
    ens = create_model("convnet-d2", 1, 3, 8, members=2, seed=1)
    train_ensemble(ens, x, y, s, make_generator(0))
    # train member 0 alone from the same start with the same batch order and lr schedule
    ens2 = create_model("convnet-d2", 1, 3, 8, members=2, seed=1)
    single0 = extract_member(ens2, 0)
    opt = torch.optim.SGD(single0.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = make_generator(0)
    for ep in range(3):
        if ep == 1:
            opt = torch.optim.SGD(single0.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
        perms = torch.argsort(torch.rand(2, len(y), generator=gen), dim=1)
        for b0 in range(0, len(y), 8):
            idx = perms[0, b0:b0 + 8]
            loss = torch.nn.functional.cross_entropy(single0(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained0 = extract_member(ens, 0)
    for a, b in zip(trained0.parameters(), single0.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_evaluate_learns_tiny_problem_and_reports_protocol():
    train = tiny_dataset(per_class=10, seed=0)
    test = tiny_dataset(per_class=10, seed=0, split="test")
    proto = Protocol.preset("quick", epochs=30, num_models=3, precision="fp32", compile=False)
    res = evaluate_tensors(train.normalized(), train.labels, train.info, test, ["convnet-d2", "mlp"], proto, seed=0)
    assert isinstance(res, EvaluationResult)
    assert [r.model for r in res.results] == ["convnet-d2", "mlp"]
    for r in res.results:
        assert isinstance(r, ModelScore)
        assert len(r.accuracies) == 3
        assert r.mean > 0.9
        assert abs(r.mean - sum(r.accuracies) / 3) < 1e-9
        assert 0 < r.train_seconds <= r.seconds and r.seconds_per_model == pytest.approx(r.seconds / 3)
    assert res.score("mlp") is res.results[1]
    p = res.protocol
    assert p["name"] == "quick" and p["epochs"] == 30 and p["lr_used"] == 0.01 and p["precision_used"] == "fp32"
    assert p["compiled"] is False and "compile_fallback" not in p
    assert (res.dataset, res.num_images, res.seed, res.device, res.set) == ("tiny", 30, 0, "cpu", {})
    d = json.loads(json.dumps(res.to_dict()))  # machine readable, and read back
    assert d["kind"] == "evaluation" and d["results"][0]["model"] == "convnet-d2"
    back = result_from_dict(d)
    assert back.results[1].accuracies == res.results[1].accuracies
    table = format_table(res.results)
    assert "convnet-d2" in table and "±" in table
    assert f"{100 * res.results[0].mean:.2f}" in table


def test_evaluation_is_deterministic_given_seed():
    train = tiny_dataset(per_class=5)
    test = tiny_dataset(per_class=5, split="test", seed=1)
    proto = Protocol.preset("quick", epochs=5, num_models=2, precision="fp32", compile=False)
    a = evaluate_tensors(train.normalized(), train.labels, train.info, test, ["convnet-d1"], proto, seed=3)
    b = evaluate_tensors(train.normalized(), train.labels, train.info, test, ["convnet-d1"], proto, seed=3)
    assert a.results[0].accuracies == b.results[0].accuracies


def test_soft_labels_train():
    train = tiny_dataset(per_class=4)
    soft = torch.nn.functional.one_hot(train.labels, 3).float() * 0.9 + 0.1 / 3
    proto = Protocol.preset("quick", epochs=20, num_models=1, precision="fp32", compile=False, augment="none")
    res = evaluate_tensors(train.normalized(), soft, train.info, tiny_dataset(per_class=4, split="test"),
                           ["convnet-d1"], proto)
    assert res.results[0].mean > 0.6


def test_learned_lr_protocol_needs_one():
    train = tiny_dataset(per_class=2)
    proto = Protocol(name="learned", epochs=1, lr=None, num_models=1)
    with pytest.raises(ConfigError, match="learned lr"):
        evaluate_tensors(train.normalized(), train.labels, train.info, train, ["convnet-d1"], proto)


def test_full_baseline_runs_and_reports_progress_per_step():
    train = tiny_dataset(per_class=8)  # 24 images, batch 10: 3 steps per epoch, the last one short
    proto = Protocol.preset("fulldata", epochs=2, num_models=1, precision="fp32", compile=False, batch_size=10)
    steps, epochs = [], []
    res = evaluate_full(train, tiny_dataset(per_class=3, split="test"), ["mlp", "convnet-d1"], proto,
                        progress=lambda *a: epochs.append(a[:3]),
                        step_progress=lambda *a: steps.append(a))
    assert res.set == {"method": "full-dataset", "num_images": 24} and res.num_images == 24
    fractions = [pytest.approx(k / 3) for k in range(1, 7)]
    assert steps == [(name, f, 2) for name in ("mlp", "convnet-d1") for f in fractions]
    assert epochs == [(name, ep, 2) for name in ("mlp", "convnet-d1") for ep in (0, 1)]


def test_reference_schedule_matches_upstream_loop():
    """Upstream: ``for ep in range(Epoch + 1)``, lr x0.1 after epoch ``Epoch // 2 + 1``."""
    from tinyset.evaluate import settings_for

    dsa = Protocol.preset("dsa")
    assert dsa.schedule == "reference" and (dsa.train_epochs, dsa.decay_epoch) == (1001, 502)
    assert Protocol.preset("noaug").train_epochs == 301
    quick = Protocol.preset("quick", epochs=10)
    assert (quick.train_epochs, quick.decay_epoch) == (10, 5)
    st = settings_for(dsa, 100, torch.device("cpu"), 0.01)
    assert (st.epochs, st.decay_epoch) == (1001, 502)
    with pytest.raises(ConfigError, match="schedule"):
        Protocol(schedule="cosine")


def test_trainer_decays_at_the_given_epoch():
    """With a decay factor of 0 the weights freeze from ``decay_epoch`` on."""
    train = tiny_dataset(per_class=4)
    x, y = train.normalized(), train.labels

    def weights(epochs, decay_epoch):
        model = create_model("convnet-d1", 1, 3, 8, seed=0)
        st = TrainSettings(epochs=epochs, lr=0.05, decay_epoch=decay_epoch, lr_decay_factor=0.0)
        train_ensemble(model, x, y, st, make_generator(1))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(4, 2), weights(2, 2))  # 2 epochs at lr, then lr 0
    assert not torch.equal(weights(4, 3), weights(2, 2))
    assert torch.equal(weights(4, None), weights(2, 2))  # lr_decay_at 0.5 of 4 epochs


# ---------------------------------------------------------------- typed results, test progress

def test_evaluate_synset_records_the_set_and_reports_test_progress(monkeypatch):
    train = tiny_dataset(per_class=4)
    test = tiny_dataset(per_class=9, split="test", seed=2)  # 27 images, batches of 10 in the test pass
    syn = SyntheticSet.from_real(train.images, train.labels, train.info, meta={"method": "select:random"})
    proto = Protocol.preset("quick", epochs=2, num_models=2, precision="fp32", compile=False)
    seen = []
    orig = evaluate_mod.test_accuracy
    monkeypatch.setattr(evaluate_mod, "test_accuracy", lambda *a, **k: orig(*a, **{**k, "batch_size": 10}))
    res = evaluate_synset(syn, test, ["mlp", "convnet-d1"], proto, test_progress=lambda *a: seen.append(a))
    assert res.set == {"method": "select:random", "ipc": 4, "num_images": 12, "meta": {"method": "select:random"}}
    assert seen == [(name, k, 3) for name in ("mlp", "convnet-d1") for k in (1, 2, 3)]
    assert all(len(r.accuracies) == 2 for r in res.results)


# ---------------------------------------------------------------- validation before any training

@pytest.mark.parametrize("models, match", [
    ([], "--models names no architecture"),
    ("", "--models names no architecture"),
    (["convnet", "resnet99", "nope"], r"unknown architectures 'resnet99', 'nope'; known: .*convnet.*mlp"),
])
def test_model_list_is_checked_before_training(monkeypatch, models, match):
    calls = []
    monkeypatch.setattr(evaluate_mod, "train_ensemble", lambda *a, **k: calls.append(a))
    train = tiny_dataset(per_class=2)
    proto = Protocol.preset("quick", epochs=1, num_models=1, compile=False)
    with pytest.raises(ConfigError, match=match):
        evaluate_tensors(train.normalized(), train.labels, train.info, train, models, proto)
    with pytest.raises(ConfigError, match=match):
        evaluate_full(train, train, models, proto)
    assert calls == []  # nothing was trained


def test_architecture_that_cannot_take_the_images_fails_before_training(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate_mod, "train_ensemble", lambda *a, **k: calls.append(a))
    train = tiny_dataset(per_class=2)  # 8x8: too small for LeNet
    proto = Protocol.preset("quick", epochs=1, num_models=1, compile=False)
    with pytest.raises(ConfigError, match="lenet"):
        evaluate_tensors(train.normalized(), train.labels, train.info, train, ["mlp", "lenet"], proto)
    assert calls == []


def test_model_list_accepts_comma_separated_names():
    assert evaluate_mod.check_models("convnet, MLP") == ["convnet", "MLP"]


@pytest.mark.parametrize("field, value, allowed", [
    ("lr", float("nan"), "a finite number > 0"),
    ("lr", float("inf"), "a finite number > 0"),
    ("lr", -0.01, "a finite number > 0"),
    ("lr", 0.0, "a finite number > 0"),
    ("momentum", 1.0, r"a finite number in \[0, 1\)"),
    ("momentum", -0.1, r"a finite number in \[0, 1\)"),
    ("momentum", float("nan"), r"a finite number in \[0, 1\)"),
    ("weight_decay", -1e-4, "a finite number >= 0"),
    ("weight_decay", float("inf"), "a finite number >= 0"),
    ("lr_decay_factor", 0.0, r"a finite number in \(0, 1\]"),
    ("lr_decay_factor", 1.5, r"a finite number in \(0, 1\]"),
    ("lr_decay_at", float("-inf"), r"a finite number in \[0, 1\]"),
    ("epochs", 0, "an integer >= 1"),
    ("epochs", 2.5, "an integer >= 1"),
    ("epochs", float("nan"), "an integer >= 1"),
    ("num_models", 0, "an integer >= 1"),
    ("num_models", True, "an integer >= 1"),
    ("batch_size", -3, "an integer >= 1"),
    ("batch_size", float("inf"), "an integer >= 1"),
])
def test_protocol_rejects_bad_numbers_naming_field_value_and_range(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"protocol {field} must be {allowed}, got {value!r}"):
        Protocol(**{field: value})
    with pytest.raises(ConfigError, match=f"protocol {field}"):
        Protocol.preset("quick").with_overrides(**{field: value})


def test_protocol_accepts_edge_values():
    p = Protocol(lr=1e-9, momentum=0.0, weight_decay=0.0, lr_decay_factor=1.0, epochs=1, num_models=1,
                 batch_size=1, lr_decay_at=0.0)
    assert (p.momentum, p.lr_decay_factor) == (0.0, 1.0)
    assert Protocol(epochs=10.0).epochs == 10 and isinstance(Protocol(epochs=10.0).epochs, int)
    assert Protocol(lr=None).lr is None  # the set's learned lr
    with pytest.raises(ConfigError, match="precision"):
        Protocol(precision="fp16")


def test_learned_lr_must_be_finite():
    train = tiny_dataset(per_class=2)
    proto = Protocol(name="learned", epochs=1, lr=None, num_models=1, compile=False)
    with pytest.raises(ConfigError, match="learned lr must be a finite number > 0, got nan"):
        evaluate_tensors(train.normalized(), train.labels, train.info, train, ["convnet-d1"], proto,
                         learned_lr=math.nan)


def test_trainer_module_is_a_reexport():
    from tinyset.evaluate import trainer
    import tinyset.training as training

    assert trainer.train_ensemble is training.train_ensemble is evaluate_mod.train_ensemble
    assert trainer.TrainSettings is training.TrainSettings is evaluate_mod.TrainSettings
    assert evaluate_mod.test_accuracy is training.test_accuracy
