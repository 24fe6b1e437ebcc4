"""Resolving a spec against the registry: every strategy looked up, its parameters structured.

Nothing here looks at a model: that is :mod:`musco_core.plan`. Every problem is
reported with its path in the spec, all at once, in one :class:`SpecError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from musco_core.errors import SpecError
from musco_core.limits import LIMIT_KEYS, RankLimits
from musco_core.refs import Match, StrategyRef, format_params_error, structure_params
from musco_core.registry import KINDS, Registry, default_registry, did_you_mean
from musco_core.strategies import Matcher, Strategy

if TYPE_CHECKING:
    from torch import nn

    from musco_core.spec import Spec


@attrs.frozen
class Bound:
    """A strategy from the registry with its parameters structured into its ``Params``."""

    name: str
    strategy: Strategy
    params: Any
    #: For rank rules: ``round_to`` / ``min_rank`` / ``max_rank`` from the spec.
    limits: RankLimits = RankLimits()


@attrs.frozen
class ResolvedRule:
    index: int
    matchers: tuple[Bound | Callable[[str, nn.Module], bool], ...]
    decomposition: Bound
    rank: Bound
    #: Rounds the rule applies to; empty means every round.
    rounds: tuple[int, ...] = ()
    #: ``Rule.unsupported``: ``"skip"`` or ``"error"``.
    unsupported: str = "skip"
    #: ``Rule.gates``, bound, in the rule's order.
    gates: tuple[Bound, ...] = ()

    def applies_to(self, rnd: int) -> bool:
        return not self.rounds or rnd in self.rounds

    def matches(self, name: str, module: nn.Module) -> bool:
        for m in self.matchers:
            if isinstance(m, Bound):
                assert isinstance(m.strategy, Matcher)
                if m.strategy.matches(name, module, m.params):
                    return True
            elif m(name, module):
                return True
        return False


def _bind(registry: Registry, kind: str, ref: StrategyRef, path: str,
          problems: list[str]) -> Bound | None:
    try:
        entry = registry.get(kind, ref.name)
    except KeyError as exc:
        problems.append(f"{exc.args[0]} @ {path}")
        return None
    own = dict(ref.params)
    limits = RankLimits()
    failed = False
    if kind == "rank_rules":
        common = {k: own.pop(k) for k in LIMIT_KEYS if k in own}
        try:
            limits = structure_params(common, RankLimits)
        except Exception as exc:
            problems.extend(format_params_error(exc, path))
            failed = True
    try:
        params = structure_params(own, entry.strategy.Params)
    except Exception as exc:  # cattrs and attrs validators raise several types
        problems.extend(format_params_error(exc, path))
        return None
    if failed:
        return None
    return Bound(name=entry.name, strategy=entry.strategy, params=params, limits=limits)


def _check_needs(registry: Registry, kind: str, bound: Bound | None, path: str,
                 problems: list[str]) -> None:
    """An unknown statistic in what ``bound`` needs is a problem at ``path``."""
    if bound is None:
        return
    known = registry.entries["statistics"]
    for name in sorted(bound.strategy.needs(bound.params)):
        if name not in known:
            problems.append(f"unknown statistic {name!r} needed by {KINDS[kind][2]} "
                            f"{bound.name!r}; {did_you_mean(name, known)} @ {path}")


def resolve_rules(spec: Spec, registry: Registry | None = None) -> tuple[ResolvedRule, ...]:
    """Look up every strategy of ``spec``'s rules and structure its parameters.

    Also checks what each rule's gates say of its rank rule
    (:meth:`GateStrategy.problems`) and that every statistic its strategies need
    is registered. Raises :class:`SpecError` listing every problem with its path.
    """
    registry = registry or default_registry()
    problems: list[str] = []
    resolved = []
    for i, rule in enumerate(spec.rules):
        base = f"$.rules[{i}]"
        matchers: list[Any] = []
        for j, m in enumerate(rule.match):
            if isinstance(m, Match):
                matchers.append(_bind(registry, "matchers", m, f"{base}.match[{j}]", problems))
            else:
                matchers.append(m)
        decomposition = _bind(registry, "decompositions", rule.decomposition,
                              f"{base}.decomposition", problems)
        rank = _bind(registry, "rank_rules", rule.rank, f"{base}.rank", problems)
        _check_needs(registry, "decompositions", decomposition, f"{base}.decomposition", problems)
        _check_needs(registry, "rank_rules", rank, f"{base}.rank", problems)
        gates = []
        for j, ref in enumerate(rule.gates):
            path = f"{base}.gates[{j}]"
            gate = _bind(registry, "gates", ref, path, problems)
            _check_needs(registry, "gates", gate, path, problems)
            if gate is not None and rank is not None:
                problems.extend(f"{p} @ {path}" for p in
                                gate.strategy.problems(gate.params, rank.strategy, rank.limits))
            gates.append(gate)
        for r in rule.rounds:
            if r > spec.rounds:
                problems.append(
                    f"round {r} is after the last round (rounds = {spec.rounds}) @ {base}.rounds"
                )
        if decomposition and rank and all(m is not None for m in [*matchers, *gates]):
            resolved.append(ResolvedRule(i, tuple(matchers), decomposition, rank, rule.rounds,
                                         rule.unsupported, tuple(gates)))
    if problems:
        raise SpecError(problems)
    return tuple(resolved)


def resolve_refine(spec: Spec, registry: Registry | None = None) -> Bound | None:
    """``spec.refine`` bound through the registry's refiners; ``None`` when refinement is off.

    Off means no ``refine`` in the spec, or a refiner whose ``enabled(params)`` is
    false (e.g. ``steps = 0``). Raises :class:`SpecError` with the path ``$.refine``.
    """
    if spec.refine is None:
        return None
    registry = registry or default_registry()
    problems: list[str] = []
    refiner = _bind(registry, "refiners", spec.refine, "$.refine", problems)
    _check_needs(registry, "refiners", refiner, "$.refine", problems)
    if problems:
        raise SpecError(problems)
    assert refiner is not None
    return refiner if refiner.strategy.enabled(refiner.params) else None
