"""The ``budget`` rank rule: ranks across layers under one FLOP, parameter or latency target.

The rule sees all layers it matches in a round at once (a *joint* rank rule,
:meth:`musco_core.RankSelector.select_joint`). For each layer it measures the
damage to the model's output at a small grid of ranks (through the engine's
:class:`musco_core.joint.JointContext`), then chooses one rank per layer —
or leaves the layer as it is — so that the total cost of the layers is at most
``1/target`` of what it is now and the summed damage is as small as it can be
made. :func:`allocate` is the allocation itself, on plain numbers;
:class:`SensitivityTable` is what the rule measured and chose, for users.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from musco_core import MuscoWarning, RankSelector
from musco_core.strategies import Rank, rank_tuple

#: Target parameters and the cost metric each one asks ``context.cost`` for.
TARGETS = {"flop_reduction": "flops", "param_reduction": "params", "latency_reduction": "latency"}


# -- parameters ---------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and bool(np.isfinite(value)))


def _to_float(value: Any) -> Any:
    """Numbers become floats; anything else is left for the validator to name."""
    return float(value) if _number(value) else value


def _target(instance, attribute, value) -> None:
    if value is not None and not (_number(value) and value > 1):
        raise ValueError(
            f"{attribute.name!r} must be a number > 1 (the model-level reduction, e.g. 2.0 "
            f"for half the cost), got {value!r}"
        )


def _batches(instance, attribute, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"'batches' must be an int >= 1 or None, got {value!r}")


def _grid(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(
            f"'grid' must be an int >= 2 (candidate ranks measured per layer), got {value!r}"
        )


def _min_fraction(instance, attribute, value) -> None:
    if not (_number(value) and 0 < value < 1):
        raise ValueError(
            f"'min_fraction' must be a number in (0, 1) (the rank floor as a share of each "
            f"component of the full rank), got {value!r}"
        )


def _max_damage(instance, attribute, value) -> None:
    if value is not None and not (_number(value) and value > 0):
        raise ValueError(
            f"'max_damage' must be a number > 0 (the largest measured damage a layer may "
            f"take) or None, got {value!r}"
        )


def _bool(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name!r} must be true or false, got {value!r}")


# Fields are typed ``Any`` so that the spec's converter hands values over as written
# (it would turn "2" into 2.0 and 2.7 into 2); the validators say what is valid.
@attrs.frozen
class BudgetParams:
    """Exactly one target; the grid, the floor and the damage cap of the allocation."""

    #: Target: the summed FLOPs of the matched layers shrink by this factor.
    flop_reduction: Any = attrs.field(default=None, converter=_to_float, validator=_target)
    #: Target: the summed parameters of the matched layers shrink by this factor.
    param_reduction: Any = attrs.field(default=None, converter=_to_float, validator=_target)
    #: Target: the summed measured latency of the matched layers shrinks by this factor.
    latency_reduction: Any = attrs.field(default=None, converter=_to_float, validator=_target)
    #: Target: the summed ``cost`` of the matched layers shrinks by this factor, for any
    #: registered cost (a plugin's too; first-party: ``flops``, ``params``, ``latency``).
    reduction: Any = attrs.field(default=None, converter=_to_float, validator=_target)
    #: The registered cost ``reduction`` counts.
    cost: Any = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.instance_of(str)))
    #: Candidate ranks measured per layer, evenly spaced from the floor to the largest
    #: rank that still makes the layer cheaper.
    grid: Any = attrs.field(default=8, validator=_grid)
    #: Rank floor, as a share of each component of the layer's full rank (rounded up).
    min_fraction: Any = attrs.field(default=0.1, converter=_to_float, validator=_min_fraction)
    #: Ranks whose measured damage exceeds this are not candidates (``None``: no cap).
    max_damage: Any = attrs.field(default=None, converter=_to_float, validator=_max_damage)
    #: Whether a layer may stay as it is; ``false`` compresses every layer that can be
    #: made cheaper within the floor and the cap.
    allow_skip: Any = attrs.field(default=True, validator=_bool)
    #: What the target is measured on: ``"layers"`` (the summed cost of the layers the
    #: rule matches) or ``"model"`` (the whole model: the rest of the model's FLOPs,
    #: parameters or time counts too, so the rule's layers must do more and
    #: ``flop_reduction = 1.5`` means 1.5x fewer FLOPs for the whole model). With
    #: several budget rules, ``"model"`` treats the other rules' layers as part of the rest.
    scope: Any = attrs.field(default="layers", validator=attrs.validators.in_(("layers", "model")))
    #: Calibration batches each damage measurement runs on (``None``: the engine's
    #: default, 2). More batches: a steadier signal, proportionally slower.
    batches: Any = attrs.field(default=None, validator=_batches)

    def __attrs_post_init__(self) -> None:
        given = [name for name in (*TARGETS, "reduction") if getattr(self, name) is not None]
        if len(given) != 1:
            which = "none" if not given else " and ".join(repr(n) for n in given)
            raise ValueError(
                f"give exactly one target of 'flop_reduction', 'param_reduction', "
                f"'latency_reduction' and 'reduction' with 'cost' (a number > 1); got {which}"
            )
        if (self.reduction is None) != (self.cost is None):
            raise ValueError("'reduction' and 'cost' go together: 'cost' names the registered "
                             "cost (e.g. \"flops\") that 'reduction' divides")

    @property
    def target(self) -> tuple[str, float]:
        """The target's name and value, e.g. ``("flop_reduction", 2.0)``."""
        for name in (*TARGETS, "reduction"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        raise AssertionError("unreachable: validated in __attrs_post_init__")

    @property
    def metric(self) -> str:
        """The registered cost the target counts (``"flops"``, ``"params"``, ``"latency"``, ...)."""
        name = self.target[0]
        return self.cost if name == "reduction" else TARGETS[name]


# -- the allocation ---------------------------------------------------------------------


def _hull(points: list[tuple[float, float, int]]) -> list[int]:
    """Indices of the lower convex hull of ``(cost, damage, index)`` walking to lower cost.

    Starts at the least damaging point (the costliest of those), keeps one point per
    cost (the least damaging) and ends at the cheapest point; the damage added per
    unit of cost saved grows along the walk.
    """
    start = min(points, key=lambda p: (p[1], -p[0], p[2]))
    below = sorted((p for p in points if p[0] < start[0]), key=lambda p: (-p[0], p[1], p[2]))
    chain = [start]
    for p in below:
        if p[0] == chain[-1][0]:
            continue  # same cost, and sorted so the first one was the least damaging
        while len(chain) >= 2:
            (c1, d1, _), (c2, d2, _) = chain[-2], chain[-1]
            # drop the middle point unless the slope (damage per cost saved) grows
            if (d2 - d1) * (c2 - p[0]) >= (p[1] - d2) * (c1 - c2):
                chain.pop()
            else:
                break
        chain.append(p)
    return [p[2] for p in chain]


def allocate(options: Sequence[Sequence[tuple[float, float]]], budget: float) -> list[int]:
    """One option per layer with the least total damage whose total cost is at most ``budget``.

    ``options[i]`` lists the ``(cost, damage)`` pairs layer ``i`` may take (e.g. its
    candidate ranks and "left as it is"); damages are taken to add up across layers.
    This is a multiple-choice knapsack problem, solved twice and the better answer kept:

    1. **Greedy on the convex hulls** (the Lagrangian relaxation's path). Each layer
       starts at its least damaging option; while the total cost is over ``budget``,
       the layer whose next point on the lower convex hull of its (cost, damage)
       curve adds the least damage per unit of cost saved moves there.
    2. **Dynamic programming** over costs rounded *up* to ``budget / bins`` units
       (``bins`` grows with the number of layers, up to 20000), so its answer is
       within budget in exact costs and optimal up to that rounding.

    Each answer then gets a **fix-up**: with the slack left below ``budget``, every
    layer in turn moves to the option that lowers its damage most — or, at equal
    damage, costs more — while the total stays within budget, until no single move
    helps. The total thus ends just below ``budget`` (as close as the options allow).

    Returns the chosen index for each layer. Deterministic. Raises
    :class:`ValueError` when even the cheapest options exceed ``budget``.
    """
    if not options:
        return []
    if any(not layer for layer in options):
        raise ValueError("every layer needs at least one option")
    options = [[(float(c), float(d)) for c, d in layer] for layer in options]
    cheapest = sum(min(c for c, _ in layer) for layer in options)
    if cheapest > budget:
        raise ValueError(f"the cheapest options cost {cheapest:g} in total, over the budget "
                         f"{budget:g}")
    answers = [_fix_up(options, budget, _greedy(options, budget))]
    table = _knapsack(options, budget)
    if table is not None:
        answers.append(_fix_up(options, budget, table))

    def key(choice: list[int]) -> tuple[float, float]:
        return (sum(options[i][j][1] for i, j in enumerate(choice)),
                -sum(options[i][j][0] for i, j in enumerate(choice)))

    return min(answers, key=key)  # the greedy's on a tie


def _greedy(options: list[list[tuple[float, float]]], budget: float) -> list[int]:
    hulls = [_hull([(c, d, j) for j, (c, d) in enumerate(layer)]) for layer in options]
    position = [0] * len(options)
    choice = [hull[0] for hull in hulls]
    total = sum(options[i][j][0] for i, j in enumerate(choice))

    def step(i: int) -> tuple[float, int] | None:
        hull, k = hulls[i], position[i]
        if k + 1 >= len(hull):
            return None
        (c1, d1), (c2, d2) = options[i][hull[k]], options[i][hull[k + 1]]
        return (d2 - d1) / (c1 - c2), i

    heap = [s for s in (step(i) for i in range(len(options))) if s is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        _, i = heapq.heappop(heap)
        old = options[i][choice[i]][0]
        position[i] += 1
        choice[i] = hulls[i][position[i]]
        total += options[i][choice[i]][0] - old
        nxt = step(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    if total > budget:  # the hulls end at each layer's cheapest option: only by rounding
        choice = [min(range(len(layer)), key=lambda j, layer=layer: layer[j]) for layer in options]
    return choice


def _knapsack(options: list[list[tuple[float, float]]], budget: float) -> list[int] | None:
    """The DP answer on costs rounded up to ``budget / bins`` units; ``None`` if it finds none."""
    if budget <= 0:
        return None
    bins = min(20000, max(2000, 200 * len(options)))
    unit = budget / bins
    units = [[math.ceil(c / unit) if c > 0 else 0 for c, _ in layer] for layer in options]
    best = np.zeros(bins + 1)  # least damage of the layers so far within b units
    picks = []
    for layer, us in zip(options, units):
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1, dtype=np.int32)
        for j, ((_, d), u) in enumerate(zip(layer, us)):
            if u > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[u:] = best[:bins + 1 - u] + d
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        picks.append(pick)
    if not np.isfinite(best[bins]):
        return None
    choice, b = [], bins
    for pick, us in zip(reversed(picks), reversed(units)):
        j = int(pick[b])
        choice.append(j)
        b -= us[j]
    return choice[::-1]


def _fix_up(options: list[list[tuple[float, float]]], budget: float,
            choice: list[int]) -> list[int]:
    choice = list(choice)
    total = sum(options[i][j][0] for i, j in enumerate(choice))
    improved = True
    while improved:
        improved = False
        for i, layer in enumerate(options):
            room = budget - (total - layer[choice[i]][0])
            best = choice[i]
            for j, (c, d) in enumerate(layer):
                bc, bd = layer[best]
                if c <= room and (d < bd or (d == bd and c > bc)):
                    best = j
            if best != choice[i]:
                total += layer[best][0] - layer[choice[i]][0]
                choice[i] = best
                improved = True
    return choice


# -- the sensitivity table ----------------------------------------------------------------


@attrs.frozen
class Candidate:
    """A rank the rule measured for a layer: its cost in the target's metric and its damage."""

    rank: Rank
    cost: float
    damage: float
    #: ``False`` when ``max_damage`` excluded it.
    allowed: bool = True


@attrs.frozen
class SensitivityRow:
    """One layer: what it costs now, the rank chosen, and the damage at every measured rank."""

    layer: str
    full_rank: Rank
    #: The smallest rank allowed (``min_fraction`` of each component of the full rank).
    floor: Rank
    #: The chosen rank, or ``None`` (left as it is).
    rank: Rank | None
    cost_before: float
    cost_after: float
    #: Measured damage at the chosen rank (0 when left as it is); interpolated between
    #: the two measured ranks around it when ``interpolated``.
    damage: float
    #: The measured grid, in increasing rank (after the rule's limits).
    candidates: tuple[Candidate, ...] = ()
    #: Why the layer had no candidate rank, if it had none.
    note: str = ""
    #: Whether the chosen rank lies between two measured ranks (see :class:`Budget`).
    interpolated: bool = False


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _rank_text(rank: Rank | None) -> str:
    if rank is None:
        return "-"
    return str(rank) if isinstance(rank, int) else "x".join(str(r) for r in rank)


@attrs.frozen
class SensitivityTable:
    """What the ``budget`` rule measured and chose in one round: one row per layer.

    ``print(table)`` shows, per layer, the full rank, the floor, the chosen rank,
    the cost before and after, the damage at the chosen rank and the damage at
    every measured rank (``*`` marks a rank over ``max_damage``; ``~`` a damage
    interpolated between two measured ranks). Damage is the model's output damage
    when only that layer is factorized at that rank.
    """

    #: The target's name (``"flop_reduction"`` ...) and value.
    target: str
    value: float
    #: ``"flops"``, ``"params"`` or ``"latency"``.
    metric: str
    rows: tuple[SensitivityRow, ...]

    @property
    def cost_before(self) -> float:
        return sum(row.cost_before for row in self.rows)

    @property
    def cost_after(self) -> float:
        return sum(row.cost_after for row in self.rows)

    @property
    def budget(self) -> float:
        """The largest total cost the target allows: ``cost_before / value``."""
        return self.cost_before / self.value

    @property
    def reduction(self) -> float:
        """The reduction reached: ``cost_before / cost_after`` (inf for a zero cost after)."""
        after = self.cost_after
        return self.cost_before / after if after > 0 else math.inf

    @property
    def damage(self) -> float:
        """The summed damage of the chosen ranks (each measured alone)."""
        return sum(row.damage for row in self.rows)

    def ranks(self) -> dict[str, Rank | None]:
        """The chosen rank of every layer, by name (``None``: left as it is)."""
        return {row.layer: row.rank for row in self.rows}

    def row(self, layer: str) -> SensitivityRow:
        for row in self.rows:
            if row.layer == layer:
                return row
        raise KeyError(f"layer {layer!r} is not in the table; layers: "
                       f"{', '.join(r.layer for r in self.rows) or 'none'}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers) for JSON or a state file."""
        return _plain(attrs.asdict(self))

    def __str__(self) -> str:
        head = (f"budget: {self.target} {self.value:g}x over {len(self.rows)} layers: "
                f"{self.metric} {_fmt(self.cost_before)} -> {_fmt(self.cost_after)} "
                f"({self.reduction:.3g}x), summed damage {self.damage:.3g}")
        header = ["layer", "full", "floor", "rank", f"{self.metric} before",
                  f"{self.metric} after", "damage", "damage by rank"]
        lines = []
        for row in self.rows:
            grid = " ".join(
                f"{_rank_text(c.rank)}:{c.damage:.2g}{'' if c.allowed else '*'}"
                for c in row.candidates
            ) or row.note
            lines.append([row.layer, _rank_text(row.full_rank), _rank_text(row.floor),
                          _rank_text(row.rank), _fmt(row.cost_before), _fmt(row.cost_after),
                          f"{'~' if row.interpolated else ''}{row.damage:.3g}", grid])
        widths = [max(len(r[k]) for r in [header, *lines]) for k in range(len(header) - 1)]
        out = [head]
        for r in [header, *lines]:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(line.rstrip() for line in out)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- the rule ---------------------------------------------------------------------------


def _grid_ranks(full: tuple[int, ...], floor: tuple[int, ...], top: tuple[int, ...],
                n: int) -> list[tuple[int, ...]]:
    """``n`` ranks evenly spaced from ``floor`` to ``top`` in every component (deduplicated)."""
    ranks: list[tuple[int, ...]] = []
    for k in range(n):
        t = k / (n - 1)
        rank = tuple(
            min(f, max(lo, int(round(lo + (max(lo, hi) - lo) * t))))
            for f, lo, hi in zip(full, floor, top)
        )
        if rank not in ranks:
            ranks.append(rank)
    return ranks


def _steps(lo: tuple[int, ...], hi: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """Up to ``n`` ranks strictly between ``lo`` and ``hi``, every component in proportion."""
    span = max(h - l for l, h in zip(lo, hi))
    count = min(n, span - 1)
    out: list[tuple[int, ...]] = []
    for k in range(1, count + 1):
        t = k / (count + 1)
        rank = tuple(l + int(round((h - l) * t)) for l, h in zip(lo, hi))
        if rank not in out and rank != lo and rank != hi:
            out.append(rank)
    return out


def _path_rank(full: tuple[int, ...], step: int) -> tuple[int, ...]:
    """The rank at ``step`` on the path that shrinks every component in proportion."""
    top = max(full)
    return tuple(max(1, (f * (step + 1)) // top) for f in full)


def _break_even(full: tuple[int, ...], cheaper) -> tuple[int, ...] | None:
    """The largest rank on the proportional path for which ``cheaper(rank)`` holds."""
    if not cheaper(_path_rank(full, 0)):
        return None
    lo, hi = 0, max(full) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cheaper(_path_rank(full, mid)):
            lo = mid
        else:
            hi = mid - 1
    return _path_rank(full, lo)


def _as_rank(values: tuple[int, ...], like: Rank) -> Rank:
    return values[0] if isinstance(like, int) else tuple(values)


@attrs.frozen
class _Grid:
    """A layer's measured grid before damage: the floor, the current costs, cheaper ranks."""

    layer: Any
    full_rank: Rank
    floor: tuple[int, ...]
    before: float
    params_before: float
    #: Candidate ranks (after limits, above the floor, cheaper than now) and their cost.
    costs: dict
    note: str = ""


#: Key in the run's ``resources`` marking that the run was warned about measuring
#: damage without calibration data (once per run, however many rounds and rules).
_WARNED = "musco_std.budget: warned without calibration data"


def _warn_without_calibration(context) -> None:
    """Warn once per run when damage is measured on ``example_inputs``, not calibration data."""
    if getattr(context, "has_calibration", True):
        return
    resources = getattr(getattr(context, "run", None), "resources", None)
    if resources is not None:
        if resources.get(_WARNED):
            return
        resources[_WARNED] = True
    warnings.warn(
        "rank rule 'budget' measures each layer's damage without calibration data, on "
        "example_inputs: a handful of inputs ranks layers far less reliably than data like "
        "the deployment data; pass Compressor(..., calibration=batches)",
        MuscoWarning, stacklevel=2)


class Budget(RankSelector):
    """Ranks for all matched layers together, under one model-level reduction target.

    For each layer: a grid of ``grid`` ranks from the floor (``min_fraction`` of
    each component of the full rank) to the largest rank that still makes the
    layer cheaper, each passed through the rule's limits (``round_to``,
    ``min_rank``, ``max_rank``); ranks that fall below the floor or do not make
    the layer cheaper in the target's metric and in parameters are dropped. The
    measured damage to the model's output at each rank (``context.damage``)
    and the cost (``context.cost``) feed :func:`allocate`, which picks one rank
    per layer — or leaves it as it is, unless ``allow_skip`` is false — so that
    the layers' total cost is at most ``1/target`` of their total now, with the
    least summed damage. Measuring costs ``layers x grid`` model evaluations on
    the calibration batches (or the example inputs: far less reliable, so a run
    without calibration data gets one :class:`~musco_core.MuscoWarning` saying so).
    """

    name = "budget"
    summary = "ranks across layers under one model-level FLOP, param or latency target"
    Params = BudgetParams
    rounding = "up"  # round_to must not take a candidate below the floor
    joint = True

    def select(self, layer, decomposition, params):
        raise ValueError(
            f"layer {layer.name!r}: rank rule 'budget' chooses the ranks of all its layers "
            f"together and needs the engine's joint selection (select_joint); it cannot rank "
            f"one layer on its own"
        )

    def select_joint(self, layers, decomposition, params: BudgetParams, context):
        """Ranks by layer name: the least summed damage within ``1/target`` of the total cost.

        Records a :class:`SensitivityTable` with ``context.record("budget", table)``
        when the context has ``record``. Raises :class:`ValueError` naming the largest
        reachable reduction when the target is out of reach.
        """
        target, value = params.target
        metric = params.metric
        grids = [self._grid(layer, decomposition, params, metric, context) for layer in layers]
        before = sum(g.before for g in grids)
        # scope = "model": the target is the whole model's, the rest of the model counts too.
        rest = float(context.rest_cost(metric, layers)) if params.scope == "model" else 0.0
        budget = ((before + rest) / value - rest) * (1 + 1e-12)
        if before <= 0:  # nothing to reduce (e.g. no FLOPs recorded): nothing changes
            rows = [self._row(g, (), "nothing to reduce: the layers cost 0") for g in grids]
            return self._finish(target, value, metric, rows, context)
        # fail before measuring anything if even the smallest ranks are over budget
        self._check_reach(grids, params, budget, target, value, rest, [
            min([*g.costs.values()] + ([g.before] if params.allow_skip or not g.costs else []))
            for g in grids])
        if any(g.costs for g in grids):
            _warn_without_calibration(context)
        loop = context.progress(grids, desc=f"budget: damage of {len(grids)} layers")
        rows, options, choices = [], [], []
        for g in loop:
            candidates = self._damage(g, params, context)
            allowed = [c for c in candidates if c.allowed]
            note = g.note
            if candidates and not allowed:
                note = f"every measured rank is over max_damage={params.max_damage:g}"
            opts = [(c.cost, c.damage) for c in allowed]
            ranks: list[Rank | None] = [c.rank for c in allowed]
            if params.allow_skip or not opts:
                opts.append((g.before, 0.0))
                ranks.append(None)
            rows.append(self._row(g, candidates, note))
            options.append(opts)
            choices.append(ranks)
        self._check_reach(grids, params, budget, target, value, rest,
                          [min(c for c, _ in opts) for opts in options])
        picked = allocate(options, budget)
        rows = [
            attrs.evolve(row, rank=ranks[j], cost_after=opts[j][0], damage=opts[j][1])
            for row, opts, ranks, j in zip(rows, options, choices, picked)
        ]
        rows = self._refine(grids, rows, params, metric, context, budget)
        return self._finish(target, value, metric, rows, context)

    @staticmethod
    def _refine(grids, rows, params: BudgetParams, metric: str, context, budget: float):
        """Spend the slack the grid leaves: ranks between a chosen rank and the next measured one.

        Their damage is interpolated linearly in cost between the two measured ranks
        (an overestimate where damage is convex in cost); their cost is asked from the
        context. While some layer can move up within the slack, the move that removes
        the most damage is made.
        """
        between: list[list[tuple[Rank, float, float]]] = []
        for g, row in zip(grids, rows):
            allowed = [c for c in row.candidates if c.allowed]
            ranks = [c.rank for c in allowed]
            if row.rank is None or row.rank not in ranks or ranks.index(row.rank) + 1 >= len(ranks):
                between.append([])
                continue
            lo, hi = allowed[ranks.index(row.rank)], allowed[ranks.index(row.rank) + 1]
            found: list[tuple[Rank, float, float]] = []
            for raw in _steps(rank_tuple(lo.rank), rank_tuple(hi.rank), params.grid):
                rank = context.limit(g.layer, _as_rank(raw, g.full_rank))
                if (rank in ranks or any(other == rank for other, _, _ in found)
                        or any(r < f for r, f in zip(rank_tuple(rank), g.floor))):
                    continue
                cost = float(context.cost(g.layer, rank, metric))
                if not lo.cost < cost < hi.cost or (
                        metric != "params"
                        and float(context.cost(g.layer, rank, "params")) >= g.params_before):
                    continue
                share = (cost - lo.cost) / (hi.cost - lo.cost)
                damage = lo.damage + (hi.damage - lo.damage) * share
                found.append((rank, cost, damage))
            between.append(found)
        rows = list(rows)
        total = sum(row.cost_after for row in rows)
        while True:
            best = None
            for i, (row, found) in enumerate(zip(rows, between)):
                for rank, cost, damage in found:
                    gain = row.damage - damage
                    if gain > 0 and total - row.cost_after + cost <= budget and (
                            best is None or gain > best[0]):
                        best = (gain, i, rank, cost, damage)
            if best is None:
                return rows
            _, i, rank, cost, damage = best
            total += cost - rows[i].cost_after
            rows[i] = attrs.evolve(rows[i], rank=rank, cost_after=cost, damage=damage,
                                   interpolated=True)

    def _finish(self, target, value, metric, rows, context) -> dict[str, Rank | None]:
        table = SensitivityTable(target, value, metric, tuple(rows))
        context.record(self.name, table)
        return table.ranks()

    @staticmethod
    def _row(g: _Grid, candidates, note: str) -> SensitivityRow:
        return SensitivityRow(g.layer.name, g.full_rank, _as_rank(g.floor, g.full_rank), None,
                              g.before, g.before, 0.0, tuple(candidates), note)

    @staticmethod
    def _check_reach(grids, params, budget, target, value, rest: float,
                     cheapest: list[float]) -> None:
        total = sum(cheapest)
        if total <= budget:
            return
        before = sum(g.before for g in grids)
        reach = (before + rest) / (total + rest) if total + rest > 0 else math.inf
        cap = f", max_damage={params.max_damage:g}" if params.max_damage is not None else ""
        skip = "" if params.allow_skip else ", allow_skip=false"
        raise ValueError(
            f"rank rule 'budget': {target}={value:g} cannot be reached on the {len(grids)} "
            f"layers it matches; the smallest ranks allowed (floor min_fraction="
            f"{params.min_fraction:g}{cap}{skip} and the rule's limits) reach at most "
            f"{reach:.3g}x; ask for at most {reach:.3g} or lower min_fraction"
            f"{' or raise max_damage' if cap else ''}"
        )

    @staticmethod
    def _grid(layer, decomposition, params: BudgetParams, metric: str, context) -> _Grid:
        full_rank = decomposition.full_rank(layer.module)
        full = rank_tuple(full_rank)
        floor = tuple(max(1, math.ceil(params.min_fraction * f - 1e-9)) for f in full)
        before = float(context.cost(layer, None, metric))
        params_before = before if metric == "params" else float(context.cost(layer, None, "params"))
        # the grid's top: the largest rank (all components shrunk in proportion) cheaper
        # than the layer now, in FLOPs (parameters for a parameter target) and in parameters
        search = "params" if metric == "params" else "flops"
        search_before = before if search == metric else float(context.cost(layer, None, search))

        def cheaper(rank: tuple[int, ...]) -> bool:
            r = _as_rank(rank, full_rank)
            return (float(context.cost(layer, r, search)) < search_before
                    and float(context.cost(layer, r, "params")) < params_before)

        top = _break_even(full, cheaper) if search_before > 0 and before > 0 else None
        if top is None:
            return _Grid(layer, full_rank, floor, before, params_before, {},
                         "no rank makes it cheaper")
        limited: list[Rank] = []
        for raw in _grid_ranks(full, floor, top, params.grid):
            rank = context.limit(layer, _as_rank(raw, full_rank))
            if all(r >= lo for r, lo in zip(rank_tuple(rank), floor)) and rank not in limited:
                limited.append(rank)
        costs = {}
        for rank in sorted(limited, key=rank_tuple):
            cost = float(context.cost(layer, rank, metric))
            p = cost if metric == "params" else float(context.cost(layer, rank, "params"))
            if cost < before and p < params_before:
                costs[rank] = cost
        note = "" if costs else "no rank above the floor and within the limits makes it cheaper"
        return _Grid(layer, full_rank, floor, before, params_before, costs, note)

    @staticmethod
    def _damage(g: _Grid, params: BudgetParams, context) -> list[Candidate]:
        ranks = list(g.costs)
        if not ranks:
            return []
        measured = (context.damage(g.layer, ranks) if params.batches is None
                    else context.damage(g.layer, ranks, batches=params.batches))
        damages = [float(d) for d in measured]
        if len(damages) != len(ranks):
            raise ValueError(f"layer {g.layer.name!r}: context.damage gave {len(damages)} "
                             f"values for {len(ranks)} ranks")
        for rank, d in zip(ranks, damages):
            if not math.isfinite(d):
                raise ValueError(f"layer {g.layer.name!r}: the measured damage at rank "
                                 f"{rank!r} is {d}; check the calibration data and the model")
        return [Candidate(rank, g.costs[rank], d,
                          allowed=params.max_damage is None or d <= params.max_damage)
                for rank, d in zip(ranks, damages)]


BUDGET = Budget()
