import pytest
import torch

from tinyset.errors import ConfigError
from tinyset.models import MODELS, create_model, extract_member, stack_members

SHAPES = [(1, 28), (3, 32), (1, 8)]
# architectures that need images larger than 8x8
NEEDS_LARGE = {"lenet", "vgg11", "vgg11-bn", "convnet-d4", "convnet-d5"}


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels,size", SHAPES)
def test_every_model_output_shape(name, channels, size):
    if size == 8 and name in NEEDS_LARGE:
        with pytest.raises(ConfigError):
            create_model(name, channels, 10, size)
        return
    model = create_model(name, channels, 10, size)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 10)
    emb = model.embed(x)
    assert emb.shape == (2, model.feature_dim)
    assert model.classifier(emb).shape == (2, 10)


def test_convnet_reference_semantics():
    m = create_model("convnet", 1, 10, 28)
    convs = [l for l in m.features if l.__class__.__name__ == "Conv2d"]
    assert [c.padding for c in convs] == [3, 1, 1]  # 28x28 treated as 32x32
    norms = [l for l in m.features if isinstance(l, torch.nn.GroupNorm)]
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)  # instancenorm
    assert m.feature_dim == 128 * 4 * 4
    assert create_model("convnet", 3, 10, 32).feature_dim == 2048
    assert sum(p.numel() for p in m.parameters()) == (
        (9 * 128 + 128) + 2 * (128 * 128 * 9 + 128) + 3 * 2 * 128 + 2048 * 10 + 10)


def test_convnet_frepo_doubles_the_width_per_block():
    m = create_model("convnet-frepo", 1, 10, 28)
    convs = [l for l in m.features if l.__class__.__name__ == "Conv2d"]
    assert [(c.cin, c.cout) for c in convs] == [(1, 128), (128, 256), (256, 512)]
    assert [c.padding for c in convs] == [3, 1, 1] and all(c.bias is not None for c in convs)
    assert not [l for l in m.features if isinstance(l, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert m.feature_dim == 512 * 4 * 4 and m.config["widen"] == 2  # 8192 features, as FRePo's Conv at 32x32
    x = torch.randn(2, 1, 28, 28)
    blocks = m.block_outputs(x)
    assert [b.shape[1] for b in blocks[:-1]] == [128, 256, 512] and torch.equal(blocks[-1], m.embed(x))
    narrow = create_model("convnet-frepo", 3, 10, 32, width=16)
    assert narrow.feature_dim == 64 * 4 * 4
    assert "widen" not in create_model("convnet", 1, 10, 28).config  # unchanged for the constant-width family
    with pytest.raises(ConfigError, match="widen"):
        create_model("convnet", 1, 10, 28, widen=0)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_instancenorm_cancels_conv_bias_exactly(compiled):
    """The conv bias before an InstanceNorm is skipped: same function as adding it, zero gradient."""
    import torch.nn.functional as F

    torch.set_num_threads(2)
    m = create_model("convnet", 1, 10, 28, seed=0)
    with torch.no_grad():
        for p in m.parameters():  # make biases and norm affines large so a wrong path would show
            if p.dim() == 1:
                p.uniform_(-2, 2)
    x = torch.randn(3, 1, 28, 28)

    def reference(x):  # the reference ConvNet, written out with torch.nn.functional
        h = x
        for conv, norm in [(m.features[i], m.features[i + 1]) for i in (0, 4, 8)]:
            h = F.conv2d(h, conv.weight, conv.bias, padding=conv.padding)
            h = F.avg_pool2d(F.relu(F.group_norm(h, 128, norm.weight, norm.bias)), 2)
        return F.linear(h.flatten(1), m.classifier.weight[0], m.classifier.bias[0])

    fwd = torch.compile(m, dynamic=False) if compiled else m
    out = fwd(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    convs = [m.features[i] for i in (0, 4, 8)]
    assert all(c.bias_cancelled for c in convs)
    for c in convs:  # exactly zero, not None: SGD's weight decay still applies as in the reference
        assert c.bias.grad is not None and torch.equal(c.bias.grad, torch.zeros_like(c.bias))
    assert convs[1].weight.grad.abs().sum() > 0
    for name in ("convnet-bn", "convnet-gn", "convnet-ln", "convnet-nn"):
        net = create_model(name, 1, 10, 28)
        assert not any(getattr(l, "bias_cancelled", False) for l in net.modules()), name


def test_same_seed_same_weights_and_no_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = create_model("convnet", 1, 10, 28, seed=7)
    b = create_model("convnet", 1, 10, 28, seed=7)
    c = create_model("convnet", 1, 10, 28, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_default_init_distribution():
    m = create_model("convnet", 1, 10, 28, seed=1)
    w = m.features[4].weight  # second conv, fan_in 128*9
    bound = 1 / (128 * 9) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


@pytest.mark.parametrize("name", ["convnet", "convnet-bn", "convnet-ln", "convnet-frepo", "mlp", "lenet", "resnet18-bn",
                                  "alexnet"])
def test_ensemble_members_equal_separate_networks(name):
    torch.set_num_threads(2)
    size = 28
    ens = create_model(name, 1, 5, size, members=3, seed=3)
    x = torch.randn(4, 3, size, size)  # a different batch per member
    out = ens(x)
    assert out.shape == (4, 3, 5)
    for m in range(3):
        single = extract_member(ens, m)
        ref = single(x[:, m:m + 1])
        torch.testing.assert_close(out[:, m], ref, rtol=1e-4, atol=1e-4)


def test_ensemble_gradients_equal_separate_training():
    ens = create_model("convnet", 1, 4, 8, members=2, seed=0)
    singles = [extract_member(ens, m) for m in range(2)]
    x = torch.randn(6, 2, 8, 8)
    y = torch.randint(0, 4, (6, 2))
    loss = sum(torch.nn.functional.cross_entropy(ens(x)[:, m], y[:, m]) for m in range(2))
    loss.backward()
    for m, s in enumerate(singles):
        torch.nn.functional.cross_entropy(s(x[:, m:m + 1]), y[:, m]).backward()
    w = ens.features[0].weight.grad
    torch.testing.assert_close(w[:128], singles[0].features[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w[128:], singles[1].features[0].weight.grad, rtol=1e-4, atol=1e-5)
    stacked = stack_members(singles)
    torch.testing.assert_close(stacked(x), ens(x))


def test_unknown_model_lists_known():
    with pytest.raises(ConfigError, match="convnet"):
        create_model("convnett", 1, 10, 28)


def test_wrong_channels_is_clear():
    m = create_model("convnet", 1, 10, 28)
    with pytest.raises(ConfigError, match="expects 1 channels"):
        m(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_avgpool2x2_is_avgpool2d_in_eager_and_compiled_code(hw):
    """The ConvNet's pool: the dedicated kernel in eager code (bit-identical to nn.AvgPool2d), a
    reshape-mean inside compiled graphs (same values and gradients up to rounding; an odd last row or
    column dropped, as AvgPool2d does)."""
    from tinyset.models.layers import AvgPool2x2

    x = torch.randn(3, 4, *hw, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = torch.nn.AvgPool2d(2, 2)(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    pool = AvgPool2x2()
    assert torch.equal(pool(x), ref)
    compiled = torch.compile(pool, backend="eager", fullgraph=True)(x)
    assert compiled.shape == ref.shape == (3, 4, hw[0] // 2, hw[1] // 2)
    torch.testing.assert_close(compiled, ref, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


def test_convnet_pools_with_avgpool2x2():
    from tinyset.models.layers import AvgPool2x2

    net = create_model("convnet", 1, 10, 28)
    assert sum(isinstance(m, AvgPool2x2) for m in net.modules()) == 3
