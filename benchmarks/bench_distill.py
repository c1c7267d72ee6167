"""Seconds per distillation iteration: DM, DataDAM and DC/DSA, tinyset vs the reference loop.

Setting (issue #3): MNIST, ipc 10, batch_real 256, DSA on, ConvNet. The reference DM iteration
runs one forward pass per class in fp32 (see reference_loop.py); tinyset's runs all classes in one
batched forward with bf16 autocast where the CPU supports it. DataDAM (batch_real 64, its paper
value; InstanceNorm ConvNet, p = 4) is timed three ways: the reference style with one forward per
class, upstream's layout (one forward for all real and one for all synthetic images), both with
forward hooks and fp32, and tinyset's method as configured by its paper preset (bf16 where native,
compiled). DC is timed for tinyset only (per-class gradient matching, one outer iteration =
outer_loop image updates).

    python benchmarks/bench_distill.py --data-root ../shared/datasets --iterations 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import reference_datadam_iteration, reference_dm_iteration  # noqa: E402

from tinyset.augment import DSA, default_strategy  # noqa: E402
from tinyset.data import RealPool, load_dataset  # noqa: E402
from tinyset.methods import METHODS  # noqa: E402
from tinyset.methods.base import DistillContext  # noqa: E402
from tinyset.methods.loop import resolve_config  # noqa: E402
from tinyset.rng import make_generator
from tinyset.runtime import describe_machine, resolve_precision, resolve_runtime  # noqa: E402


def time_iterations(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--datadam-batch-real", type=int, default=64, help="batch_real of the DataDAM timings")
    ap.add_argument("--methods", default="dm,datadam,dc,dsa", help="comma-separated blocks to run")
    ap.add_argument("--dc-outer", type=int, default=None, help="outer_loop for the DC timing (default: preset's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # the CPU kind goes beside every timing
    print(describe_machine(resolve_runtime("cpu", args.precision, configure=False)), flush=True)

    train = load_dataset(args.dataset, "train", root=args.data_root)
    pool = RealPool(train)
    dev = torch.device("cpu")
    prec = resolve_precision(args.precision, dev)
    aug = DSA(default_strategy(args.dataset))
    k, ipc = train.info.num_classes, args.ipc
    out: dict = {"dataset": args.dataset, "ipc": ipc, "batch_real": args.batch_real, "precision": prec,
                 "threads": torch.get_num_threads()}

    def fresh_images(g):
        x = torch.cat([pool.sample_class(c, ipc, g) for c in range(k)]).clone().requires_grad_(True)
        return x, torch.optim.SGD([x], lr=1.0, momentum=0.5)

    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown = methods - {"dm", "datadam", "dc", "dsa"}
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))}; expected dm, datadam, dc, dsa")
    threads = torch.get_num_threads()

    if "dm" in methods:
        time_dm(args, train, pool, dev, prec, aug, fresh_images, out)
    if "datadam" in methods:
        time_datadam(args, train, pool, dev, prec, aug, fresh_images, out, threads)
    for method in ("dc", "dsa"):
        if method in methods:
            time_dc(method, args, train, pool, dev, prec, aug, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def time_dm(args, train, pool, dev, prec, aug, fresh_images, out) -> None:
    ipc = args.ipc
    # reference DM
    g = make_generator(0)
    x, opt = fresh_images(g)
    seeds = iter(range(10**6))
    ref = time_iterations(lambda: reference_dm_iteration(x, opt, pool, ipc, args.batch_real, aug, g, next(seeds)),
                          args.iterations)
    print(f"DM reference loop : {ref:6.2f} s/iteration (fp32, one forward per class)")
    # tinyset DM
    cfg = resolve_config("dm", args.dataset, ipc, "paper", flags={"batch_real": args.batch_real}).values
    g = make_generator(0)
    dm = METHODS.get("dm")(cfg, DistillContext(train.info, pool, ipc, dev, prec, aug))
    dm.setup(g)
    ours = time_iterations(lambda: dm.step(g), args.iterations)
    print(f"DM tinyset        : {ours:6.2f} s/iteration ({prec}, all classes in one forward)")
    print(f"DM speed-up       : {ref / ours:.2f}x")
    out["dm"] = {"reference_s": ref, "tinyset_s": ours, "speedup": ref / ours}


def time_datadam(args, train, pool, dev, prec, aug, fresh_images, out, threads: int) -> None:
    ipc, b = args.ipc, args.datadam_batch_real
    cfg = resolve_config("datadam", args.dataset, ipc, "paper", flags={"batch_real": b}).values
    if cfg.model != "convnet":
        raise SystemExit(f"the DataDAM reference loop builds an InstanceNorm ConvNet, the preset uses {cfg.model}")
    kw = {"power": cfg.power, "task_balance": cfg.task_balance, "loss_scale": cfg.loss_scale}
    refs = {}
    for per_class, label in ((True, "one forward per class"), (False, "upstream: one forward per set")):
        g = make_generator(0)
        x, opt = fresh_images(g)
        seeds = iter(range(10**6))
        refs[per_class] = time_iterations(
            lambda: reference_datadam_iteration(x, opt, pool, ipc, b, aug, g, next(seeds), per_class=per_class,
                                                **kw), args.iterations, warmup=1)
        print(f"DataDAM reference : {refs[per_class]:6.2f} s/iteration (fp32, hooks, {label}, "
              f"{threads} threads)", flush=True)
    g = make_generator(0)
    dam = METHODS.get("datadam")(cfg, DistillContext(train.info, pool, ipc, dev, prec, aug))
    dam.setup(g)
    ours = time_iterations(lambda: dam.step(g), args.iterations)
    compiled = "compiled" if dam.wants_compile() else "eager"
    print(f"DataDAM tinyset   : {ours:6.2f} s/iteration ({prec}, {compiled}, all classes in one forward, "
          f"{threads} threads)")
    print(f"DataDAM speed-up  : {refs[True] / ours:.2f}x vs one forward per class, "
          f"{refs[False] / ours:.2f}x vs upstream's layout (batch_real {b}, p = {cfg.power:g})", flush=True)
    out["datadam"] = {"reference_per_class_s": refs[True], "reference_upstream_s": refs[False], "tinyset_s": ours,
                      "speedup": refs[True] / ours, "speedup_vs_upstream_layout": refs[False] / ours,
                      "batch_real": b, "precision": prec, "threads": threads, "compiled": dam.wants_compile()}


def time_dc(method, args, train, pool, dev, prec, aug, out) -> None:
    ipc = args.ipc
    over = {"batch_real": args.batch_real}
    if args.dc_outer:
        over["outer_loop"] = args.dc_outer
    cfg = resolve_config(method, args.dataset, ipc, "paper", flags=over).values
    g = make_generator(0)
    impl = METHODS.get(method)(cfg, DistillContext(train.info, pool, ipc, dev, prec,
                                                   aug if method == "dsa" else None))
    impl.setup(g)
    s = time_iterations(lambda: impl.step(g), max(1, args.iterations // 5), warmup=1)
    print(f"{method.upper():<3} tinyset       : {s:6.2f} s/iteration ({cfg.outer_loop} image updates of all "
          f"classes with {cfg.outer_loop - 1} x {cfg.inner_loop} inner epochs between them)", flush=True)
    out[method] = {"tinyset_s": s, "outer_loop": cfg.outer_loop, "inner_loop": cfg.inner_loop}


if __name__ == "__main__":
    main()
