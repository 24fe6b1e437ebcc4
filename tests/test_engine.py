"""The staged engine: plans, steps, atomicity, module surgery, lifecycle hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import CompressionError, RankRule, Registry, Rule, Spec
from musco_std.svd import SVD, SVDConv1x1, SVDLinear

SVD_RULE = Rule(match=["linear", "conv1x1"], decomposition="svd",
                rank=RankRule("param_reduction", rate=2.0))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_end_to_end_svd_in_steps(tiny_resnet, example_inputs):
    spec = Spec(rules=[SVD_RULE], exclude=["classifier"], layers_per_step=1)
    original = state(tiny_resnet)
    compressor = musco.Compressor(tiny_resnet, spec, example_inputs=example_inputs)
    plan = compressor.plan
    assert plan.layers == ("layer2.shortcut.0", "fc")
    assert plan.entry("classifier").status == "excluded"
    assert plan.entry("layer1.conv1").status == "unmatched"
    assert len(plan.steps) == 2 and "excluded" in str(plan)

    reports = []
    while not compressor.done:
        reports.append(compressor.step())
    assert [r.layers[0].name for r in reports] == ["layer2.shortcut.0", "fc"]
    model = compressor.model
    assert isinstance(model.layer2.shortcut[0], SVDConv1x1)
    assert isinstance(model.fc, SVDLinear)
    for layer in (r.layers[0] for r in reports):
        assert layer.status == "compressed"
        assert layer.params_after * 2 <= layer.params_before
        assert 0 < layer.flops_after < layer.flops_before
        assert 0 <= layer.rel_error < 1
    assert same_state(state(tiny_resnet), original)  # the caller's model is untouched
    assert isinstance(tiny_resnet.fc, nn.Linear)
    text = str(reports[-1]).splitlines()
    assert text[0].startswith("step 1: 1 layer(s) compressed, 0 skipped; params ")
    last = reports[-1]
    assert text[1] == (f"whole model: params {last.model_params_before / 1e3:.2f}k -> "
                       f"{last.model_params_after / 1e3:.2f}k "
                       f"({last.model_params_before / last.model_params_after:.2f}x), "
                       f"FLOPs {last.model_flops_before / 1e6:.2f}M -> "
                       f"{last.model_flops_after / 1e6:.2f}M "
                       f"({last.model_flops_before / last.model_flops_after:.2f}x)")
    assert text[2].split() == ["layer", "round", "decomposition", "rank", "params", "FLOPs",
                               "rel.err", "time"]
    assert text[4].split()[:4] == ["fc", "1", "svd", str(last.layers[0].rank)]
    # Whole-model totals are what the model says (shared parameters counted once).
    assert last.model_params_after == sum(p.numel() for p in compressor.model.parameters())
    assert reports[0].model_params_after == last.model_params_before
    fc = last.layers[0]
    assert last.model_flops_before - last.model_flops_after == fc.flops_before - fc.flops_after
    with pytest.raises(RuntimeError, match="compression is done"):
        compressor.step()


def test_full_rank_model_computes_the_same_function(tiny_resnet, example_inputs):
    full = {"layer2.shortcut.0": 8, "fc": 16, "classifier": 10}
    spec = Spec(rules=[Rule(match=["linear", "conv1x1"], decomposition="svd",
                            rank=RankRule("fixed", ranks=full))])
    # Full-rank SVD never shrinks a layer, so the engine skips every one and says why.
    compressor = musco.Compressor(tiny_resnet, spec, example_inputs, progress=False)
    report = compressor.step()
    assert not report.compressed and len(report.skipped) == 3
    assert "would not shrink it" in report.layers[0].reason
    assert same_state(state(compressor.model), state(tiny_resnet))


def test_inplace_and_float64_and_modes_and_hooks_are_kept(tiny_resnet, example_inputs):
    model = tiny_resnet.double().train()
    model.classifier.eval()
    calls = []
    model.fc.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    spec = Spec(rules=[SVD_RULE], layers_per_step=10)
    compressor = musco.Compressor(model, spec, example_inputs.double(), inplace=True)
    assert compressor.model is model
    compressor.step()
    assert isinstance(model.fc, SVDLinear) and model.fc.first.weight.dtype == torch.float64
    assert model.fc.training and not model.classifier.training
    model(example_inputs.double())
    assert calls and calls[-1] == (2, 32)


def test_two_rounds_recompress_the_factorized_layers(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("param_reduction", rate=1.5))],
                layers_per_step=5, rounds=2)
    compressor = musco.Compressor(tiny_resnet, spec, example_inputs)
    assert compressor.plan.steps == (((1, "fc"), (1, "classifier")), ((2, "fc"), (2, "classifier")))
    first = compressor.step()
    second = compressor.step()
    fc1, fc2 = first.layers[0], second.layers[0]
    assert fc2.round == 2 and fc2.params_before == fc1.params_after
    assert fc2.params_after * 1.5 <= fc2.params_before
    assert isinstance(compressor.model.fc, SVDLinear) and compressor.model.fc.rank == fc2.rank


class FailOnThird(SVD):
    """svd that raises on the third layer it is asked to compress."""

    name = "svd_flaky"

    def __init__(self):
        self.calls = 0

    def compress(self, module, rank, params):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return super().compress(module, rank, params)


class HookRecorder:
    def __init__(self):
        self.events = []
        self.flaky = FailOnThird()

    @musco.hookimpl
    def musco_add_decompositions(self, register):
        register(self.flaky)

    @musco.hookimpl
    def musco_step_started(self, context, step, layers):
        assert isinstance(context, musco.StepView) and context.position == step
        self.events.append(("started", step, tuple(layers)))

    @musco.hookimpl
    def musco_step_finished(self, step, report):  # a hook may take fewer arguments
        self.events.append(("finished", step, len(report.layers)))

    @musco.hookimpl
    def musco_step_failed(self, context, step, error):
        self.events.append(("failed", step, type(error).__name__))


@pytest.fixture
def recorder():
    registry = Registry()
    plugin = HookRecorder()
    registry.register_plugin(plugin)
    yield registry, plugin
    registry.unregister_plugin(plugin)


def wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])


def test_a_failing_layer_leaves_the_model_bit_identical(recorder):
    registry, plugin = recorder
    model = wide_model()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd_flaky", rank=RankRule("fixed", rank=4))],
                layers_per_step=4)
    compressor = musco.Compressor(model, spec, torch.randn(2, 16), registry=registry)
    before = copy.deepcopy(compressor.model)
    with pytest.raises(CompressionError) as excinfo:
        compressor.step()
    err = excinfo.value
    assert err.layer == "2" and err.strategy == "decomposition 'svd_flaky'"
    assert "layer '2' (round 1)" in str(err) and "boom" in str(err) and "unchanged" in str(err)
    assert same_state(state(compressor.model), state(before))
    assert all(type(m) is nn.Linear for m in compressor.model)
    assert compressor.position == 0 and not compressor.done
    assert plugin.events[-1] == ("failed", 0, "CompressionError")
    # The step can be retried once the cause is gone.
    report = compressor.step()
    assert len(report.compressed) == 4


def test_musco_step_started(recorder):
    registry, plugin = recorder
    spec = Spec(rules=[SVD_RULE], layers_per_step=3)
    musco.Compressor(wide_model(), spec, torch.randn(1, 16), registry=registry).step()
    assert plugin.events[0] == ("started", 0, ("0", "1", "2"))


def test_musco_step_finished(recorder):
    registry, plugin = recorder
    compressor = musco.Compressor(wide_model(), Spec(rules=[SVD_RULE], layers_per_step=3),
                                  torch.randn(1, 16), registry=registry)
    while not compressor.done:
        compressor.step()
    assert [e for e in plugin.events if e[0] == "finished"] == [("finished", 0, 3), ("finished", 1, 1)]


def test_a_step_hook_taking_the_deprecated_compressor_warns_and_still_gets_it():
    seen = []

    class Old:
        @musco.hookimpl
        def musco_step_started(self, compressor, step):
            seen.append(compressor)

    registry = Registry()
    with pytest.warns(DeprecationWarning, match="'compressor' argument of the musco step hooks"):
        registry.register_plugin(Old())
    compressor = musco.Compressor(wide_model(), Spec(rules=[SVD_RULE]), torch.randn(1, 16),
                                  registry=registry)
    compressor.step()
    assert seen == [compressor]


def test_musco_step_failed(recorder):
    registry, plugin = recorder
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("fixed", rank=4))])
    compressor = musco.Compressor(wide_model(), spec, torch.randn(1, 16), registry=registry)
    compressor.model[1] = nn.Linear(16, 3)  # the layer no longer fits the plan's rank check
    with pytest.raises(CompressionError, match="layer '1'.*rank rule 'fixed' chose an invalid rank"):
        compressor.step()
    assert plugin.events[-1] == ("failed", 0, "CompressionError")


def test_shape_check_failure_is_reported_and_atomic():
    class BadBuild(SVD):
        name = "svd_bad_build"

        def build(self, module, factors):
            return nn.Linear(module.in_features, module.out_features + 1)

    class Plugin:
        @musco.hookimpl
        def musco_add_decompositions(self, register):
            register(BadBuild())

    registry = Registry()
    registry.register_plugin(Plugin())
    model = wide_model()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd_bad_build",
                            rank=RankRule("fixed", rank=2))])
    compressor = musco.Compressor(model, spec, torch.randn(1, 16), registry=registry)
    with pytest.raises(CompressionError, match=r"shape check failed.*\(1, 17\), expected \(1, 16\)"):
        compressor.step()
    assert all(type(m) is nn.Linear and m.out_features == 16 for m in compressor.model)


def test_rank_rule_that_skips_a_layer_is_reported(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("fixed", rank=4, ranks={"classifier": None}))])
    report = musco.Compressor(tiny_resnet, spec, example_inputs).step()
    by_name = {r.name: r for r in report.layers}
    assert by_name["fc"].status == "compressed" and by_name["fc"].rank == 4
    assert by_name["classifier"].status == "skipped"
    assert by_name["classifier"].reason == "rank rule left it uncompressed"
    assert report.to_dict()["layers"][0]["name"] == "fc"


def test_rank_limits_round_and_clamp(tiny_resnet, example_inputs):
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("param_reduction", rate=2.0, round_to=4, max_rank=5))])
    report = musco.Compressor(tiny_resnet, spec, example_inputs).step()
    by_name = {r.name: r.rank for r in report.layers}
    # fc: 16 -> 32 with bias, rate 2 -> rank 5 by budget, rounded down to 4.
    assert by_name["fc"] == 4
    # classifier: 32 -> 10, budget gives 3, rounding down would give 0 so the floor is round_to.
    assert by_name["classifier"] == 4


def test_example_inputs_as_kwargs_and_shared_layers():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(12, 12)
            self.head = nn.Linear(12, 2)

        def forward(self, x, scale=1.0):
            return self.head(self.shared(self.shared(x)) * scale)

    model = TwoCalls()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=3))],
                exclude=["head"])
    compressor = musco.Compressor(model, spec, {"x": torch.randn(4, 12), "scale": 2.0})
    assert compressor.stats["shared"].calls == 2
    report = compressor.step()
    single = 2 * 4 * 12 * 12
    assert report.layers[0].flops_before == 2 * single


def test_progress_bar_is_shown_on_request(tiny_resnet, example_inputs, capsys):
    spec = Spec(rules=[SVD_RULE], layers_per_step=5)
    musco.Compressor(tiny_resnet, spec, example_inputs, progress=True).step()
    assert "musco step 0" in capsys.readouterr().err


def test_layers_that_do_not_run_are_named(example_inputs):
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3 * 16 * 16, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x.flatten(1))

    model = WithSpare()
    strict = Spec(rules=[Rule(match="linear", decomposition="svd",
                              rank=RankRule("fixed", rank=2), unsupported="error")])
    with pytest.raises(musco.SpecError, match="layer 'unused'.*did not run in the forward pass"):
        musco.Compressor(model, strict, example_inputs)
    # By default such a layer is skipped and the plan says why.
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))])
    plan = musco.Compressor(model, spec, example_inputs).plan
    assert plan.layers == ("used",)
    entry = plan.entry("unused")
    assert entry.status == "skipped" and "did not run in the forward pass" in entry.reason


def test_measuring_does_not_change_a_model_in_train_mode(tiny_resnet, example_inputs):
    model = tiny_resnet.train()
    before = state(model)
    spec = Spec(rules=[SVD_RULE])
    compressor = musco.Compressor(model, spec, example_inputs, inplace=True)
    assert same_state(state(model), before)  # BatchNorm running statistics untouched
    assert all(m.training for m in model.modules())
    compressor.step()
    assert model.bn.num_batches_tracked == 0 and model.training


def test_callable_matchers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    spec = Spec(rules=[Rule(match=[lambda name, module: name == "1", "conv1x1"],
                            decomposition="svd", rank=RankRule("fixed", rank=2))])
    compressor = musco.Compressor(model, spec, torch.randn(1, 8))
    assert compressor.plan.layers == ("1",)


def test_a_round_two_rule_targets_factorized_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    spec = Spec.from_toml("""
rounds = 2
layers_per_step = 5
exclude = ["4"]

[[rules]]
match = "linear"
decomposition = "svd"
rank = { name = "param_reduction", rate = 1.5 }
rounds = [1]

[[rules]]
match = { name = "factorized", by = "svd", pattern = "0" }
decomposition = "svd"
rank = { name = "param_reduction", rate = 2.0 }
rounds = [2]
""")
    compressor = musco.Compressor(model, spec, torch.randn(2, 32))
    # Round 2 is projected on the factorized structure, so its step is counted up front.
    assert compressor.plan.steps == (((1, "0"), (1, "2")), ((2, "0"),))
    assert not compressor.done
    first = compressor.step()
    assert not compressor.done
    second = compressor.step()
    assert compressor.done and compressor.plan.round == 2
    assert [r.name for r in second.layers] == ["0"]
    assert compressor.plan.entry("2").status == "unmatched"
    assert second.layers[0].params_after * 2 <= first.layers[0].params_after
    assert [(e["name"], e["round"], e["rule"]) for e in compressor.manifest] == [
        ("0", 1, 0), ("2", 1, 0), ("0", 2, 1)]


def test_type_matcher():
    model = nn.Sequential(nn.Conv1d(4, 8, 1), nn.Flatten(), nn.Linear(8 * 5, 2))
    spec = Spec(rules=[Rule(match=musco.Match("type", class_name="Linear"), decomposition="svd",
                            rank=RankRule("fixed", rank=1))])
    assert musco.Compressor(model, spec, torch.randn(1, 4, 5)).plan.layers == ("2",)


def test_two_rounds_of_tucker2_keep_three_convs_and_report_the_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    spec = Spec(rules=[Rule(match="conv_kxk", decomposition="tucker2",
                            rank=RankRule("param_reduction", rate=1.5))],
                layers_per_step=2, rounds=2, exclude=["0"])
    x = torch.randn(2, 8, 12, 12)
    compressor = musco.Compressor(model, spec, x)
    first = compressor.step()
    second = compressor.step()
    assert compressor.done
    layer = compressor.model[2]
    assert type(layer).__name__ == "Tucker2Conv2d"
    assert [type(m).__name__ for m in layer.children()] == ["Conv2d"] * 3
    r1, r2 = first.layers[0], second.layers[0]
    assert r2.params_before == r1.params_after and r2.params_after * 1.5 <= r2.params_before
    run = compressor.report()
    assert run.totals()["params_before"] == r1.params_before
    assert run.totals()["params_after"] == r2.params_after
    assert run.model_params_after < run.model_params_before
    assert "1 layer(s) compressed" in str(run)
    assert run.to_dict()["compressed_layers"]["flops_after"] == r2.flops_after


def test_models_with_embeddings_and_attention_are_measured_in_place():
    class TextModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 8)

        def forward(self, tokens):
            h = self.embed(tokens)
            h, _ = self.attn(h, h, h)
            return self.head(torch.relu(self.proj(h)))

    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=4))],
                exclude=["attn"])  # its out_proj is used through F.multi_head_attention_forward
    tokens = torch.randint(0, 50, (2, 7))
    compressor = musco.Compressor(TextModel(), spec, tokens)
    assert compressor.stats["embed"].input_shape == (2, 7)
    assert compressor.stats["proj"].flops == 2 * 2 * 7 * 16 * 16
    assert compressor.plan.layers == ("proj", "head")
    compressor.step()
    assert compressor.model(tokens).shape == (2, 7, 8)
