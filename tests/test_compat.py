"""musco_core.compat: the seed's compressors, on the one engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core.compat import CompressorManual, CompressorPR, CompressorVBMF

from conftest import TinyResNet


def test_manual_ranks_and_skips(tiny_resnet, example_inputs):
    names = [n for n, m in tiny_resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ranks = {n: None for n in names}
    ranks.update({"fc": 4, "layer2.conv2": (4, 4)})
    compressor = CompressorManual(tiny_resnet, example_inputs, ranks=ranks, ft_every=1,
                                  conv2d_nn_decomposition="tucker2")
    steps = 0
    while not compressor.done:
        compressor.compression_step()
        steps += 1
    assert steps == 2
    assert compressor.ranks == {"layer2.conv2": (4, 4), "fc": 4}
    model = compressor.compressed_model
    assert type(model.fc).__name__ == "SVDLinear"
    assert type(model.layer2.conv2).__name__ == "Tucker2Conv2d"
    assert isinstance(tiny_resnet.fc, nn.Linear)


def test_manual_needs_a_rank_for_every_compressed_layer(tiny_resnet, example_inputs):
    with pytest.raises(ValueError, match="needs a rank for every compressed layer"):
        CompressorManual(tiny_resnet, example_inputs, ranks={"fc": 4})


def test_pr_rates_and_rounds(tiny_resnet, example_inputs):
    names = [n for n, m in tiny_resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ranks = {n: None for n in names if n not in ("fc", "classifier")}
    compressor = CompressorPR(tiny_resnet, example_inputs, ranks=ranks, ft_every=2,
                              nglobal_compress_iters=2, param_reduction_rates={"fc": 1.5})
    assert compressor.compressor.spec.rounds == 2 and compressor.compressor.spec.layers_per_step == 2
    reports = []
    while not compressor.done:
        reports.append(compressor.compression_step())
    fc = [layer for r in reports for layer in r.layers if layer.name == "fc"]
    assert [x.round for x in fc] == [1, 2]
    assert fc[0].params_after * 1.5 <= fc[0].params_before
    classifier = [layer for r in reports for layer in r.layers if layer.name == "classifier"]
    assert classifier[0].params_after * 2 <= classifier[0].params_before


def test_vbmf_defaults_to_tucker2_and_weakening_08(tiny_resnet, example_inputs):
    compressor = CompressorVBMF(tiny_resnet, example_inputs, ft_every=3,
                                vbmf_weakenen_factors={"fc": 0.5})
    rules = compressor.compressor.spec.rules
    assert {r.decomposition.name for r in rules} == {"tucker2", "svd"}
    assert all(r.rank.params["weakening"] == 0.8 for r in rules)
    assert any(r.rank.params["weakenings"] == {"fc": 0.5} for r in rules)
    while not compressor.done:
        compressor.compression_step()
    assert compressor.compressed_model(example_inputs).shape == (2, 10)


def test_flopco_like_stats_and_unsupported_arguments():
    class FlopCoLike:
        img_size = (1, 3, 16, 16)

    model = TinyResNet()
    CompressorPR(model, FlopCoLike())
    with pytest.raises(TypeError, match="needs example inputs"):
        CompressorPR(model)
    with pytest.raises(TypeError, match="all_algo_kwargs is not supported"):
        CompressorPR(model, FlopCoLike(), all_algo_kwargs={"cp3": {}})
    with pytest.raises(ValueError, match="not Conv2d/Linear layers of the model: \\['nope'\\]"):
        CompressorPR(model, FlopCoLike(), ranks={"nope": None})


def test_grouped_convs_are_skipped_with_a_warning():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    with pytest.warns(UserWarning, match="not compressed: layer '1'.*groups"):
        compressor = CompressorPR(model, torch.randn(1, 4, 8, 8))
    assert compressor.compressor.plan.entry("1").status == "excluded"
    assert isinstance(compressor.compressor, musco.Compressor)


@pytest.mark.parametrize("cls, kwargs, message", [
    (CompressorPR, {"ft_evry": 2},
     r"CompressorPR\(\) got an unexpected keyword argument 'ft_evry'; did you mean 'ft_every'\? "
     r"valid keywords: .*nglobal_compress_iters.*param_reduction_rates"),
    (CompressorVBMF, {"vbmf_weakening_factors": {}},
     r"CompressorVBMF\(\) got an unexpected keyword argument 'vbmf_weakening_factors'; "
     r"did you mean 'vbmf_weakenen_factors'\?"),
    (CompressorPR, {"vbmf_weakenen_factors": {}},  # another compressor's keyword
     r"CompressorPR\(\) got an unexpected keyword argument 'vbmf_weakenen_factors'"),
    (CompressorManual, {"param_reduction_rates": {}},
     r"CompressorManual\(\) got an unexpected keyword argument 'param_reduction_rates'"),
])
def test_misspelled_keywords_are_type_errors(cls, kwargs, message):
    model = TinyResNet()
    with pytest.raises(TypeError, match=message):
        cls(model, torch.randn(1, 3, 16, 16), **kwargs)


def test_skipping_every_layer_says_nothing_is_left_to_compress(tiny_resnet, example_inputs):
    ranks = {n: None for n, m in tiny_resnet.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    with pytest.raises(ValueError, match="no layer is left to compress"):
        CompressorManual(tiny_resnet, ranks=ranks, example_inputs=example_inputs)
