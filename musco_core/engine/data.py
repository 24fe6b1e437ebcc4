"""The engine's side of calibration data: the first-batch check and a step's statistics.

Loaded only when a run has calibration data.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from musco_core.calibration import CalibrationData, LayerData, collect_layer_data, run_batch
from musco_core.errors import CalibrationError
from musco_core.stats import eval_mode

if TYPE_CHECKING:
    from musco_core.engine.compressor import Compressor


def check_first_batch(model: nn.Module, data: CalibrationData) -> None:
    """Run the first calibration batch once, so bad data fails before anything changes."""
    for index, batch in enumerate(data):
        with torch.no_grad(), eval_mode(model):
            run_batch(model, batch, index, "the model")
        return
    raise CalibrationError("the calibration data is empty: pass at least one batch (got "
                           f"a {type(data.batches).__name__} that yields none)")


def needs(run: Compressor, name: str) -> frozenset[str]:
    """The statistics the strategies of layer ``name``'s rule name in ``needs()``."""
    rule = run.rules[run.plan.entry(name).rule]
    wanted = (rule.decomposition.strategy.needs(rule.decomposition.params)
              | rule.rank.strategy.needs(rule.rank.params))
    for gate in rule.gates:
        wanted |= gate.strategy.needs(gate.params)
    return wanted


def layer_data(run: Compressor, names: list[str]) -> dict[str, LayerData]:
    """The statistics named by the strategies of ``names``, for the layers that need any.

    Collected now, on the model as it is (earlier steps compressed and maybe
    fine-tuned), beside the reference model: one pass over the calibration data.
    """
    table = run.registry.entries["statistics"]
    wanted = {}
    for name in names:
        named = needs(run, name)
        if named:
            rule = run.rules[run.plan.entry(name).rule]
            wanted[name] = (run.model.get_submodule(name), rule.decomposition.strategy,
                            {n: table[n].strategy for n in sorted(named)})
    if not wanted:
        return {}
    assert run.original is not None and run.calibration is not None
    return collect_layer_data(run.original, run.model, run.calibration, wanted)


def fingerprint(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Storage and in-place version of every parameter and buffer: training changes them."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: (t.data_ptr(), t._version) for name, t in tensors}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the original the data-aware fits aim at."""
    copy_ = copy.deepcopy(model).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def refresh_reference(run: Compressor) -> None:
    """Take the model as it is now as the reference, if ``Calibration.reference`` says so."""
    mode = run.spec.calibration.reference
    before = run.reference_fingerprint
    changed = before is not None and fingerprint(run.model) != before
    if mode == "step" or (mode == "auto" and changed) or run.original is None:
        run.original = None  # free the old copy first
        run.original = frozen_copy(run.model)
        run.reference_fingerprint = fingerprint(run.model)


def calibration_cause(exc: BaseException | None) -> CalibrationError | None:
    """The :class:`CalibrationError` a step's error was caused by (a strategy reading the
    data when the data source raised), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CalibrationError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None
