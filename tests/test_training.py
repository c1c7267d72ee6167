"""Tests of the one training loop (tinyset.training): hooks, schedule, the DC-style call, compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tinyset.training as training
from conftest import tiny_dataset
from tinyset.augment import DSA, default_strategy
from tinyset.errors import ConfigError, NumericalError
from tinyset.evaluate import Protocol, evaluate_tensors
from tinyset.models import create_model
from tinyset.rng import make_generator
from tinyset.training import TrainSettings, train_ensemble


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------- hooks

def test_batch_hook_covers_every_sample_once_per_epoch_and_losses_average_to_the_reported_loss():
    data = tiny_dataset(per_class=7)  # 21 images, batches of 8: 8, 8, 5
    x, y = data.normalized(), data.labels
    m, s, epochs = 2, 21, 3
    model = create_model("convnet-d1", 1, 3, 8, members=m, seed=0)
    batches: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    reported: list[tuple[int, float, float]] = []
    steps: list[tuple[int, int, int]] = []
    train_ensemble(model, x, y, TrainSettings(epochs=epochs, lr=0.05, batch_size=8), make_generator(0),
                   on_batch=lambda *a: batches.append(a), on_epoch=lambda *a: reported.append(a),
                   on_step=lambda *a: steps.append(a))
    assert [b[0] for b in batches] == [ep for ep in range(epochs) for _ in range(3)]
    assert steps == [(ep, k, 3) for ep in range(epochs) for k in (1, 2, 3)]
    for ep in range(epochs):
        mine = [b for b in batches if b[0] == ep]
        for _, idx, losses, logits in mine:
            assert idx.dtype == torch.long and idx.shape == losses.shape == (logits.shape[0],)
            assert logits.shape[1] == 3 and not losses.requires_grad and not logits.requires_grad
            # member-major, and the losses are the cross-entropy of these logits and these samples
            torch.testing.assert_close(losses, F.cross_entropy(logits, y[idx], reduction="none"))
        # every member sees every sample exactly once per epoch
        per_member = torch.cat([idx.view(m, -1) for _, idx, _, _ in mine], dim=1)
        for row in per_member:
            assert torch.equal(row.sort().values, torch.arange(s))
        all_losses = torch.cat([losses for _, _, losses, _ in mine]).double()
        assert reported[ep][0] == ep
        assert reported[ep][1] == pytest.approx(float(all_losses.mean()), rel=1e-6)
        # train accuracy: correct per batch summed over members, integer-divided by M
        correct = sum(int((logits.argmax(1) == y[idx]).sum()) // m for _, idx, _, logits in mine)
        assert reported[ep][2] == correct / s


def test_soft_label_losses_are_per_sample_cross_entropy():
    data = tiny_dataset(per_class=4)
    soft = F.one_hot(data.labels, 3).float() * 0.7 + 0.1
    model = create_model("mlp", 1, 3, 8, seed=0)
    seen = []
    train_ensemble(model, data.normalized(), soft, TrainSettings(epochs=1, lr=0.01, batch_size=5),
                   make_generator(0), on_batch=lambda ep, idx, losses, logits: seen.append((idx, losses, logits)))
    for idx, losses, logits in seen:
        expected = -(soft[idx] * logits.log_softmax(1)).sum(1)
        torch.testing.assert_close(losses, expected)


def test_the_loop_steps_through_the_one_sgd_step(monkeypatch):
    calls = []
    real = training.sgd_step
    monkeypatch.setattr(training, "sgd_step", lambda opt, loss: (calls.append(float(loss.detach())), real(opt, loss)))
    data = tiny_dataset(per_class=7)
    train_ensemble(create_model("mlp", 1, 3, 8, seed=0), data.normalized(), data.labels,
                   TrainSettings(epochs=2, lr=0.01, batch_size=8), make_generator(0))
    assert len(calls) == 2 * 3


# ---------------------------------------------------------------- schedule and the DC inner loop

def test_lr_decay_factor_one_means_no_decay_and_no_optimiser_restart():
    data = tiny_dataset(per_class=4)
    x, y = data.normalized(), data.labels

    def run(**kw):
        model = create_model("convnet-d1", 1, 3, 8, seed=0)
        train_ensemble(model, x, y, TrainSettings(epochs=4, lr=0.05, batch_size=5, **kw), make_generator(1))
        return weights(model)

    never = run(decay_epoch=4)  # at or past the last epoch: no decay
    assert TrainSettings(epochs=4, lr=0.1, lr_decay_factor=1.0, decay_epoch=2).first_decayed_epoch is None
    assert TrainSettings(epochs=4, lr=0.1, decay_epoch=2).first_decayed_epoch == 2
    assert TrainSettings(epochs=4, lr=0.1).first_decayed_epoch == 2  # lr_decay_at 0.5
    assert torch.equal(run(lr_decay_factor=1.0, decay_epoch=2), never)
    assert torch.equal(run(lr_decay_factor=1.0), never)
    # a decay with an unchanged lr would still restart momentum: different weights
    assert not torch.equal(run(lr_decay_factor=0.999999, decay_epoch=2), never)


def test_dc_inner_loop_call_equals_plain_sgd():
    """The call DC's inner loop makes: members=1, momentum 0, no weight decay, no lr decay."""
    data = tiny_dataset(per_class=5)
    x, y = data.normalized(), data.labels
    lr, bs, epochs = 0.05, 4, 3
    st = TrainSettings(epochs=epochs, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=bs, lr_decay_factor=1.0,
                       precision="fp32", compile=False)
    net = create_model("convnet-d2", 1, 3, 8, members=1, seed=2)
    train_ensemble(net, x.detach(), y, st, make_generator(5))
    ref = create_model("convnet-d2", 1, 3, 8, members=1, seed=2)
    gen = make_generator(5)
    for _ in range(epochs):
        perm = torch.argsort(torch.rand(1, len(y), generator=gen), dim=1)[0]
        for b0 in range(0, len(y), bs):
            idx = perm[b0:b0 + bs]
            loss = F.cross_entropy(ref(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(ref.parameters()))
            with torch.no_grad():
                for p, g in zip(ref.parameters(), grads):
                    p -= lr * g
    torch.testing.assert_close(weights(net), weights(ref), rtol=1e-5, atol=1e-6)


def test_dc_inner_loop_call_learns_a_tiny_set_with_augmentation():
    data = tiny_dataset(per_class=4)
    test = tiny_dataset(per_class=10, split="test", seed=0)
    net = create_model("convnet", 1, 3, 8, members=1, seed=0)
    before = training.test_accuracy(net, test.normalized(), test.labels)[0]
    st = TrainSettings(epochs=40, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=256, lr_decay_factor=1.0,
                       precision="fp32", compile=False)
    log = []
    train_ensemble(net, data.normalized(), data.labels, st, make_generator(0), DSA(default_strategy("tiny")),
                   on_epoch=lambda *a: log.append(a))
    assert len(log) == 40
    assert log[-1][1] < log[0][1] - 0.1
    after = training.test_accuracy(net, test.normalized(), test.labels)[0]
    assert before < 0.7 and after > 0.9, (before, after)


def test_train_settings_validation_names_field_and_range():
    with pytest.raises(ConfigError, match=r"TrainSettings lr must be a finite number > 0, got nan"):
        TrainSettings(epochs=1, lr=math.nan)
    with pytest.raises(ConfigError, match=r"TrainSettings momentum must be a finite number in \[0, 1\), got 1"):
        TrainSettings(epochs=1, lr=0.1, momentum=1)
    with pytest.raises(ConfigError, match="TrainSettings batch_size must be an integer >= 1, got 0"):
        TrainSettings(epochs=1, lr=0.1, batch_size=0)
    with pytest.raises(ConfigError, match="TrainSettings epochs must be an integer >= 0, got -1"):
        TrainSettings(epochs=-1, lr=0.1)
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        TrainSettings(epochs=1, lr=0.1, precision="auto")
    assert TrainSettings(epochs=0, lr=0.1, lr_decay_factor=0.0).epochs == 0  # factor 0 freezes the weights


def test_non_finite_loss_raises_numerical_error():
    data = tiny_dataset(per_class=2)
    x = data.normalized().clone()
    x[0] = float("nan")
    with pytest.raises(NumericalError, match="training loss became nan at epoch 0"):
        train_ensemble(create_model("mlp", 1, 3, 8, seed=0), x, data.labels,
                       TrainSettings(epochs=1, lr=0.1, batch_size=100), make_generator(0))


def test_test_accuracy_reports_progress_per_batch():
    data = tiny_dataset(per_class=9)  # 27 images, batches of 10: 3 batches
    model = create_model("convnet-d1", 1, 3, 8, members=2, seed=0)
    seen = []
    accs = training.test_accuracy(model, data.normalized(), data.labels, batch_size=10,
                                  progress=lambda *a: seen.append(a))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert model.training  # left in train mode
    with torch.no_grad():
        model.eval()
        out = model(data.normalized())
    expected = (out.argmax(-1) == data.labels.view(-1, 1)).double().mean(0).tolist()
    assert accs == expected


# ---------------------------------------------------------------- torch.compile

COMPILE_MODELS = ["convnet-d1", "mlp", "convnet-d2"]


@pytest.fixture
def recompile_limit_2():
    """torch's compiler gives up on a code object after 2 graphs (default 8) during the test."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=2):
        yield


def _compiled_eval(models, epochs=2):
    train = tiny_dataset(per_class=7)  # 21 images, batch 8: a full and a short batch shape
    test = tiny_dataset(per_class=5, split="test", seed=1)
    proto = Protocol.preset("quick", epochs=epochs, num_models=2, precision="fp32", compile=True, batch_size=8)
    return evaluate_tensors(train.normalized(), train.labels, train.info, test, models, proto, seed=0)


def test_compiled_forwards_never_hit_the_recompile_limit(monkeypatch, capfd, recwarn, recompile_limit_2):
    """One compiled callable per network and mode: each holds at most 2 graphs (full and short batch).

    With the limit lowered to 2, compiling ``model`` itself (train and test share its code object)
    gives up; tinyset's per-mode callables never do, for several architectures in one process.
    """
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")  # dynamo's caching, without code generation
    # control: the old way (torch.compile(model) for training and testing) exceeds the limit
    failed = training._failed_frames()
    model = create_model("mlp", 1, 3, 8, members=2, seed=0)
    old_way = torch.compile(model, dynamic=False, backend="eager")
    with training.quiet_compiler():
        for b in (8, 5):
            old_way(torch.randn(b, 2, 8, 8)).sum().backward()
        with torch.no_grad():
            old_way(torch.randn(15, 1, 8, 8))
    assert training._failed_frames() > failed
    capfd.readouterr()

    failed = training._failed_frames()
    res = _compiled_eval(COMPILE_MODELS)
    assert training._failed_frames() == failed
    assert res.protocol["compiled"] is True and "compile_fallback" not in res.protocol
    out, err = capfd.readouterr()
    assert "dynamo" not in out + err and "recompile" not in out + err
    assert not [w for w in recwarn if "dynamo" in str(w.message) or "compile" in str(w.message)]
    eager = _compiled_eval_eager(COMPILE_MODELS)
    for a, b in zip(res.results, eager.results):
        assert a.accuracies == pytest.approx(b.accuracies, abs=1e-9)


def _compiled_eval_eager(models):
    train = tiny_dataset(per_class=7)
    test = tiny_dataset(per_class=5, split="test", seed=1)
    proto = Protocol.preset("quick", epochs=2, num_models=2, precision="fp32", compile=False, batch_size=8)
    return evaluate_tensors(train.normalized(), train.labels, train.info, test, models, proto, seed=0)


def test_compile_failure_falls_back_to_eager_quietly(monkeypatch, capfd, recwarn):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(training, "COMPILE_BACKEND", broken_backend)
    res = _compiled_eval(["mlp"])
    assert res.protocol["compiled"] is False
    assert set(res.protocol["compile_fallback"]["mlp"]) == {"train", "test"}
    assert "no compiler here" in res.protocol["compile_fallback"]["mlp"]["train"]
    out, err = capfd.readouterr()
    assert "no compiler here" not in out + err and "Traceback" not in err
    assert not [w for w in recwarn if "compile" in str(w.message)]
    # the fallback computes exactly what eager training computes
    assert res.results[0].accuracies == _compiled_eval_eager(["mlp"]).results[0].accuracies


@pytest.mark.slow
def test_inductor_compiles_train_and_test_for_two_architectures(capfd, recwarn, recompile_limit_2):
    """The real compiler (inductor): two architectures, train + test, no recompile-limit hit, no output."""
    failed = training._failed_frames()
    res = _compiled_eval(["mlp", "convnet-d1"], epochs=1)
    assert training._failed_frames() == failed
    assert res.protocol["compiled"] is True, res.protocol.get("compile_fallback")
    out, err = capfd.readouterr()
    assert "dynamo" not in out + err and "recompile" not in out + err
    assert not [w for w in recwarn if "dynamo" in str(w.message)]
    assert all(0.0 <= a <= 1.0 for r in res.results for a in r.accuracies)


def test_compiler_giving_up_is_recorded_and_silent(monkeypatch, capfd):
    """When the compiler skips a frame (here: a limit of 1 graph, hit by the short last batch),
    training goes on eagerly with the same numbers and the result says ``compiled: false``."""
    import torch._dynamo

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        res = _compiled_eval(["mlp"])
    assert res.protocol["compiled"] is False
    assert "skipped" in res.protocol["compile_fallback"]["mlp"]["train"]
    assert "test" not in res.protocol["compile_fallback"]["mlp"]  # one test batch shape: compiled fine
    out, err = capfd.readouterr()
    assert "dynamo" not in out + err and "recompile" not in out + err
    assert res.results[0].accuracies == _compiled_eval_eager(["mlp"]).results[0].accuracies
