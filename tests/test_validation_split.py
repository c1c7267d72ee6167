"""Scoring an evaluation on a validation split held out of the training split (``--split validation``).

Settings are chosen by validation accuracy, never by test accuracy; these tests check that the
validation score really comes from held-out training images, never touches the test split, and is
never put beside test accuracies. All on the embedded ``digits`` dataset with tiny networks.
"""
import json

import pytest

import tinyset.cli.evaluate as cli_evaluate
from tinyset.cli import main
from tinyset.data import load_dataset
from tinyset.errors import ConfigError
from tinyset.evaluate import Protocol, comparison_table, evaluate_synset, evaluate_tensors, format_table
from tinyset.evaluate.protocol import held_out_for_set, validation_seed
from tinyset.results import result_from_dict
from tinyset.select import select


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def protocol(**kw):
    base = dict(name="val-test", epochs=4, lr=0.01, batch_size=16, lr_decay_factor=1.0, schedule="fraction",
                augment="none", num_models=2, precision="fp32", compile=False, val_per_class=10)
    base.update(kw)
    return Protocol(**base)


def test_validation_score_is_measured_on_held_out_training_images(digits):
    train, test = digits
    sel = select("random", train, 2, seed=0)
    p = protocol()
    res = evaluate_synset(sel.synset, None, ["mlp"], p, seed=3, train=train, split="validation")
    scored = res.scored_on
    assert scored["split"] == "validation" and scored["images"] == 100 and scored["per_class"] == 10
    assert scored["seed"] == validation_seed(3) and scored["excluded_set_images"] == 20
    assert scored["set_source_images_excluded"] is True
    # the same networks scored on exactly the held-out images give the same accuracies
    val, _ = held_out_for_set(sel.synset, train, 10, 3)
    assert len(test) != len(val)
    direct = evaluate_tensors(sel.synset.images, sel.synset.labels, train.info, val, ["mlp"], p, 3)
    assert res.results[0].accuracies == direct.results[0].accuracies
    for acc in res.results[0].accuracies:  # out of the 100 validation images, not the test split's
        assert abs(acc * 100 - round(acc * 100)) < 1e-9
    # the validation images are training images, none of them one of the set's own
    train_rows = {bytes(x.numpy().tobytes()) for x in train.images}
    own = {bytes(train.images[i].numpy().tobytes()) for i in sel.indices}
    val_rows = {bytes(x.numpy().tobytes()) for x in val.images}
    assert val_rows <= train_rows and not val_rows & own
    on_test = evaluate_synset(sel.synset, test, ["mlp"], p, seed=3)
    assert on_test.scored_on == {"split": "test"}


def test_bad_split_requests_are_refused(digits):
    train, test = digits
    sel = select("random", train, 1, seed=0)
    with pytest.raises(ConfigError, match="needs the real training split"):
        evaluate_synset(sel.synset, test, ["mlp"], protocol(), split="validation")
    with pytest.raises(ConfigError, match="the accuracy it was chosen by"):
        evaluate_synset(sel.synset, None, ["mlp"], protocol(early_stop_patience=2), train=train, split="validation")
    with pytest.raises(ConfigError, match="split must be one of test, validation"):
        evaluate_synset(sel.synset, test, ["mlp"], protocol(), split="val")
    with pytest.raises(ConfigError, match="needs the test split"):
        evaluate_synset(sel.synset, None, ["mlp"], protocol())


def test_scored_on_round_trips_and_is_never_mixed_with_test_accuracies(digits):
    train, test = digits
    sel = select("random", train, 1, seed=0)
    val_res = evaluate_synset(sel.synset, None, ["mlp"], protocol(epochs=1), train=train, split="validation")
    back = result_from_dict(json.loads(json.dumps(val_res.to_dict())))
    assert back.scored_on == val_res.scored_on and back.scored_on["split"] == "validation"
    old = val_res.to_dict()
    del old["scored_on"]  # a result written before the field existed was scored on the test split
    assert result_from_dict(old).scored_on == {"split": "test"}
    test_res = evaluate_synset(sel.synset, test, ["mlp"], protocol(epochs=1))
    assert "validation acc (%)" in format_table(val_res.results, split="validation")
    assert "validation acc (%)" in comparison_table([val_res, back], names=["a", "b"])
    with pytest.raises(ConfigError, match="different splits .*validation: v; test: t"):
        comparison_table([val_res, test_res], names=["v", "t"])


def test_cli_split_validation_never_loads_the_test_split(tmp_path, capsys, monkeypatch):
    f, out = tmp_path / "r.safetensors", tmp_path / "res.json"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(f)]) == 0
    loaded = []
    real_load = cli_evaluate.load_split

    def spy(args, name, split):
        loaded.append(split)
        return real_load(args, name, split)

    monkeypatch.setattr(cli_evaluate, "load_split", spy)
    capsys.readouterr()
    assert main(["evaluate", str(f), "--models", "mlp", "--protocol", "quick", "--epochs", "3", "--num-models", "2",
                 "--precision", "fp32", "--split", "validation", "--val-per-class", "10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert loaded == ["train"]
    assert "validation acc (%)" in text and "test acc" not in text
    assert "100 images (10 per class) held out of the training split" in text
    assert "never one of the set's own source images" in text
    res = json.loads(out.read_text())
    assert res["scored_on"]["split"] == "validation" and res["scored_on"]["images"] == 100
    # the KRR protocols score on the same held-out images
    loaded.clear()
    assert main(["evaluate", str(f), "--protocol", "krr-random", "--models", "mlp", "--num-models", "1",
                 "--split", "validation", "--val-per-class", "10"]) == 0
    text = capsys.readouterr().out
    assert loaded == ["train"] and "validation acc (%)" in text
    # early stopping and scoring on one validation split: refused before any work, exit status 2
    loaded.clear()
    assert main(["evaluate", str(f), "--models", "mlp", "--protocol", "dsa-early", "--split", "validation"]) == 2
    assert "the accuracy it was chosen by" in capsys.readouterr().err and loaded == []


def test_api_evaluate_scores_on_validation(digits):
    from tinyset.api import evaluate

    train, _ = digits
    sel = select("random", train, 1, seed=0)
    res = evaluate(sel.synset, None, ["mlp"], protocol=protocol(epochs=1), train=train, split="validation")
    assert res.scored_on["split"] == "validation" and res.scored_on["images"] == 100
