"""musco_core.testing: our decompositions pass the conformance kit; broken ones fail it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from torch import nn

from musco_core.testing.checks import (
    check_factorized_module_class,
    check_reconstruction_reference,
    cp3_reference,
    cp4_reference,
    svd_reference,
    tucker2_reference,
)
from musco_core.testing import (
    CHECKS,
    DEFAULT_LAYERS,
    ConvConfig,
    check_decomposition,
    check_flop_count,
    check_forward_equivalence,
    check_param_count,
    conv_configs,
    cp_weight,
    linear_configs,
    low_rank_matrices,
    noisy,
    parametrize_with_checks,
    tucker2_weights,
)
from musco_std.cp import CP3, CP4, CPParams
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2

#: CP-ALS is iterative: the planted check plants a well-conditioned CP
#: (cp_weight) at small ranks and at the full rank, with more sweeps.
CP_OPTIONS = {
    "params": CPParams(n_iter_max=10),
    "planted_params": CPParams(n_iter_max=150, tol=1e-13),
    "plant": lambda shape, rank, seed: cp_weight(shape, rank, seed=seed),
    "planted_ranks": lambda d, m: [1, 2, d.full_rank(m)],
    "planted_rtol": 1e-6,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@parametrize_with_checks([(SVD(), {"reference": svd_reference}),
                          (Tucker2(), {"reference": tucker2_reference}),
                          (CP3(), {**CP_OPTIONS, "reference": cp3_reference}),
                          (CP4(), {**CP_OPTIONS, "reference": cp4_reference})])
def test_first_party_decompositions_conform(decomposition, check):
    check(decomposition)


def test_parametrize_with_checks_names_the_cases():
    mark = parametrize_with_checks([SVD()])
    names = mark.kwargs["ids"]
    assert names == [f"svd-{c.__name__}" for c in CHECKS]


class WrongParamCount(Tucker2):
    name = "wrong_params"

    def param_count(self, module, rank):
        return super().param_count(module, rank) + 1


class DropsBias(SVD):
    name = "drops_bias"

    def build(self, module, factors):
        new = super().build(module, factors)
        if new.second.bias is not None:
            with torch.no_grad():
                new.second.bias.zero_()
        return new


class ForgetsStride(Tucker2):
    """Builds the core conv without the layer's stride: output shape and FLOPs are wrong."""

    name = "forgets_stride"

    def build(self, module, factors):
        new = super().build(module, factors)
        new.core.stride = (1, 1)
        return new


class MutatesInput(SVD):
    name = "mutates_input"

    def compress(self, module, rank, params):
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.mul_(2)
        return super().compress(module, rank, params)


class BareSequential(SVD):
    """Builds the two factor layers as an anonymous ``nn.Sequential``."""

    name = "bare_sequential"

    def build(self, module, factors):
        new = super().build(module, factors)
        return nn.Sequential(new.first, new.second)


@pytest.mark.parametrize("broken, failing", [
    (BareSequential(), ["check_factorized_module_class"]),
    (WrongParamCount(), ["check_param_count"]),
    (DropsBias(), ["check_forward_equivalence"]),
    (ForgetsStride(), ["check_flop_count", "check_forward_equivalence"]),
    (MutatesInput(), ["check_compress_keeps_input"]),
])
def test_broken_decompositions_fail_the_kit(broken, failing):
    layers = {k: DEFAULT_LAYERS[k] for k in ("linear", "conv3x3", "conv3x2_stride_dilation")}
    with pytest.raises(AssertionError) as info:
        check_decomposition(broken, layers=layers)
    for name in failing:
        assert name in str(info.value)


def test_single_checks_name_layer_and_rank():
    with pytest.raises(AssertionError, match=r"wrong_params on 'conv3x3' at rank \(1, 1\)"):
        check_param_count(WrongParamCount())
    with pytest.raises(AssertionError, match=r"forgets_stride on 'conv3x2_stride_dilation'"):
        check_flop_count(ForgetsStride())
    with pytest.raises(AssertionError, match="drops_bias on 'linear'"):
        check_forward_equivalence(DropsBias())


def test_a_bare_sequential_is_caught_naming_the_layer():
    with pytest.raises(AssertionError, match="bare_sequential on 'linear': compress returned a "
                                             "bare torch.nn.modules.container.Sequential"):
        check_factorized_module_class(BareSequential())


def test_a_reconstruct_that_disagrees_with_tensorly_is_caught():
    class ScaledReconstruct(SVD):
        name = "scaled_reconstruct"

        def reconstruct(self, factors):
            return 1.01 * super().reconstruct(factors)

    with pytest.raises(AssertionError, match="reconstruct against the reference"):
        check_reconstruction_reference(ScaledReconstruct(), reference=svd_reference)
    with pytest.raises(AssertionError, match="reconstruct against the reference"):
        check_reconstruction_reference(TransposedCP3(), reference=cp3_reference,
                                       params=CPParams(n_iter_max=3))


class TransposedCP3(CP3):
    """reconstruct reads the depthwise kernel flipped: disagrees with tensorly."""

    name = "transposed_cp3"

    def reconstruct(self, factors):
        first, depthwise, last = factors
        flipped = depthwise.flip(-1).flip(-2)
        return torch.einsum("or,rhw,ri->oihw", last, flipped, first)


def test_a_decomposition_without_supported_layers_fails():
    class LinearOnly(SVD):
        name = "linear_only"
        module_types = (nn.Linear,)

    with pytest.raises(AssertionError, match="accepts none of the test layers"):
        check_decomposition(LinearOnly(), layers={"conv": ConvConfig(3, 4, (3, 3))})


# -- the strategies ---------------------------------------------------------------------


@given(config=conv_configs())
def test_conv_configs_give_runnable_layers(config):
    module = config.module()
    y = module(config.input())
    assert y.dtype == torch.float64 and y.numel() > 0
    if config.padding == "same":
        assert config.stride == (1, 1)


@given(config=linear_configs())
def test_linear_configs_give_runnable_layers(config):
    assert config.module()(config.input()).shape[-1] == config.out_features


@given(weight=tucker2_weights((6, 5, 3, 3), (2, 3)))
def test_planted_tucker2_has_its_multilinear_rank(weight):
    assert weight.dtype == torch.float64
    assert torch.linalg.matrix_rank(weight.reshape(6, -1)) == 3
    assert torch.linalg.matrix_rank(weight.transpose(0, 1).reshape(5, -1)) == 2


@given(matrix=low_rank_matrices((7, 5), 2))
def test_planted_matrix_has_its_rank(matrix):
    assert torch.linalg.matrix_rank(matrix) == 2


@given(weight=noisy(low_rank_matrices((7, 5), 2), 0.1))
def test_noise_has_the_requested_relative_level(weight):
    assert torch.linalg.matrix_rank(weight) == 5


# -- the documentation example runs -----------------------------------------------------


def test_docs_example_testing_your_own_decomposition():
    doc = (Path(__file__).parents[1] / "docs" / "decompositions.md").read_text()
    section = doc.split("## Testing your own decomposition", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, "docs/decompositions.md", "exec"), namespace)
    namespace["test_gram_svd"](namespace["GramSVD"](), check_decomposition)
