"""Label regimes: hard labels, labels/lr learned by the method, a teacher's soft labels at evaluation
time. The evaluator must really use what the regime says, record it, and tables must not mix them."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_dataset
from tinyset.cli import main
from tinyset.data import load_dataset
from tinyset.data.zca import Zca
from tinyset.errors import ConfigError
from tinyset.evaluate import (Protocol, Teacher, check_same_regime, comparison_table, evaluate_full, evaluate_synset,
                              format_table, parse_teacher, teacher_labels)
from tinyset.experts import ExpertSettings, train_experts
from tinyset.results import UNRECORDED_REGIME, EvaluationResult, ModelScore, label_regime, result_from_dict
from tinyset.synset import SyntheticSet

K = 3


def _proto(epochs=60, preset="quick", **kw):
    return Protocol.preset(preset, epochs=epochs, num_models=2, precision="fp32", compile=False, augment="none",
                           **{"lr": 0.05, **kw})


#: a small fast network: these tests are about which labels it is trained on
NET = ["mlp"]


@pytest.fixture(scope="module")
def data():
    return tiny_dataset(num_classes=K, per_class=10), tiny_dataset(num_classes=K, per_class=10, split="test", seed=0)


class PrototypeTeacher(nn.Module):
    """A 'network' that scores images by closeness to one prototype per class; ``shift`` files every
    prototype under another class, so its labels point away from the truth."""

    def __init__(self, train, shift=0):
        super().__init__()
        x = train.normalized().flatten(1)
        protos = torch.stack([x[train.labels == c].mean(0) for c in range(K)])
        self.register_buffer("protos", protos.roll(shift, dims=0))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.protos) * 0.5


# ------------------------------------------------------------------------------------------ names
def test_regime_names():
    assert label_regime(False, False) == "hard"
    assert label_regime(True, False) == "learned (soft labels)"
    assert label_regime(False, True) == "learned (lr)"
    assert label_regime(True, True) == "learned (soft labels, lr)"
    assert label_regime(True, False, 1.0) == "teacher (T=1)"
    assert label_regime(True, True, 4.0) == "teacher (T=4, learned lr)"
    assert parse_teacher("runs/e") == (parse_teacher("runs/e")[0], None)
    assert parse_teacher("runs/e:7")[1] == 7 and str(parse_teacher("runs/e:7")[0]) == "runs/e"
    assert parse_teacher("C:/x/e")[1] is None  # only a trailing :digits is an epoch
    with pytest.raises(ConfigError, match="empty"):
        parse_teacher(" ")


# ------------------------------------------------------------------------------------------ stored labels
def test_soft_labels_are_used_not_their_argmax(data):
    """Three copies of every image: two with rows [c: 0.51, c+1: 0.49], one with [c+1: 1]. Their argmax
    says c twice and c+1 once (hard training predicts c); the rows average to c+1 (soft training
    predicts c+1). The evaluator trains on the rows, so the test accuracy collapses."""
    train, test = data
    x, y = train.normalized(), train.labels
    nxt = (y + 1) % K
    mixed = 0.51 * torch.nn.functional.one_hot(y, K) + 0.49 * torch.nn.functional.one_hot(nxt, K)
    images = torch.cat([x, x, x])
    soft = torch.cat([mixed, mixed, torch.nn.functional.one_hot(nxt, K)]).float()
    soft_set = SyntheticSet(images, soft, train.info, meta={"method": "t"})
    argmax_set = SyntheticSet(images, soft_set.hard_labels(), train.info)
    res = evaluate_synset(soft_set, test, NET, _proto(), seed=0)
    ctrl = evaluate_synset(argmax_set, test, NET, _proto(), seed=0)
    assert ctrl.results[0].mean > 0.9, ctrl.results[0].accuracies   # argmax labels: the true class
    assert res.results[0].mean < 0.1, res.results[0].accuracies     # soft rows: the next class
    assert res.label_regime == res.results[0].label_regime == "learned (soft labels)"
    assert ctrl.label_regime == "hard"


def test_learned_lr_is_used_under_a_protocol_without_lr(data):
    train, test = data
    proto = _proto(epochs=30, preset="dsa-learned-lr", lr=None)  # lr null: the set's learned lr
    tiny = SyntheticSet(train.normalized(), train.labels, train.info, lr=1e-7)
    good = SyntheticSet(train.normalized(), train.labels, train.info, lr=0.05)
    a = evaluate_synset(tiny, test, NET, proto, seed=0)
    b = evaluate_synset(good, test, NET, proto, seed=0)
    assert a.protocol["lr_used"] == 1e-7 and b.protocol["lr_used"] == 0.05
    assert b.results[0].mean > 0.9 and a.results[0].mean < 0.7, (a.results[0].accuracies, b.results[0].accuracies)
    assert a.label_regime == "learned (lr)"
    # the same set under a protocol with its own lr: the learned lr is not used, the regime is hard
    c = evaluate_synset(tiny, test, NET, _proto(epochs=2), seed=0)
    assert c.protocol["lr_used"] == 0.05 and c.label_regime == "hard"
    assert evaluate_full(train, test, NET, _proto(epochs=1), seed=0).label_regime == "hard"


# ------------------------------------------------------------------------------------------ teacher
def test_teacher_labels_replace_the_sets_labels(data):
    """A teacher whose prototypes are filed under the next class relabels every image with that class:
    networks trained on its labels miss the truth, whatever the set's own (correct) hard labels say."""
    train, test = data
    s = SyntheticSet(train.normalized(), train.labels, train.info, meta={"method": "random"})
    honest = Teacher(PrototypeTeacher(train), train.info, source={"experts": "stub"})
    liar = Teacher(PrototypeTeacher(train, shift=1), train.info, source={"experts": "stub"})
    soft = teacher_labels(s, liar, "cpu")
    assert soft.shape == (len(s), K) and torch.allclose(soft.sum(1), torch.ones(len(s)))
    assert torch.equal(soft.argmax(1), (train.labels + 1) % K)
    r_liar = evaluate_synset(s, test, NET, _proto(), seed=0, teacher=liar)
    r_honest = evaluate_synset(s, test, NET, _proto(), seed=0, teacher=honest)
    assert r_honest.results[0].mean > 0.9 and r_liar.results[0].mean < 0.1
    assert r_liar.label_regime == r_liar.results[0].label_regime == "teacher (T=1)"
    assert r_liar.protocol["teacher"] == {"experts": "stub", "temperature": 1.0}
    # temperature: T -> large flattens the rows
    warm = Teacher(PrototypeTeacher(train, shift=1), train.info, temperature=100.0)
    rows = teacher_labels(s, warm, "cpu")
    assert rows.max() < 0.4 and torch.equal(rows.argmax(1), soft.argmax(1))
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        Teacher(PrototypeTeacher(train), train.info, temperature=0.0)


def test_teacher_sees_images_in_its_own_space(data):
    train, _ = data
    x = train.normalized()
    set_zca = Zca.fit(x)
    teacher = Teacher(PrototypeTeacher(train), train.info)
    plain = teacher.label(x)
    # a whitened set is un-whitened before an unwhitened teacher labels it
    assert torch.allclose(teacher.label(set_zca.whiten(x), set_zca), plain, atol=1e-5)
    # a whitened teacher gets whitened inputs
    t_zca = Zca.fit(x, eps=0.5)
    wt = Teacher(PrototypeTeacher(train), train.info, zca=t_zca)
    expect = torch.softmax(wt.net(t_zca.whiten(x)), 1)
    assert torch.allclose(wt.label(x), expect, atol=1e-6)


def test_teacher_of_another_dataset_is_refused(data):
    train, _ = data
    digits = load_dataset("digits")
    teacher = Teacher(PrototypeTeacher(train), train.info, source={"experts": "E"})
    s = SyntheticSet(digits.normalized()[:10], digits.labels[:10], digits.info)
    with pytest.raises(ConfigError, match="teacher E was trained on dataset 'tiny'; the set .* is of 'digits'"):
        evaluate_synset(s, train, NET, _proto(epochs=1), teacher=teacher)


@pytest.fixture(scope="module")
def digit_experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "experts"
    torch.set_num_threads(1)
    settings = ExpertSettings(epochs=3, members=1, lr=0.05, batch_size=128, compile=False)
    train_experts(load_dataset("digits"), out, 1, "convnet-d1", settings, seed=0, model_args={"width": 4})
    return out


def test_cli_teacher_regime_in_json_and_table(tmp_path, capsys, digit_experts):
    subset = tmp_path / "random.safetensors"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(subset)]) == 0
    common = ["--models", "convnet-d1", "--protocol", "quick", "--epochs", "2", "--num-models", "1",
              "--precision", "fp32", "--threads", "1"]
    js = tmp_path / "t.json"
    assert main(["evaluate", str(subset), *common, "--teacher", f"{digit_experts}", "--teacher-temperature", "2",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "teacher (T=2)" in out and "labels" in out
    res = json.loads(js.read_text())
    assert res["label_regime"] == "teacher (T=2)" and res["results"][0]["label_regime"] == "teacher (T=2)"
    assert res["protocol"]["teacher"]["epoch"] == 3 and res["protocol"]["teacher"]["expert"] == 0  # the last epoch
    assert res["protocol"]["teacher"]["temperature"] == 2.0
    js1 = tmp_path / "t1.json"
    assert main(["evaluate", str(subset), *common, "--teacher", f"{digit_experts}:1", "--json", str(js1)]) == 0
    assert json.loads(js1.read_text())["protocol"]["teacher"]["epoch"] == 1
    hard = tmp_path / "h.json"
    assert main(["evaluate", str(subset), *common, "--json", str(hard)]) == 0
    assert json.loads(hard.read_text())["label_regime"] == "hard"
    capsys.readouterr()
    # an epoch that is not stored, a folder that is not an expert set: exit 2 with a message
    assert main(["evaluate", str(subset), *common, "--teacher", f"{digit_experts}:9"]) == 2
    assert "epoch 9 of expert 0 is not stored" in capsys.readouterr().err
    assert main(["evaluate", str(subset), *common, "--teacher", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    # mixing the two regimes in one comparison table is refused
    results = [result_from_dict(json.loads(p.read_text())) for p in (js, hard)]
    with pytest.raises(ConfigError, match="different label regimes"):
        comparison_table(results)


# ------------------------------------------------------------------------------------------ results and tables
def _result(regime, acc=0.5, name="x"):
    return EvaluationResult(protocol={"name": "dsa"}, dataset="d", num_images=10, seed=0, device="cpu",
                            results=[ModelScore("convnet", [acc, acc], label_regime=regime)], file=name,
                            label_regime=regime)


def test_regimes_in_json_and_old_json_is_readable():
    r = _result("learned (soft labels, lr)")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["label_regime"] == d["results"][0]["label_regime"] == "learned (soft labels, lr)"
    assert result_from_dict(d).label_regime == "learned (soft labels, lr)"
    old = {k: v for k, v in d.items() if k != "label_regime"}
    old["results"] = [{k: v for k, v in row.items() if k != "label_regime"} for row in d["results"]]
    back = result_from_dict(old)
    assert back.label_regime == back.results[0].label_regime == UNRECORDED_REGIME


def test_tables_show_and_refuse_to_mix_regimes():
    hard_a, hard_b = _result("hard", 0.9, "a.safetensors"), _result("hard", 0.7, "b.safetensors")
    table = comparison_table([hard_a, hard_b])
    assert table.splitlines()[0] == "labels: hard"
    assert "a.safetensors" in table and "90.00" in table and "70.00" in table
    assert check_same_regime([hard_a, hard_b.to_dict()]) == "hard"  # JSON dicts work too
    teacher = _result("teacher (T=1)", 0.95, "random.safetensors")
    with pytest.raises(ConfigError, match=r"different label regimes \(hard: a.safetensors; teacher \(T=1\): "
                                          r"random.safetensors\)"):
        comparison_table([hard_a, teacher])
    with pytest.raises(ConfigError, match="different label regimes"):
        comparison_table([hard_a, _result(UNRECORDED_REGIME)])
    # rows inside one result are checked too
    mixed = _result("hard")
    mixed.results.append(ModelScore("mlp", [0.5], label_regime="learned (lr)"))
    with pytest.raises(ConfigError, match="different label regimes"):
        comparison_table([mixed])
    assert "teacher (T=1)" in format_table(teacher.results)
    assert "unrecorded" in format_table([{"model": "m", "mean": 0.5, "std": 0.0, "accuracies": [0.5],
                                          "seconds_per_model": 1.0}])


# ------------------------------------------------------------------------------------------ the set itself
def test_dataset_view_show_and_export_of_soft_labels(tmp_path, capsys, data):
    train, _ = data
    soft = torch.softmax(torch.randn(len(train), K, generator=torch.Generator().manual_seed(0)) * 3, 1)
    s = SyntheticSet(train.normalized(), soft, train.info, lr=0.03, meta={"method": "t"})
    img, row = s[4]
    assert img.shape == (1, 8, 8) and row.shape == (K,) and torch.equal(row, soft[4])
    loader = torch.utils.data.DataLoader(s, batch_size=7)
    xb, yb = next(iter(loader))
    assert yb.shape == (7, K) and yb.dtype == torch.float32
    path = s.save(tmp_path / "soft.safetensors")
    assert main(["show", str(path), "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "labels: soft" in out and "label regime: learned (soft labels)" in out
    assert "learned lr: 0.03" in out and "learned (soft labels, lr)" in out
    folder = tmp_path / "folder"
    assert main(["export", str(path), "--format", "imagefolder", "--out", str(folder)]) == 0
    index = json.loads((folder / "labels.json").read_text())["soft_labels"]
    assert len(index) == len(s)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    for rel, vec in index.items():
        assert (folder / rel).is_file()
        assert names.index(rel.split("/")[0]) == max(range(K), key=lambda k: vec[k])  # filed under its argmax
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["label_kind"] == "soft" and meta["label_regime"] == "learned (soft labels)"
    hard = SyntheticSet(train.normalized(), train.labels, train.info).save(tmp_path / "hard.safetensors")
    capsys.readouterr()
    assert main(["show", str(hard), "--out", str(tmp_path / "h.png")]) == 0
    assert "labels: hard (one class per image); label regime: hard" in capsys.readouterr().out
