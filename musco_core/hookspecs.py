"""The hook specifications: the whole contract between musco and its plugins.

Every ``musco_add_*`` hook receives ``register(strategy, aliases=(), override=False)``.
A name (or alias) that is already taken raises :class:`musco_core.PluginError` naming
both distributions, unless the plugin passes ``override=True`` to replace that strategy
on purpose; first-party plugins always load first.

Hooks are called with keyword arguments only. An implementation may accept
fewer arguments than its specification lists, so a hook can grow new arguments
without breaking plugins. Mark implementations with :data:`musco_core.hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from musco_core.engine import Compressor
    from musco_core.engine.state import StepView
    from musco_core.report import StepReport

hookspec = pluggy.HookspecMarker("musco")

#: The step hooks' ``compressor`` argument is deprecated: an implementation that asks
#: for it gets this warning when its plugin is registered.
_COMPRESSOR_DEPRECATED = {"compressor": DeprecationWarning(
    "the 'compressor' argument of the musco step hooks is deprecated and will be removed; "
    "take 'context' (a musco_core.StepView: model, spec, plan, position, reports, manifest)")}


@hookspec
def musco_add_decompositions(register: Callable[..., None]) -> None:
    """Register decompositions.

    :param register: call ``register(decomposition, aliases=())`` with an
        instance of a :class:`musco_core.Decomposition` subclass.
    """


@hookspec
def musco_add_rank_rules(register: Callable[..., None]) -> None:
    """Register rank rules.

    :param register: call ``register(rank_rule, aliases=())`` with an instance
        of a :class:`musco_core.RankSelector` subclass.
    """


@hookspec
def musco_add_matchers(register: Callable[..., None]) -> None:
    """Register layer matchers.

    :param register: call ``register(matcher, aliases=())`` with an instance of
        a :class:`musco_core.Matcher` subclass.
    """


@hookspec
def musco_add_statistics(register: Callable[..., None]) -> None:
    """Register calibration statistics (what strategies name in ``needs()``).

    :param register: call ``register(statistic, aliases=())`` with an instance of
        a :class:`musco_core.Statistic` subclass.
    """


@hookspec
def musco_add_refiners(register: Callable[..., None]) -> None:
    """Register refiners (the objective and loop of local refinement, ``Spec.refine``).

    :param register: call ``register(refiner, aliases=())`` with an instance of a
        :class:`musco_core.Refiner` subclass.
    """


@hookspec
def musco_add_costs(register: Callable[..., None]) -> None:
    """Register costs (what a budget counts: FLOPs, parameters, latency ...).

    :param register: call ``register(cost, aliases=())`` with an instance of a
        :class:`musco_core.Cost` subclass.
    """


@hookspec
def musco_add_gates(register: Callable[..., None]) -> None:
    """Register gates (``Rule.gates``: adjust a rank before building, keep or drop a built layer).

    :param register: call ``register(gate, aliases=())`` with an instance of a
        :class:`musco_core.GateStrategy` subclass.
    """


@hookspec
def musco_add_flop_formulas(register: Callable[..., None]) -> None:
    """Register FLOP formulas for layer types the FLOP counter misses.

    :param register: call ``register(formula, aliases=())`` with an instance of a
        :class:`musco_core.FlopFormula` subclass.
    """


@hookspec(warn_on_impl_args=_COMPRESSOR_DEPRECATED)
def musco_step_started(context: StepView, step: int, layers: list[str],
                       compressor: Compressor) -> None:
    """Called before the engine compresses the layers of a step.

    :param context: a :class:`musco_core.StepView` of the run (model, spec, plan,
        position, reports so far): read it, do not change it.
    :param compressor: the running :class:`musco_core.Compressor` (deprecated: use
        ``context``; it will be removed).
    :param step: index of the step, starting at 0.
    :param layers: dotted names of the layers this step will compress.
    """


@hookspec(warn_on_impl_args=_COMPRESSOR_DEPRECATED)
def musco_step_finished(context: StepView, step: int, report: StepReport,
                        compressor: Compressor) -> None:
    """Called after a step succeeded and its layers were swapped into the model.

    Each plugin's implementation is called on its own (with the wrappers around
    it): one that raises becomes a :class:`musco_core.MuscoWarning` naming the
    plugin, since the step is committed by then.

    :param context: a :class:`musco_core.StepView` of the run.
    :param compressor: the running :class:`musco_core.Compressor` (deprecated).
    :param step: index of the step, starting at 0.
    :param report: the :class:`musco_core.StepReport` of the step.
    """


@hookspec(warn_on_impl_args=_COMPRESSOR_DEPRECATED)
def musco_step_failed(context: StepView, step: int, error: BaseException,
                      compressor: Compressor) -> None:
    """Called after a step failed and the model was restored to its state before the step.

    :param context: a :class:`musco_core.StepView` of the run.
    :param compressor: the running :class:`musco_core.Compressor` (deprecated).
    :param step: index of the step, starting at 0.
    :param error: the exception the step raises to its caller.
    """

