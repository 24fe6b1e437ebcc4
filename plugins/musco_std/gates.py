"""First-party gates: ``round_by_speed`` (move a rank to a faster one nearby) and ``min_speedup``.

Both time layers with the run's shared :class:`~musco_std.latency.LatencyModel`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from musco_core import GateStrategy
from musco_core.strategies import Verdict
from musco_std.latency import fastest_rank_near, latency_model


def _positive_number(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name!r} must be a number > 0, got {value!r}")


def _positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name!r} must be a positive int, got {value!r}")


@attrs.frozen
class MinSpeedupParams:
    #: Keep a layer only if its factorized version is at least this much faster.
    factor: float = attrs.field(converter=lambda v: float(v) if isinstance(v, int)
                                and not isinstance(v, bool) else v,
                                validator=_positive_number)


#: ``min_speedup`` decisions whose first speedup is within this factor of the margin are
#: timed twice more (median of three).
RETIME_BAND = 1.25


class MinSpeedup(GateStrategy):
    name = "min_speedup"
    summary = ("skip a layer whose factorized version is not `factor` times faster, "
               "measured on the compressor's device")
    Params = MinSpeedupParams

    def keep(self, layer, module, context, params) -> Verdict:
        timer = latency_model(context.run)
        shape = layer.stats.input_shape
        t_old, t_new = timer.speedup(layer.module, module, shape)
        retime = getattr(timer, "retime", None)  # a user's LatencyModel subclass may lack it
        if retime is not None and t_new > 0 and \
                abs(math.log(t_old / t_new / params.factor)) < math.log(RETIME_BAND):
            # near the margin one measurement is noisier than the margin: median of 3
            t_old, t_new = retime(layer.module, shape), retime(module, shape)
        fields = {"time_before": t_old, "time_after": t_new}
        if t_new * params.factor > t_old:
            return Verdict(keep=False, fields=fields,
                           reason=f"not faster enough: {t_old * 1e3:.3f} ms -> "
                                  f"{t_new * 1e3:.3f} ms ({t_old / t_new:.2f}x < min_speedup "
                                  f"{params.factor})")
        return Verdict(fields=fields)


@attrs.frozen
class RoundBySpeedParams:
    #: Candidate ranks are the multiples of this number just below and above the rank.
    multiple: int = attrs.field(validator=_positive_int)


class RoundBySpeed(GateStrategy):
    name = "round_by_speed"
    summary = ("round each chosen rank down, up or not at all by measured speedup per unit of "
               "discarded spectrum (whitened with calibration data)")
    Params = RoundBySpeedParams

    def problems(self, params, rank_rule, limits) -> list[str]:
        if limits.round_to is not None:
            return ["give 'round_to' or the 'round_by_speed' gate, not both"]
        if rank_rule.joint:
            return [f"the 'round_by_speed' gate does not apply to the joint rank rule "
                    f"{rank_rule.name!r} (it chooses ranks for its target together)"]
        return []

    def adjust(self, layer, rank, context, params) -> tuple[Any, dict[str, float]]:
        """The rank near ``rank`` with the best speedup per truncation error.

        The error of a rank is the discarded share of the energy of the layer's rank
        matrices (``data_rank_matrices`` with calibration statistics, else
        ``rank_matrices``), summed over the rank's components.
        """
        decomposition, dparams = context.decomposition, context.params
        if layer.data is not None:
            matrices = decomposition.data_rank_matrices(layer.module, layer.data, dparams)
        else:
            matrices = decomposition.rank_matrices(layer.module)
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

        timer = latency_model(context.run)
        full = decomposition.full_rank(layer.module)
        chosen = fastest_rank_near(decomposition, layer.module, layer.stats, rank, timer, cost,
                                   params=dparams, multiple=params.multiple)
        best = context.limits.apply(chosen.rank, full)  # min_rank / max_rank still hold
        if best != chosen.rank:  # clamped: time what will be built
            t_new = timer.time_module(decomposition.skeleton(layer.module, best, dparams),
                                      layer.stats.input_shape)
        else:
            t_new = next(c.seconds for c in chosen.candidates if c.rank == best)
        return best, {"time_before": chosen.original_seconds, "time_after": t_new}


GATES = (RoundBySpeed(), MinSpeedup())
