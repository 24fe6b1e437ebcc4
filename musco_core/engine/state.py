"""A run's state as plain data: the one path for saving, resuming and fresh runs."""

from __future__ import annotations

import copy
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
