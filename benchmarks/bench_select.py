"""Seconds and peak memory of ``tinyset select``: ``random``, the ``mi`` selector (both estimators)
and the ``rl`` selector under its recipes (``mps1``, ``mps2u``, ``mutual-info``).

Setting (issue #11): MNIST training split (60,000 images), 10 and 50 images per class, the
selectors' default options or the recipe's values, seed 0. Targets on a 2-core CPU: ``select
--method mi`` within 2 minutes, ``select --method rl`` at ipc 50 within 10 minutes.

Every (method, ipc) runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its
own and no run profits from another's warm caches. A run's seconds are those of
:func:`tinyset.select.select` (what ``tinyset select`` spends between loading the data and writing
the file); loading the training split is timed apart. Only the training split is read.

    OMP_NUM_THREADS=2 python benchmarks/bench_select.py --data-root ../shared/datasets

Threads are set as the ``tinyset`` command sets them (``TINYSET_THREADS``, else the CPUs this
process may use); each run prints the count it used.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

#: (label, method, options) of the runs
RUNS = [
    ("random", "random", {}),
    ("mi (probe)", "mi", {"estimator": "probe"}),
    ("mi (knn)", "mi", {"estimator": "knn"}),
    ("rl (mps1)", "rl", {"recipe": "mps1"}),
    ("rl (mps2u)", "rl", {"recipe": "mps2u"}),
    ("rl (mutual-info)", "rl", {"recipe": "mutual-info"}),
]


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def one_run(args: argparse.Namespace) -> None:
    """Child process: one timed selection; prints one JSON line."""
    import torch

    from tinyset.data import load_dataset
    from tinyset.runtime import resolve_runtime, tune_allocator
    from tinyset.select import select

    rt = resolve_runtime("cpu", "auto")  # threads as the tinyset command sets them (OMP_NUM_THREADS, CPUs)
    tune_allocator()  # as the tinyset command does
    options = json.loads(args.options)  # selector options, or {"recipe": NAME}
    t = time.perf_counter()
    train = load_dataset(args.dataset, "train", root=args.data_root)
    load_s = time.perf_counter() - t
    res = select(args.method, train, args.ipc, seed=args.seed, device=rt.device, **options)
    counts = torch.bincount(train.labels[res.indices], minlength=train.info.num_classes).tolist()
    record = res.synset.meta.get("selector_record", {})  # iterative selectors: where the run stopped
    run = {k: record[k] for k in ("iterations", "best_iteration", "best_reward", "stopped_early") if k in record}
    print(json.dumps({"seconds": res.seconds, "load_seconds": load_s, "peak_rss_mib": peak_rss_mib(),
                      "threads": torch.get_num_threads(), "per_class": sorted(set(counts)),
                      "precision": rt.precision, "n": len(train), "run": run}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="run only the runs whose label contains this text")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "IPC"), help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.method, args.ipc = args.one[0], int(args.one[1])
        one_run(args)
        return

    from tinyset.runtime import describe_machine, resolve_runtime

    print(describe_machine(resolve_runtime("cpu", "auto", configure=False)), flush=True)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
          f"TINYSET_THREADS={os.environ.get('TINYSET_THREADS', '(unset)')}; {args.dataset} train split, "
          f"seed {args.seed}, default options; one fresh process per run", flush=True)
    rows = []
    for label, method, options in RUNS:
        if args.only and args.only not in label:
            continue
        for ipc in args.ipcs:
            cmd = [sys.executable, __file__, "--one", method, str(ipc), "--options", json.dumps(options),
                   "--data-root", args.data_root, "--dataset", args.dataset, "--seed", str(args.seed)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(f"{label:16s} ipc {ipc:3d}: FAILED (exit {proc.returncode})", flush=True)
                rows.append({"run": label, "ipc": ipc, "failed": proc.returncode})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"run": label, "ipc": ipc, "process_wall_seconds": wall, **r})
            print(f"{label:16s} ipc {ipc:3d}: select {r['seconds']:7.1f} s  (load {r['load_seconds']:.1f} s, "
                  f"whole process {wall:.1f} s)  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"threads {r['threads']}  {r['precision']}  per class {r['per_class']}"
                  + (f"  iterations {r['run']['iterations']} (stopped early: {r['run']['stopped_early']}; best "
                     f"validation reward {r['run']['best_reward']:.4f} at iteration {r['run']['best_iteration']})"
                     if "iterations" in r.get("run", {}) and "best_reward" in r["run"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "seed": args.seed, "runs": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
