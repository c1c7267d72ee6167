import json

import pytest

from tinyset.cli import build_parser, main
from tinyset.synset import SyntheticSet


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("datasets", "select", "distill", "evaluate", "baseline", "show", "export", "models"):
        assert cmd in out


def test_datasets_lists_builtin_and_missing(tmp_path, capsys):
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "built in" in out and "missing" in out and "--download" in out


def test_select_evaluate_show_export_roundtrip(tmp_path, capsys):
    f = tmp_path / "r.safetensors"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(f)]) == 0
    s = SyntheticSet.load(f)
    assert len(s) == 20 and s.ipc == 2
    js = tmp_path / "res.json"
    assert main(["evaluate", str(f), "--models", "convnet-d1,mlp", "--protocol", "quick", "--epochs", "3",
                 "--num-models", "2", "--precision", "fp32", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "convnet-d1" in out and "mlp" in out and "protocol quick" in out
    res = json.loads(js.read_text())
    assert [r["model"] for r in res["results"]] == ["convnet-d1", "mlp"]
    assert len(res["results"][0]["accuracies"]) == 2 and res["protocol"]["epochs"] == 3
    assert main(["show", str(f), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(["export", str(f), "--format", "npz", "--out", str(tmp_path / "x.npz")]) == 0
    assert main(["export", str(f), "--format", "imagefolder", "--out", str(tmp_path / "folder")]) == 0
    assert len(list((tmp_path / "folder").glob("*/*.png"))) == 20


def test_distill_cli_writes_run_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "3",
                 "--batch-real", "8", "--model", "convnet-d1", "--out", str(out), "--final-eval", "off",
                 "--precision", "fp32"]) == 0
    assert (out / "synset.safetensors").exists() and (out / "final.png").exists()
    assert "distilled 10 images" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["distill", "--method", "dm", "--dataset", "digits", "--ipc", "500"], "ipc=500"),
    (["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "0"], "iterations"),
    (["distill", "--method", "dm", "--dataset", "nosuch", "--ipc", "1"], "unknown dataset"),
    (["select", "--method", "random", "--dataset", "mnist", "--ipc", "1", "--data-root", "/nonexistent"],
     "train-images-idx3-ubyte"),
    (["evaluate", "/nonexistent.safetensors"], "nonexistent"),
])
def test_bad_input_exits_2_with_specific_message(argv, match, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "distill" else [])) == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "o").exists()


def test_unknown_method_rejected_by_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1"])
