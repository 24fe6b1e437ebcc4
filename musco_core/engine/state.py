"""A run's state as plain data: the one path for saving, resuming and fresh runs."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from musco_core.plan import Plan, build_plan, candidate_layers
from musco_core.report import StepReport
from musco_core.spec import Spec
from musco_core.stats import LayerStats, collect_stats, model_flops, param_count


@attrs.frozen
class StepView:
    """A read-only view of a run for the step hooks: do not change what it holds."""

    model: nn.Module
    spec: Spec
    plan: Plan
    #: Steps done so far (the index of the next step).
    position: int
    reports: tuple[StepReport, ...]
    manifest: tuple[dict[str, Any], ...]


@attrs.frozen
class RecordedTable:
    """A joint rule's table as saved in a state file: its text and plain data."""

    text: str
    data: Any = None

    def __str__(self) -> str:
        return self.text


@attrs.define
class RunState:
    """Everything a run carries between steps, apart from the model and the data.

    ``to_dict``/``from_dict`` is the state file's plain form (no pickled classes);
    a fresh run (:meth:`fresh`) and a resumed one (:meth:`from_dict`) are the same
    object, so a resumed run cannot drift from an uninterrupted one.
    """

    spec: Spec
    plan: Plan
    stats: dict[str, LayerStats]
    model_params_before: int
    model_flops_before: int
    model_flops_now: int
    position: int = 0
    #: Replaced layers in the order they were replaced: name, round, rule,
    #: decomposition, rank and decomposition parameters. Enough to rebuild the structure.
    manifest: list[dict[str, Any]] = attrs.Factory(list)
    reports: list[StepReport] = attrs.Factory(list)
    #: Ranks chosen together by joint rank rules for the current round:
    #: ``{rule index: {layer: rank or None}}``.
    joint_ranks: dict[int, dict[str, Any]] = attrs.Factory(dict)
    #: Tables joint rules recorded when they chose (e.g. the budget's sensitivity).
    joint_tables: dict[int, Any] = attrs.Factory(dict)

    @classmethod
    def fresh(cls, model: nn.Module, spec: Spec, rules: Any, example_inputs: Any,
              formulas: Any = (), total_formulas: Any = ()) -> RunState:
        """The state before the first step: layer statistics, the plan, model totals."""
        stats = collect_stats(model, example_inputs, candidate_layers(model), formulas)
        flops = model_flops(model, example_inputs, total_formulas)
        return cls(spec=spec, plan=build_plan(model, spec, rules, stats), stats=stats,
                   model_params_before=param_count(model), model_flops_before=flops,
                   model_flops_now=flops)

    def to_dict(self, model: nn.Module) -> dict[str, Any]:
        """Plain data and tensors only: the state file's contents (with ``model``'s weights)."""
        from musco_core.persist import FORMAT, VERSION

        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec.to_dict(),
            "plan": self.plan.to_dict(),
            "position": self.position,
            "manifest": copy.deepcopy(self.manifest),
            "stats": {n: _stats_to_dict(s) for n, s in self.stats.items()},
            "reports": [r.to_dict() for r in self.reports],
            "model_params_before": self.model_params_before,
            "model_flops_before": self.model_flops_before,
            "model_flops_now": self.model_flops_now,
            "joint_ranks": {str(k): {n: plain_rank(r) for n, r in v.items()}
                            for k, v in self.joint_ranks.items()},
            "joint_tables": {str(k): _table_to_dict(t) for k, t in self.joint_tables.items()},
            "model": model.state_dict(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], spec: Spec, original: nn.Module, *,
                  source: str = "the state") -> RunState:
        """The state saved by :meth:`to_dict` (``original``: the uncompressed architecture).

        Everything is checked against ``spec`` and ``original`` first: the plan, the
        position, the manifest entries' names, rounds and rules (see
        :func:`musco_core.persist.check_state`), the statistics, reports, model totals and
        joint rules' ranks and tables. Each problem is a
        :class:`~musco_core.StateFileError` naming the field (``... @ position``).
        """
        from musco_core.persist import StateFileError, check_state

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
        return cls(
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


def plain_rank(rank: Any) -> Any:
    """A rank as plain data (a tuple rank becomes a list)."""
    return list(rank) if isinstance(rank, tuple) else rank


def rank_from_plain(rank: Any) -> Any:
    """A rank from plain data (a list becomes a tuple)."""
    return tuple(rank) if isinstance(rank, list) else rank


def _table_to_dict(table: Any) -> dict[str, Any]:
    to_dict = getattr(table, "to_dict", None)
    return {"text": str(table), "data": to_dict() if callable(to_dict) else None}


def _stats_to_dict(stats: LayerStats) -> dict[str, Any]:
    data = attrs.asdict(stats)
    data["input_shape"] = list(stats.input_shape)
    data["output_shape"] = list(stats.output_shape)
    return data


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
