"""What the current round would do, without changing anything: ``Compressor.preview()``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from musco_core.engine.step import Step
from musco_core.report import LayerReport

if TYPE_CHECKING:
    from musco_core.engine.compressor import Compressor


def preview(run: Compressor) -> list[LayerReport]:
    """What the current round would do, without changing anything.

    One :class:`LayerReport` per planned layer with status ``"planned"``: the
    rank the rule chooses now and the decomposition's parameter and FLOP
    counts at that rank (nothing is decomposed, so there is no error), or
    ``"skipped"`` with the reason. Layers the plan skipped (unsupported, tied
    weights) are listed too, and the layers of later rounds (status ``"later"``).
    Joint rules (``budget``) choose their ranks here if they have not yet, which
    measures the model on the calibration data.
    """
    rows = []
    run.ensure_joint_ranks(list(run.plan.layers))
    step = Step(run, run.position, [])
    for entry in run.plan.entries:
        if entry.status == "skipped":
            stats = run.stats.get(entry.name)
            rows.append(LayerReport(
                name=entry.name, round=run.plan.round, decomposition=entry.decomposition,
                rank_rule=entry.rank_rule, status="skipped", reason=entry.reason,
                params_before=stats.params if stats else 0,
                params_after=stats.params if stats else 0,
                flops_before=stats.flops if stats else 0,
                flops_after=stats.flops if stats else 0))
            continue
        if entry.status != "compress":
            continue
        choice = step.choose(run.plan.round, entry.name)
        if choice.skipped is not None:
            rows.append(choice.skipped)
            continue
        decomposition = choice.rule.decomposition.strategy
        rows.append(LayerReport(
            status="planned", rank=choice.rank,
            params_after=decomposition.param_count(choice.module, choice.rank),
            flops_after=decomposition.flop_count(choice.module, choice.rank, choice.stats),
            **choice.base))
    for rnd, name, index in run.plan.later:
        rule = run.rules[index]
        stats = run.stats[name]
        rows.append(LayerReport(
            name=name, round=rnd, decomposition=rule.decomposition.name,
            rank_rule=rule.rank.name, status="later", params_before=stats.params,
            params_after=stats.params, flops_before=stats.flops, flops_after=stats.flops,
            reason=f"round {rnd}: its rank is chosen when the round starts, on the "
                   "factorized layer"))
    return rows
