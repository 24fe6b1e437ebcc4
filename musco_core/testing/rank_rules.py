"""Test kit for rank rules: conformance checks, and rank rules side by side on a model.

::

    from musco_core.testing.rank_rules import check_rank_rule

    def test_my_rule_conforms():
        check_rank_rule(MyRule(), params={"rate": 3.0})

:func:`check_rank_rule` runs the rule on a few small layers (a Linear, a 1x1
conv, a 3x3 conv, with planted low-rank-plus-noise weights) for every
decomposition that accepts them, and raises ``AssertionError`` with a message
naming the rule, the decomposition and the layer on the first violation.
:func:`compare_rank_rules` shows the ranks several rules choose for the same
model, without compressing it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from musco_core.errors import UnsupportedLayerError
from musco_core.limits import ROUNDING, RankLimits
from musco_core.spec import structure_params
from musco_core.registry import default_registry
from musco_core.stats import LayerStats, param_count, probe_module
from musco_core.strategies import Decomposition, Layer, RankSelector, rank_tuple

#: Limits every rule's ranks are checked under (after :meth:`RankLimits.apply`).
LIMITS = (
    RankLimits(round_to=4),
    RankLimits(min_rank=2),
    RankLimits(max_rank=3),
    RankLimits(round_to=8, min_rank=1, max_rank=16),
)


def planted_weight(shape: tuple[int, ...], rank: int, noise: float = 0.05,
                   seed: int = 0) -> torch.Tensor:
    """A float32 weight of ``shape`` whose (out x rest) matrix is rank ``rank`` plus noise."""
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], 1
    for s in shape[1:]:
        rest *= s
    rank = max(1, min(rank, out, rest))
    w = torch.randn(out, rank, generator=g) @ torch.randn(rank, rest, generator=g) / rank**0.5
    w = w + noise * torch.randn(out, rest, generator=g)
    return w.reshape(shape)


def sample_layers() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """(module, input shape) pairs the checks run on: Linear, 1x1 conv, 3x3 conv, small 3x3 conv."""
    layers: list[tuple[nn.Module, tuple[int, ...]]] = [
        (nn.Linear(24, 16), (2, 24)),
        (nn.Conv2d(16, 24, 1), (1, 16, 6, 6)),
        (nn.Conv2d(8, 12, 3, padding=1, bias=False), (1, 8, 6, 6)),
        (nn.Conv2d(3, 4, 3, stride=2), (1, 3, 7, 7)),
    ]
    for i, (module, _) in enumerate(layers):
        with torch.no_grad():
            w = module.weight
            module.weight.copy_(planted_weight(tuple(w.shape), max(1, min(w.shape[:2]) // 3),
                                               seed=i))
        module.eval()
    return layers


def layer_for(name: str, module: nn.Module, input_shape: tuple[int, ...]) -> Layer:
    """A :class:`Layer` with statistics measured on a zero input of ``input_shape``."""
    flops, out_shape = probe_module(module, input_shape, default_registry().flop_formulas())
    stats = LayerStats(tuple(input_shape), out_shape, param_count(module), flops, 1)
    return Layer(name, module, stats)


def _decompositions(decompositions: Iterable[Decomposition] | None) -> list[Decomposition]:
    if decompositions is not None:
        return list(decompositions)
    from musco_core.registry import default_registry

    registry = default_registry()
    return [registry.get("decompositions", n).strategy for n in registry.names("decompositions")]


def _structure(rule: RankSelector, params: Any) -> Any:
    if params is None:
        params = {}
    if isinstance(params, Mapping):
        return structure_params(dict(params), rule.Params)
    return params


def check_rank_rule(
    rule: RankSelector,
    params: Any = None,
    decompositions: Iterable[Decomposition] | None = None,
) -> dict[tuple[str, str], Any]:
    """Check that ``rule`` behaves as the engine expects; return the ranks it chose.

    :param rule: the rank rule instance.
    :param params: an instance of ``rule.Params``, a dict structured into it the
        way a spec's parameters are, or ``None`` for the defaults.
    :param decompositions: the decompositions to try; default: every one in
        :func:`musco_core.default_registry`. Each is used only on the sample
        layers its :meth:`~musco_core.Decomposition.check` accepts.
    :returns: ``{(decomposition name, layer name): rank, None or the ValueError}``
        (a rule may refuse a layer with a ``ValueError`` whose message starts
        with ``layer '<name>'``; any other exception fails the check).

    Checked: the rule has a name, a summary, an attrs ``Params`` class and a
    valid ``rounding``; ``select`` returns ``None`` or a rank that
    ``validate_rank`` accepts; it does not change the module; it is
    deterministic (same input, same rank); each rank stays valid and within
    ``min_rank`` / ``max_rank`` after every :data:`LIMITS` is applied; and
    ``problems`` accepts the matched layers and returns a list of strings.
    """
    label = f"rank rule {type(rule).__name__}"
    assert isinstance(rule, RankSelector), f"{label} is not a musco_core.RankSelector"
    assert isinstance(rule.name, str) and rule.name, f"{label} has no name"
    label = f"rank rule {rule.name!r}"
    assert isinstance(rule.summary, str) and rule.summary, f"{label} has no summary"
    assert attrs.has(rule.Params), f"{label}: Params must be an attrs class, got {rule.Params!r}"
    assert rule.rounding in ROUNDING, (
        f"{label}: rounding must be one of {ROUNDING}, got {rule.rounding!r}"
    )
    params = _structure(rule, params)
    decs = _decompositions(decompositions)
    assert decs, "no decompositions to check the rule with"
    chosen: dict[tuple[str, str], Any] = {}
    samples = sample_layers()
    for dec in decs:
        layers = []
        for i, (module, input_shape) in enumerate(samples):
            name = f"layer{i}"
            try:
                dec.check(name, module)
            except UnsupportedLayerError:
                continue
            layers.append(layer_for(name, module, input_shape))
        if not layers:
            continue
        problems = rule.problems(params, layers)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), (
            f"{label}: problems() must return a list of str, got {problems!r}"
        )
        for layer in layers:
            where = f"{label} with decomposition {dec.name!r} on {layer.name!r} " \
                    f"({type(layer.module).__name__} {tuple(layer.module.weight.shape)})"
            before = {k: v.clone() for k, v in layer.module.state_dict().items()}
            try:
                rank = rule.select(layer, dec, params)
            except ValueError as exc:
                # A rule may refuse a layer or decomposition it cannot rank, with a
                # message that names the layer (the engine shows it in SpecError).
                text = str(exc)
                assert text.startswith(f"layer {layer.name!r}"), (
                    f"{where}: ValueError must start with \"layer {layer.name!r}\", got {text!r}"
                )
                chosen[(dec.name, layer.name)] = exc
                continue
            for k, v in layer.module.state_dict().items():
                assert torch.equal(v, before[k]), f"{where}: select() changed {k!r}"
            twin = Layer(layer.name, copy.deepcopy(layer.module), layer.stats, layer.round)
            again = rule.select(twin, dec, params)
            assert again == rank, f"{where}: not deterministic: {rank!r} then {again!r}"
            chosen[(dec.name, layer.name)] = rank
            if rank is None:
                continue
            message = dec.validate_rank(layer.module, rank)
            assert message is None, f"{where}: invalid rank {rank!r}: {message}"
            full = dec.full_rank(layer.module)
            for limits in LIMITS:
                limited = limits.apply(rank, full, rule.rounding)
                message = dec.validate_rank(layer.module, limited)
                assert message is None, (
                    f"{where}: rank {rank!r} after {limits!r} is {limited!r}: {message}"
                )
                for r, f in zip(rank_tuple(limited), rank_tuple(full)):
                    if limits.max_rank is not None:
                        assert r <= limits.max_rank, f"{where}: {limited!r} above {limits!r}"
                    if limits.min_rank is not None:
                        assert r >= min(limits.min_rank, f), (
                            f"{where}: {limited!r} below {limits!r}"
                        )
    return chosen


@attrs.frozen
class RankComparison:
    """Ranks several rank rules choose for the same layers; ``str()`` is a table.

    ``rows`` holds one dict per layer: ``layer``, ``params`` (now) and, per rule
    label, ``(rank, params after)`` (``(None, params)`` where the rule leaves the
    layer as it is).
    """

    labels: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]

    def rank(self, layer: str, label: str) -> Any:
        """The rank ``label`` chose for ``layer``."""
        for row in self.rows:
            if row["layer"] == layer:
                return row[label][0]
        raise KeyError(layer)

    def __str__(self) -> str:
        head = ["layer", "params"] + [f"{label}: rank (params)" for label in self.labels]
        body = [[row["layer"], str(row["params"])]
                + [f"{row[lb][0]!r} ({row[lb][1]})" for lb in self.labels] for row in self.rows]
        total = ["total", str(sum(r["params"] for r in self.rows))] + [
            f"({sum(r[lb][1] for r in self.rows)})" for lb in self.labels]
        table = [head] + body + [total]
        widths = [max(len(line[i]) for line in table) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                         for line in table)


def compare_rank_rules(
    model: nn.Module,
    example_inputs: Any,
    rank_rules: Iterable[Any],
    *,
    match: Any = ("linear", "conv1x1"),
    decomposition: Any = "svd",
    exclude: Iterable[str] = (),
    registry: Any = None,
) -> RankComparison:
    """The rank each of ``rank_rules`` gives each matched layer of ``model``; nothing is compressed.

    ``rank_rules`` are :class:`~musco_core.RankRule` objects or rule names
    (labelled by name, with ``#2``... for repeats). ``match``, ``decomposition``
    and ``exclude`` are as in a :class:`~musco_core.Rule` / :class:`~musco_core.Spec`.
    The spec of each rule is validated exactly as :class:`~musco_core.Compressor`
    does, so errors are the same :class:`~musco_core.SpecError`. Ranks include the
    rule's ``round_to`` / ``min_rank`` / ``max_rank``. ::

        print(compare_rank_rules(model, x, [RankRule("vbmf"), RankRule("energy", fraction=0.95)]))
    """
    from musco_core.plan import build_plan, candidate_layers, resolve_rules, select_rank
    from musco_core.registry import default_registry
    from musco_core.spec import RankRule, Rule, Spec
    from musco_core.stats import collect_stats

    registry = registry or default_registry()
    refs = [r if isinstance(r, RankRule) else RankRule(r) for r in rank_rules]
    labels: list[str] = []
    for ref in refs:
        label, k = ref.name, 1
        while label in labels:
            k += 1
            label = f"{ref.name}#{k}"
        labels.append(label)
    stats = collect_stats(model, example_inputs, candidate_layers(model),
                          default_registry().flop_formulas())
    rows: dict[str, dict[str, Any]] = {}
    for label, ref in zip(labels, refs):
        spec = Spec(rules=[Rule(match=match, decomposition=decomposition, rank=ref)],
                    exclude=tuple(exclude))
        rules = resolve_rules(spec, registry)
        plan = build_plan(model, spec, rules, stats)
        rule = rules[0]
        dec = rule.decomposition.strategy
        for name in plan.layers:
            module = model.get_submodule(name)
            row = rows.setdefault(name, {"layer": name, "params": stats[name].params})
            rank = select_rank(rule, Layer(name, module, stats[name]))
            after = dec.param_count(module, rank) if rank is not None else stats[name].params
            row[label] = (rank, after)
    return RankComparison(labels=tuple(labels), rows=tuple(rows.values()))
