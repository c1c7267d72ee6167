"""The distiller contract, exercised by a toy method that exists only in this file.

The toy learns three tensors (images, soft-label logits, a scalar learning rate) with two optimisers
(SGD with momentum for the images, Adam for labels and lr). Nothing outside this file knows it:
the loop must checkpoint, resume and export it through the contract alone.
"""
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from tinyset.errors import ConfigError
from tinyset.hparams import parse_sets
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.methods.loop import distill, load_checkpoint, resolve_config
from tinyset.synset import SyntheticSet

TOY = "zz-contract-toy"


@dataclass
class ToyConfig(DistillConfig):
    iterations: int = hp(6, "outer iterations", ge=1)
    lr_img: float = hp(0.05, "learning rate of the images", gt=0)
    lr_meta: float = hp(0.01, "Adam learning rate of the labels and the lr", gt=0)
    temperature: float = hp(2.0, "softmax temperature of the labels", gt=0)


class ToyMethod(Distiller):
    name = TOY
    Config = ToyConfig
    paper = Table((Row({"batch_real": 8}, "test table"), Row({"lr_meta": 0.02}, "test ipc-2 row", ipcs=(2,))))
    cpu_rule = Rule("test rule: 4 iterations", lambda values, dataset, ipc: {"iterations": 4})

    def setup(self, gen):
        super().setup(gen)  # images + their SGD optimiser
        k = self.info.num_classes
        logits = self.learnable("label_logits", 3.0 * F.one_hot(self.hard_labels(), k).float())
        lr = self.learnable("lr", torch.tensor(0.01))
        self.optimizer("meta", torch.optim.Adam([logits, lr], lr=self.cfg.lr_meta))

    def step(self, gen):
        k, ipc = self.info.num_classes, self.ipc
        real, labels = self.pool.sample_classes(self.cfg.batch_real, gen)
        noise = 0.1 * torch.randn(self.images.shape, generator=gen)
        target = real.view(k, -1, *real.shape[1:]).mean(1).repeat_interleave(ipc, 0)
        soft = F.softmax(self.tensors["label_logits"] / self.cfg.temperature, dim=1)
        fit = ((self.images + noise - target) ** 2).mean()
        label_loss = -(soft * F.log_softmax(torch.ones_like(soft) * self.tensors["lr"], 1)).sum(1).mean()
        loss = fit * (1 + self.tensors["lr"]) + label_loss
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        for opt in self.optimizers.values():
            opt.step()
        return float(loss.detach()) / k

    def to_synset(self, meta):
        soft = F.softmax(self.tensors["label_logits"].detach() / self.cfg.temperature, dim=1)
        return SyntheticSet(self.images.detach().cpu(), soft.cpu(), self.info,
                            lr=float(self.tensors["lr"].detach()), meta=meta,
                            extras={"label_logits": self.tensors["label_logits"].detach().cpu()})


if TOY not in METHODS:
    METHODS.register(TOY, ToyMethod, help="test-only toy method")


def _toy(tmp_path, name, iterations, **kw):
    return distill(TOY, tiny_dataset(), 2, tmp_path / name, preset="cpu", overrides={"iterations": iterations},
                   seed=3, precision="fp32", **kw)


def test_toy_resume_is_bit_exact_for_every_tensor_and_optimiser_state(tmp_path):
    full = _toy(tmp_path, "full", 6, checkpoint_every=1)
    _toy(tmp_path, "part", 3, checkpoint_every=1)
    resumed = _toy(tmp_path, "part", 6, resume=True)
    a, ha = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, hb = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert ha["iteration"] == hb["iteration"] == 6
    assert set(a) == set(b)
    # every declared tensor, both optimisers' states (SGD momentum, Adam moments) and the generator
    for key in ("tensor.images", "tensor.label_logits", "tensor.lr", "optim.images.0.momentum_buffer",
                "optim.meta.0.exp_avg", "optim.meta.0.exp_avg_sq", "optim.meta.1.exp_avg", "generator"):
        assert key in a, key
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ha["optimizers"] == hb["optimizers"]  # Adam's step counts, param groups
    assert torch.equal(full.synset.images, resumed.synset.images)
    assert torch.equal(full.synset.labels, resumed.synset.labels) and full.synset.lr == resumed.synset.lr


def test_toy_artifact_carries_images_soft_labels_and_lr(tmp_path):
    res = _toy(tmp_path, "run", 4)
    loaded = SyntheticSet.load(tmp_path / "run" / "synset.safetensors")
    assert loaded.label_kind == "soft" and loaded.labels.shape == (6, 3)
    assert loaded.lr is not None and loaded.lr != 0.01  # learned: moved from its initial value
    assert torch.equal(loaded.extras["label_logits"], res.synset.extras["label_logits"])
    assert torch.allclose(loaded.labels.sum(1), torch.ones(6))
    assert not torch.equal(loaded.labels, F.one_hot(res.synset.hard_labels(), 3).float())


def test_toy_config_layers_and_provenance(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text("temperature = 4.0\nlr_meta = 0.5\n")
    res = resolve_config(TOY, "tiny", 2, "cpu", config_file=toml, sets=parse_sets(["lr_meta=0.25"]),
                         flags={"lr_img": 0.5})
    v, src = res.values, res.sources
    assert (v.batch_real, v.iterations, v.temperature, v.lr_meta, v.lr_img) == (8, 4, 4.0, 0.25, 0.5)
    assert src["batch_real"] == "paper: test table" and src["iterations"] == "cpu: test rule: 4 iterations"
    assert src["temperature"] == f"file: {toml}" and src["lr_meta"] == "flag: --set lr_meta"
    assert src["lr_img"] == "flag: --lr-img" and src["momentum_img"] == "default"
    assert resolve_config(TOY, "tiny", 1, "paper").values.lr_meta == 0.01  # the ipc-2 row does not apply
    _toy(tmp_path, "run", 2)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["sources"]["iterations"] == "flag: --iterations" and written["config"]["temperature"] == 2.0


@pytest.mark.parametrize("text,match", [
    ("temperature = -1\n", "temperature=-1"), ("nosuch = 1\n", "unknown setting"),
    ("temperature = 'hot'\n", "temperature='hot'"), ("[section]\na = 1\n", "tables"), ("x = = 1\n", "not valid TOML"),
])
def test_config_file_errors_name_file_field_and_value(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        resolve_config(TOY, "tiny", 2, "cpu", config_file=f)
    assert str(f) in str(exc.value)


def test_set_parsing_and_conflicts():
    assert parse_sets(["a=1", "b-c=x=y"]) == {"a": "1", "b_c": "x=y"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["novalue"])
    with pytest.raises(ConfigError, match="given both"):
        resolve_config(TOY, "tiny", 2, "cpu", sets={"lr_img": "1"}, flags={"lr_img": 2.0})
    with pytest.raises(ConfigError, match="nan"):
        resolve_config(TOY, "tiny", 2, "cpu", sets={"lr_img": "nan"})


def test_resume_with_changed_settings_is_refused(tmp_path):
    _toy(tmp_path, "run", 2)
    with pytest.raises(ConfigError, match="temperature"):
        distill(TOY, tiny_dataset(), 2, tmp_path / "run", preset="cpu", overrides={"iterations": 4},
                sets={"temperature": "3"}, seed=3, precision="fp32", resume=True)


def test_loop_names_no_method():
    """The loop and the contract must not special-case any method by name."""
    import inspect

    from tinyset.methods import base, loop

    for mod in (loop, base):
        # "dsa" is also the name of an evaluation protocol (the final_eval setting)
        lines = [ln for ln in inspect.getsource(mod).splitlines() if "choices=" not in ln and "final_eval" not in ln]
        for name in METHODS.names():
            if name == TOY:
                continue
            hits = [ln for ln in lines if f'"{name}"' in ln or f"'{name}'" in ln]
            assert not hits, (mod.__name__, name, hits)


def test_resume_drops_a_torn_metrics_line_and_cleans_orphan_temps(tmp_path):
    _toy(tmp_path, "run", 3, checkpoint_every=1)
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')  # kill -9 mid-write
    from tinyset.files import _host_tag

    orphan = run / f".checkpoint.safetensors.999999999-{_host_tag()}.deadbeef.tinyset-tmp"  # a dead writer's
    orphan.write_text("partial")
    _toy(tmp_path, "run", 5, resume=True)
    assert not orphan.exists()
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5]


def test_a_second_writer_of_one_run_folder_is_refused(tmp_path):
    from tinyset.errors import LockedError
    from tinyset.files import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(LockedError, match=str(tmp_path / "run")):
            _toy(tmp_path, "run", 2)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    _toy(tmp_path, "run", 2)  # free again


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.pop("optimizers"), "optimizers"), (lambda h: h.update(iteration="7"), "iteration"),
    (lambda h: h.update(iteration=-1), "negative"), (lambda h: h.update(format_version=1), "format version"),
    (lambda h: h.update(format="other"), "not a tinyset checkpoint"), (lambda h: h.update(config=[]), "config"),
])
def test_hand_edited_checkpoint_header_gives_a_clear_error(tmp_path, edit, match):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tinyset.errors import ArtifactError

    _toy(tmp_path, "run", 2)
    path = tmp_path / "run" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header)
    save_file(tensors, str(path), metadata={"tinyset": json.dumps(header)})
    with pytest.raises(ArtifactError, match=match):
        _toy(tmp_path, "run", 4, resume=True)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    from tinyset.errors import ArtifactError

    _toy(tmp_path, "run", 2)
    data = tiny_dataset(num_classes=4)  # same name, one class more: the images do not fit
    with pytest.raises((ArtifactError, ConfigError)):
        distill(TOY, data, 2, tmp_path / "run", preset="cpu", overrides={"iterations": 4}, seed=3,
                precision="fp32", resume=True)


@pytest.mark.parametrize("key,value,match", [
    ("iterations", "9" * 400, "iterations="), ("iterations", 2**60, "limited"), ("lr_img", 1e300, "float32"),
    ("lr_img", "1e400", "NaN and infinity"), ("batch_real", 10**9, "65536"),
])
def test_huge_values_are_refused_not_overflowed(key, value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(TOY, "tiny", 2, "cpu", sets={key: value})


def test_resume_without_a_checkpoint_creates_nothing(tmp_path):
    from tinyset.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no checkpoint"):
        _toy(tmp_path, "never", 2, resume=True)
    assert not (tmp_path / "never").exists()


def test_artifact_and_checkpoint_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        _toy(tmp_path, "run", 1)
    finally:
        os.umask(old)
    for name in ("synset.safetensors", "checkpoint.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
