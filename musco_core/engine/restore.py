"""Resuming: a saved state checked field by field, then a Compressor rebuilt from it.

Loaded only when a run is resumed (``Compressor.resume`` / ``from_state``, the Lightning
callback); a fresh run never imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from musco_core._util import device_of
from musco_core.engine.state import RecordedTable, RunState, rank_from_plain
from musco_core.errors import SpecError
from musco_core.persist import StateFileError, check_state, load_state_into, read_spec, rebuild
from musco_core.plan import Plan
from musco_core.registry import Registry, default_registry
from musco_core.report import StepReport
from musco_core.resolve import resolve_rules
from musco_core.spec import Spec
from musco_core.stats import LayerStats, param_count

if TYPE_CHECKING:
    from musco_core.engine.compressor import Compressor


def from_state(cls: type[Compressor], state: Any, model: nn.Module, *, example_inputs: Any,
               calibration: Any, latency: Any, progress: bool | None,
               registry: Registry | None, source: str) -> Compressor:
    """``Compressor.from_state``: check ``state``, rebuild the model, attach the run."""
    registry = registry or default_registry()
    if not isinstance(state, Mapping):
        raise StateFileError(f"{source} must be a mapping (what Compressor.state_dict() "
                             f"returns), got {type(state).__name__}")
    if "spec" not in state:
        raise StateFileError.at("spec", f"{source} is incomplete: missing")
    spec = read_spec(state, source)
    try:
        rules = resolve_rules(spec, registry)
    except SpecError as exc:
        raise StateFileError.at("spec", "the saved spec does not fit this registry: "
                                + "; ".join(exc.problems), source) from exc
    run_state = state_from_dict(state, spec, model, source=source)
    data = cls._calibration_data(spec, calibration, None)
    work = copy.deepcopy(model)
    rebuild(work, state["manifest"], registry, source=source)
    load_state_into(work, state["model"], source)
    if data is not None:
        data.device = device_of(work)
    self = cls.__new__(cls)
    self._attach(run_state, work, registry, rules,
                 example_inputs=example_inputs, data=data, latency=latency,
                 progress=progress, original=model)
    return self


def state_from_dict(state: Any, spec: Spec, original: nn.Module, *,
                    source: str = "the state") -> RunState:
    """The state saved by :meth:`to_dict` (``original``: the uncompressed architecture).

    Everything is checked against ``spec`` and ``original`` first: the plan, the
    position, the manifest entries' names, rounds and rules (see
    :func:`musco_core.persist.check_state`), the statistics, reports, model totals and
    joint rules' ranks and tables. Each problem is a
    :class:`~musco_core.StateFileError` naming the field (``... @ position``).
    """
    def fail(field: str, message: str) -> StateFileError:
        return StateFileError.at(field, message, source)

    if not isinstance(state, Mapping):
        raise StateFileError(f"{source} must be a mapping (what Compressor.state_dict() "
                             f"returns), got {type(state).__name__}")
    for key in REQUIRED_KEYS:
        if key not in state:
            raise StateFileError.at(key, f"{source} is incomplete: missing")
    plan = check_state(state, spec, original, source)
    for k, step in enumerate(plan.steps[state["position"]:], start=state["position"]):
        for rnd, name in step:
            if rnd == plan.round and _compressed_entry(plan, name) is None:
                raise fail(f"plan.steps[{k}]", f"layer {name!r} of a step still to run is "
                           f"not a layer the plan of round {rnd} compresses")
            try:
                original.get_submodule(name)
            except AttributeError:
                raise fail(f"plan.steps[{k}]", f"layer {name!r} does not exist in the given "
                           "model") from None
    stats = state["stats"]
    if not isinstance(stats, Mapping):
        raise fail("stats", f"the statistics must be a mapping, got {type(stats).__name__}")
    layer_stats = {}
    for name, data in stats.items():
        try:
            layer_stats[name] = _stats_from_dict(data)
        except Exception as exc:  # noqa: BLE001 - any malformed statistics
            raise fail(f"stats[{name!r}]", f"unreadable layer statistics "
                       f"({type(exc).__name__}: {exc})") from None
    reports = []
    for i, data in enumerate(state["reports"]):
        try:
            reports.append(StepReport.from_dict(data))
        except Exception as exc:  # noqa: BLE001 - any malformed report
            raise fail(f"reports[{i}]", f"unreadable step report "
                       f"({type(exc).__name__}: {exc})") from None
    params_before = state.get("model_params_before")
    flops_before = state.get("model_flops_before", 0)
    totals = {"model_params_before": (param_count(original) if params_before is None
                                      else params_before),
              "model_flops_before": flops_before,
              "model_flops_now": state.get("model_flops_now", flops_before)}
    for key, value in totals.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(key, f"{key} must be an int >= 0, got {value!r}")
    return RunState(
        spec=spec, plan=plan, stats=layer_stats, position=state["position"],
        manifest=[dict(e) for e in state["manifest"]], reports=reports,
        joint_ranks=_joint_ranks(state.get("joint_ranks", {}), len(spec.rules), fail),
        joint_tables=_joint_tables(state.get("joint_tables", {}), len(spec.rules), fail),
        **totals,
    )


#: The keys a state must have to resume a run.
REQUIRED_KEYS = ("spec", "plan", "position", "manifest", "stats", "reports", "model")


def _compressed_entry(plan: Plan, name: str) -> Any:
    try:
        entry = plan.entry(name)
    except KeyError:
        return None
    return entry if entry.status == "compress" else None


def _rule_key(key: Any, rules: int, field: str, fail) -> int:
    try:
        index = int(key)
    except (TypeError, ValueError):
        raise fail(field, f"{key!r} is not a rule index") from None
    if not 0 <= index < rules:
        raise fail(field, f"no rule {index} in the spec ({rules} rules)")
    return index


def _joint_ranks(data: Any, rules: int, fail) -> dict[int, dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise fail("joint_ranks", f"must be a mapping, got {type(data).__name__}")
    out = {}
    for key, ranks in data.items():
        index = _rule_key(key, rules, "joint_ranks", fail)
        if not isinstance(ranks, Mapping) or not all(
                isinstance(n, str) and (r is None or _plain_rank_ok(r)) for n, r in ranks.items()):
            raise fail("joint_ranks", f"the ranks of rule {index} must map layer names to "
                       f"ranks, got {ranks!r}")
        out[index] = {n: rank_from_plain(r) for n, r in ranks.items()}
    return out


def _joint_tables(data: Any, rules: int, fail) -> dict[int, RecordedTable]:
    if not isinstance(data, Mapping):
        raise fail("joint_tables", f"must be a mapping, got {type(data).__name__}")
    out = {}
    for key, table in data.items():
        index = _rule_key(key, rules, "joint_tables", fail)
        if not isinstance(table, Mapping) or not isinstance(table.get("text", ""), str):
            raise fail("joint_tables", f"the table of rule {index} must be a mapping with "
                       f"'text', got {table!r}")
        out[index] = RecordedTable(table.get("text", ""), table.get("data"))
    return out


def _plain_rank_ok(rank: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(rank, list):
        return bool(rank) and all(is_int(v) for v in rank)
    return is_int(rank)


def _stats_from_dict(data: dict[str, Any]) -> LayerStats:
    def count(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected an int >= 0, got {value!r}")
        return value

    def shape(value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a shape (a list of ints), got {value!r}")
        return tuple(count(v) for v in value)

    return LayerStats(input_shape=shape(data["input_shape"]),
                      output_shape=shape(data["output_shape"]),
                      params=count(data["params"]), flops=count(data["flops"]),
                      calls=count(data.get("calls", 1)))
