"""fuse_for_inference: BatchNorm folding is exact for plain and factorized layers, and refuses training mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core.fuse import conv_bn_pairs, fuse_for_inference, last_layer


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model


def _strategy(name: str):
    return musco.default_registry().get("decompositions", name).strategy


def _factorized(name: str, conv: nn.Conv2d, rank):
    """The factorized layer: by ``compress`` for svd (cheap), else the structure from
    ``skeleton`` (no ALS / HOOI) with random weights: folding does not depend on them."""
    strategy = _strategy(name)
    if name == "svd":
        return strategy.compress(conv, rank, strategy.Params())[0]
    new = strategy.skeleton(conv, rank, strategy.Params())
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return new


def _check_exact(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = _randomize_bn(model).eval()
    with torch.no_grad():
        expected = model(x)
        fused = fuse_for_inference(model)
        got = fused(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    return fused


def test_conv_bn_relu_stack_is_fused_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12),
    )
    fused = _check_exact(model, torch.randn(4, 3, 12, 12))
    assert type(fused) is nn.Sequential and isinstance(fused[1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched by default


@pytest.mark.parametrize("name, rank", [("svd", 6), ("tucker2", (4, 6)), ("cp3", 6), ("cp4", 6)])
def test_factorized_layer_followed_by_bn_is_fused_exactly(name, rank):
    torch.manual_seed(0)
    kernel = 1 if name == "svd" else 3
    conv = nn.Conv2d(8, 12, kernel, padding=kernel // 2)
    model = nn.Sequential(_factorized(name, conv, rank), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 4, 1))
    pairs = conv_bn_pairs(model)
    assert len(pairs) == 1 and pairs[0][0].startswith("0.") and pairs[0][1] == "1"
    fused = _check_exact(model, torch.randn(2, 8, 10, 10))
    assert getattr(fused[0], "musco_decomposition", None) == name  # still factorized


def test_factorized_resnet_is_fused_exactly(tiny_resnet, example_inputs):
    """tucker2 on the kxk convs, svd on the 1x1 shortcuts, BatchNorms after both."""
    model = tiny_resnet
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and name != "stem":
            k = m.kernel_size[0]
            rank = max(1, m.out_channels // 2)
            new = _factorized("svd" if k == 1 else "tucker2", m, rank if k == 1 else (rank, rank))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    fused = _check_exact(model, example_inputs)
    assert len(conv_bn_pairs(model)) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert type(fused) is type(model)
    assert sum(hasattr(m, "musco_decomposition") for m in fused.modules()) == 5


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the Sequential scan takes over."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        if x.sum() > -1e30:  # always true, but fx cannot know
            return self.block(x)
        return x


def test_untraceable_models_fall_back_to_sequential_scan():
    torch.manual_seed(0)
    block = nn.Sequential(_factorized("svd", nn.Conv2d(8, 8, 1), 4), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = Untraceable(block)
    assert conv_bn_pairs(model) == [("block.0.second", "block.1"), ("block.2", "block.3")]
    _check_exact(model, torch.randn(2, 8, 6, 6))


def test_last_layer_of_factorized_modules():
    assert last_layer(_factorized("svd", nn.Conv2d(8, 8, 1), 4)) == "second"
    assert last_layer(_factorized("tucker2", nn.Conv2d(8, 8, 3), (4, 4))) == "last"
    assert last_layer(nn.Conv2d(2, 2, 1)) == ""
    assert last_layer(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())) is None


def test_shared_or_branching_convs_are_left_alone():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice: folding would change it

    model = _randomize_bn(Branch()).eval()
    assert conv_bn_pairs(model) == []
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(fuse_for_inference(model)(x), model(x))


def test_training_mode_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        fuse_for_inference(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="'1'"):
        fuse_for_inference(model)


def test_inplace_mutates_and_returns_the_model():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(1, 3, 5, 5)
    expected = model(x)
    assert fuse_for_inference(model, inplace=True) is model
    assert isinstance(model[1], nn.Identity)
    assert torch.allclose(model(x), expected, atol=1e-5)
