"""The one distillation loop every method shares: configuration, state, checkpoints, resume,
signals, NaN guard, metrics, periodic validation, outputs. It names no method: everything
method-specific comes through the :class:`~tinyset.methods.base.Distiller` contract.

Run folder::

    config.json             final settings, where each came from, runtime (device, precision, threads)
    checkpoint.safetensors  every declared tensor, module and optimiser state, the generator, iteration
    metrics.jsonl           one line per iteration: iteration, loss, seconds (+ validation evaluations)
    best.safetensors        with --eval-every: the set of the iteration with the highest validation
                            accuracy so far (the earliest on ties), chosen without the test split
    init.png / final.png    image grids, one row per class
    (method's own files)    whatever a method writes in Distiller.write_artifacts (e.g. a generator, samples)
    synset.safetensors      the final synthetic set
    eval.json               the final test evaluation, when one is run
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save_file

from tinyset import __version__
from tinyset.augment import DSA, default_strategy
from tinyset.data.base import ImageDataset, RealPool, check_ipc, split_validation
from tinyset.errors import ArtifactError, ConfigError, Interrupted, NumericalError
from tinyset.files import (RunLock, atomic_path, clean_stale_temps, read_jsonl, read_tagged_safetensors, rewrite_jsonl,
                           write_json)
from tinyset.hparams import Resolved, resolve
from tinyset.methods import METHODS
from tinyset.methods.base import DistillContext, Distiller, check_init
from tinyset.results import DistillationResult
from tinyset.rng import make_generator
from tinyset.runtime import resolve_precision

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "tinyset.checkpoint"
CHECKPOINT_VERSION = 2
#: settings that must not change between a run and its resume (besides the method's own fields)
RUN_IDENTITY = ("method", "dataset", "ipc", "seed")


def resolve_config(method: str, dataset: str, ipc: int, preset: str = "cpu", config_file: str | Path | None = None,
                   sets: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None) -> Resolved:
    """The typed settings of ``method`` for ``(dataset, ipc)``: defaults, the method's published
    table, its cpu rule (``preset="cpu"``), a TOML file, then ``--set`` values and flags."""
    cls: type[Distiller] = METHODS.get(method)
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1, got {ipc}")
    res = resolve(cls.Config, dataset=dataset, ipc=ipc, profile=preset, table=cls.paper, cpu_rule=cls.cpu_rule,
                  file=config_file, sets=sets, flags=flags, complete=cls.complete)
    cls.check_config(res.values)
    check_init(res.values.init, dataset, ipc, res.sources.get("init", ""))
    return res


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
            raise Interrupted(signum, "")
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------- checkpoints
def state_tensors(impl: Distiller) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every declared tensor, module state and optimiser state as flat tensors + a JSON description."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in impl.tensors.items():
        tensors[f"tensor.{name}"] = t.detach().cpu().contiguous()
    for name, mod in impl.modules.items():
        for key, t in mod.state_dict().items():
            tensors[f"module.{name}.{key}"] = t.detach().cpu().contiguous()
    optim: dict[str, Any] = {}
    for name, opt in impl.optimizers.items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{name}.{idx}.{key}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = v
        optim[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, optim


def restore_state(impl: Distiller, tensors: Mapping[str, torch.Tensor], optim: Mapping[str, Any], path: Path) -> None:
    """Put a checkpoint's state back into the declared tensors, modules and optimisers."""
    for name, t in impl.tensors.items():
        saved = tensors.get(f"tensor.{name}")
        if saved is None:
            raise ArtifactError(f"{path}: no tensor {name!r} (the method declares {', '.join(impl.tensors)})")
        if tuple(saved.shape) != tuple(t.shape):
            raise ArtifactError(f"{path}: tensor {name!r} has shape {tuple(saved.shape)}, this run expects "
                                f"{tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(saved.to(t.device, t.dtype))
    for name, mod in impl.modules.items():
        prefix = f"module.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            mod.load_state_dict(sd)
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: module {name!r} does not fit this run ({exc})") from None
    for name, opt in impl.optimizers.items():
        if name not in optim:
            raise ArtifactError(f"{path}: no state for optimiser {name!r}")
        entry = optim[name]
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, v in tensors.items():
            if key.startswith(prefix):
                idx, _, field = key[len(prefix):].partition(".")
                state.setdefault(int(idx), {})[field] = v
        for idx, sc in entry.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(sc)
        try:
            opt.load_state_dict({"state": state, "param_groups": entry["param_groups"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: optimiser {name!r} state does not fit this run ({exc})") from None


def save_checkpoint(path: Path, impl: Distiller, gen: torch.Generator, iteration: int, config: Resolved,
                    identity: dict[str, Any], elapsed: float) -> None:
    tensors, optim = state_tensors(impl)
    tensors["generator"] = gen.get_state()
    header = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "iteration": iteration,
              "identity": identity, "config": config.values.to_dict(), "optimizers": optim,
              "elapsed_s": elapsed, "tinyset_version": __version__}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tinyset": json.dumps(header)})


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of a checkpoint (safetensors only: nothing is unpickled), checked."""
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint at {path}")
    tensors, header = read_tagged_safetensors(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")
    expect = {"iteration": int, "identity": dict, "config": dict, "optimizers": dict, "elapsed_s": (int, float)}
    for key, typ in expect.items():
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise ArtifactError(f"{path}: checkpoint header field {key!r} is missing or of the wrong type "
                                f"({type(header.get(key)).__name__})")
    if header["iteration"] < 0:
        raise ArtifactError(f"{path}: checkpoint iteration {header['iteration']} is negative")
    if "generator" not in tensors:
        raise ArtifactError(f"{path}: checkpoint has no generator state")
    return tensors, header


# ---------------------------------------------------------------------------------- the loop
def method_precision(cls: type[Distiller], requested: str, device: torch.device | str,
                     resolved: str | None = None) -> tuple[str, str | None]:
    """The precision a run of method ``cls`` uses, and why when the method's own rule decided it.

    ``requested`` is what the user asked for (``auto``, ``fp32`` or ``bf16``); ``resolved`` the
    runtime's resolution of it, if already made (else :func:`tinyset.runtime.resolve_precision`).
    ``auto`` gives way to :attr:`Distiller.auto_precision` where the method sets one.
    """
    runtime_choice = resolved if resolved is not None else resolve_precision(requested, device)
    rule = cls.auto_precision
    if requested == "auto" and rule is not None and rule != runtime_choice:
        return rule, f"auto: {rule} for {cls.name}, the method's rule; an explicit --precision overrides it"
    return runtime_choice, None


#: the run's best set by validation accuracy (only with ``eval_every > 0``)
BEST = "best.safetensors"


def _beats(evaluation: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether a validation evaluation makes a new best set: a strictly higher mean (the earliest wins ties)."""
    return best is None or evaluation["mean"] > best["mean"]


def _best_evaluation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation evaluation the best set came from: the highest mean, the earliest on ties."""
    best = None
    for r in records:
        ev = r.get("eval")
        if ev is not None and _beats(ev, best):
            best = {**ev, "iteration": r["iteration"]}
    return best


def distill(method: str, train: ImageDataset, ipc: int, out_dir: str | Path, *, preset: str = "cpu",
            config_file: str | Path | None = None, sets: Mapping[str, Any] | None = None,
            overrides: Mapping[str, Any] | None = None, seed: int = 0, device: str | torch.device = "cpu",
            precision: str = "auto", resume: bool = False, checkpoint_every: int = 50, eval_every: int = 0,
            val_per_class: int = 100, test: ImageDataset | None = None, final_eval: str | None = None,
            on_iteration: Callable[[int, int, float, dict | None], None] | None = None,
            runtime_info: Mapping[str, Any] | None = None) -> DistillationResult:
    """Learn a synthetic set with ``method``; returns a :class:`~tinyset.results.DistillationResult`.

    Settings come from :func:`resolve_config` (``overrides`` count as flags, ``sets`` as
    ``--set``). ``eval_every > 0`` evaluates the current set every so many iterations on a
    validation split held out of the training data (``val_per_class`` images per class, excluded
    from matching); the test set is never used for that. The set that scores highest there is kept
    as ``best.safetensors`` (its header's ``chosen_by`` says which iteration and score), and
    ``DistillationResult.best`` describes it. With ``test`` given, the final set is
    evaluated on it with the ``final_eval`` protocol (default: the config's) and ``eval.json``
    written.
    """
    device = torch.device(device)
    out = Path(out_dir)
    config = resolve_config(method, train.info.name, ipc, preset, config_file, sets, overrides)
    cfg = config.values
    check_ipc(train, ipc)
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0, got {eval_every}")
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise ArtifactError(f"--resume: no checkpoint at {ckpt_path}; start the run without --resume")
    if not resume and ckpt_path.exists():
        raise ConfigError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or "
                          f"choose another --out")
    key = METHODS._key(method)
    cls: type[Distiller] = METHODS.get(key)
    precision = method_precision(cls, precision, device)[0]
    identity = {"method": key, "dataset": train.info.name, "ipc": ipc, "seed": seed}

    gen = make_generator(seed)
    val = None
    if eval_every > 0:
        train, val = split_validation(train, val_per_class, gen)
        check_ipc(train, ipc)
    pool = RealPool(train, device)
    strategy = cfg.dsa_strategy or default_strategy(train.info.name)
    augment = DSA(strategy) if cls.augments(cfg) and strategy != "none" else None
    ctx = DistillContext(train.info, pool, ipc, device, precision, augment)
    impl = cls(cfg, ctx)
    impl.setup(gen)
    if "images" not in impl.tensors:
        raise TypeError(f"method {key}: setup() must declare the 'images' tensor")

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out) as lock:
        if lock.took_over_stale:
            print(f"note: took over the stale lock of {out} (process {lock.took_over_stale.get('pid')} on "
                  f"{lock.took_over_stale.get('host')} is gone)", file=sys.stderr)
        clean_stale_temps(out)
        return _run(impl, config, identity, train, val, out, ckpt_path, gen, preset, device, precision,
                    augment, resume, checkpoint_every, eval_every, test, final_eval, on_iteration, runtime_info)


def _run(impl: Distiller, config: Resolved, identity: dict[str, Any], train: ImageDataset,
         val: ImageDataset | None, out: Path, ckpt_path: Path, gen: torch.Generator, preset: str,
         device: torch.device, precision: str, augment: DSA | None, resume: bool, checkpoint_every: int,
         eval_every: int, test: ImageDataset | None, final_eval: str | None,
         on_iteration: Callable[[int, int, float, dict | None], None] | None,
         runtime_info: Mapping[str, Any] | None) -> DistillationResult:
    from tinyset.evaluate import Protocol, evaluate_synset, evaluate_tensors
    from tinyset.viz import save_grid

    cfg, key, seed, ipc = config.values, identity["method"], identity["seed"], identity["ipc"]
    start_it, elapsed0 = 0, 0.0
    if resume:
        tensors, header = load_checkpoint(ckpt_path)
        for k in RUN_IDENTITY:
            if header["identity"].get(k) != identity[k]:
                raise ConfigError(f"--resume: {ckpt_path} was made with {k}={header['identity'].get(k)!r}, "
                                  f"this run asks for {identity[k]!r}")
        for k, v in header["config"].items():
            if k != "iterations" and getattr(cfg, k, v) != v:
                raise ConfigError(f"--resume: {ckpt_path} was made with {k}={v!r}, this run asks for "
                                  f"{getattr(cfg, k)!r}; resume with the same settings")
        for k, spec in type(cfg).specs().items():  # settings added since the checkpoint: it ran with their default
            if k not in header["config"] and getattr(cfg, k) != spec.default:
                raise ConfigError(f"--resume: {ckpt_path} was made before the setting {k} existed (so with its "
                                  f"default, {spec.default!r}); this run asks for {getattr(cfg, k)!r}: resume with "
                                  f"--set {k}={'none' if spec.default is None else spec.default}")
        restore_state(impl, tensors, header["optimizers"], ckpt_path)
        gen.set_state(tensors["generator"])
        start_it, elapsed0 = int(header["iteration"]), float(header["elapsed_s"])

    iterations = max(cfg.iterations, start_it)
    info = train.info
    write_json(out / "config.json", {
        "method": key, "dataset": train.info.name, "ipc": ipc, "seed": seed, "preset": preset,
        "config": cfg.to_dict(), "sources": config.sources,
        "runtime": {"device": str(device), "precision": precision,
                    "dsa_strategy": augment.strategy if augment else "none", **(runtime_info or {})},
        "tinyset_version": __version__})
    metrics_path = out / "metrics.jsonl"

    def set_meta(iteration: int, **more: Any) -> dict[str, Any]:  # the header of a set this run saves
        return {"method": key, "config": cfg.to_dict(), "config_sources": config.sources, "seed": seed,
                "iterations": iteration, **more}

    best: dict[str, Any] | None = None  # the validation evaluation of best.safetensors
    if resume and metrics_path.exists():  # keep the lines up to the checkpoint (a torn last line is dropped)
        records, _ = read_jsonl(metrics_path)
        kept = [r for r in records if r.get("iteration", 0) <= start_it]
        rewrite_jsonl(metrics_path, kept)
        best = _best_evaluation(kept)
    elif not resume:
        metrics_path.write_text("")
        save_grid(impl.synset({}), out / "init.png")
    saved = {"iteration": start_it if resume else None}  # the checkpoint on disk for this run

    val_proto = Protocol.preset("quick") if eval_every > 0 else None
    last_eval: dict | None = None
    loss = float("nan")
    t0 = time.perf_counter()
    it = start_it
    try:
        with _StopRequest() as stop, open(metrics_path, "a") as log:
            while it < iterations:
                loss = impl.step(gen)
                for name, t in impl.tensors.items():
                    if not bool(torch.isfinite(t).all()):
                        raise NumericalError(f"learned tensor {name!r} became NaN/inf at iteration {it + 1}; "
                                             + (f"the last good checkpoint ({ckpt_path}, iteration "
                                                f"{saved['iteration']}) is kept" if saved["iteration"] is not None
                                                else "no checkpoint had been written yet"))
                it += 1
                rec: dict[str, Any] = {"iteration": it, "loss": loss,
                                       "seconds": elapsed0 + time.perf_counter() - t0}
                extra = impl.metrics()
                if extra:
                    rec["metrics"] = extra
                if val is not None and val_proto is not None and (it % eval_every == 0 or it == iterations):
                    current = impl.synset({})
                    res = evaluate_tensors(current.images, current.labels, info, val, protocol=val_proto,
                                           seed=seed, device=device, learned_lr=current.lr, zca=current.zca)
                    r = res.results[0]
                    last_eval = {"split": "validation", "protocol": "quick", "mean": r.mean, "std": r.std}
                    rec["eval"] = last_eval
                    if _beats(last_eval, best):
                        best = {**last_eval, "iteration": it}
                        impl.synset(set_meta(it, chosen_by=best)).save(out / BEST)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if on_iteration is not None:
                    on_iteration(it, iterations, loss, last_eval)
                if it % checkpoint_every == 0 or it == iterations or stop.signum is not None:
                    save_checkpoint(ckpt_path, impl, gen, it, config, identity, rec["seconds"])
                    saved["iteration"] = it
                impl.write_artifacts(out, it, final=False)
                if stop.signum is not None:
                    raise Interrupted(stop.signum, f"stopped by signal {stop.signum} after iteration {it}; "
                                                   f"checkpoint saved to {ckpt_path}; continue with --resume")
    except Interrupted as exc:
        if exc.message:
            raise
        kept = (f"the checkpoint of iteration {saved['iteration']} ({ckpt_path}) is kept; continue with --resume"
                if saved["iteration"] is not None else "nothing was saved (no checkpoint had been written yet)")
        raise Interrupted(exc.signum, f"stopped at once by a second signal: {kept}") from None
    wall = elapsed0 + time.perf_counter() - t0
    synset = impl.synset(set_meta(it, wall_time_s=wall))
    synset.save(out / "synset.safetensors")
    save_grid(synset, out / "final.png")
    impl.write_artifacts(out, it, final=True)
    result = DistillationResult(method=key, dataset=info.name, ipc=ipc, seed=seed, iterations=it, wall_time_s=wall,
                                out_dir=str(out), config=cfg.to_dict(), config_sources=dict(config.sources),
                                final_loss=loss if it > start_it else None, synset=synset,
                                best=None if best is None else {**best, "file": str(out / BEST)})
    if test is not None:
        protocol = Protocol.preset(final_eval or cfg.final_eval)
        ev = evaluate_synset(synset, test, [cfg.model], protocol, seed=seed, device=device, train=train)
        ev.file = str(out / "synset.safetensors")
        write_json(out / "eval.json", ev.to_dict())
        result.evaluation = ev
    return result


__all__ = ["distill", "resolve_config", "load_checkpoint", "save_checkpoint", "CHECKPOINT"]
