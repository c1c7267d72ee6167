"""Seconds per MTT iteration and peak memory against syn_steps: tinyset vs a reference-style loop.

Setting (issue #10 part 5): MNIST, ipc 10, DSA on, ConvNet. Two configurations:

* ``cpu``: the ``cpu`` preset of ``tinyset distill --method mtt`` with the width-32 ConvNet (the
  preset's network below ipc 10 and, until 2026-12-05, at ipc 10 too; it now trains the width-128
  ConvNet from ipc 10) (batch_syn 50; syn_steps 20 since 2026-12-03, 10 before, which the README's
  figures used; the student's steps recomputed exactly backwards, compiled, on the resolved precision);
* ``paper``: the paper's ConvNet (width 128, depth 3, InstanceNorm), syn_steps 20, all 100 images
  per student step (distill.py's defaults).

The reference-style loop is written here after upstream's distill.py: the student is a plain
``torch.nn`` ConvNet (``reference_loop.reference_convnet``) whose parameters are deleted and
replaced, every step, by views of the current flat parameter vector (what upstream's
``ReparamModule`` does) before a module forward; fp32; every step's gradient is taken with
``create_graph=True`` and the whole unroll is one autograd graph. Both loops start from the same
synthetic images and lr and draw the expert, the start epoch, the batches and the DSA parameters
from generators with the same seed in the same order, so their first losses must agree (up to the
precision tinyset runs at); the benchmark prints both. Timed turns alternate (reference, tinyset,
upstream, reference, ...) in one process, after one untimed warm-up iteration each (tinyset's
compilation happens there and is reported separately); the minimum of ``--reps`` turns each.

Upstream's own code (``--upstream``: GeorgeCazenavette/mtt-distillation, cloned into a temporary
folder at run time or read from a checkout, never vendored; see ``upstream.py``) gives a third row:
its ``get_network`` (``ConvNetW32`` / ``ConvNet``) and ``ReparamModule`` built afresh every iteration,
its ``DiffAugment``, and the loop body of its distill.py (:func:`upstream_iteration`). Its draws come
from the global numpy/torch generators as upstream's do, so its losses are not comparable turn by
turn; only its time is reported.

Peak memory: one iteration of tinyset's step per ``(memory, syn_steps)`` in a fresh subprocess, for
the full graph and the exact recompute path (compile off in these probes: the compiler's own memory
would mask the unroll's): the peak resident size of the subprocess and its growth over the resident
size just before the step. The peak is the kernel's high-water mark of the subprocess's own address
space (``VmHWM`` in ``/proc/self/status``); ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is recorded
too, but Linux carries it over from the parent through fork and exec, so after the timed runs (whose
reference graph reaches several GiB) it reports the parent's peak.

Timings are wall-clock seconds; the CPU seconds of this process (``time.process_time``) are printed
beside them, since on a shared machine a busy neighbour on the other hardware thread stretches wall
time unevenly between the two loops.

Expert trajectories are trained here, in a temporary folder (``tinyset.experts.train_experts``:
one expert per model, ``--expert-epochs`` epochs on ``--subset`` images per class of the training
split), so the benchmark runs standalone. Only the start and target parameters come from them; the
timings do not depend on how good they are.

    python benchmarks/bench_mtt.py --data-root /work/shared/datasets --json mtt.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream as upstream_mod  # noqa: E402
from reference_loop import reference_convnet  # noqa: E402

from tinyset.augment import DSA, default_strategy  # noqa: E402
from tinyset.data import RealPool, load_dataset  # noqa: E402
from tinyset.data.base import ImageDataset, get_spec  # noqa: E402
from tinyset.experts import ExpertSet, ExpertSettings, train_experts  # noqa: E402
from tinyset.methods import METHODS  # noqa: E402
from tinyset.methods.base import DistillContext  # noqa: E402
from tinyset.methods.loop import method_precision, resolve_config  # noqa: E402
from tinyset.rng import make_generator  # noqa: E402
from tinyset.runtime import describe_machine, resolve_runtime, tune_allocator  # noqa: E402

#: configuration name -> (preset, model, width, model arguments of the experts)
CONFIGS = {"cpu": ("cpu", "convnet-w32", 32), "paper": ("paper", "convnet", 128)}
#: configuration name -> the same network's name in upstream's get_network
UPSTREAM_MODELS = {"cpu": "ConvNetW32", "paper": "ConvNet"}


# ----------------------------------------------------------------------------------- reference-style loop
class ReparamStudent:
    """A ``torch.nn`` network driven by one flat parameter vector, as upstream's ``ReparamModule``:
    the module's parameters are removed once, and before every forward each one is replaced by a
    view of the flat vector of that step."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.slots = []
        for module in net.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                self.slots.append((module, name, p.shape, p.numel()))
                del module._parameters[name]

    def __call__(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        offset = 0
        for module, name, shape, numel in self.slots:
            setattr(module, name, flat[offset:offset + numel].view(shape))
            offset += numel
        return self.net(x)


def reference_iteration(student: ReparamStudent, experts: ExpertSet, pool_ids: list[int], images: torch.Tensor,
                        labels: torch.Tensor, syn_lr: torch.Tensor, opts: list[torch.optim.Optimizer], cfg,
                        augment: DSA, gen: torch.Generator) -> float:
    """One MTT iteration the way upstream's distill.py runs it (fp32, one graph over all steps)."""
    i = pool_ids[int(torch.randint(len(pool_ids), (1,), generator=gen))]
    t = int(torch.randint(cfg.max_start_epoch, (1,), generator=gen))
    start = experts.flat_params(i, t)
    target = experts.flat_params(i, t + cfg.expert_epochs)
    params = [start.clone().requires_grad_(True)]
    n = images.shape[0]
    b = n if cfg.batch_syn is None else min(cfg.batch_syn, n)
    chunks: list[torch.Tensor] = []
    for _ in range(cfg.syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).split(b))
        idx = chunks.pop(0)
        x = augment(images[idx], gen)
        ce = F.cross_entropy(student(x, params[-1]), labels[idx])
        (grad,) = torch.autograd.grad(ce, params[-1], create_graph=True)
        params.append(params[-1] - syn_lr * grad)
    loss = ((params[-1] - target) ** 2).sum() / ((start - target) ** 2).sum()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()
    return float(loss.detach())


def upstream_iteration(up, model: str, info, experts: ExpertSet, pool_ids: list[int], images: torch.Tensor,
                       labels: torch.Tensor, syn_lr: torch.Tensor, opts: list[torch.optim.Optimizer], cfg,
                       strategy: str, dsa_param) -> float:
    """One MTT iteration with upstream's own pieces, as its distill.py runs one: a fresh
    ``get_network`` wrapped in its ``ReparamModule``, numpy's draw of the start epoch, torch.randperm
    chunks taken from the end, upstream's ``DiffAugment`` per step, ``create_graph`` gradients of the flat
    vector, the sum-MSE loss divided by the number of parameters and by the start-target distance.
    Expert parameters come from tinyset's expert set (upstream keeps its buffer in memory as lists)."""
    net = up.utils.get_network(model, info.channels, info.num_classes, info.image_size, dist=False)
    student = up.reparam_module.ReparamModule(net)
    student.train()
    num_params = sum(int(np.prod(p.size())) for p in student.parameters())
    i = pool_ids[np.random.randint(0, len(pool_ids))]
    t = int(np.random.randint(0, cfg.max_start_epoch))
    start = experts.flat_params(i, t)
    target = experts.flat_params(i, t + cfg.expert_epochs)
    if start.numel() != num_params:
        raise SystemExit(f"upstream's {model} has {num_params} parameters, the experts' {experts.model} "
                         f"{start.numel()}: not the same network")
    params = [start.clone().requires_grad_(True)]
    b = images.shape[0] if cfg.batch_syn is None else cfg.batch_syn
    chunks: list[torch.Tensor] = []
    for _ in range(cfg.syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(len(images)), b))
        idx = chunks.pop()
        x = up.utils.DiffAugment(images[idx], strategy, param=dsa_param)
        ce = F.cross_entropy(student(x, flat_param=params[-1]), labels[idx])
        grad = torch.autograd.grad(ce, params[-1], create_graph=True)[0]
        params.append(params[-1] - syn_lr * grad)
    loss = F.mse_loss(params[-1], target, reduction="sum") / num_params
    loss = loss / (F.mse_loss(start, target, reduction="sum") / num_params)
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    for opt in opts:
        opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------- setup helpers
def subset(train: ImageDataset, per_class: int) -> ImageDataset:
    """The first ``per_class`` training images of every class (deterministic)."""
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:per_class] for c in range(train.info.num_classes)])
    return ImageDataset(train.info, train.split, train.images[idx], train.labels[idx], source=train.source)


def make_experts(train: ImageDataset, folder: Path, model: str, epochs: int) -> float:
    t = time.perf_counter()
    train_experts(train, folder, 1, model, ExpertSettings(epochs=epochs, members=1, compile=False), seed=0)
    return time.perf_counter() - t


def build_method(config: str, train: ImageDataset, experts: Path, ipc: int, precision: str, extra: dict):
    preset, model, _ = CONFIGS[config]
    sets = {"experts": str(experts), "model": model, "expert_epochs": "2", "max_start_epoch": "1", "init": "real",
            **extra}  # random real images: the iteration costs the same from any start
    if preset == "paper":
        sets.setdefault("syn_steps", "20")
    cfg = resolve_config("mtt", train.info.name, ipc, preset, sets={k: str(v) for k, v in sets.items()}).values
    dev = torch.device("cpu")
    ctx = DistillContext(train.info, RealPool(train), ipc, dev, precision, DSA(default_strategy(train.info.name)))
    impl = METHODS.get("mtt")(cfg, ctx)
    impl.setup(make_generator(0))
    return impl


def proc_status_bytes(field: str) -> int:
    """``VmRSS``, ``VmHWM``, ... of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


# ----------------------------------------------------------------------------------- measurements
def time_config(config: str, train: ImageDataset, experts: Path, args, precision: str, up=None) -> dict:
    impl = build_method(config, train, experts, args.ipc, precision, {"lr_lr": args.lr_lr})
    cfg = impl.cfg
    width = CONFIGS[config][2]
    info = train.info
    ref_net = reference_convnet(info.channels, info.num_classes, info.image_size[0], width=width)
    ref_net.train()
    student = ReparamStudent(ref_net)
    ref_images = impl.images.detach().clone().requires_grad_(True)
    ref_lr = impl.tensors["lr"].detach().clone().requires_grad_(True)
    opts = [torch.optim.SGD([ref_images], lr=cfg.lr_img, momentum=cfg.momentum_img),
            torch.optim.SGD([ref_lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr)]
    labels = impl.labels
    g_ref, g_ts = make_generator(5), make_generator(5)
    ref_step = (lambda: reference_iteration(student, impl.experts, impl.pool_ids, ref_images, labels, ref_lr, opts,
                                            cfg, impl.augment, g_ref))
    ts_step = (lambda: impl.step(g_ts))
    # warm-up turn: the first losses (same images, lr, expert, start epoch, batches and DSA draws) and the
    # first updates of the images and the lr (directions of the two gradients)
    x0, lr0 = ref_images.detach().clone(), float(ref_lr.detach())
    t = time.perf_counter()
    loss_ref = ref_step()
    ref_first = time.perf_counter() - t
    t = time.perf_counter()
    loss_ts = ts_step()
    ts_first = time.perf_counter() - t
    rel = abs(loss_ts - loss_ref) / abs(loss_ref)
    du_ref, du_ts = (ref_images.detach() - x0).flatten(), (impl.images.detach() - x0).flatten()
    cos = float(du_ref @ du_ts / (du_ref.norm() * du_ts.norm()))
    dlr_ref, dlr_ts = float(ref_lr.detach()) - lr0, float(impl.tensors["lr"].detach()) - lr0
    loops = [("reference", ref_step), ("tinyset", ts_step)]
    up_first = None
    if up is not None:  # upstream's own pieces, on their own copies of the images and the lr
        up_images = x0.clone().requires_grad_(True)
        up_lr = torch.tensor(lr0).requires_grad_(True)
        up_opts = [torch.optim.SGD([up_images], lr=cfg.lr_img, momentum=cfg.momentum_img),
                   torch.optim.SGD([up_lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr)]
        dsa_param = up.utils.ParamDiffAug()
        up_step = (lambda: upstream_iteration(up, UPSTREAM_MODELS[config], info, impl.experts, impl.pool_ids,
                                              up_images, labels, up_lr, up_opts, cfg, impl.augment.strategy,
                                              dsa_param))
        t = time.perf_counter()
        up_step()
        up_first = time.perf_counter() - t
        loops.append(("upstream", up_step))
    times: dict[str, list[float]] = {name: [] for name, _ in loops}
    cpu: dict[str, list[float]] = {name: [] for name, _ in loops}
    for _ in range(args.reps):
        for name, fn in loops:
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    ref_s, ts_s = min(times["reference"]), min(times["tinyset"])
    ref_c, ts_c = min(cpu["reference"]), min(cpu["tinyset"])
    row = {"config": config, "model": cfg.model, "width": width, "syn_steps": cfg.syn_steps,
           "batch_syn": cfg.batch_syn or impl.images.shape[0], "memory": cfg.memory, "precision": precision,
           "compiled": impl.wants_compile(), "reference_s": ref_s, "tinyset_s": ts_s, "speedup": ref_s / ts_s,
           "reference_turns_s": times["reference"], "tinyset_turns_s": times["tinyset"],
           "reference_cpu_s": ref_c, "tinyset_cpu_s": ts_c, "speedup_cpu": ref_c / ts_c,
           "reference_first_s": ref_first, "tinyset_first_s": ts_first,
           "first_loss_reference": loss_ref, "first_loss_tinyset": loss_ts, "first_loss_rel_diff": rel,
           "first_image_update_cosine": cos, "first_lr_update_reference": dlr_ref, "first_lr_update_tinyset": dlr_ts}
    if up is not None:
        up_s, up_c = min(times["upstream"]), min(cpu["upstream"])
        row.update({"upstream_s": up_s, "upstream_cpu_s": up_c, "upstream_turns_s": times["upstream"],
                    "upstream_first_s": up_first, "speedup_vs_upstream": up_s / ts_s,
                    "speedup_vs_upstream_cpu": up_c / ts_c, "upstream_model": UPSTREAM_MODELS[config]})
    print(f"  {config:5s} {cfg.model:11s} steps {cfg.syn_steps:2d} batch {row['batch_syn']:3d} | reference "
          f"{ref_s:7.2f} s (cpu {ref_c:.2f}) | tinyset {ts_s:7.2f} s (cpu {ts_c:.2f}; {precision}, {cfg.memory}, "
          f"{'compiled' if row['compiled'] else 'eager'}; first call {ts_first:.0f} s) | {ref_s / ts_s:5.2f}x "
          f"(cpu {ref_c / ts_c:.2f}x) | "
          f"first loss {loss_ref:.6f} vs {loss_ts:.6f} (rel {rel:.1e}), image update cosine {cos:.5f}, lr update "
          f"{dlr_ref:.3e} vs {dlr_ts:.3e}", flush=True)
    if up is not None:
        print(f"  {config:5s} upstream's code ({row['upstream_model']}, fp32) {row['upstream_s']:7.2f} s (cpu "
              f"{row['upstream_cpu_s']:.2f}) | tinyset {row['speedup_vs_upstream']:5.2f}x faster (cpu "
              f"{row['speedup_vs_upstream_cpu']:.2f}x)", flush=True)
    return row


def memory_probe(config: str, dataset: str, images: str, experts: str, ipc: int, precision: str, memory: str,
                 syn_steps: int) -> dict:
    """Run in a fresh subprocess: one tinyset MTT iteration; resident memory before it and the peak.

    The training images come from a small safetensors file written by the parent (reading the whole
    dataset here would raise the peak before the step is reached)."""
    tensors = load_file(images)
    train = ImageDataset(get_spec(dataset).info, "train", tensors["images"], tensors["labels"], source=images)
    impl = build_method(config, train, Path(experts), ipc, precision,
                        {"memory": memory, "syn_steps": syn_steps, "compile": "off", "lr_lr": 1e-8})
    before = proc_status_bytes("VmRSS")
    t = time.perf_counter()
    impl.step(make_generator(5))
    seconds = time.perf_counter() - t
    peak = proc_status_bytes("VmHWM")
    return {"config": config, "memory": memory, "syn_steps": syn_steps, "rss_before_bytes": before,
            "peak_bytes": peak, "growth_bytes": peak - before, "seconds": seconds,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_probe(args, config: str, images: Path, experts: Path, precision: str, memory: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", json.dumps({
        "config": config, "dataset": args.dataset, "images": str(images), "experts": str(experts), "ipc": args.ipc,
        "precision": precision, "memory": memory, "syn_steps": steps}),
        "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-3:])
        return {"config": config, "memory": memory, "syn_steps": steps, "error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("TINYSET_SHARED_DATASETS", "../shared/datasets"))
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--precision", default="auto",
                    help="tinyset's precision (auto: what `tinyset distill --method mtt` runs, fp32 on every CPU; "
                         "bf16 must be asked for)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (the issue's figures use 1)")
    ap.add_argument("--configs", default="cpu,paper", help="timed configurations: cpu, paper")
    ap.add_argument("--reps", type=int, default=3, help="timed turns of each loop per configuration")
    ap.add_argument("--subset", type=int, default=100, help="training images per class for the experts")
    ap.add_argument("--expert-epochs", type=int, default=3)
    ap.add_argument("--memory-cpu-steps", default="5,10,20,40", help="syn_steps of the memory probes, cpu config")
    ap.add_argument("--memory-paper-steps", default="5,10,20", help="syn_steps of the memory probes, paper config")
    ap.add_argument("--lr-lr", type=float, default=1e-8,
                    help="lr_lr of the timed runs: small, so that a few iterations on briefly trained experts never "
                         "push the learned lr below 0 (the work per iteration does not depend on it)")
    ap.add_argument("--upstream", default="auto",
                    help="GeorgeCazenavette/mtt-distillation for the upstream rows: auto (git clone into a temporary "
                         "folder when reachable), a checkout or bare git folder, or off")
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tune_allocator()
    runtime = resolve_runtime("cpu", args.precision, threads=args.threads)
    if args.probe:
        print(json.dumps(memory_probe(**json.loads(args.probe))))
        return
    precision, why = method_precision(METHODS.get("mtt"), args.precision, "cpu", runtime.precision)
    print(describe_machine(runtime) + (f" -> {precision} for MTT ({why})" if why else ""), flush=True)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {', '.join(bad)}; expected {', '.join(CONFIGS)}")
    train = subset(load_dataset(args.dataset, "train", root=args.data_root), args.subset)
    folder, found = upstream_mod.locate(args.upstream, upstream_mod.MTT_URL, upstream_mod.MTT_FILES)
    up = upstream_mod.load(folder, "upstream_mtt", extra=("reparam_module",)) if folder is not None else None
    print(f"upstream (GeorgeCazenavette/mtt-distillation): {found}", flush=True)
    out: dict = {"machine": describe_machine(runtime), "dataset": args.dataset, "ipc": args.ipc,
                 "threads": runtime.threads, "precision": precision, "timing": [], "memory": [], "experts_s": {},
                 "upstream": found}
    steps_of = {"cpu": args.memory_cpu_steps, "paper": args.memory_paper_steps}
    with tempfile.TemporaryDirectory(prefix="bench_mtt_") as tmp:
        images = Path(tmp) / "train_subset.safetensors"
        save_file({"images": train.images.contiguous(), "labels": train.labels.contiguous()}, str(images))
        folders = {}
        for config in dict.fromkeys(configs + [c for c in CONFIGS if steps_of[c].strip()]):
            folders[config] = Path(tmp) / config
            secs = make_experts(train, folders[config], CONFIGS[config][1], args.expert_epochs)
            out["experts_s"][config] = secs
            print(f"experts for {config}: 1 x {CONFIGS[config][1]}, {args.expert_epochs} epochs on "
                  f"{len(train)} images, {secs:.0f} s", flush=True)
        print(f"seconds per MTT iteration (MNIST ipc {args.ipc}, DSA; min of {args.reps} alternating turns; "
              f"reference: fp32 module forward with reloaded parameters, one graph)", flush=True)
        for config in configs:
            out["timing"].append(time_config(config, train, folders[config], args, precision, up))
        print("peak memory of one iteration (fresh subprocess each; VmHWM, and its growth over the resident size "
              "just before the step; compile off)", flush=True)
        for config in CONFIGS:
            for steps in [int(s) for s in steps_of[config].split(",") if s.strip()]:
                for memory in ("full", "recompute"):
                    r = run_probe(args, config, images, folders[config], precision, memory, steps)
                    out["memory"].append(r)
                    if "error" in r:
                        print(f"  {config:5s} syn_steps {steps:3d} {memory:9s} failed: {r['error']}", flush=True)
                        continue
                    print(f"  {config:5s} {CONFIGS[config][1]:11s} syn_steps {steps:3d} {memory:9s} peak "
                          f"{r['peak_bytes'] / 2**30:6.2f} GiB, growth {r['growth_bytes'] / 2**30:6.2f} GiB, "
                          f"{r['seconds']:6.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
