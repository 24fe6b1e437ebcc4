"""The policy kinds as plugins: costs, gates, hooks, resume, FLOP formulas and their conformance kit.

(a) a cost and gates registered by a test plugin, used through the spec;
(b) ``musco_step_finished``: wrappers, a raising implementation, ``tryfirst`` order;
(c) a resumed run equals an uninterrupted one, for several rank rules, with and without data;
(d) a FLOP formula plugin for a layer type the FLOP counter counts as 0;
(e) ``musco_core.testing.check_statistic`` / ``check_cost`` / ``check_gate`` on first-party
    and broken strategies.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import musco_core as musco
from musco_core.stats import param_count
from musco_core.testing import check_cost, check_gate, check_statistic
from musco_std.latency import LatencyModel
from musco_std.svd import SVDLinear

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 8))


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(20, 16, generator=g) for _ in range(n)]


def _registry(*plugins) -> musco.Registry:
    registry = musco.Registry()
    for plugin in plugins:
        registry.register_plugin(plugin)
    return registry


# -- (a) a cost and gates from a plugin ---------------------------------------------------


class WeightedFlops(musco.Cost):
    name = "weighted_flops"
    summary = "FLOPs plus 100 per parameter"

    def layer(self, layer, rank, context):
        return context.cost(layer, rank, "flops") + 100.0 * context.cost(layer, rank, "params")

    def model(self, context):
        return float(context.run.model_flops) + 100.0 * param_count(context.run.model)


@attrs.frozen
class HalfCostParams:
    metric: str = "weighted_flops"
    fraction: float = 0.5


@attrs.frozen
class HalfCostTable:
    rows: tuple

    def __str__(self) -> str:
        return "\n".join(f"{n}: {before:g} -> {after:g} at rank {r}" for n, before, after, r
                         in self.rows)

    def to_dict(self):
        return {"rows": [list(r) for r in self.rows]}


class HalfCost(musco.RankSelector):
    """A joint rule: per layer, the largest rank costing at most ``fraction`` of the layer now."""

    name = "half_cost"
    summary = "largest rank within a fraction of the layer's cost (any registered cost)"
    Params = HalfCostParams
    joint = True
    rounding = "down"

    def select(self, layer, decomposition, params):
        raise ValueError(f"layer {layer.name!r}: 'half_cost' ranks layers jointly")

    def select_joint(self, layers, decomposition, params, context):
        ranks, rows = {}, []
        for layer in layers:
            before = context.cost(layer, None, params.metric)
            best, after = None, before
            for rank in range(1, decomposition.full_rank(layer.module) + 1):
                cost = context.cost(layer, rank, params.metric)
                if cost <= params.fraction * before:
                    best, after = rank, cost
            ranks[layer.name] = best
            rows.append((layer.name, before, after, best))
        context.record(self.name, HalfCostTable(tuple(rows)))
        return ranks


@attrs.frozen
class MaxRankParams:
    max: int = 8


class MaxRankGate(musco.GateStrategy):
    name = "max_rank_gate"
    summary = "drop a built layer whose rank is above `max`"
    Params = MaxRankParams

    def keep(self, layer, module, context, params):
        if module.rank > params.max:
            return musco.Verdict(keep=False, reason=f"rank {module.rank} is above max_rank_gate's "
                                                    f"max {params.max}")
        return musco.Verdict()


@attrs.frozen
class ShrinkParams:
    by: int = 2


class ShrinkRank(musco.GateStrategy):
    name = "shrink_rank"
    summary = "divide the chosen rank by `by` (within the rule's limits)"
    Params = ShrinkParams

    def adjust(self, layer, rank, context, params):
        return context.limit(layer, max(1, rank // params.by)), {}


class PolicyPlugin:
    @musco.hookimpl
    def musco_add_costs(self, register):
        register(WeightedFlops())

    @musco.hookimpl
    def musco_add_rank_rules(self, register):
        register(HalfCost())

    @musco.hookimpl
    def musco_add_gates(self, register):
        register(MaxRankGate())
        register(ShrinkRank())


def _expected_half_cost_rank(n_in: int, n_out: int, positions: int) -> int:
    """What HalfCost must choose for an nn.Linear under weighted_flops, from the formulas."""
    def weighted(rank):
        if rank is None:
            return 2 * positions * n_in * n_out + 100 * (n_in * n_out + n_out)
        return 2 * positions * rank * (n_in + n_out) + 100 * (rank * (n_in + n_out) + n_out)
    return max(r for r in range(1, min(n_in, n_out) + 1) if weighted(r) <= 0.5 * weighted(None))


def test_a_plugin_cost_is_what_round_context_cost_counts():
    registry = _registry(PolicyPlugin())
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("half_cost"))],
                      exclude=["4"], layers_per_step=2)
    compressor = musco.Compressor(_model(), spec, X, registry=registry)
    report = compressor.step()
    ranks = {r.name: r.rank for r in report.layers}
    assert ranks == {"0": _expected_half_cost_rank(16, 32, 4), "2": _expected_half_cost_rank(32, 32, 4)}
    assert all(r.status == "compressed" for r in report.layers)
    table = str(compressor.joint_tables[0])
    assert table.startswith("0: ") and f"at rank {ranks['2']}" in table
    # the cost passes the conformance kit, through the same registry
    check_cost(WeightedFlops(), registry=registry)


def test_an_unknown_cost_name_names_the_registered_ones():
    registry = _registry(PolicyPlugin())
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("half_cost", metric="wieghted_flops"))])
    compressor = musco.Compressor(_model(), spec, X, registry=registry)
    with pytest.raises(musco.CompressionError, match=r"rank rule 'half_cost' failed.*unknown cost "
                                                     r"'wieghted_flops'; registered costs: .*"
                                                     r"weighted_flops"):
        compressor.step()
    assert compressor.position == 0 and isinstance(compressor.model[0], nn.Linear)


def test_plugin_gates_through_the_spec():
    registry = _registry(PolicyPlugin())
    spec = musco.Spec.from_toml("""
exclude = ["4"]
layers_per_step = 2

[[rules]]
match = [{ name = "glob", pattern = "0" }]
decomposition = "svd"
rank = { name = "fixed", rank = 10 }
gates = [{ name = "max_rank_gate", max = 8 }]

[[rules]]
match = ["linear"]
decomposition = "svd"
rank = { name = "fixed", rank = 12 }
gates = [{ name = "shrink_rank", by = 2 }, { name = "max_rank_gate", max = 8 }]
""")
    model = _model()
    compressor = musco.Compressor(model, spec, X, registry=registry)
    report = compressor.step()
    first, second = report.layers
    assert first.name == "0" and first.status == "skipped"
    assert first.reason == "rank 10 is above max_rank_gate's max 8"
    assert first.params_after == first.params_before
    assert type(compressor.model[0]) is nn.Linear
    assert second.name == "2" and second.status == "compressed" and second.rank == 6
    assert isinstance(compressor.model[2], SVDLinear) and compressor.model[2].rank == 6
    assert [e["name"] for e in compressor.manifest] == ["2"]
    # the python form is the same spec
    same = musco.Spec(rules=[
        musco.Rule(match=musco.Match("glob", pattern="0"), decomposition="svd",
                   rank=musco.RankRule("fixed", rank=10), gates=[musco.Gate("max_rank_gate", max=8)]),
        musco.Rule(match="linear", decomposition="svd", rank=musco.RankRule("fixed", rank=12),
                   gates=[musco.Gate("shrink_rank", by=2), musco.Gate("max_rank_gate", max=8)]),
    ], exclude=["4"], layers_per_step=2)
    assert same == spec


def test_plugin_gates_pass_the_kit():
    dropped = check_gate(MaxRankGate(), {"max": 3})
    assert dropped and all(not verdict.keep and "above max_rank_gate's max 3" in verdict.reason
                           for _, _, verdict in dropped.values())
    kept = check_gate(MaxRankGate(), {"max": 100})
    assert all(verdict.keep for _, _, verdict in kept.values())
    shrunk = check_gate(ShrinkRank(), {"by": 2})
    assert all(adjusted == max(1, asked // 2) for asked, adjusted, _ in shrunk.values())


# -- (b) hooks on musco_step_finished -----------------------------------------------------


def _hooked(*plugins) -> musco.Compressor:
    registry = musco.Registry()
    for name, plugin in plugins:
        registry.register_plugin(plugin, name=name)
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=8))],
                      exclude=["4"], layers_per_step=1)
    return musco.Compressor(_model(), spec, X, registry=registry)


def test_a_wrapper_runs_around_the_plain_implementation_and_sees_its_result():
    events = []

    class Wrapper:
        @musco.hookimpl(wrapper=True)
        def musco_step_finished(self, step, report):
            events.append(("wrapper before", step, report.step))
            result = yield
            events.append(("wrapper after", step, result))
            return result

    class Plain:
        @musco.hookimpl
        def musco_step_finished(self, context, step, report):
            events.append(("plain", step, context.position, len(context.manifest)))
            return f"plain saw step {step}"

    compressor = _hooked(("wrapper", Wrapper()), ("plain", Plain()))
    compressor.step()
    assert events == [("wrapper before", 0, 0), ("plain", 0, 1, 1),
                      ("wrapper after", 0, ["plain saw step 0"])]


def test_a_raising_implementation_is_a_warning_naming_its_plugin_and_the_step_commits():
    seen = []

    class Raiser:
        @musco.hookimpl
        def musco_step_finished(self, step):
            raise RuntimeError("boom")

    class Recorder:
        @musco.hookimpl
        def musco_step_finished(self, step, report):
            seen.append((step, [r.status for r in report.layers]))

    class Wrapper:
        @musco.hookimpl(wrapper=True)
        def musco_step_finished(self):
            try:
                return (yield)
            except RuntimeError as exc:
                seen.append(("wrapper saw", str(exc)))
                raise

    for order in ([("raiser", Raiser()), ("recorder", Recorder())],
                  [("recorder", Recorder()), ("raiser", Raiser())]):
        seen.clear()
        compressor = _hooked(("wrapper", Wrapper()), *order)
        with pytest.warns(musco.MuscoWarning, match=r"hook musco_step_finished of plugin 'raiser' "
                                                    r"raised RuntimeError: boom; step 0 is "
                                                    r"committed all the same"):
            report = compressor.step()
        assert report.layers[0].status == "compressed"
        assert compressor.position == 1 and [e["name"] for e in compressor.manifest] == ["0"]
        assert isinstance(compressor.model[0], SVDLinear)
        assert sorted(seen, key=str) == sorted([(0, ["compressed"]), ("wrapper saw", "boom")],
                                               key=str)
        with pytest.warns(musco.MuscoWarning, match="step 1 is committed"):
            compressor.step()  # the run goes on
        assert compressor.done


def test_tryfirst_and_trylast_order_between_plain_implementations():
    order = []

    def plugin(label, **marks):
        class P:
            @musco.hookimpl(**marks)
            def musco_step_finished(self, step):
                order.append(label)
        return P()

    # registered in this order, pluggy alone would call them last-registered first
    compressor = _hooked(("first", plugin("first", tryfirst=True)), ("a", plugin("a")),
                         ("b", plugin("b")), ("last", plugin("last", trylast=True)))
    compressor.step()
    assert order == ["first", "b", "a", "last"]


# -- (c) a resumed run equals an uninterrupted one ----------------------------------------

RANK_RULES = {
    "fixed": musco.RankRule("fixed", rank=7),
    "param_reduction": musco.RankRule("param_reduction", rate=2.0),
    "energy": musco.RankRule("energy", fraction=0.8),
    "budget": musco.RankRule("budget", flop_reduction=1.5, grid=3),
}


def _outcome(compressor: musco.Compressor):
    return [(r.name, r.status, r.rank, r.reason) for step in compressor.reports
            for r in step.layers]


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
@pytest.mark.parametrize("rule", list(RANK_RULES))
def test_resume_equals_an_uninterrupted_run(rule, calibrated, tmp_path):
    calibration = _batches() if calibrated else None
    spec = musco.Spec(rules=[musco.Rule(match="linear",
                                        decomposition=musco.Decompose("svd", whiten=calibrated),
                                        rank=RANK_RULES[rule])], layers_per_step=1)
    whole = musco.Compressor(_model(), spec, X, calibration=calibration)
    while not whole.done:
        whole.step()
    assert len(whole.reports) == 3
    assert any(r.status == "compressed" for s in whole.reports for r in s.layers)

    first = musco.Compressor(_model(), spec, X, calibration=calibration)
    first.step()
    path = tmp_path / "run.musco"
    first.save(path)
    fresh = _model()
    resumed = musco.Compressor.resume(path, fresh, calibration=calibration)
    assert resumed.position == 1
    while not resumed.done:
        resumed.step()

    assert resumed.manifest == whole.manifest
    assert _outcome(resumed) == _outcome(whole)
    if calibrated:
        assert [r.output_error for s in resumed.reports for r in s.layers] == \
            [r.output_error for s in whole.reports for r in s.layers]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.joint_ranks == whole.joint_ranks
    assert {k: str(t) for k, t in resumed.joint_tables.items()} == \
        {k: str(t) for k, t in whole.joint_tables.items()}
    if rule == "budget":
        assert str(resumed.joint_tables[0]) == str(whole.joint_tables[0]) != ""
    assert all(type(m) is not SVDLinear for m in fresh.modules())  # resume copies the model


# -- (d) a FLOP formula for a layer the counter misses ------------------------------------


class LoopLinear(nn.Module):
    """x @ W^T as a Python loop of elementwise products and sums: FlopCounterMode counts 0."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return torch.stack([(x * w).sum(-1) for w in self.weight], dim=-1)


class LoopLinearFlops(musco.FlopFormula):
    name = "loop_linear"
    summary = "LoopLinear: a multiply-add per weight per input row"
    module_types = (LoopLinear,)

    def flops(self, module, args, kwargs):
        x = args[0]
        return 2 * x.numel() * module.weight.shape[0]


class FormulaPlugin:
    @musco.hookimpl
    def musco_add_flop_formulas(self, register):
        register(LoopLinearFlops())


def test_a_flop_formula_plugin_counts_what_the_counter_misses():
    layer = LoopLinear(16, 12)
    x = torch.randn(4, 16)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        y = layer(x)
    assert counter.get_total_flops() == 0  # really missed
    torch.testing.assert_close(y, x @ layer.weight.detach().T, rtol=1e-5, atol=1e-5)

    model = nn.Sequential(LoopLinear(16, 12), nn.Linear(12, 4))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("fixed", rank=2))])
    plain = musco.Compressor(model, spec, x, registry=musco.Registry())
    assert plain.stats["0"].flops == 0
    formula = 2 * 4 * 16 * 12
    registry = _registry(FormulaPlugin())
    assert "loop_linear" in registry.names("flop_formulas")
    counted = musco.Compressor(model, spec, x, registry=registry)
    assert counted.stats["0"].flops == formula
    assert counted.stats["1"].flops == plain.stats["1"].flops == 2 * 4 * 12 * 4
    assert counted.model_flops_before == plain.model_flops_before + formula


# -- (e) the conformance kit for the policy kinds -----------------------------------------


def _flop_timer(module, x):
    """A deterministic clock for LatencyModel: a picosecond per counted FLOP."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(x)
    return counter.get_total_flops() * 1e-12


@pytest.mark.parametrize("name", ["input_gram", "cross_moment", "target_gram"])
def test_first_party_statistics_conform(name):
    registry = musco.default_registry()
    result = check_statistic(name)
    assert result.shape == (6, 6) and result.dtype == torch.float64
    check_statistic(registry.get("statistics", name).strategy, registry=registry)


@pytest.mark.parametrize("decomposition", ["svd", "tucker2"])
def test_first_party_counted_costs_conform(decomposition):
    for name in ("flops", "params"):
        costs = check_cost(name, decomposition)
        assert costs and all(values[1] < values[-1] for values in costs.values())


def test_the_latency_cost_conforms_with_a_deterministic_clock():
    latency = LatencyModel(timer=_flop_timer)
    costs = check_cost("latency", resources={"latency": latency})
    flops = check_cost("flops")
    for (_, seconds), (_, counted) in zip(sorted(costs.items()), sorted(flops.items())):
        assert seconds == pytest.approx([f * 1e-12 for f in counted])


def test_first_party_gates_conform():
    latency = LatencyModel(timer=_flop_timer)
    kept = check_gate("min_speedup", {"factor": 1.1}, resources={"latency": latency})
    assert kept and all(v.keep and v.fields["time_after"] < v.fields["time_before"]
                        for _, _, v in kept.values())
    dropped = check_gate("min_speedup", {"factor": 5.0}, resources={"latency": latency})
    assert all(not v.keep and "not faster enough" in v.reason for _, _, v in dropped.values())
    rounded = check_gate("round_by_speed", {"multiple": 4}, resources={"latency": latency})
    assert all(adjusted % 4 == 0 for _, adjusted, _ in rounded.values())


class _Stat(musco.Statistic):
    name = "broken_stat"
    summary = "a statistic that breaks a rule of the kit"


class LastOnly(_Stat):
    def update(self, state, batch):
        return batch.rows.sum(dim=0)  # forgets the earlier batches


class Aliasing(_Stat):
    def update(self, state, batch):
        return batch.rows if state is None else torch.cat([state, batch.rows])


class Mutating(_Stat):
    def update(self, state, batch):
        batch.rows.abs_()
        return batch.rows.sum(dim=0) + (0 if state is None else state)


class Random(_Stat):
    def update(self, state, batch):
        return batch.rows.sum(dim=0) + (0 if state is None else state)

    def result(self, state, rows):
        return state + torch.rand(()).item() * 1e-13  # far below the streaming tolerance


@pytest.mark.parametrize("statistic, message", [
    (LastOnly(), "statistic 'broken_stat': streaming: two batches differ"),
    (Aliasing(), "statistic 'broken_stat': the result aliases the inputs"),
    (Mutating(), "statistic 'broken_stat': update\\(\\) changed the batch's rows"),
    (Random(), "statistic 'broken_stat': not deterministic"),
])
def test_the_kit_catches_broken_statistics(statistic, message):
    with pytest.raises(AssertionError, match=message):
        check_statistic(statistic)


def test_the_kit_checks_registration_when_given_a_registry():
    with pytest.raises(AssertionError, match="statistic 'broken_stat' is not registered"):
        check_statistic(LastOnly(), registry=musco.default_registry())
    with pytest.raises(AssertionError, match="no statistic 'input_gramm' is registered"):
        check_statistic("input_gramm")


class _Cost(musco.Cost):
    name = "broken_cost"
    summary = "a cost that breaks a rule of the kit"

    def model(self, context):
        return float(context.run.model_flops)

    def layer(self, layer, rank, context):
        return float(layer.stats.flops) if rank is None else self.at(layer, rank, context)


class Inverse(_Cost):
    def at(self, layer, rank, context):
        return layer.stats.flops / rank  # grows as the rank falls


class Negative(_Cost):
    def at(self, layer, rank, context):
        return -1.0


class NoModel(_Cost):
    def model(self, context):
        return 0.0

    def at(self, layer, rank, context):
        return context.cost(layer, rank, "flops")


@pytest.mark.parametrize("cost, message", [
    (Inverse(), "cost 'broken_cost' on Linear .*: not monotone"),
    (Negative(), "cost 'broken_cost' on Linear .*: the cost at rank 1 = -1.0, expected finite >= 0"),
    (NoModel(), "cost 'broken_cost' on Linear .*: the cost at None .* but model\\(\\)"),
])
def test_the_kit_catches_broken_costs(cost, message):
    with pytest.raises(AssertionError, match=message):
        check_cost(cost)


def test_monotonicity_is_optional():
    check_cost(Inverse(), monotone=False)


class _Gate(musco.GateStrategy):
    name = "broken_gate"
    summary = "a gate that breaks a rule of the kit"


class RankZero(_Gate):
    def adjust(self, layer, rank, context, params):
        return 0, {}


class Silent(_Gate):
    def keep(self, layer, module, context, params):
        return musco.Verdict(keep=False)


class Clashing(_Gate):
    def adjust(self, layer, rank, context, params):
        return rank, {"warning": "mine"}


@pytest.mark.parametrize("gate, message", [
    (RankZero(), "gate 'broken_gate' on Linear .*: adjust\\(\\) gave an invalid rank 0"),
    (Silent(), "gate 'broken_gate' on Linear .*: keep\\(\\) dropped the layer without a reason"),
    (Clashing(), "gate 'broken_gate' on Linear .*: adjust\\(\\) returned report fields "
                 "\\['warning'\\]"),
])
def test_the_kit_catches_broken_gates(gate, message):
    with pytest.raises(AssertionError, match=message):
        check_gate(gate)


# -- check_refiner ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["layer_output", "model_output"])
def test_first_party_refiners_conform(name):
    from musco_core.testing import check_refiner

    check_refiner(name, {"steps": 5, "lr": 1e-2})


class _BrokenRefiner(musco.Refiner):
    name = "broken"
    summary = "a refiner that does what it must not"

    def objective(self, modules, context, params):
        return 0.0


class _TouchesTheModel(_BrokenRefiner):
    def refine(self, modules, context, params):
        with torch.no_grad():
            context.model[0].weight.add_(1.0)


class _LeavesGrads(_BrokenRefiner):
    def refine(self, modules, context, params):
        for m in modules.values():
            sum(p.sum() for p in m.parameters()).backward()


class _Unseeded(_BrokenRefiner):
    def refine(self, modules, context, params):
        with torch.no_grad():
            for m in modules.values():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape))  # the global RNG, not seeded


class _Swaps(_BrokenRefiner):
    def refine(self, modules, context, params):
        context.model[2] = modules["2"]


@pytest.mark.parametrize("refiner, message", [
    (_TouchesTheModel(), r"refine\(\) changed the layer's '0.weight'"),
    (_LeavesGrads(), r"left .grad on the new module's"),
    (_Unseeded(), r"two runs from the same start differ"),
    (_Swaps(), r"put the new module into the model"),
])
def test_the_kit_catches_broken_refiners(refiner, message):
    from musco_core.testing import check_refiner

    with pytest.raises(AssertionError, match=message):
        check_refiner(refiner)
