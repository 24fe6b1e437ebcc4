"""Rounds after the first: each planned on the model as it is when it starts.

Loaded only by runs with more than one round.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from musco_core.errors import MuscoWarning
from musco_core.plan import Plan, build_plan

if TYPE_CHECKING:
    from musco_core.engine.compressor import Compressor


def replan(run: Compressor) -> tuple[str, ...]:
    """Plan the next round on the model as it is now, when the next step starts one.

    Later rounds were projected (each rule keeping its layers); planning them for
    real lets rules match the factorized layers. Raises :class:`SpecError`
    without changing anything. Returns the new plans' warnings, each also warned
    as a :class:`MuscoWarning` (empty when no round was planned).
    """
    state = run.state
    steps = state.plan.steps
    planned: list[str] = []
    while state.plan.round < run.spec.rounds and (
        state.position >= len(steps) or steps[state.position][0][0] > state.plan.round
    ):
        compressed_by = {e["name"]: e["rule"] for e in state.manifest}
        rnd = next_round_with_work(run, state.plan.round + 1, compressed_by)
        new = build_plan(run.model, run.spec, run.rules, state.stats, rnd, compressed_by)
        state.plan = Plan(entries=new.entries, steps=steps[: state.position] + new.steps,
                          round=rnd, warnings=new.warnings)
        state.joint_ranks = {}
        state.joint_tables = {}
        steps = state.plan.steps
        planned += new.warnings
    for warning in planned:
        warnings.warn(warning, MuscoWarning, stacklevel=4)
    return tuple(planned)

def next_round_with_work(run: Compressor, first: int, compressed_by: dict[str, int]) -> int:
    """The first round from ``first`` whose plan has a step, else the last round.

    A round without a step changes nothing, so the rounds after it see the same
    model and the same manifest; two such rounds whose rules apply alike (no rule
    names either in its ``rounds``) plan alike. So only the rounds some rule names
    and the first round no rule names are planned (without projecting the rounds
    after them): a run whose remaining rounds match nothing costs a few plans of
    one round, not one projected plan per round (quadratic in ``rounds``). A round
    the current plan projects steps for is taken as it is (planned for real next;
    if it has no step after all, the caller's loop moves on).
    """
    state = run.state
    last = run.spec.rounds
    projected = {step[0][0] for step in state.plan.steps[state.position:] if step}
    named = {r for rule in run.rules for r in rule.rounds if first <= r < last}
    unnamed = next((r for r in range(first, last) if r not in named), None)
    candidates = sorted(named | ({unnamed} if unnamed is not None else set()))
    for rnd in candidates:
        if rnd in projected:
            return rnd
        plan = build_plan(run.model, run.spec, run.rules, state.stats, rnd,
                          compressed_by, project=False)
        if plan.steps:
            return rnd
    return last
