"""Seconds per GAN (``--method gan``) iteration, seconds to project a set onto the generator
(``refine=project``, the report's MPS1 with GAN), and peak memory; MNIST by default.

Issue #11 asks for the GAN's training time to be stated. An iteration is what
:meth:`tinyset.methods.gan.GAN.step` does: a class-balanced real batch, one discriminator update on
real and generated images, one generator update through the updated discriminator (the ``cpu``
profile: width 32, 13 real images per class). The projection is
:func:`tinyset.methods.gan.project` on ``ipc`` real images per class with the run's defaults
(``refine_steps`` Adam steps from ``refine_restarts`` starts); its cost depends on the generator's
size, not on how far it has trained, so it runs on the freshly initialised generator. ``--warmup``
untimed iterations, then ``--iterations`` timed ones (median, minimum and mean wall seconds, and the
CPU seconds of the process: on a shared machine a busy neighbour stretches wall time); the
projection is timed once. Peak memory as in ``bench_krr.py``.

    python benchmarks/bench_gan.py --data-root /work/shared/datasets
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_krr import method_bench_arguments, peak_memory  # noqa: E402
from tinyset.data import load_dataset  # noqa: E402
from tinyset.data.base import RealPool  # noqa: E402
from tinyset.methods.base import DistillContext  # noqa: E402
from tinyset.methods.gan import GAN, project  # noqa: E402
from tinyset.methods.loop import resolve_config  # noqa: E402
from tinyset.rng import make_generator  # noqa: E402
from tinyset.runtime import describe_machine, resolve_runtime  # noqa: E402


def main() -> None:
    args = method_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()
    runtime = resolve_runtime("cpu", args.precision, threads=args.threads)
    machine = describe_machine(runtime)
    print(machine, flush=True)
    train = load_dataset(args.dataset, "train", root=args.data_root)
    sets = dict(s.split("=", 1) for s in args.set)
    cfg = resolve_config("gan", train.info.name, args.ipc, "cpu", sets=sets).values
    ctx = DistillContext(train.info, RealPool(train, runtime.device), args.ipc, runtime.device, runtime.precision, None)
    impl = GAN(cfg, ctx)
    gen = make_generator(args.seed)
    impl.setup(gen)
    for _ in range(args.warmup):
        impl.step(gen)
    walls, cpus = [], []
    for _ in range(args.iterations):
        w, c = time.perf_counter(), time.process_time()
        impl.step(gen)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    it = {"median_s": statistics.median(walls), "min_s": min(walls), "mean_s": statistics.mean(walls),
          "cpu_s_per_iteration": statistics.mean(cpus)}
    print(f"GAN iteration (width {cfg.width}, {cfg.batch_real} real images per class): {it['median_s']:.3f} s median "
          f"(min {it['min_s']:.3f}, mean {it['mean_s']:.3f}; cpu {it['cpu_s_per_iteration']:.3f} s); "
          f"{cfg.iterations} iterations of the cpu profile: about {cfg.iterations * it['cpu_s_per_iteration'] / 60:.0f} "
          f"CPU-minutes", flush=True)
    images, labels = impl.pool.sample_classes(args.ipc, make_generator(args.seed + 1))
    w, c = time.perf_counter(), time.process_time()
    _, err = project(impl.g, images.cpu(), labels.cpu(), steps=cfg.refine_steps, lr=cfg.refine_lr,
                     restarts=cfg.refine_restarts, prior=cfg.refine_prior, seed=args.seed)
    proj = {"images": len(labels), "steps": cfg.refine_steps, "restarts": cfg.refine_restarts,
            "wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "mean_pixel_error": float(err.mean())}
    print(f"projection of {proj['images']} images ({proj['steps']} steps x {proj['restarts']} starts): "
          f"{proj['wall_s']:.1f} s (cpu {proj['cpu_s']:.1f} s)", flush=True)
    peak, hwm = peak_memory()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "iteration": it, "projection": proj,
                                               "config": cfg.to_dict(), "ru_maxrss_mib": peak, "vm_hwm_mib": hwm},
                                              indent=2))


if __name__ == "__main__":
    main()
