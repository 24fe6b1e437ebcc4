"""Conformance checks for the policy kinds: statistics, costs, gates and refiners.

Each check runs the strategy the way the engine does, on small float64 data and sample
layers, and raises :class:`AssertionError` naming the strategy and what failed::

    from musco_core.testing import check_cost, check_gate, check_statistic

    check_statistic(InputAbsMean())                    # or a registered name: "input_gram"
    check_cost(MyCost(), decomposition="svd")          # monotone=False for a measured cost
    check_gate(MyGate(), {"limit": 8})
    check_refiner("model_output", {"steps": 5})

Costs and gates get a stand-in :class:`musco_core.RunContext` /
:class:`musco_core.RoundContext` built from the real classes around a one-layer model
(no calibration data); pass ``resources={"latency": LatencyModel(timer=...)}`` to give
latency-based strategies a deterministic clock.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn

from musco_core.errors import UnsupportedLayerError
from musco_core.limits import RankLimits
from musco_core.registry import KINDS, Registry, default_registry
from musco_core.report import LayerReport
from musco_core.spec import structure_params
from musco_core.stats import collect_stats, model_flops
from musco_core.strategies import (
    Cost, Decomposition, GateStrategy, Layer, LayerBatch, Statistic, Strategy, Verdict,
)
from musco_core.testing.checks import default_ranks, one_thread
from musco_core.testing.rank_rules import sample_layers

__all__ = ["check_cost", "check_gate", "check_refiner", "check_statistic"]

#: LayerReport fields the engine sets itself; a gate's report fields may not name them
#: (the engine passes a gate's fields next to its own, so a clash is a TypeError or an
#: overwritten name, status or count).
_ENGINE_FIELDS = frozenset({"name", "round", "decomposition", "rank_rule", "status", "rank",
                            "params_before", "params_after", "flops_before", "flops_after",
                            "rel_error", "seconds", "reason", "warning"})


# -- helpers ----------------------------------------------------------------------------


def _resolve(kind: str, strategy: Any, registry: Registry | None) -> Strategy:
    """``strategy`` itself, or the registered strategy of ``kind`` it names.

    With an explicit ``registry``, an instance must be registered there under its name.
    """
    base, label = KINDS[kind][1], KINDS[kind][2]
    if isinstance(strategy, str):
        table = (registry or default_registry()).entries[kind]
        assert strategy in table, f"no {label} {strategy!r} is registered; have {sorted(table)}"
        return table[strategy].strategy
    assert isinstance(strategy, base), (
        f"{strategy!r} is not a musco_core.{base.__name__} (a {label})")
    assert isinstance(strategy.name, str) and strategy.name, f"{type(strategy).__name__} has no name"
    assert isinstance(strategy.summary, str) and strategy.summary, (
        f"{label} {strategy.name!r} has no summary")
    if registry is not None:
        entry = registry.entries[kind].get(strategy.name)
        assert entry is not None, f"{label} {strategy.name!r} is not registered in {registry!r}"
        assert type(entry.strategy) is type(strategy), (
            f"{label} {strategy.name!r} is registered as {type(entry.strategy).__name__}, "
            f"not {type(strategy).__name__}")
    return strategy


def _params(strategy: Strategy, params: Any, label: str) -> Any:
    if params is None:
        try:
            return strategy.Params()
        except TypeError as exc:
            raise AssertionError(f"{label}: Params() needs values ({exc}); pass params=") from None
    if isinstance(params, Mapping):
        return structure_params(dict(params), strategy.Params)
    return params


def _leaves(value: Any, path: str = "result") -> list[tuple[str, Any]]:
    """The tensors and numbers in a (nested) statistic result, with their paths."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float)):
        return [(path, value)]
    if isinstance(value, Mapping):
        out = []
        for key in sorted(value, key=str):
            out += _leaves(value[key], f"{path}[{key!r}]")
        return out
    if isinstance(value, (tuple, list)):
        out = []
        for i, item in enumerate(value):
            out += _leaves(item, f"{path}[{i}]")
        return out
    return [(path, value)]


def _snapshot(value: Any) -> list[tuple[str, Any]]:
    return [(p, v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for p, v in _leaves(value)]


def _compare(a: list[tuple[str, Any]], b: list[tuple[str, Any]], rtol: float | None,
             label: str, what: str) -> None:
    """Leaves ``a`` equal leaves ``b``: exactly (``rtol`` None) or norm-relative."""
    assert [p for p, _ in a] == [p for p, _ in b], (
        f"{label}: {what}: the result's structure differs ({[p for p, _ in a]} vs "
        f"{[p for p, _ in b]})")
    for (path, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            assert x.shape == y.shape, f"{label}: {what}: {path} has shape {tuple(x.shape)}, " \
                                       f"expected {tuple(y.shape)}"
            if rtol is None:
                ok = torch.equal(x, y)
                detail = "not equal"
            else:
                diff = float(torch.linalg.vector_norm((x - y).double()))
                scale = float(torch.linalg.vector_norm(y.double()))
                ok = diff <= rtol * scale + 1e-300
                detail = f"|a - b| / |b| = {diff / (scale or 1.0):.3g} > {rtol:g}"
            assert ok, f"{label}: {what}: {path} {detail}"
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and rtol is not None:
            assert abs(x - y) <= rtol * abs(y), f"{label}: {what}: {path} {x!r} != {y!r}"
        else:
            assert type(x) is type(y) and x == y, f"{label}: {what}: {path} {x!r} != {y!r}"


def _check_finite(value: Any, label: str) -> None:
    for path, leaf in _leaves(value):
        if isinstance(leaf, torch.Tensor):
            if leaf.is_floating_point() or leaf.is_complex():
                assert bool(torch.isfinite(leaf).all()), f"{label}: {path} is not finite"
        elif isinstance(leaf, float):
            assert math.isfinite(leaf), f"{label}: {path} = {leaf!r} is not finite"


# -- statistics -------------------------------------------------------------------------


@one_thread
def check_statistic(statistic: Statistic | str, *, registry: Registry | None = None,
                    features: int = 6, rows: int = 24, seed: int = 0,
                    rtol: float = 1e-10) -> Any:
    """Check a :class:`musco_core.Statistic` the way the engine streams it; return its result.

    ``statistic`` is an instance or a registered name (looked up in ``registry``,
    default: the default registry); with an explicit ``registry`` an instance must be
    registered there under its name. On ``rows`` random float64 rows of ``features``
    features (columns of very different scales; the original rows differ from the
    current ones, as after an upstream change), fed as a ``LayerBatch`` of an
    ``nn.Linear``:

    - ``update`` and ``result`` run, and the result is finite;
    - ``update`` does not change the batch's tensors;
    - streaming: the rows folded in two batches give the same result as in one, to a
      norm-relative ``rtol``;
    - the result does not alias the inputs: changing the rows in place after
      ``result()`` leaves it as it was;
    - deterministic: the same batch folded into a fresh state gives an equal result.
    """
    stat = _resolve("statistics", statistic, registry)
    label = f"statistic {stat.name!r}"
    g = torch.Generator().manual_seed(int(seed))
    scales = torch.logspace(-1, 1, features, dtype=torch.float64)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64) * scales
    x_o = x + 0.3 * torch.randn(rows, features, generator=g, dtype=torch.float64) * scales
    module = nn.Linear(features, 4, dtype=torch.float64)

    def batch(index: int, cur: torch.Tensor, orig: torch.Tensor) -> LayerBatch:
        cur, orig = cur.clone(), orig.clone()
        with torch.no_grad():
            out = module(cur)
        return LayerBatch(name="layer", index=index, rows=cur, original_rows=orig,
                          module=module, output=out)

    def fold(*batches: LayerBatch) -> Any:
        state = None
        for b in batches:
            state = stat.update(state, b)
        return stat.result(state, sum(int(b.rows.shape[0]) for b in batches))

    whole = batch(0, x, x_o)
    before = [t.clone() for t in (whole.rows, whole.original_rows, whole.output)]
    try:
        one = fold(whole)
    except Exception as exc:
        raise AssertionError(f"{label}: update/result raised {type(exc).__name__}: {exc}") from exc
    for name, t, b in zip(("rows", "original_rows", "output"),
                          (whole.rows, whole.original_rows, whole.output), before):
        assert torch.equal(t, b), f"{label}: update() changed the batch's {name}"
    _check_finite(one, label)
    kept = _snapshot(one)

    for t in (whole.rows, whole.original_rows, whole.output):
        t.mul_(-3.0).add_(1.0)
    _compare(_snapshot(one), kept, None, label,
             "the result aliases the inputs (it changed when the rows were changed in place "
             "after result(); detach and clone what is kept)")

    k = max(1, rows // 3)
    two = fold(batch(0, x[:k], x_o[:k]), batch(1, x[k:], x_o[k:]))
    _compare(_leaves(two), kept, rtol, label, "streaming: two batches differ from one batch of all rows")

    again = fold(batch(0, x, x_o))
    _compare(_leaves(again), kept, None, label, "not deterministic: the same batch gave another result")
    return one


# -- costs and gates: a stand-in run around a one-layer model ---------------------------


@attrs.frozen
class _Stand:
    layer: Layer
    context: Any  # RoundContext
    input_shape: tuple[int, ...]


def _stand_ins(decomposition: Decomposition, dparams: Any, registry: Registry,
               extra: dict[str, Any], resources: dict[str, Any] | None,
               rounding: str = "nearest") -> list[_Stand]:
    """One stand-in RoundContext per sample layer ``decomposition`` accepts."""
    from musco_core.context import RoundContext, RunContext

    out = []
    for i, (module, input_shape) in enumerate(sample_layers()):
        try:
            decomposition.check("0", module)
        except UnsupportedLayerError:
            continue
        model = nn.Sequential(module).eval()
        x = torch.randn(input_shape, generator=torch.Generator().manual_seed(i))
        stats = collect_stats(model, x, ["0"], registry.flop_formulas())
        flops = model_flops(model, x, registry.flop_formulas(model_total=True))
        costs = {n: e.strategy for n, e in registry.entries["costs"].items()}
        costs.update(extra)
        run = RunContext(
            model=model, example_inputs=x, stats=stats, calibration=None, reference=None,
            costs=costs,
            statistics={n: e.strategy for n, e in registry.entries["statistics"].items()},
            resources=dict(resources) if resources is not None else {"latency": None},
            model_flops=flops)
        context = RoundContext(run, decomposition, dparams, RankLimits(), rounding)
        out.append(_Stand(Layer("0", module, stats["0"], 1), context, tuple(input_shape)))
    assert out, f"decomposition {decomposition.name!r} accepts none of the sample layers"
    return out


def _where(label: str, stand: _Stand) -> str:
    module = stand.layer.module
    return f"{label} on {type(module).__name__} {tuple(module.weight.shape)}"


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor], where: str, what: str) -> None:
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{where}: {what} changed the layer's {k!r}"


def _number(value: Any, where: str, what: str) -> float:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (
        f"{where}: {what} returned {value!r}, not a number")
    value = float(value)
    assert math.isfinite(value) and value >= 0, f"{where}: {what} = {value!r}, expected finite >= 0"
    return value


@one_thread
def check_cost(cost: Cost | str, decomposition: Decomposition | str = "svd", params: Any = None,
               *, monotone: bool = True, rtol: float | None = 1e-9,
               registry: Registry | None = None,
               resources: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Check a :class:`musco_core.Cost` on stand-in layers; return the costs per layer.

    For each sample layer (a Linear, a 1x1 and two 3x3 convs, float32) that
    ``decomposition`` (an instance or a registered name, with ``params``) accepts, as
    the only layer of a model, through ``RoundContext.cost(layer, rank, name)``:

    - the cost at ``None`` (the layer as it is) is finite and ``>= 0``, and equals
      ``cost.model(context)``, the cost of that one-layer model, to a relative ``rtol``
      (``None`` skips this, e.g. for a noisy measured cost): what ``rest_cost`` relies on;
    - the cost at rank 1, about half and full rank is finite and ``>= 0``;
    - with ``monotone`` (counted costs such as FLOPs and parameters), it does not
      grow as the rank falls;
    - computing costs does not change the layer.

    ``resources`` are the run's shared objects (``{"latency": LatencyModel(...)}``).
    Returns ``{layer description: [cost at None, then at each rank]}``.
    """
    registry = registry or default_registry()
    strategy = _resolve("costs", cost, None)
    dec = _resolve("decompositions", decomposition, registry)
    label = f"cost {strategy.name!r}"
    dparams = _params(dec, params, f"decomposition {dec.name!r}")
    found: dict[str, list[float]] = {}
    for stand in _stand_ins(dec, dparams, registry, {strategy.name: strategy}, resources):
        where = _where(label, stand)
        layer, context = stand.layer, stand.context
        before = _weights(layer.module)
        as_is = _number(context.cost(layer, None, strategy.name), where, "the cost at None")
        whole = _number(strategy.model(context), where, "model()")
        if rtol is not None:
            assert abs(as_is - whole) <= rtol * max(abs(whole), 1e-300), (
                f"{where}: the cost at None (the layer as it is) is {as_is!r}, but model() of "
                f"a model made of that layer alone is {whole!r}")
        values = [as_is]
        previous = None
        for rank in default_ranks(dec, layer.module):
            value = _number(context.cost(layer, rank, strategy.name), where,
                            f"the cost at rank {rank!r}")
            if monotone and previous is not None:
                assert previous[1] <= value * (1 + 1e-12), (
                    f"{where}: not monotone: rank {previous[0]!r} costs {previous[1]!r} but the "
                    f"larger rank {rank!r} costs {value!r} (pass monotone=False for a cost "
                    "that may grow as the rank falls)")
            previous = (rank, value)
            values.append(value)
        _unchanged(layer.module, before, where, "the cost")
        found[where] = values
    return found


def _report_fields(fields: Any, where: str, what: str) -> None:
    assert isinstance(fields, Mapping), f"{where}: {what} fields are {fields!r}, not a dict"
    allowed = set(attrs.fields_dict(LayerReport)) - _ENGINE_FIELDS
    unknown = sorted(set(fields) - allowed)
    assert not unknown, (f"{where}: {what} returned report fields {unknown}; a gate may set "
                         f"only the LayerReport fields {sorted(allowed)} (the engine sets the others)")


@one_thread
def check_gate(gate: GateStrategy | str, params: Any = None, *,
               decomposition: Decomposition | str = "svd", decomposition_params: Any = None,
               rank_rule: str = "fixed", registry: Registry | None = None,
               resources: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any, Verdict]]:
    """Check a :class:`musco_core.GateStrategy` on stand-in layers; return what it decided.

    ``gate`` is an instance or a registered name; ``params`` its ``Params`` instance, a
    dict structured into it as a spec's would be, or ``None`` for the defaults. With a
    stand-in :class:`~musco_core.RoundContext` (no calibration data) for each sample
    layer ``decomposition`` accepts, at about half the full rank:

    - ``problems(params, rank rule, limits)`` returns a list of str (rank rule:
      ``rank_rule`` from the registry, default limits);
    - ``adjust`` returns ``(rank, fields)``: a rank ``validate_rank`` accepts and a dict
      of :class:`musco_core.LayerReport` fields the engine does not set itself
      (``time_before``, ``time_after`` ...; not its name, status, rank, counts or warning);
    - ``keep`` of the module built at that rank returns a :class:`musco_core.Verdict`
      whose ``keep`` is a bool, ``reason`` a str (not empty when the layer is dropped:
      the report shows it) and ``fields`` LayerReport fields;
    - neither changes the layer.

    Returns ``{layer description: (rank asked, rank adjusted, verdict)}``.
    """
    registry = registry or default_registry()
    strategy = _resolve("gates", gate, None)
    label = f"gate {strategy.name!r}"
    params = _params(strategy, params, label)
    dec = _resolve("decompositions", decomposition, registry)
    dparams = _params(dec, decomposition_params, f"decomposition {dec.name!r}")
    rule = _resolve("rank_rules", rank_rule, registry)
    problems = strategy.problems(params, rule, RankLimits())
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), (
        f"{label}: problems() must return a list of str, got {problems!r}")
    found: dict[str, tuple[Any, Any, Verdict]] = {}
    for stand in _stand_ins(dec, dparams, registry, {}, resources, rule.rounding):
        where = _where(label, stand)
        layer, context = stand.layer, stand.context
        before = _weights(layer.module)
        ranks = default_ranks(dec, layer.module)
        rank = ranks[1] if len(ranks) > 1 else ranks[0]
        result = strategy.adjust(layer, rank, context, params)
        assert isinstance(result, tuple) and len(result) == 2, (
            f"{where}: adjust() must return (rank, fields), got {result!r}")
        adjusted, fields = result
        message = dec.validate_rank(layer.module, adjusted)
        assert message is None, f"{where}: adjust() gave an invalid rank {adjusted!r}: {message}"
        _report_fields(fields, where, "adjust()")
        _unchanged(layer.module, before, where, "adjust()")
        built, _ = dec.compress(layer.module, adjusted, dparams)
        verdict = strategy.keep(layer, built, context, params)
        assert isinstance(verdict, Verdict), (
            f"{where}: keep() must return a musco_core.Verdict, got {verdict!r}")
        assert isinstance(verdict.keep, bool), f"{where}: Verdict.keep is {verdict.keep!r}, not a bool"
        assert isinstance(verdict.reason, str), f"{where}: Verdict.reason is not a str"
        assert verdict.keep or verdict.reason, (
            f"{where}: keep() dropped the layer without a reason (the report shows it)")
        _report_fields(verdict.fields, where, "keep()")
        _unchanged(layer.module, before, where, "keep()")
        found[where] = (rank, adjusted, verdict)
    return found


# -- refiners ---------------------------------------------------------------------------


def _refine_stand_in(seed: int) -> tuple[nn.Module, nn.Module, list[torch.Tensor], nn.Module]:
    """A 3-layer model, a frozen copy (the reference), seeded data, and layer '2' as rank-4 SVD."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    data = [torch.randn(8, 12, generator=g) for _ in range(3)]
    svd = default_registry().get("decompositions", "svd").strategy
    new, _ = svd.compress(model[2], 4, svd.Params())
    return model, reference, data, new


@one_thread
def check_refiner(refiner: Any, params: Any = None, *, registry: Registry | None = None,
                  seed: int = 0) -> None:
    """A refiner trains only the new modules, leaves the model alone, and is deterministic.

    On a small MLP whose middle Linear is replaced by a rank-4 SVD module (not in the
    model, as the engine hands it over) with three calibration batches:
    :meth:`~musco_core.Refiner.objective` is a finite number >= 0 before and after;
    :meth:`~musco_core.Refiner.refine` changes no parameter or buffer of the model or
    the reference, leaves no ``.grad`` on any of them or the new module, does not put the
    new module into the model, and two runs from the same start give the same weights.
    ``params`` default to ``Params()``; pass small ``steps`` to keep it fast.
    """
    from musco_core.calibration import CalibrationData
    from musco_core.context import RunContext

    strategy = _resolve("refiners", refiner, registry)
    params = _params(strategy, params, f"refiner {strategy.name!r}")
    label = f"refiner {strategy.name!r}"
    results = []
    for _ in range(2):
        model, reference, data, new = _refine_stand_in(seed)
        before = {"model": _weights(model), "reference": _weights(reference)}
        context = RunContext(model=model, example_inputs=data[0], stats={},
                             calibration=CalibrationData(data), reference=reference, costs={},
                             statistics={}, resources={})
        modules = {"2": new}
        _number(strategy.objective(modules, context, params), label, "objective() before")
        if strategy.enabled(params):
            strategy.refine(modules, context, params)
        _number(strategy.objective(modules, context, params), label, "objective() after")
        assert model[2] is not new and isinstance(model[2], nn.Linear), (
            f"{label}: refine() put the new module into the model (the engine swaps it)")
        _unchanged(model, before["model"], label, "refine()")
        _unchanged(reference, before["reference"], label, "refine()")
        for where, module in (("model", model), ("reference", reference), ("new module", new)):
            stray = [n for n, p in module.named_parameters() if p.grad is not None]
            assert not stray, f"{label}: refine() left .grad on the {where}'s {stray}"
        results.append(_weights(new))
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), (
            f"{label}: two runs from the same start differ in the new module's {key!r} "
            "(seed what is random)")
