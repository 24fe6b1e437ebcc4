"""The staged compression engine: a few layers per step, fine-tuning in between."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from torch import nn

from musco_core.errors import CompressionError
from musco_core.plan import (
    Plan,
    ResolvedRule,
    build_plan,
    candidate_layers,
    resolve_rules,
    select_rank,
)
from musco_core.persist import FORMAT, VERSION, atomic_save, load_state_into, read_state, rebuild
from musco_core.registry import Registry, default_registry
from musco_core.report import LayerReport, RunReport, StepReport
from musco_core.spec import Spec, unstructure_params
from musco_core.stats import LayerStats, collect_stats, param_count, probe_module
from musco_core.strategies import Layer
from musco_core.surgery import replace_modules


class Compressor:
    """Compresses the layers a :class:`Spec` selects, ``layers_per_step`` layers per :meth:`step`.

    ::

        compressor = musco.Compressor(model, spec, example_inputs=torch.randn(1, 3, 32, 32))
        while not compressor.done:
            report = compressor.step()
            fine_tune(compressor.model)

    :param model: the trained model. By default it is deep-copied and the copy is
        compressed (``compressor.model``); with ``inplace=True`` ``model`` itself is
        changed.
    :param spec: a :class:`Spec`. It is checked against the registry and the model
        before anything is compressed; problems raise :class:`SpecError`.
    :param example_inputs: inputs for one forward pass that records each layer's
        shapes and FLOPs: a tensor, a tuple of positional arguments or a dict of
        keyword arguments. Layers are measured on them, so use the batch size you
        want FLOPs reported for.
    :param progress: show a progress bar per step; ``None`` shows it when stderr
        is a terminal.
    :param registry: the strategy registry; the default one loads the ``musco``
        entry points.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: Spec,
        example_inputs: Any,
        *,
        inplace: bool = False,
        progress: bool | None = None,
        registry: Registry | None = None,
    ):
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a musco.Spec, got {type(spec).__name__}")
        self._setup(spec, registry, progress)
        self.model = model if inplace else copy.deepcopy(model)
        self.stats: dict[str, LayerStats] = collect_stats(
            self.model, example_inputs, candidate_layers(self.model)
        )
        self.plan: Plan = build_plan(self.model, spec, self.rules, self.stats)
        self.model_params_before = param_count(self.model)

    def _setup(self, spec: Spec, registry: Registry | None, progress: bool | None) -> None:
        self.registry = registry or default_registry()
        self.spec = spec
        self.rules: tuple[ResolvedRule, ...] = resolve_rules(spec, self.registry)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.position = 0
        self.reports: list[StepReport] = []
        #: Replaced layers in the order they were replaced: name, round, decomposition,
        #: rank and decomposition parameters. Enough to rebuild the structure.
        self.manifest: list[dict[str, Any]] = []

    # -- saving and resuming -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: spec, plan, position, manifest, stats, reports, weights.

        Plain data and tensors only (no pickled classes).
        """
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
            "model": self.model.state_dict(),
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file, then rename).

        Save after fine-tuning a step: :meth:`resume` continues from here, and
        :func:`musco_core.load_compressed` rebuilds the compressed model from it.
        """
        atomic_save(self.state_dict(), path)

    @classmethod
    def resume(
        cls,
        path: str | Path,
        model: nn.Module,
        *,
        progress: bool | None = None,
        registry: Registry | None = None,
    ) -> Compressor:
        """Continue a run saved with :meth:`save`.

        :param model: a fresh instance of the original, uncompressed architecture
            (it is not modified); the saved replacements are rebuilt on a copy of it
            and the saved weights loaded.
        """
        state = read_state(path)
        self = cls.__new__(cls)
        self._setup(Spec.from_dict(state["spec"]), registry, progress)
        work = copy.deepcopy(model)
        rebuild(work, state["manifest"], self.registry)
        load_state_into(work, state["model"], str(path))
        self.model = work
        self.plan = Plan.from_dict(state["plan"])
        self.position = int(state["position"])
        self.manifest = [dict(e) for e in state["manifest"]]
        self.stats = {n: _stats_from_dict(d) for n, d in state["stats"].items()}
        self.reports = [StepReport.from_dict(r) for r in state["reports"]]
        self.model_params_before = int(state.get("model_params_before", param_count(model)))
        return self

    def report(self) -> RunReport:
        """The whole run so far: every step's report and the totals (see :class:`RunReport`)."""
        return RunReport(steps=tuple(self.reports), model_params_before=self.model_params_before,
                         model_params_after=param_count(self.model))

    @property
    def done(self) -> bool:
        """Whether every step of every round has run."""
        return self.position >= len(self.plan.steps) and self.plan.round >= self.spec.rounds

    def _replan_if_new_round(self) -> None:
        """Plan the next round on the model as it is now, when the next step starts one.

        Later rounds were projected (each rule keeping its layers); planning them for
        real lets rules match the factorized layers. Raises :class:`SpecError`
        without changing anything.
        """
        steps = self.plan.steps
        while self.plan.round < self.spec.rounds and (
            self.position >= len(steps) or steps[self.position][0][0] > self.plan.round
        ):
            compressed_by = {e["name"]: e["rule"] for e in self.manifest}
            rnd = self.plan.round + 1
            new = build_plan(self.model, self.spec, self.rules, self.stats, rnd, compressed_by)
            self.plan = Plan(entries=new.entries, steps=steps[: self.position] + new.steps,
                             round=rnd)
            steps = self.plan.steps

    @property
    def hook(self):
        return self.registry.pm.hook

    def step(self) -> StepReport:
        """Compress the next ``layers_per_step`` layers of the plan; mutates :attr:`model`.

        The step is atomic: the new modules are all built before any is swapped
        in, so if a layer fails (a plugin raises, a shape check fails) the model
        is exactly as it was and :class:`CompressionError` names the layer and
        the strategy. Layers whose rank rule chooses not to compress them, or
        whose rank would not make them smaller, are reported as skipped.
        """
        if self.done:
            raise RuntimeError(
                f"compression is done: all {len(self.plan.steps)} steps have run "
                "(check compressor.done before calling step())"
            )
        self._replan_if_new_round()
        index = self.position
        if index >= len(self.plan.steps):  # the remaining rounds matched no layer
            report = StepReport(step=index, layers=())
            self.reports.append(report)
            return report
        work = self.plan.steps[index]
        self.hook.musco_step_started(compressor=self, step=index, layers=[n for _, n in work])
        started = time.perf_counter()
        try:
            built: dict[str, nn.Module] = {}
            reports = []
            for rnd, name in self._progress(work, index):
                new, report = self._compress_layer(rnd, name)
                reports.append(report)
                if new is not None:
                    built[name] = new
            replace_modules(self.model, built)
        except BaseException as exc:
            self.hook.musco_step_failed(compressor=self, step=index, error=exc)
            raise
        for report in reports:
            if report.status == "compressed":
                rule = self.plan.entry(report.name).rule
                params = self.rules[rule].decomposition.params
                self.manifest.append({
                    "name": report.name, "round": report.round, "rule": rule,
                    "decomposition": report.decomposition,
                    "rank": list(report.rank) if isinstance(report.rank, tuple) else report.rank,
                    "params": unstructure_params(params),
                })
        for name, new in built.items():
            old = self.stats[name]
            flops, _ = probe_module(new, old.input_shape)
            self.stats[name] = LayerStats(old.input_shape, old.output_shape, param_count(new),
                                          flops * old.calls, old.calls)
        self.position += 1
        report = StepReport(step=index, layers=tuple(reports),
                            seconds=time.perf_counter() - started)
        self.reports.append(report)
        self.hook.musco_step_finished(compressor=self, step=index, report=report)
        return report

    def preview(self) -> list[LayerReport]:
        """What the current round would do, without changing anything.

        One :class:`LayerReport` per planned layer with status ``"planned"``: the
        rank the rule chooses now and the decomposition's parameter and FLOP
        counts at that rank (nothing is decomposed, so there is no error), or
        ``"skipped"`` with the reason.
        """
        rows = []
        for name in self.plan.layers:
            choice = self._choose(self.plan.round, name)
            if choice.skipped is not None:
                rows.append(choice.skipped)
                continue
            decomposition = choice.rule.decomposition.strategy
            rows.append(LayerReport(
                status="planned", rank=choice.rank,
                params_after=decomposition.param_count(choice.module, choice.rank),
                flops_after=decomposition.flop_count(choice.module, choice.rank, choice.stats),
                **choice.base))
        return rows

    def _progress(self, work, index):
        if not self.progress or len(work) < 2:
            return work
        from tqdm.auto import tqdm

        return tqdm(work, desc=f"musco step {index}", unit="layer", leave=False)

    def _choose(self, rnd: int, name: str) -> _Choice:
        """Check the layer and ask its rule for a rank; the report if it is left as it is.

        Raises :class:`CompressionError` naming the layer and the strategy.
        """
        rule = self.rules[self.plan.entry(name).rule]
        decomposition = rule.decomposition.strategy
        module = self.model.get_submodule(name)
        stats = self.stats[name]
        base = {"name": name, "round": rnd, "decomposition": rule.decomposition.name,
                "rank_rule": rule.rank.name, "params_before": stats.params,
                "flops_before": stats.flops}
        rank_label = f"rank rule {rule.rank.name!r}"
        dec_label = f"decomposition {rule.decomposition.name!r}"
        try:
            decomposition.check(name, module)
        except Exception as exc:
            raise _failure(name, rnd, f"{dec_label} cannot handle it", exc, dec_label) from exc
        try:
            rank = select_rank(rule, Layer(name, module, stats, rnd))
        except Exception as exc:
            raise _failure(name, rnd, f"{rank_label} failed", exc, rank_label) from exc
        choice = _Choice(rule, module, stats, base, rank)
        unchanged = {"params_after": stats.params, "flops_after": stats.flops, **base}
        if rank is None:
            choice.skipped = LayerReport(status="skipped", reason="rank rule left it uncompressed",
                                         **unchanged)
            return choice
        message = decomposition.validate_rank(module, rank)
        if message:
            raise _failure(name, rnd, f"{rank_label} chose an invalid rank: {message}", None,
                           rank_label)
        params_after = decomposition.param_count(module, rank)
        if params_after >= stats.params:
            choice.skipped = LayerReport(
                status="skipped", rank=rank,
                reason=f"rank {rank} would not shrink it ({params_after} >= {stats.params} params)",
                **unchanged)
        return choice

    def _compress_layer(self, rnd: int, name: str) -> tuple[nn.Module | None, LayerReport]:
        started = time.perf_counter()
        choice = self._choose(rnd, name)
        if choice.skipped is not None:
            return None, choice.skipped
        rule, rank, stats = choice.rule, choice.rank, choice.stats
        dec_label = f"decomposition {rule.decomposition.name!r}"
        try:
            new, error = rule.decomposition.strategy.compress(choice.module, rank,
                                                              rule.decomposition.params)
        except Exception as exc:
            raise _failure(name, rnd, f"{dec_label} failed at rank {rank!r}", exc,
                           dec_label) from exc
        try:
            flops, out_shape = probe_module(new, stats.input_shape)
        except Exception as exc:
            raise _failure(name, rnd, f"the module built by {dec_label} does not run", exc,
                           dec_label) from exc
        if out_shape != stats.output_shape:
            raise _failure(
                name, rnd, f"shape check failed: the module built by {dec_label} gives output "
                f"shape {out_shape}, expected {stats.output_shape}", None, dec_label)
        return new, LayerReport(
            status="compressed", rank=rank, params_after=param_count(new),
            flops_after=flops * stats.calls, rel_error=error,
            seconds=time.perf_counter() - started, **choice.base,
        )


@attrs.define
class _Choice:
    """A layer about to be compressed: its rule, module, stats, report fields and rank."""

    rule: ResolvedRule
    module: nn.Module
    stats: LayerStats
    base: dict[str, Any]
    rank: Any
    #: The report of a layer left as it is (no rank, or a rank that would not shrink it).
    skipped: LayerReport | None = None


def _failure(name: str, rnd: int, what: str, exc: BaseException | None,
             strategy: str) -> CompressionError:
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return CompressionError(
        f"layer {name!r} (round {rnd}): {what}{detail}; the model is unchanged",
        layer=name, strategy=strategy,
    )


def _stats_to_dict(stats: LayerStats) -> dict[str, Any]:
    data = attrs.asdict(stats)
    data["input_shape"] = list(stats.input_shape)
    data["output_shape"] = list(stats.output_shape)
    return data


def _stats_from_dict(data: dict[str, Any]) -> LayerStats:
    return LayerStats(input_shape=tuple(data["input_shape"]),
                      output_shape=tuple(data["output_shape"]),
                      params=int(data["params"]), flops=int(data["flops"]),
                      calls=int(data["calls"]))
