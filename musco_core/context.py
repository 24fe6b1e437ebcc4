"""What strategies and hooks see of a run: narrow, documented contexts, never the engine.

- :class:`RunContext` — handed to refiners, gates and costs: the model, the
  reference it is fitted to, the calibration stream, shared resources, progress,
  and the one output-error measurement.
- :class:`RoundContext` — handed to joint rank rules (``select_joint``): costs of a
  rank, measured damage, the rule's limits, progress and a table to record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from musco_core._util import OutputError, device_of, first_tensor, progress
from musco_core.calibration import CalibrationData, collect_layer_data, paired_pass
from musco_core.errors import SpecError
from musco_core.stats import LayerStats, eval_mode, param_count, run_model
from musco_core.strategies import Cost, Decomposition, Layer, Rank, Statistic
from musco_core.surgery import standing_in


class _AllEval:
    """Context: every module of a mapping in eval mode, modes restored after."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.contexts = [eval_mode(m) for m in modules.values()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def all_eval(modules: Mapping[str, nn.Module]) -> _AllEval:
    """Every module of ``modules`` in eval mode inside the block, each mode restored after."""
    return _AllEval(modules)


@attrs.define(eq=False)
class RunContext:
    """What refiners, gates and costs may use of a running compression.

    ``model`` is the model being compressed (the step's new modules are *not* in it
    yet); ``reference`` the model whose outputs data-aware fits aim at
    (``Calibration.reference``), ``None`` without calibration data;
    ``calibration`` the capped batch stream on the model's device, or ``None``.
    ``resources`` is a per-run dict plugins share objects through (the latency
    model lives under ``"latency"``); ``costs`` the registered costs by name.
    """

    model: nn.Module
    example_inputs: Any
    stats: Mapping[str, LayerStats]
    calibration: CalibrationData | None
    reference: nn.Module | None
    costs: Mapping[str, Cost]
    #: The registered statistics by name (what ``needs()`` names resolve to).
    statistics: Mapping[str, Statistic]
    resources: dict[str, Any]
    show_progress: bool = False
    #: Counted FLOPs of the whole model now (on the example inputs).
    model_flops: int = 0
    _memo: Any = attrs.field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        """The model's device (where the latency model times layers by default)."""
        return device_of(self.model)

    def progress(self, iterable: Iterable[Any], desc: str | None = None,
                 total: int | None = None) -> Iterable[Any]:
        """``iterable`` with a progress bar when the run shows progress."""
        return progress(iterable, self.show_progress, desc, total)

    def cost(self, name: str) -> Cost:
        """The registered :class:`musco_core.Cost` called ``name``."""
        if name not in self.costs:
            raise ValueError(f"unknown cost {name!r}; registered costs: "
                             f"{', '.join(sorted(self.costs)) or 'none'}")
        return self.costs[name]

    def output_errors(self, modules: Mapping[str, nn.Module]) -> dict[str, float]:
        """Relative output error of each new module against the reference's layer, on the data.

        ``modules[name]`` (not in the model) runs on the inputs the layer of that name
        gets in :attr:`model`; it is compared with the reference layer's output on the
        reference's inputs (see :class:`musco_core._util.OutputError`). Nothing changes.
        """
        self._need_data("output errors")
        key = tuple((name, id(m), tuple((p.data_ptr(), p._version) for p in m.parameters()))
                    for name, m in modules.items())
        if self._memo is not None and self._memo[0] == key:
            return dict(self._memo[1])  # the same modules, unchanged since: one pass is enough
        sums = {name: OutputError() for name in modules}

        def on_pair(name, _index, args, _out, _args_o, out_o):
            sums[name].add(first_tensor(modules[name](*args)), first_tensor(out_o))

        targets = {name: self.model.get_submodule(name) for name in modules}
        with all_eval(modules):
            paired_pass(self.reference, self.model, self.calibration, targets, on_pair)
        errors = {name: s.value for name, s in sums.items()}
        self._memo = (key, dict(errors))
        return errors

    def model_output_error(self, modules: Mapping[str, nn.Module],
                           batches: Iterable[Any] | None = None) -> float:
        """Relative error of the model's output with ``modules`` standing in, against the reference.

        On ``batches`` (default: the calibration data), first tensor of the outputs,
        both models in eval mode; nothing changes.
        """
        self._need_data("the model's output error")
        error = OutputError()
        with torch.no_grad(), eval_mode(self.reference), eval_mode(self.model), \
                all_eval(modules), standing_in(self.model, modules):
            for batch in (self.calibration if batches is None else batches):
                error.add(first_tensor(run_model(self.model, batch)),
                          first_tensor(run_model(self.reference, batch)))
        return error.value

    def _need_data(self, what: str) -> None:
        if self.calibration is None or self.reference is None:
            raise SpecError(f"{what} need calibration data; pass Compressor(..., "
                            "calibration=batches)")


class RoundContext:
    """Costs, measured damage and rank limits for one joint rule's layers in one round.

    Handed to :meth:`musco_core.RankSelector.select_joint`. Measuring damage runs
    the model: on the first ``batches`` calibration batches, or on the example
    inputs when there is no calibration data.
    """

    def __init__(self, run: RunContext, decomposition: Decomposition, params: Any,
                 limits: Any, rounding: str, *, batches: int = 2):
        self.run = run
        self.decomposition = decomposition
        self._params = params
        self._limits = limits
        self._rounding = rounding
        self._batches = batches
        self._reference: list[tuple[Any, torch.Tensor]] | None = None
        #: What the rule recorded with :meth:`record` (shown by ``preview()`` / ``musco plan``).
        self.table: Any = None

    @property
    def params(self) -> Any:
        """The decomposition's parameters (its ``Params`` instance)."""
        return self._params

    @property
    def limits(self) -> Any:
        """The rule's :class:`musco_core.limits.RankLimits` (``round_to``, ``min_rank``, ``max_rank``)."""
        return self._limits

    @property
    def has_calibration(self) -> bool:
        """Whether damage is measured on calibration data (else on the example inputs)."""
        return self.run.calibration is not None

    def cost(self, layer: Layer, rank: Rank | None, metric: str) -> float:
        """The layer's cost at ``rank`` (``None``: left as it is) by the cost called ``metric``.

        First-party costs: ``"flops"``, ``"params"`` (counted) and ``"latency"``
        (measured, seconds per forward pass of the layer).
        """
        return float(self.run.cost(metric).layer(layer, rank, self))

    def skeleton(self, layer: Layer, rank: Rank | None) -> nn.Module:
        """The module ``layer`` becomes at ``rank``, from shapes alone (``None``: the layer's own)."""
        if rank is None:
            return layer.module
        return self.decomposition.skeleton(layer.module, rank, self._params)

    def rest_cost(self, metric: str, layers: list[Layer]) -> float:
        """The cost of the rest of the model beside ``layers`` (at least 0), for model targets."""
        total = float(self.run.cost(metric).model(self))
        return max(0.0, total - sum(self.cost(layer, None, metric) for layer in layers))

    def limit(self, layer: Layer, rank: Rank) -> Rank:
        """``rank`` after the rule's ``round_to`` / ``min_rank`` / ``max_rank``."""
        return self._limits.apply(rank, self.decomposition.full_rank(layer.module),
                                  self._rounding)

    def damage(self, layer: Layer, ranks: list[Rank | None], *,
               batches: int | None = None) -> list[float]:
        """Damage to the model's output of replacing only ``layer`` at each rank.

        The square of the model's relative output error (:class:`OutputError`) over
        the measurement batches, against the model as it is now, with only that layer
        factorized (by the rule's decomposition, fitted to the calibration data if it
        is data-aware). ``None`` in ``ranks`` (left as it is) costs 0.
        """
        if batches is not None and batches != self._batches:
            self._batches, self._reference = batches, None
        reference = self._references()
        run, decomposition, params = self.run, self.decomposition, self._params
        data = None
        needs = decomposition.needs(params)
        if needs and run.calibration is not None:
            statistics = {name: run.statistics[name] for name in needs}
            original = run.reference if run.reference is not None else run.model
            data = collect_layer_data(original, run.model, [b for b, _ in reference],
                                      {layer.name: (layer.module, decomposition, statistics)}
                                      )[layer.name]
        wanted = [r for r in ranks if r is not None]
        built = decomposition.compress_ranks(layer.module, wanted, params, data=data)
        measured = {i: self._measure(layer.name, new) for i, (new, _) in enumerate(built)}
        out, k = [], 0
        for rank in ranks:
            if rank is None:
                out.append(0.0)
            else:
                out.append(measured[k])
                k += 1
        return out

    def progress(self, iterable: Iterable[Any], desc: str | None = None,
                 total: int | None = None) -> Iterable[Any]:
        """``iterable`` with a progress bar when the run shows progress."""
        return self.run.progress(iterable, desc, total)

    def record(self, name: str, table: Any) -> None:
        """Keep a table (e.g. per-layer sensitivity) for ``preview()``, ``musco plan`` and the state.

        ``str(table)`` is what is shown; a ``to_dict()`` of plain data is saved with it.
        """
        self.table = table

    # -- measuring ----------------------------------------------------------------------

    def _references(self) -> list[tuple[Any, torch.Tensor]]:
        if self._reference is None:
            run = self.run
            if run.calibration is not None:
                batches = []
                for i, batch in enumerate(run.calibration):
                    if i >= self._batches:
                        break
                    batches.append(batch)
            elif run.example_inputs is not None:
                batches = [run.example_inputs]
            else:
                raise SpecError("measuring damage without calibration data runs the model on "
                                "the example inputs, and this run has none: pass "
                                "example_inputs= (or calibration=) to Compressor.resume")
            with torch.no_grad(), eval_mode(run.model):
                self._reference = [(b, first_tensor(run_model(run.model, b)).detach().clone())
                                   for b in batches]
        return self._reference

    def _measure(self, name: str, new: nn.Module) -> float:
        model = self.run.model
        new.eval()
        error = OutputError()
        with torch.no_grad(), eval_mode(model), standing_in(model, {name: new}):
            for batch, ref in self._reference:
                error.add(first_tensor(run_model(model, batch)), ref)
        return error.value ** 2


def model_params(model: nn.Module) -> int:
    """The model's parameter count (shared parameters once): what the ``params`` cost counts."""
    return param_count(model)
