"""The one distillation loop every method shares: configuration, initialisation, checkpoints,
resume, signals, NaN guard, metrics, periodic validation, outputs.

Output directory::

    config.json           the resolved configuration (preset + overrides, with the preset's source)
    checkpoint.safetensors  images, optimiser momentum, generator state, iteration (atomic)
    metrics.jsonl         one line per iteration: iteration, loss, seconds (+ validation evaluations)
    init.png / final.png  image grids, one row per class
    synset.safetensors    the final synthetic set
    eval.json             the final test evaluation, when one is run
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinyset import __version__
from tinyset.augment import DSA, default_strategy
from tinyset.config import load_preset
from tinyset.data.base import ImageDataset, RealPool, check_ipc, split_validation
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.methods import METHODS
from tinyset.methods.base import Method
from tinyset.files import atomic_path, write_json
from tinyset.rng import make_generator
from tinyset.runtime import resolve_precision

CHECKPOINT = "checkpoint.safetensors"


def resolve_config(method: str, dataset: str, ipc: int, preset: str = "cpu",
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset file ``METHOD_DATASET_ipcK_PRESET`` (or ``METHOD_default_PRESET``) + overrides."""
    key = METHODS._key(method)
    METHODS.get(key)
    ds = dataset.lower().replace("_", "-")
    ds = "imagefolder" if ds.startswith("imagefolder:") else ds
    try:
        cfg = load_preset("distill", f"{key}_{ds}_ipc{ipc}_{preset}")
        cfg["preset_file"] = f"{key}_{ds}_ipc{ipc}_{preset}"
    except ConfigError:
        try:
            cfg = load_preset("distill", f"{key}_default_{preset}")
        except ConfigError:
            raise ConfigError(f"no distill preset {preset!r} for method {key}; presets are "
                              f"'paper' and 'cpu'") from None
        cfg["preset_file"] = f"{key}_default_{preset}"
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg.update(method=key, dataset=dataset, ipc=ipc, preset=preset)
    if key in ("dc", "dsa"):  # loop counts missing from the preset follow loops_for(ipc)
        from tinyset.methods.dc import loops_for

        for name, value in zip(("outer_loop", "inner_loop"), loops_for(ipc)):
            if cfg.get(name) is None:
                cfg[name] = value
    if int(cfg.get("iterations", 0)) < 1:
        raise ConfigError(f"iterations must be >= 1, got {cfg.get('iterations')}")
    if float(cfg.get("lr_img", 0)) <= 0:
        raise ConfigError(f"lr_img must be > 0, got {cfg.get('lr_img')}")
    if cfg.get("init") not in ("real", "noise"):
        raise ConfigError(f"init must be 'real' or 'noise', got {cfg.get('init')!r}")
    if int(cfg.get("batch_real", 0)) < 1:
        raise ConfigError(f"batch_real must be >= 1, got {cfg.get('batch_real')}")
    return cfg


def _initial_images(cfg: dict[str, Any], train: ImageDataset, pool: RealPool, ipc: int,
                    gen: torch.Generator) -> torch.Tensor:
    if cfg["init"] == "real":
        parts = [pool.sample_class(c, ipc, gen) for c in range(train.info.num_classes)]
        return torch.cat(parts).clone()
    c, h, w = train.info.channels, *train.info.image_size
    return torch.randn(train.info.num_classes * ipc, c, h, w, generator=gen).to(pool.device)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between iterations (then checkpoint and exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def save_checkpoint(path: Path, images: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator,
                    iteration: int, cfg: dict[str, Any], elapsed: float) -> None:
    tensors = {"images": images.detach().cpu().contiguous(), "generator": gen.get_state()}
    buf = opt.state.get(opt.param_groups[0]["params"][0], {}).get("momentum_buffer")
    if buf is not None:
        tensors["momentum_buffer"] = buf.detach().cpu().contiguous()
    meta = {"tinyset": json.dumps({"format": "tinyset.checkpoint", "iteration": iteration, "config": cfg,
                                   "elapsed_s": elapsed, "tinyset_version": __version__})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of a checkpoint (safetensors only: nothing is unpickled)."""
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("tinyset", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable tinyset checkpoint ({exc})") from None
    if header.get("format") != "tinyset.checkpoint" or "images" not in tensors or "generator" not in tensors:
        raise ArtifactError(f"{path}: not a tinyset checkpoint (missing header, images or generator state)")
    return tensors, header


def distill(method: str, train: ImageDataset, ipc: int, out_dir: str | Path, preset: str = "cpu",
            overrides: dict[str, Any] | None = None, seed: int = 0, device: str | torch.device = "cpu",
            precision: str = "auto", resume: bool = False, checkpoint_every: int = 50,
            eval_every: int = 0, val_per_class: int = 100,
            on_iteration: Callable[[int, int, float, dict | None], None] | None = None) -> Any:
    """Learn a synthetic set; returns it (a :class:`tinyset.synset.SyntheticSet`).

    ``eval_every > 0`` evaluates the current images every so many iterations on a validation split
    held out from the training data (``val_per_class`` images per class, excluded from matching);
    the test set is never used here.
    """
    from tinyset.evaluate import Protocol, evaluate_tensors
    from tinyset.synset import SyntheticSet
    from tinyset.viz import save_grid

    device = torch.device(device)
    out = Path(out_dir)
    cfg = resolve_config(method, train.info.name, ipc, preset, overrides)
    check_ipc(train, ipc)
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    ckpt_path = out / CHECKPOINT
    if not resume and ckpt_path.exists():
        raise ConfigError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or "
                          f"choose another --out")
    precision = resolve_precision(precision, device)
    cfg["precision"] = precision
    cfg["seed"] = seed

    gen = make_generator(seed)
    val = None
    if eval_every > 0:
        train, val = split_validation(train, val_per_class, gen)
        check_ipc(train, ipc)
    pool = RealPool(train, device)
    strategy = cfg.get("dsa_strategy") or default_strategy(train.info.name)
    method_cls = METHODS.get(cfg["method"])
    augment = DSA(strategy) if method_cls.uses_dsa and strategy != "none" else None
    cfg["dsa_strategy"] = augment.strategy if augment else "none"
    impl: Method = method_cls(cfg, train.info, pool, ipc, device, precision, augment)

    images = _initial_images(cfg, train, pool, ipc, gen)
    start_it, elapsed0 = 0, 0.0
    if resume:
        tensors, header = load_checkpoint(ckpt_path)
        saved = header["config"]
        for k in ("method", "dataset", "ipc", "seed", "init", "model", "lr_img", "batch_real"):
            if saved.get(k) != cfg.get(k):
                raise ConfigError(f"--resume: {ckpt_path} was made with {k}={saved.get(k)!r}, "
                                  f"this run asks for {cfg.get(k)!r}")
        if tuple(tensors["images"].shape) != tuple(images.shape):
            raise ArtifactError(f"{ckpt_path}: images of shape {tuple(tensors['images'].shape)}, "
                                f"expected {tuple(images.shape)}")
        images = tensors["images"].to(device)
        gen.set_state(tensors["generator"])
        start_it, elapsed0 = int(header["iteration"]), float(header.get("elapsed_s", 0.0))
        cfg["iterations"] = max(int(cfg["iterations"]), start_it)
    images = images.detach().requires_grad_(True)
    opt = torch.optim.SGD([images], lr=float(cfg["lr_img"]), momentum=float(cfg.get("momentum_img", 0.5)))
    if resume and "momentum_buffer" in tensors:
        opt.state[images]["momentum_buffer"] = tensors["momentum_buffer"].to(device)

    info = train.info
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg)
    metrics_path = out / "metrics.jsonl"
    if resume and metrics_path.exists():  # keep the lines up to the checkpoint
        kept = [ln for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("iteration", 0) <= start_it]
        metrics_path.write_text("".join(k + "\n" for k in kept))
    elif not resume:
        metrics_path.write_text("")
        save_grid(SyntheticSet(images.detach().cpu(), _labels(info.num_classes, ipc), info, meta={}),
                  out / "init.png")

    iterations = int(cfg["iterations"])
    val_proto = Protocol.preset("quick") if eval_every > 0 else None
    last_eval: dict | None = None
    t0 = time.perf_counter()
    it = start_it
    with _StopRequest() as stop, open(metrics_path, "a") as log:
        while it < iterations:
            loss = impl.step(images, opt, gen)
            if not torch.isfinite(images).all():
                raise NumericalError(f"synthetic images became NaN/inf at iteration {it + 1}; the last good "
                                     f"checkpoint ({ckpt_path}) is kept")
            it += 1
            rec: dict[str, Any] = {"iteration": it, "loss": loss,
                                   "seconds": elapsed0 + time.perf_counter() - t0}
            if val is not None and val_proto is not None and (it % eval_every == 0 or it == iterations):
                res = evaluate_tensors(images.detach(), _labels(info.num_classes, ipc).to(device), info, val,
                                       protocol=val_proto, seed=seed, device=device)
                r = res["results"][0]
                last_eval = {"split": "validation", "protocol": "quick", "mean": r["mean"], "std": r["std"]}
                rec["eval"] = last_eval
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if on_iteration is not None:
                on_iteration(it, iterations, loss, last_eval)
            if it % checkpoint_every == 0 or it == iterations or stop.signum is not None:
                save_checkpoint(ckpt_path, images, opt, gen, it, cfg, rec["seconds"])
            if stop.signum is not None:
                print(f"\nstopped by signal {stop.signum} after iteration {it}; checkpoint saved to {ckpt_path}; "
                      f"continue with --resume", file=sys.stderr)
                raise KeyboardInterrupt
    wall = elapsed0 + time.perf_counter() - t0
    meta = {"method": cfg["method"], "config": cfg, "seed": seed, "iterations": it, "wall_time_s": wall}
    synset = SyntheticSet(images.detach().cpu(), _labels(info.num_classes, ipc), info, meta=meta)
    synset.save(out / "synset.safetensors")
    save_grid(synset, out / "final.png")
    return synset


def _labels(k: int, ipc: int) -> torch.Tensor:
    return torch.arange(k).repeat_interleave(ipc)


def run_distill_cli(args: Any) -> int:
    """``tinyset distill``: validate everything, distill with a progress bar, evaluate, print."""
    from tqdm import tqdm

    from tinyset.data import load_dataset
    from tinyset.evaluate import Protocol, evaluate_synset, format_table
    from tinyset.runtime import resolve_device

    device = resolve_device(args.device)
    overrides = {"iterations": args.iterations, "init": args.init, "model": args.model,
                 "lr_img": args.lr_img, "batch_real": args.batch_real}
    # reject bad arguments before any work starts
    cfg = resolve_config(args.method, args.dataset, args.ipc, args.preset, overrides)
    train = load_dataset(args.dataset, "train", root=args.data_root, download=args.download)
    check_ipc(train, args.ipc)
    if args.eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {args.eval_every}")
    test = load_dataset(args.dataset, "test", root=args.data_root, download=args.download)
    out = Path(args.out or f"runs/{cfg['method']}_{args.dataset.replace(':', '_').replace('/', '_')}"
                           f"_ipc{args.ipc}_seed{args.seed}")
    bar = tqdm(total=int(cfg["iterations"]), unit="it", dynamic_ncols=True, file=sys.stderr, disable=None)

    def update(it: int, total: int, loss: float, ev: dict | None) -> None:
        if bar.n == 0 and it > 1:
            bar.update(it - 1)
        post = {"loss": f"{loss:.4f}"}
        if ev:
            post["val_acc"] = f"{100 * ev['mean']:.1f}"
        bar.set_postfix(post)
        bar.update(1)

    try:
        synset = distill(cfg["method"], train, args.ipc, out, preset=args.preset, overrides=overrides,
                         seed=args.seed, device=device, precision=args.precision, resume=args.resume,
                         checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, on_iteration=update)
    finally:
        bar.close()
    print(f"distilled {len(synset)} images ({args.ipc} per class) with {cfg['method']} in "
          f"{synset.meta['iterations']} iterations, {synset.meta['wall_time_s']:.1f} s: {out / 'synset.safetensors'}")
    mode = args.final_eval
    if mode == "off":
        return 0
    proto_name = cfg.get("final_eval", "quick") if mode == "auto" else "dsa"
    protocol = Protocol.preset(proto_name)
    res = evaluate_synset(synset, test, ["convnet"], protocol, seed=args.seed, device=device)
    write_json(out / "eval.json", res)
    print(format_table(res["results"], title=f"test accuracy of networks trained on {out / 'synset.safetensors'}"))
    p = res["protocol"]
    print(f"protocol {p['name']}: {p['epochs']} epochs, augment {p['augment_strategy']}, {p['num_models']} models; "
          f"full protocol: tinyset evaluate {out / 'synset.safetensors'}")
    return 0
