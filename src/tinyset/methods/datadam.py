"""DataDAM: Dataset Distillation with Attention Matching (Sajedi et al., ICCV 2023).

The paper's algorithm, one outer iteration (what :meth:`DataDAM.step` does):

1. draw a fresh randomly initialised network ``phi`` (its weights are not trained);
2. for every class ``c``: a batch ``T_c`` of ``batch_real`` real images and the class's synthetic
   images ``S_c``, both under one DSA transformation;
3. for every block ``l`` but the last (``attn_layers``), the spatial attention map of an image
   ``x``: ``a_l(x) = v / ||v||_2`` with ``v = flatten(sum over channels of |f_l(x)|^p)``, where
   ``f_l`` is the block's activation output, before pooling (where the reference code's forward
   hooks on the ReLUs read it);
   ``L_SAM = sum_c sum_l || mean_{x in T_c} a_l(x) - mean_{s in S_c} a_l(s) ||^2``;
4. on the final embeddings ``phi(x)`` (flattened features before the classifier):
   ``L_MMD = sum_c || mean_{x in T_c} phi(x) - mean_{s in S_c} phi(s) ||^2``;
5. one SGD step of the synthetic images on ``loss_scale * (L_SAM + task_balance * L_MMD)``
   (the paper's lambda is ``task_balance``; ``loss_scale`` is the reference code's factor 100).

All classes go through one forward pass for the real images (without autograd) and one for the
synthetic images, the feature maps come from :meth:`ConvNet.block_outputs` (no forward hooks),
and the network is re-initialised in place every iteration so that its forward can be compiled
once. With BatchNorm (``model=convnet-bn``, what the reference code silently uses) the network is
in training mode: real and synthetic batches are normalised with their own batch statistics, as
in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tinyset.errors import ConfigError
from tinyset.methods import METHODS
from tinyset.methods.base import DistillConfig, Distiller, Row, Rule, Table, hp
from tinyset.models import MODELS, ConvNet
from tinyset.models.layers import init_parameters
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, compile_function

#: compile the feature function when a run has at least this many iterations (CPU, ``compile=auto``)
COMPILE_MIN_ITERATIONS = 200

_REF = "DataDistillation/DataDAM README hyper-parameter table (HPTable.png; Sajedi et al., ICCV 2023)"


def attention_map(f: torch.Tensor, power: float) -> torch.Tensor:
    """Spatial attention of feature maps ``[N, C, H, W]``: ``sum_C |f|^p``, flattened to
    ``[N, H*W]`` and L2-normalised per image. The channel sum and the result are fp32."""
    if power == 1:
        a = f.abs()
    elif power == 2:
        a = f * f
    elif power == 4:  # by multiplication: an elementwise pow is several times slower on CPU
        a = f * f
        a = a * a
    else:
        a = f.abs().float().pow(power)
    return F.normalize(a.sum(1, dtype=torch.float32).flatten(1), p=2.0, dim=1)


def class_means(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[K*n, ...]`` (class by class) -> ``[K, D]``: the mean of every class's rows, in fp32."""
    return x.float().reshape(k, -1, x[0].numel()).mean(1)


def _lr_from_ipc(values, dataset: str, ipc: int) -> dict:
    if values["lr_img"] is not None:
        return {}
    lr = 1.0 if ipc <= 50 else 10.0
    return {"lr_img": (lr, f"paper: {_REF}: lr_img 1 for ipc <= 50, 10 for ipc > 50")}


def _cpu_budget(values, dataset: str, ipc: int) -> dict:
    return {"iterations": 1000 if dataset == "digits" else 500, "final_eval": "quick"}


@dataclass
class DataDAMConfig(DistillConfig):
    iterations: int = hp(8000, "outer iterations", ge=1)
    model: str = hp("convnet", "ConvNet whose block outputs are matched (convnet: InstanceNorm, as the paper "
                               "states; convnet-bn: BatchNorm, what the reference code uses)")
    lr_img: float | None = hp(None, "learning rate of the synthetic images (none: the paper's 1 for ipc <= 50, "
                                    "10 above)", gt=0, optional=True)
    batch_real: int = hp(64, "real images per class per iteration", ge=1)
    power: float = hp(4.0, "exponent p of the attention map sum_C |f|^p (paper 4; the reference code uses 1)",
                      gt=0)
    task_balance: float = hp(0.01, "lambda: weight of the final-embedding (MMD) term against the attention "
                                   "term (paper: 0.01 low resolution, 0.02 high resolution)", ge=0)
    loss_scale: float = hp(100.0, "factor on the whole loss (the reference code's 100; with SGD it acts as a "
                                  "learning-rate factor)", gt=0)
    attn_layers: str = hp("intermediate", "blocks whose attention maps are matched: every block but the "
                                               "last (whose output the embedding term covers), or all",
                               choices=("intermediate", "all"))
    compile: str = hp("auto", "torch.compile the feature function (auto: on CPU for runs of at least "
                              f"{COMPILE_MIN_ITERATIONS} iterations)", choices=("auto", "on", "off"))


def _convnet_depth(model: str) -> int | None:
    """The depth of a registered ConvNet-family model, ``None`` for any other architecture."""
    ctor = MODELS.get(model)
    if getattr(ctor, "func", ctor) is not ConvNet:
        return None
    return int(getattr(ctor, "keywords", {}).get("depth", 3))


@METHODS.register("datadam", help="attention matching (Sajedi et al. 2023)")
class DataDAM(Distiller):
    name = "datadam"
    Config = DataDAMConfig
    paper = Table((
        Row({"iterations": 8000, "momentum_img": 0.5, "batch_real": 64, "init": "real", "power": 4.0,
             "task_balance": 0.01, "loss_scale": 100.0, "attn_layers": "intermediate", "model": "convnet"},
            f"{_REF}: 8000 iterations, lr_img 1 (ipc <= 50) / 10 (ipc > 50), image SGD momentum 0.5, "
            "batch_real 64, lambda 0.01 (low resolution; 0.02 high resolution is not applied automatically), "
            "p = 4, L2-normalised maps, MSE, ReLU InstanceNorm encoder; loss scale 100 and attention on every "
            "block but the last from main_DataDAM.py. The code differs from the paper: get_attention(exp=1), "
            "i.e. p = 1; --Iteration 20000; get_network('ConvNet') builds a BatchNorm ConvNet (for the code's "
            "settings: --set power=1 --set iterations=20000 --model convnet-bn)"),
    ))
    cpu_rule = Rule("2-core CPU budget: 500 iterations (1000 on digits), quick final evaluation; measured "
                    "on MNIST ipc 10, batch_real 64 (AMD EPYC with AVX512-BF16, 1 thread, bf16, compiled): "
                    "0.81 s per iteration, about 7 minutes for 500 after ~35 s of compilation; digits 0.04 s",
                    _cpu_budget)
    complete = staticmethod(_lr_from_ipc)

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        super().check_config(cfg)
        depth = _convnet_depth(cfg.model)
        if depth is None:
            convnets = [n for n in MODELS.names() if _convnet_depth(n) is not None]
            raise ConfigError(f"model={cfg.model!r}: DataDAM matches the block outputs of a ConvNet; use one "
                              f"of {', '.join(convnets)}")
        if depth == 1 and cfg.attn_layers == "intermediate":
            raise ConfigError(f"model={cfg.model!r} has one block, so attn_layers='intermediate' matches no "
                              f"attention map; use attn_layers=all or a deeper ConvNet")

    def setup(self, gen: torch.Generator) -> None:
        self.net = self.frozen_network()
        depth = self.net.config["depth"]
        self.blocks = tuple(range(depth if self.cfg.attn_layers == "all" else depth - 1))
        self.features = self.feature_function()
        if self.wants_compile():
            self.features = compile_function(self.features)
        super().setup(gen)

    def feature_function(self) -> Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]:
        """``x -> ([attention map of every matched block], embedding)`` from one forward pass."""
        net, blocks, power = self.net, self.blocks, self.cfg.power

        def features(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
            outs = net.block_outputs(x)
            return [attention_map(outs[i], power) for i in blocks], outs[-1]

        return features

    def wants_compile(self) -> bool:
        return self.compile_wanted(self.device.type == "cpu" and self.cfg.iterations >= COMPILE_MIN_ITERATIONS)

    def batches(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A real batch of every class and the synthetic images, class by class, under one DSA draw
        per class (shared by the class's real and synthetic images)."""
        k, b = self.info.num_classes, self.cfg.batch_real
        real, _ = self.pool.sample_classes(b, gen)
        return self.siamese(real, self.images, gen, torch.arange(k).repeat_interleave(b),
                            torch.arange(k).repeat_interleave(self.ipc))

    def matching_loss(self, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
        """``loss_scale * (L_SAM + task_balance * L_MMD)`` summed over classes (module docstring)."""
        k = self.info.num_classes
        with torch.no_grad(), autocast(self.device, self.precision):
            maps_real, emb_real = self.forward_real(self.features, real, self.net)
            means_real = [class_means(a, k) for a in maps_real]
            emb_real = class_means(emb_real, k)
        with autocast(self.device, self.precision):
            maps_syn, emb_syn = self.features(syn)
        sam = syn.new_zeros((), dtype=torch.float32)
        for mr, a in zip(means_real, maps_syn):
            sam = sam + ((mr - class_means(a, k)) ** 2).sum()
        mmd = ((emb_real - class_means(emb_syn, k)) ** 2).sum()
        return self.cfg.loss_scale * (sam + self.cfg.task_balance * mmd)

    def step(self, gen: torch.Generator) -> float:
        init_parameters(self.net, make_generator(derive_seed(gen)))
        real, syn = self.batches(gen)
        loss = self.matching_loss(real, syn)
        self.update("images", loss)
        return loss.item() / self.info.num_classes
