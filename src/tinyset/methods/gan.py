"""GAN-assisted synthesis: a small class-conditional GAN whose samples are the synthetic set.

A DCGAN-style pair (Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016) made class-conditional:

* **Generator** ``G(z, y)``: the latent ``z ~ N(0, I)`` (``z_dim``) concatenated with a learned
  embedding of the class ``y`` (``embed_dim``; conditioning by concatenation, Mirza & Osindero 2014)
  -> linear -> ``[4w, ceil(H/4), ceil(W/4)]`` -> two stride-2 4x4 transposed convolutions
  (``4w -> 2w -> w``) -> 3x3 convolution to the image channels -> ``tanh``; every hidden layer has
  BatchNorm and ReLU, as in DCGAN. The ``tanh`` output is mapped to pixels in [0, 1], centre-cropped
  to ``H x W`` and normalised with the dataset's mean and std, so samples live where real images do.
* **Discriminator** ``D(x, y)`` with a *projection* (Miyato & Koyama, "cGANs with Projection
  Discriminator", ICLR 2018): 3x3 convolution (``w``) then two stride-2 4x4 convolutions
  (``2w``, ``4w``), LeakyReLU 0.2, no normalisation; the features ``h(x)`` are summed over space and
  ``D(x, y) = psi(h(x)) + <e_y, h(x)>`` with a learned class embedding ``e_y``. Before the last
  convolution, a per-class minibatch standard deviation (:func:`class_spread`, after Karras et al.
  2018) is appended as one feature map, so a generator that ignores its latent (every sample of a
  class alike, which a projection discriminator alone let happen on digits) is visible. An auxiliary
  classifier head ``c(h(x))`` (AC-GAN, Odena, Olah & Shlens, ICML 2017) adds a class loss: without
  it, the generator ignored the class on MNIST for the first 1000 steps (samples were one class in 10).

Weights are drawn as DCGAN does (``N(0, 0.02)``; BatchNorm scales ``N(1, 0.02)``), the generator's
class embedding ``N(0, 1)``, from the run's generator (never the global RNG).

**One step** (one outer iteration of the shared loop) is one discriminator update and one
generator update on a class-balanced real batch (``batch_real`` images of every class from
``self.pool``): draw ``z``, make ``G(z, y)`` for the real batch's labels ``y``; update ``D`` on the
real and the (detached) fake images; then update ``G`` through the updated ``D``. Losses
(``loss``): ``ns``, the non-saturating loss of DCGAN/Goodfellow et al. 2014,
``L_D = softplus(-D(x)) + softplus(D(G(z)))``, ``L_G = softplus(-D(G(z)))``; or ``hinge``
(Lim & Ye 2017; Miyato et al. 2018), ``L_D = relu(1 - D(x)) + relu(1 + D(G(z)))``,
``L_G = -D(G(z))``. With ``aux_weight = a > 0``, ``D`` also minimises ``a * CE(c(h(x)), y)`` on the
real images and ``G`` minimises ``a * CE(c(h(G(z, y))), y)`` (the class loss of the discriminator
on fakes is left out, a common AC-GAN variant: it must not learn classes from bad samples). Both
networks use Adam (DCGAN: lr 2e-4, beta1 0.5). ``step`` returns ``L_D`` (with its class term);
``metrics.jsonl`` records ``loss_d``, ``loss_g``, the mean ``D`` outputs on real and fake images and
the class losses ``aux_real`` and ``aux_fake``.

**The synthetic set** (:meth:`GAN.to_synset`): ``ipc`` samples of every class, generated in eval
mode (BatchNorm running statistics) from latents drawn with the run's *sample seed* (derived from
``--seed``, stored in the generator file). ``filter`` optionally generates ``candidates`` times as
many samples per class and keeps the ``ipc`` best of each class:

* ``discriminator``: the highest ``D(x, y)``, the samples the critic finds most real for their class;
* ``classifier``: the highest ``log p(y | x)`` of a classifier (``filter_model``) trained briefly on
  ``filter_per_class`` real training images per class (``filter_epochs`` epochs of the shared SGD
  loop, its own seed), i.e. the most confidently correct samples. With balanced classes this is the
  ranking by pointwise mutual information with the label, ``log p(y | x) - log p(y)``;
* ``herding``: herding (Welling 2009; the ``herding`` selector's greedy rule) in the features of that
  classifier, towards the mean feature of its real training images of the class: the ``ipc``
  candidates picked one at a time so that their running mean stays closest to the real class mean.
  The two filters above keep the samples a critic likes most, and those look alike; herding keeps
  a set that is spread like the real class, and corrects a generator whose class mean is off.

**Refinement** (``refine=project``; the report's "MPS1 with GAN", issue #11): instead of samples, the
set is the generator's *projection* of the run's ``init`` images (e.g. ``init=file:SEL.safetensors``
from ``tinyset select --recipe mps1``), GAN inversion as in Zhu et al., "Generative Visual
Manipulation on the Natural Image Manifold" (ECCV 2016), by optimisation only: for every image
``x`` of class ``y``,

    z* = argmin_z  mean((G(z, y) - x)^2) + refine_prior * mean(z^2),

by Adam (``refine_lr``, ``refine_steps`` steps) from ``refine_restarts`` seeded starts ``z ~ N(0, I)``;
the start with the smallest pixel error wins and the image is ``G(z*, y)`` (eval mode). Each latent's
Adam update is element-wise, so an image's projection does not depend on the other images (up to
floating-point rounding); they are projected in chunks of a fixed size. The
set's metadata records the mean pixel error of the projections and where the images came from.

**Run folder** (besides the loop's files): with ``refine=project`` also ``samples.safetensors``, the
unrefined set of the same generator (what ``refine=none`` would give); ``generator.safetensors``, the generator's weights with
a JSON header (dataset, architecture, sample seed, iteration, the filter classifier's seed; safetensors, never
pickle) and the discriminator's weights, and
``samples/iter_NNNNNN.png``, a grid of a fixed set of latents (one row per class), both written
every ``sample_every`` iterations and at the end. :func:`load_generator` reads the file back; any
method can start from it with ``init=gan:PATH`` (``ipc`` samples per class from the file's sample
seed: the GAN run's unfiltered set). :func:`sample_generator` (``tinyset sample``) draws a set of any
``ipc`` from the file, filtered or not, without training the GAN again; with the run's ``ipc`` and
filter settings it is the run's own set. It has one filter more, ``mi``: the samples' pointwise
mutual information with their label as the ``mi`` selector scores real images
(:func:`tinyset.select.mi.pmi_scores`, fitted on the training split alone).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.data.base import DatasetInfo, RealPool
from tinyset.errors import ArtifactError, ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import (DistillConfig, Distiller, InitSource, Row, Rule, Table, check_init_images, hp,
                                  register_init, renormalize)
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast

#: ``format`` of a generator file and the version this module writes and reads
GENERATOR_FORMAT = "tinyset.generator"
GENERATOR_VERSION = 1
GENERATOR_FILE = "generator.safetensors"
#: with refine=project: the run's unrefined set (ipc samples per class), written at the end beside synset.safetensors
SAMPLES_FILE = "samples.safetensors"
SAMPLES_DIR = "samples"
#: images generated per forward pass when sampling (a fixed chunk: results do not depend on the count)
GENERATE_CHUNK = 256
LOSSES = ("ns", "hinge")
FILTERS = ("none", "discriminator", "classifier", "herding")
#: filters of :func:`sample_generator` (``tinyset sample``): the run's, and ``mi``, which reads the dataset
SAMPLE_FILTERS = (*FILTERS, "mi")
#: filters that train the filter classifier (``filter_model``) on real training images
CLASSIFIER_FILTERS = ("classifier", "herding")
#: filters that learn from real training images (``tinyset sample`` reads the dataset for them)
REAL_DATA_FILTERS = (*CLASSIFIER_FILTERS, "mi")
REFINES = ("none", "project")

_DCGAN = ("Radford, Metz & Chintala, ICLR 2016 (DCGAN), section 4: Adam lr 0.0002 and beta1 0.5 for both networks, "
          "weights N(0, 0.02), non-saturating loss")


# ---------------------------------------------------------------------------------- networks
class Generator(nn.Module):
    """``G(z, y)``: latent + class embedding -> normalised images ``[N, C, H, W]`` (see the module docstring)."""

    def __init__(self, channels: int, image_size: tuple[int, int], num_classes: int, z_dim: int, width: int,
                 embed_dim: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        h, w = image_size
        self.image_size, self.z_dim, self.num_classes = (int(h), int(w)), int(z_dim), int(num_classes)
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim + embed_dim, 4 * width * self.h0 * self.w0, bias=False)
        self.bn0 = nn.BatchNorm2d(4 * width)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], -1, self.h0, self.w0)
        x = F.relu(self.bn0(x))
        x = F.relu(self.bn1(self.up1(x)))
        x = F.relu(self.bn2(self.up2(x)))
        pixels = (torch.tanh(self.out(x).float()) + 1) / 2
        h, w = self.image_size
        top, left = (pixels.shape[2] - h) // 2, (pixels.shape[3] - w) // 2
        pixels = pixels[:, :, top:top + h, left:left + w]
        return (pixels - self.mean) / self.std


class Discriminator(nn.Module):
    """``D(x, y)``: convolutional features, summed over space, with a class projection (Miyato & Koyama 2018)."""

    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.conv0 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2 * width + 1, 4 * width, 4, stride=2, padding=1)
        self.linear = nn.Linear(4 * width, 1)
        self.embed = nn.Embedding(num_classes, 4 * width)
        self.aux = nn.Linear(4 * width, num_classes)
        self.pool_mean = False

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The realness score ``D(x, y)`` ``[N]``."""
        return self.scores(x, y)[0]

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``D(x, y)`` ``[N]`` and the auxiliary classifier's logits ``[N, K]`` (AC-GAN head)."""
        h = F.leaky_relu(self.conv0(x), 0.2)
        h = F.leaky_relu(self.conv1(h), 0.2)
        h = torch.cat([h, class_spread(h, y, self.num_classes)], dim=1)
        h = F.leaky_relu(self.conv2(h), 0.2)
        h = h.mean(dim=(2, 3)) if self.pool_mean else h.sum(dim=(2, 3))
        return (self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)).float(), self.aux(h).float()


def class_spread(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class minibatch standard deviation (after Karras et al. 2018, "Progressive Growing of GANs",
    whose groups are here the batch's images of one class): for every image, the standard deviation of
    the features ``h`` over the batch's images of its class, averaged over channels and positions, as
    one extra constant feature map ``[N, 1, H, W]``. A generator that ignores its latent makes it ~0,
    which the discriminator can see. Computed with one-hot matrix products (deterministic)."""
    n = h.shape[0]
    flat = h.float().reshape(n, -1)
    onehot = F.one_hot(y, num_classes).to(flat.dtype)  # [N, K]
    counts = onehot.sum(0).clamp_min(1).unsqueeze(1)  # [K, 1]
    mean = onehot.t() @ flat / counts  # [K, D]
    var = onehot.t() @ (flat - mean[y]) ** 2 / counts
    spread = (var + 1e-8).sqrt().mean(1)  # [K]
    return spread[y].view(n, 1, 1, 1).expand(n, 1, *h.shape[2:]).to(h.dtype)


def kaiming_init_(net: nn.Module, gen: torch.Generator, slope: float = 0.2) -> nn.Module:
    """He initialisation for LeakyReLU(``slope``) layers from ``gen``: conv/linear weights
    ``N(0, 2 / ((1 + slope^2) fan_in))``, biases 0, class embeddings ``N(0, 1 / fan_out)``."""
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                std = math.sqrt(2.0 / ((1 + slope ** 2) * fan_in))
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.weight.shape[1]))
    return net


def dcgan_init_(net: nn.Module, gen: torch.Generator, class_embedding_std: float = 0.02) -> nn.Module:
    """DCGAN's initialisation from ``gen``: conv/linear weights ``N(0, 0.02)``, biases 0, BatchNorm
    scales ``N(1, 0.02)`` and shifts 0, class embeddings ``N(0, class_embedding_std)``."""
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.02)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1 + torch.randn(mod.weight.shape, generator=gen) * 0.02)
                mod.bias.zero_()
                mod.reset_running_stats()
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * class_embedding_std)
    return net


def gan_losses(kind: str, d_real: torch.Tensor | None, d_fake: torch.Tensor, generator_side: bool) -> torch.Tensor:
    """The discriminator loss (``generator_side=False``, needs ``d_real``) or the generator loss of ``kind``."""
    if generator_side:
        return F.softplus(-d_fake).mean() if kind == "ns" else -d_fake.mean()
    assert d_real is not None
    if kind == "ns":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


@torch.no_grad()
def generate(g: Generator, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples of ``labels`` (normalised, float32, on ``g``'s device) in eval mode, fp32, from latents
    ``torch.randn(len(labels), z_dim)`` drawn on the CPU with a generator seeded ``seed``; the
    generator's train/eval mode is left as it was."""
    device = next(g.parameters()).device
    z = torch.randn(len(labels), g.z_dim, generator=make_generator(seed)).to(device)
    labels = labels.to(device)
    was_training = g.training
    g.eval()
    try:
        return torch.cat([g(z[i:i + GENERATE_CHUNK], labels[i:i + GENERATE_CHUNK])
                          for i in range(0, len(labels), GENERATE_CHUNK)])
    finally:
        g.train(was_training)


def class_blocks(num_classes: int, per_class: int) -> torch.Tensor:
    """``per_class`` labels of every class, class by class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def keep_best(scores: torch.Tensor, num_classes: int, per_class: int, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores in every class block of ``per_class`` (best first; ties
    by position), class by class."""
    blocks = scores.detach().float().cpu().view(num_classes, per_class)
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :keep]
    return (order + torch.arange(num_classes).unsqueeze(1) * per_class).reshape(-1)


def draw_set(g: Generator, num_classes: int, ipc: int, seed: int,
             score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             candidates: int = 1) -> torch.Tensor:
    """``ipc`` samples of every class, class by class (normalised, on CPU), from latents seeded ``seed``.
    With ``score`` (higher is better): ``candidates * ipc`` samples per class, of which the ``ipc``
    best of each class are kept (:func:`keep_best`)."""
    if score is None:
        return generate(g, class_blocks(num_classes, ipc), seed).cpu()
    per_class = ipc * candidates
    labels = class_blocks(num_classes, per_class)
    pool = generate(g, labels, seed)
    keep = keep_best(score(pool, labels), num_classes, per_class, ipc)
    return pool[keep.to(pool.device)].cpu()


@dataclass(frozen=True)
class FilterClassifier:
    """The trained filter network and the real images (with their labels) it was trained on."""

    net: nn.Module
    images: torch.Tensor
    labels: torch.Tensor

    @cached_property
    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean embedding of the training images of every class (float64 ``[K, D]``, computed once)
        and the image count per class (``[K]``; ``K`` = the largest label + 1)."""
        emb = _embed_chunks(self.net, self.images).double()
        labels = self.labels.to(emb.device)
        counts = torch.bincount(labels)
        sums = torch.zeros(len(counts), emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, labels, emb)
        return sums / counts.clamp(min=1).unsqueeze(1), counts


def train_filter_classifier(pool: RealPool, model: str, per_class: int, epochs: int, seed: int,
                            device: str | torch.device = "cpu", precision: str = "fp32") -> FilterClassifier:
    """The classifier of ``filter=classifier`` and ``filter=herding``: ``model`` trained for ``epochs``
    epochs of the shared SGD loop (lr 0.01, batch 256) on ``per_class`` random real images of every
    class (fewer if a class has fewer); images and weights drawn from ``seed``. The network is
    returned in eval mode, with its training images."""
    from tinyset.models import create_model
    from tinyset.training import TrainSettings, train_ensemble

    info, g = pool.info, make_generator(seed)
    images, labels = pool.sample_classes(min([per_class, *pool.counts]), g)
    net = create_model(model, info.channels, info.num_classes, info.image_size, generator=g, device=device)
    settings = TrainSettings(epochs=epochs, lr=0.01, batch_size=256, precision=precision)
    with torch.enable_grad():  # callers may sample under no_grad
        train_ensemble(net, images, labels, settings, g)
    return FilterClassifier(net.eval(), images, labels)


def _embed_chunks(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.embed(images[i:i + GENERATE_CHUNK]).float().flatten(1)
                      for i in range(0, len(images), GENERATE_CHUNK)])


def herding_scores(images: torch.Tensor, labels: torch.Tensor, classifier: FilterClassifier) -> torch.Tensor:
    """``filter=herding``: per class, the candidates in herding order (:func:`tinyset.select.herding.herding_order`)
    towards the mean embedding of the classifier's real training images of that class; the ``t``-th
    pick scores ``-t``. The kept ``ipc`` are the first ``ipc`` picks: the candidates whose mean
    embedding comes closest to the real class mean, one at a time, which keeps a class's spread."""
    from tinyset.select.greedy import pick_scores
    from tinyset.select.herding import herding_order

    emb = _embed_chunks(classifier.net, images).double()
    means, counts = classifier.class_means
    labels = labels.to(images.device)
    scores = torch.full((len(labels),), float("-inf"), dtype=torch.float64, device=images.device)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        if c >= len(counts) or int(counts[c]) == 0:
            raise ConfigError(f"filter herding: no real training image of class {c} to match")
        order = herding_order(emb[rows], len(rows), mu=means[c].to(emb.device))
        scores[rows[order]] = pick_scores(len(rows)).to(scores.device)
    return scores


@torch.no_grad()
def filter_scores(kind: str, images: torch.Tensor, labels: torch.Tensor, *, discriminator: nn.Module | None = None,
                  classifier: FilterClassifier | None = None) -> torch.Tensor:
    """How good each sample is for its class (higher is better), in chunks of ``GENERATE_CHUNK``:
    ``D(x, y)`` for ``discriminator`` (its class-spread feature sees the chunk), ``log p(y | x)`` of
    the classifier for ``classifier``, the herding order in the classifier's features for ``herding``
    (:func:`herding_scores`)."""
    labels = labels.to(images.device)
    chunks = range(0, len(labels), GENERATE_CHUNK)
    if kind == "discriminator":
        return torch.cat([discriminator(images[i:i + GENERATE_CHUNK], labels[i:i + GENERATE_CHUNK]) for i in chunks])
    if kind == "classifier":
        net = classifier.net
        logp = torch.cat([F.log_softmax(net(images[i:i + GENERATE_CHUNK]).float(), dim=1) for i in chunks])
        return logp.gather(1, labels.view(-1, 1)).squeeze(1)
    if kind == "herding":
        return herding_scores(images, labels, classifier)
    raise ConfigError(f"filter {kind!r} scores nothing; expected one of {', '.join(FILTERS[1:])}")


def project(g: Generator, images: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float, restarts: int,
            prior: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GAN inversion (see the module docstring): ``G(z*, y)`` for every image and its pixel error
    (mean squared, normalised units), both on CPU. Latents start from ``torch.randn(N, restarts, z_dim)``
    drawn on the CPU with a generator seeded ``seed`` (image-major, so the first images of a longer list get
    the same starts); the generator's mode and ``requires_grad`` flags are left as they were."""
    device = next(g.parameters()).device
    n = len(labels)
    starts = torch.randn(n, restarts, g.z_dim, generator=make_generator(seed))  # image-major: a prefix keeps its starts
    flags = [p.requires_grad for p in g.parameters()]
    was_training = g.training
    g.eval()
    g.requires_grad_(False)
    best_img = torch.empty(images.shape, dtype=torch.float32)
    best_err = torch.full((n,), float("inf"))
    try:
        for r in range(restarts):
            for i in range(0, n, GENERATE_CHUNK):
                x = images[i:i + GENERATE_CHUNK].to(device, torch.float32)
                y = labels[i:i + GENERATE_CHUNK].to(device)
                z = starts[i:i + GENERATE_CHUNK, r].to(device).requires_grad_(True)
                opt = torch.optim.Adam([z], lr=lr)
                with torch.enable_grad():
                    for _ in range(steps):
                        err = (g(z, y) - x).pow(2).flatten(1).mean(1)
                        loss = (err + prior * z.pow(2).mean(1)).sum()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                with torch.no_grad():
                    out = g(z, y)
                    err = (out - x).pow(2).flatten(1).mean(1).cpu()
                    better = err < best_err[i:i + GENERATE_CHUNK]  # views: the writes land in best_*
                    best_err[i:i + GENERATE_CHUNK][better] = err[better]
                    best_img[i:i + GENERATE_CHUNK][better] = out.cpu()[better]
    finally:
        for p, f in zip(g.parameters(), flags):
            p.requires_grad_(f)
        g.train(was_training)
    return best_img, best_err


# ---------------------------------------------------------------------------------- generator file
def save_generator(path: Path, g: Generator, info: DatasetInfo, architecture: dict[str, int], sample_seed: int,
                   iteration: int, meta: dict[str, Any] | None = None, discriminator: Discriminator | None = None,
                   filter_seed: int | None = None) -> Path:
    """Write the generator's weights (and BatchNorm statistics) with a JSON header, atomically; with
    ``discriminator`` its weights too (for ``filter=discriminator`` when sampling from the file) and
    with ``filter_seed`` the seed of the run's filter classifier."""
    from safetensors.torch import save_file

    from tinyset import __version__
    from tinyset.files import atomic_path

    header = {"format": GENERATOR_FORMAT, "format_version": GENERATOR_VERSION, "info": info.to_dict(),
              "architecture": dict(architecture), "sample_seed": int(sample_seed), "iteration": int(iteration),
              "meta": dict(meta or {}), "tinyset_version": __version__}
    tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in g.state_dict().items()}
    if discriminator is not None:
        header["discriminator"] = {"pool_mean": bool(getattr(discriminator, "pool_mean", False))}
        tensors.update({f"discriminator.{k}": v.detach().cpu().contiguous()
                        for k, v in discriminator.state_dict().items()})
    if filter_seed is not None:
        header["filter_seed"] = int(filter_seed)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tinyset": json.dumps(header)})
    return Path(path)


def read_generator_header(path: str | Path) -> tuple[dict[str, Any], DatasetInfo]:
    """The checked header of a generator file and its dataset description (nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file; expected a generator file ({GENERATOR_FILE} of a "
                            f"`tinyset distill --method gan` run)")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a regular file; expected a generator file ({GENERATOR_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("tinyset")
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        header = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: the 'tinyset' metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != GENERATOR_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ArtifactError(f"{path}: not a tinyset generator file (format {found!r}, expected "
                            f"{GENERATOR_FORMAT!r}; a synthetic set is read with file:PATH)")
    if header.get("format_version") != GENERATOR_VERSION:
        raise ArtifactError(f"{path}: generator format version {header.get('format_version')!r}; this tinyset "
                            f"reads version {GENERATOR_VERSION}")
    arch = header.get("architecture")
    if (not isinstance(arch, dict) or set(arch) != {"z_dim", "width", "embed_dim"}
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536 for v in arch.values())):
        raise ArtifactError(f"{path}: header 'architecture' must give z_dim, width and embed_dim as integers in "
                            f"[1, 65536], got {arch!r}")
    for key in ("sample_seed", "filter_seed"):
        seed = header.get(key)
        if (key in header or key == "sample_seed") and (not isinstance(seed, int) or isinstance(seed, bool)
                                                        or not 0 <= seed < 2**64):
            raise ArtifactError(f"{path}: header {key!r} must be an integer in [0, 2^64), got {seed!r}")
    disc = header.get("discriminator")
    if disc is not None and (not isinstance(disc, dict) or not isinstance(disc.get("pool_mean"), bool)):
        raise ArtifactError(f"{path}: header 'discriminator' must be {{\"pool_mean\": true|false}}, got {disc!r}")
    try:
        info = DatasetInfo.from_dict(header["info"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ArtifactError(f"{path}: invalid dataset info in header ({type(exc).__name__}: {exc})") from None
    return header, info


def build_generator(info: DatasetInfo, architecture: dict[str, int]) -> Generator:
    return Generator(info.channels, info.image_size, info.num_classes, architecture["z_dim"], architecture["width"],
                     architecture["embed_dim"], info.mean, info.std)


def _load_weights(path: str | Path, net: nn.Module, prefix: str, what: str) -> nn.Module:
    """``net`` with the tensors of ``path`` named ``prefix.*``, checked (shapes, finite), in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    return _fit_weights(net, state, path, what)


def _fit_weights(net: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    """``net`` with ``state`` loaded, checked (shapes, finite), in eval mode; errors name ``path``."""
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: the {what}'s weights do not fit the architecture in the generator file's "
                            f"header ({str(exc).splitlines()[0]})") from None
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise ArtifactError(f"{path}: the {what}'s weights contain NaN/inf")
    return net.eval()


def load_generator(path: str | Path) -> tuple[Generator, dict[str, Any], DatasetInfo]:
    """The generator of a file written by a GAN run (on CPU, eval mode), its header and dataset."""
    header, info = read_generator_header(path)
    g = _load_weights(path, build_generator(info, header["architecture"]), "generator", "generator")
    return g, header, info


def load_discriminator(path: str | Path) -> tuple[Discriminator, str]:
    """The discriminator of the generator's run (on CPU, eval mode) and where it came from: the
    generator file, or, for a file written before tinyset stored it there, the run's checkpoint in the
    same folder when that checkpoint is of the same GAN run and iteration. Otherwise an
    :class:`ArtifactError` says why there is none."""
    from tinyset.files import read_tagged_safetensors
    from tinyset.methods.loop import CHECKPOINT, CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    header, info = read_generator_header(path)
    d = Discriminator(info.channels, info.num_classes, header["architecture"]["width"])
    if "discriminator" in header:
        d.pool_mean = header["discriminator"]["pool_mean"]
        return _load_weights(path, d, "discriminator", "discriminator"), str(path)
    ckpt = Path(path).parent / CHECKPOINT
    why = f"there is no run checkpoint beside it ({ckpt})"
    if ckpt.is_file():
        tensors, ck = read_tagged_safetensors(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")
        config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        method = (ck.get("identity") or {}).get("method") if isinstance(ck.get("identity"), dict) else None
        if method != "gan" or config.get("width") != header["architecture"]["width"]:
            why = f"the checkpoint beside it ({ckpt}) is not of this GAN run (method {method!r})"
        elif ck.get("iteration") != header.get("iteration"):
            why = (f"the checkpoint beside it ({ckpt}) is of iteration {ck.get('iteration')}, the generator of "
                   f"iteration {header.get('iteration')}")
        else:
            prefix = "module.discriminator."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            d.pool_mean = bool(config.get("pool_mean", False))
            return _fit_weights(d, state, ckpt, "discriminator"), str(ckpt)
    raise ArtifactError(f"{path}: this generator file holds no discriminator (written before tinyset stored it) and "
                        f"{why}; sample with filter none, classifier or mi")


# ---------------------------------------------------------------------------------- sampling a file
@dataclass(frozen=True)
class FilterSettings:
    """How :func:`sample_generator` keeps the best of ``candidates`` samples per image: ``kind`` one of
    :data:`SAMPLE_FILTERS`; ``model``, ``epochs`` and ``per_class`` are the GAN's ``filter_*``
    settings of the classifier filter; ``estimator`` is ``mi``'s (probe or knn, the other options at
    ``tinyset select --method mi``'s defaults); ``seed`` (None: the file's ``filter_seed``, else 0)
    seeds the classifier or the ``mi`` scorer."""

    kind: str = "none"
    candidates: int = 4
    model: str = "convnet-w32"
    epochs: int = 10
    per_class: int = 200
    seed: int | None = None
    estimator: str = "probe"


def sample_generator(path: str | Path, ipc: int, *, sample_seed: int | None = None,
                     filtering: FilterSettings = FilterSettings(), train: Any = None,
                     device: str | torch.device = "cpu", precision: str = "fp32") -> Any:
    """A synthetic set of ``ipc`` samples per class from a generator file. Nothing is trained but, for
    the ``classifier`` and ``mi`` filters, the scoring network on ``train`` (the training split of the
    file's dataset). ``sample_seed`` None uses the file's: with the run's ``ipc`` and filter settings
    that is the run's own set, image for image. Hard labels."""
    from tinyset.models import MODELS
    from tinyset.synset import SyntheticSet

    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1, got {ipc}")
    if filtering.kind not in SAMPLE_FILTERS:
        raise ConfigError(f"filter {filtering.kind!r} is unknown; expected one of {', '.join(SAMPLE_FILTERS)}")
    if filtering.candidates < 1:
        raise ConfigError(f"candidates must be >= 1, got {filtering.candidates}")
    if filtering.kind in CLASSIFIER_FILTERS and filtering.model not in MODELS:
        raise ConfigError(f"filter model {filtering.model!r} is not a registered architecture; known: "
                          f"{', '.join(MODELS.names())}")
    if filtering.kind in REAL_DATA_FILTERS and train is None:
        raise ConfigError(f"filter {filtering.kind} learns from real images: pass the training split of the file's "
                          f"dataset")
    start = time.perf_counter()
    g, header, info = load_generator(path)
    if train is not None and train.info.to_dict() != info.to_dict():
        raise ConfigError(f"{path}: the generator was trained on {info.name} ({info.num_classes} classes, "
                          f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}), the data given is "
                          f"{train.info.name} ({train.info.num_classes} classes, {train.info.channels}x"
                          f"{train.info.image_size[0]}x{train.info.image_size[1]})")
    device = torch.device(device)
    g = g.to(device)
    seed = header["sample_seed"] if sample_seed is None else int(sample_seed)
    record: dict[str, Any] = {"generator_file": str(path), "generator_iteration": header.get("iteration"),
                              "sample_seed": seed, "filter": filtering.kind, "architecture": header["architecture"],
                              "refine": "none"}
    score = None
    if filtering.kind == "discriminator":
        d, source = load_discriminator(path)
        d = d.to(device)
        score = lambda x, y: filter_scores("discriminator", x, y, discriminator=d)  # noqa: E731
        record["discriminator_from"] = source
    elif filtering.kind in CLASSIFIER_FILTERS:
        fseed = filtering.seed if filtering.seed is not None else header.get("filter_seed", 0)
        net = train_filter_classifier(RealPool(train, device), filtering.model, filtering.per_class,
                                      filtering.epochs, fseed, device, precision)
        score = lambda x, y: filter_scores(filtering.kind, x, y, classifier=net)  # noqa: E731
        record.update({"filter_model": filtering.model, "filter_epochs": filtering.epochs,
                       "filter_per_class": filtering.per_class, "filter_seed": fseed})
    elif filtering.kind == "mi":
        fseed = filtering.seed if filtering.seed is not None else header.get("filter_seed", 0)
        record.update({"filter_estimator": filtering.estimator, "filter_seed": fseed})
        score = lambda x, y: _mi_key(train, x, y, fseed, filtering.estimator, device, precision, record)  # noqa: E731
    if score is not None:
        record["candidates"] = filtering.candidates
    images = draw_set(g, info.num_classes, ipc, seed, score, filtering.candidates)
    meta = {"method": "gan", "sampled_from_generator": True, "seconds": time.perf_counter() - start, "gan": record}
    run_config = header.get("meta", {}).get("config") if isinstance(header.get("meta"), dict) else None
    if isinstance(run_config, dict):
        meta["generator_run_config"] = run_config
    return SyntheticSet(images, class_blocks(info.num_classes, ipc), info, meta=meta)


def _mi_key(train: Any, images: torch.Tensor, labels: torch.Tensor, seed: int, estimator: str,
            device: torch.device, precision: str, record: dict[str, Any]) -> torch.Tensor:
    """The ``mi`` selector's ranking key of generated ``images`` for ``labels`` (the label's log-odds
    under its calibrated probe, or its k-NN ``log p(y|x)`` among real training images), from a scorer
    fitted on ``train`` alone; the estimator's note goes into ``record``."""
    from tinyset.select.mi import pmi_scores

    res = pmi_scores(train, make_generator(seed), device, estimator=estimator, precision=precision, extra=images,
                     extra_labels=labels.cpu())
    record["filter_note"] = res.note
    return res.extra_key


# ---------------------------------------------------------------------------------- init=gan:PATH
def _check_gan_init(argument: str, info: DatasetInfo | None, ipc: int) -> None:
    _, file_info = read_generator_header(argument)
    if info is not None:
        check_init_images(argument, file_info, [ipc] * file_info.num_classes, info, ipc, what="generator")


def _init_gan(d: Distiller, argument: str, gen: torch.Generator) -> torch.Tensor:
    """``ipc`` samples per class from a generator file, with the file's sample seed (no draw from ``gen``)."""
    try:
        g, header, file_info = load_generator(argument)
        check_init_images(argument, file_info, [d.ipc] * file_info.num_classes, d.info, d.ipc, what="generator")
    except (ConfigError, ArtifactError) as exc:
        raise type(exc)(f"init=gan:{argument}: {exc}") from None
    images = renormalize(generate(g, class_blocks(d.info.num_classes, d.ipc), header["sample_seed"]), file_info, d.info)
    zca = getattr(d, "zca", None)
    return zca.whiten(images) if zca is not None else images  # a zca=true run works in the whitened space


register_init("gan", InitSource(_init_gan, "gan:PATH", "ipc samples per class from a generator file written by "
                                "`tinyset distill --method gan` (RUN/generator.safetensors), with its sample seed",
                                _check_gan_init))


# ---------------------------------------------------------------------------------- the method
@dataclass
class GANConfig(DistillConfig):
    iterations: int = hp(10000, "outer iterations (one discriminator + one generator update each)", ge=1)
    batch_real: int = hp(13, "real images per class per iteration (the GAN's minibatch is K * batch_real)",
                         ge=1, le=65536)
    loss: str = hp("ns", "adversarial loss: ns (non-saturating, DCGAN) or hinge", choices=LOSSES)
    z_dim: int = hp(100, "latent size", ge=1, le=4096)
    width: int = hp(32, "base channel count w of both networks (layers of w, 2w, 4w)", ge=1, le=1024)
    embed_dim: int = hp(32, "size of the generator's class embedding", ge=1, le=4096)
    d_init: str = hp("dcgan", "discriminator weights: dcgan (N(0, 0.02)) or kaiming (He for LeakyReLU 0.2)",
                     choices=("dcgan", "kaiming"))
    pool_mean: bool = hp(False, "average the discriminator's features over positions instead of summing them")
    aux_weight: float = hp(1.0, "weight of the AC-GAN class loss (0: conditioning by projection alone)", ge=0,
                           le=1000)
    lr_g: float = hp(2e-4, "Adam learning rate of the generator", gt=0)
    lr_d: float = hp(2e-4, "Adam learning rate of the discriminator", gt=0)
    beta1: float = hp(0.5, "Adam beta1 of both networks", ge=0, lt=1)
    beta2: float = hp(0.999, "Adam beta2 of both networks", ge=0, lt=1)
    filter: str = hp("none", "keep the best of `candidates` samples per image: none, discriminator (highest "
                             "D(x, y)), classifier (most confident correct class; on MNIST both lost accuracy, "
                             "less varied samples: docs/measurements.md) or herding (candidates whose mean "
                             "embedding in the filter classifier's features matches its real images' class mean; "
                             "it gained 1.7 points on MNIST and 1.1 on FashionMNIST at ipc 10)",
                      choices=FILTERS)
    candidates: int = hp(4, "samples generated per kept image when filtering", ge=1, le=1000)
    filter_model: str = hp("convnet-w32", "classifier of filter=classifier and filter=herding (see `tinyset models`)")
    filter_epochs: int = hp(10, "epochs of the filter classifier", ge=1, le=10000)
    filter_per_class: int = hp(200, "real training images per class the filter classifier is trained on",
                               ge=1, le=1_000_000)
    refine: str = hp("none", "none (the set is generator samples) or project (the set is the generator's "
                             "projection of the init images, e.g. init=file:SELECTION.safetensors)", choices=REFINES)
    refine_steps: int = hp(100, "Adam steps per latent when projecting", ge=1, le=100000)
    refine_restarts: int = hp(2, "random latent starts per image when projecting (the closest wins)", ge=1, le=100)
    refine_lr: float = hp(0.05, "Adam learning rate of the latents when projecting", gt=0)
    refine_prior: float = hp(0.01, "weight of mean(z^2) in the projection loss (keeps z near the prior)", ge=0)
    sample_every: int = hp(500, "write a sample grid and generator.safetensors every N iterations", ge=1)
    sample_cols: int = hp(10, "samples per class in the sample grids", ge=1, le=100)


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    family = dataset.lower().partition(":")[0]
    if family == "digits":
        return {"iterations": 1500, "width": 16, "sample_every": 250, "final_eval": "quick"}
    return {"iterations": 3000, "width": 32, "final_eval": "quick"}


@METHODS.register("gan", help="class-conditional DCGAN samples as the synthetic set (init=gan:FILE for the others)")
class GAN(Distiller):
    name = "gan"
    Config = GANConfig
    uses_dsa = False
    paper = Table((
        Row({"lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "loss": "ns"}, _DCGAN),
        Row({"batch_real": 13}, "DCGAN's minibatch of 128 images (ibid.), class-balanced: 13 per class for 10 "
                                "classes"),
        Row({"batch_real": 2}, "DCGAN's minibatch of 128 images (ibid.) over 100 classes, rounded up to 2 per "
                               "class", datasets=("cifar100",)),
    ))
    cpu_rule = Rule("2-core CPU budget: width 32 and 3000 iterations (digits: width 16, 1500), quick final "
                    "evaluation", _cpu_budget)

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        from tinyset.models import MODELS

        super().check_config(cfg)
        assert isinstance(cfg, GANConfig)
        if getattr(cfg, "zca", False):
            raise ConfigError("zca=true is not supported by gan: its generator makes images in the normalised pixel "
                              "space (train the GAN without zca, then start a zca=true run with init=gan:PATH)")
        if cfg.refine != "none" and cfg.filter != "none":
            raise ConfigError(f"refine={cfg.refine} and filter={cfg.filter} exclude each other: a projected set has one "
                              f"image per init image, there are no candidates to filter")
        if cfg.filter in CLASSIFIER_FILTERS and cfg.filter_model not in MODELS:
            raise ConfigError(f"filter_model={cfg.filter_model!r} is not a registered architecture; known: "
                              f"{', '.join(MODELS.names())}")

    @property
    def architecture(self) -> dict[str, int]:
        return {"z_dim": self.cfg.z_dim, "width": self.cfg.width, "embed_dim": self.cfg.embed_dim}

    def setup(self, gen: torch.Generator) -> None:
        cfg, info = self.cfg, self.info
        self.sample_seed = derive_seed(gen)  # latents of the synthetic set (also stored in the generator file)
        self.grid_seed = derive_seed(gen)  # latents of the sample grids
        self.filter_seed = derive_seed(gen)  # the filter classifier's data and weights
        self.g = self.module("generator", dcgan_init_(build_generator(info, self.architecture), gen, 1.0)
                             .to(self.device))
        d = Discriminator(info.channels, info.num_classes, cfg.width)
        d = kaiming_init_(d, gen) if cfg.d_init == "kaiming" else dcgan_init_(d, gen)
        d.pool_mean = cfg.pool_mean
        self.d = self.module("discriminator", d.to(self.device))
        betas = (cfg.beta1, cfg.beta2)
        self.optimizer("generator", torch.optim.Adam(self.g.parameters(), lr=cfg.lr_g, betas=betas))
        self.optimizer("discriminator", torch.optim.Adam(self.d.parameters(), lr=cfg.lr_d, betas=betas))
        # the current synthetic set (unfiltered until to_synset refreshes it); no optimiser moves it
        self.learnable("images", generate(self.g, self.hard_labels(), self.sample_seed))
        self._classifier: FilterClassifier | None = None
        self._last: dict[str, float] = {}
        self._steps = 0  # steps taken by this object: before any, the set is the initial samples, not projected
        self._targets: torch.Tensor | None = None
        if cfg.refine == "project":  # drawn last, so runs without refinement keep their random stream
            self.refine_seed = derive_seed(gen)
            self._targets = self.initial_images(gen).detach().cpu()
        self.refine_error: float | None = None
        self.refine_seconds: float | None = None

    def step(self, gen: torch.Generator) -> float:
        cfg = self.cfg
        real, y = self.pool.sample_classes(cfg.batch_real, gen)
        z = torch.randn(real.shape[0], cfg.z_dim, generator=gen).to(self.device)
        with autocast(self.device, self.precision):
            fake = self.g(z, y)
        self.d.requires_grad_(True)
        with autocast(self.device, self.precision):
            d_real, cls_real = self.d.scores(real, y)
            d_fake = self.d(fake.detach(), y)
        aux_d = F.cross_entropy(cls_real, y)
        loss_d = gan_losses(cfg.loss, d_real, d_fake, generator_side=False) + cfg.aux_weight * aux_d
        self.update("discriminator", loss_d)
        self.d.requires_grad_(False)
        with autocast(self.device, self.precision):
            d_gen, cls_gen = self.d.scores(fake, y)
        aux_g = F.cross_entropy(cls_gen, y)
        loss_g = gan_losses(cfg.loss, None, d_gen, generator_side=True) + cfg.aux_weight * aux_g
        self.update("generator", loss_g)
        self.d.requires_grad_(True)
        self._steps += 1
        self._last = {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach()),
                      "d_real": float(d_real.detach().mean()), "d_fake": float(d_fake.detach().mean()),
                      "aux_real": float(aux_d.detach()), "aux_fake": float(aux_g.detach())}
        return self._last["loss_d"]

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    # ------------------------------------------------------------------ the synthetic set
    def classifier(self) -> FilterClassifier:
        """The filter classifier, trained once (on ``filter_per_class`` real images per class, its own seed)."""
        if self._classifier is None:
            cfg = self.cfg
            self._classifier = train_filter_classifier(self.pool, cfg.filter_model, cfg.filter_per_class,
                                                       cfg.filter_epochs, self.filter_seed, self.device,
                                                       self.precision)
        return self._classifier

    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How good each sample is for its class under ``filter`` (higher is better)."""
        if self.cfg.filter == "discriminator":
            return filter_scores("discriminator", images, labels, discriminator=self.d)
        return filter_scores(self.cfg.filter, images, labels, classifier=self.classifier())

    def synthesize(self, final: bool = False) -> torch.Tensor:
        """``ipc`` samples per class (normalised, on CPU), filtered as ``filter`` says; with
        ``refine=project`` the projection of the init images once the generator has trained (any
        step, or ``final``: the set of a finished run)."""
        k, ipc = self.info.num_classes, self.ipc
        if self._targets is not None and (final or self._steps > 0):
            cfg = self.cfg
            start = time.perf_counter()
            images, err = project(self.g, self._targets, self.hard_labels(), steps=cfg.refine_steps, lr=cfg.refine_lr,
                                  restarts=cfg.refine_restarts, prior=cfg.refine_prior, seed=self.refine_seed)
            self.refine_error = float(err.mean())
            self.refine_seconds = time.perf_counter() - start
            return images
        if self.cfg.filter == "none":
            return draw_set(self.g, k, ipc, self.sample_seed)
        return draw_set(self.g, k, ipc, self.sample_seed, self.scores, self.cfg.candidates)

    def to_synset(self, meta: dict[str, Any]) -> Any:
        from tinyset.synset import SyntheticSet

        images = self.synthesize(final=bool(meta))
        with torch.no_grad():
            self.tensors["images"].copy_(images.to(self.device))
        meta = dict(meta)
        if meta:
            meta["gan"] = self._file_meta(self.cfg.filter, self.cfg.refine)
            if self._targets is not None:
                meta["gan"].update({"refined_from": self.cfg.init, "refine_seed": self.refine_seed,
                                    "refine_mean_pixel_error": self.refine_error,
                                    "refine_seconds": self.refine_seconds})
        return SyntheticSet(images, self.hard_labels(), self.info, meta=meta)

    def _file_meta(self, filter_: str, refine: str) -> dict[str, Any]:
        """What a saved set records about the generator that made it."""
        return {"generator_file": GENERATOR_FILE, "sample_seed": self.sample_seed, "filter": filter_,
                "architecture": self.architecture, "refine": refine}

    # ------------------------------------------------------------------ run-folder files
    def write_artifacts(self, out_dir: Path, iteration: int, final: bool) -> None:
        if not final and iteration % self.cfg.sample_every != 0:
            return
        from tinyset.synset import SyntheticSet
        from tinyset.viz import save_grid

        save_generator(Path(out_dir) / GENERATOR_FILE, self.g, self.info, self.architecture, self.sample_seed,
                       iteration, {"method": self.name, "config": self.cfg.to_dict()}, discriminator=self.d,
                       filter_seed=self.filter_seed)
        if final and self._targets is not None:  # the plain GAN set of the same generator, for comparison
            samples = generate(self.g, self.hard_labels(), self.sample_seed).cpu()
            SyntheticSet(samples, self.hard_labels(), self.info,
                         meta={"method": self.name, "iterations": iteration, "config": self.cfg.to_dict(),
                               "gan": {**self._file_meta("none", "none"),
                                       "note": f"unrefined samples of a refine=project run ({SAMPLES_FILE})"}}
                         ).save(Path(out_dir) / SAMPLES_FILE)
        labels = class_blocks(self.info.num_classes, self.cfg.sample_cols)
        grid = SyntheticSet(generate(self.g, labels, self.grid_seed).cpu(), labels, self.info)
        folder = Path(out_dir) / SAMPLES_DIR
        folder.mkdir(exist_ok=True)
        save_grid(grid, folder / f"iter_{iteration:06d}.png")


__all__ = ["GAN", "GANConfig", "Generator", "Discriminator", "generate", "project", "load_generator", "save_generator",
           "read_generator_header", "keep_best", "gan_losses", "GENERATOR_FILE", "SAMPLES_FILE", "draw_set",
           "filter_scores", "herding_scores", "FilterClassifier", "train_filter_classifier", "load_discriminator",
           "FilterSettings", "sample_generator", "SAMPLE_FILTERS", "CLASSIFIER_FILTERS", "REAL_DATA_FILTERS"]
