"""Mutual-information selection: per class, the samples most informative about their own label.

The score of training sample ``i`` (image ``x_i``, label ``y_i``) is its *pointwise* mutual
information with the label, ``pmi_i = log p(y_i | x_i) - log p(y_i)``, where ``p(y)`` is the class
frequency in the training split and ``p(y | x)`` is estimated on the embeddings of a network
trained briefly on real training data. Per class, the ``ipc`` highest scores are kept (optionally
with a diversity term). The steps:

1. **Hold-out.** ``val_fraction`` of every class of the training split (at least one image,
   seeded) is held out as a validation split; the rest is the *fit* part. The test split is never
   read (a dataset whose split is ``"test"`` is refused).
2. **Network.** A fresh ``model`` (default ``convnet-w32``) is trained for ``epochs`` epochs
   (default 1) on a seeded class-stratified subsample of ``max_train`` images of the fit part
   (default 10,000; ``None``: all of it) with the shared loop
   :func:`tinyset.training.train_ensemble` (SGD lr ``lr``, momentum 0.9, weight decay 5e-4, batch
   ``batch_size``, no augmentation). Every training image is embedded (``model.embed``);
   the embeddings are standardised with the mean and std of the fit part and projected on their
   ``dim`` leading principal components (of the fit part; ``dim=0`` keeps every feature): ``z_i``.
3. **Estimator ``probe``** (default). Multinomial logistic regressions ``softmax(W z + b)`` are
   fitted by L-BFGS, minimising ``mean CE + probe_l2 / 2 * ||W||^2``, *cross-fitted*: every sample
   is dealt to one of ``folds`` class-stratified folds, and the probe scoring fold ``f`` is fitted
   on the fit-part samples outside fold ``f`` (a probe never scores a sample it was fitted on,
   which would reward memorised noise; ``folds=1``: one probe on the whole fit part). The logits
   are then *calibrated* by temperature scaling: the scalar ``T > 0`` minimising the mean NLL of
   ``softmax(logits / T)`` on the validation split (convex in ``1 / T``; golden-section search).
   ``log p(y_i | x_i) = log softmax(logits_i / T)[y_i]``.
4. **Estimator ``knn``.** Non-parametric: with ``u_i`` the L2-normalised ``z_i``, the ``k``
   nearest training samples of ``i`` by cosine similarity, excluding ``i`` itself, among a seeded
   class-stratified reference set of ``knn_reference`` training samples (``None``: all), vote:
   ``p(y_i | x_i) = (n_same + alpha) / (k + alpha * K)`` with ``n_same`` the neighbours labelled
   ``y_i``, ``K`` the number of classes and ``alpha > 0`` additive smoothing (so the log is
   finite). Similarities are computed 512 rows at a time (memory ``O(512 * knn_reference)``).
5. **Choice.** ``diversity = 0``: the ``ipc`` highest scores of every class. ``diversity > 0``:
   per class, greedily (:func:`tinyset.select.greedy.greedy_order` with
   :class:`DiversityCriterion`) the sample maximising ``pmi_i - diversity * max_{j chosen}
   cos(z_i, z_j)``, so near-duplicates of an already chosen sample lose ``~diversity``.
6. **Strata** (``strata = s > 1``, after coverage-centric selection, Zheng et al., ICLR 2023). Per
   class, the samples are ranked by score and cut into ``s`` bands of equal size (the first
   ``n mod s`` one larger); band ``b`` (0 = the highest scores) gets ``ipc // s`` picks, one more
   for the first ``ipc mod s`` bands, chosen inside the band by the rule of step 5. Without strata
   every pick is a confidently classified sample; with them the set keeps samples from the whole
   range, down to those near the class boundaries. (At FashionMNIST ipc 50, diversity 0.1 alone
   kept only samples with ``p(y|x) >= 0.9``, although 42% of the training images have less, and
   scored below random images: docs/measurements.md.)

With the probe, top-k ranks by the label's log-odds ``log p - log(1 - p)``, which orders every
class exactly as ``pmi`` does but does not round to a tie for very confident samples. Remaining
ties (e.g. many samples whose neighbours all agree) are broken by a seeded random order, so the
choice among equally scored samples is a seeded uniform draw. The selection's scores are the
pointwise MI of every training sample (nats), also with ``diversity > 0``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError, NumericalError
from tinyset.hparams import hp
from tinyset.models import MODELS, create_model
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, resolve_precision
from tinyset.select import SELECTORS, greedy
from tinyset.select.base import Selection, SelectorOptions, with_options
from tinyset.select.forgetting import stratified_subset
from tinyset.training import TrainSettings, check_number, train_ensemble

ESTIMATORS = ("probe", "knn")


# ---------------------------------------------------------------- data steps

def holdout_indices(labels: torch.Tensor, num_classes: int, fraction: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(fit, val)`` index tensors: ``max(1, round(fraction * n_c))`` random images of every
    class ``c`` (``n_c`` images) are held out for validation, the rest are the fit part.

    The same per-class scheme as :func:`tinyset.data.split_validation` (a seeded ``randperm`` per
    class), but with a fraction and returning indices, so that scores can be put back in place.
    """
    fit, val = [], []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        n_val = max(1, int(round(fraction * idx.numel())))
        if idx.numel() - n_val < 1:
            raise ConfigError(f"mi val_fraction={fraction:g} holds out {n_val} of the {idx.numel()} images of "
                              f"class {c}, leaving none to train on; use a smaller val_fraction or more data")
        perm = idx[torch.randperm(idx.numel(), generator=generator)]
        val.append(perm[:n_val])
        fit.append(perm[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def train_and_embed(train: ImageDataset, fit_idx: torch.Tensor, *, model: str, epochs: int, lr: float,
                    batch_size: int, precision: str, device: torch.device, init_seed: int,
                    shuffle_seed: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Train a fresh ``model`` on ``train[fit_idx]`` for ``epochs`` epochs; features ``float32 [N, D]``
    (CPU) of *every* image of ``train``, in dataset order (eval mode, no gradients), followed by
    those of the already normalised images ``extra`` ``[M, C, H, W]`` when given (``[N + M, D]``)."""
    info = train.info
    net = create_model(model, info.channels, info.num_classes, info.image_size, members=1,
                       generator=make_generator(init_seed), device=device)
    if epochs > 0:
        settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, precision=precision)
        steps = -(-fit_idx.numel() // min(batch_size, fit_idx.numel()))
        with tqdm(total=epochs * steps, desc=f"mi: training {model}", unit="batch", disable=None,
                  leave=False) as bar:
            train_ensemble(net, info.normalize(train.images[fit_idx].to(device)), train.labels[fit_idx].to(device),
                           settings, generator=make_generator(shuffle_seed), on_step=lambda *_: bar.update(1),
                           on_epoch=lambda ep, loss, acc: bar.set_postfix(epoch=ep + 1, loss=f"{loss:.3f}",
                                                                          refresh=False))
    net.eval()
    feats: list[torch.Tensor] = []
    step = 1000
    chunks = [lambda b0: info.normalize(train.images[b0:b0 + step].to(device))]
    sizes = [len(train)]
    if extra is not None:
        chunks.append(lambda b0: extra[b0:b0 + step].to(device))
        sizes.append(extra.shape[0])
    with torch.no_grad(), tqdm(total=sum(sizes), desc=f"mi: embedding ({model})", unit="img", disable=None,
                               leave=False) as bar:
        for chunk, size in zip(chunks, sizes):
            for b0 in range(0, size, step):
                x = chunk(b0)
                with autocast(device, precision):
                    f = net.embed(x)
                feats.append(f.float().reshape(f.shape[0], -1).cpu())
                bar.update(x.shape[0])
    emb = torch.cat(feats)
    if not bool(torch.isfinite(emb).all()):
        raise NumericalError(f"mi: the {model} embeddings contain nan or inf (training diverged? try a "
                             f"smaller lr than {lr:g} or precision fp32)")
    return emb


def standardize_(emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Standardise ``emb`` in place with the per-feature mean and std of ``emb[rows]`` (constant
    features are only centred); returns ``emb``."""
    ref = emb[rows]
    mean = ref.mean(dim=0)
    std = ref.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    del ref
    return emb.sub_(mean).div_(std)


def pca_reduce(z: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """``z [N, D]`` projected on the ``dim`` leading principal directions of ``z[rows]`` (exact: the
    eigenvectors of their covariance, by ``torch.linalg.eigh`` in float64; ``z`` itself when
    ``dim <= 0`` or ``dim >= D``). Deterministic: no randomised SVD."""
    if dim <= 0 or dim >= z.shape[1]:
        return z
    ref = z[rows]
    mean = ref.mean(dim=0)
    ref = ref - mean
    cov = (ref.T @ ref).to(torch.float64) / max(1, ref.shape[0] - 1)
    del ref
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vecs[:, -dim:].flip(1).to(z.dtype)
    return (z - mean) @ basis


# ---------------------------------------------------------------- probe estimator

def fit_probe(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, iters: int,
              bar: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``(W [D, K], b [K])`` on ``(z [n, D], y [n])`` by L-BFGS
    (strong-Wolfe line search, from zeros, at most ``iters`` iterations), minimising
    ``mean CE + l2 / 2 * ||W||^2``. Deterministic. ``bar`` advances once per loss evaluation."""
    d = z.shape[1]
    w = torch.zeros(d, num_classes, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, max_eval=iters + iters // 4, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        if bar is not None:
            bar.update(1)
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, iters: int = 100) -> float:
    """The temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` against ``y``.

    The NLL is convex in ``beta = 1 / T``, hence unimodal in ``log beta``: golden-section search on
    ``log beta`` in ``[-7, 7]`` (``T`` between about 1e-3 and 1e3), in float64.
    """
    logits = logits.to(torch.float64)

    def nll(log_beta: float) -> float:
        return float(F.cross_entropy(logits * math.exp(log_beta), y))

    lo, hi = -7.0, 7.0
    r = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = nll(b)
    return 1.0 / math.exp((lo + hi) / 2.0)


def label_log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_y - log(1 - p_y)`` of ``p = softmax(logits)`` at ``y = labels``, float64 ``[N]``:
    ``-logsumexp_{j != y}(l_j - l_y)``. Never saturates (unlike ``log p_y``, which is ``-0.0`` once
    the margin exceeds ~745), so it ranks very confident rows; ``log p_y = -softplus(-odds)``."""
    logits = logits.to(torch.float64)
    own = logits.gather(1, labels.view(-1, 1))
    others = (logits - own).scatter(1, labels.view(-1, 1), float("-inf"))
    return -torch.logsumexp(others, dim=1)


def log_prob_of_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[i, labels_i]`` in float64, computed as ``-softplus(-log_odds)`` (see
    :func:`label_log_odds`) so that confident rows keep distinct values (``-exp(-margin)``) instead of
    all rounding to 0 (as long as float64 can hold ``exp(-margin)``)."""
    return -F.softplus(-label_log_odds(logits, labels), threshold=1000.0)


def stratified_folds(labels: torch.Tensor, num_classes: int, folds: int, generator: torch.Generator) -> torch.Tensor:
    """``int64 [N]``: the fold (``0..folds-1``) of every sample, dealt round-robin over a seeded
    random order within each class (so every fold gets about ``1 / folds`` of every class)."""
    fold = torch.empty(labels.shape[0], dtype=torch.long)
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        fold[idx[torch.randperm(idx.numel(), generator=generator)]] = torch.arange(idx.numel()) % folds
    return fold


def probe_log_likelihood(z: torch.Tensor, labels: torch.Tensor, fit_idx: torch.Tensor, val_idx: torch.Tensor,
                         fold: torch.Tensor, num_classes: int, l2: float, iters: int
                         ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(log p(y_i | x_i), log-odds of y_i, T)`` (float64 ``[N]``, ``[N]``, float) from cross-fitted,
    temperature-scaled probes.

    With ``F = fold.max() + 1`` folds, probe ``f`` is fitted on the fit-part samples *outside* fold
    ``f`` and gives the logits of every sample *in* fold ``f`` (``F = 1``: one probe on the whole fit
    part scores everything), so no score comes from a probe that saw the sample (unless ``F = 1``).
    ``T`` is fitted on the validation samples' logits, which no probe saw. (When every validation
    sample is classified correctly the NLL keeps falling as ``T`` shrinks and ``T`` stops at the
    search bound, about 1e-3: the log-probabilities of confident samples then round to 0, the
    log-odds keep ranking them.)
    """
    folds = int(fold.max()) + 1
    logits = torch.empty(z.shape[0], num_classes, dtype=z.dtype)
    fit_mask = torch.zeros(z.shape[0], dtype=torch.bool)
    fit_mask[fit_idx] = True
    with tqdm(total=folds * (iters + iters // 4), desc="mi: fitting probes", unit="eval", disable=None,
              leave=False) as bar:
        for f in range(folds):
            rows = fit_idx if folds == 1 else (fit_mask & (fold != f)).nonzero().flatten()
            w, b = fit_probe(z[rows], labels[rows], num_classes, l2, iters, bar)
            target = torch.arange(z.shape[0]) if folds == 1 else (fold == f).nonzero().flatten()
            with torch.no_grad():
                logits[target] = z[target] @ w + b
    temperature = fit_temperature(logits[val_idx], labels[val_idx])
    odds = label_log_odds(logits / temperature, labels)
    return -F.softplus(-odds, threshold=1000.0), odds, temperature


# ---------------------------------------------------------------- k-NN estimator

def knn_log_likelihood(u: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, alpha: float,
                       reference: torch.Tensor | None = None, block: int = 512) -> torch.Tensor:
    """``log p(y_i | x_i) = log((n_same + alpha) / (k + alpha * K))``, float64 ``[N]``.

    ``n_same``: how many of the ``k`` nearest reference rows of ``i`` in ``u [N, D]`` (largest dot
    product; pass L2-normalised rows for cosine similarity), excluding ``i`` itself, share its
    label. ``reference``: the candidate neighbours (indices into ``u``; default all rows).
    ``block`` rows are compared to every reference row at a time (memory ``O(block * R)``).
    """
    n = u.shape[0]
    ref = torch.arange(n) if reference is None else reference
    r = ref.numel()
    pos = torch.full((n,), -1, dtype=torch.long)  # position of a row in the reference, -1 if absent
    pos[ref] = torch.arange(r)
    if not 1 <= k <= r - 1:
        raise ConfigError(f"mi k must be an integer in [1, {r - 1}] (the other reference samples), got {k!r}")
    u_ref, y_ref = u[ref], labels[ref]
    same = torch.empty(n, dtype=torch.float64)
    with torch.no_grad(), tqdm(total=n, desc="mi: k-NN", unit="img", disable=None, leave=False) as bar:
        for b0 in range(0, n, block):
            rows = torch.arange(b0, min(n, b0 + block))
            sim = u[rows] @ u_ref.T  # [B, R]
            own = pos[rows]
            inside = own >= 0
            sim[inside.nonzero().flatten(), own[inside]] = float("-inf")  # never one's own neighbour
            nbr = sim.topk(k, dim=1).indices
            same[rows] = (y_ref[nbr] == labels[rows].view(-1, 1)).sum(dim=1).to(torch.float64)
            bar.update(rows.numel())
    return torch.log((same + alpha) / (k + alpha * num_classes))


# ---------------------------------------------------------------- choice

class DiversityCriterion:
    """Greedy criterion: gain of row ``i`` = ``score_i - weight * max_{j chosen} cos(e_i, e_j)``.

    Built as ``functools.partial(DiversityCriterion, scores=..., weight=...)`` for
    :func:`tinyset.select.greedy.greedy_order`, which passes the float64 embeddings ``e [n, D]``.
    The first pick is the best score (nothing chosen yet, no penalty); the running maximum
    similarity costs one ``[n]`` vector per pick (O(n D) time per pick).
    """

    def __init__(self, e: torch.Tensor, scores: torch.Tensor, weight: float):
        self.u = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.scores = scores.to(torch.float64)
        self.weight = float(weight)
        self.max_sim: torch.Tensor | None = None

    def gains(self, t: int) -> torch.Tensor:
        if self.max_sim is None:
            return self.scores.clone()
        return self.scores - self.weight * self.max_sim

    def add(self, i: int) -> None:
        sim = self.u @ self.u[i]
        self.max_sim = sim if self.max_sim is None else torch.maximum(self.max_sim, sim)


def check_strata(strata: int, ipc: int) -> None:
    """``1 <= strata <= ipc`` (every score band gets at least one pick), else a ConfigError."""
    if not 1 <= strata <= ipc:
        raise ConfigError(f"mi strata={strata}: expected 1 to ipc ({ipc}), so that every score band gets a pick")


def band_quotas(ipc: int, strata: int) -> list[int]:
    """Picks per score band, highest band first: ``ipc // strata``, one more for the first ``ipc % strata``."""
    return [ipc // strata + (1 if b < ipc % strata else 0) for b in range(strata)]


def choose(scores: torch.Tensor, key: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int,
           emb: torch.Tensor, diversity: float, tie_order: torch.Tensor, strata: int = 1) -> torch.Tensor:
    """Per class, ``ipc`` samples; class by class, highest band first and best first inside a band.

    ``diversity == 0``: the largest ``key`` (any within-class increasing function of the scores that
    does not saturate, e.g. the probe's log-odds; else the scores themselves). ``diversity > 0``:
    greedy with :class:`DiversityCriterion` on ``scores``. ``strata > 1``: the class's samples ranked
    by ``key`` are cut into ``strata`` bands of equal size (:func:`torch.tensor_split`), each band
    choosing its quota (:func:`band_quotas`) by that rule. ``tie_order`` (a permutation of the ``N``
    samples) decides between equal values: the earlier in it, the better.
    """
    check_strata(strata, ipc)
    picks = []
    with tqdm(total=ipc * num_classes, desc="mi: choosing", unit="pick", disable=None, leave=False) as bar:
        for c in range(num_classes):
            rows = tie_order[labels[tie_order] == c]  # class c, in the seeded tie order
            bands = [rows] if strata == 1 else torch.tensor_split(
                rows[torch.sort(key[rows], descending=True, stable=True).indices], strata)
            for band, quota in zip(bands, band_quotas(ipc, strata)):
                if diversity == 0:
                    order = torch.sort(key[band], descending=True, stable=True).indices[:quota]
                    bar.update(quota)
                else:
                    crit = functools.partial(DiversityCriterion, scores=scores[band], weight=diversity)
                    order = greedy.greedy_order(emb[band], quota, crit, name="mi diversity",
                                                on_pick=lambda _t: bar.update(1))
                picks.append(band[order])
    return torch.cat(picks)


# ---------------------------------------------------------------- the selector

def _check_options(estimator: str, model: str, epochs: int, k: int, alpha: float, diversity: float, strata: int,
                   val_fraction: float, max_train: int | None, knn_reference: int | None, dim: int,
                   batch_size: int, lr: float, folds: int, probe_l2: float, probe_iters: int) -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"mi estimator must be one of {', '.join(repr(e) for e in ESTIMATORS)}, got {estimator!r}")
    check_number("mi", "epochs", epochs, low=0, integer=True)
    check_number("mi", "k", k, low=1, integer=True)
    check_number("mi", "alpha", alpha, low=0, low_open=True)
    check_number("mi", "diversity", diversity, low=0)
    check_number("mi", "strata", strata, low=1, integer=True)
    check_number("mi", "val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True)
    if max_train is not None:
        check_number("mi", "max_train", max_train, low=1, integer=True)
    if knn_reference is not None:
        check_number("mi", "knn_reference", knn_reference, low=2, integer=True)
    check_number("mi", "dim", dim, low=0, integer=True)
    check_number("mi", "batch_size", batch_size, low=1, integer=True)
    check_number("mi", "lr", lr, low=0, low_open=True)
    check_number("mi", "folds", folds, low=1, integer=True)
    check_number("mi", "probe_l2", probe_l2, low=0)
    check_number("mi", "probe_iters", probe_iters, low=1, integer=True)
    MODELS.get(model)  # ConfigError naming the known models


@dataclass
class MIOptions(SelectorOptions):
    """The options of ``mi`` (``tinyset select --method mi --set KEY=VALUE``; see the module docstring)."""

    estimator: str = hp("probe", "p(y|x) estimator: probe (cross-fitted, temperature-calibrated logistic "
                                 "probe) or knn (k-nearest-neighbour vote)", choices=ESTIMATORS)
    diversity: float = hp(0.0, "penalty x max cosine similarity to the already chosen samples of the class "
                               "(0: plain top-k, the report's ranking; 0.1 validated best on MNIST ipc 10, see "
                               "docs/measurements.md)", ge=0)
    strata: int = hp(1, "per class, score bands of equal size that each get an equal share of the picks, so "
                        "the set keeps samples down to the class boundaries (1: off; at most ipc; coverage-"
                        "centric selection, Zheng et al. ICLR 2023)", ge=1)
    model: str = hp("convnet-w32", "network trained briefly on the fit part to embed the images")
    epochs: int = hp(1, "training epochs of that network (0: a random network)", ge=0)
    max_train: int = hp(10000, "class-stratified subsample of the fit part the network trains on (none: all)",
                        ge=1, optional=True)
    val_fraction: float = hp(0.1, "fraction of every class held out to calibrate the probe", gt=0, lt=1)
    k: int = hp(10, "knn: neighbours that vote", ge=1)
    alpha: float = hp(1.0, "knn: additive smoothing of the vote", gt=0)
    knn_reference: int = hp(20000, "knn: class-stratified reference samples (none: all)", ge=2, optional=True)
    dim: int = hp(64, "principal components of the standardised embeddings kept (0: all)", ge=0)
    batch_size: int = hp(256, "batch size of the network's training", ge=1)
    lr: float = hp(0.01, "SGD learning rate of the network's training", gt=0)
    precision: str = hp("auto", "autocast precision of the network (auto: bf16 on a CPU with native bf16)",
                        choices=("auto", "fp32", "bf16"))
    folds: int = hp(2, "probe: cross-fitting folds (1: one in-sample probe)", ge=1)
    probe_l2: float = hp(1e-3, "probe: L2 penalty on the weights", ge=0)
    probe_iters: int = hp(100, "probe: L-BFGS iterations", ge=1)


@dataclass
class PMIScores:
    """What :func:`pmi_scores` computes: per training image (dataset order) the pointwise MI with its
    label ``scores`` (nats), the ranking ``key`` (the label's log-odds for the probe, ``log p(y|x)``
    for k-NN; orders every class as ``scores`` does), the reduced embeddings ``z``; for the ``extra``
    images, their ``extra_scores`` and ``extra_key`` (empty without extras); and a ``note``."""

    scores: torch.Tensor
    key: torch.Tensor
    z: torch.Tensor
    extra_scores: torch.Tensor
    extra_key: torch.Tensor
    note: str


def pmi_scores(train: ImageDataset, generator: torch.Generator, device: torch.device, *, estimator: str = "probe",
               model: str = "convnet-w32", epochs: int = 1, max_train: int | None = 10000, val_fraction: float = 0.1,
               k: int = 10, alpha: float = 1.0, knn_reference: int | None = 20000, dim: int = 64,
               batch_size: int = 256, lr: float = 0.01, precision: str = "auto", folds: int = 2,
               probe_l2: float = 1e-3, probe_iters: int = 100, extra: torch.Tensor | None = None,
               extra_labels: torch.Tensor | None = None) -> PMIScores:
    """Steps 1-4 of the module docstring: the pointwise MI of every image of ``train`` with its label.

    ``extra`` (normalised images ``[M, C, H, W]``, e.g. a generator's samples) with ``extra_labels``
    are scored by the same network and estimator without ever being fitted on: they join no
    hold-out, network training, standardisation, PCA, probe fit, temperature fit or k-NN reference;
    with the probe they are dealt round-robin to the cross-fitting folds. Six seeds are drawn from
    ``generator`` first; the scores of ``train`` do not depend on ``extra``."""
    _check_options(estimator, model, epochs, k, alpha, 0.0, 1, val_fraction, max_train, knn_reference, dim,
                   batch_size, lr, folds, probe_l2, probe_iters)
    if train.split == "test":
        raise ConfigError("mi scores a training split; it was given the test split (the test set is never used "
                          "for selection)")
    if (extra is None) != (extra_labels is None) or (extra is not None and extra.shape[0] != extra_labels.shape[0]):
        raise ConfigError("mi: extra images need one label each (extra and extra_labels together)")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    info, labels = train.info, train.labels.cpu()
    num_classes, n = info.num_classes, len(train)
    split_seed, subset_seed, init_seed, shuffle_seed, fold_seed, ref_seed = (derive_seed(generator) for _ in range(6))

    fit_idx, val_idx = holdout_indices(labels, num_classes, float(val_fraction), make_generator(split_seed))
    net_idx = fit_idx
    if max_train is not None and max_train < fit_idx.numel():
        part = ImageDataset(info, train.split, train.images[fit_idx], labels[fit_idx], train.source)
        net_idx = fit_idx[stratified_subset(part, int(max_train), 1, make_generator(subset_seed))]
    z = train_and_embed(train, net_idx, model=model, epochs=int(epochs), lr=float(lr), batch_size=int(batch_size),
                        precision=precision, device=device, init_seed=init_seed, shuffle_seed=shuffle_seed,
                        extra=extra)
    z = pca_reduce(standardize_(z, fit_idx), fit_idx, int(dim))
    all_labels = labels if extra_labels is None else torch.cat([labels, extra_labels.cpu().long()])

    if estimator == "probe":
        fold = stratified_folds(labels, num_classes, int(folds), make_generator(fold_seed))
        if extra is not None:
            fold = torch.cat([fold, torch.arange(extra.shape[0]) % int(folds)])
        log_cond, key, temperature = probe_log_likelihood(z, all_labels, fit_idx, val_idx, fold, num_classes,
                                                          float(probe_l2), int(probe_iters))
        note = f"calibrated logistic probe, T={temperature:.4g}"
    else:
        u = F.normalize(z, dim=1)
        reference = None if extra is None else torch.arange(n)  # real training images only
        if knn_reference is not None and knn_reference < n:
            reference = stratified_subset(train, int(knn_reference), 1, make_generator(ref_seed))
        log_cond = knn_log_likelihood(u, all_labels, num_classes, int(k), float(alpha), reference)
        key = log_cond
        del u
        note = f"k-NN, k={k}, alpha={alpha:g}"
    prior = torch.bincount(labels, minlength=num_classes).to(torch.float64) / n
    scores = log_cond - torch.log(prior)[all_labels]
    if bool(torch.isnan(scores).any()):
        raise NumericalError("mi: the pointwise MI scores contain nan")
    return PMIScores(scores[:n], key[:n], z[:n], scores[n:], key[n:], note)


@SELECTORS.register("mi", help="per class, highest pointwise mutual information log p(y|x) - log p(y) on "
                               "embeddings of a briefly trained ConvNet (calibrated probe or k-NN)")
@with_options(MIOptions)
def mi_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device,
              estimator: str = "probe", diversity: float = 0.0, strata: int = 1, model: str = "convnet-w32",
              epochs: int = 1, max_train: int | None = 10000, val_fraction: float = 0.1, k: int = 10,
              alpha: float = 1.0, knn_reference: int | None = 20000, dim: int = 64, batch_size: int = 256,
              lr: float = 0.01, precision: str = "auto", folds: int = 2, probe_l2: float = 1e-3,
              probe_iters: int = 100) -> Selection:
    """The ``ipc`` samples per class with the highest pointwise MI with their label (see the module
    docstring for the formulas). ``train`` must be a training split; nothing else is read."""
    _check_options(estimator, model, epochs, k, alpha, diversity, strata, val_fraction, max_train, knn_reference, dim,
                   batch_size, lr, folds, probe_l2, probe_iters)
    check_strata(int(strata), int(ipc))
    res = pmi_scores(train, generator, device, estimator=estimator, model=model, epochs=epochs, max_train=max_train,
                     val_fraction=val_fraction, k=k, alpha=alpha, knn_reference=knn_reference, dim=dim,
                     batch_size=batch_size, lr=lr, precision=precision, folds=folds, probe_l2=probe_l2,
                     probe_iters=probe_iters)
    tie_order = torch.randperm(len(train), generator=make_generator(derive_seed(generator)))
    idx = choose(res.scores, res.key, train.labels.cpu(), train.info.num_classes, ipc, res.z, float(diversity),
                 tie_order, int(strata))
    return Selection(idx, res.scores, order_note=f"mi: pointwise MI log p(y|x) - log p(y) in nats ({res.note}); per "
                                                  f"class the highest" + (f", greedy with diversity {diversity:g} x "
                                                                          f"max cosine similarity" if diversity else "")
                                                  + (f", in each of {strata} score bands" if strata > 1 else ""))


__all__ = ["ESTIMATORS", "MIOptions", "band_quotas", "check_strata", "holdout_indices", "train_and_embed",
           "standardize_", "fit_probe", "fit_temperature",
           "label_log_odds", "log_prob_of_label", "stratified_folds", "probe_log_likelihood", "pca_reduce",
           "knn_log_likelihood", "DiversityCriterion", "choose", "mi_select", "PMIScores", "pmi_scores"]
