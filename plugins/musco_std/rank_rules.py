"""First-party rank rules: fixed (manual) ranks and a parameter-reduction target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from musco_core import RankSelector
from musco_core.stats import param_count


def _as_rank(value: Any) -> Any:
    """Lists (from TOML/YAML) become tuples; everything else is left for the validator."""
    return tuple(value) if isinstance(value, list) else value


def _is_rank(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return isinstance(value, tuple) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )


def _rank_or_none(instance, attribute, value) -> None:
    if value is not None and not _is_rank(value):
        raise ValueError(
            f"{attribute.name!r} must be a positive int or a tuple of positive ints "
            f"(or None), got {value!r}"
        )


def _ranks_mapping(instance, attribute, value) -> None:
    for layer, rank in value.items():
        if not isinstance(layer, str):
            raise ValueError(f"'ranks' keys must be layer names (str), got {layer!r}")
        if rank is not None and not _is_rank(rank):
            raise ValueError(
                f"ranks[{layer!r}] must be a positive int, a tuple of positive ints or None "
                f"(do not compress), got {rank!r}"
            )


def _freeze_ranks(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"'ranks' must be a mapping of layer name to rank, got {value!r}")
    return {k: _as_rank(v) for k, v in value.items()}


@attrs.frozen
class FixedParams:
    #: Rank for every layer the rule matches (unless listed in ``ranks``).
    rank: Any = attrs.field(default=None, converter=_as_rank, validator=_rank_or_none)
    #: Per-layer ranks by dotted name; ``None`` leaves that layer uncompressed.
    ranks: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_freeze_ranks, validator=_ranks_mapping
    )


def _unknown_layers(named: Mapping[str, Any], layers) -> list[str]:
    known = {layer.name for layer in layers}
    return [
        f"layer {name!r} is not matched by this rule; matched layers: "
        f"{', '.join(sorted(known)) or 'none'}"
        for name in named
        if name not in known
    ]


class Fixed(RankSelector):
    """Manual ranks: one ``rank`` for all layers, or ``ranks={layer: rank}`` (``None`` skips).

    A layer that is in neither gets an error when the spec is checked, so no
    layer is compressed with a rank nobody chose.
    """

    name = "fixed"
    summary = "manual ranks: rank=R for all, or ranks={layer: R or None}"
    Params = FixedParams

    def problems(self, params: FixedParams, layers) -> list[str]:
        return _unknown_layers(params.ranks, layers)

    def select(self, layer, decomposition, params: FixedParams):
        if layer.name in params.ranks:
            return params.ranks[layer.name]
        if params.rank is None:
            raise ValueError(
                f"layer {layer.name!r} has no rank: give 'rank' for all layers or add "
                f"{layer.name!r} to 'ranks' (None leaves it uncompressed)"
            )
        return params.rank


def _rate(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
        raise ValueError(f"{attribute.name!r} must be a number > 1, got {value!r}")


def _rates_mapping(instance, attribute, value) -> None:
    for layer, rate in value.items():
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not rate > 1):
            raise ValueError(f"rates[{layer!r}] must be a number > 1 or None, got {rate!r}")


@attrs.frozen
class ParamReductionParams:
    #: Target: the factorized layer has at most ``1/rate`` of the current layer's parameters.
    rate: float = attrs.field(default=2.0, validator=_rate)
    #: Per-layer rates by dotted name; ``None`` leaves that layer uncompressed.
    rates: Mapping[str, Any] = attrs.field(factory=dict, converter=dict, validator=_rates_mapping)


class ParamReduction(RankSelector):
    """The largest rank whose factorized layer has at most ``1/rate`` of the layer's parameters.

    The rate is relative to the layer as it is now: in a later round, to the
    already factorized layer (as in musco-pytorch's ``CompressorPR``).
    """

    name = "param_reduction"
    summary = "largest rank with at most 1/rate of the layer's parameters"
    Params = ParamReductionParams
    rounding = "down"

    def problems(self, params: ParamReductionParams, layers) -> list[str]:
        return _unknown_layers(params.rates, layers)

    def select(self, layer, decomposition, params: ParamReductionParams):
        rate = params.rates.get(layer.name, params.rate)
        if rate is None:
            return None
        return decomposition.rank_for_param_count(layer.module, param_count(layer.module) / rate)


RANK_RULES = (Fixed(), ParamReduction())
