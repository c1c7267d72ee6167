"""Seconds per distillation iteration: DM, DataDAM, DC and DSA, tinyset against upstream's own code.

Setting (issues #3, #12): MNIST, ipc 10, batch_real 256 (DataDAM: 64, its paper value), DSA on,
ConvNet. Each block times, in alternating turns in one process (the machine may be shared, so only
ratios measured side by side mean something):

* ``upstream``: upstream's own functions (VICO-UoE/DatasetCondensation for DM/DC/DSA,
  DataDistillation/DataDAM for DataDAM; see ``upstream.py``: cloned at benchmark time, or
  ``--upstream DIR``), driven by a loop body that does what upstream's main script does per
  iteration. This is the baseline every speed-up is quoted against.
* ``reference``: the reference-style loop of ``reference_loop.py`` (plain fp32 ``torch.nn``, one
  forward per class, tinyset's DSA), which runs where upstream cannot be fetched; its cost relative to
  upstream is printed so that it can be checked.
* ``tinyset``: the method as configured by its ``paper`` preset (bf16 where the CPU has native bf16,
  compiled where the method's rule says so).

DC and DSA: one outer iteration shortened to ``--dc-outer`` image updates (default 2) with
``--dc-inner`` inner epochs between them (default 20; the preset has 10 updates and 50 inner epochs
at ipc 10, and ``--dc-outer 10 --dc-inner 0`` times the full outer iteration). Each figure is the
median of ``--reps`` turns after one warm-up turn (tinyset compiles in it).

    python benchmarks/bench_distill.py --data-root ../shared/datasets --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream as upstream_code  # noqa: E402
from racing import race_report  # noqa: E402
from reference_loop import reference_datadam_iteration, reference_dc_iteration, reference_dm_iteration  # noqa: E402

from tinyset.augment import DSA, default_strategy  # noqa: E402
from tinyset.data import RealPool, load_dataset  # noqa: E402
from tinyset.methods import METHODS  # noqa: E402
from tinyset.methods.base import DistillContext  # noqa: E402
from tinyset.methods.loop import resolve_config  # noqa: E402
from tinyset.rng import make_generator  # noqa: E402
from tinyset.models.layers import mixes_images  # noqa: E402
from tinyset.runtime import describe_machine, forward_chunk, resolve_precision, resolve_runtime  # noqa: E402

#: upstream's default --dsa_strategy (for every dataset, MNIST included)
UPSTREAM_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=3, help="timed turns of every contender (median reported)")
    ap.add_argument("--datadam-batch-real", type=int, default=64, help="batch_real of the DataDAM timings")
    ap.add_argument("--methods", default="dm,datadam,dc,dsa", help="comma-separated blocks to run")
    ap.add_argument("--dc-outer", type=int, default=2, help="outer_loop (image updates) of the DC/DSA timings")
    ap.add_argument("--dc-inner", type=int, default=20,
                    help="inner_loop epochs of the DC/DSA timings (0: the preset's for the ipc, 50 at ipc 10)")
    ap.add_argument("--upstream", default="auto",
                    help="VICO-UoE/DatasetCondensation: auto (git clone when reachable), off, or a checkout / "
                         "git directory")
    ap.add_argument("--upstream-datadam", default="auto",
                    help="DataDistillation/DataDAM: auto, off, or a checkout / git directory")
    ap.add_argument("--skip-reference", action="store_true", help="leave out the reference-style loops")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown = methods - {"dm", "datadam", "dc", "dsa"}
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))}; expected dm, datadam, dc, dsa")
    # the CPU kind goes beside every timing
    print(describe_machine(resolve_runtime("cpu", args.precision, configure=False)), flush=True)

    up = up_dam = None
    if methods & {"dm", "dc", "dsa"}:
        where, how = upstream_code.locate(args.upstream)
        print(f"upstream DC/DSA/DM code: {how}", flush=True)
        up = upstream_code.load(where, "vico") if where else None
    if "datadam" in methods:
        where, how = upstream_code.locate(args.upstream_datadam, upstream_code.DATADAM_URL)
        print(f"upstream DataDAM code: {how}", flush=True)
        up_dam = upstream_code.load(where, "datadam") if where else None

    train = load_dataset(args.dataset, "train", root=args.data_root)
    bench = Bench(args, train, up, up_dam)
    out: dict = {"dataset": args.dataset, "ipc": args.ipc, "batch_real": args.batch_real, "precision": bench.prec,
                 "threads": torch.get_num_threads(),
                 "machine": describe_machine(resolve_runtime("cpu", args.precision, configure=False))}
    if "dm" in methods:
        out["dm"] = bench.dm()
    if "datadam" in methods:
        out["datadam"] = bench.datadam()
    for method in ("dc", "dsa"):
        if method in methods:
            out[method] = bench.dc(method)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def real_chunks(impl) -> str:
    """How the method's real batch goes through its network (Distiller.forward_real)."""
    n = forward_chunk(impl.device)
    return "real images in one pass" if n is None or mixes_images(impl.net) else f"real images {n} per pass"


class Bench:
    def __init__(self, args, train, up, up_dam):
        self.args, self.train, self.up, self.up_dam = args, train, up, up_dam
        self.pool = RealPool(train)
        self.dev = torch.device("cpu")
        self.prec = resolve_precision(args.precision, self.dev)
        self.aug = DSA(default_strategy(args.dataset))
        self.k, self.ipc = train.info.num_classes, args.ipc
        self.shape = (train.info.channels, *train.info.image_size)
        self.threads = torch.get_num_threads()
        if up or up_dam:
            self.real = upstream_code.RealData(train.normalized(), train.labels, self.k)

    def fresh_images(self, g, lr: float = 1.0, momentum: float = 0.5):
        x = torch.cat([self.pool.sample_class(c, self.ipc, g) for c in range(self.k)])
        x = x.clone(memory_format=torch.contiguous_format).requires_grad_(True)
        return x, torch.optim.SGD([x], lr=lr, momentum=momentum)

    def tinyset(self, method: str, flags: dict, augment):
        cfg = resolve_config(method, self.args.dataset, self.ipc, "paper", flags=flags).values
        g = make_generator(0)
        impl = METHODS.get(method)(cfg, DistillContext(self.train.info, self.pool, self.ipc, self.dev, self.prec,
                                                       augment))
        impl.setup(g)
        return cfg, impl, (lambda: impl.step(g))

    def upstream_args(self, up, dsa: bool = True):
        return upstream_code.upstream_args(up, dsa, UPSTREAM_STRATEGY)

    def dm(self) -> dict:
        a, ipc, c = self.args, self.ipc, self.shape[0]
        contenders: dict = {}
        if self.up:
            x_u, opt_u = self.fresh_images(make_generator(1))
            uargs = self.upstream_args(self.up)
            contenders["upstream"] = ("upstream main_DM.py loop body, fp32, one forward per class", lambda:
                                      upstream_code.dm_iteration(self.up, uargs, self.real, x_u, opt_u, ipc,
                                                                 a.batch_real, c, self.k, self.shape[1:]))
        if not a.skip_reference:
            g_r = make_generator(0)
            x_r, opt_r = self.fresh_images(g_r)
            seeds = iter(range(10**6))
            contenders["reference"] = ("reference_loop.py, fp32, one forward per class", lambda:
                                       reference_dm_iteration(x_r, opt_r, self.pool, ipc, a.batch_real, self.aug,
                                                              g_r, next(seeds)))
        _, impl, step = self.tinyset("dm", {"batch_real": a.batch_real}, self.aug)
        contenders["tinyset"] = (f"{self.prec}, all classes in one forward, {real_chunks(impl)}", step)
        return race_report("DM", contenders, a.reps, "iteration", self.threads, self.prec,
                           {"batch_real": a.batch_real})

    def datadam(self) -> dict:
        a, ipc, b, c = self.args, self.ipc, self.args.datadam_batch_real, self.shape[0]
        cfg, impl, step = self.tinyset("datadam", {"batch_real": b}, self.aug)
        contenders: dict = {}
        if self.up_dam:
            x_u, opt_u = self.fresh_images(make_generator(1))
            uargs = self.upstream_args(self.up_dam)
            contenders["upstream"] = ("upstream main_DataDAM.py loop body: BatchNorm ConvNet, hooks, one forward "
                                      "per set, fp32", lambda: upstream_code.datadam_iteration(
                                          self.up_dam, uargs, self.real, x_u, opt_u, ipc, b, c, self.k,
                                          self.shape[1:], task_balance=cfg.task_balance))
        if not a.skip_reference:
            kw = {"power": cfg.power, "task_balance": cfg.task_balance, "loss_scale": cfg.loss_scale}
            g_r = make_generator(0)
            x_r, opt_r = self.fresh_images(g_r)
            seeds = iter(range(10**6))
            contenders["reference"] = ("reference_loop.py, InstanceNorm ConvNet, hooks, one forward per class, "
                                       "fp32", lambda: reference_datadam_iteration(
                                           x_r, opt_r, self.pool, ipc, b, self.aug, g_r, next(seeds), **kw))
        compiled = "compiled" if impl.wants_compile() else "eager"
        contenders["tinyset"] = (f"{self.prec}, {compiled}, {cfg.model}, all classes in one forward, {real_chunks(impl)}",
                                  step)
        return race_report("DataDAM", contenders, a.reps, "iteration", self.threads, self.prec,
                           {"batch_real": b, "power": cfg.power, "model": cfg.model})

    def dc(self, method: str) -> dict:
        a, ipc, c = self.args, self.ipc, self.shape[0]
        over = {"batch_real": a.batch_real, "outer_loop": a.dc_outer}
        if a.dc_inner:
            over["inner_loop"] = a.dc_inner
        augment = self.aug if method == "dsa" else None
        cfg, impl, step = self.tinyset(method, over, augment)
        if cfg.model != "convnet":
            raise SystemExit(f"the DC reference loop builds an InstanceNorm ConvNet, the preset uses {cfg.model}")
        contenders: dict = {}
        if self.up:
            x_u, opt_u = self.fresh_images(make_generator(1), cfg.lr_img, cfg.momentum_img)
            uargs = self.upstream_args(self.up, dsa=augment is not None)
            uargs.lr_net, uargs.batch_train = cfg.lr_net, cfg.batch_train
            contenders["upstream"] = ("upstream main.py outer-iteration body, fp32, per-class gradients, "
                                      "upstream's epoch() inner loop", lambda: upstream_code.dc_iteration(
                                          self.up, uargs, self.real, x_u, opt_u, ipc, cfg.batch_real, c, self.k,
                                          self.shape[1:], cfg.outer_loop, cfg.inner_loop))
        if not a.skip_reference:
            g_r = make_generator(0)
            x_r, opt_r = self.fresh_images(g_r, cfg.lr_img, cfg.momentum_img)
            seeds = iter(range(10**6))
            contenders["reference"] = ("reference_loop.py, fp32, per-class gradients", lambda:
                                       reference_dc_iteration(x_r, opt_r, self.pool, ipc, cfg.batch_real, augment,
                                                              g_r, next(seeds), cfg.outer_loop, cfg.inner_loop,
                                                              lr_net=cfg.lr_net, batch_train=cfg.batch_train))
        contenders["tinyset"] = (impl.describe_path(), step)
        loops = f"{cfg.outer_loop} image updates, {cfg.outer_loop - 1} x {cfg.inner_loop} inner epochs"
        print(f"{method.upper()}: one outer iteration = {loops}, batch_real {cfg.batch_real}, ipc {ipc}", flush=True)
        return race_report(method.upper(), contenders, a.reps, "outer iteration", self.threads, self.prec,
                           {"outer_loop": cfg.outer_loop, "inner_loop": cfg.inner_loop,
                            "batch_real": cfg.batch_real, "path": impl.describe_path()})


if __name__ == "__main__":
    main()
