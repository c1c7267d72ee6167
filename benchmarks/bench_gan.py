"""Seconds per GAN (``--method gan``) iteration, seconds to project a set onto the generator
(``refine=project``, the report's MPS1 with GAN), and peak memory; MNIST by default.

Issue #11 asks for the GAN's training time to be stated. An iteration is what
:meth:`tinyset.methods.gan.GAN.step` does: a class-balanced real batch, one discriminator update on
real and generated images, one generator update through the updated discriminator (the ``cpu``
profile: width 32, 13 real images per class). The projection is
:func:`tinyset.methods.gan.project` on ``ipc`` real images per class with the run's defaults
(``refine_steps`` Adam steps from ``refine_restarts`` starts); its cost depends on the generator's
size, not on how far it has trained, so it runs on the freshly initialised generator.

The iteration races, in alternating turns in one process (the machine may be shared, so the speed
is the ratio, not the seconds), the textbook DCGAN step of ``reference_loop.ReferenceGANStep`` on
copies of the same networks (fp32, no autocast, the discriminator not frozen for the generator's
pass). ``--warmup`` untimed iterations of each, one untimed round, then ``--iterations`` timed turns
of each (median, minimum and mean wall seconds, CPU seconds of the process per iteration, and the
speed-up against the reference); the projection is timed once. Peak memory as in ``bench_krr.py``
(both contenders included).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_krr import method_bench_arguments, peak_memory  # noqa: E402
from racing import race, report  # noqa: E402
from reference_loop import ReferenceGANStep  # noqa: E402

import torch  # noqa: E402
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
    ref = ReferenceGANStep(impl.g, impl.d, impl.pool, cfg)
    gen_ref = make_generator(args.seed)
    for _ in range(args.warmup):
        impl.step(gen)
        ref.step(gen_ref)
    contenders = {"tinyset": (f"GAN.step, {runtime.precision}", lambda: impl.step(gen)),
                  "reference": ("textbook DCGAN step of copies of the same networks "
                                "(reference_loop.ReferenceGANStep), fp32", lambda: ref.step(gen_ref))}
    cpu: dict[str, list[float]] = {}
    walls = race("GAN", contenders, args.iterations, cpu=cpu)
    rec = report("GAN", contenders, walls, "iteration", torch.get_num_threads(), runtime.precision, {}, cpu=cpu)
    mine = walls["tinyset"]
    it = {"median_s": statistics.median(mine), "min_s": min(mine), "mean_s": statistics.mean(mine),
          "cpu_s_per_iteration": statistics.mean(cpu["tinyset"]),
          "reference_cpu_s_per_iteration": statistics.mean(cpu["reference"]),
          "speedup_vs_reference": rec["speedup_vs_reference"],
          "cpu_ratio_vs_reference": statistics.mean(cpu["reference"]) / statistics.mean(cpu["tinyset"])}
    print(f"GAN iteration (width {cfg.width}, {cfg.batch_real} real images per class): {it['median_s']:.3f} s median "
          f"(min {it['min_s']:.3f}, mean {it['mean_s']:.3f}; cpu {it['cpu_s_per_iteration']:.3f} s, reference "
          f"{it['reference_cpu_s_per_iteration']:.3f} s: {it['cpu_ratio_vs_reference']:.2f}x in CPU time); "
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
