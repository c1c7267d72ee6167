"""Seconds per distillation iteration: DM, DataDAM and DC/DSA, tinyset vs the reference loop.

Setting (issue #3): MNIST, ipc 10, batch_real 256, DSA on, ConvNet. The reference DM iteration
runs one forward pass per class in fp32 (see reference_loop.py); tinyset's runs all classes in one
batched forward with bf16 autocast where the CPU supports it. DataDAM (batch_real 64, its paper
value; InstanceNorm ConvNet, p = 4) is timed three ways: the reference style with one forward per
class, upstream's layout (one forward for all real and one for all synthetic images), both with
forward hooks and fp32, and tinyset's method as configured by its paper preset (bf16 where native,
compiled). DC and DSA: one outer iteration, shortened to ``--dc-outer`` image updates (default 2)
with ``--dc-inner`` inner epochs between them (default 20, so that a reference measurement takes
under 2 minutes on one thread; the preset has 50 at ipc 10, and a full run, 10 updates and
9 x 50 epochs, spends a larger share in the inner loop), the reference style
(upstream's main.py: one forward/backward per class, plain fp32 modules, not compiled) and
tinyset's, measured in turns (reference, tinyset, reference, ...) in one run; the minimum of
``--dc-reps`` turns each.

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
from reference_loop import reference_datadam_iteration, reference_dc_iteration, reference_dm_iteration  # noqa: E402

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
    ap.add_argument("--dc-outer", type=int, default=2, help="outer_loop (image updates) of the DC/DSA timings")
    ap.add_argument("--dc-inner", type=int, default=20,
                    help="inner_loop epochs of the DC/DSA timings (0: the preset's for the ipc, 50 at ipc 10)")
    ap.add_argument("--dc-reps", type=int, default=2, help="timed turns of each DC/DSA implementation")
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
    ipc, threads = args.ipc, torch.get_num_threads()
    over = {"batch_real": args.batch_real, "outer_loop": args.dc_outer}
    if args.dc_inner:
        over["inner_loop"] = args.dc_inner
    cfg = resolve_config(method, args.dataset, ipc, "paper", flags=over).values
    if cfg.model != "convnet":
        raise SystemExit(f"the DC reference loop builds an InstanceNorm ConvNet, the preset uses {cfg.model}")
    augment = aug if method == "dsa" else None
    # reference style: its own images and optimiser (lr_img, momentum 0.5), a new seed per iteration
    g_ref = make_generator(0)
    x = torch.cat([pool.sample_class(c, ipc, g_ref) for c in range(train.info.num_classes)])
    x = x.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.momentum_img)
    seeds = iter(range(10**6))

    def ref_step():
        reference_dc_iteration(x, opt, pool, ipc, cfg.batch_real, augment, g_ref, next(seeds), cfg.outer_loop,
                               cfg.inner_loop, lr_net=cfg.lr_net, batch_train=cfg.batch_train)

    g = make_generator(0)
    impl = METHODS.get(method)(cfg, DistillContext(train.info, pool, ipc, dev, prec, augment))
    impl.setup(g)
    times: dict[str, list[float]] = {"reference": [], "tinyset": []}
    steps = {"reference": ref_step, "tinyset": lambda: impl.step(g)}
    for name, fn in steps.items():  # warm-up (tinyset: compiles)
        t = time.perf_counter()
        fn()
        print(f"{method.upper():<3} warm-up {name:<9}: {time.perf_counter() - t:6.2f} s", flush=True)
    for _ in range(max(1, args.dc_reps)):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ref, ours = min(times["reference"]), min(times["tinyset"])
    loops = f"{cfg.outer_loop} image updates, {cfg.outer_loop - 1} x {cfg.inner_loop} inner epochs"
    print(f"{method.upper():<3} reference     : {ref:6.2f} s/outer iteration (fp32, plain torch.nn, one "
          f"forward/backward per class; {loops}; {threads} threads)")
    print(f"{method.upper():<3} tinyset       : {ours:6.2f} s/outer iteration ({impl.describe_path()}; "
          f"{threads} threads)")
    print(f"{method.upper():<3} speed-up      : {ref / ours:.2f}x (batch_real {cfg.batch_real}, ipc {ipc}, "
          f"precision {prec}; turns: reference {', '.join(f'{t:.2f}' for t in times['reference'])}, "
          f"tinyset {', '.join(f'{t:.2f}' for t in times['tinyset'])})", flush=True)
    out[method] = {"reference_s": ref, "tinyset_s": ours, "speedup": ref / ours, "outer_loop": cfg.outer_loop,
                   "inner_loop": cfg.inner_loop, "batch_real": cfg.batch_real, "precision": prec,
                   "threads": threads, "path": impl.describe_path(), "turns": times}


if __name__ == "__main__":
    main()
