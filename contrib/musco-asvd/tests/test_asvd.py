"""musco-asvd: registered through its entry point, exact on planted data, better than plain
SVD where input magnitudes differ, usable from a spec, its statistic computed only where needed."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import musco_core as musco
from musco_asvd import ASVD, ASVDParams, InputAbsMean, asvd_factors, asvd_scale
from musco_core.testing import check_data_aware, check_decomposition, check_statistic, svd_reference
from musco_std.svd import SVDConv1x1, SVDLinear

asvd = ASVD()


def _data(x: torch.Tensor, module: nn.Module) -> musco.LayerData:
    """LayerData with the registered statistic, as the engine builds it (one batch)."""
    rows = asvd.input_rows(module, x).to(torch.float64)
    batch = musco.LayerBatch(name="layer", index=0, rows=rows, original_rows=rows, module=module)
    stat = InputAbsMean()
    return musco.LayerData({"input_abs_mean": stat.result(stat.update(None, batch), rows.shape[0])},
                           rows=rows.shape[0])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _anisotropic(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows whose features differ in magnitude by 1000x (coordinate-aligned, as ASVD assumes)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales


def test_registered_through_the_entry_point():
    table = musco.available()
    decompositions = {r["name"]: r for r in table["decompositions"]}
    statistics = {r["name"]: r for r in table["statistics"]}
    assert decompositions["asvd"]["distribution"] == "musco-asvd"
    assert statistics["input_abs_mean"]["distribution"] == "musco-asvd"


def test_statistic_conforms_and_is_the_mean_absolute_value():
    check_statistic(InputAbsMean(), registry=musco.default_registry())
    check_statistic("input_abs_mean")
    x = torch.randn(50, 7, dtype=torch.float64)
    module = nn.Linear(7, 3, dtype=torch.float64)
    stat = InputAbsMean()
    state = None
    for i, part in enumerate((x[:20], x[20:])):
        state = stat.update(state, musco.LayerBatch(name="l", index=i, rows=part,
                                                    original_rows=part * 0, module=module))
    mean = stat.result(state, 50)
    assert mean.dtype == torch.float64 and mean.shape == (7,)
    torch.testing.assert_close(mean, x.abs().mean(dim=0), rtol=1e-12, atol=0)


def test_without_data_it_is_plain_svd_and_passes_the_kit():
    check_decomposition(asvd, reference=svd_reference)
    layer = nn.Linear(9, 6, dtype=torch.float64)
    new, error = asvd.compress(layer, 3, ASVDParams())
    plain, plain_error = musco.default_registry().get("decompositions", "svd").strategy.compress(
        layer, 3, musco.default_registry().get("decompositions", "svd").strategy.Params())
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(new(x), plain(x))
    assert error == pytest.approx(plain_error)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_planted_low_rank_is_recovered_exactly(alpha):
    g = torch.Generator().manual_seed(1)
    rank = 4
    layer = nn.Linear(20, 15, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(15, rank, generator=g, dtype=torch.float64)
                           @ torch.randn(rank, 20, generator=g, dtype=torch.float64))
    x = _anisotropic(300, 20, seed=2)
    x[:, 3] = 0  # a feature that is always 0: its weights survive through the floor
    new, error = asvd.compress(layer, rank, ASVDParams(alpha), data=_data(x, layer))
    assert isinstance(new, SVDLinear) and new.rank == rank
    approx = new.second.weight @ new.first.weight
    assert _relative(approx, layer.weight) <= 1e-9
    assert error <= 1e-9
    probe = torch.randn(5, 20, dtype=torch.float64)
    assert _relative(new(probe), layer(probe)) <= 1e-9


def test_1x1_conv_planted_recovery_and_output():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(12, 10, 1, stride=2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(10, 3, generator=g, dtype=torch.float64)
                           @ torch.randn(3, 12, generator=g, dtype=torch.float64)).reshape(10, 12, 1, 1))
    x = torch.randn(4, 12, 8, 8, generator=g, dtype=torch.float64) \
        * torch.logspace(-2, 1, 12, dtype=torch.float64)[None, :, None, None]
    new, error = asvd.compress(conv, 3, ASVDParams(), data=_data(x, conv))
    assert isinstance(new, SVDConv1x1) and error <= 1e-9
    assert _relative(new(x), conv(x)) <= 1e-9


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), seed=st.integers(0, 2**16),
       alpha=st.floats(0.0, 1.0), data=st.data())
def test_reconstruction_is_the_best_approximation_in_the_scaled_norm(m, n, seed, alpha, data):
    """``W' S`` is the Eckart-Young optimum for ``W S``: the scaled error is the tail of the
    spectrum of ``W S``, the reported error is ``|W - W'| / |W|`` and the rank is ``r``."""
    rank = data.draw(st.integers(1, min(m, n)))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mean = torch.rand(n, generator=g, dtype=torch.float64) * 10 ** (4 * torch.rand(n, generator=g) - 2)
    if data.draw(st.booleans()):
        mean[0] = 0.0
    scale = asvd_scale(mean, alpha)
    assert bool((scale > 0).all())
    first, second = asvd_factors(w, scale, rank)
    approx = second @ first
    tail = torch.linalg.svdvals(w * scale)[rank:]
    scaled_error = torch.linalg.vector_norm((w - approx) * scale)
    assert float(scaled_error) == pytest.approx(float(torch.linalg.vector_norm(tail)),
                                                rel=1e-7, abs=1e-9 * float(torch.linalg.norm(w)))
    assert int(torch.linalg.matrix_rank(approx)) <= rank
    layer = nn.Linear(n, m, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
    new, error = asvd.compress(layer, rank, ASVDParams(alpha),
                               data=musco.LayerData({"input_abs_mean": mean}, rows=1))
    torch.testing.assert_close(new.second.weight @ new.first.weight, approx, rtol=1e-9, atol=1e-9)
    assert error == pytest.approx(_relative(approx, w), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_beats_plain_svd_in_output_error_where_feature_magnitudes_differ(alpha):
    """ASVD is a heuristic, not optimal for output error (see check_data_aware): it must
    clearly win where it is meant to, on inputs whose features differ in magnitude."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 16, dtype=torch.float64)
    x = _anisotropic(600, 24, seed=5)
    data = _data(x, layer)
    with torch.no_grad():
        y = layer(x)
        for rank in (2, 6, 12):
            fitted, _ = asvd.compress(layer, rank, ASVDParams(alpha), data=data)
            plain, _ = asvd.compress(layer, rank, ASVDParams(alpha))
            e_asvd, e_plain = _relative(fitted(x), y), _relative(plain(x), y)
            assert e_asvd < 0.7 * e_plain, (rank, e_asvd, e_plain)


def test_the_data_aware_kit_builds_its_data_through_the_registered_statistic():
    """check_data_aware looks ``input_abs_mean`` up in the registry and feeds it rows, on
    rotated anisotropic inputs (Linear, 1x1 and strided 1x1 convs). ASVD is a heuristic, not
    optimal for output error, so this is no general guarantee; on these layers it is no worse
    than plain SVD at the kit's default tolerance."""
    check_data_aware(asvd, ASVDParams(0.5), ASVDParams(0.0), registry=musco.default_registry())
    with pytest.raises(AssertionError, match=r"unknown statistics \['input_abs_mean'\]"):
        check_data_aware(asvd, ASVDParams(0.5), ASVDParams(0.0),
                         registry=musco.Registry(autoload=False))


def test_alpha_zero_is_plain_svd_and_needs_nothing():
    layer = nn.Linear(10, 8, dtype=torch.float64)
    x = _anisotropic(100, 10, seed=1)
    assert asvd.needs(ASVDParams(0.0)) == frozenset()
    assert not asvd.requires_calibration(ASVDParams(0.0))
    assert asvd.needs(ASVDParams()) == {"input_abs_mean"} and asvd.requires_calibration(ASVDParams())
    a, _ = asvd.compress(layer, 3, ASVDParams(0.0), data=_data(x, layer))
    b, _ = asvd.compress(layer, 3, ASVDParams(0.0))
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("alpha, message", [
    (-0.1, r"'alpha' must be a number in \[0, 1\].*got -0.1 @ \$\.rules\[0\]\.decomposition"),
    (1.5, r"'alpha' must be a number in \[0, 1\].*got 1.5 @ \$\.rules\[0\]\.decomposition"),
    (float("nan"), r"'alpha' must be a number in \[0, 1\].*got nan @ \$\.rules\[0\]"),
    (True, r"expected a number, got True @ \$\.rules\[0\]\.decomposition\.alpha"),
    ("0.5", r"@ \$\.rules\[0\]\.decomposition\.alpha"),
])
def test_bad_alpha_is_a_spec_error(alpha, message):
    spec = musco.Spec(rules=[musco.Rule(match="linear",
                                        decomposition=musco.Decompose("asvd", alpha=alpha),
                                        rank=musco.RankRule("fixed", rank=2))])
    with pytest.raises(musco.SpecError, match=message):
        spec.validate()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 8))


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    scales = torch.logspace(-1, 1, 16)
    return [torch.randn(20, 16, generator=g) * scales for _ in range(n)]


def test_needs_calibration_data():
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition=musco.Decompose("asvd"),
                                        rank=musco.RankRule("fixed", rank=4))])
    with pytest.raises(musco.SpecError, match="'asvd' needs calibration data"):
        musco.Compressor(_model(), spec, torch.randn(2, 16))


def _run(decomposition) -> tuple[musco.Compressor, list[musco.LayerReport]]:
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition=decomposition,
                                        rank=musco.RankRule("param_reduction", rate=2.0))],
                      exclude=["4"], layers_per_step=1)
    compressor = musco.Compressor(_model(), spec, torch.randn(2, 16), calibration=_batches())
    while not compressor.done:
        compressor.step()
    return compressor, [r for step in compressor.reports for r in step.layers]


def test_end_to_end_with_calibration_data():
    compressor, layers = _run(musco.Decompose("asvd", alpha=0.5))
    assert [r.name for r in layers] == ["0", "2"]
    for r in layers:
        assert r.status == "compressed" and r.decomposition == "asvd"
        assert r.output_error is not None and 0 <= r.output_error < 1
        assert r.rel_error is not None and r.params_after * 2 <= r.params_before
    assert isinstance(compressor.model[0], SVDLinear) and isinstance(compressor.model[2], SVDLinear)
    assert compressor.manifest[0]["decomposition"] == "asvd"
    assert compressor.manifest[0]["params"] == {"alpha": 0.5}
    # the first layer's inputs differ 100x in magnitude: there ASVD must beat plain SVD
    _, plain = _run("svd")
    assert layers[0].rank == plain[0].rank
    assert layers[0].output_error < 0.7 * plain[0].output_error


def test_saved_and_reloaded():
    compressor, _ = _run(musco.Decompose("asvd", alpha=0.5))
    state = compressor.state_dict()
    x = _batches(1)[0]
    reloaded = musco.Compressor.from_state(state, _model(), calibration=_batches())
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), compressor.model(x))


def test_statistic_is_computed_once_per_step_only_where_needed(monkeypatch):
    """Two rules: asvd on '0' and '4', plain svd on '2'. Each step folds every calibration
    batch into the statistic once, for the asvd layers of that step only."""
    updates: list[tuple[str, int]] = []
    results: list[int] = []
    real_update, real_result = InputAbsMean.update, InputAbsMean.result

    def spy_update(self, state, batch):
        updates.append((batch.name, batch.index))
        return real_update(self, state, batch)

    def spy_result(self, state, rows):
        results.append(rows)
        return real_result(self, state, rows)

    monkeypatch.setattr(InputAbsMean, "update", spy_update)
    monkeypatch.setattr(InputAbsMean, "result", spy_result)
    spec = musco.Spec(rules=[
        musco.Rule(match=musco.Match("glob", pattern="2"), decomposition="svd",
                   rank=musco.RankRule("fixed", rank=8)),
        musco.Rule(match="linear", decomposition=musco.Decompose("asvd"),
                   rank=musco.RankRule("fixed", rank=8)),
    ], layers_per_step=2)
    batches = _batches(3)
    compressor = musco.Compressor(_model(), spec, torch.randn(2, 16), calibration=batches)
    assert [[n for _, n in s] for s in compressor.plan.steps] == [["0", "2"], ["4"]]
    compressor.step()
    assert updates == [("0", 0), ("0", 1), ("0", 2)]
    assert results == [60]
    compressor.step()
    assert updates[3:] == [("4", 0), ("4", 1), ("4", 2)]
    assert results == [60, 60]
    assert [r.decomposition for s in compressor.reports for r in s.layers] == ["asvd", "svd", "asvd"]


class _Typo(ASVD):
    name = "asvd_typo"
    summary = "asvd whose needs() misspells its statistic"

    def needs(self, params):
        return frozenset({"input_abs_mea"})


class _TypoPlugin:
    @musco.hookimpl
    def musco_add_decompositions(self, register):
        register(_Typo())


def test_unknown_statistic_is_a_spec_error_before_anything_changes():
    registry = musco.Registry()
    registry.register_plugin(_TypoPlugin())
    model = _model()
    before = copy.deepcopy(model.state_dict())
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="asvd_typo",
                                        rank=musco.RankRule("fixed", rank=4))])
    with pytest.raises(musco.SpecError) as info:
        musco.Compressor(model, spec, torch.randn(2, 16), calibration=_batches(),
                         inplace=True, registry=registry)
    message = str(info.value)
    assert "unknown statistic 'input_abs_mea'" in message
    assert "did you mean 'input_abs_mean'?" in message
    assert "@ $.rules[0].decomposition" in message
    assert all(type(m) is not SVDLinear for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
