"""Every first-party decomposition on half types, non-finite weights, skeletons and TorchScript."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_std.cp import CP3, CP4, CPParams
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2

try:
    from musco_rsvd import RandomizedSVD
except ImportError:  # the contrib plugin is not installed
    RandomizedSVD = None

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_CP = CPParams(n_iter_max=10)


def _cases():
    """(decomposition, params, layer factory, round-1 rank, round-2 rank, input shape)."""
    cases = [
        (SVD(), None, lambda: nn.Linear(12, 10), 6, 3, (2, 12)),
        (SVD(), None, lambda: nn.Conv2d(8, 10, 1, stride=2), 5, 2, (2, 8, 6, 6)),
        (Tucker2(), None, lambda: nn.Conv2d(6, 8, 3, padding=1), (4, 5), (2, 3), (2, 6, 6, 6)),
        (CP3(), FAST_CP, lambda: nn.Conv2d(6, 8, 3, padding=1), 6, 3, (2, 6, 6, 6)),
        (CP4(), FAST_CP, lambda: nn.Conv2d(6, 8, (3, 2), padding=1), 6, 3, (2, 6, 6, 6)),
    ]
    if RandomizedSVD is not None:
        cases.append((RandomizedSVD(), None, lambda: nn.Linear(12, 10), 6, 3, (2, 12)))
    return cases


CASES = _cases()
IDS = [f"{c[0].name}-{type(c[2]()).__name__}" for c in CASES]


def _params(decomposition, params):
    return params if params is not None else decomposition.Params()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_half_precision_layers_compress_run_and_recompress(decomposition, params, make, rank,
                                                           rank2, shape, dtype):
    torch.manual_seed(0)
    dense = make()
    module = make().to(dtype)
    with torch.no_grad():
        module.load_state_dict({k: v.to(dtype) for k, v in dense.state_dict().items()})
    params = _params(decomposition, params)
    x = torch.randn(shape)

    new, error = decomposition.compress(module, rank, params)
    assert {p.dtype for p in new.parameters()} == {dtype}
    assert 0 <= error < 1
    # The error is that of the same decomposition in float32, up to the half-type rounding.
    _, error32 = decomposition.compress(dense, rank, params)
    assert abs(error - error32) < 0.05
    with torch.no_grad():
        y = new(x.to(dtype))
    assert y.dtype == dtype and bool(torch.isfinite(y).all())

    decomposition.check("layer", new)
    again, error2 = decomposition.compress(new, rank2, params)
    assert {p.dtype for p in again.parameters()} == {dtype}
    assert 0 <= error2 < 1
    with torch.no_grad():
        assert bool(torch.isfinite(again(x.to(dtype))).all())
    # Rank rules read rank_matrices: real, finite matrices in a dtype linalg supports.
    for m in decomposition.rank_matrices(new):
        assert m.dtype == torch.float32 and bool(torch.isfinite(m).all())
        torch.linalg.svdvals(m)


@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_float64_layers_are_decomposed_in_float64(decomposition, params, make, rank, rank2,
                                                  shape):
    module = make().double()
    new, _ = decomposition.compress(module, rank, _params(decomposition, params))
    assert {p.dtype for p in new.parameters()} == {torch.float64}
    for m in decomposition.rank_matrices(new):
        assert m.dtype == torch.float64


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_non_finite_weights_are_refused(decomposition, params, make, rank, rank2, shape, bad):
    module = make()
    with torch.no_grad():
        module.weight.view(-1)[3] = bad
    with pytest.raises(ValueError, match="weight has non-finite values"):
        decomposition.compress(module, rank, _params(decomposition, params))


@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_non_finite_factorized_layers_are_refused_in_round_two(decomposition, params, make,
                                                               rank, rank2, shape):
    new, _ = decomposition.compress(make(), rank, _params(decomposition, params))
    with torch.no_grad():
        new.first.weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        decomposition.compress(new, rank2, _params(decomposition, params))


def test_factors_that_overflow_the_layer_dtype_are_refused():
    class Overflowing(SVD):  # factors finite in float32, not in the layer's float16
        def decompose(self, weight, rank, params=None):
            first, second = super().decompose(weight.float(), rank)
            return (first * 1e6).to(weight.dtype), (second / 1e6).to(weight.dtype)

    module = nn.Linear(4, 4, bias=False).half()
    with pytest.raises(ValueError, match="factor 0 .* non-finite values"):
        Overflowing().compress(module, 2, None)


def test_the_engine_names_the_layer_of_a_non_finite_weight():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=2))])
    c = musco.Compressor(model, spec, example_inputs=torch.randn(2, 8), inplace=True)
    with pytest.raises(musco.CompressionError, match="layer '0'.*non-finite"):
        c.step()
    assert isinstance(model[0], nn.Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (k == "0.weight")


# -- skeletons ------------------------------------------------------------------------------


@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_skeleton_is_built_from_shapes_alone(decomposition, params, make, rank, rank2, shape,
                                             monkeypatch):
    params = _params(decomposition, params)
    module = make()
    built, _ = decomposition.compress(module, rank, params)
    again, _ = decomposition.compress(built, rank2, params)

    def refuse(*args, **kwargs):
        raise AssertionError("skeleton() must not decompose")

    for name in ("decompose", "compress"):
        monkeypatch.setattr(decomposition, name, refuse)
    for source, r, want in ((module, rank, built), (built, rank2, again)):
        for device in ("cpu", "meta"):
            skeleton = decomposition.skeleton(copy.deepcopy(source).to(device), r, params)
            assert type(skeleton) is type(want)
            got = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
            assert got == {k: (tuple(v.shape), v.dtype) for k, v in want.state_dict().items()}
            assert all(p.device.type == device for p in skeleton.parameters())
        # the skeleton takes the built module's weights and computes the same thing
        skeleton = decomposition.skeleton(source, r, params)
        skeleton.load_state_dict(want.state_dict())
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(skeleton(x), want(x))


def test_skeleton_of_a_meta_model_conv():
    with torch.device("meta"):
        conv = nn.Conv2d(256, 512, 3, stride=2, padding=1)
    skeleton = Tucker2().skeleton(conv, (128, 256), None)
    assert skeleton.core.weight.shape == (256, 128, 3, 3)
    assert skeleton.core.weight.is_meta and skeleton.core.stride == (2, 2)
    skeleton = CP4().skeleton(conv, 300, None)
    assert skeleton.vertical.weight.shape == (300, 1, 3, 1)
    assert skeleton.last.bias.shape == (512,) and skeleton.last.bias.is_meta


# -- TorchScript ------------------------------------------------------------------------------


@pytest.mark.parametrize("decomposition, params, make, rank, rank2, shape", CASES, ids=IDS)
def test_factorized_modules_can_be_scripted(decomposition, params, make, rank, rank2, shape):
    new, _ = decomposition.compress(make(), rank, _params(decomposition, params))
    scripted = torch.jit.script(new)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(scripted(x), new(x))
