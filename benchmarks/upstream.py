"""Upstream's own code as the benchmarks' baseline, obtained at benchmark time (never vendored).

The speed-ups tinyset claims are measured against the code its methods come from:
VICO-UoE/DatasetCondensation (DC, DSA, DM and their ``evaluate_synset``), DataDistillation/DataDAM and
GeorgeCazenavette/mtt-distillation (MTT; its ``reparam_module.py`` too). :func:`locate` finds a copy:

* ``--upstream auto`` (the default): ``git clone --depth 1`` of the public repository into a temporary
  folder, when the network allows it;
* ``--upstream DIR``: a checkout (a folder with ``utils.py`` and ``networks.py``), or a bare git
  directory (its ``HEAD`` is exported into a temporary folder);
* ``--upstream off``: no upstream rows.

:func:`load` imports upstream's ``utils`` and ``networks`` under private module names. Upstream's
``utils.py`` imports torchvision at the top, for its dataset loaders only; tinyset does not depend on
torchvision, so when it is not installed an empty stand-in module is registered (the functions the
benchmarks call never touch it). The loop bodies below are written for tinyset: they do what
upstream's ``main.py`` / ``main_DM.py`` do between two evaluations, calling upstream's functions
(``get_network``, ``DiffAugment``, ``match_loss``, ``epoch``, ``evaluate_synset``) and upstream's
data layout (one tensor of all real images, index lists per class, numpy permutations).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

URL = "https://github.com/VICO-UoE/DatasetCondensation"
DATADAM_URL = "https://github.com/DataDistillation/DataDAM"
MTT_URL = "https://github.com/GeorgeCazenavette/mtt-distillation"
#: the files the benchmarks import from a checkout (MTT adds MTT_FILES)
FILES = ("utils.py", "networks.py")
MTT_FILES = FILES + ("reparam_module.py",)


def _export_bare(git_dir: Path, dest: Path, files: tuple[str, ...] = FILES) -> None:
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", *files],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def locate(spec: str, url: str = URL, files: tuple[str, ...] = FILES) -> tuple[Path | None, str]:
    """Return (folder with upstream's ``files``, or None, how it was found)."""
    if spec == "off":
        return None, "off"
    if spec != "auto":
        path = Path(spec).expanduser()
        if all((path / f).is_file() for f in files):
            return path, f"checkout {path}"
        for git_dir in (path, path / "repo", path / ".git"):
            if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
                dest = Path(tempfile.mkdtemp(prefix="tinyset-upstream-"))
                _export_bare(git_dir, dest, files)
                rev = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()
                return dest, f"{git_dir} at {rev}"
        raise SystemExit(f"{spec}: not a checkout of {url} (no {' / '.join(files)}) nor a git directory")
    dest = Path(tempfile.mkdtemp(prefix="tinyset-upstream-"))
    try:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", url, str(dest / "repo")], check=True,
                       capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None, f"not reachable ({url}); pass a checkout's folder instead"
    rev = subprocess.run(["git", "-C", str(dest / "repo"), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    return dest / "repo", f"cloned {url} at {rev}"


class _StandIn(types.ModuleType):
    """An absent optional package of upstream's (torchvision, kornia, einops): importable, and any
    name taken from it fails only when used. The benchmarks never use them."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*_a, **_k):
            raise RuntimeError(f"{self.__name__}.{name} is not installed (stand-in for upstream's import)")
        return unavailable


_OPTIONAL = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.utils", "kornia",
             "einops", "einops.layers", "einops.layers.torch")


def _stand_ins() -> None:
    for name in _OPTIONAL:
        root = name.partition(".")[0]
        if not isinstance(sys.modules.get(root), _StandIn) and (
                root in sys.modules or importlib.util.find_spec(root) is not None):
            continue  # installed: upstream imports the real package
        mod = sys.modules.setdefault(name, _StandIn(name))
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)


def load(folder: Path, prefix: str = "upstream", extra: tuple[str, ...] = ()) -> SimpleNamespace:
    """Import upstream's ``networks`` and ``utils`` (then the ``extra`` modules, e.g. MTT's
    ``reparam_module``) from ``folder``; returns a namespace of them."""
    _stand_ins()
    modules = {}
    for name in ("networks", "utils", *extra):  # utils does `from networks import ...`
        spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        previous = sys.modules.get(name)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        finally:
            if previous is not None:
                sys.modules[name] = previous
            elif name != "networks":  # networks stays registered until utils has imported it
                sys.modules.pop(name, None)
                if name == "utils":
                    sys.modules.pop("networks", None)
        modules[name] = mod
    if hasattr(modules["utils"], "DiffAugment"):
        modules["utils"].DiffAugment = _standard_strides(modules["utils"].DiffAugment)
    return SimpleNamespace(**modules)


def _standard_strides(diff_augment):
    """Upstream's ``rand_crop`` returns a permuted batch; for one-channel images (MNIST) its strides
    pass ``is_contiguous()`` yet read as channels-last, so recent torch (2.13 here) runs the next
    convolution channels-last and upstream's ``out.view(n, -1)`` in ``ConvNet.forward`` / ``embed``
    fails. The benchmarks therefore copy DiffAugment's output into plain NCHW strides when needed
    (one copy of the batch; upstream's own code crashes on MNIST with DSA under this torch)."""

    def wrapped(x, *args, **kwargs):
        y = diff_augment(x, *args, **kwargs)
        if y.stride() != torch.empty(y.shape, device="meta").stride():
            y = torch.empty(y.shape, dtype=y.dtype, device=y.device).copy_(y)
        return y
    return wrapped


def upstream_args(up: SimpleNamespace, dsa: bool, strategy: str, **extra) -> SimpleNamespace:
    """The ``args`` namespace upstream's functions read."""
    args = SimpleNamespace(device="cpu", dsa=dsa, dsa_strategy=strategy, dsa_param=up.utils.ParamDiffAug(),
                           dis_metric="ours", lr_net=0.01, batch_train=256, dc_aug_param=None)
    for k, v in extra.items():
        setattr(args, k, v)
    return args


class RealData:
    """Upstream's layout of the training set: one tensor, index lists per class, numpy draws."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        # fresh NCHW strides, as upstream builds it (torch.cat of per-image tensors); a 1-channel tensor can
        # pass is_contiguous() with channels-last strides, which upstream's .view() in embed() rejects
        self.images = images.clone(memory_format=torch.contiguous_format)
        self.indices = [torch.nonzero(labels == c).flatten().tolist() for c in range(num_classes)]

    def get_images(self, c: int, n: int) -> torch.Tensor:
        idx = np.random.permutation(self.indices[c])[:n]
        return self.images[idx]


def _time_seed() -> int:
    return int(time.time() * 1000) % 100000  # upstream's siamese seed


def class_pair(up, args, real: RealData, image_syn: torch.Tensor, c: int, ipc: int, batch_real: int):
    """Class ``c``'s real batch and synthetic images, as upstream's scripts draw them: numpy
    permutation, then (DSA) one DiffAugment seed shared by both."""
    img_real = real.get_images(c, batch_real)
    img_syn = image_syn[c * ipc:(c + 1) * ipc]
    if args.dsa:
        seed = _time_seed()
        img_real = up.utils.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
        img_syn = up.utils.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
    return img_real, img_syn


def dm_iteration(up, args, real: RealData, image_syn: torch.Tensor, opt, ipc: int, batch_real: int,
                 channel: int, num_classes: int, im_size) -> float:
    """One DM image update as upstream's main_DM.py does it for a ConvNet without BatchNorm."""
    net = up.utils.get_network("ConvNet", channel, num_classes, im_size)
    net.train()
    for p in net.parameters():
        p.requires_grad = False
    loss = torch.tensor(0.0)
    for c in range(num_classes):
        img_real, img_syn = class_pair(up, args, real, image_syn, c, ipc, batch_real)
        out_real = net.embed(img_real).detach()
        out_syn = net.embed(img_syn)
        loss = loss + torch.sum((out_real.mean(0) - out_syn.mean(0)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item() / num_classes


def dc_iteration(up, args, real: RealData, image_syn: torch.Tensor, opt, ipc: int, batch_real: int,
                 channel: int, num_classes: int, im_size, outer_loop: int, inner_loop: int) -> float:
    """One DC/DSA outer iteration as upstream's main.py does it (ConvNet without BatchNorm):
    ``outer_loop`` image updates from per-class gradients, ``inner_loop`` epochs of the network on the
    synthetic set between them (upstream's ``epoch``, DSA per batch when ``args.dsa``)."""
    net = up.utils.get_network("ConvNet", channel, num_classes, im_size)
    net.train()
    params = list(net.parameters())
    opt_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    criterion = nn.CrossEntropyLoss()
    label_syn = torch.arange(num_classes).repeat_interleave(ipc)
    total = 0.0
    for ol in range(outer_loop):
        loss = torch.tensor(0.0)
        for c in range(num_classes):
            img_real, img_syn = class_pair(up, args, real, image_syn, c, ipc, batch_real)
            lab_real = torch.full((img_real.shape[0],), c, dtype=torch.long)
            lab_syn = torch.full((ipc,), c, dtype=torch.long)
            gw_real = torch.autograd.grad(criterion(net(img_real), lab_real), params)
            gw_real = [g.detach().clone() for g in gw_real]
            gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), params, create_graph=True)
            loss = loss + up.utils.match_loss(gw_syn, gw_real, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        if ol == outer_loop - 1:
            break
        syn_train = up.utils.TensorDataset(image_syn.detach().clone(), label_syn.clone())
        loader = torch.utils.data.DataLoader(syn_train, batch_size=args.batch_train, shuffle=True, num_workers=0)
        for _ in range(inner_loop):
            up.utils.epoch("train", loader, net, opt_net, criterion, args, aug=bool(args.dsa))
    return total / (num_classes * outer_loop)


def evaluate(up, args, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
             test_labels: torch.Tensor, channel: int, num_classes: int, im_size, seed: int) -> float:
    """One model of upstream's evaluation: ``get_network('ConvNet')`` + ``evaluate_synset`` (train
    ``args.epoch_eval_train`` + 1 passes, then test on a loader of batch 256 as main.py builds)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    net = up.utils.get_network("ConvNet", channel, num_classes, im_size)
    test = up.utils.TensorDataset(test_images, test_labels)
    loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
    _, _, acc = up.utils.evaluate_synset(0, net, images.clone(), labels.clone(), loader, args)
    return float(acc)


def datadam_network(up, channel: int, num_classes: int, im_size) -> nn.Module:
    """The network upstream DataDAM's ``get_network('ConvNet')`` builds (a BatchNorm ConvNet: it
    hard-codes ``net_norm='batchnorm'``), made without its unconditional ``.cuda()``."""
    width, depth, act, _, pooling = up.utils.get_default_convnet_setting()
    torch.random.manual_seed(_time_seed())
    return up.networks.ConvNet(channel=channel, num_classes=num_classes, net_width=width, net_depth=depth,
                               net_act=act, net_norm="batchnorm", net_pooling=pooling, im_size=im_size)


def datadam_iteration(up, args, real: RealData, image_syn: torch.Tensor, opt, ipc: int, batch_real: int,
                      channel: int, num_classes: int, im_size, task_balance: float = 0.01) -> float:
    """One DataDAM image update as upstream's main_DataDAM.py does it: a fresh frozen network, the
    real and the synthetic images of all classes in one forward each (DSA drawn per class), every
    ReLU's output copied by a forward hook, ``get_attention(param=1, exp=1, norm='l2')`` on all but the
    last, per-class means matched (MSE), plus the final-embedding term weighted ``task_balance``."""
    net = datadam_network(up, channel, num_classes, im_size)
    net.train()
    for p in net.parameters():
        p.requires_grad = False
    reals, syns = [], []
    for c in range(num_classes):
        img_real, img_syn = class_pair(up, args, real, image_syn, c, ipc, batch_real)
        reals.append(img_real)
        syns.append(img_syn)
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=str(i): acts.__setitem__(key, out.clone()))
             for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]

    def class_means(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.reshape(num_classes, n, -1).mean(1)

    try:
        emb_real = net(torch.cat(reals))[0].detach()
        acts_real = [acts[k] for k in sorted(acts, key=int)]
        acts.clear()
        emb_syn = net(torch.cat(syns))[0]
        acts_syn = [acts[k] for k in sorted(acts, key=int)]
    finally:
        for h in hooks:
            h.remove()
    loss = torch.tensor(0.0)
    for fr, fs in zip(acts_real[:-1], acts_syn[:-1]):
        ar = up.utils.get_attention(fr.detach(), param=1, exp=1, norm="l2")
        as_ = up.utils.get_attention(fs, param=1, exp=1, norm="l2")
        loss = loss + 100 * torch.sum((class_means(ar, batch_real) - class_means(as_, ipc)) ** 2)
    loss = loss + 100 * task_balance * torch.sum((class_means(emb_real, batch_real) - class_means(emb_syn, ipc)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item() / num_classes
