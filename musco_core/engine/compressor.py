"""The loop: rounds and steps, hooks, saving and resuming through one state path."""

from __future__ import annotations

# Data-aware machinery (calibration, contexts) and persistence are imported where they are
# used, so a plain run without calibration data never loads them.
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from musco_core._util import device_of, progress
from musco_core.engine.state import RunState, StepView, plain_rank
from musco_core.engine.step import Step
from musco_core.errors import MuscoWarning, SpecError
from musco_core.registry import Registry, default_registry
from musco_core.report import LayerReport, RunReport, StepReport
from musco_core.resolve import resolve_refine, resolve_rules
from musco_core.spec import Spec, unstructure_params
from musco_core.stats import param_count

if TYPE_CHECKING:
    from musco_core.calibration import CalibrationData, LayerData
    from musco_core.context import RunContext


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
        (``svd`` with ``whiten = true``, ``budget``, refinement) fit each layer's
        *output* on it; every compressed layer's report then also gives its relative
        output error. Batches are moved to the model's device; the spec's
        ``calibration`` table caps how much is used. The data is never saved. With
        calibration data the compressor keeps a copy of the original model (one
        more model in memory) whose layer outputs are the targets.
    :param latency: a :class:`musco_std.latency.LatencyModel` for the ``min_speedup``
        and ``round_by_speed`` gates and latency budgets; by default one is made on
        the model's device when a strategy needs it.
    :param progress: show a progress bar per step; ``None`` shows it when stderr
        is a terminal.
    :param registry: the strategy registry; the default one loads the ``musco``
        entry points.
    """

    def __init__(self, model: nn.Module, spec: Spec, example_inputs: Any, *,
                 calibration: Any = None, latency: Any = None, inplace: bool = False,
                 progress: bool | None = None, registry: Registry | None = None):
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a musco.Spec, got {type(spec).__name__}")
        registry = registry or default_registry()
        rules = resolve_rules(spec, registry)
        data = self._calibration_data(spec, calibration, device_of(model))
        work = model if inplace else copy.deepcopy(model)
        state = RunState.fresh(work, spec, rules, example_inputs, registry.flop_formulas(),
                               registry.flop_formulas(model_total=True))
        self._attach(state, work, registry, rules, example_inputs=example_inputs,
                     data=data, latency=latency, progress=progress, original=work)
        for warning in self.plan.warnings:
            warnings.warn(warning, MuscoWarning, stacklevel=2)

    @classmethod
    def from_state(cls, state: dict[str, Any], model: nn.Module, *, example_inputs: Any = None,
                   calibration: Any = None, latency: Any = None, progress: bool | None = None,
                   registry: Registry | None = None, source: str = "the state") -> Compressor:
        """Continue a run from :meth:`state_dict` (what :meth:`save` writes).

        :param model: a fresh instance of the original, uncompressed architecture
            (it is not modified); the saved replacements are rebuilt on a copy of it
            and the saved weights loaded. With ``calibration`` it is also the
            original whose layer outputs data-aware strategies fit.
        :param calibration: the calibration data again (it is never saved); needed
            when the spec's strategies need data.

        A state that is not what :meth:`state_dict` wrote (edited, damaged, for another
        model) raises :class:`~musco_core.StateFileError` naming the field
        (``... @ position``, ``... @ manifest[0].rank``) before anything is built.
        """
        from musco_core.engine.restore import from_state

        return from_state(cls, state, model, example_inputs=example_inputs,
                          calibration=calibration, latency=latency, progress=progress,
                          registry=registry, source=source)

    @classmethod
    def resume(cls, path: str | Path, model: nn.Module, **options: Any) -> Compressor:
        """Continue a run saved with :meth:`save` (options as :meth:`from_state`)."""
        from musco_core.persist import read_state

        return cls.from_state(read_state(path), model, source=str(path), **options)

    @staticmethod
    def _calibration_data(spec: Spec, calibration: Any, device: Any) -> CalibrationData | None:
        if calibration is None:
            return None
        from musco_core.calibration import CalibrationData

        return CalibrationData(calibration, max_batches=spec.calibration.max_batches,
                               max_samples=spec.calibration.max_samples, device=device)

    def _attach(self, state: RunState, model: nn.Module, registry: Registry, rules: Any, *,
                example_inputs: Any, data: CalibrationData | None, latency: Any,
                progress: bool | None, original: nn.Module) -> None:
        """Everything both construction paths share, after the state is known."""
        self.registry = registry
        self.rules = rules
        self.refiner = resolve_refine(state.spec, registry)
        self.state = state
        self.flop_formulas = registry.flop_formulas()
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._check_data_needs(data is not None)
        self.model = model
        self.example_inputs = example_inputs
        #: Objects the run's strategies share (the latency model under ``"latency"``).
        self.resources: dict[str, Any] = {"latency": latency}
        self.calibration = data
        #: The reference model data-aware fits aim at (``Calibration.reference``).
        self.original: nn.Module | None = None
        #: ``{tensor: (storage, version)}`` when the last step ended (data-aware runs only),
        #: to notice fine-tuning between steps.
        self.reference_fingerprint: dict[str, tuple[int, int]] | None = None
        if data is not None:
            from musco_core.engine.data import check_first_batch, fingerprint, frozen_copy

            check_first_batch(self.model, data)
            if state.spec.calibration.reference != "step":
                self.original = frozen_copy(original).to(device_of(model))
            self.reference_fingerprint = fingerprint(model)

    # -- the state, as attributes --------------------------------------------------------

    spec = property(lambda self: self.state.spec)
    plan = property(lambda self: self.state.plan)
    stats = property(lambda self: self.state.stats)
    manifest = property(lambda self: self.state.manifest)
    reports = property(lambda self: self.state.reports)
    position = property(lambda self: self.state.position)
    joint_ranks = property(lambda self: self.state.joint_ranks)
    joint_tables = property(lambda self: self.state.joint_tables)
    model_params_before = property(lambda self: self.state.model_params_before)
    model_flops_before = property(lambda self: self.state.model_flops_before)
    model_flops_now = property(lambda self: self.state.model_flops_now)

    @property
    def latency(self) -> Any:
        """The run's latency model (``None`` until a strategy needs one, unless given)."""
        return self.resources.get("latency")

    @latency.setter
    def latency(self, value: Any) -> None:
        self.resources["latency"] = value

    def _check_data_needs(self, have_data: bool) -> None:
        """A strategy that cannot work without calibration data is a spec error up front."""
        if have_data:
            return
        problems = []
        for rule in self.rules:
            bounds = [(rule.decomposition, "decomposition"), (rule.rank, "rank")]
            bounds += [(g, f"gates[{j}]") for j, g in enumerate(rule.gates)]
            for bound, path in bounds:
                if bound.strategy.requires_calibration(bound.params):
                    problems.append(
                        f"{bound.name!r} needs calibration data with these parameters; pass "
                        f"Compressor(..., calibration=batches) @ $.rules[{rule.index}].{path}")
        if self.refiner is not None:
            problems.append("local refinement needs calibration data; pass "
                            "Compressor(..., calibration=batches) or leave refine out @ $.refine")
        if problems:
            raise SpecError(problems)

    # -- saving --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: spec, plan, position, manifest, stats, reports,
        joint rules' ranks and tables, weights. Plain data and tensors only (no pickled
        classes). Calibration data is not saved."""
        return self.state.to_dict(self.model)

    to_state = state_dict

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file, then rename).

        Save after fine-tuning a step: :meth:`resume` continues from here, and
        :func:`musco_core.load_compressed` rebuilds the compressed model from it.
        """
        from musco_core.persist import atomic_save

        atomic_save(self.state_dict(), path)

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

    @property
    def hook(self):
        return self.registry.pm.hook

    def view(self) -> StepView:
        """A read-only snapshot of the run for hooks."""
        return StepView(model=self.model, spec=self.spec, plan=self.plan,
                        position=self.position, reports=tuple(self.reports),
                        manifest=tuple(self.manifest))

    def context(self) -> RunContext:
        """The context refiners, gates, costs and joint rules get for the current step."""
        from musco_core.context import RunContext

        return RunContext(
            model=self.model, example_inputs=self.example_inputs, stats=self.stats,
            calibration=self.calibration, reference=self.original,
            costs={n: e.strategy for n, e in self.registry.entries["costs"].items()},
            statistics={n: e.strategy for n, e in self.registry.entries["statistics"].items()},
            resources=self.resources, show_progress=self.progress,
            model_flops=self.model_flops_now)

    # -- the loop ------------------------------------------------------------------------

    def _replan_if_new_round(self) -> tuple[str, ...]:
        """Plan the next round when the next step starts one (see
        :func:`musco_core.engine.rounds.replan`); its plan's warnings, each warned."""
        state = self.state
        if state.plan.round >= self.spec.rounds or (
                state.position < len(state.plan.steps)
                and state.plan.steps[state.position][0][0] <= state.plan.round):
            return ()  # the current round goes on (a one-round run never plans again)
        from musco_core.engine.rounds import replan

        return replan(self)

    def step(self) -> StepReport:
        """Compress the next ``layers_per_step`` layers of the plan; mutates :attr:`model`.

        The step is atomic: every new module is built, checked, measured (and, with
        calibration data, fitted and refined) before any is swapped in, so if a
        layer fails (a plugin raises, a shape check fails, the user interrupts) the
        model is exactly as it was and :class:`CompressionError` names the layer
        and the strategy. Layers whose rank rule chooses not to compress them,
        whose rank would not make them smaller, or that a gate drops (``min_speedup``)
        are reported as skipped.
        """
        if self.done:
            raise RuntimeError(
                f"compression is done: all {len(self.plan.steps)} steps have run "
                "(check compressor.done before calling step())"
            )
        planned = self._replan_if_new_round()
        state = self.state
        index = state.position
        if index >= len(state.plan.steps):  # the remaining rounds matched no layer
            report = StepReport(step=index, layers=(), warnings=planned,
                                **self._model_totals(0, 0))
            state.reports.append(report)
            return report
        work = state.plan.steps[index]
        names = [n for _, n in work]
        self.hook.musco_step_started(context=self.view(), step=index, layers=names,
                                     compressor=self)
        started = time.perf_counter()
        try:
            if self.calibration is not None:
                from musco_core.engine.data import refresh_reference

                refresh_reference(self)
                self.calibration.step = index
            step = Step(self, index, work)
            entries = step.execute()
        except BaseException as exc:
            error = exc
            if self.calibration is not None:  # the data source failing is not the fault
                from musco_core.engine.data import calibration_cause  # of who read it

                error = calibration_cause(exc) or exc
            self.hook.musco_step_failed(context=self.view(), step=index, error=error,
                                        compressor=self)
            if error is exc:
                raise
            raise error  # keeps its own __cause__: the data source's exception
        finally:
            if self.calibration is not None:
                self.calibration.step = None
        # Commit: nothing below can fail halfway.
        state.manifest.extend(entries)
        if self.calibration is not None:
            from musco_core.engine.data import fingerprint

            self.reference_fingerprint = fingerprint(self.model)
        saved = 0
        for name, built in step.built.items():
            saved += state.stats[name].flops - built.stats.flops
            state.stats[name] = built.stats
        flops_before = state.model_flops_now
        state.model_flops_now -= saved
        state.position += 1
        report = StepReport(step=index, layers=tuple(step.reports[n] for n in names),
                            seconds=time.perf_counter() - started,
                            **self._model_totals(flops_before, state.model_flops_now),
                            **step.step_fields, warnings=planned)
        state.reports.append(report)
        self._call_isolated("musco_step_finished", index, context=self.view(), step=index,
                            report=report, compressor=self)
        if report.model_params_after > self.model_params_before:
            warnings.warn(
                f"the compressed model has more parameters ({report.model_params_after}) than "
                f"the original ({self.model_params_before}); check the ranks", MuscoWarning,
                stacklevel=2)
        return report

    def _model_totals(self, flops_before: int, flops_after: int) -> dict[str, int]:
        params = param_count(self.model)
        before = self.reports[-1].model_params_after if self.reports else self.model_params_before
        return {"model_params_before": before, "model_params_after": params,
                "model_flops_before": flops_before or self.model_flops_now,
                "model_flops_after": flops_after or self.model_flops_now}

    def _call_isolated(self, name: str, index: int, **kwargs: Any) -> None:
        """Call hook ``name`` through pluggy, one plugin's implementation at a time.

        Wrappers (``wrapper=True``) wrap each call; ``tryfirst``/``trylast`` order
        holds. A raising implementation (a wrapper's too) becomes a :class:`MuscoWarning`
        naming its plugin: the step is committed by then, so it must not look failed.
        """
        caller = getattr(self.hook, name)
        impls = caller.get_hookimpls()
        plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
        calls = [(i.plugin_name, self.registry.pm.subset_hook_caller(
            name, remove_plugins=[o.plugin for o in plain if o.plugin is not i.plugin]))
            for i in reversed(plain)] or [(None, caller)]
        for plugin_name, call in calls:
            try:
                call(**kwargs)
            except Exception as exc:  # blame the implementation in the traceback (a wrapper?)
                codes = {i.function.__code__: i.plugin_name for i in impls}
                tb = exc.__traceback__
                while tb is not None:
                    plugin_name = codes.get(tb.tb_frame.f_code, plugin_name)
                    tb = tb.tb_next
                warnings.warn(
                    f"hook {name} of plugin {plugin_name!r} raised {type(exc).__name__}: "
                    f"{exc}; step {index} is committed all the same", MuscoWarning,
                    stacklevel=3)

    def manifest_entry(self, report: LayerReport) -> dict[str, Any]:
        """The manifest entry of a layer compressed in this step (plain data)."""
        rule = self.plan.entry(report.name).rule
        params = self.rules[rule].decomposition.params
        return {"name": report.name, "round": report.round, "rule": rule,
                "decomposition": report.decomposition, "rank": plain_rank(report.rank),
                "params": unstructure_params(params)}

    def preview(self) -> list[LayerReport]:
        """What the current round would do, without changing anything (see
        :func:`musco_core.engine.preview.preview`)."""
        from musco_core.engine.preview import preview

        return preview(self)

    def progress_over(self, work: list[tuple[int, str]], index: int):
        """The step's layers, with a progress bar when shown and there are several."""
        return progress(work, self.progress and len(work) >= 2, f"musco step {index}",
                        unit="layer")

    # -- joint rank rules and data -------------------------------------------------------

    def ensure_joint_ranks(self, names: list[str]) -> None:
        """Let each joint rule of the current round choose the ranks of all its layers, once."""
        if any(r.rank.strategy.joint and r.index not in self.state.joint_ranks
               for r in self.rules):
            from musco_core.engine.joint import choose_joint_ranks

            choose_joint_ranks(self, names)

    def layer_data(self, names: list[str]) -> dict[str, LayerData]:
        """The statistics the strategies of ``names`` need (see :mod:`musco_core.engine.data`)."""
        if self.calibration is None:
            return {}
        from musco_core.engine.data import layer_data

        return layer_data(self, names)
