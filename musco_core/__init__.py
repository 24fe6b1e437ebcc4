"""musco: multi-stage compression of PyTorch models by tensor decomposition.

``import musco_core as musco`` gives the whole public API: the spec classes,
the :class:`Compressor`, the plugin base classes and the hook marker.
"""

import pluggy

#: Marker for hook implementations: ``@musco_core.hookimpl``.
hookimpl = pluggy.HookimplMarker("musco")

from musco_core.errors import (  # noqa: E402
    CalibrationError,
    CompressionError,
    MuscoError,
    MuscoWarning,
    PluginError,
    SpecError,
    UnsupportedLayerError,
)
from musco_core.stats import LayerStats  # noqa: E402
from musco_core.strategies import (  # noqa: E402
    Cost,
    Decomposition,
    FlopFormula,
    GateStrategy,
    Layer,
    LayerBatch,
    Matcher,
    NoParams,
    Rank,
    RankSelector,
    Refiner,
    Statistic,
    Strategy,
    Verdict,
    relative_error,
)
from musco_core.registry import Registry, available, default_registry  # noqa: E402
from musco_core.spec import Calibration, Decompose, Gate, Match, RankRule, Refine, Rule, Spec  # noqa: E402
from musco_core.report import LayerReport, RunReport, StepReport  # noqa: E402
from musco_core.plan import Plan, PlanEntry  # noqa: E402
from musco_core.engine import Compressor  # noqa: E402
from musco_core.engine.state import StepView  # noqa: E402

# What a plain run does not use is loaded on first use (PEP 562), so ``import musco_core``
# loads neither the adapters (fine-tuning helpers) nor the data-aware and persistence
# machinery: ``musco_core.LayerData`` and ``from musco_core import RunContext`` still work.
_LAZY = {
    "compress_step": "finetune", "parameter_names": "finetune",
    "rebuild_optimizer": "finetune", "retarget_schedulers": "finetune",
    "stale_parameters": "finetune",
    "LayerData": "calibration",
    "RoundContext": "context", "RunContext": "context",
    "StateFileError": "persist", "load_compressed": "persist",
}


def _load(module: str):
    if module == "finetune":
        from musco_core import finetune as loaded
    elif module == "calibration":
        from musco_core import calibration as loaded
    elif module == "context":
        from musco_core import context as loaded
    else:
        from musco_core import persist as loaded
    return loaded


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_load(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Calibration", "CalibrationError", "CompressionError", "Compressor", "Cost", "Decompose", "Decomposition", "FlopFormula",
    "Gate", "GateStrategy", "Layer", "LayerBatch", "LayerReport", "Refiner", "RoundContext", "RunContext",
    "Statistic", "StepView", "Verdict",
    "LayerData", "LayerStats", "Match", "Matcher", "MuscoError", "MuscoWarning", "NoParams", "Plan", "PlanEntry",
    "PluginError", "Rank", "RankRule", "RankSelector", "Refine", "Registry", "Rule", "RunReport", "Spec",
    "SpecError", "StateFileError", "StepReport", "Strategy", "UnsupportedLayerError",
    "available", "default_registry", "hookimpl", "load_compressed", "relative_error",
    "compress_step", "parameter_names", "rebuild_optimizer", "retarget_schedulers",
    "stale_parameters",
]
