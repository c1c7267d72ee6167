"""Real batches go through a network in chunks on a CPU (Distiller.forward_real): the same function,
split only where no layer mixes images (BatchNorm does)."""
import pytest
import torch

import tinyset.runtime as runtime
from conftest import tiny_dataset
from tinyset.augment import DSA
from tinyset.data import RealPool
from tinyset.methods import METHODS
from tinyset.methods.base import DistillContext
from tinyset.methods.loop import resolve_config
from tinyset.rng import make_generator


def _method(name, model="convnet-w32", ipc=2, batch_real=7, device="cpu"):
    data = tiny_dataset()
    cfg = resolve_config(name, "tiny", ipc, "cpu", sets={"model": model, "batch_real": batch_real,
                                                         "compile": "off"}).values
    m = METHODS.get(name)(cfg, DistillContext(data.info, RealPool(data), ipc, torch.device(device), "fp32",
                                              DSA("color_crop_cutout_flip_scale_rotate")))
    m.setup(make_generator(0))
    return m, data


def _counting(fn):
    calls = []

    def wrapped(x):
        calls.append(len(x))
        return fn(x)
    return wrapped, calls


def test_chunk_rule_per_device():
    assert runtime.forward_chunk("cpu") == runtime.CPU_FORWARD_CHUNK
    assert runtime.forward_chunk("cuda") is None


@pytest.mark.parametrize("name", ["dm", "datadam"])
def test_chunks_compute_the_same_outputs(monkeypatch, name):
    m, data = _method(name)
    x = data.images[:20].float()
    fn = m.embed if name == "dm" else m.features
    whole = fn(x)
    monkeypatch.setattr(runtime, "CPU_FORWARD_CHUNK", 6)
    counted, calls = _counting(fn)
    parts = m.forward_real(counted, x, m.net)
    assert calls == [6, 6, 6, 2]
    flat_w = whole if isinstance(whole, torch.Tensor) else torch.cat([t.flatten(1) for t in [*whole[0], whole[1]]], 1)
    flat_p = parts if isinstance(parts, torch.Tensor) else torch.cat([t.flatten(1) for t in [*parts[0], parts[1]]], 1)
    assert flat_p.shape == flat_w.shape
    torch.testing.assert_close(flat_p, flat_w, rtol=1e-5, atol=1e-6)


def test_batchnorm_networks_take_the_batch_whole(monkeypatch):
    m, data = _method("dm", model="convnet-bn")
    monkeypatch.setattr(runtime, "CPU_FORWARD_CHUNK", 6)
    counted, calls = _counting(m.embed)
    m.forward_real(counted, data.images[:20].float(), m.net)
    assert calls == [20]


def test_dm_step_loss_does_not_depend_on_the_chunk(monkeypatch):
    runs = []
    for chunk in (1000, 3):
        monkeypatch.setattr(runtime, "CPU_FORWARD_CHUNK", chunk)
        m, _ = _method("dm")
        g = make_generator(1)
        runs.append(([m.step(g) for _ in range(2)], m.images.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)


def test_members_share_the_chunk():
    assert runtime.forward_chunk("cpu", members=1) == 32
    assert runtime.forward_chunk("cpu", members=5) == 6
    assert runtime.forward_chunk("cpu", members=100) == 1


@pytest.mark.parametrize("compile", [False, True])
def test_test_pass_in_chunks_scores_the_same(monkeypatch, compile):
    from tinyset.models import create_model
    from tinyset.training import test_accuracy

    net = create_model("convnet-w32", 1, 4, 12, members=3, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 12, 12, generator=g), torch.randint(0, 4, (50,), generator=g)
    whole = test_accuracy(net, x, y, batch_size=1000)
    sizes = []
    real_forward = net.forward
    monkeypatch.setattr(net, "forward", lambda t: (sizes.append(len(t)), real_forward(t))[1])
    chunked = test_accuracy(net, x, y, compile=compile)  # 11 images per pass for 3 members
    assert chunked == pytest.approx(whole, abs=1e-12)
    if not compile:  # a compiled graph does not call forward again; the padding is seen by its size
        assert sizes == [11, 11, 11, 11, 6]
