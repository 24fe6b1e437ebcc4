"""The ``budget`` rank rule: model-level targets, floors, limits, damage-driven allocation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from torch import nn

import musco_core as musco
from musco_core import RankRule, Rule, Spec, SpecError
from musco_core.limits import RankLimits
from musco_core.plan import resolve_rules
from musco_core.strategies import rank_tuple
from musco_core.testing.rank_rules import layer_for
from musco_std.budget import Budget, BudgetParams, SensitivityTable, allocate
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2

RULE = Budget()


class FakeContext:
    """A RoundContext stand-in (the protocol budget uses): exact FLOP/param counts, synthetic latency and damage.

    Damage of a rank is ``sensitivity * mean_i (1 - r_i / full_i)^2`` (0 for ``None``).
    Latency is a launch cost per module plus FLOPs over a throughput, so factorizing
    adds kernels: a rank must save enough FLOPs to pay for them.
    """

    LAUNCH = 2e-6
    THROUGHPUT = 1e10

    def __init__(self, decomposition, limits: RankLimits = RankLimits(), sensitivity=None):
        self.decomposition = decomposition
        self.limits = limits
        self.sensitivity = sensitivity or {}
        self.damage_calls: list[tuple[str, list]] = []
        self.records: dict[str, SensitivityTable] = {}

    def cost(self, layer, rank, metric):
        dec, module = self.decomposition, layer.module
        if metric == "params":
            return layer.stats.params if rank is None else dec.param_count(module, rank)
        flops = layer.stats.flops if rank is None else dec.flop_count(module, rank, layer.stats)
        if metric == "flops":
            return flops
        assert metric == "latency", metric
        modules = 1 if rank is None else 1 + len(rank_tuple(rank))
        return modules * self.LAUNCH + flops / self.THROUGHPUT

    def limit(self, layer, rank):
        return self.limits.apply(rank, self.decomposition.full_rank(layer.module), RULE.rounding)

    def damage(self, layer, ranks):
        self.damage_calls.append((layer.name, list(ranks)))
        full = rank_tuple(self.decomposition.full_rank(layer.module))
        s = self.sensitivity.get(layer.name, 1.0)
        return [s * sum((1 - r / f) ** 2 for r, f in zip(rank_tuple(rank), full)) / len(full)
                for rank in ranks]

    def rest_cost(self, metric, layers):
        return 0.0

    def progress(self, iterable, desc):
        return iterable

    def record(self, name, table):
        self.records[name] = table


def resnet_like():
    """3x3 convs of a small ResNet (tucker2): widths 32..128, strides, shrinking maps."""
    shapes = [(32, 32, 1, 16), (32, 64, 2, 16), (64, 64, 1, 8), (64, 128, 2, 8),
              (128, 128, 1, 4), (128, 128, 1, 4)]
    return [layer_for(f"conv{i}", nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False),
                      (1, cin, hw, hw))
            for i, (cin, cout, s, hw) in enumerate(shapes)]


def transformer_like(blocks: int = 2):
    """Linear layers of small transformer blocks (svd): q, k, v, o 64x64, FFN 64x256, 256x64."""
    layers = []
    for b in range(blocks):
        for name, (i, o) in [("q", (64, 64)), ("k", (64, 64)), ("v", (64, 64)), ("o", (64, 64)),
                             ("up", (64, 256)), ("down", (256, 64))]:
            layers.append(layer_for(f"block{b}.{name}", nn.Linear(i, o), (16, i)))
    return layers


def sensitivities(layers):
    """Deterministic, uneven sensitivities (0.5 .. 8)."""
    return {layer.name: 0.5 * 2 ** (i % 5) for i, layer in enumerate(layers)}


CASES = {"resnet": (resnet_like, Tucker2()), "transformer": (transformer_like, SVD())}


def run(case, limits=RankLimits(), **params):
    build, decomposition = CASES[case]
    layers = build()
    context = FakeContext(decomposition, limits, sensitivities(layers))
    ranks = RULE.select_joint(layers, decomposition, BudgetParams(**params), context)
    return layers, ranks, context


def totals(layers, ranks, context, metric):
    before = sum(context.cost(layer, None, metric) for layer in layers)
    after = sum(context.cost(layer, ranks[layer.name], metric) for layer in layers)
    return before, after


def assert_hits(before, after, target, tolerance=0.02):
    """At most ``before / target``, and within ``tolerance`` of it (not far below)."""
    budget = before / target
    assert after <= budget * (1 + 1e-9), f"over budget: {before / after:.4f}x < {target}x"
    assert after >= budget * (1 - tolerance), f"far below: {before / after:.4f}x for {target}x"


# -- targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["resnet", "transformer"])
@pytest.mark.parametrize("target,metric", [("flop_reduction", "flops"),
                                           ("param_reduction", "params")])
@pytest.mark.parametrize("value", [1.5, 2.0, 3.0])
def test_hits_the_flop_and_param_target(case, target, metric, value):
    layers, ranks, context = run(case, **{target: value})
    assert set(ranks) == {layer.name for layer in layers}
    assert_hits(*totals(layers, ranks, context, metric), value)
    table = context.records["budget"]
    assert table.ranks() == ranks
    assert table.value == value and table.metric == metric
    assert table.reduction == pytest.approx(
        table.cost_before / sum(context.cost(l, ranks[l.name], metric) for l in layers))


@pytest.mark.parametrize("case", ["resnet", "transformer"])
@pytest.mark.parametrize("value", [1.3, 2.0])
def test_latency_target_with_a_synthetic_latency_table(case, value):
    layers, ranks, context = run(case, latency_reduction=value)
    assert_hits(*totals(layers, ranks, context, "latency"), value)
    for layer in layers:  # no compressed layer is slower than the layer it replaces
        rank = ranks[layer.name]
        if rank is not None:
            assert context.cost(layer, rank, "latency") < context.cost(layer, None, "latency")


@pytest.mark.parametrize("case", ["resnet", "transformer"])
@pytest.mark.parametrize("min_fraction", [0.1, 0.25])
def test_no_layer_below_its_floor_even_near_the_largest_reachable_target(case, min_fraction):
    build, decomposition = CASES[case]
    layers = build()
    context = FakeContext(decomposition, sensitivity=sensitivities(layers))
    with pytest.raises(ValueError, match=r"reach at most [\d.]+x") as info:
        RULE.select_joint(layers, decomposition,
                          BudgetParams(flop_reduction=100.0, min_fraction=min_fraction), context)
    reach = float(str(info.value).split("reach at most ")[1].split("x")[0])
    ranks = RULE.select_joint(layers, decomposition,
                              BudgetParams(flop_reduction=0.98 * reach,
                                           min_fraction=min_fraction), context)
    for layer in layers:
        full = rank_tuple(decomposition.full_rank(layer.module))
        rank = ranks[layer.name]
        assert rank is not None
        for r, f in zip(rank_tuple(rank), full):
            assert r >= math.ceil(min_fraction * f), (layer.name, rank, full)


@pytest.mark.parametrize("case", ["resnet", "transformer"])
def test_round_to_is_honoured_and_the_target_still_holds(case):
    limits = RankLimits(round_to=8)
    layers, ranks, context = run(case, limits=limits, flop_reduction=2.0)
    before, after = totals(layers, ranks, context, "flops")
    assert_hits(before, after, 2.0, tolerance=0.08)  # coarser grid of ranks: multiples of 8
    assert any(r is not None for r in ranks.values())
    for rank in ranks.values():
        if rank is not None:
            assert all(r % 8 == 0 for r in rank_tuple(rank)), rank


def test_min_and_max_rank_are_honoured():
    layers, ranks, context = run("transformer", limits=RankLimits(min_rank=12, max_rank=24),
                                 flop_reduction=2.0)
    chosen = [r for r in ranks.values() if r is not None]
    assert chosen and all(12 <= r <= 24 for r in chosen)
    before, after = totals(layers, ranks, context, "flops")
    assert after <= before / 2


# -- what the allocation prefers -------------------------------------------------------------


def test_a_more_sensitive_layer_keeps_a_higher_rank():
    layers = [layer_for(name, nn.Linear(64, 64), (16, 64)) for name in ("tender", "tough")]
    context = FakeContext(SVD(), sensitivity={"tender": 10.0, "tough": 1.0})
    ranks = RULE.select_joint(layers, SVD(), BudgetParams(flop_reduction=2.0), context)
    assert ranks["tender"] is not None and ranks["tough"] is not None
    assert ranks["tender"] > ranks["tough"]
    assert_hits(*totals(layers, ranks, context, "flops"), 2.0, tolerance=0.1)


def test_a_small_target_compresses_only_what_it_must():
    layers, ranks, context = run("transformer", flop_reduction=1.05)
    assert_hits(*totals(layers, ranks, context, "flops"), 1.05, tolerance=0.04)
    assert sum(r is None for r in ranks.values()) >= len(layers) // 2


def test_a_target_already_met_changes_nothing_and_measures_nothing():
    class Free(FakeContext):  # the layers cost nothing now: there is nothing to reduce
        def cost(self, layer, rank, metric):
            return 0.0 if rank is None else super().cost(layer, rank, metric)

    layers = transformer_like(1)
    context = Free(SVD())
    ranks = RULE.select_joint(layers, SVD(), BudgetParams(flop_reduction=2.0), context)
    assert ranks == {layer.name: None for layer in layers}
    assert context.damage_calls == []
    assert "nothing to reduce" in str(context.records["budget"])


def test_damage_is_measured_once_per_layer_with_all_its_candidate_ranks():
    layers, ranks, context = run("resnet", flop_reduction=2.0, grid=6)
    assert [name for name, _ in context.damage_calls] == [layer.name for layer in layers]
    for (name, measured), row in zip(context.damage_calls, context.records["budget"].rows):
        assert 2 <= len(measured) <= 6
        assert measured == [c.rank for c in row.candidates]
        if row.interpolated:  # between two measured ranks, to spend the grid's slack
            assert any(rank_tuple(a) < rank_tuple(row.rank) < rank_tuple(b)
                       for a, b in zip(measured, measured[1:]))
        else:
            assert row.rank is None or row.rank in measured


def test_max_damage_caps_each_layer_and_names_itself_when_out_of_reach():
    layers, ranks, context = run("transformer", flop_reduction=1.5, max_damage=0.5)
    table = context.records["budget"]
    assert all(row.damage <= 0.5 for row in table.rows)
    assert_hits(*totals(layers, ranks, context, "flops"), 1.5, tolerance=0.06)
    with pytest.raises(ValueError, match=r"max_damage=0.01.*raise max_damage"):
        run("transformer", flop_reduction=3.0, max_damage=0.01)


def test_allow_skip_false_compresses_every_layer():
    layers, ranks, context = run("transformer", flop_reduction=1.05, allow_skip=False)
    assert all(r is not None for r in ranks.values())


def test_out_of_reach_target_names_the_largest_reachable_reduction_before_measuring():
    layers = transformer_like()
    context = FakeContext(SVD())
    with pytest.raises(ValueError, match=r"flop_reduction=50 cannot be reached on the 12 layers"
                                         r".*reach at most [\d.]+x"):
        RULE.select_joint(layers, SVD(), BudgetParams(flop_reduction=50.0), context)
    assert context.damage_calls == []


def test_a_max_rank_below_the_floor_leaves_the_layer_as_it_is():
    layers = [layer_for("wide", nn.Linear(256, 256), (16, 256)),
              layer_for("narrow", nn.Linear(64, 64), (16, 64))]
    context = FakeContext(SVD(), RankLimits(max_rank=20))  # floor of 'wide': 26
    ranks = RULE.select_joint(layers, SVD(), BudgetParams(flop_reduction=1.03), context)
    assert ranks["wide"] is None and ranks["narrow"] is not None
    assert "no rank above the floor" in context.records["budget"].row("wide").note


def test_deterministic():
    assert run("resnet", flop_reduction=2.0)[1] == run("resnet", flop_reduction=2.0)[1]


def test_the_table_shows_every_layer_and_the_damage_at_each_rank():
    layers, ranks, context = run("resnet", flop_reduction=2.0)
    table = context.records["budget"]
    text = str(table)
    assert text.splitlines()[0].startswith("budget: flop_reduction 2x over 6 layers")
    assert "damage by rank" in text
    for layer in layers:
        assert layer.name in text
    row = table.row("conv0")
    assert row.floor == (4, 4) and row.full_rank == (32, 32)
    assert table.to_dict()["rows"][0]["layer"] == "conv0"
    with pytest.raises(KeyError, match="layers: conv0"):
        table.row("nope")


# -- allocate() on plain numbers -------------------------------------------------------------


def _brute_force(options, budget):
    best = None
    for pick in itertools.product(*(range(len(o)) for o in options)):
        cost = sum(options[i][j][0] for i, j in enumerate(pick))
        damage = sum(options[i][j][1] for i, j in enumerate(pick))
        if cost <= budget and (best is None or damage < best):
            best = damage
    return best


@pytest.mark.parametrize("seed", range(30))
def test_allocate_is_feasible_and_close_to_the_optimum_on_convex_curves(seed):
    rng = random.Random(seed)
    options = []
    for _ in range(4):
        full, s = rng.uniform(50, 150), rng.uniform(0.1, 5)
        grid = [full * k / 6 for k in range(1, 6)]
        options.append([(c, s * (1 - c / full) ** 2) for c in grid] + [(full, 0.0)])
    before = sum(o[-1][0] for o in options)
    budget = before / rng.uniform(1.2, 3.0)
    pick = allocate(options, budget)
    cost = sum(options[i][j][0] for i, j in enumerate(pick))
    damage = sum(options[i][j][1] for i, j in enumerate(pick))
    assert cost <= budget
    optimum = _brute_force(options, budget)
    assert damage <= optimum * 1.25 + 1e-12
    for i, layer in enumerate(options):  # no single move improves it
        for c, d in layer:
            if cost - options[i][pick[i]][0] + c <= budget:
                assert d >= options[i][pick[i]][1]


def test_allocate_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="over the budget"):
        allocate([[(10.0, 0.0), (5.0, 1.0)]], 4.0)


# -- params, registration, select -------------------------------------------------------------


@pytest.mark.parametrize(
    "params,message",
    [({"flop_reduction": 2.0, "param_reduction": 2.0},
      r"exactly one target .* got 'flop_reduction' and 'param_reduction'"),
     ({}, r"exactly one target .* got none"),
     ({"flop_reduction": 1.0}, r"'flop_reduction' must be a number > 1 .* got 1.0"),
     ({"latency_reduction": 0.5}, r"'latency_reduction' must be a number > 1"),
     ({"param_reduction": "2"}, r"'param_reduction' must be a number > 1 .* got '2'"),
     ({"flop_reduction": 2.0, "grid": 1}, r"'grid' must be an int >= 2"),
     ({"flop_reduction": 2.0, "grid": 4.5}, r"'grid' must be an int >= 2"),
     ({"flop_reduction": 2.0, "min_fraction": 1.0}, r"'min_fraction' must be a number in \(0, 1\)"),
     ({"flop_reduction": 2.0, "max_damage": 0}, r"'max_damage' must be a number > 0"),
     ({"flop_reduction": 2.0, "allow_skip": "yes"}, r"'allow_skip' must be true or false"),
     ({"flop_reduction": 2.0, "flop_reducton": 2.0}, r"flop_reducton")],
)
def test_bad_params_are_spec_errors_with_the_path(params, message):
    rank = RankRule("budget", **params)
    spec = Spec(rules=[Rule(match=["linear"], decomposition="svd", rank=rank)])
    with pytest.raises(SpecError, match=message) as info:
        resolve_rules(spec)
    assert "@ $.rules[0].rank" in str(info.value)


def test_limits_and_targets_structure_from_a_spec():
    spec = Spec(rules=[Rule(match=["linear"], decomposition="svd",
                            rank=RankRule("budget", flop_reduction=2, round_to=8, grid=4))])
    bound = resolve_rules(spec)[0].rank
    assert bound.params.target == ("flop_reduction", 2.0) and bound.params.metric == "flops"
    assert bound.params.grid == 4 and bound.limits == RankLimits(round_to=8)


def test_registered_as_a_joint_rule_whose_select_asks_for_the_engine():
    entry = musco.default_registry().get("rank_rules", "budget")
    assert entry.strategy.joint is True
    layer = layer_for("fc", nn.Linear(8, 8), (1, 8))
    with pytest.raises(ValueError, match=r"layer 'fc': .*needs the engine's joint selection"):
        entry.strategy.select(layer, SVD(), BudgetParams(flop_reduction=2.0))


def test_the_docs_toml_spec_is_the_python_spec():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "rank-rules.md").read_text()
    section = text[text.index("## `budget`"):text.index("## Speed")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (toml,) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(code, namespace)
    assert Spec.from_toml(toml) == namespace["spec"]


def test_a_reduction_of_any_registered_cost_is_a_target():
    _, by_name, _ = run("transformer", flop_reduction=2.0)
    _, by_cost, context = run("transformer", reduction=2.0, cost="flops")
    assert by_cost == by_name
    assert context.records["budget"].metric == "flops"
    assert context.records["budget"].target == "reduction"
    with pytest.raises(ValueError, match="'reduction' and 'cost' go together"):
        BudgetParams(reduction=2.0)
    with pytest.raises(ValueError, match="give exactly one target"):
        BudgetParams(reduction=2.0, cost="flops", flop_reduction=2.0)


def test_budget_counts_a_plugin_cost_through_the_round_context():
    import musco_core as musco
    import torch
    from torch import nn as tnn

    class Weighted(musco.Cost):
        """FLOPs, but the first layer's count triple: the allocator must cut it harder."""

        name = "weighted_flops"

        def layer(self, layer, rank, context):
            flops = (layer.stats.flops if rank is None else
                     context.decomposition.flop_count(layer.module, rank, layer.stats))
            return flops * (3.0 if layer.name == "0" else 1.0)

        def model(self, context):
            return float(context.run.model_flops)

    class Plugin:
        @musco.hookimpl
        def musco_add_costs(self, register):
            register(Weighted())

    registry = musco.Registry()
    registry.register_plugin(Plugin(), name="weighted-cost")
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Linear(64, 64), tnn.ReLU(), tnn.Linear(64, 64))

    def ranks(**target):
        spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                            rank=musco.RankRule("budget", grid=4, **target))])
        compressor = musco.Compressor(model, spec, torch.randn(4, 64), registry=registry)
        compressor.preview()
        return compressor.joint_ranks[0], compressor.joint_tables[0]

    plain, _ = ranks(flop_reduction=2.0)
    weighted, table = ranks(reduction=2.0, cost="weighted_flops")
    assert table.metric == "weighted_flops"
    assert table.reduction >= 2.0
    assert (weighted["0"] or 64) <= (plain["0"] or 64)  # the expensive layer gives up more
    with pytest.raises(musco.CompressionError, match="unknown cost 'no_such_cost'"):
        ranks(reduction=2.0, cost="no_such_cost")
