"""Seconds per evaluated model: tinyset's batched evaluator against upstream's ``evaluate_synset``.

Setting (issues #2, #12): MNIST, 10 random real images per class, ConvNets, DSA, SGD as in the
evaluation protocol, test pass on the 10,000 test images included. Contenders:

* ``upstream``: VICO-UoE/DatasetCondensation's own ``get_network('ConvNet')`` + ``evaluate_synset``
  (cloned at benchmark time or ``--upstream DIR``, see ``upstream.py``), one model after another,
  with tinyset's DSA strategy for the dataset (no flips on digits) so that accuracies compare;
* ``reference``: the reference-style loop of ``reference_loop.py`` (plain fp32 ``torch.nn``), used
  where upstream cannot be fetched; its cost relative to upstream is printed;
* ``tinyset``: all models as one batched ensemble (bf16 autocast where the CPU has native bf16,
  torch.compile).

The per-model contenders are run in turns around tinyset's ensemble (upstream model 1, reference
model 1, tinyset, upstream model 2, ...), because the machine may be shared. All report test
accuracy after the last epoch, so the speed-up can be checked for accuracy loss.

    python benchmarks/bench_evaluate.py --data-root ../shared/datasets --epochs 1000 --models 5 --ref-models 2
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream as upstream_code  # noqa: E402
from reference_loop import reference_train_one  # noqa: E402

from tinyset.augment import DSA, default_strategy  # noqa: E402
from tinyset.data import load_dataset  # noqa: E402
from tinyset.evaluate import Protocol, evaluate_tensors  # noqa: E402
from tinyset.select import select  # noqa: E402
from tinyset.runtime import describe_machine, tune_allocator  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--models", type=int, default=5, help="models in tinyset's ensemble")
    ap.add_argument("--ref-models", type=int, default=2,
                    help="models of each one-after-another contender (seconds per model do not depend on it)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--upstream", default="auto",
                    help="VICO-UoE/DatasetCondensation: auto (git clone when reachable), off, or a checkout / git dir")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine(), flush=True)  # the CPU kind goes beside every timing
    where, how = upstream_code.locate(args.upstream)
    print(f"upstream code: {how}", flush=True)
    up = upstream_code.load(where) if where else None

    train = load_dataset(args.dataset, "train", root=args.data_root)
    test = load_dataset(args.dataset, "test", root=args.data_root)
    syn = select("random", train, args.ipc, seed=0).synset
    info = train.info
    strategy = default_strategy(args.dataset)
    aug = DSA(strategy)
    tx, ty = test.normalized(), test.labels
    out: dict = {"dataset": args.dataset, "ipc": args.ipc, "epochs": args.epochs, "models": args.models,
                 "threads": torch.get_num_threads(), "machine": describe_machine(), "dsa_strategy": strategy}

    per_model: dict[str, tuple[str, object]] = {}
    if up:
        uargs = upstream_code.upstream_args(up, True, strategy, epoch_eval_train=args.epochs)
        images = syn.images.clone(memory_format=torch.contiguous_format)
        per_model["upstream"] = ("upstream get_network + evaluate_synset, fp32, one model after another",
                                 lambda m: upstream_code.evaluate(up, uargs, images, syn.labels, tx, ty,
                                                                  info.channels, info.num_classes,
                                                                  info.image_size, seed=m))
    if not args.skip_reference:
        per_model["reference"] = ("reference_loop.py, fp32, one model after another",
                                  lambda m: reference_train_one(syn.images, syn.labels, tx, ty, args.epochs, seed=m,
                                                                augment=aug))
    times: dict[str, list[float]] = {name: [] for name in per_model}
    cpu: dict[str, list[float]] = {name: [] for name in per_model}
    accs: dict[str, list[float]] = {name: [] for name in per_model}

    def one_model(m: int) -> None:
        for name, (_, fn) in per_model.items():
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                accs[name].append(fn(m))
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            print(f"  {name} model {m + 1}: {times[name][-1]:7.1f} s (cpu {cpu[name][-1]:7.1f} s), "
                  f"acc {100 * accs[name][-1]:.2f}", flush=True)

    one_model(0)
    proto = Protocol.preset("dsa", epochs=args.epochs, num_models=args.models)
    # the allocator setting the tinyset command applies; it cannot be undone, so the per-model contenders'
    # later turns run with it too (which can only make them faster: the speed-up is then an underestimate)
    tune_allocator()
    t, c = time.perf_counter(), time.process_time()
    res = evaluate_tensors(syn.images, syn.labels, info, test, ["convnet"], proto, seed=0)
    ours_s = (time.perf_counter() - t) / args.models
    ours_cpu = (time.process_time() - c) / args.models
    r, proto_used = res.results[0], res.protocol
    print(f"  tinyset {args.models} models: {ours_s * args.models:7.1f} s (cpu {ours_cpu * args.models:7.1f} s)",
          flush=True)
    for m in range(1, args.ref_models):
        one_model(m)

    for name, (desc, _) in per_model.items():
        sec = statistics.mean(times[name])
        sd = statistics.pstdev(accs[name]) if len(accs[name]) > 1 else 0.0
        out[name] = {"seconds_per_model": sec, "cpu_seconds_per_model": statistics.mean(cpu[name]),
                     "turns": times[name], "cpu_turns": cpu[name], "accuracies": accs[name]}
        print(f"{name:<9}: {sec:7.1f} s/model (cpu {statistics.mean(cpu[name]):7.1f} s)  "
              f"acc {100 * statistics.mean(accs[name]):.2f} ± {100 * sd:.2f}  ({desc}, {len(accs[name])} models)")
    out["tinyset"] = {"seconds_per_model": ours_s, "cpu_seconds_per_model": ours_cpu, "accuracies": r.accuracies,
                      "precision": proto_used.get("precision_used"), "compiled": proto_used.get("compiled")}
    print(f"tinyset  : {ours_s:7.1f} s/model (cpu {ours_cpu:7.1f} s)  acc {100 * r.mean:.2f} ± {100 * r.std:.2f}  "
          f"({proto_used.get('precision_used')}, compiled={proto_used.get('compiled')}, batched x{args.models})")
    for name in per_model:
        out[f"speedup_vs_{name}"] = out[name]["seconds_per_model"] / ours_s
        out[f"cpu_speedup_vs_{name}"] = out[name]["cpu_seconds_per_model"] / ours_cpu
        print(f"speed-up : {out[f'speedup_vs_{name}']:.2f}x against {name} (seconds per evaluated model; "
              f"{out[f'cpu_speedup_vs_{name}']:.2f}x in CPU seconds of this process, which a busy neighbour "
              f"distorts less)")
    if "upstream" in per_model and "reference" in per_model:
        ratio = out["reference"]["seconds_per_model"] / out["upstream"]["seconds_per_model"]
        out["reference_cost_vs_upstream"] = ratio
        print(f"check    : the reference loop costs {ratio:.2f}x upstream's time")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
