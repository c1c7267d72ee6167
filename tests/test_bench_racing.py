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
