"""`tinyset sample`: a synthetic set drawn from a GAN run's generator file at any ipc, optionally
filtered, without retraining. With the run's ipc and filter settings it is the run's own set, image
for image (the discriminator and the filter classifier's seed are stored in the file)."""
import json

import pytest
import torch

from conftest import tiny_dataset
from tinyset.cli import main
from tinyset.data import load_dataset
from tinyset.errors import ArtifactError, ConfigError
from tinyset.methods.gan import (GENERATOR_FILE, REAL_DATA_FILTERS, FilterClassifier, FilterSettings, class_blocks,
                                 generate, herding_scores, load_discriminator, load_generator, read_generator_header,
                                 sample_generator, save_generator)
from tinyset.methods.loop import distill
from tinyset.results import result_from_dict
from tinyset.synset import SyntheticSet

SMALL = {"width": "4", "z_dim": "8", "embed_dim": "4", "batch_real": "4", "sample_every": "3", "sample_cols": "3"}
FILTER = {"candidates": "3", "filter_model": "mlp", "filter_epochs": "2", "filter_per_class": "20"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _run(root, data, filter_, ipc=3):
    out = root / f"gan_{filter_}"
    sets = {**SMALL, **FILTER, "filter": filter_}
    res = distill("gan", data, ipc, out, preset="cpu", sets=sets, overrides={"iterations": 4}, seed=2,
                  precision="fp32")
    return out / GENERATOR_FILE, res.synset


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sample")
    return {f: _run(root, digits, f) for f in ("none", "discriminator", "classifier", "herding")}


def _settings(kind, **kw):
    return FilterSettings(kind, candidates=3, model="mlp", epochs=2, per_class=20, **kw)


@pytest.mark.parametrize("kind", ["none", "discriminator", "classifier", "herding"])
def test_the_runs_own_settings_give_the_runs_own_set(runs, digits, kind):
    path, synset = runs[kind]
    again = sample_generator(path, 3, filtering=_settings(kind), train=digits if kind in REAL_DATA_FILTERS else None,
                             precision="fp32")
    assert torch.equal(again.images, synset.images) and torch.equal(again.labels, synset.labels)
    assert again.label_kind == "hard" and again.meta["gan"]["filter"] == kind
    assert again.meta["gan"]["generator_iteration"] == 4


def test_any_ipc_and_seed_from_one_file(runs):
    path, synset = runs["none"]
    g, header, info = load_generator(path)
    five = sample_generator(path, 5)
    assert five.images.shape == (50, 1, 8, 8)
    assert five.labels.tolist() == class_blocks(10, 5).tolist()
    assert torch.equal(five.images, generate(g, class_blocks(10, 5), header["sample_seed"]))
    other = sample_generator(path, 3, sample_seed=7)
    assert other.meta["gan"]["sample_seed"] == 7 and not torch.equal(other.images, synset.images)
    assert torch.equal(other.images, sample_generator(path, 3, sample_seed=7).images)  # seeded


def test_filtering_keeps_the_best_scored_candidates(runs):
    path, _ = runs["discriminator"]
    g, header, _ = load_generator(path)
    d, source = load_discriminator(path)
    assert source == str(path)
    kept = sample_generator(path, 2, filtering=_settings("discriminator"))
    assert kept.meta["gan"]["discriminator_from"] == str(path)
    pool = generate(g, class_blocks(10, 6), header["sample_seed"])
    scores = d(pool, class_blocks(10, 6)).view(10, 6)
    for c in range(10):  # the kept images are the two best-scored of each class's six candidates
        best = torch.sort(scores[c], descending=True, stable=True).indices[:2] + 6 * c
        assert torch.equal(kept.images[2 * c:2 * c + 2], pool[best])


def test_the_classifier_filter_depends_on_its_seed_and_records_it(runs, digits):
    path, synset = runs["classifier"]
    assert read_generator_header(path)[0]["filter_seed"] >= 0
    other = sample_generator(path, 3, filtering=_settings("classifier", seed=5), train=digits, precision="fp32")
    rec = other.meta["gan"]
    assert rec["filter_seed"] == 5 and rec["filter_model"] == "mlp" and rec["candidates"] == 3
    assert other.images.shape == synset.images.shape


class _Flat(torch.nn.Module):
    """A stand-in filter network whose embedding is the image itself."""

    def embed(self, x):
        return x.flatten(1)


def test_herding_scores_match_the_real_class_mean_in_the_classifier_features():
    from tinyset.select.herding import herding_order

    real = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, 5.0]]).view(4, 1, 1, 2)
    real_labels = torch.tensor([0, 0, 1, 1])  # class means (0, 0) and (0, 4)
    cand = torch.tensor([[0.1, 0.0], [0.2, 0.0], [2.0, 0.0], [-2.0, 0.0],  # class 0
                         [0.0, 0.0], [0.0, 4.5], [0.0, 9.0], [0.0, 3.9]]).view(8, 1, 1, 2)  # class 1
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = herding_scores(cand, labels, FilterClassifier(_Flat(), real, real_labels))
    # class 0, towards (0, 0): (0.1, 0) is nearest; the pair's mean with (0.2, 0) is 0.15 (with (-2, 0):
    # -0.95); the triple's with (-2, 0) is -0.57 (with (2, 0): 0.77); (2, 0) last
    assert scores[:4].tolist() == [0.0, -1.0, -3.0, -2.0]
    # class 1, towards the real mean (0, 4), not its candidates' own mean (0, 4.35), which would start with
    # (0, 4.5): (0, 3.9); then (0, 4.5) (pair mean 4.2); then (0, 0) (2.8, against 5.8 with (0, 9)); (0, 9) last
    assert scores[4:].tolist() == [-2.0, -1.0, -3.0, 0.0]
    assert herding_order(cand[4:].flatten(1), 1).tolist() == [1]
    with pytest.raises(ConfigError, match="no real training image of class 2"):
        herding_scores(cand, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]), FilterClassifier(_Flat(), real, real_labels))


def test_the_herding_filter_keeps_the_first_herding_picks(runs, digits):
    path, _ = runs["none"]
    kept = sample_generator(path, 2, filtering=_settings("herding", seed=3), train=digits, precision="fp32")
    rec = kept.meta["gan"]
    assert rec["filter"] == "herding" and rec["filter_seed"] == 3 and rec["candidates"] == 3
    g, header, _ = load_generator(path)
    labels = class_blocks(10, 6)
    pool = generate(g, labels, header["sample_seed"])
    from tinyset.data.base import RealPool
    from tinyset.methods.gan import train_filter_classifier

    clf = train_filter_classifier(RealPool(digits, "cpu"), "mlp", 20, 2, 3, "cpu", "fp32")
    scores = herding_scores(pool, labels, clf).view(10, 6)
    for c in range(10):
        first = torch.sort(scores[c], descending=True, stable=True).indices[:2] + 6 * c
        assert torch.equal(kept.images[2 * c:2 * c + 2], pool[first])
    with pytest.raises(ConfigError, match="filter herding learns from real images"):
        sample_generator(path, 2, filtering=_settings("herding"))


def _old_file(path, folder, iteration=4):
    """``path``'s generator as a file written before the discriminator was stored, in ``folder``."""
    g, header, info = load_generator(path)
    folder.mkdir(exist_ok=True)
    old = folder / GENERATOR_FILE
    save_generator(old, g, info, header["architecture"], header["sample_seed"], iteration)
    return old


def test_an_older_file_takes_the_discriminator_of_its_runs_checkpoint(runs, tmp_path):
    import shutil

    path, synset = runs["discriminator"]
    folder = tmp_path / "old_run"
    old = _old_file(path, folder)
    with pytest.raises(ArtifactError, match="no run checkpoint beside it"):
        load_discriminator(old)
    shutil.copy(path.parent / "checkpoint.safetensors", folder / "checkpoint.safetensors")
    d, source = load_discriminator(old)
    assert source == str(folder / "checkpoint.safetensors")
    stored, _ = load_discriminator(path)
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), stored.state_dict().values()))
    again = sample_generator(old, 3, filtering=_settings("discriminator"))
    assert torch.equal(again.images, synset.images)  # the run's own filtered set
    other = _old_file(path, tmp_path / "later", iteration=9)  # a checkpoint of another iteration is refused
    shutil.copy(path.parent / "checkpoint.safetensors", other.parent / "checkpoint.safetensors")
    with pytest.raises(ArtifactError, match="iteration 4, the generator of iteration 9"):
        load_discriminator(other)


def test_bad_requests_are_refused(runs, digits, tmp_path):
    path, _ = runs["none"]
    old = _old_file(path, tmp_path / "old")
    with pytest.raises(ArtifactError, match="holds no discriminator"):
        sample_generator(old, 2, filtering=_settings("discriminator"))
    with pytest.raises(ConfigError, match="training split"):
        sample_generator(path, 2, filtering=_settings("classifier"))
    with pytest.raises(ConfigError, match="trained on digits"):
        sample_generator(path, 2, filtering=_settings("classifier"), train=tiny_dataset(num_classes=3))
    with pytest.raises(ConfigError, match="ipc must be >= 1"):
        sample_generator(path, 0)


@pytest.mark.parametrize("key,value", [("filter_seed", -3), ("discriminator", {"pool_mean": 1})])
def test_a_damaged_header_field_is_named(runs, tmp_path, key, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _ = runs["discriminator"]
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"tinyset": json.dumps(header)})
    with pytest.raises(ArtifactError, match=key):
        read_generator_header(bad)


def test_the_command_writes_the_set_and_never_overwrites(runs, tmp_path, capsys):
    path, synset = runs["discriminator"]
    out, js = tmp_path / "s.safetensors", tmp_path / "s.json"
    args = ["sample", str(path), "--ipc", "3", "--filter", "discriminator", "--candidates", "3", "--out", str(out),
            "--json", str(js), "--threads", "1", "--precision", "fp32"]
    assert main(args) == 0
    assert "best of 3 by the discriminator" in capsys.readouterr().out
    assert torch.equal(SyntheticSet.load(out).images, synset.images)
    record = json.loads(js.read_text())
    assert record["kind"] == "sampling" and record["schema"] == "tinyset.result"
    assert record["ipc"] == 3 and record["sampling"]["filter"] == "discriminator" and record["runtime"]["threads"] == 1
    back = result_from_dict(record)
    assert back.generator == str(path) and back.file == str(out) and back.sampling["candidates"] == 3
    before = out.read_bytes()
    assert main(args) == 2  # exists: refused, nothing lost
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_the_command_refuses_a_filter_the_file_cannot_serve(runs, tmp_path, capsys):
    path, _ = runs["none"]
    old = _old_file(path, tmp_path / "old")
    out = tmp_path / "x.safetensors"
    assert main(["sample", str(old), "--ipc", "2", "--filter", "discriminator", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds no discriminator" in err and str(old) in err and "Traceback" not in err and not out.exists()
    assert main(["sample", str(tmp_path / "missing.safetensors"), "--ipc", "2", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("estimator", ["probe", "knn"])
def test_mi_scores_extra_images_without_fitting_on_them(digits, estimator):
    from tinyset.select.mi import pmi_scores
    from tinyset.rng import make_generator

    real = digits.info.normalize(digits.images[:40])
    right = digits.labels[:40]
    wrong = (right + 1) % 10  # the same images under another class's label
    extra, extra_labels = torch.cat([real, real]), torch.cat([right, wrong])
    plain = pmi_scores(digits, make_generator(3), "cpu", estimator=estimator, precision="fp32")
    both = pmi_scores(digits, make_generator(3), "cpu", estimator=estimator, precision="fp32", extra=extra,
                      extra_labels=extra_labels)
    assert torch.equal(plain.scores, both.scores) and torch.equal(plain.key, both.key)  # never fitted on
    assert both.extra_scores.shape == (80,) and both.extra_key.shape == (80,)
    assert (both.extra_key[:40] > both.extra_key[40:]).float().mean() >= 0.9  # the true label is more informative
    with pytest.raises(ConfigError, match="one label each"):
        pmi_scores(digits, make_generator(3), "cpu", extra=extra)


@pytest.mark.parametrize("estimator", ["probe", "knn"])
def test_the_mi_filter_keeps_the_highest_mi_candidates(runs, digits, estimator):
    from tinyset.select.mi import pmi_scores
    from tinyset.rng import make_generator

    path, _ = runs["none"]
    g, header, _ = load_generator(path)
    kept = sample_generator(path, 2, filtering=FilterSettings("mi", candidates=3, seed=4, estimator=estimator),
                            train=digits, precision="fp32")
    rec = kept.meta["gan"]
    assert rec["filter"] == "mi" and rec["filter_estimator"] == estimator and rec["filter_seed"] == 4
    assert rec["filter_note"].startswith("calibrated" if estimator == "probe" else "k-NN")
    labels = class_blocks(10, 6)
    pool = generate(g, labels, header["sample_seed"])
    key = pmi_scores(digits, make_generator(4), "cpu", estimator=estimator, precision="fp32", extra=pool,
                     extra_labels=labels).extra_key.view(10, 6)
    for c in range(10):
        best = torch.sort(key[c], descending=True, stable=True).indices[:2] + 6 * c
        assert torch.equal(kept.images[2 * c:2 * c + 2], pool[best])
    with pytest.raises(ConfigError, match="filter mi learns from real images"):
        sample_generator(path, 2, filtering=FilterSettings("mi"))


def test_the_command_filters_by_mi(runs, tmp_path, capsys):
    path, _ = runs["none"]
    out = tmp_path / "mi.safetensors"
    assert main(["sample", str(path), "--ipc", "2", "--filter", "mi", "--mi-estimator", "knn", "--candidates", "2",
                 "--out", str(out), "--threads", "1", "--precision", "fp32"]) == 0
    assert "best of 2 by the mi" in capsys.readouterr().out
    meta = SyntheticSet.load(out).meta["gan"]
    assert meta["filter"] == "mi" and meta["filter_estimator"] == "knn" and meta["filter_seed"] >= 0


def test_the_python_call_returns_a_sampling_result(runs, digits):
    from tinyset import api

    path, synset = runs["classifier"]
    res = api.sample(path, 3, filter="classifier", candidates=3, train=digits, model="mlp", epochs=2, per_class=20)
    assert res.kind == "sampling" and res.dataset == "digits" and res.ipc == 3
    assert torch.equal(res.synset.images, synset.images)  # the run's own settings: the run's own set
    assert res.sampling["filter_model"] == "mlp" and res.to_dict()["sampling"]["candidates"] == 3
    with pytest.raises(TypeError):
        api.sample(path, 3, colour="blue")


def test_the_command_filters_by_herding(runs, tmp_path, capsys):
    path, _ = runs["none"]
    out = tmp_path / "herding.safetensors"
    assert main(["sample", str(path), "--ipc", "2", "--filter", "herding", "--candidates", "3", "--filter-model", "mlp",
                 "--filter-epochs", "2", "--filter-per-class", "20", "--filter-seed", "3", "--out", str(out),
                 "--threads", "1", "--precision", "fp32"]) == 0
    assert "best of 3 by the herding" in capsys.readouterr().out
    meta = SyntheticSet.load(out).meta["gan"]
    assert meta["filter"] == "herding" and meta["filter_model"] == "mlp" and meta["filter_seed"] == 3
    assert main(["sample", str(path), "--ipc", "2", "--filter", "herding", "--filter-model", "nope",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is not a registered architecture" in capsys.readouterr().err
