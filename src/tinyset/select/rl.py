"""Reinforcement-learning selection: a policy over per-class candidate pools, trained with REINFORCE.

The selection agent of the issue #11 source report (its MPS1/MPS2/MPS2U pipelines: "an RL agent
optimizes the selection of representative samples" rewarded by the accuracy of a ConvNet trained
on them), made precise with the score-function estimator of Williams ("Simple statistical
gradient-following algorithms for connectionist reinforcement learning", Machine Learning 1992):

1. **Hold-out.** ``val_per_class`` images of every class of the training split (seeded) are the
   validation split that every reward is measured on; the rest is the *training part*. The test
   split is never read (a dataset whose split is ``test`` is refused).
2. **Pool.** Every class gets a candidate pool of ``P = pool_size`` images of the training part
   (all of the class when it has fewer): a seeded uniform draw (``pool="random"``) or its ``P``
   highest pointwise mutual-information scores (``pool="mi"``: the ``mi`` selector with its default
   options run on the training part only; the report's "top 1,000 samples by MI").
3. **Policy.** One logit ``theta[c, p]`` per candidate, zero (uniform) or, with ``init="mi"``,
   ``init_scale`` times the MI scores standardised within each class. An *action* picks ``ipc``
   candidates of every class without replacement by the Gumbel-top-k trick (Kool et al., "Stochastic
   Beams and Where to Find Them", ICML 2019): the ``ipc`` largest ``theta + Gumbel noise``, which
   samples the Plackett-Luce distribution; the log-probability of the ordered pick
   ``s_1..s_k`` is ``sum_j theta[s_j] - logsumexp(theta over the candidates not yet picked)``.
4. **Reward.** Every iteration draws ``candidates`` actions; each chosen set trains a fresh network
   (``model``, ``epochs`` epochs of SGD, lr ``lr`` decayed x0.1 at half, batch ``batch_size``, no
   augmentation), all of them at once as one batched ensemble (:func:`tinyset.training.train_ensemble`
   with per-member data), and its reward is the network's validation accuracy. With
   ``train_patience > 0`` the networks stop early on the validation split
   (:class:`tinyset.training.EarlyStopping`, patience in epochs) and the reward is the accuracy of
   their best validation epoch. With ``greedy_member`` one more member trains on the policy's
   current mode (the ``ipc`` largest logits per class): it is a candidate for the output, not part
   of the gradient.
5. **Update.** REINFORCE with a moving-average baseline ``b``: the loss
   ``-mean_m (r_m - b) log pi(a_m) - entropy * H`` (``H``: the mean over classes of the entropy of
   ``softmax(theta[c])``, an exploration bonus) takes one Adam step (lr ``policy_lr``); then
   ``b <- baseline_decay * b + (1 - baseline_decay) * mean_m r_m`` (``b`` starts at the first
   iteration's mean reward).
6. **Output.** The set with the highest validation reward seen (the earliest on ties). ``patience >
   0`` stops the policy once ``patience`` iterations pass without a higher reward. The selection's
   scores are the final logits of the pool samples (``-inf`` outside the pools); its record holds
   every iteration's rewards.

Every random draw comes from generators derived from the seed; the policy, its optimiser, the
baseline, the best set and the generator are checkpointed (``run=RunControl(checkpoint=...)``,
atomically, every ``checkpoint_every`` iterations, after the last one and on SIGINT/SIGTERM), and
a resumed run continues bit-exactly on a CPU.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tinyset import __version__
from tinyset.data.base import ImageDataset
from tinyset.errors import ArtifactError, ConfigError, Interrupted
from tinyset.files import atomic_path, read_tagged_safetensors
from tinyset.hparams import hp
from tinyset.models import MODELS, create_model
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import resolve_precision
from tinyset.select import SELECTORS
from tinyset.select.base import RunControl, Selection, SelectorOptions, with_options
from tinyset.training import EarlyStopping, TrainSettings, test_accuracy, train_ensemble

CHECKPOINT_FORMAT = "tinyset.select-checkpoint"
CHECKPOINT_VERSION = 1
#: options that may differ between a run and its resume
RESUMABLE_CHANGES = ("iterations", "patience")


@dataclass
class RLOptions(SelectorOptions):
    """The options of ``rl`` (``tinyset select --method rl --set KEY=VALUE``; see the module docstring)."""

    iterations: int = hp(15, "policy iterations (REINFORCE updates)", ge=1)
    candidates: int = hp(4, "sets drawn from the policy per iteration, trained at once as one ensemble", ge=1)
    greedy_member: bool = hp(True, "also train on the policy's current top-ipc set every iteration (a candidate "
                                   "for the output, not in the gradient)")
    pool: str = hp("random", "candidate pool of every class: random (seeded draw) or mi (highest pointwise "
                             "mutual information with the label)", choices=("random", "mi"))
    pool_size: int = hp(100, "candidates per class (all of a smaller class)", ge=1)
    init: str = hp("zero", "initial logits: zero (uniform) or mi (standardised MI scores x init_scale)",
                   choices=("zero", "mi"))
    init_scale: float = hp(1.0, "scale of the MI initialisation", ge=0)
    model: str = hp("convnet-w32", "network trained on every candidate set (its validation accuracy is the reward)")
    epochs: int = hp(10, "training epochs of every reward network", ge=1)
    lr: float = hp(0.05, "SGD learning rate of the reward networks (x0.1 after half the epochs)", gt=0)
    batch_size: int = hp(64, "batch size of the reward networks", ge=1)
    train_patience: int = hp(0, "early stopping of the reward networks on the validation split: patience in "
                                "epochs (0: off, the reward is the accuracy after the last epoch)", ge=0)
    val_per_class: int = hp(50, "validation images per class held out of the training split (the rewards)", ge=1)
    policy_lr: float = hp(0.1, "Adam learning rate of the logits", gt=0)
    baseline_decay: float = hp(0.8, "moving-average baseline: b <- decay b + (1 - decay) mean reward", ge=0, lt=1)
    entropy: float = hp(0.0, "weight of the policy-entropy bonus", ge=0)
    patience: int = hp(0, "stop after this many iterations without a higher validation reward (0: never)", ge=0)
    precision: str = hp("auto", "autocast precision of the reward networks (auto: bf16 on a CPU with native "
                                "bf16)", choices=("auto", "fp32", "bf16"))


# ---------------------------------------------------------------- pieces

def split_indices(labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(rest, val)`` indices: ``per_class`` seeded random images of every class are held out."""
    rest, val = [], []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() <= per_class:
            raise ConfigError(f"rl val_per_class={per_class}: class {c} has {idx.numel()} training images, "
                              f"none would be left to choose from; use a smaller val_per_class")
        perm = idx[torch.randperm(idx.numel(), generator=generator)]
        val.append(perm[:per_class])
        rest.append(perm[per_class:])
    return torch.cat(rest).sort().values, torch.cat(val).sort().values


def gumbel_top_k(logits: torch.Tensor, k: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """``samples`` draws of ``k`` of the ``P`` candidates of every row of ``logits [K, P]`` without
    replacement (Plackett-Luce, by Gumbel-top-k): ``int64 [samples, K, k]`` positions in pick order."""
    u = torch.rand((samples, *logits.shape), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    keys = logits.detach().to(torch.float64).unsqueeze(0) + gumbel
    return keys.topk(k, dim=-1).indices


def plackett_luce_log_prob(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``log pi(picks)`` ``[S]`` of ordered picks ``[S, K, k]`` under per-row Plackett-Luce ``logits [K, P]``:
    ``sum_{c, j} logits[c, s_j] - logsumexp(logits[c, p] for p not among s_1..s_{j-1})`` (differentiable)."""
    p = logits.shape[-1]
    onehot = torch.nn.functional.one_hot(picks, p).to(torch.bool)  # [S, K, k, P]
    before = (onehot.cumsum(dim=2) - onehot.to(torch.long)).to(torch.bool)  # picked at an earlier step
    rows = logits.unsqueeze(0).unsqueeze(2).expand(picks.shape[0], -1, picks.shape[2], -1)
    norm = torch.logsumexp(rows.masked_fill(before, float("-inf")), dim=-1)  # [S, K, k]
    chosen = logits.unsqueeze(0).expand(picks.shape[0], -1, -1).gather(2, picks)  # [S, K, k]
    return (chosen - norm).sum(dim=(1, 2))


def policy_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the entropy of ``softmax(logits[c])`` (nats)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def set_rewards(pool_x: torch.Tensor, pool_y: torch.Tensor, picks: torch.Tensor, val_x: torch.Tensor,
                val_y: torch.Tensor, info: Any, o: RLOptions, precision: str, generator: torch.Generator
                ) -> list[float]:
    """Validation accuracy of one fresh network per set: ``picks [M, K, k]`` are positions in the
    pools (``pool_x [K*P, ...]`` class-major); the ``M`` networks train at once as one ensemble."""
    m, k_classes, k = picks.shape
    p = pool_x.shape[0] // k_classes
    rows = (picks + (torch.arange(k_classes) * p).view(1, -1, 1)).reshape(-1).to(pool_x.device)
    net = create_model(o.model, info.channels, info.num_classes, info.image_size, members=m,
                       generator=make_generator(derive_seed(generator)), device=pool_x.device)
    settings = TrainSettings(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, precision=precision)
    stopper = EarlyStopping(val_x, val_y, patience=o.train_patience) if o.train_patience > 0 else None
    train_ensemble(net, pool_x.index_select(0, rows), pool_y.index_select(0, rows), settings,
                   make_generator(derive_seed(generator)), early_stop=stopper, member_data=True)
    if stopper is not None:
        return [float(a) for a in stopper.best_accuracy]
    return [float(a) for a in test_accuracy(net, val_x, val_y, precision=precision)]


def mi_scores(part: ImageDataset, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Pointwise MI of every image of ``part`` with its label (the ``mi`` selector, default options)."""
    from tinyset.select.mi import MIOptions, mi_select

    return mi_select(part, 1, generator, device, **MIOptions().to_dict()).scores


def build_pool(labels: torch.Tensor, rest: torch.Tensor, num_classes: int, size: int, ipc: int,
               scores: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """``int64 [K, P]`` training indices, class by class: ``P = min(size, smallest class of rest)``
    candidates per class, the highest ``scores`` (a tensor over ``rest``, ties to the lower index) or,
    without scores, a seeded uniform draw; each row sorted by index."""
    per_class = [rest[labels[rest] == c] for c in range(num_classes)]
    smallest = min(int(x.numel()) for x in per_class)
    p = min(size, smallest)
    if p < ipc:
        c = min(range(num_classes), key=lambda i: per_class[i].numel())
        raise ConfigError(f"rl needs at least ipc={ipc} candidates per class, but class {c} has {smallest} images "
                          f"left after holding out the validation split (pool_size={size})")
    rows = []
    for c, idx in enumerate(per_class):
        if scores is None:
            chosen = idx[torch.randperm(idx.numel(), generator=generator)[:p]]
        else:
            s = scores[labels[rest] == c]
            chosen = idx[torch.sort(s, descending=True, stable=True).indices[:p]]
        rows.append(chosen.sort().values)
    return torch.stack(rows)


# ---------------------------------------------------------------- state and checkpoints

class PolicyState:
    """Everything an iteration changes: the logits and their Adam state, the baseline, the best set."""

    def __init__(self, logits: torch.Tensor, policy_lr: float):
        self.logits = torch.nn.Parameter(logits.to(torch.float32).clone())
        self.opt = torch.optim.Adam([self.logits], lr=policy_lr)
        self.baseline: float | None = None
        self.iteration = 0
        self.best_reward = float("-inf")
        self.best_set = torch.empty(0, dtype=torch.long)
        self.best_iteration = 0
        self.since_best = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0

    def save(self, path: Path, pool: torch.Tensor, val: torch.Tensor, generator: torch.Generator,
             identity: dict[str, Any], options: dict[str, Any]) -> None:
        tensors = {"logits": self.logits.detach().cpu().contiguous(), "pool": pool.contiguous(),
                   "val": val.contiguous(), "best_set": self.best_set.contiguous(), "generator": generator.get_state()}
        for key, v in self.opt.state_dict()["state"].get(0, {}).items():
            tensors[f"adam.{key}"] = v.detach().cpu().reshape(v.shape).contiguous()
        header = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "selector": "rl",
                  "identity": identity, "options": options, "iteration": self.iteration,
                  "baseline": self.baseline, "best_reward": self.best_reward if self.best_set.numel() else None,
                  "best_iteration": self.best_iteration, "since_best": self.since_best,
                  "stopped_early": self.stopped_early, "history": self.history, "elapsed_s": self.elapsed,
                  "tinyset_version": __version__}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"tinyset": json.dumps(header)})

    @classmethod
    def load(cls, path: Path, policy_lr: float, identity: dict[str, Any], options: dict[str, Any],
             generator: torch.Generator) -> tuple["PolicyState", torch.Tensor, torch.Tensor]:
        """The state, pool and validation indices of a checkpoint made by the same run (checked)."""
        if not path.is_file():
            raise ArtifactError(f"--resume: no checkpoint at {path}; start the selection without --resume")
        tensors, header = read_tagged_safetensors(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                                  "selection checkpoint")
        for key, want in identity.items():
            if header.get("identity", {}).get(key) != want:
                raise ConfigError(f"--resume: {path} was made with {key}={header.get('identity', {}).get(key)!r}, "
                                  f"this run has {want!r}; resume with the same dataset, ipc and seed")
        for key, want in options.items():
            have = header.get("options", {}).get(key)
            if key not in RESUMABLE_CHANGES and have != want:
                raise ConfigError(f"--resume: {path} was made with {key}={have!r}, this run asks for {want!r}; "
                                  f"resume with the same options (only {', '.join(RESUMABLE_CHANGES)} may change)")
        need = ("logits", "pool", "val", "best_set", "generator")
        missing = [k for k in need if k not in tensors]
        if missing:
            raise ArtifactError(f"{path}: selection checkpoint lacks {', '.join(missing)}")
        st = cls(tensors["logits"], policy_lr)
        adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
        if adam:
            groups = st.opt.state_dict()["param_groups"]
            st.opt.load_state_dict({"state": {0: adam}, "param_groups": groups})
        st.baseline = header["baseline"]
        st.iteration = int(header["iteration"])
        st.best_reward = float("-inf") if header["best_reward"] is None else float(header["best_reward"])
        st.best_set = tensors["best_set"].to(torch.long)
        st.best_iteration = int(header["best_iteration"])
        st.since_best = int(header["since_best"])
        st.stopped_early = bool(header["stopped_early"])
        st.history = list(header["history"])
        st.elapsed = float(header["elapsed_s"])
        generator.set_state(tensors["generator"])
        return st, tensors["pool"].to(torch.long), tensors["val"].to(torch.long)


# ---------------------------------------------------------------- the selector

@SELECTORS.register("rl", help="REINFORCE policy over per-class candidate pools, rewarded by the validation "
                               "accuracy of networks trained on its picks (issue #11 report's RL agent)")
@with_options(RLOptions)
def rl_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
              iterations: int = 15, candidates: int = 4, greedy_member: bool = True, pool: str = "random",
              pool_size: int = 100, init: str = "zero", init_scale: float = 1.0, model: str = "convnet-w32",
              epochs: int = 10, lr: float = 0.05, batch_size: int = 64, train_patience: int = 0,
              val_per_class: int = 50, policy_lr: float = 0.1, baseline_decay: float = 0.8, entropy: float = 0.0,
              patience: int = 0, precision: str = "auto", run: RunControl | None = None) -> Selection:
    """The set of ``ipc`` images per class with the best validation reward found by a REINFORCE
    policy (see the module docstring). ``train`` must be a training split; nothing else is read."""
    o = RLOptions(iterations=iterations, candidates=candidates, greedy_member=greedy_member, pool=pool,
                  pool_size=pool_size, init=init, init_scale=init_scale, model=model, epochs=epochs, lr=lr,
                  batch_size=batch_size, train_patience=train_patience, val_per_class=val_per_class,
                  policy_lr=policy_lr, baseline_decay=baseline_decay, entropy=entropy, patience=patience,
                  precision=precision)
    MODELS.get(o.model)  # ConfigError naming the known models
    if train.split == "test":
        raise ConfigError("rl selects from a training split; it was given the test split (the test set is "
                          "never used for selection)")
    run = run or RunControl()
    device = torch.device(device)
    prec = resolve_precision(o.precision, device)
    info, labels = train.info, train.labels.cpu()
    num_classes = info.num_classes
    # every seed is drawn up front, so the draws do not depend on the options
    split_seed, pool_seed, mi_seed, loop_seed = (derive_seed(generator) for _ in range(4))
    identity = {"dataset": info.name, "images": len(train), "ipc": ipc, "seed_tag": loop_seed}
    options = o.to_dict()

    rest, val = split_indices(labels, num_classes, o.val_per_class, make_generator(split_seed))
    gen = make_generator(loop_seed)
    if run.resume:
        state, pool_idx, saved_val = PolicyState.load(run.checkpoint, o.policy_lr, identity, options, gen)
        if not torch.equal(saved_val, val):
            raise ArtifactError(f"{run.checkpoint}: its validation split differs from this run's (another copy "
                                f"of the dataset?)")
    else:
        if run.checkpoint is not None and run.checkpoint.exists():
            raise ConfigError(f"{run.checkpoint} already holds a selection checkpoint; resume it or choose "
                              f"another checkpoint path")
        scores = None
        if o.pool == "mi" or o.init == "mi":
            part = ImageDataset(info, train.split, train.images[rest], labels[rest], train.source)
            scores = mi_scores(part, make_generator(mi_seed), device)
        pool_idx = build_pool(labels, rest, num_classes, o.pool_size, ipc, scores if o.pool == "mi" else None,
                              make_generator(pool_seed))
        logits = torch.zeros(pool_idx.shape, dtype=torch.float32)
        if o.init == "mi":
            full = torch.full((len(train),), float("nan"), dtype=torch.float64)
            full[rest] = scores
            s = full[pool_idx]
            std = s.std(dim=1, keepdim=True, unbiased=False)
            z = (s - s.mean(dim=1, keepdim=True)) / torch.where(std > 1e-12, std, torch.ones_like(std))
            logits = (o.init_scale * z).to(torch.float32)
        state = PolicyState(logits, o.policy_lr)

    p = pool_idx.shape[1]
    pool_x = info.normalize(train.images[pool_idx.reshape(-1)].to(device))
    pool_y = labels[pool_idx.reshape(-1)].to(device)
    val_x, val_y = info.normalize(train.images[val].to(device)), labels[val].to(device)
    members = o.candidates + int(o.greedy_member)

    from tinyset.methods.loop import _StopRequest  # SIGINT/SIGTERM -> a flag checked between iterations

    def checkpoint() -> None:
        if run.checkpoint is not None:
            state.save(run.checkpoint, pool_idx, val, gen, identity, options)

    t0, elapsed0 = time.perf_counter(), state.elapsed
    with _StopRequest() as stop, tqdm(total=o.iterations, initial=min(state.iteration, o.iterations), unit="it",
                                       desc="rl", disable=None, leave=False) as bar:
        while state.iteration < o.iterations and not state.stopped_early:
            picks = gumbel_top_k(state.logits, ipc, o.candidates, gen)  # [M, K, ipc]
            sets = picks
            if o.greedy_member:
                mode = state.logits.detach().topk(ipc, dim=-1).indices.unsqueeze(0)
                sets = torch.cat([picks, mode])
            rewards = set_rewards(pool_x, pool_y, sets, val_x, val_y, info, o, prec, gen)
            r = torch.tensor(rewards[:o.candidates], dtype=torch.float64)
            if state.baseline is None:
                state.baseline = float(r.mean())
            adv = (r - state.baseline).to(torch.float32)
            logp = plackett_luce_log_prob(state.logits, picks)
            ent = policy_entropy(state.logits)
            loss = -(adv * logp).mean() - o.entropy * ent
            state.opt.zero_grad(set_to_none=True)
            loss.backward()
            state.opt.step()
            state.baseline = o.baseline_decay * state.baseline + (1.0 - o.baseline_decay) * float(r.mean())
            state.iteration += 1
            best_m = max(range(members), key=lambda i: (rewards[i], -i))  # first maximum
            if rewards[best_m] > state.best_reward:
                chosen = sets[best_m]  # [K, ipc] positions
                state.best_set = torch.gather(pool_idx, 1, chosen).reshape(-1)
                state.best_reward, state.best_iteration, state.since_best = rewards[best_m], state.iteration, 0
            else:
                state.since_best += 1
            if o.patience and state.since_best >= o.patience:
                state.stopped_early = True
            state.elapsed = elapsed0 + time.perf_counter() - t0
            rec = {"iteration": state.iteration, "rewards": rewards, "mean_reward": float(r.mean()),
                   "greedy_reward": rewards[-1] if o.greedy_member else None, "baseline": state.baseline,
                   "loss": float(loss.detach()), "entropy": float(ent.detach()), "seconds": state.elapsed}
            state.history.append(rec)
            bar.set_postfix(reward=f"{rec['mean_reward']:.4f}", best=f"{state.best_reward:.4f}", refresh=False)
            bar.update(1)
            if run.on_iteration is not None:
                run.on_iteration(state.iteration, o.iterations, rec)
            last = state.iteration >= o.iterations or state.stopped_early
            if state.iteration % run.checkpoint_every == 0 or last or stop.signum is not None:
                checkpoint()
            if stop.signum is not None:
                where = f"checkpoint saved to {run.checkpoint}; continue with --resume" if run.checkpoint else \
                    "no checkpoint path was given, nothing was saved"
                raise Interrupted(stop.signum, f"stopped by signal {stop.signum} after iteration "
                                               f"{state.iteration}; {where}")
    if state.best_set.numel() == 0:
        raise ConfigError("rl ran no iteration (iterations=0?)")

    final = state.logits.detach().to(torch.float64)
    scores_out = torch.full((len(train),), float("-inf"), dtype=torch.float64)
    scores_out[pool_idx.reshape(-1)] = final.reshape(-1)
    best = state.best_set.view(num_classes, ipc)
    order = torch.argsort(scores_out[best], dim=1, descending=True, stable=True)
    indices = torch.gather(best, 1, order).reshape(-1)
    record = {"iterations": state.iteration, "best_reward": state.best_reward, "best_iteration": state.best_iteration,
              "stopped_early": state.stopped_early, "pool_per_class": p, "validation_images": int(val.numel()),
              "members_per_iteration": members, "seconds": state.elapsed,
              "mean_rewards": [h["mean_reward"] for h in state.history],
              "greedy_rewards": [h["greedy_reward"] for h in state.history]}
    note = (f"rl: final policy logits of the {p} pool candidates per class (-inf outside the pools); the set is "
            f"the one with the best validation reward ({state.best_reward:.4f}, iteration {state.best_iteration} "
            f"of {state.iteration})")
    if not math.isfinite(state.best_reward):
        raise ConfigError("rl: no finite validation reward was measured")
    return Selection(indices, scores_out, order_note=note, record=record)


__all__ = ["RLOptions", "rl_select", "split_indices", "gumbel_top_k", "plackett_luce_log_prob", "policy_entropy",
           "set_rewards", "build_pool", "mi_scores", "PolicyState"]
