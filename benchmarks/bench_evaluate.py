"""Seconds per evaluated model: tinyset's batched evaluator vs the reference loop.

Setting (issue #2): MNIST, 10 random real images per class, 5 ConvNets, DSA, SGD as in the
evaluation protocol. The reference loop trains the 5 models one after another in fp32 with plain
``torch.nn`` modules; tinyset trains them as one batched ensemble (bf16 autocast where the CPU
supports it, torch.compile). Both report test accuracy after the last epoch, so the speed-up can
be checked for accuracy loss.

    python benchmarks/bench_evaluate.py --data-root ../shared/datasets --epochs 1000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--ref-models", type=int, default=None,
                    help="models for the reference loop (default: --models); it is slow, and seconds "
                         "per model do not depend on how many are trained one after another")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(describe_machine(), flush=True)  # the CPU kind goes beside every timing

    train = load_dataset(args.dataset, "train", root=args.data_root)
    test = load_dataset(args.dataset, "test", root=args.data_root)
    syn = select("random", train, args.ipc, seed=0)
    out: dict = {"dataset": args.dataset, "ipc": args.ipc, "epochs": args.epochs, "models": args.models,
                 "threads": torch.get_num_threads()}

    if not args.skip_reference:  # the reference loop runs with the default allocator, as it does upstream
        aug = DSA(default_strategy(args.dataset))
        tx, ty = test.normalized(), test.labels
        accs = []
        t = time.perf_counter()
        ref_models = args.ref_models or args.models
        for m in range(ref_models):
            accs.append(reference_train_one(syn.images, syn.labels, tx, ty, args.epochs, seed=m, augment=aug))
        ref_s = (time.perf_counter() - t) / ref_models
        out["reference"] = {"seconds_per_model": ref_s, "accuracies": accs}
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        print(f"reference: {ref_s:7.1f} s/model  acc {100 * statistics.mean(accs):.2f} ± {100 * sd:.2f}  "
              f"(fp32, {ref_models} models one after another)", flush=True)

    tune_allocator()  # as the tinyset command does
    proto = Protocol.preset("dsa", epochs=args.epochs, num_models=args.models)
    t = time.perf_counter()
    res = evaluate_tensors(syn.images, syn.labels, syn.info, test, ["convnet"], proto, seed=0)
    ours_s = time.perf_counter() - t
    r = res["results"][0]
    out["tinyset"] = {"seconds_per_model": ours_s / args.models, "accuracies": r["accuracies"],
                      "precision": res["protocol"]["precision_used"], "compiled": res["protocol"]["compiled"]}
    print(f"tinyset  : {ours_s / args.models:7.1f} s/model  acc {100 * r['mean']:.2f} ± {100 * r['std']:.2f}  "
          f"({res['protocol']['precision_used']}, compiled={res['protocol']['compiled']}, batched x{args.models})",
          flush=True)

    if not args.skip_reference:
        out["speedup"] = ref_s / (ours_s / args.models)
        print(f"speed-up : {out['speedup']:.2f}x (seconds per evaluated model)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
