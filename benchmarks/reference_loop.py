"""Baselines for the benchmarks: the reference implementations' way of doing the same work.

Written for tinyset (not copied): a plain ``torch.nn`` ConvNet with the reference architecture,
trained one model after another with a per-model SGD loop in fp32, shuffled mini-batches and DSA
per batch (one op per batch, per-image parameters), test accuracy after the last epoch; the
reference DM iteration (one forward pass per class for real and synthetic images, fp32); and a
reference-style DataDAM iteration (feature maps collected by forward hooks on the ReLUs, fp32,
no compilation; one forward per class, or upstream's one forward for all real images and one for
all synthetic images).
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


def reference_convnet(channels: int, num_classes: int, size: int, width: int = 128, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    c, h = channels, size
    for d in range(depth):
        pad = 3 if (d == 0 and channels == 1 and size == 28) else 1
        layers += [nn.Conv2d(c, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2, 2)]
        h = (h + 2 * pad - 2) // 2
        c = width
    return ReferenceConvNet(nn.Sequential(*layers, nn.Flatten()), nn.Linear(width * h * h, num_classes))


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
