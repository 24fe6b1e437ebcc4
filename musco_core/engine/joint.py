"""Joint rank rules (``budget``): each chooses the ranks of all its layers once per round."""

from __future__ import annotations

from typing import TYPE_CHECKING

from musco_core.context import RoundContext
from musco_core.errors import CompressionError
from musco_core.strategies import Layer

if TYPE_CHECKING:
    from musco_core.engine.compressor import Compressor


def choose_joint_ranks(run: Compressor, names: list[str]) -> None:
    """Let each joint rule of the current round choose the ranks of all its layers, once."""
    state = run.state
    for rule in run.rules:
        if not rule.rank.strategy.joint or rule.index in state.joint_ranks:
            continue
        if not any(run.plan.entry(n).rule == rule.index for n in names):
            continue
        layers = [Layer(e.name, run.model.get_submodule(e.name), run.stats[e.name],
                        run.plan.round)
                  for e in run.plan.entries if e.status == "compress" and e.rule == rule.index]
        context = RoundContext(run.context(), rule.decomposition.strategy,
                               rule.decomposition.params, rule.rank.limits,
                               rule.rank.strategy.rounding)
        label = f"rank rule {rule.rank.name!r}"
        try:
            ranks = rule.rank.strategy.select_joint(
                layers, rule.decomposition.strategy, rule.rank.params, context)
        except Exception as exc:
            raise CompressionError(
                f"{label} failed to choose the ranks of rule {rule.index}: "
                f"{type(exc).__name__}: {exc}; the model is unchanged", strategy=label
            ) from exc
        missing = [layer.name for layer in layers if layer.name not in ranks]
        if missing:
            raise CompressionError(f"{label} chose no rank for layer {missing[0]!r}",
                                   layer=missing[0], strategy=label)
        state.joint_ranks[rule.index] = dict(ranks)
        if context.table is not None:
            state.joint_tables[rule.index] = context.table
