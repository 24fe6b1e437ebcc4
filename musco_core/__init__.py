"""musco: multi-stage compression of PyTorch models by tensor decomposition.

``import musco_core as musco`` gives the whole public API: the spec classes,
the :class:`Compressor`, the plugin base classes and the hook marker.
"""

import pluggy

#: Marker for hook implementations: ``@musco_core.hookimpl``.
hookimpl = pluggy.HookimplMarker("musco")

from musco_core.errors import (  # noqa: E402
    CompressionError,
    MuscoError,
    MuscoWarning,
    PluginError,
    SpecError,
    UnsupportedLayerError,
)
from musco_core.calibration import LayerData  # noqa: E402
from musco_core.stats import LayerStats  # noqa: E402
from musco_core.strategies import (  # noqa: E402
    Decomposition,
    Layer,
    Matcher,
    NoParams,
    Rank,
    RankSelector,
    Strategy,
    relative_error,
)
from musco_core.registry import Registry, available, default_registry  # noqa: E402
from musco_core.spec import Calibration, Decompose, Match, RankRule, Refine, Rule, Spec  # noqa: E402
from musco_core.report import LayerReport, RunReport, StepReport  # noqa: E402
from musco_core.plan import Plan, PlanEntry  # noqa: E402
from musco_core.engine import Compressor  # noqa: E402
from musco_core.persist import StateFileError, load_compressed  # noqa: E402
from musco_core.finetune import (  # noqa: E402
    compress_step,
    parameter_names,
    rebuild_optimizer,
    retarget_schedulers,
    stale_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "Calibration", "CompressionError", "Compressor", "Decompose", "Decomposition", "Layer", "LayerReport",
    "LayerData", "LayerStats", "Match", "Matcher", "MuscoError", "MuscoWarning", "NoParams", "Plan", "PlanEntry",
    "PluginError", "Rank", "RankRule", "RankSelector", "Refine", "Registry", "Rule", "RunReport", "Spec",
    "SpecError", "StateFileError", "StepReport", "Strategy", "UnsupportedLayerError",
    "available", "default_registry", "hookimpl", "load_compressed", "relative_error",
    "compress_step", "parameter_names", "rebuild_optimizer", "retarget_schedulers",
    "stale_parameters",
]
