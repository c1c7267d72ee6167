"""DataDAM: the attention map, the matching loss, its batched computation against a per-class
hook-based loop, optimisation, resume, the BatchNorm variant and the configuration."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_dataset
from tinyset.augment import DSA
from tinyset.cli import main
from tinyset.data import RealPool
from tinyset.errors import ConfigError
from tinyset.methods.base import DistillContext
from tinyset.methods.datadam import DataDAM, attention_map
from tinyset.methods.loop import distill, resolve_config
from tinyset.models import create_model
from tinyset.models.layers import init_parameters
from tinyset.rng import derive_seed, make_generator


def _method(model="convnet-w32", ipc=2, batch_real=5, seed=0, **over):
    data = tiny_dataset()
    flags = {"model": model, "batch_real": batch_real, "compile": "off", **over}
    cfg = resolve_config("datadam", "tiny", ipc, "cpu", sets=flags).values
    m = DataDAM(cfg, DistillContext(data.info, RealPool(data), ipc, torch.device("cpu"), "fp32",
                                    DSA("color_crop_cutout_flip_scale_rotate")))
    m.setup(make_generator(seed))
    return m


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ definition
_F0 = torch.tensor([[[1., -2.], [0., 1.]],
                    [[0., 1.], [2., 0.]],
                    [[1., 0.], [0., -1.]]])  # [C=3, H=2, W=2]


@pytest.mark.parametrize("p,sums", [(1, [2, 3, 2, 2]), (2, [2, 5, 4, 2]), (3, [2, 9, 8, 2]), (4, [2, 17, 16, 2])])
def test_attention_map_is_normalised_channel_sum_of_abs_power(p, sums):
    f = torch.stack([_F0, 3 * _F0, torch.zeros_like(_F0)])  # a scaled copy and an all-zero image
    a = attention_map(f, p)
    want = torch.tensor(sums, dtype=torch.float32) / math.sqrt(sum(s * s for s in sums))
    assert a.shape == (3, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a[0], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(a[1], want, rtol=1e-6, atol=0)  # invariant to the scale of the features
    assert torch.equal(a[2], torch.zeros(4))  # no activation: a zero map, not NaN
    assert float(a[0].norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("model", ["convnet-w32", "convnet-np", "convnet-d1", "convnet-bn"])
def test_block_outputs_are_the_activation_outputs_then_the_embedding(model):
    net = create_model(model, 1, 3, (8, 8), seed=1)
    x = torch.randn(4, 1, 8, 8, generator=make_generator(2))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o)) for m in net.features if isinstance(m, nn.ReLU)]
    emb = net.embed(x)
    for h in hooks:
        h.remove()
    outs = net.block_outputs(x)
    assert len(outs) == net.config["depth"] + 1 == len(seen) + 1
    for got, want in zip(outs, seen):
        assert torch.equal(got, want)
    assert torch.equal(outs[-1], emb)


# ------------------------------------------------------------------------------------ the loss
def test_loss_is_zero_for_equal_features_and_positive_otherwise():
    m = _method(ipc=2, batch_real=2)
    init_parameters(m.net, make_generator(4))
    x = torch.cat([m.pool.sample_class(c, 2, make_generator(5)) for c in range(3)])
    assert float(m.matching_loss(x, x.clone())) == 0.0
    other = x.flip(0)  # other classes' images in every class slot
    assert float(m.matching_loss(x, other)) > 1e-3
    m.cfg.task_balance = 0.0  # the attention term alone
    assert float(m.matching_loss(x, other)) > 1e-3
    m.cfg.task_balance = 0.01
    m.blocks = ()  # the embedding term alone
    m.features = m.feature_function()
    assert float(m.matching_loss(x, other)) > 1e-3


def _reference_step(m, images0, gen, per_class):
    """The step written the reference's way: hooks on the ReLUs, attention of every hooked layer but
    the last, fp32, either one forward per class or (per_class=False, upstream's layout for its
    BatchNorm net) one forward for all real and one for all synthetic images. Same random draws as
    DataDAM.step: network seed, real batches, one DSA draw for all classes (siamese groups)."""
    k, ipc, b, cfg = m.info.num_classes, m.ipc, m.cfg.batch_real, m.cfg
    net = create_model(cfg.model, m.info.channels, k, m.info.image_size)
    init_parameters(net, make_generator(derive_seed(gen)))
    net.requires_grad_(False)
    net.train()
    real, _ = m.pool.sample_classes(b, gen)
    groups = torch.cat([torch.arange(k).repeat_interleave(b), torch.arange(k).repeat_interleave(ipc)])
    prm = m.augment.sample(len(groups), m.info.image_size, gen, op_groups=groups, param_groups=groups)
    syn = images0.clone().requires_grad_(True)
    reals = [m.augment.apply(real[c * b:(c + 1) * b], prm.rows(c * b, (c + 1) * b)) for c in range(k)]
    syns = [m.augment.apply(syn[c * ipc:(c + 1) * ipc], prm.rows(k * b + c * ipc, k * b + (c + 1) * ipc))
            for c in range(k)]
    sets = list(zip(reals, syns)) if per_class else [(torch.cat(reals), torch.cat(syns))]
    store = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: store.append(o.clone()))
             for mod in net.features if isinstance(mod, nn.ReLU)]

    def attention(f):
        return F.normalize((f.abs() ** cfg.power).sum(1).reshape(f.shape[0], -1), p=2.0, dim=1)

    def means(t, n_classes):
        return t.reshape(n_classes, -1, t.shape[1]).mean(1)

    loss = torch.zeros(())
    for r, s in sets:
        kk = 1 if per_class else k
        store.clear()
        with torch.no_grad():
            er = net.embed(r)
        fr = list(store)
        store.clear()
        es = net.embed(s)
        fs = list(store)
        for a, z in zip(fr[:-1], fs[:-1]):
            loss = loss + cfg.loss_scale * ((means(attention(a), kk) - means(attention(z), kk)) ** 2).sum()
        loss = loss + cfg.loss_scale * cfg.task_balance * ((means(er, kk) - means(es, kk)) ** 2).sum()
    for h in hooks:
        h.remove()
    loss.backward()
    return float(loss.detach()) / k, syn.grad


@pytest.mark.parametrize("model,power,per_class", [
    ("convnet-w32", 4.0, True),   # InstanceNorm: per-class forwards compute the same function
    ("convnet-w32", 1.0, True),
    ("convnet-bn", 1.0, False),   # BatchNorm: batch statistics per set, as upstream's single forwards
])
def test_batched_step_equals_reference_style_loop(model, power, per_class):
    m = _method(model=model, ipc=2, batch_real=5, power=power)
    images0 = m.images.detach().clone()
    loss = m.step(make_generator(11))
    ref_loss, ref_grad = _reference_step(m, images0, make_generator(11), per_class)
    assert ref_loss > 0
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    grad = m.images.grad
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    # the first SGD step with momentum is a plain gradient step
    # (the tolerance carries the gradient's over lr_img: summation order differs between CPU kernels)
    torch.testing.assert_close(m.images.detach(), images0 - m.cfg.lr_img * ref_grad, rtol=1e-5,
                               atol=1e-6 + m.cfg.lr_img * 1e-5 * float(ref_grad.abs().max()))


def test_batchnorm_per_class_forwards_would_differ():
    """Why the BatchNorm variant keeps one forward per set: per-class batch statistics change the loss."""
    m = _method(model="convnet-bn", ipc=2, batch_real=5)
    images0 = m.images.detach().clone()
    loss = m.step(make_generator(11))
    per_class, _ = _reference_step(m, images0, make_generator(11), per_class=True)
    assert abs(loss - per_class) > 1e-3 * abs(per_class)


# ------------------------------------------------------------------------------------ runs
def _run(tmp_path, name="run", iterations=4, ipc=2, data=None, checkpoint_every=50, resume=False, **over):
    over = {"model": "convnet-d2", "batch_real": 8, "iterations": iterations, **over}
    return distill("datadam", data or tiny_dataset(), ipc, tmp_path / name, preset="cpu", overrides=over, seed=1,
                   precision="fp32", checkpoint_every=checkpoint_every, resume=resume).synset


@pytest.mark.slow
def test_matching_loss_decreases(tmp_path):
    _run(tmp_path, iterations=30, data=tiny_dataset(per_class=30), init="noise", batch_real=16)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_resume_is_bit_exact(tmp_path):
    full = _run(tmp_path, "full", iterations=6)
    _run(tmp_path, "part", iterations=3, checkpoint_every=1)
    resumed = _run(tmp_path, "part", iterations=6, resume=True)
    assert torch.equal(full.images, resumed.images)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")


def test_model_convnet_bn_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "bn"
    assert main(["distill", "--method", "datadam", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
                 "--batch-real", "8", "--model", "convnet-bn", "--out", str(out), "--final-eval", "off",
                 "--precision", "fp32"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["config"]["model"] == "convnet-bn" and written["sources"]["model"] == "flag: --model"
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (out / "synset.safetensors").exists()
    m = _method(model="convnet-bn")
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.net.modules()) and m.net.training


# ------------------------------------------------------------------------------------ configuration
def test_paper_preset_values_and_sources():
    res = resolve_config("datadam", "mnist", 10, "paper")
    v, src = res.values, res.sources
    assert (v.iterations, v.lr_img, v.momentum_img, v.batch_real, v.init) == (8000, 1.0, 0.5, 64, "real")
    assert (v.power, v.task_balance, v.loss_scale, v.attn_layers, v.model) == (4.0, 0.01, 100.0,
                                                                                   "intermediate", "convnet")
    for key in ("iterations", "batch_real", "power", "task_balance", "model", "lr_img"):
        assert src[key].startswith("paper:") and "DataDAM" in src[key], key
    # the code/paper mismatches are named in the row's source
    assert "p = 1" in src["power"] and "20000" in src["iterations"] and "BatchNorm" in src["model"]
    big = resolve_config("datadam", "cifar10", 100, "paper")
    assert big.values.lr_img == 10.0 and "ipc > 50" in big.sources["lr_img"]
    assert resolve_config("datadam", "cifar10", 50, "paper").values.lr_img == 1.0


def test_cpu_rule_and_overrides():
    cpu = resolve_config("datadam", "mnist", 10, "cpu")
    assert cpu.values.iterations == 500 and cpu.values.final_eval == "quick"
    assert cpu.sources["iterations"].startswith("cpu: 2-core CPU budget") and "s per iteration" in cpu.sources["iterations"]
    assert resolve_config("datadam", "digits", 10, "cpu").values.iterations == 1000
    mine = resolve_config("datadam", "mnist", 10, "cpu", sets={"power": "1", "lr_img": "0.5"},
                          flags={"model": "convnet-bn"})
    assert (mine.values.power, mine.values.lr_img, mine.values.model) == (1.0, 0.5, "convnet-bn")
    assert mine.sources["lr_img"] == "flag: --set lr_img" and mine.sources["model"] == "flag: --model"


@pytest.mark.parametrize("sets,match", [
    ({"model": "mlp"}, "ConvNet"), ({"model": "convnet-d1"}, "attn_layers"),
    ({"power": "0"}, "power"), ({"task_balance": "-1"}, "task_balance"), ({"attn_layers": "first"}, "first"),
])
def test_bad_settings_are_refused(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("datadam", "mnist", 10, "cpu", sets=sets)


def test_one_block_network_with_all_layers_is_allowed():
    res = resolve_config("datadam", "mnist", 10, "cpu", sets={"model": "convnet-d1", "attn_layers": "all"})
    assert res.values.attn_layers == "all"
