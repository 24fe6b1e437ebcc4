"""How much of a model's parameters and FLOPs a plan addresses (a diagnostic, not the engine)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from musco_core.stats import LayerStats, param_count


def coverage(stats_by_layer: Mapping[str, LayerStats], planned_names: Iterable[str],
             model: nn.Module, *, total_flops: int | None = None) -> dict[str, Any]:
    """The share of the model's FLOPs and parameters that the planned layers hold.

    ``stats_by_layer`` is :func:`collect_stats`' result for the candidate layers,
    ``planned_names`` the layers some rule will compress. Layers nested in another
    measured layer (``attn.out_proj`` inside ``attn``) are counted once, by the
    outer one. The FLOP total is the sum over the outermost measured layers, or
    ``total_flops`` when given (e.g. a :class:`FlopCounter` total of the whole
    model, which includes work outside any parameter-holding layer, such as
    attention products). The parameter total is the model's.

    Returns plain data::

        {"flops_total", "flops_planned", "flops_share",      # share in [0, 1]
         "params_total", "params_planned", "params_share",
         "not_planned": [(name, flops, params), ...],        # outermost layers left out, by FLOPs
         "zero_flops": [name, ...],   # hold parameters but counted 0 FLOPs (norms, embeddings)
         "not_run": [name, ...]}      # planned, but did not run in the measured pass
    """
    names = set(stats_by_layer)

    def outermost(selected: set[str]) -> list[str]:
        out = []
        for n in selected:
            parts = n.split(".")
            if not any(".".join(parts[:i]) in selected for i in range(1, len(parts))):
                out.append(n)
        return sorted(out)

    top = outermost(names)
    planned = set(planned_names)
    planned_top = outermost(planned & names)
    counted = sum(stats_by_layer[n].flops for n in top)
    flops_total = counted if total_flops is None else int(total_flops)
    flops_planned = sum(stats_by_layer[n].flops for n in planned_top)
    params_total = param_count(model)
    params_planned = sum(stats_by_layer[n].params for n in planned_top)

    def inside_planned(n: str) -> bool:
        parts = n.split(".")
        return any(".".join(parts[:i]) in planned for i in range(1, len(parts) + 1))

    left = [(n, stats_by_layer[n].flops, stats_by_layer[n].params)
            for n in top if not inside_planned(n)]
    left.sort(key=lambda t: (-t[1], -t[2], t[0]))
    return {
        "flops_total": flops_total,
        "flops_planned": flops_planned,
        "flops_share": flops_planned / flops_total if flops_total else 0.0,
        "params_total": params_total,
        "params_planned": params_planned,
        "params_share": params_planned / params_total if params_total else 0.0,
        "not_planned": left,
        "zero_flops": sorted(n for n in names
                             if stats_by_layer[n].flops == 0 and stats_by_layer[n].params > 0),
        "not_run": sorted(planned - names),
    }
