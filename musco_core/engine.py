"""The staged compression engine: a few layers per step, fine-tuning in between."""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from musco_core.calibration import CalibrationData, LayerData, collect_layer_data
from musco_core.errors import CompressionError, MuscoWarning, SpecError
from musco_core.plan import (
    Plan,
    ResolvedRule,
    build_plan,
    candidate_layers,
    low_rank_warning,
    resolve_rules,
    select_rank,
)
from musco_core.persist import FORMAT, VERSION, atomic_save, load_state_into, read_state, rebuild
from musco_core.registry import Registry, default_registry
from musco_core.report import LayerReport, RunReport, StepReport
from musco_core.spec import Spec, unstructure_params
from musco_core.stats import (
    LayerStats,
    collect_stats,
    eval_mode,
    model_flops,
    param_count,
    probe_module,
)
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
    :param calibration: optional calibration data: a re-iterable of batches (a
        list, a ``DataLoader``), each a tensor, a tuple of positional arguments or a
        dict of keyword arguments, like ``example_inputs``. Data-aware strategies
        (``svd`` with ``whiten = true``, ``budget``, local refinement) fit each
        layer's *output* on it; every compressed layer's report then also gives its
        relative output error. Batches are moved to the model's device; the spec's
        ``calibration`` table caps how much is used. The data is never saved. With
        calibration data the compressor keeps a copy of the original model (one
        more model in memory) whose layer outputs are the targets.
    :param latency: a :class:`musco_core.latency.LatencyModel` for rules with
        ``min_speedup`` and latency budgets; by default one is made on the model's
        device when a rule needs it.
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
        calibration: Any = None,
        latency: Any = None,
        inplace: bool = False,
        progress: bool | None = None,
        registry: Registry | None = None,
    ):
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a musco.Spec, got {type(spec).__name__}")
        self._setup(spec, registry, progress)
        data = None
        if calibration is not None:
            data = CalibrationData(calibration, max_batches=spec.calibration.max_batches,
                                   max_samples=spec.calibration.max_samples,
                                   device=_device_of(model))
        self._check_data_needs(data is not None)
        self.model = model if inplace else copy.deepcopy(model)
        self.example_inputs = example_inputs
        self.latency = latency
        self.stats: dict[str, LayerStats] = collect_stats(
            self.model, example_inputs, candidate_layers(self.model)
        )
        self.plan: Plan = build_plan(self.model, spec, self.rules, self.stats)
        self.model_params_before = param_count(self.model)
        self.model_flops_before = model_flops(self.model, example_inputs)
        self.model_flops_now = self.model_flops_before
        self.calibration = data
        self.original: nn.Module | None = None
        if data is not None:
            self._check_calibration(data)
            self.original = _frozen_copy(self.model)
        self._fingerprint = _fingerprint(self.model)
        for warning in self.plan.warnings:
            warnings.warn(warning, MuscoWarning, stacklevel=2)

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
        #: Ranks chosen together by joint rank rules for the current round:
        #: ``{rule index: {layer: rank or None}}``.
        self.joint_ranks: dict[int, dict[str, Any]] = {}
        #: Tables joint rules recorded when they chose (e.g. the budget's sensitivity).
        self.joint_tables: dict[int, Any] = {}
        self.calibration = None
        #: The reference model data-aware fits aim at (``Calibration.reference``).
        self.original = None
        #: ``{tensor name: (storage, version)}`` of the model when the last step ended,
        #: to notice changes made between steps (fine-tuning).
        self._fingerprint: dict[str, tuple[int, int]] | None = None
        self.latency = None
        self.example_inputs = None

    def _check_data_needs(self, have_data: bool) -> None:
        """A strategy that cannot work without calibration data is a spec error up front."""
        if have_data:
            return
        problems = []
        for rule in self.rules:
            for bound, path in ((rule.decomposition, "decomposition"), (rule.rank, "rank")):
                if bound.strategy.requires_calibration(bound.params):
                    problems.append(
                        f"{bound.name!r} needs calibration data with these parameters; pass "
                        f"Compressor(..., calibration=batches) @ $.rules[{rule.index}].{path}")
        if self.spec.refine.steps > 0:
            problems.append("local refinement needs calibration data; pass "
                            "Compressor(..., calibration=batches) or set steps = 0 @ $.refine")
        if problems:
            raise SpecError(problems)

    def _check_calibration(self, data: CalibrationData) -> None:
        """Run the first calibration batch once, so bad data fails before anything changes."""
        for index, batch in enumerate(data):
            from musco_core.calibration import _run

            with torch.no_grad(), eval_mode(self.model):
                _run(self.model, batch, index, "the model")
            return
        raise ValueError("the calibration data is empty: pass at least one batch")

    # -- saving and resuming -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: spec, plan, position, manifest, stats, reports, weights.

        Plain data and tensors only (no pickled classes). Calibration data is not saved.
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
            "model_flops_before": self.model_flops_before,
            "model_flops_now": self.model_flops_now,
            "joint_ranks": {str(k): {n: _plain_rank(r) for n, r in v.items()}
                            for k, v in self.joint_ranks.items()},
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
        example_inputs: Any = None,
        calibration: Any = None,
        latency: Any = None,
        progress: bool | None = None,
        registry: Registry | None = None,
    ) -> Compressor:
        """Continue a run saved with :meth:`save`.

        :param model: a fresh instance of the original, uncompressed architecture
            (it is not modified); the saved replacements are rebuilt on a copy of it
            and the saved weights loaded. With ``calibration`` it is also the
            original whose layer outputs data-aware strategies fit.
        :param calibration: the calibration data again (it is never saved); needed
            when the spec's strategies need data.
        """
        state = read_state(path)
        self = cls.__new__(cls)
        self._setup(Spec.from_dict(state["spec"]), registry, progress)
        self._check_data_needs(calibration is not None)
        work = copy.deepcopy(model)
        rebuild(work, state["manifest"], self.registry)
        load_state_into(work, state["model"], str(path))
        self.model = work
        self.example_inputs = example_inputs
        self.latency = latency
        self.plan = Plan.from_dict(state["plan"])
        self.position = int(state["position"])
        self.manifest = [dict(e) for e in state["manifest"]]
        self.stats = {n: _stats_from_dict(d) for n, d in state["stats"].items()}
        self.reports = [StepReport.from_dict(r) for r in state["reports"]]
        self.model_params_before = int(state.get("model_params_before", param_count(model)))
        self.model_flops_before = int(state.get("model_flops_before", 0))
        self.model_flops_now = int(state.get("model_flops_now", self.model_flops_before))
        self.joint_ranks = {int(k): {n: _rank_from_plain(r) for n, r in v.items()}
                            for k, v in state.get("joint_ranks", {}).items()}
        if calibration is not None:
            self.calibration = CalibrationData(
                calibration, max_batches=self.spec.calibration.max_batches,
                max_samples=self.spec.calibration.max_samples, device=_device_of(work))
            self._check_calibration(self.calibration)
            self.original = _frozen_copy(model)
            self.original.to(_device_of(work))
            if self.spec.calibration.reference == "step":
                self.original = None  # taken at the start of the next step
        self._fingerprint = _fingerprint(work)
        return self

    def report(self) -> RunReport:
        """The whole run so far: every step's report and the totals (see :class:`RunReport`)."""
        return RunReport(steps=tuple(self.reports), model_params_before=self.model_params_before,
                         model_params_after=param_count(self.model),
                         model_flops_before=self.model_flops_before,
                         model_flops_after=self.model_flops_now)

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
                             round=rnd, warnings=new.warnings)
            self.joint_ranks = {}
            self.joint_tables = {}
            steps = self.plan.steps

    @property
    def hook(self):
        return self.registry.pm.hook

    def step(self) -> StepReport:
        """Compress the next ``layers_per_step`` layers of the plan; mutates :attr:`model`.

        The step is atomic: every new module is built, checked, measured (and, with
        calibration data, fitted and refined) before any is swapped in, so if a
        layer fails (a plugin raises, a shape check fails, the user interrupts) the
        model is exactly as it was and :class:`CompressionError` names the layer
        and the strategy. Layers whose rank rule chooses not to compress them,
        whose rank would not make them smaller, or that are not measurably faster
        (``min_speedup``) are reported as skipped.
        """
        if self.done:
            raise RuntimeError(
                f"compression is done: all {len(self.plan.steps)} steps have run "
                "(check compressor.done before calling step())"
            )
        self._replan_if_new_round()
        index = self.position
        if index >= len(self.plan.steps):  # the remaining rounds matched no layer
            report = StepReport(step=index, layers=(), **self._model_totals(0, 0))
            self.reports.append(report)
            return report
        work = self.plan.steps[index]
        self.hook.musco_step_started(compressor=self, step=index, layers=[n for _, n in work])
        started = time.perf_counter()
        try:
            if self.calibration is not None:
                self._refresh_reference()
            self._ensure_joint_ranks([name for _, name in work])
            data = self._layer_data([name for _, name in work])
            built: dict[str, _Built] = {}
            reports: dict[str, LayerReport] = {}
            for rnd, name in self._progress(work, index):
                new, report = self._compress_layer(rnd, name, data.get(name))
                reports[name] = report.layer
                if new is not None:
                    built[name] = _Built(new, report.stats)
            step_errors: dict[str, float] = {}
            if self.calibration is not None and built:
                step_errors = self._fit_on_data(built, reports)
            self._skip_if_not_faster(built, reports)
            entries = [self._manifest_entry(reports[name]) for name in built]
            replace_modules(self.model, {name: b.module for name, b in built.items()})
        except BaseException as exc:
            self.hook.musco_step_failed(compressor=self, step=index, error=exc)
            raise
        # Commit: nothing below can fail halfway.
        self.manifest.extend(entries)
        self._fingerprint = _fingerprint(self.model)
        saved = 0
        for name, b in built.items():
            saved += self.stats[name].flops - b.stats.flops
            self.stats[name] = b.stats
        flops_before = self.model_flops_now
        self.model_flops_now -= saved
        self.position += 1
        report = StepReport(step=index, layers=tuple(reports[name] for _, name in work),
                            seconds=time.perf_counter() - started,
                            **self._model_totals(flops_before, self.model_flops_now),
                            **step_errors)
        self.reports.append(report)
        self._call_finished_hook(index, report)
        if report.model_params_after > self.model_params_before:
            warnings.warn(
                f"the compressed model has more parameters ({report.model_params_after}) than "
                f"the original ({self.model_params_before}); check the ranks", MuscoWarning,
                stacklevel=2)
        return report

    def _refresh_reference(self) -> None:
        """Take the model as it is now as the reference, if ``Calibration.reference`` says so."""
        mode = self.spec.calibration.reference
        changed = self._fingerprint is not None and _fingerprint(self.model) != self._fingerprint
        if mode == "step" or (mode == "auto" and changed) or self.original is None:
            self.original = None  # free the old copy first
            self.original = _frozen_copy(self.model)
            self._fingerprint = _fingerprint(self.model)

    def _model_totals(self, flops_before: int, flops_after: int) -> dict[str, int]:
        params = param_count(self.model)
        before = self.reports[-1].model_params_after if self.reports else self.model_params_before
        return {"model_params_before": before, "model_params_after": params,
                "model_flops_before": flops_before or self.model_flops_now,
                "model_flops_after": flops_after or self.model_flops_now}

    def _call_finished_hook(self, index: int, report: StepReport) -> None:
        """Call ``musco_step_finished`` plugin by plugin; a raising hook is reported, not fatal.

        The step is committed by then, so a plugin's failure must not make it look failed.
        """
        caller = self.hook.musco_step_finished
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(**{k: v for k, v in
                                 {"compressor": self, "step": index, "report": report}.items()
                                 if k in impl.argnames})
            except Exception as exc:
                warnings.warn(
                    f"hook musco_step_finished of plugin {impl.plugin_name!r} raised "
                    f"{type(exc).__name__}: {exc}; step {index} is committed all the same",
                    MuscoWarning, stacklevel=3)

    def _manifest_entry(self, report: LayerReport) -> dict[str, Any]:
        rule = self.plan.entry(report.name).rule
        params = self.rules[rule].decomposition.params
        return {"name": report.name, "round": report.round, "rule": rule,
                "decomposition": report.decomposition, "rank": _plain_rank(report.rank),
                "params": unstructure_params(params)}

    def preview(self) -> list[LayerReport]:
        """What the current round would do, without changing anything.

        One :class:`LayerReport` per planned layer with status ``"planned"``: the
        rank the rule chooses now and the decomposition's parameter and FLOP
        counts at that rank (nothing is decomposed, so there is no error), or
        ``"skipped"`` with the reason. Layers the plan skipped (unsupported, tied
        weights) are listed too, and the layers of later rounds (status ``"later"``). Joint rules (``budget``) choose their ranks here
        if they have not yet, which measures the model on the calibration data.
        """
        rows = []
        self._ensure_joint_ranks(list(self.plan.layers))
        for entry in self.plan.entries:
            if entry.status == "skipped":
                stats = self.stats.get(entry.name)
                rows.append(LayerReport(
                    name=entry.name, round=self.plan.round, decomposition=entry.decomposition,
                    rank_rule=entry.rank_rule, status="skipped", reason=entry.reason,
                    params_before=stats.params if stats else 0,
                    params_after=stats.params if stats else 0,
                    flops_before=stats.flops if stats else 0,
                    flops_after=stats.flops if stats else 0))
                continue
            if entry.status != "compress":
                continue
            choice = self._choose(self.plan.round, entry.name)
            if choice.skipped is not None:
                rows.append(choice.skipped)
                continue
            decomposition = choice.rule.decomposition.strategy
            rows.append(LayerReport(
                status="planned", rank=choice.rank,
                params_after=decomposition.param_count(choice.module, choice.rank),
                flops_after=decomposition.flop_count(choice.module, choice.rank, choice.stats),
                **choice.base))
        for rnd, name, index in self.plan.later:
            rule = self.rules[index]
            stats = self.stats[name]
            rows.append(LayerReport(
                name=name, round=rnd, decomposition=rule.decomposition.name,
                rank_rule=rule.rank.name, status="later", params_before=stats.params,
                params_after=stats.params, flops_before=stats.flops, flops_after=stats.flops,
                reason=f"round {rnd}: its rank is chosen when the round starts, on the "
                       "factorized layer"))
        return rows

    def _progress(self, work, index):
        if not self.progress or len(work) < 2:
            return work
        from tqdm.auto import tqdm

        return tqdm(work, desc=f"musco step {index}", unit="layer", leave=False)

    # -- data ---------------------------------------------------------------------------

    def _needs(self, name: str) -> frozenset[str]:
        rule = self.rules[self.plan.entry(name).rule]
        return (rule.decomposition.strategy.needs(rule.decomposition.params)
                | rule.rank.strategy.needs(rule.rank.params))

    def _layer_data(self, names: list[str]) -> dict[str, LayerData]:
        """Statistics of the calibration data for the layers of ``names`` that need them.

        Collected now, on the model as it is (earlier steps compressed and maybe
        fine-tuned), beside the original model: one pass over the calibration data.
        """
        if self.calibration is None:
            return {}
        wanted = {}
        for name in names:
            if self._needs(name):
                rule = self.rules[self.plan.entry(name).rule]
                wanted[name] = (self.model.get_submodule(name), rule.decomposition.strategy)
        if not wanted:
            return {}
        assert self.original is not None
        return collect_layer_data(self.original, self.model, self.calibration, wanted)

    def _fit_on_data(self, built: dict[str, _Built],
                     reports: dict[str, LayerReport]) -> dict[str, float]:
        """Output errors on the calibration data, and local refinement if the spec asks for it.

        Refinement never makes what it trains for worse: the layers' summed output
        error (``Refine(scope="layer")``) or the model's output error (``"model"``);
        if it would, the factors from before refinement are kept. Returns the
        model-level errors for the step report (only with ``scope = "model"``).
        """
        from musco_core.refine import model_output_error, output_errors, refine

        assert self.original is not None and self.calibration is not None
        modules = {name: b.module for name, b in built.items()}
        options = self.spec.refine
        errors = output_errors(self.original, self.model, self.calibration, modules)
        refined_from: dict[str, float] = {}
        step_errors: dict[str, float] = {}
        if options.steps > 0:
            model_scope = options.scope == "model"
            if model_scope:
                before = model_output_error(self.original, self.model, self.calibration, modules)
            saved = {n: copy.deepcopy(m.state_dict()) for n, m in modules.items()}
            refine(self.original, self.model, self.calibration, modules, options,
                   progress=self.progress)
            after = output_errors(self.original, self.model, self.calibration, modules)
            if model_scope:
                now = model_output_error(self.original, self.model, self.calibration, modules)
                better = now <= before
                step_errors = ({"model_output_error": now, "model_refined_from": before}
                               if better else {"model_output_error": before})
            else:
                better = sum(after.values()) <= sum(errors.values())
            if better:
                refined_from, errors = errors, after
            else:
                for n, m in modules.items():
                    m.load_state_dict(saved[n])
        for name, error in errors.items():
            reports[name] = attrs.evolve(reports[name], output_error=error,
                                         refined_from=refined_from.get(name))
        return step_errors

    def _skip_if_not_faster(self, built: dict[str, _Built],
                            reports: dict[str, LayerReport]) -> None:
        """Drop layers whose rule has ``min_speedup`` and whose new module is not that much faster."""
        for name in list(built):
            rule = self.rules[self.plan.entry(name).rule]
            if rule.min_speedup is None:
                continue
            model = self._latency_model()
            old = self.model.get_submodule(name)
            shape = self.stats[name].input_shape
            t_old, t_new = model.speedup(old, built[name].module, shape)
            retime = getattr(model, "retime", None)
            if retime is not None and t_new > 0 and \
                    abs(math.log(t_old / t_new / rule.min_speedup)) < math.log(_RETIME_BAND):
                # near the margin one measurement is noisier than the margin: median of 3
                t_old, t_new = retime(old, shape), retime(built[name].module, shape)
            report = attrs.evolve(reports[name], time_before=t_old, time_after=t_new)
            if t_new * rule.min_speedup > t_old:
                stats = self.stats[name]
                report = attrs.evolve(
                    report, status="skipped", params_after=stats.params, flops_after=stats.flops,
                    reason=f"not faster enough: {t_old * 1e3:.3f} ms -> {t_new * 1e3:.3f} ms "
                           f"({t_old / t_new:.2f}x < min_speedup {rule.min_speedup})")
                del built[name]
            reports[name] = report

    def _latency_model(self):
        if self.latency is None:
            from musco_core.latency import LatencyModel

            self.latency = LatencyModel(device=_device_of(self.model))
        return self.latency

    # -- joint rank rules ----------------------------------------------------------------

    def _ensure_joint_ranks(self, names: list[str]) -> None:
        """Let each joint rule of the current round choose the ranks of all its layers, once."""
        from musco_core.joint import JointContext

        for rule in self.rules:
            if not rule.rank.strategy.joint or rule.index in self.joint_ranks:
                continue
            if not any(self.plan.entry(n).rule == rule.index for n in names):
                continue
            layers = [Layer(e.name, self.model.get_submodule(e.name), self.stats[e.name],
                            self.plan.round)
                      for e in self.plan.entries if e.status == "compress" and e.rule == rule.index]
            context = JointContext(self, rule)
            label = f"rank rule {rule.rank.name!r}"
            try:
                ranks = rule.rank.strategy.select_joint(
                    layers, rule.decomposition.strategy, rule.rank.params, context)
            except Exception as exc:
                raise CompressionError(
                    f"{label} failed to choose the ranks of rule {rule.index}: "
                    f"{type(exc).__name__}: {exc}; the model is unchanged", strategy=label
                ) from exc
            missing = [layer.name for layer in layers if layer.name not in ranks]
            if missing:
                raise CompressionError(f"{label} chose no rank for layer {missing[0]!r}",
                                       layer=missing[0], strategy=label)
            self.joint_ranks[rule.index] = dict(ranks)
            if context.table is not None:
                self.joint_tables[rule.index] = context.table

    def _choose(self, rnd: int, name: str, data: LayerData | None = None) -> _Choice:
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
            if rule.rank.strategy.joint:
                rank = self.joint_ranks[rule.index][name]
            else:
                rank = select_rank(rule, Layer(name, module, stats, rnd, data))
        except Exception as exc:
            raise _failure(name, rnd, f"{rank_label} failed", exc, rank_label) from exc
        if rank is not None and rule.round_by_speed is not None:
            try:
                rank, timing = self._round_by_speed(rule, module, stats, rank, data)
            except Exception as exc:
                raise _failure(name, rnd, "round_by_speed failed", exc, rank_label) from exc
            base.update(timing)
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

    def _round_by_speed(self, rule, module: nn.Module, stats: LayerStats, rank: Any,
                        data: LayerData | None) -> tuple[Any, dict[str, float]]:
        """``rule.round_by_speed``: the rank near ``rank`` with the best speedup per truncation error.

        The error of a rank is the discarded share of the energy of the layer's rank
        matrices (``data_rank_matrices`` with calibration statistics, else
        ``rank_matrices``), summed over the rank's components.
        """
        from musco_core.latency import fastest_rank_near

        decomposition, params = rule.decomposition.strategy, rule.decomposition.params
        if data is not None:
            matrices = decomposition.data_rank_matrices(module, data, params)
        else:
            matrices = decomposition.rank_matrices(module)
        energies = []
        for m in matrices:
            s2 = torch.linalg.svdvals(m.detach().double()) ** 2
            energies.append(torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-300))

        def cost(r: Any) -> float:
            parts = (r,) if isinstance(r, int) else tuple(r)
            total = 0.0
            for k, e in zip(parts, energies):
                total += float(1.0 - e[min(k, len(e)) - 1]) if k >= 1 else 1.0
            return max(total, 0.0)

        full = decomposition.full_rank(module)
        chosen = fastest_rank_near(decomposition, module, stats, rank, self._latency_model(),
                                   cost, params=params, multiple=rule.round_by_speed)
        best = rule.rank.limits.apply(chosen.rank, full)  # min_rank / max_rank still hold
        if best != chosen.rank:  # clamped: time what will be built
            t_new = self._latency_model().time_module(
                decomposition.skeleton(module, best, params), stats.input_shape)
        else:
            t_new = next(c.seconds for c in chosen.candidates if c.rank == best)
        return best, {"time_before": chosen.original_seconds, "time_after": t_new}

    def _compress_layer(self, rnd: int, name: str,
                        data: LayerData | None) -> tuple[nn.Module | None, _Compressed]:
        started = time.perf_counter()
        choice = self._choose(rnd, name, data)
        if choice.skipped is not None:
            return None, _Compressed(choice.skipped, choice.stats)
        rule, rank, stats = choice.rule, choice.rank, choice.stats
        dec_label = f"decomposition {rule.decomposition.name!r}"
        decomposition = rule.decomposition.strategy
        try:
            if data is not None and decomposition.needs(rule.decomposition.params):
                new, error = decomposition.compress(choice.module, rank,
                                                    rule.decomposition.params, data=data)
            else:
                new, error = decomposition.compress(choice.module, rank,
                                                    rule.decomposition.params)
        except Exception as exc:
            raise _failure(name, rnd, f"{dec_label} failed at rank {rank!r}", exc,
                           dec_label) from exc
        if not _finite(new):
            raise _failure(name, rnd, f"{dec_label} produced non-finite factors (NaN or Inf) at "
                           f"rank {rank!r}; check the layer's weights", None, dec_label)
        try:
            flops, out_shape = probe_module(new, stats.input_shape)
        except Exception as exc:
            raise _failure(name, rnd, f"the module built by {dec_label} does not run", exc,
                           dec_label) from exc
        if out_shape != stats.output_shape:
            raise _failure(
                name, rnd, f"shape check failed: the module built by {dec_label} gives output "
                f"shape {out_shape}, expected {stats.output_shape}", None, dec_label)
        new_stats = LayerStats(stats.input_shape, stats.output_shape, param_count(new),
                               flops * stats.calls, stats.calls)
        warning = low_rank_warning(name, rank, decomposition.full_rank(choice.module)) or ""
        if not warning and error > HIGH_ERROR and data is None:
            # (a data-aware fit may move the weight far where the data never goes; its
            # output error, measured later, is what counts)
            warning = (f"layer {name!r}: relative weight error {error:.2f} at rank {rank!r}; "
                       "expect a large loss there")
        report = LayerReport(
            status="compressed", rank=rank, params_after=new_stats.params,
            flops_after=new_stats.flops, rel_error=error,
            seconds=time.perf_counter() - started, warning=warning, **choice.base,
        )
        return new, _Compressed(report, new_stats)


#: A relative weight error above this earns a warning in the layer's report.
HIGH_ERROR = 0.5


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


@attrs.frozen
class _Compressed:
    layer: LayerReport
    #: The statistics the layer will have once the new module is in (measured before the swap).
    stats: LayerStats


@attrs.frozen
class _Built:
    module: nn.Module
    stats: LayerStats


#: ``min_speedup`` decisions whose first speedup is within this factor of the margin are
#: timed twice more (median of three).
_RETIME_BAND = 1.25


def _fingerprint(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Storage and in-place version of every parameter and buffer: training changes them."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: (t.data_ptr(), t._version) for name, t in tensors}


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.is_floating_point())


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the original the data-aware fits aim at."""
    copy_ = copy.deepcopy(model).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def _plain_rank(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def _rank_from_plain(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


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
