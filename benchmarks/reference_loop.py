"""Baselines for the benchmarks: the reference implementations' way of doing the same work.

Written for tinyset (not copied): a plain ``torch.nn`` ConvNet with the reference architecture,
trained one model after another with a per-model SGD loop in fp32, shuffled mini-batches and DSA
per batch (one op per batch, per-image parameters), test accuracy after the last epoch; the
reference DM iteration (one forward pass per class for real and synthetic images, fp32); and a
reference-style DataDAM iteration (feature maps collected by forward hooks on the ReLUs, fp32,
no compilation; one forward per class, or upstream's one forward for all real images and one for
all synthetic images); a reference-style FRePo (KRR) iteration after the authors' PyTorch port; and
the textbook DCGAN training step (the PyTorch DCGAN example's order of passes) for the GAN.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.augment import DSA


class ReferenceConvNet(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def reference_convnet(channels: int, num_classes: int, size: int, width: int = 128, depth: int = 3,
                      norm: bool = True, widen: int = 1) -> nn.Module:
    """Upstream's ConvNet: ``depth`` blocks of conv 3x3, instance norm (``norm=False``: none), ReLU,
    average pooling; a linear classifier. ``widen=2``: FRePo's network, channels doubling per block."""
    layers: list[nn.Module] = []
    c, h = channels, size
    for d in range(depth):
        pad = 3 if (d == 0 and channels == 1 and size == 28) else 1
        cout = width * widen ** d
        layers += [nn.Conv2d(c, cout, 3, padding=pad),
                   nn.GroupNorm(cout, cout, affine=True) if norm else nn.Identity(), nn.ReLU(),
                   nn.AvgPool2d(2, 2)]
        h = (h + 2 * pad - 2) // 2
        c = cout
    return ReferenceConvNet(nn.Sequential(*layers, nn.Flatten()), nn.Linear(c * h * h, num_classes))


def reference_train_one(images, labels, test_x, test_y, epochs, seed, augment: DSA | None,
                        lr=0.01, batch=256) -> float:
    """One model, plain loop, fp32; returns test accuracy after the last epoch.

    The schedule is upstream's ``evaluate_synset``: ``epochs + 1`` passes, a new optimiser at lr x0.1
    after pass ``epochs // 2 + 1``."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = reference_convnet(images.shape[1], int(labels.max()) + 1, images.shape[2])
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = images.shape[0]
    for ep in range(epochs + 1):
        perm = torch.randperm(n, generator=g)
        for b0 in range(0, n, batch):
            idx = perm[b0:b0 + batch]
            x = images[idx]
            if augment:
                x = augment(x, g)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs // 2 + 1:
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
    net.eval()
    correct = 0
    with torch.no_grad():
        for b0 in range(0, test_x.shape[0], 256):
            correct += int((net(test_x[b0:b0 + 256]).argmax(1) == test_y[b0:b0 + 256]).sum())
    return correct / test_x.shape[0]


def reference_dm_iteration(images_syn, opt, pool, ipc, batch_real, augment: DSA | None, g, seed) -> float:
    """The reference DM step: a fresh frozen net, one forward per class (real and synthetic), fp32."""
    k = pool.info.num_classes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = reference_convnet(pool.info.channels, k, pool.info.image_size[0])
    for p in net.parameters():
        p.requires_grad_(False)
    loss = torch.zeros(())
    for c in range(k):
        real = pool.sample_class(c, batch_real, g)
        syn = images_syn[c * ipc:(c + 1) * ipc]
        if augment:  # one transformation for the class's real and synthetic images (siamese)
            n = real.shape[0]
            grp = torch.zeros(n + ipc, dtype=torch.long)
            prm = augment.sample(n + ipc, pool.info.image_size, g, op_groups=grp, param_groups=grp)
            real = augment.apply(real, prm.rows(0, n))
            syn = augment.apply(syn, prm.rows(n, n + ipc))
        out_real = net.embed(real).detach()
        out_syn = net.embed(syn)
        loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item() / k


def _hooked_relus(net: nn.Module, store: list) -> list:
    """Forward hooks on every ReLU of ``net.features`` that append a copy of its output to ``store``
    (upstream copies because its ReLUs are in place)."""
    relus = [m for m in net.features if isinstance(m, nn.ReLU)]
    return [m.register_forward_hook(lambda mod, inp, out: store.append(out.clone())) for m in relus]


def _reference_attention(f: torch.Tensor, power: float) -> torch.Tensor:
    a = (f.abs() ** power).sum(1)
    return F.normalize(a.reshape(f.shape[0], -1), p=2.0, dim=1)


def reference_datadam_iteration(images_syn, opt, pool, ipc, batch_real, augment: DSA | None, g, seed,
                                power: float = 4.0, task_balance: float = 0.01, loss_scale: float = 100.0,
                                per_class: bool = True) -> float:
    """A reference-style DataDAM step: a fresh frozen net, ReLU outputs collected by forward hooks,
    attention maps of every hooked layer but the last, plus the final-embedding term, fp32.

    ``per_class=True``: one forward per class for the real and for the synthetic images.
    ``per_class=False``: upstream's layout, one forward for all real images, one for all synthetic
    images (per-class means taken afterwards). DSA is drawn per class (siamese) in both.
    """
    k = pool.info.num_classes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = reference_convnet(pool.info.channels, k, pool.info.image_size[0])
    for p in net.parameters():
        p.requires_grad_(False)
    reals, syns = [], []
    for c in range(k):
        real = pool.sample_class(c, batch_real, g)
        syn = images_syn[c * ipc:(c + 1) * ipc]
        if augment:
            n = real.shape[0]
            grp = torch.zeros(n + ipc, dtype=torch.long)
            prm = augment.sample(n + ipc, pool.info.image_size, g, op_groups=grp, param_groups=grp)
            real = augment.apply(real, prm.rows(0, n))
            syn = augment.apply(syn, prm.rows(n, n + ipc))
        reals.append(real)
        syns.append(syn)
    groups = [(r, s) for r, s in zip(reals, syns)] if per_class else [(torch.cat(reals), torch.cat(syns))]
    store: list = []
    hooks = _hooked_relus(net, store)
    loss = torch.zeros(())
    try:
        for real, syn in groups:
            kk = 1 if per_class else k
            store.clear()
            emb_real = net.embed(real).detach()
            acts_real = [a.detach() for a in store]
            store.clear()
            emb_syn = net.embed(syn)
            acts_syn = list(store)
            for fr, fs in zip(acts_real[:-1], acts_syn[:-1]):
                ar = _reference_attention(fr, power).reshape(kk, -1, fr.shape[2] * fr.shape[3]).mean(1)
                as_ = _reference_attention(fs, power).reshape(kk, -1, fs.shape[2] * fs.shape[3]).mean(1)
                loss = loss + loss_scale * ((ar - as_) ** 2).sum()
            er = emb_real.reshape(kk, -1, emb_real.shape[1]).mean(1)
            es = emb_syn.reshape(kk, -1, emb_syn.shape[1]).mean(1)
            loss = loss + loss_scale * task_balance * ((er - es) ** 2).sum()
    finally:
        for h in hooks:
            h.remove()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item() / k


def _reference_layerwise_distance(g_syn, g_real) -> torch.Tensor:
    """Upstream's ``match_loss`` with ``dis_metric='ours'``: for every parameter, 1 - cosine per
    output unit summed; 1-D parameters (biases, norm weights) count zero."""
    total = torch.zeros(())
    for gs, gr in zip(g_syn, g_real):
        if gr.dim() == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        total = total + (1 - (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)).sum()
    return total


def reference_dc_iteration(images_syn, opt, pool, ipc, batch_real, augment: DSA | None, g, seed,
                           outer_loop: int, inner_loop: int, lr_net: float = 0.01, batch_train: int = 256) -> float:
    """A reference-style DC (``augment=None``) or DSA outer iteration, as upstream's ``main.py`` does it.

    A fresh plain ``torch.nn`` ConvNet (InstanceNorm, fp32, not compiled) in train mode; ``outer_loop``
    times: for every class one forward/backward on ``batch_real`` real images for the gradients of all
    parameters, one forward/backward with the graph on the class's synthetic images (DSA: one draw per
    class, shared by both), the layer-wise distance, summed over classes, one step of ``opt`` on the
    images; between the image updates ``inner_loop`` epochs of plain SGD (``lr_net``, one optimiser for
    the iteration) on a copy of the synthetic set, shuffled batches of ``batch_train``, DSA per batch.
    Returns the mean loss per class and image update.
    """
    k = pool.info.num_classes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = reference_convnet(pool.info.channels, k, pool.info.image_size[0])
    net.train()
    params = list(net.parameters())
    net_opt = torch.optim.SGD(net.parameters(), lr=lr_net)
    labels_syn = torch.arange(k).repeat_interleave(ipc)
    total = 0.0
    for ol in range(outer_loop):
        loss = torch.zeros(())
        for c in range(k):
            real = pool.sample_class(c, batch_real, g)
            syn = images_syn[c * ipc:(c + 1) * ipc]
            if augment:  # one transformation for the class's real and synthetic images (siamese)
                n = real.shape[0]
                grp = torch.zeros(n + ipc, dtype=torch.long)
                prm = augment.sample(n + ipc, pool.info.image_size, g, op_groups=grp, param_groups=grp)
                real = augment.apply(real, prm.rows(0, n))
                syn = augment.apply(syn, prm.rows(n, n + ipc))
            target = torch.full((real.shape[0],), c, dtype=torch.long)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), target), params)
            g_real = [t.detach().clone() for t in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), target[:ipc]), params, create_graph=True)
            loss = loss + _reference_layerwise_distance(g_syn, g_real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        if ol == outer_loop - 1:
            break
        x_train, y_train = images_syn.detach().clone(), labels_syn.clone()
        n = x_train.shape[0]
        for _ in range(inner_loop):
            perm = torch.randperm(n, generator=g)
            for b0 in range(0, n, batch_train):
                idx = perm[b0:b0 + batch_train]
                x = x_train[idx]
                if augment:
                    x = augment(x, g)
                out = net(x)
                loss_net = F.cross_entropy(out, y_train[idx])
                net_opt.zero_grad()
                loss_net.backward()
                net_opt.step()
                loss_net.item()  # the reference reads the loss and the accuracy of every batch
                int((out.argmax(1) == y_train[idx]).sum())
    return total / (k * outer_loop)


class ReferenceKRR:
    """A reference-style FRePo iteration, after the authors' PyTorch port (yongchaoz/FRePo
    ``script/distill_torch.py``) written in plain torch: a pool of ``pool_size`` plain fp32 ConvNets
    without normalisation; per iteration one pool network drawn at random, its features of the real
    batch (no autograd) and of the synthetic images, the linear-kernel ridge regression in float32
    (one ``torch.linalg.solve``), the MSE to the real batch's centred one-hot rows plus the label
    margin term, one Adam step of the images (``lr_img``) and labels (``lr_label``), then one Adam step of the drawn network on
    (at most ``batch_syn`` of) the synthetic images, and a fresh network once it is
    ``max_online_steps`` old. ``cfg`` is a ``KRRConfig``; the cosine schedule of the learning rates is
    left out (it costs nothing)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pool, cfg, seed: int):
        from tinyset.methods.krr import centred_onehot, label_margin_loss

        self._onehot, self._margin = centred_onehot, label_margin_loss
        self.pool, self.cfg = pool, cfg
        self.images = images.detach().clone().requires_grad_(True)
        self.targets = targets.detach().clone().requires_grad_(bool(cfg.learn_labels))
        self.opt = torch.optim.Adam([{"params": [self.images], "lr": cfg.lr_img},
                                     {"params": [self.targets], "lr": cfg.lr_label}])
        self.seed = seed
        from tinyset.models import MODELS  # the pool architecture's channel growth (2 for convnet-frepo)

        self._widen = getattr(MODELS.get(cfg.model), "keywords", {}).get("widen", 1)
        self.nets = [self._network(i) for i in range(cfg.pool_size)]
        self.net_opts = [torch.optim.Adam(n.parameters(), lr=cfg.lr_net) for n in self.nets]
        stride = cfg.max_online_steps / cfg.pool_size
        self.ages = [int(i * stride) for i in range(cfg.pool_size)]

    def _network(self, salt: int) -> nn.Module:
        info = self.pool.info
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 1000 + salt)
            return reference_convnet(info.channels, info.num_classes, info.image_size[0],
                                     width=self.cfg.width or 128, norm=False,
                                     widen=self._widen)

    def step(self, g: torch.Generator) -> float:
        cfg, k = self.cfg, self.pool.info.num_classes
        i = int(torch.randint(cfg.pool_size, (1,), generator=g))
        net = self.nets[i]
        real, labels = self.pool.sample_classes(cfg.batch_real, g)
        net.requires_grad_(False)
        with torch.no_grad():
            f_real = net.embed(real)
        f_syn = net.embed(self.images)
        k_ss = f_syn @ f_syn.T
        n = k_ss.shape[0]
        lam = cfg.ridge * torch.trace(k_ss) / n
        alpha = torch.linalg.solve(k_ss + lam * torch.eye(n), self.targets)
        pred = (f_real @ f_syn.T) @ alpha
        mse = ((pred - self._onehot(labels, k)) ** 2).sum(-1).mean()
        loss = mse + cfg.label_margin * self._margin(self.targets) if cfg.learn_labels else mse
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        net.requires_grad_(True)
        x, y = self.images.detach(), self.targets.detach()
        if x.shape[0] > cfg.batch_syn:
            idx = torch.randperm(x.shape[0], generator=g)[:cfg.batch_syn]
            x, y = x[idx], y[idx]
        loss_net = F.mse_loss(net(x), y)
        self.net_opts[i].zero_grad()
        loss_net.backward()
        self.net_opts[i].step()
        self.ages[i] += 1
        if self.ages[i] >= cfg.max_online_steps:
            self.nets[i] = self._network(cfg.pool_size + i)
            self.net_opts[i] = torch.optim.Adam(self.nets[i].parameters(), lr=cfg.lr_net)
            self.ages[i] = 0
        return mse.item()


class ReferenceGANStep:
    """The textbook DCGAN training step (the order of passes of the PyTorch DCGAN example), fp32, no
    autocast, on copies of a generator and a discriminator: discriminator loss on a real batch and on
    detached fakes, backward, step; then the generator loss through the discriminator, backward (the
    discriminator's parameters keep requiring gradients, as in the example), step. The losses are
    tinyset's (``gan_losses`` of ``cfg.loss``, plus ``cfg.aux_weight`` times the auxiliary class
    cross-entropy), so both contenders do the same mathematics."""

    def __init__(self, g: nn.Module, d: nn.Module, pool, cfg):
        import copy

        from tinyset.methods.gan import gan_losses

        self._losses = gan_losses
        self.g, self.d = copy.deepcopy(g).float(), copy.deepcopy(d).float()
        self.g.requires_grad_(True)
        self.d.requires_grad_(True)
        self.pool, self.cfg = pool, cfg
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr_d, betas=betas)

    def step(self, gen: torch.Generator) -> float:
        cfg = self.cfg
        real, y = self.pool.sample_classes(cfg.batch_real, gen)
        z = torch.randn(real.shape[0], cfg.z_dim, generator=gen)
        fake = self.g(z, y)
        self.opt_d.zero_grad()
        d_real, cls_real = self.d.scores(real, y)
        d_fake = self.d(fake.detach(), y)
        loss_d = (self._losses(cfg.loss, d_real, d_fake, generator_side=False)
                  + cfg.aux_weight * F.cross_entropy(cls_real, y))
        loss_d.backward()
        self.opt_d.step()
        self.opt_g.zero_grad()
        d_gen, cls_gen = self.d.scores(fake, y)
        loss_g = (self._losses(cfg.loss, None, d_gen, generator_side=True)
                  + cfg.aux_weight * F.cross_entropy(cls_gen, y))
        loss_g.backward()
        self.opt_g.step()
        return loss_d.item()
