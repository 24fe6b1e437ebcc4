"""A picture of a run: per layer params, FLOPs, rank and error; per step the model's totals.

Needs matplotlib (``pip install 'musco[plot]'``); it is imported only when a picture is drawn.
``RunReport.plot(path)`` and ``musco inspect DIR --plot run.png`` call :func:`plot_run`.

The drawing itself lives in the leaf module ``musco_core._figure``, which imports nothing of
musco at run time: the report calls it there, so the core never imports this adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from musco_core._figure import model_totals, plot_run
from musco_core.report import RunReport, StepReport, layer_history

__all__ = ["model_totals", "plot_run", "report_from_state"]


def report_from_state(state: Mapping[str, Any]) -> RunReport:
    """The :class:`RunReport` of a saved state (``musco inspect``), without the model.

    The model's parameter count after the run is the count before it minus what the
    compressed layers lost.
    """
    steps = tuple(StepReport.from_dict(r) for r in state.get("reports", []))
    before = int(state.get("model_params_before", 0))
    lost = sum(first.params_before - last.params_after
               for first, last in layer_history(steps).values())
    flops_before = int(state.get("model_flops_before", 0))
    return RunReport(steps=steps, model_params_before=before, model_params_after=before - lost,
                     model_flops_before=flops_before,
                     model_flops_after=int(state.get("model_flops_now", flops_before)))
