"""Expert trajectories: storage, lazy loading, resume, compatibility checks, the CLI."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tinyset.experts as experts_mod
from conftest import tiny_dataset
from tinyset.data import load_dataset
from tinyset.data.base import DatasetInfo
from tinyset.errors import ArtifactError, ConfigError
from tinyset.experts import ExpertSet, ExpertSettings, check_compatible, shard_name, train_experts
from tinyset.models import create_model
from tinyset.rng import make_generator

MODEL, ARGS = "convnet-d1", {"width": 4}


def _settings(**kw):
    base = dict(epochs=3, members=2, lr=0.05, batch_size=128, compile=False)
    base.update(kw)
    return ExpertSettings(**base)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("experts") / "set"
    torch.set_num_threads(1)
    train_experts(digits, out, 3, MODEL, _settings(), seed=5, model_args=ARGS)
    return out


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("chunk_*/epoch_*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[f"{f.parent.name}/{f.name}/{k}"] = h.get_tensor(k)
    return out


def test_layout_manifest_and_validation_accuracy(expert_dir, digits):
    es = ExpertSet(expert_dir)
    m = es.manifest
    assert es.complete() == [0, 1, 2] and es.epochs == 3 and es.num_experts == 3
    assert m["dataset"]["name"] == "digits" and m["zca"] is False and m["model"] == MODEL
    assert m["model_args"]["width"] == 4 and m["model_args"]["depth"] == 1
    assert m["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 128,
                              "lr_decay": False, "first_decayed_epoch": None, "lr_decay_factor": 0.1}
    assert m["normalisation"] == {"mean": [0.3054], "std": [0.3753]}
    assert m["augment"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"  # no flips for digits
    # validation split held out of the training data: min(100, smallest class // 10) per class
    per_class = min(digits.class_counts()) // 10
    assert m["validation"]["per_class"] == per_class == 13
    assert m["val_images"] == 10 * per_class and m["train_images"] == len(digits) - 10 * per_class
    # chunks of `members` experts, one shard per chunk and epoch 0..E
    files = sorted(str(p.relative_to(expert_dir)) for p in expert_dir.glob("chunk_*/*.safetensors"))
    assert files == [shard_name(c, t) for c in (0, 1) for t in range(4)]
    for i in range(3):
        acc = es.val_acc(i)
        assert len(acc) == 4 and all(0 <= a <= 1 for a in acc)
        assert acc[-1] > acc[0] + 0.2, acc  # the experts learn (10 classes: chance is 0.1)
        assert es.manifest["experts"][i]["train_loss"][0] is None and len(es.manifest["experts"][i]["train_loss"]) == 4
    # each expert records its own training loss, not its chunk's mean (experts 0 and 1 train side by side)
    loss0, loss1 = (es.manifest["experts"][i]["train_loss"][1:] for i in (0, 1))
    assert all(a > 0 and b > 0 and a != b for a, b in zip(loss0, loss1))
    assert loss0[-1] < loss0[0] and loss1[-1] < loss1[0]


def test_epoch0_is_the_initialisation_and_stored_epochs_differ(expert_dir):
    """The upstream CPU bug (every stored epoch aliasing the live weights) cannot happen here."""
    es = ExpertSet(expert_dir)
    for i in range(3):
        init = create_model(MODEL, 1, 10, 8, generator=make_generator(es.manifest["experts"][i]["init_seed"]), **ARGS)
        state0 = es.epoch_state(i, 0)
        assert set(state0) == set(init.state_dict())
        for k, v in init.state_dict().items():
            assert torch.equal(state0[k], v), k
        flats = [es.flat_params(i, t) for t in range(4)]
        assert flats[0].numel() == es.num_params() == sum(p.numel() for p in init.parameters())
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(flats[a], flats[b]), (i, a, b)
        # distance from the start grows along the trajectory
        d = [float((f - flats[0]).norm()) for f in flats]
        assert d[1] < d[2] < d[3]
    # experts start from different initialisations
    assert not torch.equal(es.flat_params(0, 0), es.flat_params(1, 0))
    net = es.load_model(1, 3)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]), es.flat_params(1, 3))


def test_loader_streams_one_expert_and_one_epoch_at_a_time(expert_dir, monkeypatch):
    es = ExpertSet(expert_dir)  # reads only the manifest
    calls = []
    real = experts_mod._read_shard

    def spy(path, keys=None):
        calls.append((Path(path).relative_to(expert_dir).as_posix(), None if keys is None else list(keys)))
        return real(path, keys)

    monkeypatch.setattr(experts_mod, "_read_shard", spy)
    traj = es.trajectory(2)
    assert calls == []  # lazy: nothing read yet
    first = next(traj)
    assert len(calls) == 1 and calls[0][0] == shard_name(1, 0)
    assert all(k.startswith("expert.2.") for k in calls[0][1])  # only expert 2's tensors of that shard
    rest = list(traj)
    assert len(rest) == 3 and [c[0] for c in calls] == [shard_name(1, t) for t in range(4)]
    assert all(k.startswith("expert.2.") for _, keys in calls for k in keys)
    assert set(first) == set(es.param_names())


def test_resume_after_a_killed_epoch_gives_identical_trajectories(tmp_path, digits, monkeypatch, expert_dir):
    """Killed after epoch 2's shard was written but before the manifest said so: resume redoes epoch 2."""
    out = tmp_path / "set"
    real_write = experts_mod.write_json
    writes = {"n": 0}

    def dying_write(path, obj):
        writes["n"] += 1
        if writes["n"] == 4:  # start, epoch 0, epoch 1 of chunk 0 done; this would record epoch 2
            raise KeyboardInterrupt("kill")
        real_write(path, obj)

    monkeypatch.setattr(experts_mod, "write_json", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train_experts(digits, out, 3, MODEL, _settings(), seed=5, model_args=ARGS)
    monkeypatch.setattr(experts_mod, "write_json", real_write)
    m = json.loads((out / "manifest.json").read_text())
    assert [r["completed_epoch"] for r in m["experts"]] == [1, 1, -1]
    assert (out / shard_name(0, 2)).exists()  # written, but not yet recorded
    (out / shard_name(0, 2)).write_bytes(b"torn")  # whatever is there is redone
    es = train_experts(digits, out, 3, MODEL, _settings(), seed=5, model_args=ARGS, resume=True)
    full, resumed = _all_tensors(expert_dir), _all_tensors(out)
    assert set(full) == set(resumed) and len(full) > 0
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    ref = ExpertSet(expert_dir)
    assert [ref.val_acc(i) for i in range(3)] == [es.val_acc(i) for i in range(3)]


def test_kill_9_loses_at_most_the_epoch_in_progress(tmp_path, expert_dir):
    """A real SIGKILL right after epoch 2 of chunk 0 was recorded; --resume finishes bit-exactly."""
    out = tmp_path / "set"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from tinyset.data import load_dataset
        from tinyset.experts import ExpertSettings, train_experts
        def progress(done, total, status):
            if status["kind"] == "epoch" and status["chunk"] == 0 and status["epoch"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train_experts(load_dataset("digits"), {str(out)!r}, 3, {MODEL!r},
                      ExpertSettings(epochs=3, members=2, lr=0.05, batch_size=128, compile=False), seed=5,
                      model_args={ARGS!r}, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [r["completed_epoch"] for r in m["experts"]] == [2, 2, -1]  # nothing recorded was lost
    es = train_experts(load_dataset("digits"), out, 3, MODEL, _settings(), seed=5, model_args=ARGS, resume=True)
    assert es.complete() == [0, 1, 2]
    full, resumed = _all_tensors(expert_dir), _all_tensors(out)
    assert set(full) == set(resumed)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_resume_with_other_settings_and_existing_folder_are_refused(expert_dir, digits, tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.lr=0\.05, this run asks for 0\.1"):
        train_experts(digits, expert_dir, 3, MODEL, _settings(lr=0.1), seed=5, model_args=ARGS, resume=True)
    with pytest.raises(ConfigError, match=r"seed=5, this run asks for 6"):
        train_experts(digits, expert_dir, 3, MODEL, _settings(), seed=6, model_args=ARGS, resume=True)
    with pytest.raises(ConfigError, match="already holds an expert set"):
        train_experts(digits, expert_dir, 3, MODEL, _settings(), seed=5, model_args=ARGS)
    with pytest.raises(ArtifactError, match="no expert set"):
        train_experts(digits, tmp_path / "none", 3, MODEL, _settings(), seed=5, model_args=ARGS, resume=True)
    # resuming a finished set changes nothing
    before = _all_tensors(expert_dir)
    train_experts(digits, expert_dir, 3, MODEL, _settings(), seed=5, model_args=ARGS, resume=True)
    after = _all_tensors(expert_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mismatches_name_both_values(expert_dir):
    es = ExpertSet(expert_dir)
    tiny = tiny_dataset()
    with pytest.raises(ConfigError, match=r"trained on dataset 'digits'; this run distils 'tiny'"):
        check_compatible(es, tiny.info, MODEL)
    other_norm = DatasetInfo("digits", 1, (8, 8), 10, tuple(str(i) for i in range(10)), (0.5,), (0.25,))
    with pytest.raises(ConfigError, match=r"mean \[0\.3054\] std \[0\.3753\]; this run uses mean \[0\.5\] std \[0\.25\]"):
        check_compatible(es, other_norm, MODEL)
    with pytest.raises(ConfigError, match=r"holds 'convnet-d1' networks; this run matches with model='convnet'"):
        check_compatible(es, es.info, "convnet")
    with pytest.raises(ConfigError, match=r"zca=False; this run uses zca=True"):
        check_compatible(es, es.info, MODEL, zca=True)
    check_compatible(es, es.info, "ConvNet_D1")  # registry spelling variants are the same model


def test_bad_requests_and_broken_files_give_clear_errors(expert_dir, tmp_path):
    es = ExpertSet(expert_dir)
    with pytest.raises(ConfigError, match=r"epoch 4 of expert 0 is not stored .*epochs 0\.\.3"):
        es.epoch_params(0, 4)
    with pytest.raises(ConfigError, match=r"expert index 3 out of range"):
        es.flat_params(3, 0)
    with pytest.raises(ArtifactError, match="no such folder"):
        ExpertSet(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match=r"manifest\.json: not a tinyset expert set"):
        ExpertSet(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a readable expert-set manifest"):
        ExpertSet(broken)
    # a missing shard is named
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(expert_dir, copy)
    (copy / shard_name(0, 2)).unlink()
    with pytest.raises(ArtifactError, match=r"chunk_0000/epoch_0002\.safetensors: missing expert shard"):
        ExpertSet(copy).flat_params(1, 2)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="epochs must be"):
        ExpertSettings(epochs=0)
    with pytest.raises(ConfigError, match="lr must be"):
        ExpertSettings(lr=float("nan"))
    with pytest.raises(ConfigError, match="members must be"):
        ExpertSettings(members=0)
    s = ExpertSettings(epochs=50, lr_decay=True)
    assert s.first_decayed_epoch == 27 and s.lr_at(26) == 0.01 and s.lr_at(27) == pytest.approx(0.001)


def _cli_args(*argv):
    import argparse

    from tinyset.cli import experts as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli, p.parse_args(list(argv))


def test_cli_trains_resumes_and_refuses(tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["--dataset", "digits", "--model", "convnet-d1", "--num-experts", "2", "--epochs", "2", "--members", "2",
            "--lr", "0.05", "--compile", "off", "--threads", "1", "--device", "cpu", "--precision", "fp32",
            "--out", str(out)]
    cli, args = _cli_args(*base)
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "2 experts (convnet-d1, 2 epochs each)" in text and f"--set experts={out}" in text
    assert "--method mtt " in text  # plain experts: the methods that declare expert_kind "plain"
    es = ExpertSet(out)
    assert es.complete() == [0, 1] and es.manifest["model_args"]["width"] == 128
    cli, args = _cli_args(*base)
    with pytest.raises(ConfigError, match="already holds an expert set"):
        cli.run(args)
    cli, args = _cli_args(*base, "--resume")
    assert cli.run(args) == 0
    cli, args = _cli_args(*base[:-1], str(tmp_path / "fresh"), "--resume")
    with pytest.raises(ArtifactError, match="no expert set"):
        cli.run(args)
    (tmp_path / "afile").write_text("x")
    cli, args = _cli_args(*base[:-1], str(tmp_path / "afile"))
    from tinyset.errors import OutputError

    with pytest.raises(OutputError, match="is a file"):
        cli.run(args)
    cli, args = _cli_args(*base[:3], "nosuchnet", *base[4:])
    with pytest.raises(ConfigError, match="'nosuchnet' is not a registered architecture"):
        cli.run(args)
