"""Validation accuracy of several sets of one dataset, to choose an option without the test split.

Every set (a ``.safetensors`` synthetic-set or selection file) trains ``--models`` fresh ConvNets of
width 32 (``convnet-w32``) for ``--epochs`` epochs with the ``dsa`` protocol's optimiser and DSA
augmentation; the score is their accuracy on ``--val`` images held out of the real **training**
split (a seeded draw that leaves out every image any of the given sets was selected from, so one
validation split serves all of them). The test split is never read. A cheap stand-in for the
``dsa`` protocol (5 ConvNets of width 128 x 1000 epochs): at MNIST ipc 10 it costs about 1/30 of it
(about 75 CPU-s per set against 2600 on an AVX2 core). It separates large differences only: see
docs/measurements.md ("Selection and GAN sets on MNIST ipc 10").

    python benchmarks/validate_sets.py --data-root ../shared/datasets A.safetensors B.safetensors ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402

from tinyset.data import load_dataset  # noqa: E402
from tinyset.data.base import ImageDataset  # noqa: E402
from tinyset.evaluate import evaluate_tensors  # noqa: E402
from tinyset.evaluate.protocol import Protocol  # noqa: E402
from tinyset.rng import make_generator  # noqa: E402
from tinyset.runtime import describe_machine, resolve_runtime  # noqa: E402
from tinyset.synset import SyntheticSet  # noqa: E402


def validation_indices(n: int, exclude: set[int], size: int, seed: int) -> list[int]:
    """``size`` of the indices ``0..n-1`` drawn with ``seed``, none of them in ``exclude``."""
    order = torch.randperm(n, generator=make_generator(seed)).tolist()
    return [i for i in order if i not in exclude][:size]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", help="synthetic-set or selection files (.safetensors) of one dataset")
    p.add_argument("--data-root", default="/work/shared/datasets")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--val", type=int, default=2000, help="validation images held out of the training split")
    p.add_argument("--seed", type=int, default=12345, help="seed of the validation draw")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runtime = resolve_runtime("cpu", args.precision, threads=args.threads)
    machine = describe_machine(runtime)
    print(machine, flush=True)
    sets = [SyntheticSet.load(f) for f in args.sets]
    names = {s.info.name for s in sets}
    if len(names) != 1:
        print(f"error: the sets come from different datasets ({', '.join(sorted(names))}); give sets of one",
              file=sys.stderr)
        return 2
    train = load_dataset(names.pop(), "train", root=args.data_root)
    used: set[int] = set()
    for s in sets:
        used.update(int(i) for i in s.meta.get("source_indices", []))
    idx = validation_indices(len(train), used, args.val, args.seed)
    val = ImageDataset(train.info, train.split, train.images[idx], train.labels[idx], train.source)
    proto = Protocol(name="validation-proxy", source="benchmarks/validate_sets.py: convnet-w32, dsa optimiser and "
                     "augmentation, accuracy on images held out of the training split", epochs=args.epochs,
                     num_models=args.models, precision=runtime.precision)
    rows = []
    print(f"{len(val)} validation images held out of the training split (seed {args.seed}, none from the sets); "
          f"{args.models} x convnet-w32 x {args.epochs} epochs per set", flush=True)
    for f, s in zip(args.sets, sets):
        t = time.process_time()
        r = evaluate_tensors(s.images, s.labels, s.info, val, models=("convnet-w32",), protocol=proto,
                             seed=0, learned_lr=s.lr).results[0]
        rows.append({"set": f, "val_mean": r.mean, "val_std": r.std, "accuracies": r.accuracies,
                     "cpu_s": time.process_time() - t, "label_regime": r.label_regime})
        print(f"{f}: validation {100 * r.mean:.2f} +- {100 * r.std:.2f} ({r.label_regime}; "
              f"{rows[-1]['cpu_s']:.0f} CPU-s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "protocol": proto.name, "epochs": args.epochs,
                                               "models": args.models, "val_images": len(val), "seed": args.seed,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
