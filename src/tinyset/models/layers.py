"""Ensemble-aware layers: one module holds ``members`` independent networks side by side.

Every tinyset model is written once with these layers. With ``members=1`` they behave like the
ordinary ``torch.nn`` layers. With ``members=M`` a single forward pass runs M independently
initialised networks at once, which is how the evaluator trains several models "as one batched
ensemble":

* 4-D activations are laid out ``[N, M*C, H, W]``: member ``m`` owns channels ``m*C:(m+1)*C``.
  Convolutions become grouped convolutions (``groups=M``), per-channel norms simply see ``M*C``
  channels (InstanceNorm/BatchNorm statistics are per channel, hence per member), and pointwise
  ops, pooling and residual additions need no change.
* 2-D activations are laid out ``[N, M, D]``; linear layers are batched matrix products.

Each member's parameters follow PyTorch's default initialisation, drawn from an explicit
``torch.Generator`` (see :func:`init_parameters`), so members are as independent as separately
created networks and the mathematics of training is identical to training them one by one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.errors import ConfigError
from tinyset.runtime import im2col_first_conv


def _uniform_(t: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        vals = torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=generator)
        t.copy_(vals)


class _CancelledBias(torch.autograd.Function):
    """``y`` unchanged, and an exact zero gradient for ``bias``.

    Used when a per-channel bias is followed by a per-sample, per-channel normalisation
    (InstanceNorm): the normalisation subtracts each channel's mean, so the bias cancels exactly and
    its true gradient is zero. Skipping the addition (and the reduction its gradient would need)
    saves a full pass over the largest activation of the network; the parameter stays, gets a zero
    gradient and weight decay, exactly as in the reference where its gradient is rounding noise.
    Written with a separate ``setup_context`` so that :mod:`torch.func` transforms (``grad``,
    ``vjp``, as MTT's student uses) can run through it.
    """

    @staticmethod
    def forward(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        bias = inputs[1]
        ctx.bias_meta = (bias.shape, bias.dtype, bias.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.bias_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class Conv2d(nn.Module):
    """``members`` independent ``Conv2d(cin, cout, k)`` layers as one grouped convolution.

    Convolutions whose receptive field is tiny (``cin*k*k <= 27``, the first layer on MNIST or
    CIFAR; ``use_matmul`` says a layer is eligible) can run as an im2col matrix product instead:
    in compiled CPU graphs it beats oneDNN's direct kernels for one or three input channels; in
    eager CPU code it does not, and on CUDA the rewrite costs thousands of extra kernel launches.
    So the path is chosen per device and mode at every call
    (:func:`tinyset.runtime.im2col_first_conv`). Both paths compute the same function.

    ``bias_cancelled`` (set by the model when an InstanceNorm follows) skips adding the bias, which
    that norm would remove anyway; see :class:`_CancelledBias`.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, members: int = 1):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, kernel_size
        self.stride, self.padding, self.members = stride, padding, members
        self.weight = nn.Parameter(torch.empty(members * cout, cin, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(members * cout)) if bias else None
        self.use_matmul = cin * kernel_size * kernel_size <= 27 and stride == 1
        self.bias_cancelled = False

    def reset_parameters(self, generator: torch.Generator) -> None:
        fan_in = self.cin * self.k * self.k
        bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform_(a=sqrt(5)), PyTorch's default
        _uniform_(self.weight, bound, generator)
        if self.bias is not None:
            _uniform_(self.bias, bound, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias_cancelled else self.bias
        if self.use_matmul and im2col_first_conv(x.device):  # eligible, on CPU, inside a compiled graph
            y = self._forward_matmul(x, bias)
        else:
            y = F.conv2d(x, self.weight, bias, self.stride, self.padding, groups=self.members)
        if self.bias_cancelled and self.bias is not None:
            y = _CancelledBias.apply(y, self.bias)
        return y

    def _forward_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, _, h, w = x.shape
        m, k, p = self.members, self.k, self.padding
        ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        cols = F.unfold(x, k, padding=p).transpose(1, 2)  # [N, L, M*cin*k*k]
        wt = self.weight.view(m, self.cout, self.cin * k * k).transpose(1, 2)  # [M, cin*k*k, cout]
        # [M*cin*k*k, M*cout], row-major: autograd then forms the weight gradient as cols^T @ grad
        # ([cin*k*k, cout]); for a column-major (transposed) matrix it forms grad^T @ cols instead, whose
        # few output columns ran 4-8x slower in fp32 (benchmarks/bench_first_conv.py)
        wmat = torch.block_diag(*wt.unbind(0)) if m > 1 else wt[0].contiguous()
        y = cols @ wmat.to(cols.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        # [N, Ho, Wo, M*cout] -> NCHW (eager GroupNorm is far slower on channels-last tensors)
        return y.view(n, ho, wo, m * self.cout).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.cin}, {self.cout}, kernel_size={self.k}, stride={self.stride}, "
                f"padding={self.padding}, members={self.members}")


class Linear(nn.Module):
    """``members`` independent linear layers. Input ``[N, D]`` (members=1) or ``[N, M, D]``."""

    def __init__(self, cin: int, cout: int, members: int = 1):
        super().__init__()
        self.cin, self.cout, self.members = cin, cout, members
        self.weight = nn.Parameter(torch.empty(members, cout, cin))
        self.bias = nn.Parameter(torch.empty(members, cout))

    def reset_parameters(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.cin)
        _uniform_(self.weight, bound, generator)
        _uniform_(self.bias, bound, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.members == 1 and x.dim() == 2:
            return F.linear(x, self.weight[0], self.bias[0])
        # [N, M, D] -> [M, N, D] @ [M, D, O] + [M, 1, O] -> [N, M, O]
        y = torch.baddbmm(self.bias.unsqueeze(1).to(x.dtype), x.transpose(0, 1),
                          self.weight.transpose(1, 2).to(x.dtype))
        return y.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{self.cin}, {self.cout}, members={self.members}"


class Flatten(nn.Module):
    """``[N, M*C, H, W]`` -> ``[N, M, C*H*W]`` (or ``[N, C*H*W]`` for one member)."""

    def __init__(self, members: int = 1):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # already [N, M, D]
            return x
        n = x.shape[0]
        if self.members == 1:
            return x.reshape(n, -1)
        return x.reshape(n, self.members, -1)


class LayerNorm(nn.Module):
    """The reference ConvNet's ``nn.LayerNorm([C, H, W])``, per member."""

    def __init__(self, channels: int, height: int, width: int, members: int = 1, eps: float = 1e-5):
        super().__init__()
        self.members, self.eps = members, eps
        self.shape = (channels, height, width)
        self.weight = nn.Parameter(torch.ones(members * channels, height, width))
        self.bias = nn.Parameter(torch.zeros(members * channels, height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c, h, w = self.shape
        y = F.layer_norm(x.reshape(n, self.members, c * h * w), (c * h * w,), eps=self.eps)
        return y.reshape(x.shape) * self.weight + self.bias


def norm_cancels_bias(kind: str) -> bool:
    """Whether the norm ``kind`` removes a per-channel bias of its input exactly (per-sample,
    per-channel mean subtraction: InstanceNorm). BatchNorm does not in eval mode; GroupNorm with
    several channels per group and LayerNorm do not at all."""
    return kind == "instancenorm"


def conv_norm(cin: int, cout: int, kernel_size: int, padding: int, norm: str, hw: tuple[int, int],
              members: int = 1) -> list[nn.Module]:
    """``[Conv2d, norm]``: a biased convolution and the norm ``norm`` over its ``hw`` output; the
    conv skips its bias when that norm cancels it (see :func:`norm_cancels_bias`)."""
    conv = Conv2d(cin, cout, kernel_size, padding=padding, members=members)
    conv.bias_cancelled = norm_cancels_bias(norm)
    return [conv, make_norm(norm, cout, hw, members)]


def make_norm(kind: str, channels: int, hw: tuple[int, int], members: int = 1) -> nn.Module:
    """Normalisation layers with the reference ConvNet's semantics, for ``members`` networks.

    ``instancenorm`` is ``GroupNorm(C, C, affine=True)`` (as in the reference code), ``groupnorm``
    is ``GroupNorm(4, C)``, ``layernorm`` is ``LayerNorm([C, H, W])``, ``batchnorm`` is
    ``BatchNorm2d(C)``.
    """
    m, c = members, channels
    if kind == "instancenorm":
        return nn.GroupNorm(m * c, m * c, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(m * c)
    if kind == "groupnorm":
        return nn.GroupNorm(4 * m, m * c, affine=True)
    if kind == "layernorm":
        return LayerNorm(c, hw[0], hw[1], members=m)
    if kind in ("none", "nonorm"):
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; expected instancenorm, batchnorm, layernorm, groupnorm or none")


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "sigmoid": nn.Sigmoid,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "swish": Swish,
}


def make_activation(kind: str) -> nn.Module:
    if kind not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {kind!r}; expected one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[kind]()


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2, 2)``, written for the compiler where that pays.

    Inside a graph ``torch.compile`` is tracing (on any device) the pool is a reshape and a mean over
    the 2x2 windows: inductor then fuses the preceding normalisation and activation into the pooling
    reduction, so their full-size output is never written (measured on an AMX CPU, one thread, bf16:
    a compiled MNIST ConvNet's forward and backward on 256 images 1.39x faster). In eager code the
    dedicated ``avg_pool2d`` kernel is faster (measured 1.4-1.6x for that layer), so it is kept there.
    Both compute the same function up to rounding; an odd last row or column is dropped, as
    ``AvgPool2d`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.avg_pool2d(x, 2, 2)
        n, c, h, w = x.shape
        h2, w2 = h // 2, w // 2
        if (h, w) != (2 * h2, 2 * w2):
            x = x[:, :, :2 * h2, :2 * w2]
        return x.reshape(n, c, h2, 2, w2, 2).mean((3, 5))


def make_pool(kind: str) -> nn.Module:
    if kind == "avgpooling":
        return AvgPool2x2()
    if kind == "maxpooling":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown pooling {kind!r}; expected avgpooling, maxpooling or none")


def mixes_images(model: nn.Module) -> bool:
    """Whether the network's output for one image depends on the other images of its batch (BatchNorm
    in train mode normalises with batch statistics); otherwise a batch may be split at will."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """(Re)initialise every parameter from ``generator`` with PyTorch's default distributions.

    Conv/linear: uniform(+-1/sqrt(fan_in)) for weights and biases; norm layers: weight 1, bias 0,
    running statistics reset. The global RNG is never used.
    """
    for mod in model.modules():
        if isinstance(mod, (Conv2d, Linear)):
            mod.reset_parameters(generator)
        elif isinstance(mod, (nn.GroupNorm, nn.BatchNorm2d, LayerNorm)):
            with torch.no_grad():
                if getattr(mod, "weight", None) is not None:
                    mod.weight.fill_(1.0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):  # pragma: no cover - guard for new models
            raise TypeError("use tinyset.models.layers.Conv2d/Linear so members and seeding work")
    return model
