import json

import pytest

from tinyset.cli import build_parser, main
from tinyset.results import result_from_dict
from tinyset.synset import SyntheticSet


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("datasets", "select", "distill", "evaluate", "baseline", "show", "export", "models", "sample"):
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
    assert (res["schema"], res["schema_version"], res["kind"]) == ("tinyset.result", 1, "evaluation")
    assert [r["model"] for r in res["results"]] == ["convnet-d1", "mlp"]
    row = res["results"][0]
    assert len(row["accuracies"]) == 2 and row["mean"] == pytest.approx(sum(row["accuracies"]) / 2)
    assert res["protocol"]["epochs"] == 3 and res["protocol"]["name"] == "quick"
    assert res["file"] == str(f) and res["dataset"] == "digits" and res["num_images"] == 20
    assert result_from_dict(res).results[1].model == "mlp"
    assert main(["show", str(f), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    try:
        status = main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "distill" else []))
    except SystemExit as exc:  # a usage error found by argparse
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "o").exists()


def test_unknown_method_rejected_by_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--method", "no-such-method-ever", "--dataset", "digits", "--ipc", "1"])


def test_select_json_is_a_typed_result(tmp_path, capsys):
    f, js = tmp_path / "r.safetensors", tmp_path / "sel.json"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--seed", "3",
                 "--out", str(f), "--json", str(js)]) == 0
    assert f"results written to {js}" in capsys.readouterr().out
    res = json.loads(js.read_text())
    assert (res["schema"], res["schema_version"], res["kind"]) == ("tinyset.result", 1, "selection")
    assert (res["method"], res["dataset"], res["ipc"], res["seed"]) == ("random", "digits", 2, 3)
    assert len(res["indices"]) == 20 and res["file"] == str(f)
    assert SyntheticSet.load(f).meta["source_indices"] == res["indices"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    f = tmp_path_factory.mktemp("set") / "r.safetensors"
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--out", str(f)]) == 0
    return f


@pytest.mark.parametrize("suffix,magic,fmt", [(".jpg", b"\xff\xd8\xff", "JPEG"), (".JPEG", b"\xff\xd8\xff", "JPEG"),
                                              (".bmp", b"BM", "BMP"), (".gif", b"GIF8", "GIF"),
                                              (".webp", b"RIFF", "WEBP"), (".tiff", b"II", "TIFF")])
def test_show_format_follows_suffix(small_set, tmp_path, suffix, magic, fmt):
    from PIL import Image

    out = tmp_path / f"grid{suffix}"
    assert main(["show", str(small_set), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(magic)
    with Image.open(out) as im:
        assert im.format == fmt


def test_show_upscale_is_bounded_and_applied(small_set, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "g.png"
    assert main(["show", str(small_set), "--out", str(out), "--upscale", "1000"]) == 2
    assert "--upscale 1000" in capsys.readouterr().err and not out.exists()
    assert main(["show", str(small_set), "--out", str(out), "--upscale", "2"]) == 0
    with Image.open(out) as im:  # digits: 8x8 images, 10 classes x 2 per class, 2 px padding
        assert im.size == (2 * (16 + 2) + 2, 10 * (16 + 2) + 2)


def test_force_replaces_existing_outputs(small_set, tmp_path, capsys):
    png, npz, folder = tmp_path / "g.png", tmp_path / "x.npz", tmp_path / "folder"
    for p in (png, npz):
        p.write_bytes(b"old")
    assert main(["show", str(small_set), "--out", str(png)]) == 2
    assert png.read_bytes() == b"old"
    assert main(["show", str(small_set), "--out", str(png), "--force"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["export", str(small_set), "--format", "npz", "--out", str(npz), "--force"]) == 0
    assert npz.read_bytes()[:2] == b"PK"
    assert main(["export", str(small_set), "--format", "imagefolder", "--out", str(folder)]) == 0
    assert main(["export", str(small_set), "--format", "imagefolder", "--out", str(folder)]) == 2
    assert main(["export", str(small_set), "--format", "imagefolder", "--out", str(folder), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "not empty" in err and "overwrite=" not in err and "=True" not in err
    assert len(list(folder.glob("*/*.png"))) == 20


def test_json_with_force_replaces_and_without_keeps(small_set, tmp_path):
    js = tmp_path / "res.json"
    js.write_text("{}\n")
    argv = ["evaluate", str(small_set), "--models", "convnet-d1", "--protocol", "quick", "--epochs", "1",
            "--num-models", "1", "--precision", "fp32", "--json", str(js)]
    assert main(argv) == 2
    assert js.read_text() == "{}\n"
    assert main(argv + ["--force"]) == 0
    assert json.loads(js.read_text())["kind"] == "evaluation"


def test_methods_names_a_pinned_auto_precision(capsys):
    assert main(["methods", "pad"]) == 0
    assert "--precision auto runs fp32 for this method" in capsys.readouterr().out
    assert main(["methods", "mtt"]) == 0
    assert "--precision auto runs" not in capsys.readouterr().out
    assert main(["methods", "dm"]) == 0
    assert "--precision auto runs" not in capsys.readouterr().out
