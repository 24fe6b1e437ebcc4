"""One step as a transaction: choose -> build -> check -> fit -> gate -> swap, all or none."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from musco_core.errors import CompressionError
from musco_core.plan import low_rank_warning, select_rank, skip_reason
from musco_core.report import LayerReport
from musco_core.resolve import ResolvedRule
from musco_core.stats import LayerStats, param_count, probe_module
from musco_core.strategies import Layer
from musco_core.surgery import replace_modules

if TYPE_CHECKING:
    from musco_core.context import RoundContext, RunContext
    from musco_core.engine.compressor import Compressor

#: A relative weight error above this earns a warning in the layer's report.
HIGH_ERROR = 0.5


@attrs.define
class Choice:
    """A layer about to be compressed: its rule, module, stats, report fields and rank."""

    rule: ResolvedRule
    module: nn.Module
    stats: LayerStats
    base: dict[str, Any]
    rank: Any
    data: Any = None
    #: The report of a layer left as it is (no rank, or a rank that would not shrink it).
    skipped: LayerReport | None = None


@attrs.frozen
class Built:
    module: nn.Module
    #: The statistics the layer will have once the new module is in (measured before the swap).
    stats: LayerStats


class Step:
    """The layers of one step, compressed as a transaction.

    Nothing touches the model until :meth:`swap`; if any stage raises (a plugin
    fails, a shape check fails, the user interrupts), the model is as it was.
    """

    def __init__(self, run: Compressor, index: int, work: list[tuple[int, str]]):
        self.run = run
        self.index = index
        self.work = work
        self._context: RunContext | None = None
        self.built: dict[str, Built] = {}
        self.reports: dict[str, LayerReport] = {}
        #: Model-level fields of the step report (e.g. a refiner's ``model_output_error``).
        self.step_fields: dict[str, float] = {}

    @property
    def context(self) -> RunContext:
        """The step's :class:`RunContext` (made when a gate, refiner or fit first needs it)."""
        if self._context is None:
            self._context = self.run.context()
        return self._context

    def execute(self) -> list[dict[str, Any]]:
        """Run every stage and swap the new modules in; returns the manifest entries."""
        names = [name for _, name in self.work]
        self.run.ensure_joint_ranks(names)
        data = self.run.layer_data(names)
        for rnd, name in self.run.progress_over(self.work, self.index):
            started = time.perf_counter()
            choice = self.choose(rnd, name, data.get(name))
            if choice.skipped is not None:
                self.reports[name] = choice.skipped
                continue
            new, error = self.build(rnd, name, choice)
            self.reports[name], stats = self.check(rnd, name, choice, new, error, started)
            self.built[name] = Built(new, stats)
        if self.run.calibration is not None and self.built:
            self.fit()
        self.gate()
        return self.swap()

    # -- choose --------------------------------------------------------------------------

    def choose(self, rnd: int, name: str, data: Any = None) -> Choice:
        """Check the layer, ask its rule for a rank and its gates to adjust it.

        Raises :class:`CompressionError` naming the layer and the strategy.
        """
        run = self.run
        rule = run.rules[run.plan.entry(name).rule]
        decomposition = rule.decomposition.strategy
        module = run.model.get_submodule(name)
        stats = run.stats[name]
        base = {"name": name, "round": rnd, "decomposition": rule.decomposition.name,
                "rank_rule": rule.rank.name, "params_before": stats.params,
                "flops_before": stats.flops}
        rank_label = f"rank rule {rule.rank.name!r}"
        dec_label = f"decomposition {rule.decomposition.name!r}"
        try:
            decomposition.check(name, module)
        except Exception as exc:
            raise failure(name, rnd, f"{dec_label} cannot handle it", exc, dec_label) from exc
        layer = Layer(name, module, stats, rnd, data)
        try:
            if rule.rank.strategy.joint:
                rank = run.joint_ranks[rule.index][name]
            else:
                rank = select_rank(rule, layer)
            reason = skip_reason(rule, layer) if rank is None else ""
        except Exception as exc:
            raise failure(name, rnd, f"{rank_label} failed", exc, rank_label) from exc
        if rank is not None:
            for gate in rule.gates:
                try:
                    rank, fields = gate.strategy.adjust(layer, rank, self.rule_context(rule),
                                                        gate.params)
                except Exception as exc:
                    raise failure(name, rnd, f"gate {gate.name!r} failed", exc,
                                  f"gate {gate.name!r}") from exc
                base.update(gate_fields(gate.name, name, rnd, fields))
        choice = Choice(rule, module, stats, base, rank, data)
        unchanged = {"params_after": stats.params, "flops_after": stats.flops, **base}
        if rank is None:
            choice.skipped = LayerReport(status="skipped", reason=reason, **unchanged)
            return choice
        message = decomposition.validate_rank(module, rank)
        if message:
            raise failure(name, rnd, f"{rank_label} chose an invalid rank: {message}", None,
                          rank_label)
        params_after = decomposition.param_count(module, rank)
        if params_after >= stats.params:
            choice.skipped = LayerReport(
                status="skipped", rank=rank,
                reason=f"rank {rank} would not shrink it ({params_after} >= {stats.params} params)",
                **unchanged)
        return choice

    def rule_context(self, rule: ResolvedRule) -> RoundContext:
        from musco_core.context import RoundContext

        return RoundContext(self.context, rule.decomposition.strategy, rule.decomposition.params,
                            rule.rank.limits, rule.rank.strategy.rounding)

    # -- build and check -----------------------------------------------------------------

    def build(self, rnd: int, name: str, choice: Choice) -> tuple[nn.Module, float]:
        rule, rank = choice.rule, choice.rank
        label = f"decomposition {rule.decomposition.name!r}"
        decomposition, params = rule.decomposition.strategy, rule.decomposition.params
        try:
            if choice.data is not None and decomposition.needs(params):
                new, error = decomposition.compress(choice.module, rank, params, data=choice.data)
            else:
                new, error = decomposition.compress(choice.module, rank, params)
        except Exception as exc:
            raise failure(name, rnd, f"{label} failed at rank {rank!r}", exc, label) from exc
        if not all(bool(torch.isfinite(p).all()) for p in new.parameters()
                   if p.is_floating_point()):
            raise failure(name, rnd, f"{label} produced non-finite factors (NaN or Inf) at "
                          f"rank {rank!r}; check the layer's weights", None, label)
        return new, error

    def check(self, rnd: int, name: str, choice: Choice, new: nn.Module, error: float,
              started: float) -> tuple[LayerReport, LayerStats]:
        """Run the new module on the layer's input shape: it must give the layer's output shape."""
        stats, rank = choice.stats, choice.rank
        label = f"decomposition {choice.rule.decomposition.name!r}"
        try:
            flops, out_shape = probe_module(new, stats.input_shape, self.run.flop_formulas)
        except Exception as exc:
            raise failure(name, rnd, f"the module built by {label} does not run", exc,
                          label) from exc
        if out_shape != stats.output_shape:
            raise failure(
                name, rnd, f"shape check failed: the module built by {label} gives output "
                f"shape {out_shape}, expected {stats.output_shape}", None, label)
        new_stats = LayerStats(stats.input_shape, stats.output_shape, param_count(new),
                               flops * stats.calls, stats.calls)
        full = choice.rule.decomposition.strategy.full_rank(choice.module)
        warning = low_rank_warning(name, rank, full) or ""
        if not warning and error > HIGH_ERROR and choice.data is None:
            # (a data-aware fit may move the weight far where the data never goes; its
            # output error, measured later, is what counts)
            warning = (f"layer {name!r}: relative weight error {error:.2f} at rank {rank!r}; "
                       "expect a large loss there")
        report = LayerReport(
            status="compressed", rank=rank, params_after=new_stats.params,
            flops_after=new_stats.flops, rel_error=error,
            seconds=time.perf_counter() - started, warning=warning, **choice.base)
        return report, new_stats

    # -- fit, gate, swap -----------------------------------------------------------------

    def fit(self) -> None:
        """Output errors on the calibration data, and refinement if the spec asks for it.

        Refinement never makes its objective worse: if it would, the factors from
        before refinement are kept.
        """
        modules = {name: b.module for name, b in self.built.items()}
        errors = self.context.output_errors(modules)
        refined_from: dict[str, float] = {}
        refiner = self.run.refiner
        if refiner is not None:
            strategy, params = refiner.strategy, refiner.params
            before = strategy.objective(modules, self.context, params)
            saved = {n: copy.deepcopy(m.state_dict()) for n, m in modules.items()}
            strategy.refine(modules, self.context, params)
            after_errors = self.context.output_errors(modules)
            after = strategy.objective(modules, self.context, params)
            better = after <= before
            if strategy.step_field:
                self.step_fields = {strategy.step_field: after if better else before}
                if better and strategy.refined_field:
                    self.step_fields[strategy.refined_field] = before
            if better:
                refined_from, errors = errors, after_errors
            else:
                for n, m in modules.items():
                    m.load_state_dict(saved[n])
        for name, error in errors.items():
            self.reports[name] = attrs.evolve(self.reports[name], output_error=error,
                                              refined_from=refined_from.get(name))

    def gate(self) -> None:
        """Drop the built layers a gate of their rule does not keep (reported as skipped)."""
        run = self.run
        for name in list(self.built):
            rule = run.rules[run.plan.entry(name).rule]
            for gate in rule.gates:
                layer = Layer(name, run.model.get_submodule(name), run.stats[name],
                              run.plan.round)
                try:
                    verdict = gate.strategy.keep(layer, self.built[name].module,
                                                 self.rule_context(rule), gate.params)
                except Exception as exc:
                    raise failure(name, run.plan.round, f"gate {gate.name!r} failed", exc,
                                  f"gate {gate.name!r}") from exc
                fields = gate_fields(gate.name, name, run.plan.round, verdict.fields)
                report = attrs.evolve(self.reports[name], **fields)
                if not verdict.keep:
                    stats = run.stats[name]
                    report = attrs.evolve(report, status="skipped", params_after=stats.params,
                                          flops_after=stats.flops, reason=verdict.reason)
                    del self.built[name]
                self.reports[name] = report
                if not verdict.keep:
                    break

    def swap(self) -> list[dict[str, Any]]:
        entries = [self.run.manifest_entry(self.reports[name]) for name in self.built]
        replace_modules(self.run.model, {name: b.module for name, b in self.built.items()})
        return entries


#: The layer report fields a gate may fill (everything else is the engine's).
GATE_FIELDS = frozenset({"time_before", "time_after"})


def gate_fields(gate: str, name: str, rnd: int, fields: Any) -> dict[str, Any]:
    """A gate's report fields, checked: only :data:`GATE_FIELDS` may be set."""
    fields = dict(fields)
    wrong = sorted(set(fields) - GATE_FIELDS)
    if wrong:
        raise failure(name, rnd, f"gate {gate!r} returned report fields {wrong}; a gate may "
                      f"set only {sorted(GATE_FIELDS)}", None, f"gate {gate!r}")
    return fields


def failure(name: str, rnd: int, what: str, exc: BaseException | None,
            strategy: str) -> CompressionError:
    """A :class:`CompressionError` naming the layer, the round and the strategy."""
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return CompressionError(
        f"layer {name!r} (round {rnd}): {what}{detail}; the model is unchanged",
        layer=name, strategy=strategy,
    )
