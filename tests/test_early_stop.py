"""Early stopping on a validation split, and wall-time accounting (issue #11 part 6).

All on the embedded ``digits`` dataset (8x8) with tiny networks and few epochs.
"""
import json

import pytest
import torch

from tinyset.cli import main
from tinyset.data import load_dataset
from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.errors import ConfigError
from tinyset.evaluate import Protocol, evaluate_full, evaluate_synset, evaluate_tensors, make_augment, settings_for
from tinyset.evaluate.protocol import early_stopper, hold_out_validation, validation_seed
from tinyset.evaluate.timing import format_time_saved, time_saved
from tinyset.models import create_model
from tinyset.results import EvaluationResult, ModelScore, result_from_dict
from tinyset.rng import derive_seed, make_generator
from tinyset.select import select
from tinyset.training import EarlyStopping, TrainSettings, member_state, test_accuracy, train_ensemble


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def small_protocol(**kw):
    """A fast protocol: no lr decay (so a run cut at epoch b is exactly the first b epochs of a longer
    one), no augmentation, no compile, fp32."""
    base = dict(name="es-test", epochs=30, lr=0.01, batch_size=16, lr_decay_factor=1.0, schedule="fraction",
                augment="none", num_models=3, precision="fp32", compile=False, early_stop_patience=3,
                val_every=1, val_per_class=20)
    base.update(kw)
    return Protocol(**base)


def tiny_train_set(train, per_class=3):
    """The first ``per_class`` images of every class of ``train`` (normalised) and their labels."""
    idx = torch.cat([(train.labels == c).nonzero().flatten()[:per_class] for c in range(train.info.num_classes)])
    return train.normalized()[idx], train.labels[idx]


# ---------------------------------------------------------------- the rule itself

class Scripted(EarlyStopping):
    """Validation accuracies read from a script (one list per member, one value per validation)."""

    def __init__(self, script, patience, every=1):
        super().__init__(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), patience, every)
        self.script, self.calls = script, 0

    def validate(self, model):
        self.calls += 1
        return [s[min(self.calls, len(s)) - 1] for s in self.script]


def _run(stopper, epochs=20, members=3):
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    model = create_model("mlp", 1, 3, 8, members=members, seed=0)
    seen = []
    train_ensemble(model, x, y, TrainSettings(epochs=epochs, lr=0.01, batch_size=6), make_generator(0),
                   early_stop=stopper, on_epoch=lambda ep, loss, acc: seen.append(ep))
    return seen


def test_members_stop_independently_on_a_constructed_plateau():
    script = [[0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3],  # best at epoch 3, no rise for 3 epochs -> stops at 6
              [0.1 * k for k in range(1, 21)],       # rises every epoch -> never stops
              [0.5, 0.4, 0.5, 0.45, 0.49]]           # best at 1 (ties do not count) -> stops at 4
    es = Scripted(script, patience=3)
    seen = _run(es)
    assert es.stop_epoch == [6, 20, 4] and es.best_epoch == [3, 20, 1]
    assert es.stopped == [True, False, True]
    assert es.best_accuracy[0] == 0.3 and es.best_accuracy[2] == 0.5
    assert len(seen) == 20 and es.epochs_run == 20  # member 1 kept the ensemble training
    # a stopped member is not validated again
    assert [row[0] is None for _, row in es.history] == [False] * 6 + [True] * 14
    assert es.record()["stop_epochs"] == [6, 20, 4]


def test_ensemble_stops_when_every_member_has_stopped_and_validates_every_k():
    flat = [0.2, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    es = Scripted([flat, flat[:3] + [0.6] + flat[4:]], patience=4, every=2)
    seen = _run(es, epochs=30, members=2)
    # validations after epochs 2, 4, 6, ...: member 0 best 0.5 at epoch 4, stops at 8;
    # member 1 best 0.6 at epoch 8 (its 4th validation), stops at 12
    assert [e for e, _ in es.history] == [2, 4, 6, 8, 10, 12]
    assert es.best_epoch == [4, 8] and es.stop_epoch == [8, 12] and all(es.stopped)
    assert len(seen) == 12 and es.epochs_run == 12  # the loop ended with the last member


def test_last_epoch_is_always_validated():
    es = Scripted([[0.1, 0.2, 0.3]], patience=50, every=4)
    _run(es, epochs=10, members=1)
    assert [e for e, _ in es.history] == [4, 8, 10]
    assert es.best_epoch == [10] and es.stop_epoch == [10] and es.stopped == [False]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), patience=0)
    with pytest.raises(ConfigError, match="every"):
        EarlyStopping(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), patience=2, every=0)
    with pytest.raises(ConfigError, match="validation split"):
        EarlyStopping(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), patience=2)
    with pytest.raises(ConfigError, match="early_stop_patience"):
        Protocol(early_stop_patience=0)
    with pytest.raises(ConfigError, match="val_every"):
        Protocol(early_stop_patience=5, val_every=0)
    with pytest.raises(ConfigError, match="val_per_class"):
        Protocol(val_per_class=-1)
    with pytest.raises(ConfigError, match="needs a validation split"):
        early_stopper(small_protocol(), None, None)
    assert early_stopper(small_protocol(early_stop_patience=None), None, None) is None


# ---------------------------------------------------------------- real training

def test_restored_weights_are_the_best_validation_epochs_weights(digits):
    """Each member ends with exactly the weights it had after its best validation epoch: the same
    as training without early stopping for that many epochs (bit for bit on CPU)."""
    train, _ = digits
    rest, val, _ = hold_out_validation(train, small_protocol(), 0)
    x, y = tiny_train_set(rest)
    s = TrainSettings(epochs=30, lr=0.01, lr_decay_factor=1.0, batch_size=16)
    model = create_model("convnet-d1", 1, 10, 8, members=3, seed=0)
    es = EarlyStopping(val.normalized(), val.labels, patience=3, every=1)
    train_ensemble(model, x, y, s, make_generator(0), early_stop=es)
    assert all(es.stopped) and es.epochs_run == max(es.stop_epoch) < 30
    assert any(b < e for b, e in zip(es.best_epoch, es.stop_epoch))
    # after training the model holds the best weights: re-validating gives the best accuracies
    assert test_accuracy(model, val.normalized(), val.labels) == es.best_accuracy
    for m, b in enumerate(es.best_epoch):
        plain = create_model("convnet-d1", 1, 10, 8, members=3, seed=0)
        train_ensemble(plain, x, y, TrainSettings(epochs=b, lr=0.01, lr_decay_factor=1.0, batch_size=16),
                       make_generator(0))
        want, got = member_state(plain, m, 3), member_state(model, m, 3)
        assert all(torch.equal(want[k], got[k]) for k in want)
    # and training on past the stop would have given other weights
    longer = create_model("convnet-d1", 1, 10, 8, members=3, seed=0)
    train_ensemble(longer, x, y, TrainSettings(epochs=es.epochs_run, lr=0.01, lr_decay_factor=1.0, batch_size=16),
                   make_generator(0))
    m = next(i for i, (b, e) in enumerate(zip(es.best_epoch, es.stop_epoch)) if b < e)
    a, b = member_state(longer, m, 3), member_state(model, m, 3)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def _evaluate(digits, protocol, test=None, seed=0):
    train, test_split = digits
    rest, val, _ = hold_out_validation(train, protocol, seed)
    x, y = tiny_train_set(rest)
    return evaluate_tensors(x, y, train.info, test or test_split, ["convnet-d1"], protocol, seed=seed, val=val), (x, y)


def test_reported_accuracy_is_that_of_the_restored_weights(digits):
    protocol = small_protocol()
    res, (x, y) = _evaluate(digits, protocol)
    row = res.results[0]
    assert row.stop_epochs is not None and len(row.stop_epochs) == 3
    assert row.epochs_trained == max(row.stop_epochs) < protocol.train_epochs
    assert all(b <= s for b, s in zip(row.best_epochs, row.stop_epochs))
    assert res.protocol["early_stop_patience"] == 3 and res.protocol["validation"]["images"] == 200
    # re-test: the same networks (same seeds) trained without early stopping for each best epoch
    _, test = digits
    root = make_generator(0)
    gen_seed = derive_seed(root)
    for m, b in enumerate(row.best_epochs):
        gen = make_generator(gen_seed)
        model = create_model("convnet-d1", 1, 10, 8, members=3, generator=gen)
        plain = protocol.with_overrides(epochs=b)
        train_ensemble(model, x, y, settings_for(plain, len(y), torch.device("cpu"), 0.01), gen,
                       make_augment(plain, "digits"))
        accs = test_accuracy(model, test.normalized(), test.labels)
        assert accs[m] == row.accuracies[m]


def test_the_test_split_never_decides(digits):
    """Poisoned test labels (every label wrong) change the reported accuracy, never a stop epoch."""
    _, test = digits
    protocol = small_protocol()
    clean, _ = _evaluate(digits, protocol)
    poisoned_test = ImageDataset(test.info, "test", test.images, (test.labels + 1) % 10, test.source)
    poisoned, _ = _evaluate(digits, protocol, test=poisoned_test)
    a, b = clean.results[0], poisoned.results[0]
    assert (a.stop_epochs, a.best_epochs, a.val_accuracies, a.epochs_trained) == (
        b.stop_epochs, b.best_epochs, b.val_accuracies, b.epochs_trained)
    assert a.mean > 0.5 and b.mean < 0.2  # the test labels did change what was reported


def test_wall_times_are_recorded(digits):
    res, _ = _evaluate(digits, small_protocol())
    row = res.results[0]
    assert row.train_seconds > 0 and row.test_seconds > 0 and 0 < row.val_seconds < row.train_seconds
    assert row.seconds == pytest.approx(row.train_seconds + row.test_seconds, rel=1e-6)
    plain, _ = _evaluate(digits, small_protocol(early_stop_patience=None, epochs=4))
    p = plain.results[0]
    assert p.train_seconds > 0 and p.test_seconds > 0 and p.val_seconds == 0
    assert p.epochs_trained == 4 and p.stop_epochs is None and p.best_epochs is None
    assert "validation" not in plain.protocol and plain.protocol["early_stop_patience"] is None


def test_json_round_trip_and_old_results_still_read(digits):
    res, _ = _evaluate(digits, small_protocol())
    d = json.loads(json.dumps(res.to_dict()))
    back = result_from_dict(d)
    for key in ("stop_epochs", "best_epochs", "val_accuracies", "epochs_trained", "train_seconds", "test_seconds",
                "val_seconds", "accuracies"):
        assert getattr(back.results[0], key) == getattr(res.results[0], key)
    assert back.protocol["val_every"] == 1 and back.protocol["validation"] == res.protocol["validation"]
    # a result written before these fields existed
    for key in ("test_seconds", "val_seconds", "epochs_trained", "stop_epochs", "best_epochs", "val_accuracies"):
        for row in d["results"]:
            row.pop(key)
    old = result_from_dict(d).results[0]
    assert (old.test_seconds, old.val_seconds, old.epochs_trained, old.stop_epochs) == (0.0, 0.0, None, None)


# ---------------------------------------------------------------- the validation split

def _indexed_dataset(per_class=30, classes=3):
    """A dataset whose image i stores i in its first two pixels (to read indices back)."""
    n = per_class * classes
    info = DatasetInfo("idx", 1, (4, 4), classes, tuple("abc"[:classes]), (0.5,), (0.25,))
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ImageDataset(info, "train", images, torch.arange(n) % classes, "test")


def _ids(data):
    return set((data.images[:, 0, 0, 0].long() + 256 * data.images[:, 0, 0, 1].long()).tolist())


def test_validation_split_is_seeded_held_out_and_avoids_the_sets_images():
    data = _indexed_dataset()
    p = small_protocol(val_per_class=5)
    exclude = [0, 1, 2, 3, 4, 5, 30, 31]
    rest, val, desc = hold_out_validation(data, p, seed=7, exclude=exclude)
    v, r = _ids(val), _ids(rest)
    assert len(v) == 15 and not v & set(exclude) and not v & r and not r & set(exclude)
    assert v | r | set(exclude) == set(range(90))
    assert torch.bincount(val.labels, minlength=3).tolist() == [5, 5, 5]
    assert desc["excluded_set_images"] == 8 and desc["seed"] == validation_seed(7) and desc["images"] == 15
    assert _ids(hold_out_validation(data, p, seed=7, exclude=exclude)[1]) == v  # seeded
    assert _ids(hold_out_validation(data, p, seed=8, exclude=exclude)[1]) != v
    with pytest.raises(ConfigError, match="training image 90"):
        hold_out_validation(data, p, 0, exclude=[90])
    test = ImageDataset(data.info, "test", data.images, data.labels, "t")
    with pytest.raises(ConfigError, match="held out of the training split"):
        hold_out_validation(test, p, 0)
    with pytest.raises(ConfigError, match="cannot hold out 40"):
        hold_out_validation(data, small_protocol(val_per_class=40), 0)


def test_evaluate_synset_and_baseline_hold_out_validation(digits):
    train, test = digits
    sel = select("random", train, 2, seed=0)
    protocol = small_protocol(epochs=6, num_models=2, val_per_class=10)
    with pytest.raises(ConfigError, match="needs a validation split"):
        evaluate_synset(sel.synset, test, ["mlp"], protocol)
    res = evaluate_synset(sel.synset, test, ["mlp"], protocol, train=train)
    assert res.protocol["validation"]["excluded_set_images"] == 20 and res.protocol["validation"]["images"] == 100
    assert res.results[0].stop_epochs is not None
    base = evaluate_full(train, test, ["mlp"], small_protocol(epochs=2, num_models=2, val_per_class=10))
    assert base.num_images == len(train) - 100 and base.set["num_images"] == len(train) - 100
    assert base.results[0].epochs_trained <= 2 and base.results[0].train_seconds > 0


# ---------------------------------------------------------------- preset, time saved, CLI

def test_dsa_early_preset_is_dsa_plus_early_stopping():
    early, dsa = Protocol.preset("dsa-early"), Protocol.preset("dsa")
    assert (early.early_stop_patience, early.val_every, early.val_per_class) == (100, 10, 100)
    assert early.early_stopping and not dsa.early_stopping and dsa.early_stop_patience is None
    same = {k: v for k, v in early.to_dict().items() if k not in ("name", "source", "early_stop_patience")}
    assert same == {k: v for k, v in dsa.to_dict().items() if k not in ("name", "source", "early_stop_patience")}
    assert "issue #11" in early.source and "000_d734e3bc7a4cda81" in early.source
    for name in ("noaug", "quick", "fulldata", "fulldata-long", "dsa-learned-lr"):
        assert Protocol.preset(name).early_stop_patience is None


def _result(method, seconds, networks, dataset="digits", device="cpu"):
    row = ModelScore(model="convnet", accuracies=[0.9] * networks, train_seconds=seconds)
    return EvaluationResult(protocol={}, dataset=dataset, num_images=10, seed=0, device=device, results=[row],
                            set={"method": method})


def test_time_saved_is_the_ratio_of_per_network_training_times():
    saved = time_saved(_result("select:random", 10.0, 5), _result("full-dataset", 100.0, 2))
    row = saved["rows"][0]
    assert (row["set_seconds"], row["full_seconds"], row["ratio"]) == (2.0, 50.0, 25.0)
    assert saved["differences"] == []
    text = format_time_saved(saved, "b.json")
    assert "25.0x less training time" in text and "b.json" in text
    other = time_saved(_result("x", 10.0, 5), _result("full-dataset", 100.0, 2, device="cuda"))
    assert "device cpu vs cuda" in format_time_saved(other)
    with pytest.raises(ConfigError, match="not a full-training-set result"):
        time_saved(_result("x", 1.0, 1), _result("select:random", 1.0, 1))
    with pytest.raises(ConfigError, match="measured on mnist"):
        time_saved(_result("x", 1.0, 1), _result("full-dataset", 1.0, 1, dataset="mnist"))
    with pytest.raises(ConfigError, match="recorded training time"):
        time_saved(_result("x", 0.0, 1), _result("full-dataset", 1.0, 1))


def test_cli_early_stopping_and_baseline_json(tmp_path, capsys):
    f, base, out = tmp_path / "r.safetensors", tmp_path / "base.json", tmp_path / "res.json"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(f)]) == 0
    assert main(["baseline", "--dataset", "digits", "--models", "mlp", "--protocol", "quick", "--epochs", "2",
                 "--num-models", "2", "--precision", "fp32", "--json", str(base)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(f), "--models", "mlp", "--protocol", "quick", "--epochs", "40", "--num-models", "2",
                 "--precision", "fp32", "--early-stop-patience", "2", "--val-every", "1", "--val-per-class", "10",
                 "--baseline-json", str(base), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "early stopping: patience 2 epochs" in text and "best validation epoch" in text
    assert "less training time" in text and "wall time of mlp" in text
    res = json.loads(out.read_text())
    assert res["protocol"]["early_stop_patience"] == 2 and res["protocol"]["validation"]["excluded_set_images"] == 20
    assert len(res["results"][0]["stop_epochs"]) == 2 and res["results"][0]["test_seconds"] > 0
    # a --baseline-json that is not a baseline is refused before any training, with exit status 2
    assert main(["evaluate", str(f), "--models", "mlp", "--baseline-json", str(out)]) == 2
    assert "not a full-training-set result" in capsys.readouterr().err
