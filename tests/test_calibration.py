"""Calibration data through the engine: statistics per step, output errors, refinement, errors."""

from __future__ import annotations

import copy

import gc
import weakref

import pytest
import torch
from torch import nn

import musco_core as musco
from musco_core import Calibration, Refine, RankRule, Rule, Spec
from musco_core.registry import Registry
from musco_std.svd import SVD


class RecordingSVD(SVD):
    """A data-aware stand-in: plain SVD that records the statistics it is handed."""

    name = "rec_svd"
    seen: list

    def __init__(self):
        self.seen = []

    def needs(self, params):
        return frozenset({"input_gram", "cross_moment", "target_gram"})

    def compress(self, module, rank, params, data=None):
        self.seen.append(data)
        return super().compress(module, rank, params)


@pytest.fixture
def recording():
    strategy = RecordingSVD()

    class Plugin:
        @musco.hookimpl
        def musco_add_decompositions(self, register):
            register(strategy)

    registry = Registry()
    registry.register_plugin(Plugin(), name="recording")
    return strategy, registry


def two_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8)).eval()


def batches(n: int = 3, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 12, generator=g) for _ in range(n)]


def rows_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def test_statistics_are_collected_on_the_model_as_it_is_at_each_step(recording):
    strategy, registry = recording
    model = two_linear()
    data = batches()
    spec = Spec(rules=[Rule(match="linear", decomposition="rec_svd",
                            rank=RankRule("fixed", rank=2))], layers_per_step=1)
    compressor = musco.Compressor(model, spec, data[0], calibration=data, registry=registry)
    compressor.step()
    first = strategy.seen[0]
    want = sum(rows_gram(x) for x in data)
    torch.testing.assert_close(first.gram, want)
    torch.testing.assert_close(first.cross, want)  # nothing upstream changed yet
    assert first.rows == 3 * 16 and not first.shifted
    compressor.step()
    second = strategy.seen[1]
    # Layer "2" now sees the output of the compressed layer "0" ...
    now = [torch.relu(compressor.model[0](x)) for x in data]
    was = [torch.relu(model[0](x)) for x in data]
    with torch.no_grad():
        torch.testing.assert_close(second.gram, sum(rows_gram(x) for x in now))
        torch.testing.assert_close(second.target_gram, sum(rows_gram(x) for x in was))
        torch.testing.assert_close(second.cross, sum(
            a.double().T @ b.double() for a, b in zip(now, was)))
    assert second.shifted


def test_output_error_is_reported_and_matches_a_direct_computation():
    model = two_linear()
    data = batches()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=3))],
                layers_per_step=2)
    compressor = musco.Compressor(model, spec, data[0], calibration=data)
    report = compressor.step()
    first = report.layers[0]
    with torch.no_grad():
        y = torch.cat([model[0](x) for x in data])
        y_new = torch.cat([compressor.model[0](x) for x in data])
    want = float(torch.linalg.vector_norm(y - y_new) / torch.linalg.vector_norm(y))
    assert first.output_error == pytest.approx(want, rel=1e-4)
    assert "out.err" in str(report).splitlines()[2]


def test_dict_input_model_and_caps():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 10)
            self.head = nn.Linear(10, 4)

        def forward(self, *, tokens, scale):
            return self.head(torch.relu(self.proj(tokens))) * scale

    torch.manual_seed(0)
    model = DictModel().eval()
    data = [{"tokens": x, "scale": 2.0} for x in batches(5)]
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))],
                calibration=Calibration(max_batches=2, max_samples=24))
    compressor = musco.Compressor(model, spec, data[0], calibration=data)
    used = list(compressor.calibration)
    assert [b["tokens"].shape[0] for b in used] == [16, 8]
    report = compressor.step()
    assert all(r.output_error is not None and 0 <= r.output_error < 1 for r in report.layers)


class CountingBatches:
    """A re-iterable that makes fresh batches and remembers them only weakly."""

    def __init__(self, n: int):
        self.n = n
        self.refs: list[weakref.ref] = []
        self.most_alive = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(3)
        for _ in range(self.n):
            gc.collect()
            self.most_alive = max(self.most_alive, sum(r() is not None for r in self.refs))
            x = torch.randn(8, 12, generator=g)
            self.refs.append(weakref.ref(x))
            yield x


def test_no_activations_or_batches_are_kept(recording):
    strategy, registry = recording
    data = CountingBatches(12)
    spec = Spec(rules=[Rule(match="linear", decomposition="rec_svd",
                            rank=RankRule("fixed", rank=2))])
    compressor = musco.Compressor(two_linear(), spec, torch.randn(2, 12), calibration=data,
                                  registry=registry)
    compressor.step()
    gc.collect()
    assert data.most_alive <= 2  # the batch being read and at most the one before it
    assert all(r() is None for r in data.refs)
    assert [d.gram.shape for d in strategy.seen] == [(12, 12), (10, 10)]


def test_save_and_resume_without_the_data(tmp_path, recording):
    strategy, registry = recording
    data = batches()
    spec = Spec(rules=[Rule(match="linear", decomposition="rec_svd",
                            rank=RankRule("fixed", rank=2))], layers_per_step=1)
    model = two_linear()
    compressor = musco.Compressor(model, spec, data[0], calibration=data, registry=registry)
    compressor.step()
    compressor.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert not any(torch.equal(t, data[0]) for t in state["model"].values()
                   if t.shape == data[0].shape)
    assert "calibration" not in state
    with pytest.raises(musco.SpecError, match="'rec_svd' needs calibration data"):
        musco.Compressor.resume(tmp_path / "state.pt", two_linear(), registry=registry)
    again = musco.Compressor.resume(tmp_path / "state.pt", two_linear(), calibration=data,
                                    registry=registry)
    again.step()
    assert again.done and strategy.seen[-1].shifted


def test_bad_calibration_is_refused_before_anything_changes(recording):
    strategy, registry = recording
    spec = Spec(rules=[Rule(match="linear", decomposition="rec_svd",
                            rank=RankRule("fixed", rank=2))])
    x = torch.randn(2, 12)
    with pytest.raises(TypeError, match="can be consumed only once.*pass list"):
        musco.Compressor(two_linear(), spec, x, calibration=iter(batches()), registry=registry)
    with pytest.raises(TypeError, match="got a single Tensor: wrap it in a list"):
        musco.Compressor(two_linear(), spec, x, calibration=x, registry=registry)
    with pytest.raises(ValueError, match="calibration data is empty"):
        musco.Compressor(two_linear(), spec, x, calibration=[], registry=registry)
    with pytest.raises(musco.CompressionError,
                       match=r"calibration batch 0 does not fit the model: RuntimeError"):
        musco.Compressor(two_linear(), spec, x, calibration=[torch.randn(2, 5)],
                         registry=registry)
    with pytest.raises(musco.SpecError, match=r"'rec_svd' needs calibration data.*rules\[0\]"):
        musco.Compressor(two_linear(), spec, x, registry=registry)
    with pytest.raises(musco.SpecError, match=r"local refinement needs calibration data"):
        musco.Compressor(two_linear(), Spec(rules=spec.rules, refine=Refine(steps=3)), x,
                         registry=registry)
    model = two_linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = batches()
    bad[1][0, 0] = float("nan")
    compressor = musco.Compressor(model, spec, x, calibration=bad, registry=registry,
                                  inplace=True)
    with pytest.raises(musco.CompressionError, match=r"layer '0': its inputs on calibration "
                                                     r"batch 1 contain NaN or Inf"):
        compressor.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert compressor.position == 0 and compressor.manifest == []


def test_refinement_is_deterministic_bounded_and_never_worse():
    data = batches(4, size=32)
    spec = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule("fixed", rank=2))],
                layers_per_step=2, refine=Refine(steps=15, lr=1e-2, seed=7))

    def run():
        compressor = musco.Compressor(two_linear(), spec, data[0], calibration=data)
        return compressor, compressor.step()

    c1, r1 = run()
    c2, r2 = run()
    for a, b in zip(c1.model.state_dict().values(), c2.model.state_dict().values()):
        assert torch.equal(a, b)
    for layer in r1.layers:
        assert layer.refined_from is not None
        assert layer.output_error <= layer.refined_from + 1e-12
    assert sum(r.output_error for r in r1.layers) < sum(r.refined_from for r in r1.layers)
    # Only the new factors were trained: the untouched ReLU has no weights; compare a frozen layer.


def _run_context(model, original, data):
    """The context a refiner gets in a run, for calling a refiner plugin directly."""
    from musco_core.calibration import CalibrationData
    from musco_core.context import RunContext

    return RunContext(model=model, example_inputs=data[0], stats={},
                      calibration=CalibrationData(data), reference=original, costs={},
                      statistics={}, resources={})


def _refiner(name):
    return musco.default_registry().get("refiners", name).strategy


def test_refinement_touches_only_the_new_factors_and_stops_at_its_budget():
    model = two_linear()
    original = two_linear()
    data = batches(2)
    new = SVD().compress(model[2], 2, None)[0]
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original_forward = new.forward

    def counting(x):
        calls.append(1)
        return original_forward(x)

    new.forward = counting
    refiner = _refiner("layer_output")
    refiner.refine({"2": new}, _run_context(model, original, data),
                   refiner.Params(steps=5, lr=1e-2))
    assert len(calls) == 5
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())


def test_whitened_svd_passes_the_data_aware_conformance_check():
    from musco_core.testing import check_data_aware
    from musco_std.svd import SVDParams

    check_data_aware(SVD(), SVDParams(whiten=True), SVDParams())


def anisotropic_model_and_data():
    from musco_core.testing import anisotropic_inputs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 4)).eval()
    x = anisotropic_inputs(8 * 64, 24, seed=5, condition=1e3).float()
    return model, list(x.split(64))


def test_whitened_svd_in_the_engine_lowers_the_output_error():
    model, data = anisotropic_model_and_data()

    def run(decomposition):
        spec = Spec(rules=[Rule(match="linear", decomposition=decomposition,
                                rank=RankRule("fixed", rank=6))], exclude=["4"],
                    layers_per_step=1)
        compressor = musco.Compressor(model, spec, data[0], calibration=data)
        reports = [compressor.step() for _ in range(2)]
        with torch.no_grad():
            y, y_new = model(torch.cat(data)), compressor.model(torch.cat(data))
        layer_errors = [r.layers[0].output_error for r in reports]
        return layer_errors, float(torch.linalg.vector_norm(y - y_new) / torch.linalg.vector_norm(y))

    plain_layers, plain = run("svd")
    white_layers, white = run(musco.Decompose("svd", whiten=True))
    assert all(w < p for w, p in zip(white_layers, plain_layers))
    assert white < 0.8 * plain


def test_energy_ranks_the_whitened_spectrum_when_the_engine_has_statistics():
    model, data = anisotropic_model_and_data()
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("energy", fraction=0.9))], exclude=["4"])
    with_data = musco.Compressor(model, spec, data[0], calibration=data).step()
    without = musco.Compressor(model, spec, data[0]).step()
    ranks_with = [r.rank for r in with_data.layers]
    ranks_without = [r.rank for r in without.layers]
    # Inputs live in few directions: the output needs fewer ranks than the weight.
    assert all(a < b for a, b in zip(ranks_with, ranks_without))
    # With the whitened decomposition, keeping 90% of the whitened energy bounds the
    # first layer's output error (bias aside): sqrt(1 - 0.9).
    white = Spec(rules=[Rule(match="linear", decomposition=musco.Decompose("svd", whiten=True),
                             rank=RankRule("energy", fraction=0.9))], exclude=["4"])
    report = musco.Compressor(model, white, data[0], calibration=data).step()
    assert report.layers[0].output_error <= (1 - 0.9) ** 0.5 + 1e-6


def test_budget_chooses_ranks_for_the_round_through_the_engine(tmp_path):
    model, data = anisotropic_model_and_data()
    spec = Spec(rules=[Rule(match="linear", decomposition=musco.Decompose("svd", whiten=True),
                            rank=RankRule("budget", flop_reduction=1.5, grid=4))],
                exclude=["4"], layers_per_step=1)
    compressor = musco.Compressor(model, spec, data[0], calibration=data)
    planned = {r.name: r for r in compressor.preview()}
    chosen = compressor.joint_ranks[0]
    assert set(chosen) == {"0", "2"}
    assert all(planned[n].rank == chosen[n] for n in chosen if chosen[n] is not None)
    before = sum(compressor.stats[n].flops for n in chosen)
    after = sum(planned[n].flops_after if chosen[n] is not None else planned[n].flops_before
                for n in chosen)
    assert before / after >= 1.5 * 0.97
    compressor.step()
    compressor.save(tmp_path / "run.pt")
    again = musco.Compressor.resume(tmp_path / "run.pt", model, calibration=data)
    assert again.joint_ranks == compressor.joint_ranks  # chosen once per round, saved
    again.step()
    report = again.report()
    assert report.model_flops_before > report.model_flops_after


def test_whitened_tucker2_passes_the_data_aware_conformance_check():
    from musco_core.testing import check_data_aware
    from musco_std.tucker2 import Tucker2, Tucker2Params

    check_data_aware(Tucker2(), Tucker2Params(whiten=True), Tucker2Params())


def test_whitened_tucker2_in_the_engine_lowers_the_output_error_of_each_layer():
    from musco_core.testing import anisotropic_inputs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    # Channel vectors with an anisotropic covariance at every pixel.
    rows = anisotropic_inputs(6 * 8 * 36, 12, seed=2, condition=1e3).float()
    data = list(rows.reshape(6 * 8, 6, 6, 12).permute(0, 3, 1, 2).split(8))

    def run(decomposition):
        spec = Spec(rules=[Rule(match="conv_kxk", decomposition=decomposition,
                                rank=RankRule("fixed", rank=(4, 4)))], layers_per_step=1)
        compressor = musco.Compressor(model, spec, data[0], calibration=data)
        return [compressor.step().layers[0].output_error for _ in range(2)]

    plain = run("tucker2")
    white = run(musco.Decompose("tucker2", whiten=True))
    assert all(w < p for w, p in zip(white, plain))


def test_budget_measures_damage_on_as_many_batches_as_it_is_told(monkeypatch):
    from musco_core.context import RoundContext as JointContext

    model, data = anisotropic_model_and_data()
    seen = []
    original = JointContext.damage

    def spy(self, layer, ranks, *, batches=None):
        out = original(self, layer, ranks, batches=batches)
        seen.append(len(self._reference))
        return out

    monkeypatch.setattr(JointContext, "damage", spy)
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("budget", flop_reduction=1.5, grid=3, batches=5))],
                exclude=["4"])
    musco.Compressor(model, spec, data[0], calibration=data).preview()
    assert seen == [5, 5]
    with pytest.raises(musco.SpecError, match="'batches' must be an int >= 1 or None, got 0"):
        musco.Compressor(model, Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule(
            "budget", flop_reduction=1.5, batches=0))]), data[0], calibration=data)


class SizeLatency:
    """A fake latency model: a module's time is its parameter count; the model adds a fixed rest."""

    def __init__(self, rest: float):
        self.rest = rest

    def time_module(self, module, input_shape):
        return float(sum(p.numel() for p in module.parameters()))

    def time_model(self, model, example_inputs):
        return self.time_module(model, None) + self.rest

    def speedup(self, old, new, input_shape):
        return self.time_module(old, input_shape), self.time_module(new, input_shape)


def test_a_model_scope_latency_target_is_end_to_end_and_counts_the_rest_of_the_model():
    model, data = anisotropic_model_and_data()
    layers = ("0", "2")
    spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                            rank=RankRule("budget", latency_reduction=1.25, grid=6,
                                          min_fraction=0.05, scope="model"))], exclude=["4"])
    fake = SizeLatency(rest=400.0)
    compressor = musco.Compressor(model, spec, data[0], calibration=data, latency=fake)
    rows = {r.name: r for r in compressor.preview()}
    before_layers = sum(rows[n].params_before for n in layers)
    after_layers = sum(rows[n].params_after for n in layers)
    rest = fake.time_model(model, None) - before_layers  # unmatched layer "4" and the fixed 400
    end_to_end = (before_layers + rest) / (after_layers + rest)
    assert end_to_end >= 1.25 * (1 - 1e-9)
    assert before_layers / after_layers > 1.25  # the layers alone must do more than 1.25x
    layers_only = Spec(rules=[Rule(match="linear", decomposition="svd", rank=RankRule(
        "budget", latency_reduction=1.25, grid=6, min_fraction=0.05))], exclude=["4"])
    rows = {r.name: r for r in musco.Compressor(model, layers_only, data[0], calibration=data,
                                                 latency=fake).preview()}
    assert sum(rows[n].params_after for n in layers) > after_layers  # "layers" asks for less
    with pytest.raises(musco.CompressionError, match=r"latency_reduction=3 cannot be reached"):
        musco.Compressor(model, Spec(rules=[Rule(match="linear", decomposition="svd",
                                                 rank=RankRule("budget", latency_reduction=3.0,
                                                               scope="model"))],
                                     exclude=["4"]),
                         data[0], calibration=data, latency=SizeLatency(rest=4000.0)).preview()


@pytest.mark.parametrize("target, metric", [("flop_reduction", "flops"),
                                            ("param_reduction", "params")])
def test_a_model_scope_flop_or_param_target_is_the_whole_models(target, metric):
    # Only layer "0" is matched; "2" and "4" keep their cost, so a 1.35x whole-model
    # target asks much more than 1.35x of the matched layer.
    model, data = anisotropic_model_and_data()
    rule = {target: 1.35, "grid": 8, "min_fraction": 0.05}

    def run(scope):
        spec = Spec(rules=[Rule(match="linear", decomposition="svd",
                                rank=RankRule("budget", scope=scope, **rule))], exclude=["2", "4"])
        compressor = musco.Compressor(model, spec, data[0], calibration=data)
        rows = [r for r in compressor.preview() if r.status == "planned"]
        before = sum(getattr(r, f"{metric}_before") for r in rows)
        after = sum(getattr(r, f"{metric}_after") for r in rows)
        whole = (compressor.model_flops_before if metric == "flops"
                 else compressor.model_params_before)
        return before / after, whole / (whole - before + after), compressor

    layers_ratio, whole_ratio, compressor = run("model")
    assert whole_ratio >= 1.35 * (1 - 1e-9)
    assert whole_ratio <= 1.35 * 1.1  # a hit, not an overshoot
    assert layers_ratio > 1.35  # the matched layers do more than the whole model's 1.35x
    only_layers_ratio, only_whole_ratio, _ = run("layers")
    assert only_layers_ratio >= 1.35 * (1 - 1e-9)
    assert only_whole_ratio < 1.35  # "layers" leaves the whole model short of the target
    # and the whole model really ends there once compressed
    while not compressor.done:
        compressor.step()
    report = compressor.report()
    if metric == "flops":
        assert report.model_flops_before / report.model_flops_after == pytest.approx(whole_ratio)
    else:
        assert report.model_params_before / report.model_params_after == pytest.approx(whole_ratio)


def test_model_scope_refinement_lowers_the_models_output_error_more_than_layer_scope():
    # Only the first layer is compressed. Its own output error is already at the best a
    # rank-3 layer can do on its inputs (whitened SVD), so training it toward its own
    # output gains little; training it toward the model's output (through the ReLU and the
    # second layer) can trade layer error the model does not see for error it does.
    model, data = anisotropic_model_and_data()

    def run(refine_spec):
        spec = Spec(rules=[Rule(match="linear", decomposition=musco.Decompose("svd", whiten=True),
                                rank=RankRule("fixed", rank=3))], exclude=["2", "4"],
                    refine=refine_spec)
        compressor = musco.Compressor(model, spec, data[0], calibration=data)
        report = compressor.step()
        with torch.no_grad():
            x = torch.cat(data)
            y, y_new = model(x), compressor.model(x)
        return report, float(torch.linalg.vector_norm(y - y_new) / torch.linalg.vector_norm(y))

    _, unrefined = run(Refine())
    _, layer_scope = run(Refine(steps=60, lr=1e-2, seed=3))
    report, model_scope = run(Refine(steps=60, lr=1e-2, seed=3, scope="model"))
    assert model_scope < 0.9 * min(unrefined, layer_scope)
    # the step report gives the model's output error before and after refinement
    assert report.model_refined_from == pytest.approx(unrefined, rel=1e-4)
    assert report.model_output_error == pytest.approx(model_scope, rel=1e-4)
    assert f"model output error on the calibration data: {model_scope:.4g}" in str(report)
    assert musco.StepReport.from_dict(report.to_dict()) == report
    # deterministic for a seed
    again, again_error = run(Refine(steps=60, lr=1e-2, seed=3, scope="model"))
    assert again_error == model_scope


def test_model_scope_refinement_trains_only_the_new_factors_and_keeps_grads_clean():
    model, original = two_linear(), two_linear()
    data = batches(2)
    new = SVD().compress(model[0], 2, None)[0]
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_new = {k: v.clone() for k, v in new.state_dict().items()}
    refiner = _refiner("model_output")
    refiner.refine({"0": new}, _run_context(model, original, data),
                   refiner.Params(steps=4, lr=1e-2))
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # no stray gradients
    assert all(p.grad is None for p in new.parameters())
    assert any(not torch.equal(before_new[k], v) for k, v in new.state_dict().items())
    assert not model[0]._forward_hooks  # the stand-in hooks are gone
    with pytest.raises(musco.SpecError) as caught:
        Spec.from_dict({"rules": [{"match": "linear", "decomposition": "svd", "rank": "vbmf"}],
                        "refine": {"scope": "block"}})
    assert str(caught.value) == "'scope' must be in ('layer', 'model') (got 'block') @ $.refine"


def _two_steps(reference, *, fine_tune):
    """Layer '0' in step 1, layer '2' in step 2; optionally 'fine-tune' '2' in between."""
    model, data = anisotropic_model_and_data()
    spec = Spec(rules=[Rule(match="linear", decomposition=musco.Decompose("svd", whiten=True),
                            rank=RankRule("fixed", rank=8))], exclude=["4"], layers_per_step=1,
                calibration=musco.Calibration(reference=reference))
    compressor = musco.Compressor(model, spec, data[0], calibration=data)
    compressor.step()
    if fine_tune:  # "fine-tune" the compressed first layer: weights changed in place
        with torch.no_grad():
            g = torch.Generator().manual_seed(9)
            for p in compressor.model[0].parameters():
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    trained = copy.deepcopy(compressor.model[2])
    compressor.step()
    return compressor, trained, data


def _fit_error(new, reference_layer, compressor, data):
    # output error of the new layer '2' against `reference_layer` on the inputs it sees now
    with torch.no_grad():
        x = compressor.model[1](compressor.model[0](torch.cat(data)))
        y, y_new = reference_layer(x), new(x)
    return float(torch.linalg.vector_norm(y - y_new) / torch.linalg.vector_norm(y))


def test_after_fine_tuning_between_steps_fits_aim_at_the_fine_tuned_model():
    auto, trained, data = _two_steps("auto", fine_tune=True)
    original, _, _ = _two_steps("original", fine_tune=True)
    # "auto" fits layer '2' to its output on the fine-tuned inputs; "original" maps them
    # back toward the original model's features, undoing the fine-tuning upstream
    auto_error = _fit_error(auto.model[2], trained, auto, data)
    original_error = _fit_error(original.model[2], trained, original, data)
    assert auto_error < 0.7 * original_error
    # "step" takes the model at each step's start: here the same as "auto"
    step, _, _ = _two_steps("step", fine_tune=True)
    for a, b in zip(auto.model.state_dict().values(), step.model.state_dict().values()):
        assert torch.equal(a, b)


def test_without_changes_between_steps_auto_keeps_the_original_reference():
    auto, _, _ = _two_steps("auto", fine_tune=False)
    original, _, _ = _two_steps("original", fine_tune=False)
    step, _, _ = _two_steps("step", fine_tune=False)
    for a, b in zip(auto.model.state_dict().values(), original.model.state_dict().values()):
        assert torch.equal(a, b)  # error correction toward the original kept
    assert any(not torch.equal(a, b) for a, b in zip(auto.model.state_dict().values(),
                                                      step.model.state_dict().values()))
    with pytest.raises(musco.SpecError, match=r"'reference' must be in \('auto', 'original', "
                                              r"'step'\) \(got 'teacher'\) @ \$\.calibration"):
        Spec.from_dict({"rules": [{"match": "linear", "decomposition": "svd", "rank": "vbmf"}],
                        "calibration": {"reference": "teacher"}})
