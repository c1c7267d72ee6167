"""MTT on digits with tiny experts: the loss falls, the lr gradient is right, resume is bit-exact,
mismatches fail cleanly, and the learned lr reaches the evaluator."""
import json

import pytest
import torch

import tinyset.evaluate as evaluate_mod
from conftest import TINY_EXPERT_MODEL, tiny_dataset, tiny_experts
from tinyset.augment import DSA, default_strategy
from tinyset.data import load_dataset
from tinyset.data.base import RealPool
from tinyset.errors import ConfigError, NumericalError
from tinyset.evaluate import Protocol, evaluate_synset
from tinyset.hparams import resolve
from tinyset.methods import METHODS
from tinyset.methods.base import DistillContext
from tinyset.methods.loop import distill, load_checkpoint, resolve_config
from tinyset.methods.mtt import SPIKE_WARMUP, SPIKE_WINDOW, MTTConfig, SpikeGuard, Student, TrajectoryMatching, \
    unroll_loss
from tinyset.models import create_model
from tinyset.rng import make_generator
from tinyset.synset import SyntheticSet

MODEL = TINY_EXPERT_MODEL


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    """3 tiny experts (ConvNet depth 1, width 8), 6 epochs: enough for the digits cpu preset."""
    return tiny_experts(tmp_path_factory.mktemp("mtt") / "experts", digits)


def _sets(experts, **kw):
    kw = {"compile": "off", **kw}  # tests stay fast: no torch.compile start-up
    return {"experts": str(experts), "model": MODEL, **{k: str(v) for k, v in kw.items()}}


def _method(digits, experts, ipc=2, **kw):
    cfg = resolve_config("mtt", "digits", ipc, "cpu", sets=_sets(experts, **kw)).values
    ctx = DistillContext(digits.info, RealPool(digits), ipc, torch.device("cpu"), "fp32",
                         DSA(default_strategy("digits")))
    impl = TrajectoryMatching(cfg, ctx)
    impl.setup(make_generator(0))
    return impl


def _mean_loss(impl, pairs):
    """The loss averaged over fixed (expert, start) pairs with fixed student draws: a noise-free measure."""
    total = 0.0
    for k, (i, t) in enumerate(pairs):
        start = impl.experts.flat_params(i, t)
        target = impl.experts.flat_params(i, t + impl.cfg.expert_epochs)
        with torch.enable_grad():
            loss = unroll_loss(impl.net, impl.images.detach(), impl.labels, impl.tensors["lr"].detach(), start,
                               target, impl.cfg.syn_steps, impl.cfg.batch_syn, make_generator(100 + k), impl.augment)
        total += float(loss.detach())
    return total / len(pairs)


def test_registered_with_config_presets_and_sources(experts):
    assert "mtt" in METHODS.names()
    res = resolve_config("mtt", "digits", 2, "cpu", sets=_sets(experts))
    v, src = res.values, res.sources
    assert (v.iterations, v.syn_steps, v.expert_epochs, v.max_start_epoch, v.lr_img) == (200, 10, 2, 5, 1000.0)
    assert (v.lr_lr, v.lr_teacher, v.momentum_img, v.momentum_lr, v.batch_syn) == (1e-5, 0.01, 0.5, 0.5, None)
    assert src["syn_steps"].startswith("cpu: ") and src["lr_lr"].startswith("paper: ")
    assert src["experts"] == "flag: --set experts" and src["model"] == "flag: --set model"
    assert resolve(MTTConfig, dataset="digits", ipc=1, profile="cpu", table=TrajectoryMatching.paper,
                   cpu_rule=TrajectoryMatching.cpu_rule).values.model == "convnet-d2"
    # MNIST/FashionMNIST: early expert segments only (see the rule's text), a smaller budget above ipc 1,
    # the evaluation's width-128 ConvNet from ipc 10 on
    # MNIST at ipc 10 starts from the mi selection and runs 100 iterations; elsewhere random real images
    for ds, ipc, model, its, bs, init in [("mnist", 1, "convnet-w32", 500, 10, "real"),
                                          ("fashion-mnist", 5, "convnet-w32", 200, 50, "real"),
                                          ("fashion-mnist", 10, "convnet", 300, 50, "real"),
                                          ("mnist", 10, "convnet", 100, 50, "select:mi,diversity=0.1"),
                                          ("mnist", 50, "convnet", 300, 50, "real")]:
        m = resolve(MTTConfig, dataset=ds, ipc=ipc, profile="cpu", table=TrajectoryMatching.paper,
                    cpu_rule=TrajectoryMatching.cpu_rule)
        assert (m.values.model, m.values.iterations, m.values.syn_steps, m.values.expert_epochs,
                m.values.max_start_epoch, m.values.lr_img, m.values.batch_syn) == (model, its, 20, 1, 2, 100.0, bs)
        assert m.values.init == init and "probe_mtt_start.py" in m.sources["max_start_epoch"]
    # the published per-setting table (checked without an expert set: the values only)
    for ds, ipc, expect in [("cifar10", 1, (50, 2, 2, 100.0, 1e-7, 0.01, None)),
                            ("cifar10", 10, (30, 2, 20, 100.0, 1e-5, 0.001, None)),
                            ("cifar100", 50, (80, 2, 40, 1000.0, 1e-5, 0.01, 125)),
                            ("mnist", 10, (20, 3, 25, 1000.0, 1e-5, 0.01, None))]:
        r = resolve(MTTConfig, dataset=ds, ipc=ipc, profile="paper", table=TrajectoryMatching.paper)
        got = (r.values.syn_steps, r.values.expert_epochs, r.values.max_start_epoch, r.values.lr_img,
               r.values.lr_lr, r.values.lr_teacher, r.values.batch_syn)
        assert got == expect, (ds, ipc)
    assert "DC-BENCH" in resolve(MTTConfig, dataset="cifar10", ipc=10, profile="paper",
                                 table=TrajectoryMatching.paper).sources["syn_steps"]
    rows = [r for r in TrajectoryMatching.paper.lookup("mnist", 10) if not r.values]
    assert rows and "no published MTT settings" in rows[0].source
    m = resolve(MTTConfig, dataset="mnist", ipc=10, profile="cpu", table=TrajectoryMatching.paper,
                cpu_rule=TrajectoryMatching.cpu_rule).values
    assert (m.model, m.syn_steps, m.max_start_epoch, m.batch_syn, m.final_eval) == ("convnet", 20, 2, 50, "quick")
    # the spike guard: on in the MNIST/FashionMNIST cpu rule, off in the paper's settings and on digits
    assert m.spike_clip == 10.0
    assert resolve(MTTConfig, dataset="mnist", ipc=10, profile="paper", table=TrajectoryMatching.paper).values.spike_clip \
        is None
    assert v.spike_clip is None


def test_spike_guard_scales_only_spikes_after_its_warmup():
    guard = SpikeGuard(10.0)
    g = [torch.full((3,), 2.0), torch.full((2,), -1.0)]
    for k in range(SPIKE_WARMUP):  # no clipping while the history fills, whatever the norm
        assert guard.clip_(torch.tensor(1e6 if k == 0 else 1.0), g) == (1e6 if k == 0 else 1.0, 1.0)
    assert g[0].tolist() == [2.0] * 3
    # median of the history is 1 (nine 1s and one 1e6): 5 < 10 x 1 passes, 100 is scaled to 10
    assert guard.clip_(torch.tensor(5.0), g) == (5.0, 1.0)
    norm, scale = guard.clip_(torch.tensor(100.0), g)
    assert (norm, scale) == (100.0, 0.1)
    assert torch.allclose(g[0], torch.full((3,), 0.2)) and torch.allclose(g[1], torch.full((2,), -0.1))
    # the unclipped norm enters the history; the window keeps the last SPIKE_WINDOW norms
    assert float(guard.norms[SPIKE_WARMUP + 1]) == 100.0 and int(guard.count) == SPIKE_WARMUP + 2
    for _ in range(SPIKE_WINDOW):
        guard.clip_(torch.tensor(3.0), [])
    assert torch.equal(guard.norms, torch.full((SPIKE_WINDOW,), 3.0, dtype=torch.float64))
    assert guard.clip_(torch.tensor(31.0), [])[1] == pytest.approx(30.0 / 31.0)


def test_mtt_loss_decreases_on_digits(digits, experts):
    torch.manual_seed(0)  # not used by tinyset; makes a stray global draw visible as a failure elsewhere
    impl = _method(digits, experts, ipc=2)
    pairs = [(i, t) for i in range(3) for t in range(impl.cfg.max_start_epoch)]
    before = _mean_loss(impl, pairs)
    gen = make_generator(3)
    lr0 = float(impl.tensors["lr"].detach())
    for _ in range(20):
        impl.step(gen)
    after = _mean_loss(impl, pairs)
    assert after < 0.8 * before, (before, after)
    assert float(impl.tensors["lr"].detach()) != lr0  # the lr is learned too


def test_lr_and_image_gradients_match_finite_differences():
    torch.manual_seed(0)
    g = make_generator(7)
    net = create_model(MODEL, 1, 3, 8, generator=make_generator(1), width=3).double()
    names = [n for n, _ in net.named_parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert names and start.dtype == torch.float64

    def loss(img, lr):
        # same student batches for every evaluation: a fresh generator with the same seed
        return unroll_loss(net, img, labels, lr, start, target, syn_steps=4, batch_syn=4, gen=make_generator(11))

    def value_of(img, lr):
        return float(loss(img, lr).detach())

    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    img = images.clone().requires_grad_(True)
    value = loss(img, lr)
    g_img, g_lr = torch.autograd.grad(value, (img, lr))
    h = 1e-5
    fd_lr = (value_of(images, torch.tensor(0.3 + h, dtype=torch.float64))
             - value_of(images, torch.tensor(0.3 - h, dtype=torch.float64))) / (2 * h)
    assert abs(float(g_lr)) > 1e-3  # a real, non-trivial gradient
    assert float(g_lr) == pytest.approx(fd_lr, rel=1e-6, abs=1e-9)
    for idx in [(0, 0, 3, 4), (3, 0, 1, 6), (5, 0, 7, 0)]:
        e = torch.zeros_like(images)
        e[idx] = h
        fd = (value_of(images + e, lr.detach()) - value_of(images - e, lr.detach())) / (2 * h)
        assert float(g_img[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-10), idx


def test_identical_expert_epochs_are_refused_not_divided_by_zero():
    """The upstream CPU aliasing bug (every stored epoch equal) gives a clear error, not inf."""
    net = create_model(MODEL, 1, 3, 8, generator=make_generator(1), width=3)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with pytest.raises(NumericalError, match="start and target parameters are identical"):
        unroll_loss(net, torch.zeros(3, 1, 8, 8), torch.arange(3), torch.tensor(0.01), flat, flat.clone(), 2, None,
                    make_generator(0))


def _run(tmp_path, digits, experts, name, iterations, **kw):
    return distill("mtt", digits, 1, tmp_path / name, preset="cpu", sets=_sets(experts, max_start_epoch=4),
                   overrides={"iterations": iterations}, seed=2, precision="fp32", **kw)


def test_resume_is_bit_exact(tmp_path, digits, experts):
    full = _run(tmp_path, digits, experts, "full", 4, checkpoint_every=1)
    _run(tmp_path, digits, experts, "part", 2, checkpoint_every=1)
    resumed = _run(tmp_path, digits, experts, "part", 4, resume=True)
    a, ha = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, hb = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    for key in ("tensor.images", "tensor.lr", "optim.images.0.momentum_buffer", "optim.lr.0.momentum_buffer",
                "generator"):
        assert key in a, key
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(full.synset.images, resumed.synset.images) and full.synset.lr == resumed.synset.lr


def test_resume_is_bit_exact_with_the_spike_guard_clipping(tmp_path, digits, experts):
    # spike_clip=1 clips every iteration whose norm is above the median: the guard's history, its counter
    # and the clipped updates must all survive a resume
    its = SPIKE_WARMUP + 6

    def run(name, n, **kw):
        return distill("mtt", digits, 1, tmp_path / name, preset="cpu",
                       sets=_sets(experts, max_start_epoch=4, spike_clip=1.0), overrides={"iterations": n}, seed=2,
                       precision="fp32", checkpoint_every=1, **kw)

    full = run("full", its)
    run("part", its - 3)
    resumed = run("part", its, resume=True)
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert int(a["module.spike_guard.count"]) == its and set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(full.synset.images, resumed.synset.images) and full.synset.lr == resumed.synset.lr
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["metrics"]["clip_scale"] for r in lines if "metrics" in r]
    assert len(scales) == its and all(s == 1.0 for s in scales[:SPIKE_WARMUP])
    assert any(s < 1.0 for s in scales[SPIKE_WARMUP:])


def test_resume_of_a_checkpoint_older_than_a_setting_asks_for_its_default(tmp_path, digits, experts):
    # a checkpoint written before spike_clip existed ran without the guard: resuming it with the guard on
    # is refused with the flag that resumes it, and resuming it as it ran works
    from safetensors import safe_open
    from safetensors.torch import save_file

    _run(tmp_path, digits, experts, "old", 2, checkpoint_every=1)
    ckpt = tmp_path / "old" / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del header["config"]["spike_clip"]
    save_file(tensors, str(ckpt), metadata={"tinyset": json.dumps(header)})
    with pytest.raises(ConfigError, match=r"before the setting spike_clip existed .*--set spike_clip=none"):
        distill("mtt", digits, 1, tmp_path / "old", preset="cpu",
                sets=_sets(experts, max_start_epoch=4, spike_clip=10.0), overrides={"iterations": 3}, seed=2,
                precision="fp32", resume=True)
    assert _run(tmp_path, digits, experts, "old", 3, resume=True).iterations == 3


def test_synset_carries_the_learned_lr(tmp_path, digits, experts):
    res = _run(tmp_path, digits, experts, "run", 3)
    loaded = SyntheticSet.load(tmp_path / "run" / "synset.safetensors")
    assert loaded.lr is not None and loaded.lr == res.synset.lr and loaded.lr != 0.01
    assert loaded.meta["experts"]["path"] == str(experts) and loaded.meta["experts"]["model"] == MODEL


def test_missing_experts_and_mismatches_fail_cleanly(tmp_path, digits, experts):
    with pytest.raises(ConfigError, match=r"needs expert trajectories: --set experts=DIR"):
        resolve_config("mtt", "digits", 1, "cpu")
    with pytest.raises(ConfigError, match=r"experts='.*nope'.*no such folder"):
        resolve_config("mtt", "digits", 1, "cpu", sets={"experts": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"holds 'convnet-d1' networks; this run matches with model='convnet-d2' "
                                          r"\(set model=convnet-d1"):
        resolve_config("mtt", "digits", 1, "cpu", sets={"experts": str(experts)})  # the cpu preset's convnet-d2
    with pytest.raises(ConfigError, match=r"max_start_epoch=6 with expert_epochs=2 needs experts trained for at "
                                          r"least 7 epochs; .* has 6"):
        resolve_config("mtt", "digits", 1, "cpu", sets=_sets(experts, max_start_epoch=6))
    # a dataset mismatch is found while the settings are resolved (before any data is read) ...
    with pytest.raises(ConfigError, match=r"trained on dataset 'digits'; this run distils 'fashion-mnist'"):
        resolve_config("mtt", "Fashion_MNIST", 1, "cpu", sets=_sets(experts))
    # ... and again when the run starts, before anything is written
    tiny = tiny_dataset(num_classes=10, per_class=4)
    with pytest.raises(ConfigError, match=r"trained on dataset 'digits'; this run distils 'tiny'"):
        distill("mtt", tiny, 1, tmp_path / "tiny", sets=_sets(experts, max_start_epoch=4), precision="fp32")
    assert not (tmp_path / "tiny").exists()


def test_lr_that_turns_negative_stops_the_run(digits, experts):
    """An lr far too large has a large positive gradient: one update with a big lr_lr overshoots below 0."""
    impl = _method(digits, experts, ipc=1, lr_lr=1.0, lr_teacher=0.3)
    with pytest.raises(NumericalError, match=r"learned lr became -.* \(<= 0; it started at 0\.3\); lower lr_lr \(now 1\.0\)"):
        impl.step(make_generator(0))


def test_the_evaluator_trains_with_the_learned_lr(digits, monkeypatch):
    """Two sets identical but for their lr: with a protocol that defers to the set (lr=None), the
    networks are trained with each set's own lr and end up different."""
    idx = torch.cat([torch.nonzero(digits.labels == c).flatten()[:3] for c in range(10)])
    images, labels = digits.info.normalize(digits.images[idx]), digits.labels[idx]
    slow = SyntheticSet(images, labels, digits.info, lr=1e-4)
    fast = SyntheticSet(images, labels, digits.info, lr=0.05)
    proto = Protocol(name="t", epochs=20, lr=None, num_models=1, augment="none", precision="fp32", compile=False)
    test = load_dataset("digits", "test")
    seen = []
    real_train = evaluate_mod.train_ensemble

    def spy(model, x, y, settings, *a, **kw):
        seen.append(settings.lr)
        return real_train(model, x, y, settings, *a, **kw)

    monkeypatch.setattr(evaluate_mod, "train_ensemble", spy)
    r_slow = evaluate_synset(slow, test, [MODEL], proto, seed=0)
    r_fast = evaluate_synset(fast, test, [MODEL], proto, seed=0)
    assert seen == [1e-4, 0.05]
    assert r_slow.protocol["lr_used"] == 1e-4 and r_fast.protocol["lr_used"] == 0.05
    assert r_fast.results[0].mean > r_slow.results[0].mean + 0.2, (r_slow.results[0].mean, r_fast.results[0].mean)
    # control: a protocol with its own lr ignores the sets' lr, and the two sets then give the same result
    fixed = Protocol(name="t", epochs=20, lr=0.05, num_models=1, augment="none", precision="fp32", compile=False)
    assert evaluate_synset(slow, test, [MODEL], fixed, seed=0).results[0].accuracies == \
        evaluate_synset(fast, test, [MODEL], fixed, seed=0).results[0].accuracies


def test_learned_lr_protocol_uses_the_sets_lr():
    from tinyset.evaluate import Protocol

    proto = Protocol.preset("dsa-learned-lr")
    assert proto.lr is None and proto.epochs == 1000 and "learned" in proto.source


# ---------------------------------------------------------------------------------------------------------------
# unroll_loss: soft labels, parameter masks, and the exact low-memory (recompute) path

def _unroll_case(dtype=torch.float32, model="convnet-d2", width=6, n=20, k=10, seed=0):
    """A tiny student on digits-sized images: network, flat start and target, images and soft-label logits."""
    g = make_generator(seed)
    net = create_model(model, 1, k, 8, generator=make_generator(1), width=width).to(dtype)
    net.requires_grad_(False)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=dtype)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    logits = torch.randn(n, k, generator=g, dtype=dtype)
    return net, start, target, images, logits


def _grads(net, start, target, images, logits, memory, soft=True, match=None, augment=None, steps=5, batch=8,
           lr_value=0.05, seed=3):
    """Loss and the gradients delivered to images, lr and (soft-label) logits by ``loss.backward()``."""
    img = images.clone().requires_grad_(True)
    lr = torch.tensor(lr_value, dtype=images.dtype, requires_grad=True)
    lg = logits.clone().requires_grad_(True)
    labels = torch.softmax(lg, 1) if soft else torch.arange(logits.shape[1]).repeat(len(images) // logits.shape[1])
    loss = unroll_loss(net, img, labels, lr, start, target, steps, batch, make_generator(seed), augment, match=match,
                       memory=memory)
    loss.backward()
    return loss.detach(), img.grad, lr.grad, (lg.grad if soft else None)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_recompute_path_equals_full_path(soft, mask):
    """Loss and gradients (images, lr, soft labels) of the recompute path equal the full graph's, DSA on."""
    net, start, target, images, logits = _unroll_case()
    g = make_generator(9)
    match = {"none": None, "bool": torch.rand(start.shape, generator=g) > 0.4,
             "float": torch.rand(start.shape, generator=g)}[mask]
    aug = DSA(default_strategy("digits"))
    full = _grads(net, start, target, images, logits, "full", soft, match, aug)
    rec = _grads(net, start, target, images, logits, "recompute", soft, match, aug)
    assert float(full[0]) != 1.0 and abs(float(full[2])) > 1e-4  # a real unroll with a real lr gradient
    assert float(rec[0]) == pytest.approx(float(full[0]), rel=1e-5)
    assert float(rec[2]) == pytest.approx(float(full[2]), rel=1e-5)
    assert _rel(rec[1], full[1]) < 1e-5 and float(full[1].norm()) > 0
    if soft:
        assert _rel(rec[3], full[3]) < 1e-5 and float(full[3].norm()) > 0
    # the graph of the recompute path holds one node: the unroll, not one per student step
    img = images.clone().requires_grad_(True)
    loss = unroll_loss(net, img, torch.arange(10).repeat(2), torch.tensor(0.05), start, target, 5, 8,
                       make_generator(3), aug, memory="recompute")
    assert type(loss.grad_fn).__name__ == "_RecomputeUnrollBackward"


def test_recompute_path_with_batchnorm_and_no_augmentation():
    """BatchNorm in train mode (batch statistics; running statistics written into copies): both paths agree and
    the network's buffers are left alone."""
    net, start, target, images, logits = _unroll_case(model="convnet-bn")
    before = {k: v.clone() for k, v in net.named_buffers()}
    full = _grads(net, start, target, images, logits, "full", soft=False)
    rec = _grads(net, start, target, images, logits, "recompute", soft=False)
    assert float(rec[0]) == pytest.approx(float(full[0]), rel=1e-5)
    assert float(rec[2]) == pytest.approx(float(full[2]), rel=1e-5)
    assert _rel(rec[1], full[1]) < 1e-5
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("memory", ["full", "recompute"])
def test_lr_and_soft_label_gradients_match_finite_differences(memory):
    """In float64, with a parameter mask and soft labels: d loss / d lr and d loss / d logits against central
    differences, on both paths."""
    net, start, target, images, logits = _unroll_case(torch.float64, width=3, n=10, k=5, seed=4)
    match = torch.zeros(start.shape, dtype=torch.bool)
    match[start.numel() // 3:] = True  # the deeper share of the parameters, as PAD matches

    def value(lr, lg):
        labels = torch.softmax(lg, 1)
        return float(unroll_loss(net, images, labels, torch.tensor(lr, dtype=torch.float64), start, target, 4, 6,
                                 make_generator(11), match=match, memory=memory).detach())

    loss, _, g_lr, g_lg = _grads(net, start, target, images, logits, memory, True, match, None, steps=4, batch=6,
                                 lr_value=0.3, seed=11)
    h = 1e-6
    fd_lr = (value(0.3 + h, logits) - value(0.3 - h, logits)) / (2 * h)
    assert abs(float(g_lr)) > 1e-3
    assert float(g_lr) == pytest.approx(fd_lr, rel=1e-6, abs=1e-10)
    for idx in [(0, 1), (4, 0), (9, 4)]:
        e = torch.zeros_like(logits)
        e[idx] = h
        fd = (value(0.3, logits + e) - value(0.3, logits - e)) / (2 * h)
        assert float(g_lg[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-10), idx
    assert float(g_lg.abs().max()) > 1e-5


def test_match_mask_splits_the_distance():
    """The loss is ||m*(theta_N - target)||^2 / ||m*(start - target)||^2: for a mask m and its complement (same
    draws, so the same theta_N) the weighted parts add up to the unmasked distance; a constant weight cancels."""
    net, start, target, images, logits = _unroll_case()
    labels = torch.arange(10).repeat(2)
    m = torch.zeros(start.shape, dtype=torch.bool)
    m[: start.numel() // 2] = True

    def loss(match):
        return float(unroll_loss(net, images, labels, torch.tensor(0.05), start, target, 4, 8, make_generator(2),
                                 match=match).detach())

    def denom(w):
        return float((((start - target) * w) ** 2).sum())

    ones = torch.ones(start.shape)
    whole, part, rest = loss(None), loss(m), loss(~m)
    assert part != pytest.approx(rest, rel=1e-3)  # the two halves really differ
    assert part * denom(m.float()) + rest * denom((~m).float()) == pytest.approx(whole * denom(ones), rel=1e-5)
    assert loss(3.0 * ones) == pytest.approx(whole, rel=1e-6)


def test_one_hot_soft_labels_equal_hard_labels():
    net, start, target, images, _ = _unroll_case()
    hard = torch.arange(10).repeat(2)
    soft = torch.nn.functional.one_hot(hard, 10).float()
    for memory in ("full", "recompute"):
        out = []
        for labels in (hard, soft):
            img = images.clone().requires_grad_(True)
            loss = unroll_loss(net, img, labels, torch.tensor(0.05), start, target, 3, 8, make_generator(5),
                               memory=memory)
            loss.backward()
            out.append((float(loss.detach()), img.grad))
        assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
        assert _rel(out[1][1], out[0][1]) < 1e-5


def test_bad_labels_masks_and_memory_fail_cleanly():
    net, start, target, images, logits = _unroll_case()
    lr = torch.tensor(0.05)

    def call(labels, **kw):
        return unroll_loss(net, images, labels, lr, start, target, 2, None, make_generator(0), **kw)

    with pytest.raises(ConfigError, match=r"pass logits through softmax first\); row 0 sums to 3"):
        call(logits)
    with pytest.raises(ConfigError, match=r"soft labels must be probability rows of shape \[20, 10\].*\(20, 3\)"):
        call(torch.full((20, 3), 1 / 3))
    with pytest.raises(ConfigError, match=r"hard labels must be class indices of shape \[20\]; got \(19,\)"):
        call(torch.zeros(19, dtype=torch.int64))
    with pytest.raises(ConfigError, match=rf"match must be a bool or float mask over the {start.numel()} flat "
                                          r"parameters; got torch.int64 with 3 values"):
        call(torch.arange(10).repeat(2), match=torch.arange(3))
    with pytest.raises(NumericalError, match="identical on the matched parameters"):
        call(torch.arange(10).repeat(2), match=torch.zeros(start.shape, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"memory='low': expected one of full, recompute"):
        call(torch.arange(10).repeat(2), memory="low")


def test_bf16_student_stays_close_to_fp32():
    """The student under bf16 autocast (the run's precision where native): same loss to a few 1e-3."""
    net, start, target, images, logits = _unroll_case(width=8)
    labels = torch.arange(10).repeat(2)
    values = {}
    for prec in ("fp32", "bf16"):
        img = images.clone().requires_grad_(True)
        loss = unroll_loss(Student(net, precision=prec), img, labels, torch.tensor(0.05), start, target, 4, 8,
                           make_generator(6), memory="recompute")
        loss.backward()
        values[prec] = (float(loss.detach()), img.grad)
    assert values["bf16"][0] == pytest.approx(values["fp32"][0], rel=5e-3)
    cos = float((values["bf16"][1] * values["fp32"][1]).sum() / values["bf16"][1].norm() / values["fp32"][1].norm())
    assert cos > 0.95


@pytest.mark.slow
def test_compiled_student_matches_eager():
    """torch.compile'd step functions (the CPU default of long runs): same loss and nearly the same gradients."""
    net, start, target, images, logits = _unroll_case(width=8)
    aug = DSA(default_strategy("digits"))
    eager = _grads(net, start, target, images, logits, "recompute", True, None, aug)
    comp = _grads(Student(net, compile=True), start, target, images, logits, "recompute", True, None, aug)
    assert float(comp[0]) == pytest.approx(float(eager[0]), rel=1e-5)
    assert float(comp[2]) == pytest.approx(float(eager[2]), rel=1e-3)
    assert _rel(comp[1], eager[1]) < 1e-2 and _rel(comp[3], eager[3]) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# the distiller's memory and compile settings

def test_memory_setting_chooses_the_path_and_both_give_the_same_run(digits, experts):
    a = _method(digits, experts, ipc=2, memory="full")
    b = _method(digits, experts, ipc=2, memory="recompute")
    assert (a.cfg.memory, b.cfg.memory) == ("full", "recompute") and not b.wants_compile()
    ga, gb = make_generator(4), make_generator(4)
    for _ in range(3):
        la, lb = a.step(ga), b.step(gb)
        assert lb == pytest.approx(la, rel=1e-5)
    assert _rel(b.images.detach() - b.initial_images(make_generator(0)),
                a.images.detach() - a.initial_images(make_generator(0))) < 1e-4
    assert float(b.tensors["lr"].detach()) == pytest.approx(float(a.tensors["lr"].detach()), rel=1e-6)


def test_memory_and_compile_settings(experts):
    v = resolve(MTTConfig, dataset="mnist", ipc=10, profile="cpu", table=TrajectoryMatching.paper,
                cpu_rule=TrajectoryMatching.cpu_rule)
    assert (v.values.memory, v.values.compile) == ("recompute", "auto")
    d = resolve_config("mtt", "digits", 10, "cpu", sets={"experts": str(experts), "model": MODEL})
    assert (d.values.memory, d.values.compile) == ("full", "off") and d.sources["memory"].startswith("cpu: ")
    with pytest.raises(ConfigError, match=r"compile=on needs memory=recompute"):
        resolve_config("mtt", "digits", 1, "cpu", sets=_sets(experts, memory="full", compile="on"))
    with pytest.raises(ConfigError, match=r"memory"):
        resolve_config("mtt", "digits", 1, "cpu", sets=_sets(experts, memory="low"))


def test_start_epoch_probe_prints_one_loss_per_start_epoch(experts, capsys):
    """benchmarks/probe_mtt_start.py: before any learning, a student at lr 0 does not move, so every
    start epoch's loss is exactly 1; a positive lr moves it (a loss other than 1)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_mtt_start.py"
    spec = importlib.util.spec_from_file_location("probe_mtt_start", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.main(["--dataset", "digits", "--experts", str(experts), "--ipc", "1", "--lrs", "1e-12,0.05",
                       "--syn-steps", "2", "--expert-epochs", "1", "--starts", "0,2", "--draws", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("expert_epochs")]
    assert len(rows) == 2
    losses = [[float(cell.split(": ")[1]) for cell in row.split(" | ")[1].split("  ")] for row in rows]
    assert all(len(r) == 2 for r in losses)
    assert losses[0] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(abs(v - 1.0) > 1e-3 for v in losses[1])
