"""First-party rank rules: manual ranks, reduction targets and spectrum-based ranks (vbmf, energy)."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
import torch

from musco_core import RankSelector
from musco_core.stats import param_count
from musco_core.strategies import rank_tuple
from musco_std.vbmf import evbmf_from_squared, squared_singular_values, weaken


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


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value)


def _per_layer(ok: Callable[[Any], bool], valid: str):
    """Validators for a rule's global value and its per-layer mapping, with one wording.

    The mapping's values may also be ``None`` (leave that layer uncompressed).
    """

    def scalar(instance, attribute, value) -> None:
        if not ok(value):
            raise ValueError(f"{attribute.name!r} must be {valid}, got {value!r}")

    def mapping(instance, attribute, value) -> None:
        for layer, v in value.items():
            if v is not None and not ok(v):
                raise ValueError(
                    f"{attribute.name}[{layer!r}] must be {valid} or None (do not compress), "
                    f"got {v!r}"
                )

    return scalar, mapping


_rate, _rates_mapping = _per_layer(lambda v: _number(v) and v > 1, "a number > 1")


def _mapping(name: str):
    """Converter for a per-layer mapping field: a dict copy, or a TypeError naming the field."""

    def convert(value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise TypeError(f"{name!r} must be a mapping of layer name to value, got {value!r}")
        for layer in value:
            if not isinstance(layer, str):
                raise TypeError(f"{name!r} keys must be layer names (str), got {layer!r}")
        return dict(value)

    return convert


@attrs.frozen
class ReductionParams:
    #: Target: the factorized layer has at most ``1/rate`` of the current layer's
    #: parameters (``param_reduction``) or FLOPs (``flop_reduction``).
    rate: float = attrs.field(default=2.0, validator=_rate)
    #: Per-layer rates by dotted name; ``None`` leaves that layer uncompressed.
    rates: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping("rates"),
                                           validator=_rates_mapping)


#: The names the two rules' Params were published under.
ParamReductionParams = FlopReductionParams = ReductionParams


class _Spectral:
    """Mixin of spectrum-based rules: with calibration data they rank the whitened spectrum."""

    def needs(self, params) -> frozenset[str]:
        return frozenset({"input_gram", "cross_moment"})

    def requires_calibration(self, params) -> bool:
        return False


class _PerLayer(RankSelector):
    """A rule driven by one value (``field``) with per-layer overrides (``mapping``).

    A layer's value comes from the mapping if it is listed there, else from the
    global field; ``None`` leaves the layer uncompressed. Mapping keys must be
    layers the rule matches.
    """

    field = ""
    mapping = ""

    def problems(self, params, layers) -> list[str]:
        return _unknown_layers(getattr(params, self.mapping), layers)

    def select(self, layer, decomposition, params):
        value = getattr(params, self.mapping).get(layer.name, getattr(params, self.field))
        if value is None:
            return None
        return self.rank_for(layer, decomposition, value)

    def rank_for(self, layer, decomposition, value):
        raise NotImplementedError


def _at_most(reach: float) -> float:
    """``reach`` rounded down to what a spec can ask for (0.1 steps; 0.01 below 2)."""
    scale = 10 if reach >= 2 else 100
    return math.floor(reach * scale) / scale


class _Reduction(_PerLayer):
    """The largest rank within ``1/rate`` of the layer's current cost."""

    Params = ReductionParams
    rounding = "down"
    field, mapping = "rate", "rates"
    #: What the rate divides, as the skip reason names it.
    metric = ""

    def cost_now(self, layer) -> float:
        raise NotImplementedError

    def cost_at(self, layer, decomposition, rank) -> float:
        raise NotImplementedError

    def skip_reason(self, layer, decomposition, params):
        """Why no rank was chosen: the rate is out of reach even at the smallest rank.

        Names the largest rate that layer can reach, e.g. ``rate 1000 is out of reach:
        the smallest rank (1) gives 37.2x fewer FLOPs; ask for at most 37.2``. ``None``
        (the engine's plain reason) for a layer left out on purpose (``rates``).
        """
        rate = getattr(params, self.mapping).get(layer.name, getattr(params, self.field))
        if rate is None:
            return None
        full = decomposition.full_rank(layer.module)
        smallest = 1 if isinstance(full, int) else tuple(1 for _ in full)
        at_smallest = self.cost_at(layer, decomposition, smallest)
        reach = self.cost_now(layer) / at_smallest if at_smallest > 0 else math.inf
        if reach >= rate:
            return None  # not what made the rule give up
        shown = smallest if isinstance(smallest, int) else ", ".join(map(str, smallest))
        head = (f"rate {rate:g} is out of reach: the smallest rank ({shown}) gives "
                f"{_at_most(reach):g}x fewer {self.metric}")
        if _at_most(reach) <= 1:
            return (f"{head}; decomposition {decomposition.name!r} cannot make this layer "
                    f"smaller in {self.metric}: exclude it or use another decomposition")
        return f"{head}; ask for at most {_at_most(reach):g}"


class ParamReduction(_Reduction):
    """The largest rank whose factorized layer has at most ``1/rate`` of the layer's parameters.

    The rate is relative to the layer as it is now: in a later round, to the
    already factorized layer (as in musco-pytorch's ``CompressorPR``).
    """

    name = "param_reduction"
    summary = "largest rank with at most 1/rate of the layer's parameters"
    metric = "parameters"

    def cost_now(self, layer) -> float:
        return float(param_count(layer.module))

    def cost_at(self, layer, decomposition, rank) -> float:
        return float(decomposition.param_count(layer.module, rank))

    def rank_for(self, layer, decomposition, rate: float):
        return decomposition.rank_for_param_count(layer.module, param_count(layer.module) / rate)


class FlopReduction(_Reduction):
    """The largest rank whose factorized layer needs at most ``1/rate`` of the layer's FLOPs.

    FLOPs are those recorded for the example inputs (``layer.stats.flops``, all
    calls of the layer); the decomposition's :meth:`flop_count` prices a rank.
    In a later round the rate is relative to the already factorized layer.
    """

    name = "flop_reduction"
    summary = "largest rank with at most 1/rate of the layer's FLOPs"
    metric = "FLOPs"

    def cost_now(self, layer) -> float:
        return float(layer.stats.flops)

    def cost_at(self, layer, decomposition, rank) -> float:
        return float(decomposition.flop_count(layer.module, rank, layer.stats))

    def rank_for(self, layer, decomposition, rate: float):
        flops = layer.stats.flops
        if flops <= 0:
            raise ValueError(
                f"layer {layer.name!r} has {flops} FLOPs recorded, so a FLOP reduction "
                f"target is meaningless; use param_reduction for it"
            )
        return decomposition.rank_for_flop_count(layer.module, flops / rate, layer.stats)


#: Dtypes whose spectra are never computed as they are: the module is upcast to float32
#: (a copy) before its rank matrices are formed, and spectra are computed in float64.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Spectra of live modules: module -> (fingerprint, decomposition name, spectra, full rank).
#: The plan checks every layer's rank when a Compressor is built and step() asks again; with
#: this cache a spectrum-based rule computes each layer's spectrum once. An entry is valid only
#: while the module holds the very same parameter tensors, unmodified (same objects, same
#: storage, same in-place version counter); it disappears with the module.
_SPECTRA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(module) -> tuple:
    # The tensors themselves are kept (not their ids), so a freed tensor's id or address
    # can never be mistaken for a live one's.
    return tuple((p, p.data_ptr(), p._version, p.dtype, tuple(p.shape))
                 for p in module.parameters())


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b))


def _spectral_matrices(layer, decomposition) -> tuple[list, tuple[int, ...]]:
    """``decomposition.rank_matrices`` of the layer, one per component of its full rank.

    A float16/bfloat16 layer is analysed through a float32 copy (half-precision QR and
    eigen solvers are missing or inaccurate).
    """
    module = layer.module
    if any(p.dtype in _LOW_PRECISION for p in module.parameters()):
        module = copy.deepcopy(module).float()
    try:
        matrices = decomposition.rank_matrices(module)
    except NotImplementedError:
        raise ValueError(
            f"layer {layer.name!r}: decomposition {decomposition.name!r} does not provide "
            f"rank_matrices, which spectrum-based rank rules (vbmf, energy) need; use "
            f"param_reduction, flop_reduction or fixed with it"
        ) from None
    full = rank_tuple(decomposition.full_rank(layer.module))
    if len(matrices) != len(full):
        raise ValueError(
            f"layer {layer.name!r}: decomposition {decomposition.name!r} gives "
            f"{len(matrices)} rank matrices for a rank with {len(full)} components"
        )
    return matrices, full


Spectra = list[tuple[np.ndarray, tuple[int, int]]]


def layer_spectra(layer, decomposition) -> tuple[Spectra, tuple[int, ...]]:
    """Squared singular values (float64, descending) and shape of each rank matrix of a layer,
    and the decomposition's full rank.

    Cached per module (see :data:`_SPECTRA`): asking twice for an unchanged layer
    costs nothing the second time.
    """
    if getattr(layer, "data", None) is not None:
        # Statistics of the calibration data: the spectrum of what the layer does on it
        # (whitened), never cached (the data changes from step to step).
        matrices = decomposition.data_rank_matrices(layer.module, layer.data, None)
        full = rank_tuple(decomposition.full_rank(layer.module))
        if len(matrices) == len(full):
            return [(squared_singular_values(m), (int(m.shape[0]), int(m.shape[1])))
                    for m in matrices], full
    key = _fingerprint(layer.module)
    hit = _SPECTRA.get(layer.module)
    if hit is not None and hit[1] == decomposition.name and _same(hit[0], key):
        return hit[2], hit[3]
    matrices, full = _spectral_matrices(layer, decomposition)
    spectra = [(squared_singular_values(m), (int(m.shape[0]), int(m.shape[1])))
               for m in matrices]
    try:
        _SPECTRA[layer.module] = (key, decomposition.name, spectra, full)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return spectra, full


def _as_rank_of(values: list[int]) -> Any:
    return values[0] if len(values) == 1 else tuple(values)


_weakening, _weakenings_mapping = _per_layer(
    lambda v: _number(v) and 0 <= v <= 1,
    "a number in [0, 1] (1 keeps the EVBMF rank, 0 the full rank)",
)


@attrs.frozen
class VBMFParams:
    #: MUSCO's weakening factor ``w``: ``rank = int(full - w * (full - r_evbmf))``;
    #: 1 keeps the EVBMF rank, 0 the full rank. 0.8 is musco-pytorch's default.
    weakening: float = attrs.field(default=0.8, validator=_weakening)
    #: Per-layer weakening factors by dotted name; ``None`` leaves that layer uncompressed.
    weakenings: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_mapping("weakenings"), validator=_weakenings_mapping
    )


class VBMF(_Spectral, _PerLayer):
    """EVBMF rank of each of the decomposition's rank matrices, weakened towards the full rank.

    For each matrix ``Y_i`` of ``decomposition.rank_matrices(module)`` (SVD: the
    weight matrix; Tucker-2: the mode-1 and mode-0 unfoldings) the empirical
    VBMF rank ``r_i`` is computed (:func:`musco_std.vbmf.evbmf_rank`), then
    weakened: ``rank_i = max(1, int(f_i - w (f_i - r_i)))`` with ``f_i`` the
    smaller of the decomposition's full rank component and ``min(Y_i.shape)``.
    A CP decomposition gives one matrix, so its rank is the weakened EVBMF rank
    of that matrix, not a CP-specific estimate.
    """

    name = "vbmf"
    summary = "EVBMF rank of each rank matrix, weakened: int(full - w*(full - r))"
    Params = VBMFParams
    rounding = "up"
    field, mapping = "weakening", "weakenings"

    def rank_for(self, layer, decomposition, w: float):
        spectra, full = layer_spectra(layer, decomposition)
        ranks = []
        for (s2, shape), f in zip(spectra, full):
            top = min(f, min(shape))
            ranks.append(min(top, weaken(top, evbmf_from_squared(s2, shape).rank, w)))
        return _as_rank_of(ranks)


def energy_rank(s2: np.ndarray, fraction: float) -> int:
    """Smallest ``r`` with ``sum(s2[:r]) >= fraction * sum(s2)`` (``s2`` descending; at least 1)."""
    cum = np.cumsum(s2)
    total = cum[-1]
    if total <= 0:
        return 1
    return min(len(s2), int(np.count_nonzero(cum < fraction * total)) + 1)


_fraction, _fractions_mapping = _per_layer(
    lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (the share of spectral energy to keep)"
)


@attrs.frozen
class EnergyParams:
    #: Share of the spectral energy (sum of squared singular values) to keep.
    fraction: float = attrs.field(default=0.9, validator=_fraction)
    #: Per-layer fractions by dotted name; ``None`` leaves that layer uncompressed.
    fractions: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_mapping("fractions"), validator=_fractions_mapping
    )


class Energy(_Spectral, _PerLayer):
    """Smallest rank keeping ``fraction`` of the spectral energy of each rank matrix.

    For each matrix of ``decomposition.rank_matrices(module)`` with singular
    values ``s_1 >= s_2 >= ...``: the smallest ``r`` with
    ``sum_{h<=r} s_h^2 >= fraction * sum_h s_h^2``, capped by the full rank.
    For SVD this bounds the relative error: ``|W - W_r|_F^2 <= (1 - fraction) |W|_F^2``.
    """

    name = "energy"
    summary = "smallest rank keeping a fraction of the spectral energy"
    Params = EnergyParams
    rounding = "up"
    field, mapping = "fraction", "fractions"

    def rank_for(self, layer, decomposition, fraction: float):
        spectra, full = layer_spectra(layer, decomposition)
        ranks = [min(f, energy_rank(s2, fraction)) for (s2, _), f in zip(spectra, full)]
        return _as_rank_of(ranks)


RANK_RULES = (Fixed(), ParamReduction(), FlopReduction(), VBMF(), Energy())
