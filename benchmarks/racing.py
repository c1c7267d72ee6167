"""Interleaved timing for the benchmarks: the machine may be shared, so a speed is only quoted as a
ratio of contenders timed in alternating turns in one process, never as one absolute time.

``race`` runs every contender once to warm up, then ``reps`` rounds in which each contender takes one
turn, in a fixed order; it records the wall seconds of every turn and, in ``cpu`` when given, the CPU
seconds of the process during the turn. ``report`` prints the medians and tinyset's speed-up against
every other contender (and, where upstream's own code ran, what each reference-style loop costs
relative to it, so that the reference can be checked). Given the CPU seconds too, it prints the
speed-up in CPU seconds beside the wall one: with one thread per contender, a neighbour's job on the
same core slows a turn's wall time but not its CPU time, so the CPU ratio is the steadier of the two.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import sys
import time
from typing import Callable

Contenders = dict[str, tuple[str, Callable[[], object]]]


def race(label: str, contenders: Contenders, reps: int, cpu: dict[str, list[float]] | None = None
         ) -> dict[str, list[float]]:
    """Wall seconds of every timed turn per contender (one untimed warm-up round first); prints each turn."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    if cpu is not None:
        cpu.update({name: [] for name in contenders})
    quiet = io.StringIO()  # upstream prints a line per evaluation / epoch
    for rnd in range(reps + 1):
        for name, (_, fn) in contenders.items():
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(quiet):
                fn()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if rnd:
                times[name].append(dt)
                if cpu is not None:
                    cpu[name].append(dc)
            print(f"  {label} {'warm-up' if not rnd else f'turn {rnd}'} {name:<10}: {dt:7.2f} s (cpu {dc:7.2f} s)",
                  flush=True)
    return times


def report(label: str, contenders: Contenders, times: dict[str, list[float]], unit: str, threads: int, prec: str,
           extra: dict, cpu: dict[str, list[float]] | None = None) -> dict:
    """Print the medians and the speed-ups (tinyset against each other contender); with ``cpu`` (the CPU
    seconds ``race`` recorded) also the medians and speed-ups in CPU seconds."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cmed = {name: statistics.median(ts) for name, ts in cpu.items()} if cpu else {}
    for name, (desc, _) in contenders.items():
        in_cpu = f" (cpu {cmed[name]:.2f} s)" if name in cmed else ""
        print(f"{label:<8} {name:<10}: {med[name]:7.2f} s/{unit}{in_cpu}  ({desc}; {threads} threads)")
    out = {"seconds": med, "turns": times, "threads": threads, "precision": prec, **extra}
    if cmed:
        out["cpu_seconds"], out["cpu_turns"] = cmed, cpu
    for name in med:
        if name != "tinyset":
            out[f"speedup_vs_{name}"] = med[name] / med["tinyset"]
            line = f"{label:<8} speed-up  : {med[name] / med['tinyset']:.2f}x against {name}"
            if cmed:
                out[f"cpu_speedup_vs_{name}"] = cmed[name] / cmed["tinyset"]
                line += f" (wall medians); {cmed[name] / cmed['tinyset']:.2f}x in CPU seconds"
            print(line)
    if "upstream" in med:
        for name in med:
            if name.startswith("reference"):
                out[f"{name}_cost_vs_upstream"] = med[name] / med["upstream"]
                print(f"{label:<8} check     : {name} costs {med[name] / med['upstream']:.2f}x upstream's time")
    sys.stdout.flush()
    return out


def race_report(label: str, contenders: Contenders, reps: int, unit: str, threads: int, prec: str,
                extra: dict) -> dict:
    """:func:`race` then :func:`report`, with the CPU seconds (the record's ``turns`` and ``cpu_turns``)."""
    cpu: dict[str, list[float]] = {}
    return report(label, contenders, race(label, contenders, reps, cpu), unit, threads, prec, extra, cpu=cpu)
