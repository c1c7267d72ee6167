"""DC/DSA: the batched per-class gradients equal the class-by-class computation.

The batched pass runs all classes through one ``members=K`` replica of the network; the reference
computation is the upstream loop (one forward/backward per class), written out here on the same
network, the same (augmented) images and the same weights. Loss and image gradients must agree to
1e-5 relative, for InstanceNorm and frozen-BatchNorm ConvNets, with and without DSA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from tinyset.augment import DSA
from tinyset.data import RealPool
from tinyset.methods import METHODS
from tinyset.methods.base import DistillContext
import tinyset.methods.dc as dc
from tinyset.methods.dc import DISTANCES, class_batching, class_distance, classes_per_pass, distance_layerwise
from tinyset.methods.loop import resolve_config
from tinyset.models import create_model
from tinyset.rng import make_generator

K, IPC, BATCH_REAL = 3, 2, 5


def _distiller(method: str, norm: str, distance: str = "layerwise", channels: int = 2, k: int = K):
    data = tiny_dataset(num_classes=k, per_class=12, channels=channels, size=8)
    pool = RealPool(data)
    aug = DSA("color_crop_cutout_flip_scale_rotate") if method == "dsa" else None
    cfg = resolve_config(method, "tiny", IPC, "cpu", flags={"model": "convnet-d2", "batch_real": BATCH_REAL,
                                                             "distance": distance, "init": "noise",
                                                             "outer_loop": 2, "inner_loop": 2,
                                                             "compile": "off"}).values
    d = METHODS.get(method)(cfg, DistillContext(data.info, pool, IPC, torch.device("cpu"), "fp32", aug))
    d.setup(make_generator(0))
    # depth 2, tiny images; "convnet-bn" is depth 3 by name, so the network is swapped for a depth-2 one
    name = "convnet-d2" if norm == "instancenorm" else "convnet-bn"
    d.net = create_model(name, channels, k, (8, 8), depth=2, seed=5)
    return d


def _per_class_loss(d, reals, syns) -> torch.Tensor:
    """The upstream computation: for every class one forward/backward on the real batch and one on
    the synthetic images (with the graph), the layer-wise distance, summed over classes."""
    net = d.net
    params = [m.weight for m in net.modules() if type(m).__name__ in ("Conv2d", "Linear")]
    if d.cfg.distance not in ("layerwise", "ours"):
        params = list(net.parameters())
    loss = torch.zeros(())
    for c, (real, syn) in enumerate(zip(reals, syns)):
        g_real = torch.autograd.grad(F.cross_entropy(net(real), torch.full((real.shape[0],), c)), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn), torch.full((syn.shape[0],), c)), params,
                                    create_graph=True)
        loss = loss + DISTANCES[d.cfg.distance](list(g_syn), [g.detach() for g in g_real])
    return loss


def _loss_and_image_grad(d, compute, seed: int = 11):
    """``compute(reals, syns)`` on the class batches drawn from a fixed seed (so that every
    computation sees the same DSA parameters), and the gradient of the result w.r.t. the images."""
    reals, syns = d.class_batches(make_generator(seed))
    loss = compute(reals, syns)
    (grad,) = torch.autograd.grad(loss, d.images)
    return loss.detach(), grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["dc", "dsa"])
@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_batched_gradients_equal_per_class(method, norm):
    d = _distiller(method, norm)
    d.net.train()
    if norm == "batchnorm":
        d._set_bn_stats(d.net, make_generator(3))  # running statistics from real images, then frozen
        bns = [m for m in d.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not any(m.training for m in bns)
        assert float(bns[0].running_var.sub(1).abs().max()) > 1e-3  # the statistics really moved
    ref_loss, ref_grad = _loss_and_image_grad(d, lambda r, s: _per_class_loss(d, r, s))
    assert float(ref_loss) > 0.1 and float(ref_grad.abs().max()) > 0  # not a vacuous comparison
    for batched_real in (True, False):
        for batched_syn in (True, False):
            loss, grad = _loss_and_image_grad(
                d, lambda r, s: d.matching_loss(r, s, batched_real=batched_real, batched_syn=batched_syn))
            assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (batched_real, batched_syn)
            assert _rel(grad, ref_grad) <= 1e-5, (batched_real, batched_syn, _rel(grad, ref_grad))


@pytest.mark.parametrize("distance", ["mse", "cos"])
def test_batched_equals_per_class_for_other_distances(distance):
    d = _distiller("dsa", "instancenorm", distance=distance)
    ref_loss, ref_grad = _loss_and_image_grad(d, lambda r, s: _per_class_loss(d, r, s))
    loss, grad = _loss_and_image_grad(d, lambda r, s: d.matching_loss(r, s, batched_real=True, batched_syn=True))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(grad, ref_grad) <= 1e-5


def test_batched_passes_split_into_equal_groups_of_classes(monkeypatch):
    """Large class counts go through several batched passes (memory bound); same numbers."""
    assert classes_per_pass(10, 256) == 5 and classes_per_pass(100, 256) == 5 and classes_per_pass(10, 10) == 10
    assert classes_per_pass(43, 256) == 1 and classes_per_pass(4, 10_000) == 1
    monkeypatch.setattr(dc, "BATCHED_MAX_IMAGES", 2 * BATCH_REAL)  # 4 classes: 2 passes of 2 classes
    assert classes_per_pass(4, BATCH_REAL) == 2
    d = _distiller("dsa", "instancenorm", k=4)
    ref_loss, ref_grad = _loss_and_image_grad(d, lambda r, s: _per_class_loss(d, r, s))
    loss, grad = _loss_and_image_grad(d, lambda r, s: d.matching_loss(r, s, batched_real=True, batched_syn=True))
    assert sorted(d._replicas) == [2, 4]  # real side: 2 passes of 2 classes; synthetic: 1 pass of 4
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(grad, ref_grad) <= 1e-5


def test_class_distance_is_the_sum_of_per_class_distances():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (1, 5, 7)]  # a conv weight, and a one-member linear weight
    gs = [torch.randn(K, *s, generator=g) for s in shapes]
    gr = [torch.randn(K, *s, generator=g) for s in shapes]
    for name, fn in DISTANCES.items():
        expected = sum(float(fn([t[k] for t in gs], [t[k] for t in gr])) for k in range(K))
        assert float(class_distance(name, gs, gr)) == pytest.approx(expected, rel=1e-6), name
    # identical gradients: zero layer-wise distance; opposite ones: 2 per output unit and class
    assert float(class_distance("layerwise", gs, gs)) == pytest.approx(0.0, abs=1e-5)
    assert float(class_distance("layerwise", gs, [-t for t in gs])) == pytest.approx(2 * K * (4 + 5), rel=1e-5)
    assert float(distance_layerwise([t[0] for t in gs], [t[0] for t in gs])) == pytest.approx(0.0, abs=1e-5)


def test_class_batching_per_device():
    assert class_batching(torch.device("cuda"), 50) == (True, True)
    assert class_batching(torch.device("cpu"), 1) == (False, True)
    assert class_batching(torch.device("cpu"), 2) == (False, False)


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_a_whole_step_batched_equals_class_by_class(method):
    """One outer iteration (two image updates with inner epochs between): the same images whichever
    pass computes the gradients (the random draws do not depend on it)."""
    results = []
    for batched in (True, False):
        d = _distiller(method, "instancenorm")
        d.batched_real = d.batched_syn = batched
        g = make_generator(7)
        losses = [d.step(g) for _ in range(2)]
        results.append((losses, d.images.detach().clone()))
    (la, ia), (lb, ib) = results
    assert la == pytest.approx(lb, rel=1e-5)
    assert _rel(ia, ib) < 1e-5
    assert not torch.equal(ia, _distiller(method, "instancenorm").images.detach())  # the images moved


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the eager backend: the compiled synthetic side's plumbing (torch.func,
    the surrogate gradient, buffers), without inductor's rounding or its compile time."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager"))


@pytest.mark.parametrize("method", ["dc", "dsa"])
@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
@pytest.mark.parametrize("distance", ["layerwise", "mse"])
def test_compiled_functional_synthetic_side_equals_per_class(method, norm, distance, eager_compile):
    d = _distiller(method, norm, distance=distance)
    d.net.train()
    if norm == "batchnorm":
        d._set_bn_stats(d.net, make_generator(3))
    ref_loss, ref_grad = _loss_and_image_grad(d, lambda r, s: _per_class_loss(d, r, s))
    assert float(ref_loss) > 0.1 and float(ref_grad.abs().max()) > 0
    d.compiled = True  # the CPU rule for long runs: class by class, through the compiled function
    assert d._compiled_syn(False) and not d._compiled_syn(True)
    assert "compiled torch.func" in d.describe_path() or d.batched_syn
    loss, grad = _loss_and_image_grad(d, lambda r, s: d.matching_loss(r, s, batched_real=False, batched_syn=False))
    assert d._syn_fn is not None  # the functional path ran
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(grad, ref_grad) <= 1e-5, _rel(grad, ref_grad)
