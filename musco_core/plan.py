"""Resolving a spec against the registry and a model: which layer gets what, in which step."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from musco_core.errors import SpecError, UnsupportedLayerError
from musco_core.resolve import Bound, ResolvedRule, resolve_rules  # noqa: F401 (re-exported)
from musco_core.spec import Spec
from musco_core.stats import LayerStats, param_count
from musco_core.strategies import Decomposition, Layer, Rank, RankSelector, rank_tuple


@attrs.frozen
class PlanEntry:
    """One layer of the model and what the plan does with it.

    ``status`` is ``"compress"``, ``"excluded"`` (by ``Spec.exclude``),
    ``"unmatched"`` (no rule matched it) or ``"skipped"`` (a rule matched it but it
    cannot be compressed safely: the decomposition does not support it, its weights
    are shared with another layer, or it never ran; ``reason`` says which).
    """

    name: str
    type: str
    status: str
    rule: int | None = None
    decomposition: str | None = None
    rank_rule: str | None = None
    reason: str = ""


@attrs.frozen
class Plan:
    """The fate of every layer in one round, and the steps of all rounds as (round, layer) pairs.

    ``entries`` describe round ``round``. Steps of later rounds are projected:
    the layers each rule compressed, for the rules that apply to that round. When
    a later round starts, the engine plans it again on the model as it is then,
    so rules that match factorized layers (the ``factorized`` matcher) take effect.
    """

    entries: tuple[PlanEntry, ...]
    steps: tuple[tuple[tuple[int, str], ...], ...]
    round: int = 1
    #: Things worth a look that do not stop the run: ranks far below full rank, and
    #: layers a rule of a later round matches but cannot compress (under
    #: ``unsupported = "skip"``; projected ones start ``round N (projected):``). The
    #: engine warns each as a :class:`~musco_core.errors.MuscoWarning` when it plans the round.
    warnings: tuple[str, ...] = ()
    #: Layers of later rounds, projected: ``(round, layer, rule index)``.
    later: tuple[tuple[int, str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [attrs.asdict(e) for e in self.entries],
                "steps": [[[rnd, name] for rnd, name in step] for step in self.steps],
                "round": self.round, "warnings": list(self.warnings),
                "later": [list(x) for x in self.later]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(entries=tuple(PlanEntry(**e) for e in data["entries"]),
                   steps=tuple(tuple((int(r), str(n)) for r, n in step) for step in data["steps"]),
                   round=int(data.get("round", 1)),
                   warnings=tuple(data.get("warnings", ())),
                   later=tuple((int(r), str(n), int(i)) for r, n, i in data.get("later", ())))

    def entry(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the layers this round compresses, in order."""
        return tuple(e.name for e in self.entries if e.status == "compress")

    def __str__(self) -> str:
        from musco_core.report_text import plan_text

        return plan_text(self)


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a rule can match, by dotted name, in model order.

    These are the modules that own parameters, and factorized modules as a whole
    (modules whose class sets ``musco_decomposition``; their parts are not
    candidates of their own).
    """
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if getattr(module, "musco_decomposition", None):
            out[name] = module
            inside.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            out[name] = module
    return out


def _excluded_by(name: str, patterns: tuple[str, ...]) -> str | None:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return pattern
    return None


def build_plan(
    model: nn.Module,
    spec: Spec,
    rules: tuple[ResolvedRule, ...],
    stats: Mapping[str, LayerStats],
    rnd: int = 1,
    compressed_by: Mapping[str, int] | None = None,
    *,
    layers: Mapping[str, nn.Module] | None = None,
    project: bool = True,
) -> Plan:
    """Plan round ``rnd`` on ``model`` as it is; check each chosen layer; raise :class:`SpecError`.

    A layer goes to the first rule that applies to round ``rnd`` and matches it,
    or that compressed it in an earlier round (``compressed_by``: layer name ->
    rule index), so a rule keeps its layers from round to round.

    Checks, before any layer is touched: exclude patterns that match nothing,
    decompositions asked to handle a layer they do not support, rank-rule
    parameters that name layers the rule does not match, and the rank each rule
    would choose now (valid for the layer's shape). Later rounds are checked too,
    on a projection of the model (each planned layer replaced by its
    decomposition's ``skeleton`` on the ``meta`` device), so a rule limited to
    round 2 fails now, not after round 1's fine-tuning; their steps are counted.
    A later round's rule that matches a layer it cannot compress is a line in
    ``warnings`` (a :class:`SpecError` under ``unsupported = "error"``), so a round
    that will do less than asked says so before round 1 starts.
    """
    compressed_by = compressed_by or {}
    problems: list[str] = []
    projected = layers is not None
    layers = dict(layers) if layers is not None else candidate_layers(model)
    all_names = [n for n, _ in model.named_modules() if n]
    for i, pattern in enumerate(spec.exclude):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            problems.append(f"exclude pattern {pattern!r} matches no layer of the model @ $.exclude[{i}]")
    active = [r for r in rules if r.applies_to(rnd)]
    shared = shared_parameters(model)
    warnings: list[str] = []

    entries: list[PlanEntry] = []
    by_rule: dict[int, list[Layer]] = {r.index: [] for r in rules}
    for name, module in layers.items():
        kind = type(module).__name__
        pattern = _excluded_by(name, spec.exclude)
        if pattern is not None:
            entries.append(PlanEntry(name, kind, "excluded", reason=f"matches {pattern!r}"))
            continue
        rule = next((r for r in active
                     if compressed_by.get(name) == r.index or r.matches(name, module)), None)
        if rule is None:
            entries.append(PlanEntry(name, kind, "unmatched", reason="no rule matches"))
            continue
        decomposition = rule.decomposition.strategy
        assert isinstance(decomposition, Decomposition)
        reason, path = _cannot_compress(model, name, module, rule, stats, shared)
        if reason is not None:
            if rule.unsupported == "error":
                problems.append(f"{reason} @ $.rules[{rule.index}].{path}")
            else:
                entries.append(PlanEntry(name, kind, "skipped", rule=rule.index,
                                         decomposition=rule.decomposition.name,
                                         rank_rule=rule.rank.name, reason=reason))
                if _news_in_later_round(rule, name, rnd, compressed_by):
                    warnings.append(later_skip_warning(f"round {rnd}", rule.index, name,
                                                       reason))
            continue
        entries.append(PlanEntry(name, kind, "compress", rule=rule.index,
                                 decomposition=rule.decomposition.name, rank_rule=rule.rank.name))
        by_rule[rule.index].append(Layer(name, module, stats[name], rnd))

    for rule in active:
        selector = rule.rank.strategy
        assert isinstance(selector, RankSelector)
        path = f"$.rules[{rule.index}].rank"
        problems.extend(f"{p} @ {path}" for p in selector.problems(rule.rank.params, by_rule[rule.index]))
        if selector.joint:
            continue  # ranks are chosen for all layers together when the round starts
        for layer in by_rule[rule.index]:
            message = check_rank(rule, layer, None if projected else warnings,
                                 lenient=projected)
            if message:
                problems.append(f"{message} @ {path}")

    if problems:
        raise SpecError(problems)

    order = [e.name for e in entries if e.status == "compress"]
    steps: list[tuple[tuple[int, str], ...]] = [
        tuple((rnd, n) for n in order[k : k + spec.layers_per_step])
        for k in range(0, len(order), spec.layers_per_step)]
    later: list[tuple[int, str, int]] = []
    if project and rnd < spec.rounds:
        steps += _later_rounds(model, spec, rules, stats, rnd, compressed_by, layers, entries,
                               by_rule, later, warnings)
    return Plan(entries=tuple(entries), steps=tuple(steps), round=rnd, warnings=tuple(warnings),
                later=tuple(later))


def _later_rounds(model, spec, rules, stats, rnd, compressed_by, layers, entries,
                  by_rule, projected: list, warnings: list[str]
                  ) -> list[tuple[tuple[int, str], ...]]:
    """Plan rounds ``rnd + 1 ..`` on a projection of the model; their steps, or SpecError.

    Adds to ``warnings`` the layers a later round's rule matches but cannot compress
    (see :func:`later_skip_warning`).
    """
    import copy

    steps: list[tuple[tuple[int, str], ...]] = []
    layers, stats, owner = dict(layers), dict(stats), dict(compressed_by)
    current = {layer.name: layer for group in by_rule.values() for layer in group}
    planned = [e for e in entries if e.status == "compress"]
    for later in range(rnd + 1, spec.rounds + 1):
        for e in planned:
            rule = next(r for r in rules if r.index == e.rule)
            layer = current[e.name]
            decomposition = rule.decomposition.strategy
            rank = _projected_rank(rule, layer)
            skeleton = decomposition.skeleton(copy.deepcopy(layer.module).to("meta"), rank,
                                              rule.decomposition.params)
            layers[e.name] = skeleton
            old = stats[e.name]
            stats[e.name] = LayerStats(old.input_shape, old.output_shape, param_count(skeleton),
                                       decomposition.flop_count(layer.module, rank, old),
                                       old.calls)
            owner[e.name] = e.rule
        try:
            plan = build_plan(model, spec, rules, stats, later, owner, layers=layers,
                              project=False)
        except SpecError as exc:
            raise SpecError([f"round {later} (projected on the factorized model): {p}"
                             for p in exc.problems]) from None
        steps += [step for step in plan.steps if step and step[0][0] == later]
        # A rule of this round that matches a layer it cannot compress: say so now, not
        # only when the round starts.
        rules_by_index = {r.index: r for r in rules}
        warnings += [later_skip_warning(f"round {later} (projected)", int(e.rule), e.name,
                                        e.reason)
                     for e in plan.entries if e.status == "skipped"
                     and _news_in_later_round(rules_by_index[int(e.rule)], e.name, later, owner)]
        planned = [e for e in plan.entries if e.status == "compress"]
        projected += [(later, e.name, int(e.rule)) for e in planned]
        current = {e.name: Layer(e.name, layers[e.name], stats[e.name], later) for e in planned}
    return steps


def _news_in_later_round(rule: ResolvedRule, name: str, rnd: int,
                         compressed_by: Mapping[str, int]) -> bool:
    """Whether skipping ``name`` in round ``rnd`` is news: round 1's plan could not show it.

    That is a layer of a later round that an earlier round compressed, or one that a
    rule limited to later rounds matches. A layer that a rule of every round skips for
    the same reason in round 1 (a depthwise conv) is listed in round 1's plan already.
    """
    return rnd > 1 and (name in compressed_by or not rule.applies_to(1))


def later_skip_warning(when: str, rule: int, name: str, reason: str) -> str:
    """The plan warning for a layer that rule ``rule`` matches in a later round but cannot
    compress (``when``: ``"round 2"`` or ``"round 2 (projected)"``)."""
    return (f"{when}: rule {rule} matches layer {name!r} but cannot compress it, so that "
            f"round leaves it as it is: {reason}")


def _projected_rank(rule: ResolvedRule, layer: Layer) -> Rank:
    """The rank the rule gives ``layer`` now, or its full rank when that needs the real run."""
    decomposition = rule.decomposition.strategy
    if not rule.rank.strategy.joint:
        try:
            rank = select_rank(rule, layer)
            if rank is not None and decomposition.validate_rank(layer.module, rank) is None:
                return rank
        except Exception:  # a data-driven rule on a projected (meta) layer: no weights to read
            pass
    return decomposition.full_rank(layer.module)


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [dotted names of every module owning it]}`` for parameters owned twice."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name)
    return {k: v for k, v in owners.items() if len(set(v)) > 1}


def _cannot_compress(model: nn.Module, name: str, module: nn.Module, rule: ResolvedRule,
                     stats: Mapping[str, LayerStats], shared: Mapping[int, list[str]]
                     ) -> tuple[str | None, str]:
    """Why the matched layer ``name`` cannot be compressed (and the spec path), or ``None``."""
    try:
        rule.decomposition.strategy.check(name, module)
    except UnsupportedLayerError as exc:
        return str(exc), "decomposition"
    if name not in stats:
        return (f"layer {name!r} (matched by rule {rule.index}) did not run in the forward pass "
                f"of example_inputs, so its shapes and FLOPs are unknown; exclude it or pass "
                f"inputs that reach it", "match")
    inside = {n for n, m in model.named_modules(remove_duplicate=False) if m is module}
    for param in module.parameters():
        others = sorted({o for o in shared.get(id(param), ())
                         if not any(o == i or o.startswith(i + ".") for i in inside)})
        if others:
            return (f"layer {name!r} shares a weight with {others[0]!r} (tied weights); "
                    "factorizing it would untie them and grow the model", "match")
    return None, ""


#: A rank component below this share of the full rank earns a warning in the plan.
LOW_RANK_SHARE = 0.2


def low_rank_warning(name: str, rank: Rank, full: Rank) -> str | None:
    """A warning if a component of ``rank`` keeps less than :data:`LOW_RANK_SHARE` of ``full``."""
    ranks, fulls = rank_tuple(rank), rank_tuple(full)
    low = [(r, f) for r, f in zip(ranks, fulls) if f >= 4 and r < LOW_RANK_SHARE * f]
    if not low:
        return None
    r, f = low[0]
    return (f"layer {name!r}: rank {rank!r} keeps {r} of {f} ({r / f:.0%}); expect a large "
            "error there, or give it a higher rank (min_rank) or exclude it")


def select_rank(rule: ResolvedRule, layer: Layer) -> Rank | None:
    """The rank ``rule`` gives ``layer``: its rank rule's choice after the rank limits."""
    decomposition = rule.decomposition.strategy
    selector = rule.rank.strategy
    assert isinstance(selector, RankSelector) and isinstance(decomposition, Decomposition)
    rank = selector.select(layer, decomposition, rule.rank.params)
    if rank is None:
        return None
    return rule.rank.limits.apply(rank, decomposition.full_rank(layer.module), selector.rounding)


#: A layer report's reason when its rank rule chose no rank and did not say why.
UNCOMPRESSED = "rank rule left it uncompressed"


def skip_reason(rule: ResolvedRule, layer: Layer) -> str:
    """Why ``rule`` leaves ``layer`` as it is, once its rank rule's ``select`` returned ``None``.

    The rank rule's :meth:`~musco_core.RankSelector.skip_reason` (a rate out of reach
    names the largest reachable one), else :data:`UNCOMPRESSED`. Joint rules are not
    asked (their ranks are chosen for all layers together).
    """
    selector = rule.rank.strategy
    assert isinstance(selector, RankSelector)
    if selector.joint:
        return UNCOMPRESSED
    reason = selector.skip_reason(layer, rule.decomposition.strategy, rule.rank.params)
    return str(reason) if reason else UNCOMPRESSED


def check_rank(rule: ResolvedRule, layer: Layer, warnings: list[str] | None = None, *,
               lenient: bool = False) -> str | None:
    """Ask the rule for ``layer``'s rank now; a message if that fails or gives an invalid rank.

    A valid rank far below the full rank adds a line to ``warnings``. ``lenient``
    (for projected layers, which have shapes but no weights) ignores failures other
    than the rule's own ``ValueError`` / ``TypeError`` / ``KeyError``.
    """
    try:
        rank = select_rank(rule, layer)
    except (NotImplementedError, RuntimeError):
        if lenient:
            return None
        raise
    except (ValueError, TypeError, KeyError) as exc:
        text = str(exc.args[0]) if exc.args else repr(exc)
        return text if text.startswith(f"layer {layer.name!r}") else f"layer {layer.name!r}: {text}"
    if rank is None:
        return None
    decomposition = rule.decomposition.strategy
    message = decomposition.validate_rank(layer.module, rank)
    if message:
        return f"layer {layer.name!r}: {message} for decomposition {rule.decomposition.name!r}"
    if warnings is not None:
        warning = low_rank_warning(layer.name, rank, decomposition.full_rank(layer.module))
        if warning:
            warnings.append(warning)
    return None
