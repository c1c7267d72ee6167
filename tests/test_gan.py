"""GAN-assisted synthesis (`distill --method gan`) and initialising any method from a file
(`init=file:SET`, `init=gan:GENERATOR`), on digits with tiny networks: the GAN trains, resumes
bit-exactly after a real kill -9, writes its generator and sample grids, its synthetic set has ipc
hard-labelled images per class (filtered or not), and every bad initialisation file is refused with a
message naming it (exit status 2 from the command line)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_dataset
from tinyset.cli import main
from tinyset.data import load_dataset
from tinyset.data.base import DatasetInfo, RealPool
from tinyset.errors import ArtifactError, ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import INITS, DistillContext, check_init, init_forms, parse_init
from tinyset.methods.gan import (GENERATOR_FILE, Discriminator, build_generator, class_spread, gan_losses,
                                 generate, keep_best, load_generator, read_generator_header, save_generator)
from tinyset.methods.loop import distill, load_checkpoint, resolve_config
from tinyset.rng import make_generator
from tinyset.synset import SyntheticSet

#: tiny networks: a GAN step on digits takes a few milliseconds
SMALL = {"width": "4", "z_dim": "8", "embed_dim": "4", "batch_real": "4", "sample_every": "3", "sample_cols": "3"}
IPC = 2


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _gan(out, data, iterations, ipc=IPC, seed=1, **kw):
    sets = {**SMALL, **{k: str(v) for k, v in kw.pop("sets", {}).items()}}
    return distill("gan", data, ipc, out, preset="cpu", sets=sets, overrides={"iterations": iterations}, seed=seed,
                   precision="fp32", **kw)


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, digits):
    """One finished 6-iteration GAN run (ipc 3): its folder and result."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gan") / "run"
    return out, _gan(out, digits, 6, ipc=3)


def _method(name, data, ipc, sets, seed=0):
    """A distiller set up as the loop would (no training)."""
    cfg = resolve_config(name, data.info.name, ipc, "cpu", sets=sets).values
    impl = METHODS.get(name)(cfg, DistillContext(data.info, RealPool(data), ipc, torch.device("cpu"), "fp32", None))
    impl.setup(make_generator(seed))
    return impl


# ---------------------------------------------------------------------------------- settings
def test_registered_with_dcgan_settings_and_cpu_rule():
    assert "gan" in METHODS.names()
    res = resolve_config("gan", "digits", 10, "cpu")
    v, src = res.values, res.sources
    assert (v.lr_g, v.lr_d, v.beta1, v.beta2, v.loss) == (2e-4, 2e-4, 0.5, 0.999, "ns")
    assert src["lr_g"].startswith("paper: Radford") and "beta1 0.5" in src["beta1"]
    assert (v.iterations, v.width, v.batch_real) == (1500, 16, 13) and src["iterations"].startswith("cpu: ")
    mnist = resolve_config("gan", "mnist", 10, "cpu").values
    assert (mnist.iterations, mnist.width) == (3000, 32)
    paper = resolve_config("gan", "mnist", 10, "paper").values
    assert (paper.iterations, paper.width) == (10000, 32)
    assert resolve_config("gan", "cifar100", 10, "paper").values.batch_real == 2
    with pytest.raises(ConfigError, match="filter_model='nosuch'"):
        resolve_config("gan", "digits", 2, "cpu", sets={"filter": "classifier", "filter_model": "nosuch"})
    with pytest.raises(ConfigError, match="loss='wgan'"):
        resolve_config("gan", "digits", 2, "cpu", sets={"loss": "wgan"})
    with pytest.raises(ConfigError, match="zca=true is not supported by gan"):
        resolve_config("gan", "digits", 2, "cpu", sets={"zca": "true"})


# ---------------------------------------------------------------------------------- pieces
def test_losses_follow_their_definitions():
    zero = torch.zeros(4)
    ln2 = math.log(2)
    assert float(gan_losses("ns", zero, zero, False)) == pytest.approx(2 * ln2)  # D at chance
    assert float(gan_losses("ns", None, zero, True)) == pytest.approx(ln2)
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert float(gan_losses("hinge", d_real, d_fake, False)) == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert float(gan_losses("hinge", None, d_fake, True)) == pytest.approx(1.5)
    expect = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-0.5))) / 2 + (math.log1p(math.exp(-3)) + ln2) / 2
    assert float(gan_losses("ns", d_real, d_fake, False)) == pytest.approx(expect)


def test_keep_best_takes_the_top_of_every_class_block():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9,   3.0, -1.0, 2.0, 0.0])  # 2 classes x 4 candidates
    assert keep_best(scores, 2, 4, 2).tolist() == [1, 3, 4, 6]  # ties by position, best first
    assert keep_best(scores, 2, 4, 1).tolist() == [1, 4]


def test_class_spread_is_the_per_class_standard_deviation():
    h = torch.tensor([[1.0], [3.0], [5.0], [5.0]]).view(4, 1, 1, 1)
    y = torch.tensor([0, 0, 1, 1])
    s = class_spread(h, y, 3).flatten()
    assert s[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-4) and s[2:].tolist() == pytest.approx([0, 0], abs=1e-3)


def test_generator_shapes_and_pixel_range_for_odd_sizes():
    info = DatasetInfo("odd", 3, (10, 7), 4, ("a", "b", "c", "d"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    g = build_generator(info, {"z_dim": 5, "width": 2, "embed_dim": 3})
    x = generate(g, torch.tensor([0, 1, 2, 3]), seed=9)
    assert x.shape == (4, 3, 10, 7)
    pixels = info.denormalize(x)
    assert torch.allclose(x, (pixels - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1),
                          atol=1e-5)  # inside [0, 1] already: denormalising clamps nothing
    assert torch.equal(x, generate(g, torch.tensor([0, 1, 2, 3]), seed=9)) and g.training
    d = Discriminator(3, 4, 2)
    assert d(x, torch.tensor([0, 1, 2, 3])).shape == (4,)


# ---------------------------------------------------------------------------------- training
def test_gan_trains_losses_finite_and_samples_change(digits):
    impl = _method("gan", digits, IPC, SMALL, seed=3)
    gen = make_generator(3)
    before = generate(impl.g, impl.hard_labels(), impl.sample_seed)
    d_before = [p.detach().clone() for p in impl.d.parameters()]
    first = impl.step(gen)
    # D starts at chance: 2 ln 2 for real/fake, ln 10 for the class head
    assert impl.metrics()["aux_real"] == pytest.approx(math.log(10), abs=0.05)
    assert first == pytest.approx(2 * math.log(2) + impl.metrics()["aux_real"], abs=0.05)
    history = [impl.metrics()]
    for _ in range(5):
        impl.step(gen)
        history.append(impl.metrics())
    for m in history:
        assert set(m) == {"loss_d", "loss_g", "d_real", "d_fake", "aux_real", "aux_fake"}
        assert all(math.isfinite(v) for v in m.values())
    after = generate(impl.g, impl.hard_labels(), impl.sample_seed)
    assert (after - before).abs().max() > 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(d_before, impl.d.parameters()))
    # the discriminator learns: after 6 updates it scores the real batch above the fake one
    assert history[-1]["d_real"] > history[-1]["d_fake"]
    assert history[-1]["aux_real"] < history[0]["aux_real"]  # ... and classifies real images better


def test_without_the_class_head_the_losses_are_the_plain_gan_losses(digits):
    impl = _method("gan", digits, IPC, {**SMALL, "aux_weight": "0", "loss": "hinge"}, seed=3)
    assert impl.step(make_generator(3)) == pytest.approx(2.0, abs=0.05)  # hinge at chance: 1 + 1


def test_run_folder_has_generator_grids_metrics_and_synset(gan_run, digits):
    out, res = gan_run
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_000003.png", "iter_000006.png"]
    grid = Image.open(out / "samples" / "iter_000006.png")
    assert grid.size == (3 * (32 + 2) + 2, 10 * (32 + 2) + 2)  # 3 samples x 10 classes, 8x8 upscaled to 32
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 7))
    assert all(r["loss"] == r["metrics"]["loss_d"] and math.isfinite(r["metrics"]["loss_g"]) for r in lines)
    assert all(math.isfinite(r["metrics"]["aux_fake"]) for r in lines)
    syn = SyntheticSet.load(out / "synset.safetensors")
    assert len(syn) == 30 and syn.label_kind == "hard" and syn.class_counts() == [3] * 10
    assert syn.labels.tolist() == torch.arange(10).repeat_interleave(3).tolist()
    assert syn.meta["gan"]["generator_file"] == GENERATOR_FILE and syn.meta["method"] == "gan"
    assert torch.equal(syn.images, res.synset.images)


# ---------------------------------------------------------------------------------- resume
def test_resume_after_kill_9_is_bit_exact(tmp_path, digits):
    full = _gan(tmp_path / "full", digits, 6, checkpoint_every=2)
    part = tmp_path / "part"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from tinyset.data import load_dataset
        from tinyset.methods.loop import distill
        def kill(it, total, loss, ev):
            if it == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        distill("gan", load_dataset("digits"), {IPC}, {str(part)!r}, preset="cpu", sets={SMALL!r},
                overrides={{"iterations": 6}}, seed=1, precision="fp32", checkpoint_every=2, on_iteration=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert load_checkpoint(part / "checkpoint.safetensors")[1]["iteration"] == 4
    resumed = _gan(part, digits, 6, checkpoint_every=2, resume=True)
    a, ha = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, hb = load_checkpoint(part / "checkpoint.safetensors")
    assert set(a) == set(b) and ha["optimizers"] == hb["optimizers"]
    for key in ("module.generator.fc.weight", "module.generator.bn0.running_mean", "module.discriminator.embed.weight",
                "optim.generator.0.exp_avg_sq", "optim.discriminator.0.exp_avg", "tensor.images", "generator"):
        assert key in a, key
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(full.synset.images, resumed.synset.images)
    g_full, _, _ = load_generator(tmp_path / "full" / GENERATOR_FILE)
    g_part, _, _ = load_generator(part / GENERATOR_FILE)
    for (k, v), (_, w) in zip(g_full.state_dict().items(), g_part.state_dict().items()):
        assert torch.equal(v, w), k
    lines = [json.loads(ln) for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 7))


# ---------------------------------------------------------------------------------- the synthetic set
@pytest.mark.parametrize("filter_", ["none", "discriminator", "classifier"])
def test_to_synset_gives_ipc_hard_labelled_images_per_class(digits, filter_):
    sets = {**SMALL, "filter": filter_, "candidates": "3", "filter_model": "mlp", "filter_epochs": "2",
            "filter_per_class": "20"}
    impl = _method("gan", digits, IPC, sets, seed=4)
    gen = make_generator(4)
    for _ in range(3):
        impl.step(gen)
    syn = impl.to_synset({"method": "gan"})
    assert syn.images.shape == (10 * IPC, 1, 8, 8) and syn.label_kind == "hard"
    assert syn.labels.tolist() == torch.arange(10).repeat_interleave(IPC).tolist()
    assert torch.equal(syn.images, impl.to_synset({}).images)  # seeded: the same set every time
    assert torch.equal(impl.tensors["images"], syn.images)
    assert syn.meta["gan"]["filter"] == filter_
    if filter_ == "none":
        assert torch.equal(syn.images, generate(impl.g, impl.hard_labels(), impl.sample_seed))
        return
    labels = torch.arange(10).repeat_interleave(IPC * 3)
    pool = generate(impl.g, labels, impl.sample_seed)
    scores = impl.scores(pool, labels).view(10, IPC * 3)
    kept = keep_best(scores.flatten(), 10, IPC * 3, IPC)
    assert torch.equal(syn.images, pool[kept])
    for c in range(10):  # every kept sample scores at least as high as every dropped one of its class
        block = scores[c]
        chosen = kept[c * IPC:(c + 1) * IPC] - c * IPC * 3
        dropped = [i for i in range(IPC * 3) if i not in chosen.tolist()]
        assert block[chosen].min() >= block[dropped].max()


def test_generator_file_round_trips(gan_run, digits):
    out, res = gan_run
    g, header, info = load_generator(out / GENERATOR_FILE)
    assert info == digits.info and header["iteration"] == 6 and header["format"] == "tinyset.generator"
    assert header["architecture"] == {"z_dim": 8, "width": 4, "embed_dim": 4} and not g.training
    state = load_checkpoint(out / "checkpoint.safetensors")[0]
    for k, v in g.state_dict().items():
        assert torch.equal(v, state[f"module.generator.{k}"]), k
    again = generate(g, torch.arange(10).repeat_interleave(3), header["sample_seed"])
    assert torch.equal(again, res.synset.images)  # the run's (unfiltered) set, regenerated from the file
    copy = out.parent / "copy.safetensors"
    save_generator(copy, g, info, header["architecture"], header["sample_seed"], 6)
    g2, h2, _ = load_generator(copy)
    assert h2["sample_seed"] == header["sample_seed"]
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g2.state_dict().values()))


# ---------------------------------------------------------------------------------- init from a file
def test_init_sources_are_a_registry():
    assert init_forms()[:2] == ["real", "noise"] and {"file:PATH", "gan:PATH"} <= set(init_forms())
    assert {"real", "noise", "file", "gan"} <= set(INITS.names())
    assert parse_init("file:a:b.safetensors") == ("file", "a:b.safetensors")
    assert parse_init("GAN:x") == ("gan", "x") and parse_init("real") == ("real", "")


def test_init_gan_gives_dm_exactly_the_generators_images(gan_run, digits):
    out, res = gan_run
    impl = _method("dm", digits, 3, {"init": f"gan:{out / GENERATOR_FILE}", "compile": "off"})
    assert torch.equal(impl.images.detach(), res.synset.images)  # same ipc: the GAN run's set
    g, header, _ = load_generator(out / GENERATOR_FILE)
    two = _method("dm", digits, 2, {"init": f"gan:{out / GENERATOR_FILE}", "compile": "off"}, seed=7)
    assert torch.equal(two.images.detach(), generate(g, torch.arange(10).repeat_interleave(2), header["sample_seed"]))


@pytest.mark.parametrize("method", ["dm", "dc", "dsa", "datadam"])
def test_init_file_gives_the_first_ipc_per_class(gan_run, digits, method):
    out, res = gan_run
    sets = {"init": f"file:{out / 'synset.safetensors'}", "model": "convnet-d2", "compile": "off"}
    impl = _method(method, digits, 2, sets)
    expect = res.synset.images.view(10, 3, 1, 8, 8)[:, :2].reshape(20, 1, 8, 8)
    assert torch.equal(impl.images.detach(), expect)


def test_init_file_works_for_mtt(tmp_path, gan_run, digits):
    from tinyset.experts import ExpertSettings, train_experts

    out, res = gan_run
    experts = tmp_path / "experts"
    train_experts(digits, experts, 1, "convnet-d1", ExpertSettings(epochs=2, members=1, lr=0.05, batch_size=256,
                                                                   compile=False), seed=1, model_args={"width": 4})
    sets = {"init": f"gan:{out / GENERATOR_FILE}", "experts": str(experts), "model": "convnet-d1",
            "max_start_epoch": "1", "expert_epochs": "1"}
    impl = _method("mtt", digits, 3, sets)
    assert torch.equal(impl.images.detach(), res.synset.images)


def test_init_file_converts_another_normalisation_exactly(tmp_path, digits):
    info = digits.info
    other = DatasetInfo(info.name, 1, info.image_size, 10, info.class_names, (0.5,), (0.25,))
    images = torch.randn(20, 1, 8, 8)
    SyntheticSet(images, torch.arange(10).repeat_interleave(2), other).save(tmp_path / "s.safetensors")
    impl = _method("dm", digits, 2, {"init": f"file:{tmp_path / 's.safetensors'}", "compile": "off"})
    pixels = images * 0.25 + 0.5
    assert torch.allclose(impl.images.detach(), (pixels - info.mean[0]) / info.std[0], atol=1e-6)


def test_the_loop_runs_dm_from_a_gan_file_and_records_it(tmp_path, gan_run, digits):
    out, res = gan_run
    spec = f"gan:{out / GENERATOR_FILE}"
    run = distill("dm", digits, 3, tmp_path / "dm", sets={"init": spec, "compile": "off", "batch_real": "8",
                                                          "model": "convnet-d1", "lr_img": "1e-6"},
                  overrides={"iterations": 1}, seed=0, precision="fp32")
    config = json.loads((tmp_path / "dm" / "config.json").read_text())
    assert config["config"]["init"] == spec and config["sources"]["init"] == "flag: --set init"
    assert not torch.equal(run.synset.images, res.synset.images)  # one DM step (of lr 1e-6) moved them
    assert torch.allclose(run.synset.images, res.synset.images, atol=1e-3)  # ... from the GAN's images
    init_png = np.asarray(Image.open(tmp_path / "dm" / "init.png"))
    gan_png = np.asarray(Image.open(out / "final.png"))
    assert init_png.shape == gan_png.shape and (init_png == gan_png).all()  # the DM run's init.png is the GAN run's final set


# ---------------------------------------------------------------------------------- bad input
def _files(tmp_path, digits, gan_run):
    out, res = gan_run
    few = tmp_path / "few.safetensors"
    SyntheticSet(res.synset.images[::3], torch.arange(10), digits.info).save(few)  # 1 image per class
    tiny = tiny_dataset()
    other = tmp_path / "other.safetensors"
    SyntheticSet(tiny.info.normalize(tiny.images[:6]), tiny.labels[:6], tiny.info).save(other)
    big = DatasetInfo("digits", 1, (16, 16), 10, digits.info.class_names, digits.info.mean, digits.info.std)
    shape = tmp_path / "shape.safetensors"
    SyntheticSet(torch.zeros(20, 1, 16, 16), torch.arange(10).repeat_interleave(2), big).save(shape)
    g, header, _ = load_generator(out / GENERATOR_FILE)
    gan_shape = tmp_path / "gan16.safetensors"
    save_generator(gan_shape, build_generator(big, header["architecture"]), big, header["architecture"], 1, 0)
    gan_other = tmp_path / "gan_tiny.safetensors"
    save_generator(gan_other, build_generator(tiny.info, header["architecture"]), tiny.info, header["architecture"], 1, 0)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {"few": few, "other": other, "shape": shape, "gan_shape": gan_shape, "gan_other": gan_other,
            "synset": out / "synset.safetensors", "text": text, "missing": tmp_path / "nope.safetensors"}


BAD = [
    ("file:{missing}", ArtifactError, ["{missing}", "no such file"]),
    ("file:{text}", ArtifactError, ["{text}", "not a valid safetensors file"]),
    ("file:{other}", ConfigError, ["{other}", "dataset 'tiny'", "this run distils 'digits'"]),
    ("file:{few}", ConfigError, ["{few}", "1 image(s) of class 0", "ipc=2"]),
    ("file:{shape}", ConfigError, ["{shape}", "[1, 16, 16]", "[1, 8, 8]"]),
    ("gan:{missing}", ArtifactError, ["{missing}", "no such file"]),
    ("gan:{synset}", ArtifactError, ["{synset}", "not a tinyset generator file"]),
    ("gan:{gan_other}", ConfigError, ["{gan_other}", "generator of dataset 'tiny'"]),
    ("gan:{gan_shape}", ConfigError, ["{gan_shape}", "[1, 16, 16]"]),
    ("select:nope", ConfigError, ["init=select:nope", "unknown selector 'nope'", "herding"]),
    ("select:mi,diversity=-1", ConfigError, ["init=select:mi,diversity=-1", "diversity"]),
    ("select:mi,colour=1", ConfigError, ["init=select:mi,colour=1", "colour"]),
    ("select:mi,oops", ConfigError, ["init=select:mi,oops", "expected select:METHOD[,KEY=VALUE...]"]),
    ("zeros", ConfigError, ["init='zeros'", "'real', 'noise', 'file:PATH', 'select:METHOD[,KEY=VALUE...]', "
                                            "'gan:PATH'"]),
    ("file:", ConfigError, ["init='file:'", "expected file:PATH"]),
    ("noise:x", ConfigError, ["init='noise:x'", "takes no argument"]),
]


@pytest.mark.parametrize("spec,error,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_init_is_refused_before_any_work(tmp_path, digits, gan_run, spec, error, needles):
    files = _files(tmp_path, digits, gan_run)
    spec = spec.format(**files)
    with pytest.raises(error) as exc:
        distill("dm", digits, 2, tmp_path / "run", sets={"init": spec}, overrides={"iterations": 1},
                precision="fp32")
    for n in needles:
        assert n.format(**files) in str(exc.value), str(exc.value)
    assert "init=" in str(exc.value) and "--set init" in str(exc.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec,error,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_init_exits_2_from_the_command_line(tmp_path, digits, gan_run, capsys, spec, error, needles):
    files = _files(tmp_path, digits, gan_run)
    spec = spec.format(**files)
    status = main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "2", "--init", spec,
                   "--out", str(tmp_path / "run"), "--final-eval", "off", "--threads", "1"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and "Traceback" not in captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinyset distill: error: init=")
    assert "--init" in lines[0]
    for n in needles:
        assert n.format(**files) in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_dataset_known_only_at_run_time_is_checked_when_the_run_starts(tmp_path, gan_run):
    out, _ = gan_run
    check_init(f"file:{out / 'synset.safetensors'}", "tiny", 2)  # "tiny" is no registered dataset: later
    with pytest.raises(ConfigError, match="of dataset 'digits'; this run distils 'tiny'"):
        distill("dm", tiny_dataset(), 2, tmp_path / "run", sets={"init": f"file:{out / 'synset.safetensors'}"},
                overrides={"iterations": 1}, precision="fp32")
    with pytest.raises(ConfigError, match="generator of dataset 'digits'"):
        distill("dm", tiny_dataset(), 2, tmp_path / "run", sets={"init": f"gan:{out / GENERATOR_FILE}"},
                overrides={"iterations": 1}, precision="fp32")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(format_version=9), "format version 9"),
    (lambda h: h.update(architecture={"z_dim": 8}), "architecture"),
    (lambda h: h.update(architecture={"z_dim": 8, "width": 5, "embed_dim": 4}), "do not fit"),
    (lambda h: h.update(sample_seed=-1), "sample_seed"),
    (lambda h: h.pop("info"), "dataset info"),
])
def test_a_damaged_generator_file_gives_a_clear_error(tmp_path, gan_run, edit, match):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, _ = gan_run
    with safe_open(str(out / GENERATOR_FILE), framework="pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header)
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"tinyset": json.dumps(header)})
    with pytest.raises(ArtifactError, match=match) as exc:
        load_generator(path)
    assert str(path) in str(exc.value)
    assert read_generator_header(out / GENERATOR_FILE)[1].name == "digits"


def test_distill_cli_trains_a_gan_and_dm_starts_from_it(tmp_path, capsys):
    run = tmp_path / "gan"
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    assert main(["distill", "--method", "gan", "--dataset", "digits", "--ipc", "1", "--iterations", "3",
                 "--out", str(run), "--final-eval", "off", "--precision", "fp32", "--threads", "1", *sets]) == 0
    assert (run / GENERATOR_FILE).is_file() and (run / "samples" / "iter_000003.png").is_file()
    assert main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
                 "--init", f"gan:{run / GENERATOR_FILE}", "--model", "convnet-d1", "--batch-real", "8",
                 "--set", "compile=off", "--out", str(tmp_path / "dm"), "--final-eval", "off",
                 "--precision", "fp32", "--threads", "1"]) == 0
    config = json.loads((tmp_path / "dm" / "config.json").read_text())
    assert config["sources"]["init"] == "flag: --init" and config["config"]["init"] == f"gan:{run / GENERATOR_FILE}"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "file:PATH" in text and "gan:PATH" in text  # --init lists the registered sources


# ---------------------------------------------------------------------------------- refine=project (MPS1 with GAN)
def test_project_finds_the_latent_of_a_generated_image():
    from tinyset.methods.gan import project

    info = DatasetInfo("toy", 1, (8, 8), 3, ("a", "b", "c"), (0.5,), (0.25,))
    g = build_generator(info, {"z_dim": 4, "width": 4, "embed_dim": 2})
    with torch.no_grad():  # weights large enough that the image depends on z (DCGAN's N(0, 0.02) barely does)
        gen = make_generator(0)
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    g.eval()
    labels = torch.tensor([0, 1, 2, 2, 1])
    with torch.no_grad():
        target = g(torch.randn(5, 4, generator=make_generator(1)), labels)
        start = g(torch.randn(5, 1, 4, generator=make_generator(2))[:, 0], labels)
    g.train()
    before = (start - target).pow(2).flatten(1).mean(1)
    images, err = project(g, target, labels, steps=150, lr=0.05, restarts=1, prior=0.0, seed=2)
    assert images.shape == target.shape and err.shape == (5,)
    assert torch.allclose(err, (images - target).pow(2).flatten(1).mean(1))
    assert float(err.mean()) < 0.2 * float(before.mean())  # the latents moved to the images
    assert g.training and all(p.requires_grad for p in g.parameters())  # the generator is left as it was
    more, err2 = project(g, target, labels, steps=150, lr=0.05, restarts=3, prior=0.0, seed=2)
    assert torch.allclose(err2, (more - target).pow(2).flatten(1).mean(1)) and float(err2.mean()) < 0.2 * float(before.mean())
    head, _ = project(g, target[:2], labels[:2], steps=150, lr=0.05, restarts=3, prior=0.0, seed=2)
    assert torch.allclose(head, more[:2], atol=1e-3)  # an image's result does not depend on the others (but rounding)


def test_refine_project_sets_the_projection_of_the_init_images(tmp_path, digits):
    from tinyset.methods.gan import project
    from tinyset.select import select

    sel = tmp_path / "sel.safetensors"
    select("random", digits, IPC, seed=3).synset.save(sel)
    sets = {**SMALL, "refine": "project", "refine_steps": "4", "init": f"file:{sel}"}
    impl = _method("gan", digits, IPC, sets, seed=4)
    chosen = SyntheticSet.load(sel)
    assert torch.equal(impl._targets, chosen.images)  # the init images are the targets
    assert torch.equal(impl.to_synset({}).images, generate(impl.g, impl.hard_labels(), impl.sample_seed))
    gen = make_generator(4)
    for _ in range(2):
        impl.step(gen)
    syn = impl.to_synset({"method": "gan"})
    want, err = project(impl.g, chosen.images, impl.hard_labels(), steps=4, lr=0.05, restarts=2, prior=0.01,
                        seed=impl.refine_seed)
    assert torch.equal(syn.images, want) and syn.labels.tolist() == impl.hard_labels().tolist()
    g = syn.meta["gan"]
    assert g["refine"] == "project" and g["refined_from"] == f"file:{sel}"
    assert g["refine_mean_pixel_error"] == pytest.approx(float(err.mean()))
    with pytest.raises(ConfigError, match="refine=project and filter=discriminator exclude each other"):
        _method("gan", digits, IPC, {**sets, "filter": "discriminator"})


def test_a_refined_run_records_it_and_its_final_set_is_projected(tmp_path, digits):
    res = _gan(tmp_path / "run", digits, 3, sets={"refine": "project", "refine_steps": 3, "refine_restarts": 1})
    syn = SyntheticSet.load(tmp_path / "run" / "synset.safetensors")
    assert syn.meta["gan"]["refine"] == "project" and syn.meta["gan"]["refined_from"] == "real"
    assert math.isfinite(syn.meta["gan"]["refine_mean_pixel_error"]) and torch.equal(syn.images, res.synset.images)
    assert syn.meta["gan"]["refine_seconds"] > 0
    g, header, _ = load_generator(tmp_path / "run" / GENERATOR_FILE)
    plain = SyntheticSet.load(tmp_path / "run" / "samples.safetensors")  # the unrefined set of the same generator
    assert torch.equal(plain.images, generate(g, plain.labels, header["sample_seed"]))
    assert plain.meta["gan"]["refine"] == "none" and not torch.equal(plain.images, syn.images)
    assert not (tmp_path / "plain").exists() and not _gan(tmp_path / "plain", digits, 1).synset is None
    assert not (tmp_path / "plain" / "samples.safetensors").exists()  # only refined runs write it


def test_a_refined_run_resumes_to_the_same_set(tmp_path, digits):
    sets = {"refine": "project", "refine_steps": 3, "refine_restarts": 1}
    full = _gan(tmp_path / "full", digits, 4, sets=sets)
    _gan(tmp_path / "part", digits, 2, sets=sets, checkpoint_every=1)
    resumed = _gan(tmp_path / "part", digits, 4, sets=sets, checkpoint_every=1, resume=True)
    assert torch.equal(full.synset.images, resumed.synset.images)  # same targets, generator and projection


def test_bench_gan_runs_and_reports(tmp_path):
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_gan.py")
    out = tmp_path / "b.json"
    cmd = [sys.executable, bench, "--dataset", "digits", "--ipc", "2", "--iterations", "2", "--warmup", "0",
           "--threads", "1", "--precision", "fp32", "--json", str(out), "--set", "width=4", "--set", "z_dim=8",
           "--set", "embed_dim=4", "--set", "refine_steps=5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "CPU:" in run.stdout and "GAN iteration" in run.stdout and "projection of 20 images" in run.stdout
    rec = json.loads(out.read_text())
    assert rec["projection"]["images"] == 20 and rec["iteration"]["cpu_s_per_iteration"] > 0
    assert "against reference" in run.stdout and rec["iteration"]["reference_cpu_s_per_iteration"] > 0
    assert rec["iteration"]["speedup_vs_reference"] > 0
    assert math.isfinite(rec["projection"]["mean_pixel_error"])
