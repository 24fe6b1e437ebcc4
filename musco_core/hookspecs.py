"""The hook specifications: the whole contract between musco and its plugins.

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
    from musco_core.report import StepReport

hookspec = pluggy.HookspecMarker("musco")


@hookspec
def musco_add_decompositions(register: Callable[..., None]) -> None:
    """Register decompositions.

    :param register: call ``register(decomposition, aliases=())`` with an
        instance of a :class:`musco_core.Decomposition` subclass. A name that is
        already taken raises :class:`musco_core.PluginError`.
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
def musco_step_started(compressor: Compressor, step: int, layers: list[str]) -> None:
    """Called before the engine compresses the layers of a step.

    :param compressor: the running :class:`musco_core.Compressor`.
    :param step: index of the step, starting at 0.
    :param layers: dotted names of the layers this step will compress.
    """


@hookspec
def musco_step_finished(compressor: Compressor, step: int, report: StepReport) -> None:
    """Called after a step succeeded and its layers were swapped into the model.

    :param compressor: the running :class:`musco_core.Compressor`.
    :param step: index of the step, starting at 0.
    :param report: the :class:`musco_core.StepReport` of the step.
    """


@hookspec
def musco_step_failed(compressor: Compressor, step: int, error: BaseException) -> None:
    """Called after a step failed and the model was restored to its state before the step.

    :param compressor: the running :class:`musco_core.Compressor`.
    :param step: index of the step, starting at 0.
    :param error: the exception the step raises to its caller.
    """

