"""ZCA whitening: the transform, its storage with a synthetic set and an expert set, evaluation on
whitened test images, distillation on a whitened pool, expert/run mismatches."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tinyset.data.zca as zca_mod
from conftest import tiny_dataset
from tinyset.cli import main
from tinyset.data import Zca, fit_zca, load_dataset
from tinyset.errors import ArtifactError, ConfigError
from tinyset.evaluate import Protocol, evaluate_synset, test_images
from tinyset.experts import ZCA_FILE, ExpertSet, ExpertSettings, check_compatible, train_experts
from tinyset.methods.base import DistillConfig, DistillContext, Distiller, whiten_pool
from tinyset.data.base import RealPool
from tinyset.methods.loop import distill
from tinyset.synset import FORMAT_VERSION, ZCA_FORMAT_VERSION, SyntheticSet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_zca(digits):
    return Zca.fit(digits)


def _random_data(n=3000, d=12, seed=0):
    """Correlated full-rank data: x = z A with a fixed mixing matrix."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ a + 3.0).float().view(n, 3, 2, 2)


# ------------------------------------------------------------------------------------------ the transform
def test_round_trip_on_digits(digits, digits_zca):
    x = digits.normalized()
    y = digits_zca.whiten(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert not torch.allclose(y, x, atol=0.1)  # it does something
    assert torch.allclose(digits_zca.unwhiten(y), x, atol=1e-5, rtol=0)
    assert digits_zca.dim == 64 and digits_zca.num_images == len(digits) and digits_zca.eps == 0.1


def test_whitened_covariance_is_identity_up_to_eps():
    x = _random_data()
    # tiny eps: the whitened data has (almost exactly) the identity covariance
    z = Zca.fit(x, eps=1e-8)
    y = z.whiten(x).reshape(len(x), -1).double()
    cov = torch.cov(y.T)
    assert (cov - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-4
    assert y.mean(0).abs().max() < 1e-4
    # eps = 0.1 (the default): eigenvalues lambda / (lambda + eps) of the data covariance's lambda
    z = Zca.fit(x)
    lam = torch.linalg.eigvalsh(torch.cov(x.reshape(len(x), -1).double().T))
    got = torch.linalg.eigvalsh(torch.cov(z.whiten(x).reshape(len(x), -1).double().T))
    assert torch.allclose(got, lam / (lam + 0.1), atol=1e-4)
    # ZCA (unlike PCA whitening) is symmetric and keeps the images close to the originals
    assert torch.allclose(z.transform, z.transform.T) and torch.allclose(z.inverse, z.inverse.T)


def test_fit_is_deterministic_chunked_and_reads_datasets(digits, digits_zca):
    x = digits.normalized()
    a = Zca.fit(x, chunk_size=100)  # 15 chunks
    b = Zca.fit(x, chunk_size=100)
    assert torch.equal(a.transform, b.transform) and torch.equal(a.mean, b.mean)
    whole = Zca.fit(x, chunk_size=10_000)
    assert torch.allclose(a.transform, whole.transform, atol=1e-5) and torch.allclose(a.mean, whole.mean, atol=1e-6)
    # an ImageDataset (uint8) is normalised chunk by chunk: same transform as its normalised tensor
    assert torch.allclose(digits_zca.transform, whole.transform, atol=1e-5)
    assert torch.allclose(fit_zca(x).inverse, whole.inverse, atol=1e-5)
    # the formula: W = U diag(1/sqrt(lambda + eps)) U^T of the unbiased covariance
    flat = x.reshape(len(x), -1).double()
    lam, u = torch.linalg.eigh(torch.cov(flat.T))
    w = (u * (lam.clamp_min(0) + 0.1).rsqrt()) @ u.T
    assert torch.allclose(whole.transform.double(), w, atol=1e-5)


def test_chunked_and_in_place_application(monkeypatch, digits_zca, digits):
    x = digits.normalized()
    plain = digits_zca.whiten(x)
    monkeypatch.setattr(zca_mod, "ZCA_CHUNK", 100)  # force the chunked paths
    assert torch.allclose(digits_zca.whiten(x), plain, atol=1e-6)
    y = x.clone()
    out = digits_zca.whiten(y, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.allclose(y, plain, atol=1e-6)
    assert torch.allclose(digits_zca.unwhiten(y, inplace=True), x, atol=1e-5)
    with pytest.raises(ConfigError, match="requires grad in place"):
        digits_zca.whiten(x.clone().requires_grad_(True), inplace=True)
    # differentiable out of place
    v = x[:4].clone().requires_grad_(True)
    digits_zca.whiten(v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_bad_input_is_refused(digits_zca):
    with pytest.raises(ConfigError, match="have 48 values, the transform was fitted on images of 64"):
        digits_zca.whiten(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ConfigError, match="at least 2 images"):
        Zca.fit(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ConfigError, match="eps must be a finite number > 0"):
        Zca.fit(torch.zeros(4, 1, 2, 2), eps=0.0)
    with pytest.raises(ConfigError, match="NaN or inf"):
        Zca.fit(torch.full((4, 1, 2, 2), float("nan")))


def test_state_dict_and_file_round_trip(tmp_path, digits_zca):
    sd = digits_zca.state_dict()
    assert set(sd) == {"mean", "transform", "inverse"} and sd["transform"].shape == (64, 64)
    back = Zca.from_state_dict(sd, 0.1, 7, dim=64)
    assert torch.equal(back.transform, digits_zca.transform) and back.num_images == 7
    with pytest.raises(ArtifactError, match="for images of 64 values, the images have 48"):
        Zca.from_state_dict(sd, 0.1, dim=48)
    with pytest.raises(ArtifactError, match="inverse does not undo"):
        Zca.from_state_dict({**sd, "inverse": sd["transform"]}, 0.1)
    with pytest.raises(ArtifactError, match="missing"):
        Zca.from_state_dict({"mean": sd["mean"]}, 0.1)
    path = digits_zca.save(tmp_path / "z.safetensors")
    loaded = Zca.load(path, dim=64)
    assert torch.equal(loaded.inverse, digits_zca.inverse) and loaded.num_images == digits_zca.num_images


# ------------------------------------------------------------------------------------------ the artifact
def _zca_set(digits, zca, n=20):
    x = digits.normalized()[:n]
    return SyntheticSet(zca.whiten(x), digits.labels[:n], digits.info, lr=0.02, meta={"method": "t"}, zca=zca)


def test_artifact_round_trip_with_zca(tmp_path, digits, digits_zca):
    s = _zca_set(digits, digits_zca)
    path = s.save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["tinyset"])
    assert {"zca.mean", "zca.transform", "zca.inverse"} <= keys
    assert header["format_version"] == ZCA_FORMAT_VERSION == 2
    assert header["zca"] == {"eps": 0.1, "num_images": len(digits), "dim": 64}
    back = SyntheticSet.load(path)
    assert torch.equal(back.images, s.images) and back.lr == 0.02
    assert torch.equal(back.zca.transform, digits_zca.transform) and torch.equal(back.zca.mean, digits_zca.mean)
    # display space: un-whitened back to the normalised images
    assert torch.allclose(back.normalized_images(), digits.normalized()[:20], atol=1e-5)
    # a set without ZCA keeps format version 1 and its images as they are
    plain = SyntheticSet(digits.normalized()[:5], digits.labels[:5], digits.info)
    p2 = plain.save(tmp_path / "plain.safetensors")
    assert plain.header()["format_version"] == FORMAT_VERSION == 1 and "zca" not in plain.header()
    assert SyntheticSet.load(p2).zca is None and SyntheticSet.load(p2).normalized_images() is not None
    assert "zca(eps=0.1)" in repr(back) and back.to("cpu").zca is back.zca


def test_artifact_with_broken_zca_is_refused(tmp_path, digits, digits_zca):
    s = _zca_set(digits, digits_zca)
    path = s.save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["tinyset"])

    def write(name, t, h):
        p = tmp_path / name
        save_file(t, str(p), metadata={"tinyset": json.dumps(h)})
        return p

    no_header = {k: v for k, v in header.items() if k != "zca"}
    with pytest.raises(ArtifactError, match="no 'zca' header"):
        SyntheticSet.load(write("a.safetensors", tensors, no_header))
    with pytest.raises(ArtifactError, match="inverse does not undo"):
        SyntheticSet.load(write("b.safetensors", {**tensors, "zca.inverse": tensors["zca.transform"].clone()}, header))
    with pytest.raises(ArtifactError, match="sets with ZCA are version 2"):
        SyntheticSet.load(write("c.safetensors", tensors, {**header, "format_version": 1}))
    missing = {k: v for k, v in tensors.items() if k != "zca.mean"}
    with pytest.raises(ArtifactError, match=r"c\.safetensors|missing"):
        SyntheticSet.load(write("d.safetensors", missing, header))
    with pytest.raises(ConfigError, match="ZCA transform is for images of 64 values"):
        SyntheticSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), tiny_dataset(size=4).info, zca=digits_zca)


# ------------------------------------------------------------------------------------------ evaluation
def _permutation_zca(d, seed=0):
    """An exactly invertible 'whitening' that scrambles pixel positions: decisive for tests."""
    p = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    eye = torch.eye(d)
    return Zca.from_state_dict({"mean": torch.zeros(d), "transform": eye[:, p].contiguous(),
                                "inverse": eye[:, p].T.contiguous()}, 0.1, 0, d)


def test_test_images_are_whitened_with_the_sets_transform(digits_zca):
    test = tiny_dataset(size=8, split="test", seed=2)
    assert torch.equal(test_images(test, "cpu"), test.normalized())
    assert torch.allclose(test_images(test, "cpu", digits_zca), digits_zca.whiten(test.normalized()), atol=1e-6)


@pytest.mark.slow
def test_evaluation_applies_the_sets_zca_to_the_test_images():
    """Networks trained on pixel-scrambled images only score on scrambled test images: the set's
    transform must be applied to the test split (the control without it falls to chance)."""
    train = tiny_dataset(num_classes=3, per_class=10, size=8)
    test = tiny_dataset(num_classes=3, per_class=10, size=8, split="test", seed=0)
    z = _permutation_zca(64)
    scrambled = z.whiten(train.normalized())
    proto = Protocol.preset("quick", epochs=20, num_models=2, precision="fp32", compile=False, augment="none")
    with_zca = SyntheticSet(scrambled, train.labels, train.info, zca=z)
    without = SyntheticSet(scrambled, train.labels, train.info)
    res = evaluate_synset(with_zca, test, ["convnet-d1"], proto, seed=0)
    ctrl = evaluate_synset(without, test, ["convnet-d1"], proto, seed=0)
    assert res.results[0].mean > 0.9, res.results[0].accuracies
    assert ctrl.results[0].mean < 0.7, ctrl.results[0].accuracies
    assert res.protocol["zca"] == {"eps": 0.1, "num_images": 0, "dim": 64} and "zca" not in ctrl.protocol


# ------------------------------------------------------------------------------------------ distillation
def test_distiller_whitens_the_pool_once():
    train = tiny_dataset()
    pool = RealPool(train)
    raw = pool.images.clone()
    ctx = DistillContext(train.info, pool, 2, torch.device("cpu"), "fp32", None)
    cfg = DistillConfig(zca=True)
    d = Distiller(cfg, ctx)
    assert d.zca is ctx.zca and ctx.pool is pool
    assert torch.allclose(pool.images, d.zca.whiten(raw), atol=1e-6)  # in place, no copy
    again = Distiller(cfg, ctx)  # a second method on the same context: not whitened twice
    assert again.zca is d.zca and torch.allclose(pool.images, d.zca.whiten(raw), atol=1e-6)
    assert whiten_pool(ctx) is d.zca
    with pytest.raises(ConfigError, match="ZCA-whitened but the run has zca=false"):
        Distiller(DistillConfig(), ctx)
    plain = Distiller(DistillConfig(), DistillContext(train.info, RealPool(train), 2, torch.device("cpu"), "fp32",
                                                      None))
    assert plain.zca is None


@pytest.mark.slow
def test_distillation_with_zca_stores_the_transform(tmp_path):
    train, test = tiny_dataset(), tiny_dataset(split="test", seed=1)
    over = {"model": "convnet-d2", "batch_real": 16, "iterations": 2, "zca": True, "final_eval": "quick"}
    res = distill("dm", train, 2, tmp_path / "run", preset="cpu", overrides=over, seed=1, precision="fp32",
                  test=test, eval_every=2, val_per_class=4)
    syn = SyntheticSet.load(tmp_path / "run" / "synset.safetensors")
    assert syn.zca is not None and res.synset.zca is not None
    # fitted on the images the run trains on: the training split minus the 4-per-class validation split
    assert syn.zca.num_images == len(train) - 3 * 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["zca"] is True
    assert res.evaluation.protocol["zca"]["num_images"] == syn.zca.num_images
    # the initial images are real images of the whitened pool: un-whitened they are pixels in range
    pixels = train.info.denormalize(syn.normalized_images())
    assert pixels.min() >= 0 and pixels.max() <= 1
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval" in lines[-1]  # the validation split was whitened and evaluated


# ------------------------------------------------------------------------------------------ experts
@pytest.fixture(scope="module")
def zca_experts(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("zexperts") / "set"
    torch.set_num_threads(1)
    settings = ExpertSettings(epochs=3, members=1, lr=0.05, batch_size=128, compile=False, zca=True)
    train_experts(digits, out, 1, "convnet-d1", settings, seed=0, model_args={"width": 4})
    return out


def test_experts_record_and_store_their_zca(zca_experts, digits):
    es = ExpertSet(zca_experts)
    assert es.manifest["zca"] is True and es.zca is True
    z = es.zca_transform()
    assert z is not None and (zca_experts / ZCA_FILE).is_file()
    # fitted on the training split minus the held-out validation images
    assert z.num_images == es.manifest["train_images"] < len(digits)
    acc = es.val_acc(0)
    assert acc[-1] > acc[0] + 0.2, acc  # the experts learn on whitened (and whitened validation) images


def test_expert_run_zca_mismatch_names_both_values(zca_experts, digits, tmp_path):
    es = ExpertSet(zca_experts)
    with pytest.raises(ConfigError, match=r"zca=True; this run uses zca=False \(set zca=true or train experts "
                                          r"without --zca\)"):
        check_compatible(es, digits.info, "convnet-d1", zca=False)
    check_compatible(es, digits.info, "convnet-d1", zca=True)
    # through a distillation run: MTT refuses whitened experts for an unwhitened run
    over = {"experts": str(zca_experts), "model": "convnet-d1", "iterations": 1, "expert_epochs": 1,
            "max_start_epoch": 1, "syn_steps": 1}
    with pytest.raises(ConfigError, match="zca=True; this run uses zca=False"):
        distill("mtt", digits, 1, tmp_path / "run", preset="cpu", overrides=over, seed=0, precision="fp32")


def test_experts_cli_zca_flag(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["experts", "--dataset", "digits", "--model", "convnet-d1", "--num-experts", "1", "--epochs", "1",
                 "--members", "1", "--compile", "off", "--zca", "--out", str(out), "--threads", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["zca"] is True and (out / ZCA_FILE).is_file()
    assert "--set zca=true" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ show / export
def test_show_and_export_unwhiten(tmp_path, digits, digits_zca, capsys):
    from PIL import Image

    s = _zca_set(digits, digits_zca)
    path = s.save(tmp_path / "s.safetensors")
    plain = SyntheticSet(digits.normalized()[:20], digits.labels[:20], digits.info)
    p2 = plain.save(tmp_path / "p.safetensors")
    assert main(["show", str(path), "--out", str(tmp_path / "z.png"), "--upscale", "1"]) == 0
    assert main(["show", str(p2), "--out", str(tmp_path / "p.png"), "--upscale", "1"]) == 0
    assert "ZCA-whitened" in capsys.readouterr().out
    a = np.asarray(Image.open(tmp_path / "z.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "p.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # the same picture as the unwhitened images (up to rounding)
    assert main(["export", str(path), "--format", "npz", "--out", str(tmp_path / "z.npz")]) == 0
    with np.load(tmp_path / "z.npz", allow_pickle=False) as npz:
        assert np.allclose(npz["images_normalized"], digits.normalized()[:20].numpy(), atol=1e-5)
        assert np.allclose(npz["images_whitened"], s.images.numpy())
        assert npz["zca_transform"].shape == (64, 64) and npz["zca_mean"].shape == (64,)
        assert json.loads(str(npz["meta_json"]))["zca"]["eps"] == 0.1


def test_init_from_a_file_maps_between_whitening_spaces(tmp_path):
    """init=file:PATH takes a set's images into the run's space: un-whitened with the file's transform,
    whitened with the run's."""
    train = tiny_dataset()
    file_zca = Zca.fit(train.normalized(), eps=0.5)  # another transform than the run will fit
    x = train.normalized()
    src = SyntheticSet(file_zca.whiten(x), train.labels, train.info, zca=file_zca)
    path = src.save(tmp_path / "src.safetensors")
    first = torch.cat([x[train.labels == c][:2] for c in range(3)])  # ipc 2, class by class

    def initial(zca):
        ctx = DistillContext(train.info, RealPool(train), 2, torch.device("cpu"), "fp32", None)
        d = Distiller(DistillConfig(init=f"file:{path}", zca=zca), ctx)
        return d, d.initial_images(torch.Generator().manual_seed(0))

    d, images = initial(True)
    assert torch.allclose(d.zca.unwhiten(images), first, atol=1e-4)
    _, images = initial(False)
    assert torch.allclose(images, first, atol=1e-4)
