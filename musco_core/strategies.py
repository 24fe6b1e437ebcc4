"""Base classes for every kind of strategy: decompositions, rank rules, matchers and the policy kinds.

Plugins subclass these and hand instances to the ``register`` callback of the
``musco_add_*`` hooks. The engine only ever talks to a strategy through the
methods defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Union

import attrs
import torch
from torch import nn

from musco_core.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from musco_core.stats import LayerStats

#: A rank is an ``int`` (SVD, CP) or a tuple of ints (Tucker-2: ``(r_in, r_out)``).
#: Never a float: fractions are expressed through rank rules such as ``param_reduction``.
Rank = Union[int, tuple[int, ...]]


@attrs.frozen
class NoParams:
    """Params class of a strategy that takes no parameters."""


def rank_tuple(rank: Rank) -> tuple[int, ...]:
    """Return ``rank`` as a tuple of ints (an int becomes a 1-tuple)."""
    return (rank,) if isinstance(rank, int) else tuple(rank)


class Strategy:
    """What every strategy has: a registry name, a one-line summary and a Params class."""

    #: Name used in specs and in the registry.
    name: ClassVar[str] = ""
    #: One line shown by ``musco.available()`` and ``musco plugins``.
    summary: ClassVar[str] = ""
    #: Frozen attrs class the engine structures the spec's parameters into.
    Params: ClassVar[type] = NoParams

    def needs(self, params: Any) -> frozenset[str]:
        """Statistics of calibration data this strategy uses with ``params``.

        Names of registered :class:`Statistic` plugins (first-party: ``"input_gram"``,
        ``"cross_moment"``, ``"target_gram"``); an unknown name is a spec error before
        anything runs. The engine computes the union of what the strategies of a step
        need, only for that step's layers, and hands it over as ``Layer.data`` (rank
        rules) or the ``data=`` argument of :meth:`Decomposition.compress`: a
        :class:`musco_core.LayerData` mapping each name to its value. The default
        needs nothing.
        """
        return frozenset()

    def requires_calibration(self, params: Any) -> bool:
        """Whether the strategy cannot work without calibration data (checked up front).

        The default: it requires data exactly when it needs statistics. A strategy
        that only *improves* with data (``energy`` on the whitened spectrum) returns
        ``False`` and works without.
        """
        return bool(self.needs(params))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Decomposition(Strategy):
    """Factorizes the weight of a layer and rebuilds the layer as smaller modules.

    The math is pure: :meth:`decompose` and :meth:`reconstruct` take and return
    tensors. :meth:`build` turns factors into a module. The engine calls
    :meth:`check`, :meth:`full_rank`, :meth:`param_count`, :meth:`flop_count` and
    :meth:`compress`; the default :meth:`compress` chains the pure steps.

    A decomposition may also accept its own factorized modules (see
    :attr:`module_types`) and compress them further in a later round.
    """

    #: Module classes this decomposition accepts (``isinstance`` check in :meth:`check`).
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    # -- what the engine and rank rules need -------------------------------------------

    def check(self, name: str, module: nn.Module) -> None:
        """Raise :class:`~musco_core.errors.UnsupportedLayerError` if ``module`` cannot be handled.

        The default accepts instances of :attr:`module_types`; override to add
        finer checks (kernel size, groups, padding mode ...).
        """
        if not isinstance(module, self.module_types):
            accepted = ", ".join(t.__name__ for t in self.module_types) or "nothing"
            raise UnsupportedLayerError(
                f"layer {name!r}: decomposition {self.name!r} does not support "
                f"{type(module).__name__}; it accepts {accepted}"
            )

    def full_rank(self, module: nn.Module) -> Rank:
        """The largest meaningful rank for ``module`` (exact reconstruction)."""
        raise NotImplementedError

    def param_count(self, module: nn.Module, rank: Rank) -> int:
        """Number of parameters of the factorized module at ``rank`` (bias included)."""
        raise NotImplementedError

    def flop_count(self, module: nn.Module, rank: Rank, stats: LayerStats) -> int:
        """FLOPs of the factorized module at ``rank`` for the input recorded in ``stats``.

        FLOPs are counted the way :mod:`torch.utils.flop_counter` counts them
        (a multiply-add is two FLOPs).
        """
        raise NotImplementedError

    def rank_for_param_count(self, module: nn.Module, budget: float) -> Rank | None:
        """The largest rank whose :meth:`param_count` is at most ``budget`` (``None`` if none).

        The default is :func:`largest_rank_within`; override it with a closed form
        where the decomposition has one.
        """
        return largest_rank_within(
            self.full_rank(module), lambda r: self.param_count(module, r), budget
        )

    def rank_for_flop_count(self, module: nn.Module, budget: float, stats: LayerStats) -> Rank | None:
        """The largest rank whose :meth:`flop_count` is at most ``budget`` (``None`` if none)."""
        return largest_rank_within(
            self.full_rank(module), lambda r: self.flop_count(module, r, stats), budget
        )

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """One matrix per rank component, whose spectrum data-driven rank rules analyse.

        For an int rank a list of one matrix (SVD: the weight matrix); for
        Tucker-2's ``(r_in, r_out)`` the mode-1 (cin x cout*kh*kw) and mode-0
        (cout x cin*kh*kw) unfoldings, in that order. Rules such as ``vbmf`` and
        ``energy`` compute one rank per matrix.
        """
        raise NotImplementedError(f"{type(self).__name__} does not provide rank_matrices")

    def data_rank_matrices(self, module: nn.Module, data: Any, params: Any) -> list[torch.Tensor]:
        """Like :meth:`rank_matrices`, but of what the layer does on its calibration inputs.

        ``data`` is the layer's :class:`musco_core.LayerData`. Spectrum-based rank
        rules (``energy``, ``vbmf``) use this when the engine has statistics for the
        layer, so they rank by the layer's output rather than its weights. The
        default ignores the data and returns :meth:`rank_matrices`.
        """
        return self.rank_matrices(module)

    def validate_rank(self, module: nn.Module, rank: Rank) -> str | None:
        """Return a message if ``rank`` is not valid for ``module``, else ``None``."""
        full = rank_tuple(self.full_rank(module))
        given = rank_tuple(rank) if isinstance(rank, (int, tuple)) else None
        if len(full) == 1 and isinstance(rank, tuple):
            given = None  # a one-mode rank is an int: (8,) would pass the length check
        if given is None or len(given) != len(full) or not all(isinstance(r, int) for r in given):
            shape = "an int" if len(full) == 1 else f"a tuple of {len(full)} ints"
            return f"rank {rank!r} is not {shape}"
        for r, f in zip(given, full):
            if isinstance(r, bool) or r < 1 or r > f:
                return f"rank {rank!r} is outside 1..{self.full_rank(module)!r}"
        return None

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer input ``x`` as rows ``(n, d)`` whose Gram matrix ``"input_gram"`` sums.

        The default (:func:`input_rows`) gives feature vectors for Linear-like
        layers (last dimension) and channel vectors at the positions a 1x1 conv
        reads for conv-like layers. Override it for other layouts (e.g. unfolded
        patches).
        """
        return input_rows(module, x)

    def compress_ranks(self, module: nn.Module, ranks: list[Rank], params: Any,
                       data: Any = None) -> Iterator[tuple[nn.Module, float]]:
        """:meth:`compress` at each of ``ranks`` in turn (what a joint rank rule measures).

        The default calls :meth:`compress` once per rank. Override it to share work
        that does not depend on the rank (one SVD truncated at every rank); nothing
        shared may outlive the iterator.
        """
        for rank in ranks:
            if data is not None and self.needs(params):
                yield self.compress(module, rank, params, data=data)
            else:
                yield self.compress(module, rank, params)

    def compress(self, module: nn.Module, rank: Rank, params: Any,
                 data: Any = None) -> tuple[nn.Module, float]:
        """Return the factorized module and the relative weight error ``|W - W'| / |W|``.

        Must not modify ``module``. The default runs :meth:`weight`,
        :meth:`decompose`, :meth:`reconstruct` and :meth:`build`.

        ``data`` is a :class:`musco_core.LayerData` with the statistics named by
        :meth:`needs`; the engine passes it (as a keyword) only to a decomposition
        whose :meth:`needs` is not empty, so a decomposition that needs no data may
        keep the three-argument signature.
        """
        weight = self.weight(module).detach()
        factors = self.decompose(weight, rank, params)
        approx = self.reconstruct(factors)
        new = self.build(module, factors)
        return new, relative_error(weight, approx)

    def skeleton(self, module: nn.Module, rank: Rank, params: Any) -> nn.Module:
        """A module with the structure :meth:`compress` builds at ``rank``; weights arbitrary.

        Used to rebuild a saved compressed model before its weights are loaded.
        The default runs :meth:`compress`; override it to skip the math.
        """
        return self.compress(module, rank, params)[0]

    # -- the pure math and the module building ----------------------------------------

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight that :meth:`decompose` factorizes (also for factorized modules)."""
        raise NotImplementedError

    def decompose(self, weight: torch.Tensor, rank: Rank, params: Any) -> Any:
        """Factorize ``weight`` at ``rank``; returns the factors (decomposition-specific)."""
        raise NotImplementedError

    def reconstruct(self, factors: Any) -> torch.Tensor:
        """Rebuild the dense weight from ``factors``."""
        raise NotImplementedError

    def build(self, module: nn.Module, factors: Any) -> nn.Module:
        """Build the factorized module replacing ``module`` (same device, dtype, bias)."""
        raise NotImplementedError


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as rows ``(n, d)``: features (last dim) or channel vectors (dim 1).

    4-D inputs (N, C, H, W) of a module with a ``stride`` (a conv, or a factorized
    conv whose first part has one) are read at the positions a 1x1 conv with that
    stride reads; other inputs are split into their last dimension.
    """
    if x.dim() == 4:
        first = module if isinstance(module, nn.Conv2d) else getattr(module, "first", None)
        if isinstance(first, nn.Conv2d) and tuple(first.kernel_size) == (1, 1) \
                and tuple(first.stride) != (1, 1):
            x = x[:, :, :: first.stride[0], :: first.stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def largest_rank_within(full: Rank, cost, budget: float) -> Rank | None:
    """The largest rank up to ``full`` whose ``cost(rank)`` is at most ``budget``.

    ``cost`` must grow with the rank. For an int rank this is a binary search
    over ``1 .. full``. For a tuple rank every component is shrunk in proportion
    to ``full`` (``r_i = max(1, floor(t * full_i))``) and the largest scale ``t``
    within budget is searched, so the shape of the rank (r_in : r_out) follows
    the layer's. Returns ``None`` when even rank 1 (all ones) is over budget.
    """
    if isinstance(full, int):
        if cost(1) > budget:
            return None
        lo, hi = 1, full
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo
    full = tuple(full)

    def at(step: int) -> tuple[int, ...]:
        # step runs over 0 .. max(full) - 1; scale t = (step + 1) / max(full)
        top = max(full)
        return tuple(max(1, (f * (step + 1)) // top) for f in full)

    if cost(at(0)) > budget:
        return None
    lo, hi = 0, max(full) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(at(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return at(lo)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``|reference - approx|_F / |reference|_F`` as a float (0 for a zero reference)."""
    ref = reference.detach()
    norm = torch.linalg.vector_norm(ref)
    diff = torch.linalg.vector_norm(ref - approx.detach().to(ref.dtype))
    if norm == 0:
        return float(diff)
    return float(diff / norm)


class RankSelector(Strategy):
    """Chooses the rank of one layer for one decomposition.

    Every rule also accepts ``round_to``, ``min_rank`` and ``max_rank`` in the
    spec; the engine applies them to the rank :meth:`select` returns (see
    :class:`musco_core.limits.RankLimits`), rounding in the direction of
    :attr:`rounding`.
    """

    #: How ``round_to`` rounds this rule's ranks: ``"down"`` (keeps a reduction
    #: target), ``"up"`` (keeps a lower bound such as an energy fraction) or ``"nearest"``.
    rounding: ClassVar[str] = "nearest"

    def problems(self, params: Any, layers: list[Layer]) -> list[str]:
        """Problems of ``params`` given the layers the rule matched (checked before any work).

        For example a per-layer mapping that names a layer the rule does not
        match. Return one message per problem; the default finds none.
        """
        return []

    #: ``True`` for rules that choose the ranks of all their layers in a round together
    #: (:meth:`select_joint`), such as a model-level budget; the engine then never calls
    #: :meth:`select` for those layers.
    joint: ClassVar[bool] = False

    def select_joint(self, layers: list[Layer], decomposition: Decomposition, params: Any,
                     context: Any) -> dict[str, Rank | None]:
        """Ranks for all ``layers`` of one rule in one round, by name (``None``: leave as is).

        Called once per rule and round when :attr:`joint` is true. ``context`` is a
        :class:`musco_core.joint.JointContext`: costs (FLOPs, params, latency) of a
        rank, the measured damage to the model's output of a rank, the rule's rank
        limits and a progress bar.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a joint rank rule")

    def select(self, layer: Layer, decomposition: Decomposition, params: Any) -> Rank | None:
        """Return the rank for ``layer``, or ``None`` to leave the layer as it is.

        ``layer`` carries the dotted name, the current module and its statistics.
        Raise :class:`ValueError` with a message naming the layer for bad input.
        """
        raise NotImplementedError

    def skip_reason(self, layer: Layer, decomposition: Decomposition, params: Any) -> str | None:
        """Why :meth:`select` returned ``None`` for ``layer``: one sentence for its report.

        Called by the engine only after :meth:`select` returned ``None`` (never for
        joint rules), with the same arguments. The default, ``None``, gives the plain
        reason "rank rule left it uncompressed"; say more when the user can act on it
        (``param_reduction``: "rate 1000 is out of reach: ...; ask for at most 37.2").
        """
        return None


class Matcher(Strategy):
    """Decides whether a rule applies to a layer."""

    def matches(self, name: str, module: nn.Module, params: Any) -> bool:
        """Return whether the rule applies to the layer ``name``."""
        raise NotImplementedError


@attrs.frozen
class Layer:
    """A layer as a rank rule sees it: its dotted name, the current module, its statistics."""

    name: str
    module: nn.Module
    stats: LayerStats
    #: Compression round, starting at 1 (a later round sees an already factorized module).
    round: int = 1
    #: Statistics of the calibration data the layer sees now (:class:`musco_core.LayerData`),
    #: when calibration data was given and a strategy of the rule needs them; else ``None``.
    data: Any = None


# -- the policy kinds: statistics, refiners, costs, gates, FLOP formulas ---------------------


@attrs.frozen(eq=False)
class LayerBatch:
    """One call of a layer on one calibration batch, as a :class:`Statistic` sees it.

    ``rows`` are the inputs the layer gets in the model as it is now and
    ``original_rows`` the inputs the original layer got on the same batch, both cut
    into rows by :meth:`Decomposition.input_rows` and in float64. ``output`` is the
    layer's output now (read it at once: it is not a copy).
    """

    name: str
    index: int
    rows: torch.Tensor
    original_rows: torch.Tensor
    module: nn.Module
    output: Any = None


class Statistic(Strategy):
    """What the calibration pass accumulates per layer, by name (``"input_gram"``, ...).

    A decomposition or rank rule names the statistics it needs in
    :meth:`Strategy.needs`; the engine computes only those, for only the layers
    that need them, in one pass over the calibration data, and hands them over in
    a :class:`musco_core.LayerData` (``data["input_gram"]``).
    """

    def update(self, state: Any, batch: LayerBatch) -> Any:
        """Fold one layer call into ``state`` (``None`` at the first call); return the new state."""
        raise NotImplementedError

    def result(self, state: Any, rows: int) -> Any:
        """The statistic from the final ``state`` after ``rows`` rows (default: ``state``).

        Whatever is returned is kept for later: detach and clone what must not change.
        """
        return state


class Refiner(Strategy):
    """Local refinement after a step: an objective and the loop that lowers it, without labels.

    The engine keeps the step's new modules out of the model while this runs, and
    keeps the result only if :meth:`objective` did not get worse (else the factors
    from before refinement are restored).
    """

    #: The step report field :meth:`objective` is reported in (``None``: not reported).
    step_field: ClassVar[str | None] = None
    #: The step report field for the objective before refinement, when refinement kept.
    refined_field: ClassVar[str | None] = None

    def enabled(self, params: Any) -> bool:
        """Whether refinement runs with ``params`` (e.g. ``steps > 0``)."""
        return True

    def objective(self, modules: dict[str, nn.Module], context: Any, params: Any) -> float:
        """What refinement lowers, for the new ``modules`` (not yet in the model); lower is better."""
        raise NotImplementedError

    def refine(self, modules: dict[str, nn.Module], context: Any, params: Any) -> None:
        """Train the parameters of ``modules`` in place; ``context`` is the :class:`StepContext`."""
        raise NotImplementedError


class Cost(Strategy):
    """What a budget counts (``"flops"``, ``"params"``, ``"latency"``): a layer's and the model's."""

    def layer(self, layer: Layer, rank: Rank | None, context: Any) -> float:
        """The cost of ``layer`` factorized at ``rank`` (``None``: as it is now).

        ``context`` is the :class:`musco_core.RoundContext` of the rule asking: its
        ``decomposition`` counts (``flop_count``, ``param_count``) and its
        ``skeleton(layer, rank)`` builds the factorized module from shapes alone
        (weights uninitialised: time it, do not read it).
        """
        raise NotImplementedError

    def model(self, context: Any) -> float:
        """The whole model's cost now, for model-level targets."""
        raise NotImplementedError


@attrs.frozen
class Verdict:
    """What a :class:`GateStrategy` says of a built layer: keep it or not, why, and report fields."""

    keep: bool = True
    reason: str = ""
    #: Extra fields for the layer's report (e.g. ``time_before``, ``time_after``).
    fields: Any = attrs.field(factory=dict)


class GateStrategy(Strategy):
    """Decides, around building a layer, at which rank it is built and whether it is kept.

    Listed in a rule's ``gates`` (by name, through :class:`musco_core.Gate`). :meth:`adjust` may move the rank the rank rule
    chose (before the layer is built); :meth:`keep` may drop a built layer (the
    layer is then reported as skipped with the reason). Both default to passing.
    """

    def problems(self, params: Any, rank_rule: RankSelector, limits: Any) -> list[str]:
        """Problems of using this gate with a rule's rank rule and limits (checked up front)."""
        return []

    def adjust(self, layer: Layer, rank: Rank, context: Any, params: Any,
               ) -> tuple[Rank, dict[str, Any]]:
        """The rank to build instead of ``rank``, and fields for the layer's report.

        The fields may be ``time_before`` and ``time_after`` (measured seconds);
        anything else is a :class:`~musco_core.CompressionError` naming the gate.
        """
        return rank, {}

    def keep(self, layer: Layer, module: nn.Module, context: Any, params: Any) -> Verdict:
        """Whether the built ``module`` replaces ``layer``."""
        return Verdict()


class FlopFormula(Strategy):
    """FLOPs of a layer type that ``torch.utils.flop_counter`` misses (counts as 0).

    Used for a call of a module of :attr:`module_types` that added no FLOPs to the
    counter.
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Whether the whole model's FLOP total uses it too (the first-party RNN and
    #: attention formulas keep the totals ``FlopCounterMode`` gives, as before them).
    in_model_total: ClassVar[bool] = True

    def flops(self, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """FLOPs of one call of ``module`` with ``args`` / ``kwargs`` (a multiply-add is 2)."""
        raise NotImplementedError
