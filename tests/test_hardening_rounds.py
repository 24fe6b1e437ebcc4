"""Issue 19, item 1: ``rounds`` is bounded, an empty round is cheap, ``rules`` is not empty."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
import musco_core.plan as plan_module
from musco_core import Match, RankRule, Rule, Spec, SpecError
from musco_core.spec import MAX_ROUNDS

RULE = Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))
CONV_RULE = Rule(match="conv_kxk", decomposition="tucker2", rank=RankRule("fixed", rank=(2, 2)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).eval()


# -- the bound on rounds ---------------------------------------------------------------


def test_rounds_above_the_bound_are_a_spec_error_naming_it():
    assert MAX_ROUNDS == 100
    assert Spec(rules=[RULE], rounds=MAX_ROUNDS).rounds == MAX_ROUNDS
    for rounds in (MAX_ROUNDS + 1, 1000, 10**9):
        with pytest.raises(SpecError) as excinfo:
            Spec(rules=[RULE], rounds=rounds)
        assert excinfo.value.problems == [
            f"'rounds' must be at most {MAX_ROUNDS}, got {rounds} @ $.rounds"]
        data = Spec(rules=[RULE]).to_dict()
        data["rounds"] = rounds
        with pytest.raises(SpecError) as excinfo:
            Spec.from_dict(data)
        assert excinfo.value.problems == [
            f"'rounds' must be at most {MAX_ROUNDS}, got {rounds} @ $.rounds"]


def test_rounds_below_one_stay_an_error():
    with pytest.raises(SpecError, match=r"'rounds' must be >= 1, got 0 @ \$\.rounds"):
        Spec(rules=[RULE], rounds=0)
    data = Spec(rules=[RULE]).to_dict()
    data["rounds"] = -3
    with pytest.raises(SpecError, match=r"'rounds' must be >= 1, got -3 @ \$\.rounds"):
        Spec.from_dict(data)


# -- rules = [] --------------------------------------------------------------------------


def test_an_empty_rule_list_is_a_spec_error():
    for rules in ([], ()):
        with pytest.raises(SpecError) as excinfo:
            Spec(rules=rules)
        (problem,) = excinfo.value.problems
        assert problem.endswith("@ $.rules") and "at least one rule" in problem
    with pytest.raises(SpecError) as excinfo:
        Spec.from_dict({"rules": []})
    (problem,) = excinfo.value.problems
    assert problem.endswith("@ $.rules") and "at least one rule" in problem
    with pytest.raises(SpecError, match=r"at least one rule.* @ \$\.rules"):
        Spec.from_toml("rules = []\nrounds = 2")


# -- an empty round is cheap -------------------------------------------------------------


def _count_build_plan(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = plan_module.build_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "build_plan", counting)
    monkeypatch.setattr("musco_core.engine.rounds.build_plan", counting)
    return calls


def test_a_step_over_rounds_that_match_nothing_plans_a_bounded_number_of_times(monkeypatch):
    # No conv in the model: the rule matches nothing, in any round.
    compressor = musco.Compressor(mlp(), Spec(rules=[CONV_RULE], rounds=MAX_ROUNDS),
                                  torch.randn(2, 16))
    assert compressor.plan.steps == () and not compressor.done
    calls = _count_build_plan(monkeypatch)
    report = compressor.step()
    # Before: one plan of round r per round, each projecting the rounds after it
    # (~ rounds**2 / 2 = 5000 plans); now a handful, independent of ``rounds``.
    assert len(calls) <= 3, len(calls)
    assert report.layers == () and compressor.done
    assert compressor.plan.round == MAX_ROUNDS
    with pytest.raises(RuntimeError, match="compression is done"):
        compressor.step()


def test_after_the_last_step_the_empty_rounds_are_skipped_at_once(monkeypatch):
    rule = Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2), rounds=[1])
    compressor = musco.Compressor(mlp(), Spec(rules=[rule], rounds=MAX_ROUNDS,
                                              layers_per_step=5), torch.randn(2, 16))
    first = compressor.step()
    assert len(first.layers) == 3 and not compressor.done
    calls = _count_build_plan(monkeypatch)
    last = compressor.step()
    assert len(calls) <= 3, len(calls)
    assert last.layers == () and compressor.done and compressor.plan.round == MAX_ROUNDS
    assert [e["round"] for e in compressor.manifest] == [1, 1, 1]


def test_a_rule_limited_to_a_later_round_is_still_planned_in_that_round():
    rule = Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=3), rounds=[7])
    again = Rule(match=Match("factorized", by="svd"), decomposition="svd",
                 rank=RankRule("fixed", rank=2), rounds=[9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor = musco.Compressor(mlp(), Spec(rules=[rule, again], rounds=40,
                                                  layers_per_step=5), torch.randn(2, 16))
        assert [step[0][0] for step in compressor.plan.steps] == [7, 9]
        rounds = []
        while not compressor.done:
            report = compressor.step()
            rounds.append((compressor.plan.round, len(report.layers)))
    assert rounds == [(7, 3), (9, 3), (40, 0)]
    assert [(e["round"], e["rule"], e["rank"]) for e in compressor.manifest] == [
        (7, 0, 3), (7, 0, 3), (7, 0, 3), (9, 1, 2), (9, 1, 2), (9, 1, 2)]


def test_every_round_is_still_run_when_every_round_has_work():
    compressor = musco.Compressor(mlp(), Spec(rules=[Rule(
        match=["linear", Match("factorized", by="svd")], decomposition="svd",
        rank=RankRule("param_reduction", rate=1.2))], rounds=3, layers_per_step=5),
        torch.randn(2, 16))
    seen = []
    while not compressor.done:
        compressor.step()
        seen.append(compressor.plan.round)
    assert seen == [1, 2, 3]


def test_a_later_round_projected_with_work_that_has_none_is_passed_over():
    # Round 1 keeps every layer (rank 16 would not make them smaller: skipped), so the
    # round-2 rule for factorized layers, projected on factorized layers, finds none.
    keep = Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=16),
                rounds=[1])
    again = Rule(match=Match("factorized", by="svd"), decomposition="svd",
                 rank=RankRule("fixed", rank=2), rounds=[2])
    mlp16 = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor = musco.Compressor(mlp16, Spec(rules=[keep, again], rounds=3,
                                                  layers_per_step=5), torch.randn(2, 16))
        assert [step[0][0] for step in compressor.plan.steps] == [1, 2]
        first = compressor.step()
        assert [r.status for r in first.layers] == ["skipped", "skipped"]
        last = compressor.step()
    assert last.layers == () and compressor.done and compressor.plan.round == 3
    assert compressor.manifest == []
