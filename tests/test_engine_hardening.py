"""Engine hardening: shared weights and modules, hooks, training state, atomic commits, skips."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import Match, RankRule, Rule, Spec
from musco_core.registry import Registry
from musco_std.svd import SVDLinear

SVD2 = Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))


class TiedLM(nn.Module):
    """A GPT-2-style toy: the LM head's weight is the embedding table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.emb(ids))))


def test_tied_weights_are_skipped_with_the_reason_and_the_model_never_grows():
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    params = sum(p.numel() for p in model.parameters())
    compressor = musco.Compressor(model, Spec(rules=[SVD2]), ids)
    entry = compressor.plan.entry("head")
    assert entry.status == "skipped"
    assert entry.reason == ("layer 'head' shares a weight with 'emb' (tied weights); "
                            "factorizing it would untie them and grow the model")
    report = compressor.step()
    assert [r.name for r in report.compressed] == ["body"]
    assert compressor.model.head.weight is compressor.model.emb.weight
    after = sum(p.numel() for p in compressor.model.parameters())
    assert report.model_params_before == params and report.model_params_after == after < params
    strict = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2),
                              unsupported="error")])
    with pytest.raises(musco.SpecError, match="'head' shares a weight with 'emb'"):
        musco.Compressor(model, strict, ids)


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(32, 32)
        self.alias = self.fc
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.alias(x)))


def test_a_module_under_two_names_is_replaced_under_both():
    model = Aliased().eval()
    x = torch.randn(3, 32)
    compressor = musco.Compressor(model, Spec(rules=[Rule(match=Match("glob", pattern="fc"),
                                                          decomposition="svd",
                                                          rank=RankRule("fixed", rank=4))]), x)
    report = compressor.step()
    new = compressor.model
    assert isinstance(new.fc, SVDLinear) and new.alias is new.fc
    assert report.model_params_after < report.model_params_before
    assert report.model_params_after == sum(p.numel() for p in new.parameters())
    # The forward path (through `alias`) uses the factorized layer.
    with torch.no_grad():
        assert torch.allclose(new(x), new.out(torch.relu(new.fc(x))))


def test_hooks_with_kwargs_requires_grad_and_mode_are_kept():
    model = Aliased()
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(kwargs)
        return output

    model.fc.register_forward_hook(hook, with_kwargs=True)
    model.out.weight.requires_grad_(False)
    model.train()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))])
    compressor = musco.Compressor(model, spec, torch.randn(2, 32))
    compressor.step()
    new = compressor.model
    calls.clear()
    new(torch.randn(2, 32))
    assert calls == [{}]  # still called, with its kwargs
    assert new.fc.training and new.out.training
    assert not new.out.first.weight.requires_grad and not new.out.second.weight.requires_grad
    assert new.out.second.bias.requires_grad
    assert new.fc.first.weight.requires_grad


def test_an_interrupt_before_the_swap_leaves_everything_as_it_was(monkeypatch):
    import musco_core.engine.step as engine

    model = Aliased().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressor = musco.Compressor(model, Spec(rules=[SVD2]), torch.randn(2, 32), inplace=True)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "replace_modules", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compressor.step()
    assert isinstance(model.fc, nn.Linear) and compressor.position == 0
    assert compressor.manifest == [] and compressor.reports == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.undo()
    report = compressor.step()  # a retry compresses each layer once
    assert [r.name for r in report.compressed] == ["fc", "out"]
    assert [e["name"] for e in compressor.manifest] == ["fc", "out"]


def test_a_raising_finished_hook_does_not_make_a_committed_step_look_failed():
    class Broken:
        @musco.hookimpl
        def musco_step_finished(self, report):
            raise RuntimeError("logger is down")

    registry = Registry()
    registry.register_plugin(Broken(), name="broken-logger")
    compressor = musco.Compressor(Aliased().eval(), Spec(rules=[SVD2]), torch.randn(2, 32),
                                  registry=registry)
    with pytest.warns(musco.MuscoWarning, match="hook musco_step_finished of plugin "
                                                "'broken-logger' raised RuntimeError: logger is "
                                                "down; step 0 is committed"):
        report = compressor.step()
    assert compressor.position == 1 and len(report.compressed) == 2


def test_non_finite_weights_are_an_error_naming_the_layer():
    model = Aliased().eval()
    with torch.no_grad():
        model.out.weight[0, 0] = float("inf")
    compressor = musco.Compressor(model, Spec(rules=[SVD2]), torch.randn(2, 32), inplace=True)
    with pytest.raises(musco.CompressionError, match="layer 'out'") as excinfo:
        compressor.step()
    assert "non-finite" in str(excinfo.value) or "NaN or Inf" in str(excinfo.value)
    assert isinstance(model.fc, nn.Linear) and compressor.position == 0


class InvertedResidual(nn.Module):
    """MobileNetV2-style: 1x1 expand, depthwise 3x3, 1x1 project."""

    def __init__(self, c: int = 8, t: int = 4):
        super().__init__()
        self.expand = nn.Conv2d(c, c * t, 1, bias=False)
        self.dw = nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t, bias=False)
        self.project = nn.Conv2d(c * t, c, 1, bias=False)
        self.stem = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))


def test_the_obvious_two_rule_spec_compresses_a_mobile_block():
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    spec = Spec(rules=[
        Rule(match="conv1x1", decomposition="svd", rank=RankRule("param_reduction", rate=2.0)),
        Rule(match="conv_kxk", decomposition="tucker2",
             rank=RankRule("param_reduction", rate=2.0)),
    ])
    compressor = musco.Compressor(model, spec, torch.randn(1, 8, 8, 8))
    entry = compressor.plan.entry("dw")
    assert entry.status == "skipped" and "groups=32" in entry.reason
    assert set(compressor.plan.layers) == {"expand", "project", "stem"}
    preview = {r.name: r for r in compressor.preview()}
    assert preview["dw"].status == "skipped" and "groups=32" in preview["dw"].reason
    report = compressor.step()
    assert {r.name for r in report.compressed} == {"expand", "project", "stem"}


def test_a_rank_far_below_full_rank_is_a_warning_in_the_plan_and_the_report():
    model = Aliased().eval()
    spec = Spec(rules=[Rule(match=Match("glob", pattern="fc"), decomposition="svd",
                            rank=RankRule("fixed", rank=2))])
    with pytest.warns(musco.MuscoWarning, match=r"layer 'fc': rank 2 keeps 2 of 32 \(6%\)"):
        compressor = musco.Compressor(model, spec, torch.randn(2, 32))
    assert "warning: layer 'fc': rank 2 keeps 2 of 32" in str(compressor.plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compressor.step()
    assert report.layers[0].warning.startswith("layer 'fc': rank 2 keeps 2 of 32")
    assert str(report).splitlines()[-1].startswith("warning: layer 'fc': rank 2")


class FakeLatency:
    """Latency of a module: its parameter count, plus a fixed cost per submodule."""

    def __init__(self, per_module: float):
        self.per_module = per_module

    def time_module(self, module, input_shape):
        leaves = [m for m in module.modules() if not list(m.children())]
        return sum(p.numel() for p in module.parameters()) * 1e-9 + self.per_module * len(leaves)

    def speedup(self, old, new, input_shape):
        return self.time_module(old, input_shape), self.time_module(new, input_shape)


def test_min_speedup_skips_layers_that_are_not_measurably_faster():
    model = Aliased().eval()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2),
                            min_speedup=1.05)])
    # A large per-module overhead: two thin layers are slower than one.
    slow = musco.Compressor(model, spec, torch.randn(2, 32), latency=FakeLatency(1e-3))
    report = slow.step()
    assert report.compressed == ()
    assert all(r.reason.startswith("not faster enough: ") and "< min_speedup 1.05" in r.reason
               for r in report.layers)
    assert isinstance(slow.model.fc, nn.Linear)
    fast = musco.Compressor(model, spec, torch.randn(2, 32), latency=FakeLatency(0.0))
    report = fast.step()
    assert [r.name for r in report.compressed] == ["fc", "out"]
    assert all(r.time_after < r.time_before for r in report.compressed)


def test_rules_for_later_rounds_are_checked_and_counted_up_front():
    model = Aliased().eval()
    x = torch.randn(2, 32)
    first = Rule(match=Match("glob", pattern="fc"), decomposition="svd",
                 rank=RankRule("fixed", rank=8), rounds=[1])
    bad = Rule(match=Match("factorized", by="svd"), decomposition="svd",
               rank=RankRule("fixed", rank=40), rounds=[2])
    with pytest.raises(musco.SpecError) as excinfo:
        musco.Compressor(model, Spec(rules=[first, bad], rounds=2), x)
    assert str(excinfo.value) == ("round 2 (projected on the factorized model): layer 'fc': "
                                  "rank 40 is outside 1..32 for decomposition 'svd' "
                                  "@ $.rules[1].rank")
    good = Rule(match=Match("factorized", by="svd"), decomposition="svd",
                rank=RankRule("fixed", rank=4), rounds=[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor = musco.Compressor(model, Spec(rules=[first, good], rounds=2), x)
        assert compressor.plan.steps == (((1, "fc"),), ((2, "fc"),))
        rows = [(r.name, r.round, r.status) for r in compressor.preview()]
        assert rows == [("fc", 1, "planned"), ("fc", 2, "later")]
        ran = 0
        while not compressor.done:
            compressor.step()
            ran += 1
    assert ran == 2 and compressor.model.fc.rank == 4
