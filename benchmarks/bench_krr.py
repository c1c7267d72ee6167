"""Seconds per KRR (``--method krr``, FRePo-style) iteration and peak memory, MNIST ipc 10.

Issue #11 asks for one KRR iteration at ipc 10 within 1 second on this 2-core CPU. An iteration is
what :meth:`tinyset.methods.krr.KernelRidge.step` does: draw a pool network, features of the
synthetic images (with autograd) and of a class-balanced real batch (without), the float64 kernel
ridge solve, the loss, the backward pass and one Adam step of the images and labels, then one
training step of the drawn network on the synthetic set (and its re-initialisation when it is
``max_online_steps`` old). It races, in alternating turns in one process (the machine may be
shared, so the speed is the ratio, not the seconds), the reference-style iteration of
``reference_loop.ReferenceKRR`` (plain fp32 modules, a float32 solve, after the authors' PyTorch
port), started from the same images and labels. Settings (``--configs``, default ``cpu,paper``):

* ``cpu``: the ``cpu`` profile of ``tinyset distill --method krr`` (32 real images per class; at
  MNIST/FashionMNIST ipc <= 10 FRePo's network at half width, ``convnet-frepo`` width 32, i.e.
  32/64/128 channels);
* ``cpu-nn``: the earlier ``cpu`` profile, 32 real images per class with the constant-width
  ``convnet-nn`` (ConvNet of depth 3 without normalisation) at width 64 (still the profile at ipc > 10);
* ``paper``: FRePo's real batch (102 per class, 1024 in all in the authors' port) and ``convnet-nn`` at
  width 128 (constant; FRePo's own network widens to 256 and 512 in its later blocks);
* ``frepo``: ``paper`` with FRePo's own network, ``convnet-frepo`` (widths 128/256/512), as the
  ``paper`` preset of ``tinyset distill --method krr`` runs it.

All use
the run's precision (bf16 autocast where the CPU has native bf16, ``--precision``). Each setting:
``--warmup`` untimed iterations of each contender, one untimed round, then ``--iterations`` timed
turns of each; printed: the median, minimum and mean wall seconds, the CPU seconds of the process
per iteration, and tinyset's speed-up against the reference (wall medians, and CPU means). Peak
memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and the kernel's high-water mark ``VmHWM``
after all settings ran, both contenders included (the real training split, normalised in memory,
is most of it).

    python benchmarks/bench_krr.py --data-root /work/shared/datasets
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from racing import race, report  # noqa: E402
from reference_loop import ReferenceKRR  # noqa: E402

import torch  # noqa: E402
from tinyset.data import load_dataset  # noqa: E402
from tinyset.data.base import RealPool  # noqa: E402
from tinyset.methods.base import DistillContext  # noqa: E402
from tinyset.methods.loop import resolve_config  # noqa: E402
from tinyset.methods.krr import KernelRidge  # noqa: E402
from tinyset.rng import make_generator  # noqa: E402
from tinyset.runtime import describe_machine, resolve_runtime  # noqa: E402

CONFIGS = {"cpu": {}, "cpu-nn": {"model": "convnet-nn", "width": "64"},
           "paper": {"batch_real": "102", "width": "128", "model": "convnet-nn"},
           "frepo": {"batch_real": "102", "width": "128", "model": "convnet-frepo"}}


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench(name: str, train, args, runtime) -> dict:
    # random real images: an iteration costs the same from any start, and a selection would add to the peak
    sets = {"init": "real", **CONFIGS[name], **dict(s.split("=", 1) for s in args.set)}
    cfg = resolve_config("krr", train.info.name, args.ipc, "cpu", sets=sets).values
    pool = RealPool(train, runtime.device)
    ctx = DistillContext(train.info, pool, args.ipc, runtime.device, runtime.precision, None)
    impl = KernelRidge(cfg, ctx)
    gen, gen_ref = make_generator(args.seed), make_generator(args.seed)
    impl.setup(gen)
    ref = ReferenceKRR(impl.images, impl.targets, pool, cfg, args.seed)
    losses = {"tinyset": [impl.step(gen) for _ in range(args.warmup)],
              "reference": [ref.step(gen_ref) for _ in range(args.warmup)]}
    contenders = {"tinyset": (f"KernelRidge.step, {runtime.precision}", lambda: losses["tinyset"].append(impl.step(gen))),
                  "reference": ("reference-style FRePo iteration (reference_loop.ReferenceKRR), fp32",
                                lambda: losses["reference"].append(ref.step(gen_ref)))}
    cpu: dict[str, list[float]] = {}
    walls = race(f"KRR {name}", contenders, args.iterations, cpu=cpu)
    rec = report(f"KRR {name}", contenders, walls, "iteration", torch.get_num_threads(), runtime.precision, {}, cpu=cpu)
    mine = walls["tinyset"]
    row = {"config": name, "batch_real_per_class": cfg.batch_real, "model": cfg.model, "width": cfg.width,
           "pool_size": cfg.pool_size,
           "images": args.ipc * train.info.num_classes, "median_s": statistics.median(mine), "min_s": min(mine),
           "mean_s": statistics.mean(mine), "cpu_s_per_iteration": statistics.mean(cpu["tinyset"]),
           "reference_cpu_s_per_iteration": statistics.mean(cpu["reference"]),
           "speedup_vs_reference": rec["speedup_vs_reference"],
           "cpu_ratio_vs_reference": statistics.mean(cpu["reference"]) / statistics.mean(cpu["tinyset"]),
           "first_loss": losses["tinyset"][0], "last_loss": losses["tinyset"][-1],
           "reference_first_loss": losses["reference"][0], "reference_last_loss": losses["reference"][-1]}
    print(f"{name:6s} {cfg.model} batch_real {cfg.batch_real:3d}/class width {cfg.width}  "
          f"{row['median_s']:.3f} s/iteration median "
          f"(min {row['min_s']:.3f}, mean {row['mean_s']:.3f}; cpu {row['cpu_s_per_iteration']:.3f} s, reference "
          f"{row['reference_cpu_s_per_iteration']:.3f} s: {row['cpu_ratio_vs_reference']:.2f}x in CPU time)  "
          f"loss {row['first_loss']:.4f} -> {row['last_loss']:.4f} (reference {row['reference_first_loss']:.4f} -> "
          f"{row['reference_last_loss']:.4f})", flush=True)
    return row


def method_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every one-method iteration benchmark takes (this one and ``bench_gan.py``)."""
    p.add_argument("--data-root", default="/work/shared/datasets")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra method settings")
    p.add_argument("--json", default=None)
    return p


def peak_memory() -> tuple[float, float | None]:
    """``ru_maxrss`` and ``VmHWM`` in MiB, printed as one line."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm = vm_hwm_mib()
    print(f"peak memory: ru_maxrss {peak:.0f} MiB, VmHWM {hwm:.0f} MiB" if hwm is not None
          else f"peak memory: ru_maxrss {peak:.0f} MiB", flush=True)
    return peak, hwm


def main() -> None:
    p = method_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--configs", default="cpu,paper")
    args = p.parse_args()
    runtime = resolve_runtime("cpu", args.precision, threads=args.threads)
    machine = describe_machine(runtime)
    print(machine, flush=True)
    t = time.perf_counter()
    train = load_dataset(args.dataset, "train", root=args.data_root)
    print(f"{args.dataset} train: {len(train)} images, loaded in {time.perf_counter() - t:.1f} s; ipc {args.ipc}",
          flush=True)
    rows = [bench(name, train, args, runtime) for name in args.configs.split(",")]
    peak, hwm = peak_memory()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows, "ru_maxrss_mib": peak,
                                               "vm_hwm_mib": hwm}, indent=2))


if __name__ == "__main__":
    main()
