"""Public test kit for plugin authors: hypothesis strategies and conformance checks.

Decompositions: :func:`check_decomposition`, :func:`parametrize_with_checks`.
Rank rules: :func:`check_rank_rule`, and :func:`compare_rank_rules` to compare
a new rule with another (say ``vbmf``) on the same model; :func:`layer_for` makes
the :class:`~musco_core.Layer` a rule sees from a module and an input shape, and
:func:`planted_weight` a weight of known rank plus noise.
Policy kinds: :func:`check_statistic`, :func:`check_cost`, :func:`check_gate`,
:func:`check_refiner`.

::

    from musco_core.testing import check_decomposition, parametrize_with_checks

    check_decomposition(MyDecomposition())          # raises AssertionError listing failures

    @parametrize_with_checks([MyDecomposition()])   # one pytest case per check
    def test_conformance(decomposition, check):
        check(decomposition)

Needs ``hypothesis`` and (for :func:`parametrize_with_checks`) ``pytest``.
"""

from musco_core.testing.checks import (
    CHECKS,
    DEFAULT_LAYERS,
    check_compress_keeps_input,
    check_decomposition,
    check_factorized_module_class,
    check_flop_count,
    check_forward_equivalence,
    check_param_count,
    check_planted_recovery,
    check_rank_for_param_count,
    check_reconstruction_reference,
    check_recompression,
    check_supports_some_layer,
    check_validate_rank,
    cp3_reference,
    cp4_reference,
    parametrize_with_checks,
    svd_reference,
    tucker2_reference,
)
from musco_core.testing.data import DATA_LAYERS, anisotropic_inputs, check_data_aware
from musco_core.testing.kinds import check_cost, check_gate, check_refiner, check_statistic
from musco_core.testing.rank_rules import (
    RankComparison,
    check_rank_rule,
    compare_rank_rules,
    layer_for,
    planted_weight,
)
from musco_core.testing.strategies import (
    ConvConfig,
    LinearConfig,
    add_noise,
    conv_configs,
    cp_weight,
    cp_weights,
    linear_configs,
    low_rank_matrices,
    low_rank_matrix,
    noisy,
    seeds,
    tucker2_weight,
    tucker2_weights,
)

__all__ = [
    "check_factorized_module_class", "check_reconstruction_reference", "cp3_reference",
    "cp4_reference", "svd_reference", "tucker2_reference",
    "CHECKS", "DEFAULT_LAYERS", "ConvConfig", "LinearConfig", "RankComparison", "add_noise",
    "check_compress_keeps_input", "check_decomposition", "check_flop_count",
    "check_forward_equivalence", "check_param_count", "check_planted_recovery",
    "check_rank_for_param_count", "check_rank_rule", "check_recompression",
    "check_supports_some_layer", "compare_rank_rules", "layer_for", "planted_weight",
    "check_validate_rank", "conv_configs", "cp_weight", "cp_weights", "linear_configs",
    "low_rank_matrices", "low_rank_matrix", "noisy", "parametrize_with_checks", "seeds",
    "tucker2_weight", "tucker2_weights",
    "DATA_LAYERS", "anisotropic_inputs", "check_data_aware",
    "check_cost", "check_gate", "check_refiner", "check_statistic",
]
