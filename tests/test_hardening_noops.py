"""Nothing the user asked for is skipped without a word (issue 19, items 6 and 9).

(a) a rule of a later round that matches layers its decomposition cannot take;
(b) a reduction rate no rank can reach; (c) ``budget`` measuring damage without
calibration data; and the command line's tables and plugin list.

The tests marked "engine snippet" need the issue's changes to
``musco_core/engine/step.py``, ``musco_core/strategies.py`` and
``musco_core/engine/compressor.py`` (``RankSelector.skip_reason``; plan warnings of a
round planned at run time warned and put in that round's first step report).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core.cli import main
from musco_core.errors import MuscoWarning, SpecError
from musco_core.report import LayerReport, StepReport, format_table
from musco_core.testing.rank_rules import layer_for
from musco_std.rank_rules import FlopReduction, ParamReduction, ReductionParams
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2


def two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1))


def tucker_then_svd(**rule) -> musco.Spec:
    """Round 1: tucker2 on the 3x3 convs; round 2: ``svd`` on the factorized ones (it cannot)."""
    return musco.Spec(rules=[
        musco.Rule(match="conv_kxk", decomposition="tucker2",
                   rank=musco.RankRule("param_reduction", rate=2.0), rounds=[1]),
        musco.Rule(match="factorized", decomposition="svd",
                   rank=musco.RankRule("param_reduction", rate=2.0), rounds=[2], **rule),
    ], rounds=2, layers_per_step=2)


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, MuscoWarning)]


# -- 6 (a): a later-round rule that cannot compress what it matches ---------------------------


def test_a_later_round_rule_that_cannot_compress_its_layers_is_a_plan_warning():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compressor = musco.Compressor(two_convs(), tucker_then_svd(),
                                      example_inputs=torch.randn(1, 3, 8, 8))
    plan = compressor.plan
    for name in ("0", "2"):
        line = next((w for w in plan.warnings if f"layer {name!r}" in w), None)
        assert line is not None, plan.warnings
        assert line.startswith("round 2 (projected): rule 1 ")
        assert "does not support Tucker2Conv2d" in line
        assert line in _messages(record)           # warned when the compressor is made
    assert "warning: round 2 (projected): rule 1" in str(plan)
    assert all(f"warning: {w}" in " ".join(str(plan).split()) for w in plan.warnings)


def test_a_later_round_skip_is_an_error_under_unsupported_error():
    with pytest.raises(SpecError, match=r"round 2 .*does not support Tucker2Conv2d"):
        musco.Compressor(two_convs(), tucker_then_svd(unsupported="error"),
                         example_inputs=torch.randn(1, 3, 8, 8))


def test_a_skip_already_shown_in_round_one_is_not_warned_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=8))
    spec = musco.Spec(rules=[musco.Rule(match="conv1x1", decomposition="svd",
                                        rank=musco.RankRule("param_reduction", rate=1.2))],
                      rounds=2)
    compressor = musco.Compressor(model, spec, example_inputs=torch.randn(1, 4, 4, 4))
    assert compressor.plan.entry("2").status == "skipped"   # listed in round 1 already
    assert not any("round 2" in w for w in compressor.plan.warnings)


def test_engine_snippet_a_later_round_skip_is_warned_when_planned_and_in_its_step_report():
    compressor = musco.Compressor(two_convs(), tucker_then_svd(),
                                  example_inputs=torch.randn(1, 3, 8, 8))
    compressor.step()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = compressor.step()                 # round 2 is planned here
    assert compressor.plan.round == 2
    lines = [w for w in compressor.plan.warnings if w.startswith("round 2: rule 1 ")]
    assert len(lines) == 2 and all("does not support Tucker2Conv2d" in w for w in lines)
    assert set(lines) <= set(_messages(record))
    assert set(lines) <= set(report.warnings)
    text = " ".join(str(report).split())            # (long warnings are wrapped)
    assert all(f"warning: {w}" in text for w in lines)
    assert StepReport.from_dict(report.to_dict()) == report


# -- 6 (b): a reduction rate out of reach --------------------------------------------------------


@pytest.mark.parametrize("rule", [FlopReduction(), ParamReduction()])
def test_an_unreachable_rate_names_the_largest_reachable_one(rule):
    layer = layer_for("fc", nn.Linear(64, 48), (4, 64))
    dec = SVD()
    params = ReductionParams(rate=1000.0)
    assert rule.select(layer, dec, params) is None
    reason = rule.skip_reason(layer, dec, params)
    assert reason is not None
    assert reason.startswith("rate 1000 is out of reach: the smallest rank (1) gives ")
    best = float(reason.rsplit("ask for at most ", 1)[1])
    assert rule.select(layer, dec, ReductionParams(rate=best)) is not None   # truly reachable
    assert rule.select(layer, dec, ReductionParams(rate=best + 0.2)) is None


def test_an_unreachable_rate_on_a_tuple_rank_names_the_smallest_tuple():
    layer = layer_for("conv", nn.Conv2d(8, 12, 3, padding=1), (1, 8, 6, 6))
    reason = ParamReduction().skip_reason(layer, Tucker2(), ReductionParams(rate=1000.0))
    assert reason is not None and "the smallest rank (1, 1) gives " in reason


def test_a_layer_left_out_on_purpose_keeps_the_plain_reason():
    layer = layer_for("fc", nn.Linear(64, 48), (4, 64))
    params = ReductionParams(rate=2.0, rates={"fc": None})
    assert ParamReduction().skip_reason(layer, SVD(), params) is None


def test_engine_snippet_the_default_skip_reason_is_none():
    class Never(musco.RankSelector):
        name = "never"

        def select(self, layer, decomposition, params):
            return None

    layer = layer_for("fc", nn.Linear(8, 8), (1, 8))
    assert Never().skip_reason(layer, SVD(), None) is None


def test_engine_snippet_the_step_report_says_why_an_unreachable_rate_skipped_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("flop_reduction", rate=1000))])
    compressor = musco.Compressor(model, spec, example_inputs=torch.randn(2, 64))
    preview = {r.name: r for r in compressor.preview()}
    report = compressor.step()
    for layer in report.layers:
        assert layer.status == "skipped"
        assert layer.reason.startswith("rate 1000 is out of reach: the smallest rank (1) gives ")
        assert preview[layer.name].reason == layer.reason


# -- 6 (c): budget without calibration data ------------------------------------------------------


def _budget_spec(rounds: int = 1) -> musco.Spec:
    return musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("budget", param_reduction=1.5,
                                                            grid=3))],
                      exclude=["4"], rounds=rounds, layers_per_step=1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()


def test_budget_without_calibration_data_warns_once_per_run():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compressor = musco.Compressor(_mlp(), _budget_spec(rounds=2),
                                      example_inputs=torch.randn(8, 32))
        compressor.preview()
        while not compressor.done:
            compressor.step()
    lines = [m for m in _messages(record) if "without calibration data" in m]
    assert len(lines) == 1, _messages(record)
    assert "budget" in lines[0] and "example_inputs" in lines[0]
    assert "calibration=" in lines[0]


def test_budget_with_calibration_data_does_not_warn_about_it():
    batches = [torch.randn(8, 32) for _ in range(2)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compressor = musco.Compressor(_mlp(), _budget_spec(), example_inputs=batches[0],
                                      calibration=batches)
        compressor.step()
    assert not [m for m in _messages(record) if "without calibration data" in m]


# -- 9: the command line's tables ----------------------------------------------------------------

MODELS = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        return self.depthwise(self.conv2(torch.relu(self.conv1(x))))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Block(16), Block(16))
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.head(x.mean((2, 3)))

def net():
    torch.manual_seed(0)
    return Net()
'''

SPEC = '''
rounds = 2
layers_per_step = 2

[[rules]]
match = "conv_kxk"
decomposition = "tucker2"
rank = { name = "param_reduction", rate = 1.5 }
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "noops_models.py").write_text(MODELS)
    (tmp_path / "spec.toml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("noops_models", None)


def test_musco_plan_lines_fit_and_notes_get_their_own_line(workdir, capsys):
    assert main(["plan", "noops_models:net", "--spec", "spec.toml", "-q",
                 "--input-shape", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, "\n".join(too_wide)
    table = out.split("\n\n", 1)[1].splitlines()
    later = [line for line in table if line.split()[:1] == ["layer1.0.conv1"]]
    assert [line.split()[1] for line in later] == ["1", "2"]
    assert later[1].split()[4] == "later"           # the params column says only that
    assert "its rank is chosen when the round starts" not in later[1]
    assert any(line.startswith("later: ") and "when the round starts" in line for line in table)
    depthwise = next(i for i, line in enumerate(table) if line.startswith("layer1.0.depthwise"))
    assert table[depthwise].split()[4] == "skipped"
    assert "does not support" in table[depthwise + 1]


def test_format_table_puts_a_skip_reason_on_a_line_of_its_own():
    long = "layer 'x': decomposition 'svd' does not support Tucker2Conv2d; it accepts " \
           "Linear, Conv2d, SVDLinear, SVDConv1x1, and this reason is long on purpose"
    rows = [LayerReport(name="x", round=1, decomposition="svd", rank_rule="fixed",
                        status="skipped", reason=long, params_before=10, params_after=10)]
    text = format_table(rows)
    assert max(map(len, text.splitlines())) <= 100
    assert " ".join(text.split()).endswith(" ".join(long.split()))


def test_plan_text_lines_fit(workdir):
    import noops_models

    spec = musco.Spec.load("spec.toml")
    compressor = musco.Compressor(noops_models.net(), spec, example_inputs=torch.randn(1, 3, 8, 8))
    text = str(compressor.plan)
    assert max(map(len, text.splitlines())) <= 100, text
    assert "only groups=1 is supported" in " ".join(text.split())


# -- 9: musco plugins shows overrides ------------------------------------------------------------


class _MyFixed(musco.RankSelector):
    name = "fixed"
    summary = "my own fixed rank"

    def select(self, layer, decomposition, params):
        return 1


def test_musco_plugins_text_shows_what_a_strategy_overrides(capsys, monkeypatch):
    from musco_core import registry as musco_registry

    class Plugin:
        @musco.hookimpl
        def musco_add_rank_rules(self, register):
            register(_MyFixed(), override=True)

    fake = musco_registry.Registry()
    fake.register_plugin(Plugin(), name="mine")
    monkeypatch.setattr(musco_registry, "_default", fake)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["fixed"])
    assert "my own fixed rank" in line and "(overrides 'fixed' from musco)" in line
    other = next(line for line in out.splitlines() if line.split()[:1] == ["param_reduction"])
    assert "overrides" not in other


# -- 9: the test kit exports layer_for -------------------------------------------------------------


def test_layer_for_is_exported_from_the_test_kit():
    from musco_core import testing

    assert testing.layer_for is layer_for and "layer_for" in testing.__all__
