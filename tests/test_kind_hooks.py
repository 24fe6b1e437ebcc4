"""The registration hooks of the policy kinds: first-party names, third-party additions, type checks."""

from __future__ import annotations

import pytest
from torch import nn

import musco_core as musco


def _registry_with(hook_name, strategy):
    class Plugin:
        pass

    def hook(register):
        register(strategy)

    setattr(Plugin, hook_name, staticmethod(musco.hookimpl(specname=hook_name)(hook)))
    registry = musco.Registry()
    registry.register_plugin(Plugin(), name="test-kind-plugin")
    return registry


def _check_kind(hook_name, kind, first_party, strategy):
    assert set(first_party) <= set(musco.default_registry().names(kind))
    registry = _registry_with(hook_name, strategy)
    entry = registry.get(kind, strategy.name)
    assert entry.strategy is strategy
    rows = {row["name"] for row in registry.available()[kind]}
    assert strategy.name in rows and set(first_party) <= rows
    with pytest.raises(musco.PluginError, match="must be an instance of musco_core"):
        _registry_with(hook_name, object()).entries  # noqa: B018 - collecting registers


class _Stat(musco.Statistic):
    name = "test_row_count"

    def update(self, state, batch):
        return (state or 0) + batch.rows.shape[0]


class _Refiner(musco.Refiner):
    name = "test_noop"

    def objective(self, modules, context, params):
        return 0.0

    def refine(self, modules, context, params):
        pass


class _Cost(musco.Cost):
    name = "test_unit"

    def layer(self, layer, rank, context):
        return 1.0

    def model(self, context):
        return 1.0


class _Gate(musco.GateStrategy):
    name = "test_pass"


class _Formula(musco.FlopFormula):
    name = "test_identity"
    module_types = (nn.Identity,)

    def flops(self, module, args, kwargs):
        return 0


def test_musco_add_statistics():
    _check_kind("musco_add_statistics", "statistics",
                ["input_gram", "cross_moment", "target_gram"], _Stat())


def test_musco_add_refiners():
    _check_kind("musco_add_refiners", "refiners", ["layer_output", "model_output"], _Refiner())


def test_musco_add_costs():
    _check_kind("musco_add_costs", "costs", ["flops", "params", "latency"], _Cost())


def test_musco_add_gates():
    _check_kind("musco_add_gates", "gates", ["min_speedup", "round_by_speed"], _Gate())


def test_musco_add_flop_formulas():
    _check_kind("musco_add_flop_formulas", "flop_formulas",
                ["recurrent", "multihead_attention"], _Formula())


def test_a_third_party_statistic_name_clash_is_refused():
    class Clash(_Stat):
        name = "input_gram"

    with pytest.raises(musco.PluginError, match="statistic name 'input_gram' registered twice"):
        _registry_with("musco_add_statistics", Clash()).entries  # noqa: B018
