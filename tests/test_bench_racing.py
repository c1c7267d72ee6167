"""benchmarks/racing.py: the speed-up lines a benchmark prints and writes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from racing import race, race_report, report  # noqa: E402


def _contenders():
    return {"tinyset": ("ours", lambda: None), "upstream": ("theirs", lambda: None),
            "reference": ("ref", lambda: None)}


def test_report_gives_wall_and_cpu_speedups_from_medians(capsys):
    walls = {"tinyset": [1.0, 2.0, 9.0], "upstream": [6.0, 8.0, 30.0], "reference": [5.0, 7.0, 7.5]}
    cpu = {"tinyset": [1.0, 1.1, 1.2], "upstream": [4.0, 4.4, 4.6], "reference": [4.0, 4.2, 4.3]}
    out = report("DC", _contenders(), walls, "iteration", 1, "bf16", {"k": 1}, cpu=cpu)
    assert out["speedup_vs_upstream"] == pytest.approx(8.0 / 2.0)
    assert out["cpu_speedup_vs_upstream"] == pytest.approx(4.4 / 1.1)
    assert out["cpu_speedup_vs_reference"] == pytest.approx(4.2 / 1.1)
    assert out["reference_cost_vs_upstream"] == pytest.approx(7.0 / 8.0)
    assert out["cpu_seconds"]["tinyset"] == pytest.approx(1.1) and out["k"] == 1
    text = capsys.readouterr().out
    assert "4.00x against upstream (wall medians); 4.00x in CPU seconds" in text
    assert "3.82x in CPU seconds" in text


def test_report_without_cpu_seconds_prints_the_wall_ratio_alone(capsys):
    walls = {"tinyset": [1.0], "upstream": [3.0]}
    out = report("DM", {"tinyset": ("a", lambda: None), "upstream": ("b", lambda: None)}, walls, "iteration", 1,
                 "fp32", {})
    assert out["speedup_vs_upstream"] == pytest.approx(3.0) and "cpu_speedup_vs_upstream" not in out
    assert "CPU seconds" not in capsys.readouterr().out


def test_race_times_every_contender_in_alternating_turns(capsys):
    order = []
    contenders = {"a": ("", lambda: order.append("a")), "b": ("", lambda: order.append("b"))}
    cpu: dict = {}
    walls = race("X", contenders, 2, cpu)
    assert order == ["a", "b"] * 3  # one warm-up round, then two timed rounds
    assert [len(walls[k]) for k in "ab"] == [2, 2] and [len(cpu[k]) for k in "ab"] == [2, 2]
    assert "warm-up" in capsys.readouterr().out


def test_race_report_races_then_reports_with_cpu_seconds(capsys):
    out = race_report("Y", {"tinyset": ("", lambda: None), "reference": ("", lambda: None)}, 2, "pass", 1, "fp32", {})
    assert len(out["turns"]["tinyset"]) == 2 and len(out["cpu_turns"]["reference"]) == 2
    assert "cpu_speedup_vs_reference" in out and "in CPU seconds" in capsys.readouterr().out


def test_probe_winograd_computes_the_convolution_and_races_it(tmp_path):
    """benchmarks/probe_winograd.py: its F(4x4, 3x3) equals a 3x3 convolution with padding 1 (sizes that
    are and are not multiples of the tile), and a tiny race writes both timings, errors and the ratio."""
    import json
    import subprocess

    import torch
    import torch.nn.functional as F
    from probe_winograd import filter_transform, winograd_conv3x3

    gen = torch.Generator().manual_seed(0)
    for size in (8, 7, 5):
        x, w = torch.randn(3, 4, size, size, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
        ref = F.conv2d(x.double(), w.double(), padding=1)
        y = winograd_conv3x3(x, filter_transform(w))
        assert y.shape == ref.shape and torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    out = tmp_path / "w.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_winograd.py"
    run = subprocess.run([sys.executable, str(script), "--threads", "1", "--reps", "1", "--cases", "2:8:6",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "CPU:" in run.stdout and "winograd" in run.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["size"] == 6 and row["winograd_speedup"] > 0 and row["max_rel_error"]["winograd"] < 1e-4
