"""What the engine offers rank rules that choose the ranks of many layers together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from musco_core import datafit
from musco_core.calibration import collect_layer_data
from musco_core.stats import _first_tensor, eval_mode, param_count, run_model
from musco_core.strategies import Layer, Rank
from musco_core.surgery import standing_in

if TYPE_CHECKING:
    from musco_core.engine import Compressor
    from musco_core.plan import ResolvedRule

#: Cost metrics :meth:`JointContext.cost` knows.
METRICS = ("flops", "params", "latency")


class JointContext:
    """Costs, measured damage and rank limits for one rule's layers in one round.

    Handed to :meth:`musco_core.RankSelector.select_joint`. Measuring damage runs
    the model: on the first ``batches`` calibration batches, or on the example
    inputs when the compressor has no calibration data.
    """

    def __init__(self, compressor: Compressor, rule: ResolvedRule, *, batches: int = 2):
        self._compressor = compressor
        self._rule = rule
        self._batches = batches
        self._reference: list[tuple[Any, torch.Tensor]] | None = None
        #: What the rule recorded with :meth:`record` (shown by ``preview()`` / ``musco plan``).
        self.table: Any = None

    @property
    def decomposition(self):
        return self._rule.decomposition.strategy

    @property
    def has_calibration(self) -> bool:
        """Whether damage is measured on calibration data (else on the example inputs)."""
        return self._compressor.calibration is not None

    def cost(self, layer: Layer, rank: Rank | None, metric: str) -> float:
        """The layer's cost at ``rank`` (``None``: left as it is) in ``metric``.

        ``"flops"`` and ``"params"`` are counted (the decomposition's
        ``flop_count`` / ``param_count``); ``"latency"`` is measured in seconds by
        the compressor's :class:`musco_core.latency.LatencyModel` on the layer's
        input shape (the factorized module is built from shapes by ``skeleton``).
        """
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; use one of {', '.join(METRICS)}")
        if metric == "flops":
            return float(layer.stats.flops if rank is None
                         else self.decomposition.flop_count(layer.module, rank, layer.stats))
        if metric == "params":
            return float(layer.stats.params if rank is None
                         else self.decomposition.param_count(layer.module, rank))
        latency = self._compressor._latency_model()
        module = layer.module if rank is None else self.decomposition.skeleton(
            layer.module, rank, self._rule.decomposition.params)
        return float(latency.time_module(module, layer.stats.input_shape)) * layer.stats.calls

    def rest_cost(self, metric: str, layers: list[Layer]) -> float:
        """Cost of the rest of the model beside ``layers``, for model-level targets.

        The whole model's cost now minus the summed cost of ``layers`` (at least 0):
        for ``"flops"`` the model's counted FLOPs on the example inputs, for
        ``"params"`` its parameter count (shared parameters once), for
        ``"latency"`` its measured time on the example inputs. A rule with
        ``scope = "model"`` adds this to both sides of its target, so the target is
        the whole model's reduction.
        """
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; use one of {', '.join(METRICS)}")
        compressor = self._compressor
        if metric == "flops":
            total = float(compressor.model_flops_now)
        elif metric == "params":
            total = float(param_count(compressor.model))
        else:
            total = compressor._latency_model().time_model(compressor.model,
                                                           compressor.example_inputs)
        return max(0.0, total - sum(self.cost(layer, None, metric) for layer in layers))

    def limit(self, layer: Layer, rank: Rank) -> Rank:
        """``rank`` after the rule's ``round_to`` / ``min_rank`` / ``max_rank``."""
        selector = self._rule.rank.strategy
        return self._rule.rank.limits.apply(rank, self.decomposition.full_rank(layer.module),
                                            selector.rounding)

    def damage(self, layer: Layer, ranks: list[Rank | None], *,
               batches: int | None = None) -> list[float]:
        """Damage to the model's output of replacing only ``layer`` at each rank.

        ``sum |f(x) - f'(x)|^2 / sum |f(x)|^2`` over the measurement batches, with
        ``f`` the model as it is now and ``f'`` the same model with the layer
        factorized (by the rule's decomposition, fitted to the calibration data if
        it is data-aware). ``None`` in ``ranks`` (left as it is) costs 0.
        """
        if batches is not None and batches != self._batches:
            self._batches, self._reference = batches, None
        reference = self._references()
        compressor = self._compressor
        rule = self._rule
        decomposition, params = self.decomposition, rule.decomposition.params
        data = None
        if decomposition.needs(params) and compressor.calibration is not None:
            original = compressor.original if compressor.original is not None else compressor.model
            data = collect_layer_data(original, compressor.model,
                                      [b for b, _ in reference],
                                      {layer.name: (layer.module, decomposition)})[layer.name]
        out = []
        with datafit.reusing():  # one whitened SVD for all the ranks of this layer
            for rank in ranks:
                if rank is None:
                    out.append(0.0)
                    continue
                if data is not None:
                    new, _ = decomposition.compress(layer.module, rank, params, data=data)
                else:
                    new, _ = decomposition.compress(layer.module, rank, params)
                out.append(self._measure(layer.name, new, reference))
        return out

    def progress(self, iterable: Iterable[Any], desc: str | None = None,
                 total: int | None = None) -> Iterable[Any]:
        """``iterable`` with a progress bar when the compressor shows progress."""
        if not self._compressor.progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)

    def record(self, name: str, table: Any) -> None:
        """Keep a table (e.g. per-layer sensitivity) for ``preview()`` and ``musco plan``."""
        self.table = table

    # -- measuring ----------------------------------------------------------------------

    def _references(self) -> list[tuple[Any, torch.Tensor]]:
        if self._reference is None:
            compressor = self._compressor
            if compressor.calibration is not None:
                batches = []
                for i, batch in enumerate(compressor.calibration):
                    if i >= self._batches:
                        break
                    batches.append(batch)
            else:
                batches = [compressor.example_inputs]
            with torch.no_grad(), eval_mode(compressor.model):
                self._reference = [(b, _first_tensor(run_model(compressor.model, b)).detach())
                                   for b in batches]
        return self._reference

    def _measure(self, name: str, new: nn.Module,
                 reference: list[tuple[Any, torch.Tensor]]) -> float:
        model = self._compressor.model
        new.eval()
        diff = total = 0.0
        with torch.no_grad(), eval_mode(model), standing_in(model, {name: new}):
            for batch, ref in reference:
                y = _first_tensor(run_model(model, batch))
                diff += float(torch.sum((y.double() - ref.double()) ** 2))
                total += float(torch.sum(ref.double() ** 2))
        return diff / total if total > 0 else diff
