"""Property tests of the svd decomposition (float64, planted data, norm-relative tolerances)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from musco_core import UnsupportedLayerError
from musco_std.svd import SVD, SVDConv1x1, SVDLinear

svd = SVD()
dims = st.integers(min_value=1, max_value=24)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-10) -> bool:
    """Equal up to ``rel`` times the size of ``expected`` (plus the same absolute slack)."""
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    return torch.allclose(actual, expected, rtol=0.0, atol=rel * scale)


def _matrix(seed: int, m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@given(m=dims, n=dims, seed=st.integers(0, 2**16))
def test_full_rank_reconstruction_is_exact(m, n, seed):
    w = _matrix(seed, m, n)
    approx = svd.reconstruct(svd.decompose(w, min(m, n)))
    assert torch.linalg.norm(w - approx) <= 1e-10 * torch.linalg.norm(w)


@given(m=dims, n=dims, seed=st.integers(0, 2**16), data=st.data())
def test_error_is_the_eckart_young_optimum(m, n, seed, data):
    w = _matrix(seed, m, n)
    rank = data.draw(st.integers(1, min(m, n)))
    approx = svd.reconstruct(svd.decompose(w, rank))
    dropped = torch.linalg.svdvals(w)[rank:]
    optimum = torch.linalg.norm(dropped)
    assert torch.isclose(torch.linalg.norm(w - approx), optimum,
                         atol=1e-10 * float(torch.linalg.norm(w)), rtol=1e-9)


@given(m=dims, n=dims, seed=st.integers(0, 2**16))
def test_error_is_non_increasing_in_rank(m, n, seed):
    w = _matrix(seed, m, n)
    errors = [torch.linalg.norm(w - svd.reconstruct(svd.decompose(w, r)))
              for r in range(1, min(m, n) + 1)]
    tol = 1e-10 * torch.linalg.norm(w)
    assert all(b <= a + tol for a, b in zip(errors, errors[1:]))


@given(m=st.integers(2, 24), n=st.integers(2, 24), seed=st.integers(0, 2**16), data=st.data())
def test_planted_low_rank_is_recovered(m, n, seed, data):
    rank = data.draw(st.integers(1, min(m, n) - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, rank, dtype=torch.float64, generator=g) @ torch.randn(
        rank, n, dtype=torch.float64, generator=g)
    approx = svd.reconstruct(svd.decompose(w, rank))
    assert torch.linalg.norm(w - approx) <= 1e-9 * torch.linalg.norm(w)


@given(n_in=dims, n_out=dims, bias=st.booleans(), batch=st.integers(1, 4),
       seed=st.integers(0, 2**16), data=st.data())
def test_linear_forward_equals_reconstructed_weight(n_in, n_out, bias, batch, seed, data):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    rank = data.draw(st.integers(1, min(n_in, n_out)))
    new, error = svd.compress(layer, rank, None)
    assert isinstance(new, SVDLinear) and new.rank == rank
    x = torch.randn(batch, 3, n_in, dtype=torch.float64)
    expected = F.linear(x, svd.weight(new), layer.bias)
    assert _close(new(x), expected)
    dense = svd.weight(layer)
    assert error == pytest.approx(
        float(torch.linalg.norm(dense - svd.weight(new)) / torch.linalg.norm(dense)), abs=1e-12)


@given(cin=dims, cout=dims, stride=st.integers(1, 3), padding=st.integers(0, 2),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       bias=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_conv1x1_forward_equals_reconstructed_weight(cin, cout, stride, padding, mode, bias,
                                                     seed, data):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 1, stride=stride, padding=padding, padding_mode=mode, bias=bias,
                     dtype=torch.float64)
    rank = data.draw(st.integers(1, min(cin, cout)))
    new, _ = svd.compress(conv, rank, None)
    assert isinstance(new, SVDConv1x1)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    reference = nn.Conv2d(cin, cout, 1, stride=stride, padding=padding, padding_mode=mode,
                          bias=bias, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(svd.weight(new).reshape(cout, cin, 1, 1))
        if bias:
            reference.bias.copy_(conv.bias)
    expected = reference(x)
    assert _close(new(x), expected)
    # At full rank the factorized layer computes the original layer.
    full, _ = svd.compress(conv, min(cin, cout), None)
    assert _close(full(x), conv(x), 1e-9)


@given(n_in=dims, n_out=dims, seed=st.integers(0, 2**16), data=st.data())
def test_recompression_truncates_further(n_in, n_out, seed, data):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, dtype=torch.float64)
    r1 = data.draw(st.integers(1, min(n_in, n_out)))
    r2 = data.draw(st.integers(1, r1))
    once, _ = svd.compress(layer, r1, None)
    twice, _ = svd.compress(once, r2, None)
    direct, _ = svd.compress(layer, r2, None)
    # Truncating a truncated SVD equals truncating directly (nested optimal subspaces).
    w = svd.weight(layer)
    assert torch.isclose(torch.linalg.norm(w - svd.weight(twice)),
                         torch.linalg.norm(w - svd.weight(direct)),
                         atol=1e-8 * float(torch.linalg.norm(w)))
    assert torch.equal(twice.second.bias, layer.bias)


@given(n_in=dims, n_out=dims, bias=st.booleans(), budget=st.integers(0, 2000))
def test_rank_for_param_count_is_the_largest_within_budget(n_in, n_out, bias, budget):
    layer = nn.Linear(n_in, n_out, bias=bias)
    rank = svd.rank_for_param_count(layer, budget)
    if rank is None:
        assert svd.param_count(layer, 1) > budget
    else:
        assert 1 <= rank <= min(n_in, n_out)
        assert svd.param_count(layer, rank) <= budget
        assert rank == min(n_in, n_out) or svd.param_count(layer, rank + 1) > budget


def test_param_and_flop_counts_match_the_built_module():
    from musco_core.stats import param_count, probe_module
    from musco_core.stats import LayerStats

    conv = nn.Conv2d(16, 24, 1, stride=2, padding=1)
    new, _ = svd.compress(conv, 5, None)
    flops, out = probe_module(new, (2, 16, 9, 9))
    stats = LayerStats((2, 16, 9, 9), out, param_count(conv), 0)
    assert svd.param_count(conv, 5) == param_count(new)
    assert svd.flop_count(conv, 5, stats) == flops


def test_grouped_and_kxk_convs_are_rejected_with_the_layer_name():
    with pytest.raises(UnsupportedLayerError, match=r"'features\.0'.*groups=2"):
        svd.check("features.0", nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(UnsupportedLayerError, match=r"kernel_size=\(3, 3\).*tucker2"):
        svd.check("features.1", nn.Conv2d(4, 4, 3))
    with pytest.raises(UnsupportedLayerError, match=r"does not support BatchNorm2d"):
        svd.check("bn", nn.BatchNorm2d(4))


def test_validate_rank_bounds():
    layer = nn.Linear(8, 5)
    assert svd.validate_rank(layer, 5) is None
    assert "outside 1..5" in svd.validate_rank(layer, 6)
    assert "outside 1..5" in svd.validate_rank(layer, 0)
    assert "not an int" in svd.validate_rank(layer, (2, 2))
