"""PAD on digits with tiny curriculum experts: EL2N finds a planted mislabelled image, the curriculum's
per-epoch subsets follow the schedule, the parameter mask keeps exactly the deeper share, soft labels
are learned and saved, resume is bit-exact and the loss falls."""
import json

import pytest
import torch

import tinyset.experts as experts_mod
from conftest import TINY_EXPERT_MODEL, tiny_experts
from tinyset.augment import DSA, default_strategy
from tinyset.data import load_dataset
from tinyset.data.base import ImageDataset, RealPool
from tinyset.errors import ConfigError
from tinyset.experts import DIFFICULTY_FILE, Curriculum, ExpertSet, ExpertSettings, train_experts
from tinyset.methods import METHODS
from tinyset.methods.base import DistillContext
from tinyset.methods.loop import distill, load_checkpoint, resolve_config
from tinyset.methods.mtt import unroll_loss
from tinyset.methods.pad import PrioritizeAlignment, depth_mask, start_upper_bound
from tinyset.rng import make_generator
from tinyset.select import select
from tinyset.select.el2n import easy_to_hard, el2n_scores
from tinyset.synset import SyntheticSet

MODEL = TINY_EXPERT_MODEL
EPOCHS = 6


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    """3 tiny experts (ConvNet depth 1, width 8), 6 epochs, trained with the EL2N curriculum."""
    cur = Curriculum(init_ratio=0.5, el2n_epochs=2, el2n_members=2)
    return tiny_experts(tmp_path_factory.mktemp("pad") / "experts", digits, EPOCHS, cur)


def _sets(experts, **kw):
    kw = {"compile": "off", "threshold": 100, **kw}  # threshold: never skip an update unless a test asks
    return {"experts": str(experts), "model": MODEL, **{k: str(v) for k, v in kw.items()}}


def _method(digits, experts, ipc=2, **kw):
    cfg = resolve_config("pad", "digits", ipc, "cpu", sets=_sets(experts, **kw)).values
    ctx = DistillContext(digits.info, RealPool(digits), ipc, torch.device("cpu"), "fp32",
                         DSA(default_strategy("digits")))
    impl = PrioritizeAlignment(cfg, ctx)
    impl.setup(make_generator(0))
    return impl


# ---------------------------------------------------------------------------------- EL2N
def test_el2n_ranks_a_planted_mislabelled_image_hardest(digits):
    torch.set_num_threads(1)
    labels = digits.labels.clone()
    planted = int((labels == 0).nonzero()[5])
    labels[planted] = 7  # an image of a 0 labelled 7
    data = ImageDataset(digits.info, digits.split, digits.images, labels, digits.source)
    scores = el2n_scores(data, make_generator(0), "cpu", model=MODEL, members=3, epochs=6, batch_size=128, lr=0.05,
                         precision="fp32", model_args={"width": 8})
    assert scores.shape == (len(data),) and scores.dtype == torch.float64
    assert int(scores.argmax()) == planted
    assert float(scores[planted]) > 1.0 > float(scores.median()) + 0.5  # near sqrt(2) vs typical images near 0
    assert float(scores.min()) >= 0 and float(scores.max()) <= 2 ** 0.5 + 1e-6
    # the same seed gives the same scores; another seed other ones
    again = el2n_scores(data, make_generator(0), "cpu", model=MODEL, members=3, epochs=6, batch_size=128, lr=0.05,
                        precision="fp32", model_args={"width": 8})
    assert torch.equal(scores, again)
    # per-class easy-to-hard order puts it last in class 7
    order = easy_to_hard(scores, labels, 10)
    assert int(order[7][-1]) == planted and sum(o.numel() for o in order) == len(data)


def test_el2n_selector_keeps_hardest_or_easiest(digits):
    torch.set_num_threads(1)
    opts = dict(model=MODEL, members=2, epochs=2, batch_size=128, lr=0.05, precision="fp32")
    hard = select("el2n", digits, 3, seed=0, **opts)
    easy = select("el2n", digits, 3, seed=0, keep="easiest", **opts)
    assert torch.equal(hard.scores, -easy.scores)  # same networks, negated scores
    el2n = hard.scores
    for res in (hard, easy):
        picked = torch.tensor(res.indices)
        for c in range(10):
            rest = (digits.labels == c).nonzero().flatten()
            top = rest[torch.sort(res.scores[rest], descending=True, stable=True).indices[:3]]
            assert set(picked[digits.labels[picked] == c].tolist()) == set(top.tolist())  # the class's extremes
    assert float(el2n[torch.tensor(hard.indices)].mean()) > 5 * float(el2n.mean())
    assert float(el2n[torch.tensor(easy.indices)].max()) < float(el2n.mean())
    with pytest.raises(ConfigError, match="keep"):
        select("el2n", digits, 1, keep="medium")


# ---------------------------------------------------------------------------------- curriculum
def test_curriculum_subsets_follow_the_schedule():
    cur = Curriculum(init_ratio=0.5, add_end_epoch=4, rm_epoch_first=6, rm_epoch_second=8,
                     rm_easy_ratio_first=0.1, rm_easy_ratio_second=0.3)
    order = [torch.arange(10).flip(0), torch.arange(10, 30)]  # class 0 easy-to-hard 9..0, class 1 10..29
    sizes = []
    for e in range(11):
        sub = cur.subset(e, order, 11)
        a, b = sub[sub < 10], sub[sub >= 10]
        sizes.append((a.numel(), b.numel()))
        kind, r = cur.ratio(e, 11)
        if e <= 4:  # easiest share, growing linearly from 0.5 to 1
            assert kind == "keep" and r == pytest.approx(0.5 + 0.5 * e / 4)
            assert torch.equal(a, torch.arange(10 - int(r * 10), 10)) and torch.equal(b, torch.arange(10, 10 + int(r * 20)))
        elif e <= 6:
            assert (kind, r) == ("keep", 1.0) and sub.numel() == 30
        else:  # the easiest 10% then 30% removed
            drop = 0.1 if e <= 8 else 0.3
            assert (kind, r) == ("drop", drop)
            assert torch.equal(a, torch.arange(0, 10 - int(drop * 10))) and torch.equal(b, torch.arange(10 + int(drop * 20), 30))
    assert sizes == [(5, 10), (6, 12), (7, 15), (8, 17), (10, 20), (10, 20), (10, 20), (9, 18), (9, 18), (7, 14),
                     (7, 14)]
    # unset epochs scale upstream's 20/40/60 of 100 epochs to the run
    assert Curriculum().epochs_for(10) == (2, 4, 6) and Curriculum().epochs_for(100) == (20, 40, 60)
    with pytest.raises(ConfigError, match="add_end_epoch <= rm_epoch_first"):
        Curriculum(add_end_epoch=5, rm_epoch_first=3).epochs_for(10)
    with pytest.raises(ConfigError, match="init_ratio"):
        Curriculum(init_ratio=0)


def test_curriculum_experts_train_on_the_scheduled_subsets(tmp_path, digits, monkeypatch):
    torch.set_num_threads(1)
    seen = []
    real = experts_mod.train_ensemble

    def spy(net, images, labels, *a, **kw):
        seen.append(labels.clone())
        return real(net, images, labels, *a, **kw)

    monkeypatch.setattr(experts_mod, "train_ensemble", spy)
    cur = Curriculum(init_ratio=0.5, add_end_epoch=2, rm_epoch_first=3, rm_epoch_second=4, rm_easy_ratio_first=0.2,
                     rm_easy_ratio_second=0.4, el2n_epochs=1, el2n_members=2)
    out = tmp_path / "cl"
    es = train_experts(digits, out, 2, MODEL, ExpertSettings(epochs=6, members=2, lr=0.05, batch_size=256,
                                                             compile=False, curriculum=cur),
                       seed=3, model_args={"width": 4})
    man = json.loads((out / "manifest.json").read_text())
    assert man["curriculum"]["init_ratio"] == 0.5 and man["curriculum"]["add_end_epoch"] == 2
    assert man["curriculum"]["scores"]["method"] == "el2n" and man["curriculum"]["scores"]["file"] == DIFFICULTY_FILE
    n = man["train_images"]
    sizes = man["curriculum_sizes"]
    assert [len(y) for y in seen] == sizes and len(sizes) == 6
    assert sizes[0] < sizes[1] < sizes[2] == n and sizes[3] == n and n > sizes[4] > sizes[5]
    # the images are the scheduled ones: the easiest half of every class at epoch 0
    from safetensors.torch import load_file

    diff = load_file(str(out / DIFFICULTY_FILE))
    order = easy_to_hard(diff["scores"], diff["labels"], 10)
    want = torch.cat([o[:max(1, int(0.5 * o.numel()))] for o in order]).sort().values
    assert torch.equal(seen[0], diff["labels"][want])
    assert len(es.complete()) == 2
    # a plain expert set records no curriculum
    plain = train_experts(digits, tmp_path / "plain", 1, MODEL, ExpertSettings(epochs=1, members=1, compile=False),
                          seed=3, model_args={"width": 4})
    assert "curriculum" not in plain.manifest and not (tmp_path / "plain" / DIFFICULTY_FILE).exists()


def test_curriculum_experts_resume_bit_exactly(tmp_path, digits, monkeypatch):
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    def settings():
        return ExpertSettings(epochs=4, members=2, lr=0.05, batch_size=256, compile=False,
                              curriculum=Curriculum(init_ratio=0.5, el2n_epochs=1, el2n_members=2))

    train_experts(digits, tmp_path / "full", 2, MODEL, settings(), seed=4, model_args={"width": 4})
    real_write = experts_mod.write_json
    writes = {"n": 0}

    def dying_write(path, obj):
        writes["n"] += 1
        if writes["n"] == 4:  # start, epoch 0, epoch 1 recorded; dies before epoch 2 is
            raise KeyboardInterrupt("kill")
        real_write(path, obj)

    monkeypatch.setattr(experts_mod, "write_json", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train_experts(digits, tmp_path / "part", 2, MODEL, settings(), seed=4, model_args={"width": 4})
    monkeypatch.setattr(experts_mod, "write_json", real_write)
    train_experts(digits, tmp_path / "part", 2, MODEL, settings(), seed=4, model_args={"width": 4}, resume=True)
    for e in range(5):
        a = load_file(str(tmp_path / "full" / experts_mod.shard_name(0, e)))
        b = load_file(str(tmp_path / "part" / experts_mod.shard_name(0, e)))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), e
    with pytest.raises(ConfigError, match="curriculum"):  # another schedule is another expert set
        other = settings()
        other.curriculum = Curriculum(init_ratio=0.9, el2n_epochs=1, el2n_members=2)
        train_experts(digits, tmp_path / "part", 2, MODEL, other, seed=4, model_args={"width": 4}, resume=True)


def test_cli_curriculum_flags():
    import argparse

    from tinyset.cli import experts as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    base = ["--dataset", "digits", "--out", "x"]
    assert cli.curriculum_from_args(p.parse_args(base)) is None  # the default stays plain
    cur = cli.curriculum_from_args(p.parse_args(base + ["--curriculum", "el2n", "--init-ratio", "0.6", "--rm-epochs",
                                                        "7,9", "--rm-easy-ratios", "0.2,0.3", "--add-end-epoch", "5"]))
    assert (cur.init_ratio, cur.add_end_epoch, cur.rm_epoch_first, cur.rm_epoch_second) == (0.6, 5, 7, 9)
    assert (cur.rm_easy_ratio_first, cur.rm_easy_ratio_second) == (0.2, 0.3)
    args = p.parse_args(base + ["--curriculum", "el2n", "--rm-epochs", "5,3", "--epochs", "10"])
    with pytest.raises(ConfigError, match="add_end_epoch <= rm_epoch_first <= rm_epoch_second"):
        cli.run(args)
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--rm-epochs", "5"])


# ---------------------------------------------------------------------------------- parameter mask and schedule
def test_depth_mask_keeps_exactly_the_deeper_share(digits, experts):
    m = depth_mask([10, 20, 30], 0.5)
    assert m.tolist() == [False] * 30 + [True] * 30
    assert depth_mask([7], 0.0).all() and int(depth_mask([10, 3], 0.25).sum()) == 13 - 3
    with pytest.raises(ConfigError):
        depth_mask([3], 1.0)
    impl = _method(digits, experts, ipc=1, depth_ratio=0.5)
    p = impl.student.num_params
    k = int(0.5 * p)
    assert int(impl.mask.sum()) == p - k and not impl.mask[:k].any() and impl.mask[k:].all()
    # the first (shallow) share does not enter the loss; the deeper share does
    start = impl.experts.flat_params(0, 1)
    target = impl.experts.flat_params(0, 3)

    def loss(tgt):
        return float(unroll_loss(impl.net, impl.images.detach(), impl.soft_labels().detach(),
                                 impl.tensors["lr"].detach(), start, tgt, 2, None, make_generator(5), impl.augment,
                                 match=impl.mask).detach())

    base = loss(target)
    shallow, deep = target.clone(), target.clone()
    shallow[:k] += 1.0
    deep[k:] += 0.01
    assert loss(shallow) == base and loss(deep) != base


def test_start_epoch_schedule_grows_and_draws_stay_inside():
    assert [start_upper_bound(it, 20, 10, 1000) for it in (0, 500, 999, 1000, 5000)] == [10, 15, 19, 20, 20]
    assert start_upper_bound(0, 4, None, 1000) == 4


def test_draws_follow_the_growing_upper_bound(digits, experts):
    impl = _method(digits, experts, ipc=1, min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=4,
                   expansion_end_epoch=4, syn_steps=1)
    gen = make_generator(1)
    for it in range(8):
        impl.counter.iteration.fill_(it)
        _, t = impl.draw(gen)
        upper = start_upper_bound(it, 4, 2, 4)
        assert 1 <= t < upper and impl.metrics()["start_upper"] == upper
    with pytest.raises(ConfigError, match="current_max_start_epoch"):
        resolve_config("pad", "digits", 1, "cpu", sets=_sets(experts, current_max_start_epoch=9, max_start_epoch=4))


# ---------------------------------------------------------------------------------- labels and images
def test_initial_images_are_classified_correctly_and_labels_come_from_the_experts(digits, experts):
    impl = _method(digits, experts, ipc=2)
    es = ExpertSet(experts)
    net = es.load_model(es.complete()[0], es.epochs).eval()
    with torch.no_grad():
        pred = net(impl.images.detach()).argmax(1)
    assert torch.equal(pred, impl.hard_labels())  # init=correct
    assert impl.init_label_accuracy == 1.0
    logits = impl.tensors["labels"].detach()
    assert logits.shape == (20, 10) and torch.equal(logits.argmax(1), impl.hard_labels())
    assert torch.allclose(impl.soft_labels().sum(1), torch.ones(20))


def test_soft_labels_are_learned_and_saved(tmp_path, digits, experts):
    torch.set_num_threads(1)
    before = _method(digits, experts, ipc=1, max_start_epoch=4).soft_labels().detach()
    res = distill("pad", digits, 1, tmp_path / "run", preset="cpu", sets=_sets(experts, max_start_epoch=4),
                  overrides={"iterations": 3}, seed=0, precision="fp32")
    loaded = SyntheticSet.load(tmp_path / "run" / "synset.safetensors")
    assert loaded.label_kind == "soft" and loaded.labels.shape == (10, 10)
    assert torch.allclose(loaded.labels, res.synset.labels)
    assert not torch.allclose(loaded.labels, before, atol=1e-6)  # learned
    ckpt, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert torch.allclose(loaded.labels, torch.softmax(ckpt["tensor.labels"], 1))
    assert int(ckpt["module.schedule.iteration"]) == 3
    assert loaded.lr is not None and loaded.lr != 0.01
    assert loaded.meta["pad"]["matched_params"] < loaded.meta["pad"]["total_params"] or \
        loaded.meta["config"]["depth_ratio"] == 0.0
    assert loaded.meta["experts"]["curriculum"]["scores"]["method"] == "el2n"


def test_threshold_skips_the_update(digits, experts):
    impl = _method(digits, experts, ipc=1, threshold=1e-9)
    images, labels = impl.images.detach().clone(), impl.tensors["labels"].detach().clone()
    loss = impl.step(make_generator(0))
    assert loss > 1e-9 and impl.metrics()["skipped"] == 1.0
    assert torch.equal(images, impl.images) and torch.equal(labels, impl.tensors["labels"])
    assert int(impl.counter.iteration) == 1


# ---------------------------------------------------------------------------------- resume and loss
def _run(tmp_path, digits, experts, name, iterations, **kw):
    return distill("pad", digits, 1, tmp_path / name, preset="cpu",
                   sets=_sets(experts, max_start_epoch=4, current_max_start_epoch=2, expansion_end_epoch=3),
                   overrides={"iterations": iterations}, seed=2, precision="fp32", **kw)


def test_resume_is_bit_exact(tmp_path, digits, experts):
    torch.set_num_threads(1)
    full = _run(tmp_path, digits, experts, "full", 4, checkpoint_every=1)
    _run(tmp_path, digits, experts, "part", 2, checkpoint_every=1)
    resumed = _run(tmp_path, digits, experts, "part", 4, resume=True)
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    for key in ("tensor.images", "tensor.lr", "tensor.labels", "optim.labels.0.momentum_buffer",
                "module.schedule.iteration", "generator"):
        assert key in a, key
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(full.synset.images, resumed.synset.images)
    assert torch.equal(full.synset.labels, resumed.synset.labels) and full.synset.lr == resumed.synset.lr


def test_pad_loss_decreases_on_digits(digits, experts):
    torch.set_num_threads(1)
    impl = _method(digits, experts, ipc=2, max_start_epoch=4)
    pairs = [(i, t) for i in range(3) for t in range(4)]

    def mean_loss():
        total = 0.0
        for k, (i, t) in enumerate(pairs):
            start, target = impl.experts.flat_params(i, t), impl.experts.flat_params(i, t + impl.cfg.expert_epochs)
            total += float(unroll_loss(impl.net, impl.images.detach(), impl.soft_labels().detach(),
                                       impl.tensors["lr"].detach(), start, target, impl.cfg.syn_steps,
                                       impl.cfg.batch_syn, make_generator(100 + k), impl.augment, match=impl.mask).detach())
        return total / len(pairs)

    before = mean_loss()
    labels0 = impl.tensors["labels"].detach().clone()
    gen = make_generator(3)
    for _ in range(20):
        impl.step(gen)
    after = mean_loss()
    assert after < 0.85 * before, (before, after)
    assert not torch.equal(labels0, impl.tensors["labels"].detach())


def test_registered_with_paper_rows_and_cpu_rule(experts):
    assert "pad" in METHODS.names()
    from tinyset.hparams import resolve
    from tinyset.methods.pad import PADConfig

    def paper(ds, ipc):
        return resolve(PADConfig, dataset=ds, ipc=ipc, profile="paper", table=PrioritizeAlignment.paper)

    r = paper("cifar10", 10)
    v = r.values
    assert (v.syn_steps, v.expert_epochs, v.min_start_epoch, v.current_max_start_epoch, v.max_start_epoch) == \
        (80, 2, 0, 10, 20)
    assert (v.lr_img, v.lr_lr, v.lr_y, v.batch_syn, v.depth_ratio, v.expansion_end_epoch) == \
        (100.0, 1e-5, 2.0, 500, 0.5, 1000)
    assert "PAD configs/CIFAR-10/ConvIN/IPC10.yaml" in r.sources["depth_ratio"]
    assert paper("cifar100", 50).values.min_start_epoch == 20 and paper("cifar10", 1).values.threshold == 1.1
    cpu = resolve_config("pad", "digits", 1, "cpu", sets={"experts": str(experts), "model": MODEL})
    assert cpu.values.depth_ratio == 0.0 and cpu.values.lr_y == 5.0 and cpu.sources["lr_y"].startswith("cpu: ")
    assert resolve_config("pad", "digits", 10, "cpu", sets={"experts": str(experts), "model": MODEL}
                          ).values.depth_ratio == 0.5
    # PAD keeps the width-32 student MTT's rule used before it moved to width 128 at ipc >= 10
    for ds, ipc, its in [("mnist", 1, 500), ("fashion-mnist", 10, 200), ("mnist", 50, 200)]:
        v = resolve(PADConfig, dataset=ds, ipc=ipc, profile="cpu", table=PrioritizeAlignment.paper,
                    cpu_rule=PrioritizeAlignment.cpu_rule).values
        assert (v.model, v.iterations, v.syn_steps, v.depth_ratio) == ("convnet-w32", its, 20, 0.0 if ipc == 1 else 0.5)
        assert v.init != "select:mi,diversity=0.1"  # MTT's MNIST ipc 10 start belongs to its width-128 rule
