"""First-party rank rules (fixed, param_reduction, flop_reduction, vbmf, energy) and the rank-rule kit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import musco_core as musco
import musco_std.plugin
from musco_core import Decomposition, RankRule, Rule, Spec, SpecError
from musco_core.limits import RankLimits
from musco_core.spec import structure_params
from musco_core.stats import param_count
from musco_core.testing.rank_rules import (
    check_rank_rule,
    compare_rank_rules,
    layer_for,
    planted_weight,
)
from musco_std.rank_rules import (
    RANK_RULES,
    VBMF,
    Energy,
    EnergyParams,
    Fixed,
    FlopReduction,
    FlopReductionParams,
    ParamReduction,
    ParamReductionParams,
    VBMFParams,
    energy_rank,
)
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2
from musco_std.vbmf import evbmf_rank, weaken

DOC = Path(__file__).resolve().parents[1] / "docs" / "rank-rules.md"
svd = SVD()
seeds = st.integers(0, 2**32 - 1)


class TupleStub(Decomposition):
    """A Tucker-2-like decomposition for tests: rank ``(r_in, r_out)`` of a kxk conv."""

    name = "tuple_stub"
    summary = "test stub with tuple ranks"
    module_types = (nn.Conv2d,)

    def full_rank(self, module):
        return module.in_channels, module.out_channels

    def param_count(self, module, rank):
        r_in, r_out = rank
        k = module.kernel_size[0] * module.kernel_size[1]
        return module.in_channels * r_in + k * r_in * r_out + r_out * module.out_channels

    def flop_count(self, module, rank, stats):
        return 2 * stats.positions * self.param_count(module, rank) * stats.calls

    def rank_matrices(self, module):
        w = module.weight.detach()
        mode1 = w.transpose(0, 1).reshape(module.in_channels, -1)  # cin x cout*kh*kw
        mode0 = w.reshape(module.out_channels, -1)  # cout x cin*kh*kw
        return [mode1, mode0]


stub = TupleStub()


def planted_module(module: nn.Module, rank: int, noise: float = 0.01, seed: int = 0) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(planted_weight(tuple(module.weight.shape), rank, noise, seed))
    return module


def linear_layer(n_in, n_out, rank=3, noise=0.01, seed=0, batch=4):
    module = planted_module(nn.Linear(n_in, n_out), rank, noise, seed)
    return layer_for("fc", module, (batch, n_in))


# -- parameters and their messages ---------------------------------------------------------


@pytest.mark.parametrize(
    "cls, params, message",
    [
        (VBMFParams, {"weakening": 1.5}, r"'weakening' must be a number in \[0, 1\].*got 1.5"),
        (VBMFParams, {"weakening": True}, r"'weakening' must be a number"),
        (VBMFParams, {"weakenings": {"fc": -0.1}}, r"weakenings\['fc'\] must be a number in \[0, 1\]"),
        (VBMFParams, {"weakenings": ["fc"]}, r"'weakenings' must be a mapping of layer name"),
        (VBMFParams, {"weakenings": {3: 0.5}}, r"'weakenings' keys must be layer names"),
        (EnergyParams, {"fraction": 0.0}, r"'fraction' must be a number in \(0, 1\].*got 0.0"),
        (EnergyParams, {"fraction": float("nan")}, r"'fraction' must be a number in \(0, 1\]"),
        (EnergyParams, {"fractions": {"fc": 2}}, r"fractions\['fc'\] must be a number in \(0, 1\]"),
        (FlopReductionParams, {"rate": 1.0}, r"'rate' must be a number > 1, got 1.0"),
        (FlopReductionParams, {"rates": {"fc": 0.5}}, r"rates\['fc'\] must be a number > 1"),
        (ParamReductionParams, {"rate": "2"}, r"'rate' must be a number > 1"),
    ],
)
def test_bad_params_name_the_field_the_value_and_what_is_valid(cls, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cls(**params)


def test_params_errors_carry_the_spec_path():
    spec = Spec(rules=[Rule(match=["linear"], decomposition="svd",
                            rank=RankRule("vbmf", weakening=2.0))])
    with pytest.raises(SpecError, match=r"'weakening' must be .* @ \$\.rules\[0\]\.rank"):
        spec.validate()
    spec = Spec(rules=[Rule(match=["linear"], decomposition="svd",
                            rank=RankRule("energy", fractoin=0.9))])
    with pytest.raises(SpecError, match="fractoin"):
        spec.validate()


@pytest.mark.parametrize(
    "rank",
    [RankRule("vbmf", weakenings={"nope": 0.5}), RankRule("energy", fractions={"nope": 0.5}),
     RankRule("flop_reduction", rates={"nope": 3.0}),
     RankRule("param_reduction", rates={"nope": 3.0})],
)
def test_per_layer_mappings_must_name_matched_layers(tiny_resnet, example_inputs, rank):
    spec = Spec(rules=[Rule(match=["linear"], decomposition="svd", rank=rank)])
    with pytest.raises(SpecError) as info:
        musco.Compressor(tiny_resnet, spec, example_inputs=example_inputs)
    text = str(info.value)
    assert "layer 'nope' is not matched by this rule; matched layers: classifier, fc" in text
    assert "$.rules[0].rank" in text


# -- param_reduction / flop_reduction: the target holds and is tight ----------------------

dims = st.integers(2, 64)
rates = st.floats(1.01, 20.0)
round_tos = st.sampled_from([None, 2, 4, 8])


@given(dims, dims, rates, round_tos, st.booleans())
def test_param_reduction_meets_the_target_and_is_tight(n_in, n_out, rate, round_to, bias):
    module = nn.Linear(n_in, n_out, bias=bias)
    layer = layer_for("fc", module, (2, n_in))
    budget = param_count(module) / rate
    rank = ParamReduction().select(layer, svd, ParamReductionParams(rate=rate))
    full = svd.full_rank(module)
    if rank is None:
        assert svd.param_count(module, 1) > budget
        return
    assert svd.param_count(module, rank) <= budget
    assert rank == full or svd.param_count(module, rank + 1) > budget
    limited = RankLimits(round_to=round_to).apply(rank, full, ParamReduction.rounding)
    step = round_to or 1
    if limited > step:  # not clamped up to round_to itself
        assert svd.param_count(module, limited) <= budget
    if limited + step <= full:
        assert svd.param_count(module, limited + step) > budget


@given(dims, dims, st.integers(1, 6), rates, round_tos, st.integers(1, 3))
def test_flop_reduction_meets_the_target_and_is_tight(n_in, n_out, size, rate, round_to, batch):
    module = nn.Conv2d(n_in, n_out, 1, bias=False)
    layer = layer_for("conv", module, (batch, n_in, size, size))
    budget = layer.stats.flops / rate
    rank = FlopReduction().select(layer, svd, FlopReductionParams(rate=rate))
    full = svd.full_rank(module)
    if rank is None:
        assert svd.flop_count(module, 1, layer.stats) > budget
        return
    assert svd.flop_count(module, rank, layer.stats) <= budget
    assert rank == full or svd.flop_count(module, rank + 1, layer.stats) > budget
    limited = RankLimits(round_to=round_to).apply(rank, full, FlopReduction.rounding)
    step = round_to or 1
    if limited > step:
        assert svd.flop_count(module, limited, layer.stats) <= budget
    if limited + step <= full:
        assert svd.flop_count(module, limited + step, layer.stats) > budget


def test_flop_count_of_svd_matches_what_the_engine_measures():
    # flop_reduction compares decomposition.flop_count with layer.stats.flops, so they
    # must count the same way: compress at the chosen rank and measure.
    module = nn.Conv2d(32, 48, 1)
    layer = layer_for("conv", module, (2, 32, 5, 5))
    rank = FlopReduction().select(layer, svd, FlopReductionParams(rate=3.0))
    new, _ = svd.compress(module, rank, None)
    measured = layer_for("conv", new, (2, 32, 5, 5)).stats.flops
    assert measured == svd.flop_count(module, rank, layer.stats)
    assert measured * 3.0 <= layer.stats.flops


@given(st.integers(2, 12), st.integers(2, 12), rates)
def test_reduction_rules_with_tuple_ranks_meet_the_target(cin, cout, rate):
    module = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    layer = layer_for("conv", module, (1, cin, 5, 5))
    pr = ParamReduction().select(layer, stub, ParamReductionParams(rate=rate))
    fr = FlopReduction().select(layer, stub, FlopReductionParams(rate=rate))
    if pr is not None:
        assert isinstance(pr, tuple) and stub.validate_rank(module, pr) is None
        assert stub.param_count(module, pr) <= param_count(module) / rate
    if fr is not None:
        assert stub.validate_rank(module, fr) is None
        assert stub.flop_count(module, fr, layer.stats) <= layer.stats.flops / rate


def test_per_layer_rates_and_none():
    layer = linear_layer(32, 32)
    params = FlopReductionParams(rate=2.0, rates={"fc": 8.0})
    assert FlopReduction().select(layer, svd, params) == \
        FlopReduction().select(layer, svd, FlopReductionParams(rate=8.0))
    assert FlopReduction().select(layer, svd, FlopReductionParams(rates={"fc": None})) is None


# -- energy ---------------------------------------------------------------------------------


@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.01, 1.0), seeds)
def test_energy_keeps_the_fraction_and_no_smaller_rank_does(m, n, fraction, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n)) * rng.uniform(0, 3, size=(1, n)) ** 3
    module = nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))
    layer = layer_for("fc", module, (1, n))
    rank = Energy().select(layer, svd, EnergyParams(fraction=fraction))
    s2 = torch.linalg.svdvals(torch.from_numpy(w)).numpy() ** 2
    total, tol = s2.sum(), 1e-9 * s2.sum()
    assert 1 <= rank <= min(m, n)
    assert s2[:rank].sum() >= fraction * total - tol
    assert rank == 1 or s2[: rank - 1].sum() < fraction * total + tol
    for round_to in (2, 4, 8):  # rounding "up" keeps the promise
        limited = RankLimits(round_to=round_to).apply(rank, min(m, n), Energy.rounding)
        assert s2[:limited].sum() >= fraction * total - tol


def test_energy_rank_edge_cases():
    assert energy_rank(np.array([4.0, 1.0, 0.0]), 0.8) == 1
    assert energy_rank(np.array([4.0, 1.0, 0.0]), 0.81) == 2
    assert energy_rank(np.array([4.0, 1.0, 0.0]), 1.0) == 2
    assert energy_rank(np.zeros(3), 0.5) == 1


def test_energy_gives_a_tuple_for_tuple_decompositions():
    module = planted_module(nn.Conv2d(12, 20, 3), rank=3, noise=1e-4)
    layer = layer_for("conv", module, (1, 12, 6, 6))
    rank = Energy().select(layer, stub, EnergyParams(fraction=0.999))
    assert isinstance(rank, tuple) and len(rank) == 2
    assert rank[1] <= 3  # mode-0 unfolding is planted rank 3
    assert stub.validate_rank(module, rank) is None


# -- vbmf -----------------------------------------------------------------------------------


@given(st.integers(16, 64), st.integers(16, 64), st.integers(1, 4), st.floats(0, 1), seeds)
def test_vbmf_is_the_weakened_evbmf_rank(n_in, n_out, planted, w, seed):
    layer = linear_layer(n_in, n_out, rank=planted, noise=0.01, seed=seed % 1000)
    rank = VBMF().select(layer, svd, VBMFParams(weakening=w))
    full = min(n_in, n_out)
    r = evbmf_rank(layer.module.weight)
    # EVBMF finds the planted rank, or one more at this noise on the smallest shapes
    # (e.g. 25x16, rank 1, seed 25 gives 2); exact recovery is tests/test_evbmf.py's.
    assert planted <= r <= planted + 1
    assert rank == weaken(full, r, w) == max(1, int(full - w * (full - r)))
    assert r <= rank <= full


def test_vbmf_tuple_ranks_come_from_the_two_unfoldings():
    g = torch.Generator().manual_seed(0)
    # W[o, i, k] = sum over a rank-(3 in, 5 out) core: mode-1 rank 3, mode-0 rank 5.
    core = torch.randn(5, 3, 9, generator=g, dtype=torch.float64)
    u_out = torch.randn(40, 5, generator=g, dtype=torch.float64)
    u_in = torch.randn(32, 3, generator=g, dtype=torch.float64)
    w = torch.einsum("oik,Oo,Ii->OIk", core, u_out, u_in).reshape(40, 32, 3, 3)
    w = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    module = nn.Conv2d(32, 40, 3, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(w)
    layer = layer_for("conv", module, (1, 32, 5, 5))
    assert VBMF().select(layer, stub, VBMFParams(weakening=1.0)) == (3, 5)
    assert VBMF().select(layer, stub, VBMFParams(weakening=0.5)) == (
        int(32 - 0.5 * 29), int(40 - 0.5 * 35))


def test_vbmf_of_pure_noise_gives_at_least_one_and_none_skips():
    layer = linear_layer(64, 64, rank=1, noise=0.0)
    with torch.no_grad():
        layer.module.weight.copy_(torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    assert evbmf_rank(layer.module.weight) == 0
    assert VBMF().select(layer, svd, VBMFParams(weakening=1.0)) == 1
    assert VBMF().select(layer, svd, VBMFParams(weakening=0.5)) == 32
    assert VBMF().select(layer, svd, VBMFParams(weakenings={"fc": None})) is None
    assert VBMF().select(layer, svd, VBMFParams(weakening=0.1, weakenings={"fc": 1.0})) == 1


def test_spectral_rules_refuse_decompositions_without_rank_matrices():
    class NoMatrices(TupleStub):
        name = "no_matrices"

        def rank_matrices(self, module):
            return Decomposition.rank_matrices(self, module)

    layer = layer_for("conv", nn.Conv2d(4, 4, 3), (1, 4, 5, 5))
    for rule, params in ((VBMF(), VBMFParams()), (Energy(), EnergyParams())):
        with pytest.raises(ValueError, match=r"^layer 'conv': decomposition 'no_matrices' "
                                             r"does not provide rank_matrices"):
            rule.select(layer, NoMatrices(), params)


# -- the conformance kit --------------------------------------------------------------------


def _decompositions():
    """svd, the tuple stub, and whatever else is importable from musco_std."""
    decs = [SVD(), TupleStub()]
    try:
        from musco_std.tucker2 import Tucker2

        decs.append(Tucker2())
    except ImportError:  # pragma: no cover - written concurrently
        pass
    try:
        from musco_std.cp import CP3, CP4

        decs += [CP3(), CP4()]
    except ImportError:  # pragma: no cover
        pass
    return decs


@pytest.mark.parametrize("rule", RANK_RULES, ids=lambda r: r.name)
def test_first_party_rules_conform(rule):
    decs = _decompositions()
    if isinstance(rule, Fixed):
        ints = [d for d in decs if isinstance(d.full_rank(nn.Conv2d(8, 12, 3)), int)
                or d.name == "svd"]
        check_rank_rule(rule, {"rank": 2}, [d for d in ints if d.name != "tuple_stub"])
        check_rank_rule(rule, {"rank": [2, 3]}, [stub])
        return
    chosen = check_rank_rule(rule, None, decs)
    assert chosen[("svd", "layer0")] is not None
    assert isinstance(chosen[("tuple_stub", "layer2")], tuple)
    check_rank_rule(rule)  # the decompositions of the default registry


def test_kit_accepts_params_instances():
    check_rank_rule(VBMF(), VBMFParams(weakening=1.0), [svd])


@attrs.frozen
class _NoParams:
    pass


class _Broken(musco.RankSelector):
    name = "broken"
    summary = "for tests"
    Params = _NoParams


class TooLarge(_Broken):
    def select(self, layer, decomposition, params):
        full = decomposition.full_rank(layer.module)
        return full + 1 if isinstance(full, int) else tuple(f + 1 for f in full)


class Random(_Broken):
    def select(self, layer, decomposition, params):
        return int(torch.randint(1, 3, ()))


class Mutating(_Broken):
    def select(self, layer, decomposition, params):
        with torch.no_grad():
            layer.module.weight.mul_(0.5)
        return 1


class BadError(_Broken):
    def select(self, layer, decomposition, params):
        raise ValueError("no")


class BadRounding(_Broken):
    rounding = "sideways"

    def select(self, layer, decomposition, params):
        return 1


@pytest.mark.parametrize(
    "rule, message",
    [(TooLarge(), r"invalid rank 17: rank 17 is outside 1\.\.16"),
     (Random(), "not deterministic"),
     (Mutating(), "select\\(\\) changed 'weight'"),
     (BadError(), "ValueError must start with \"layer 'layer0'\""),
     (BadRounding(), "rounding must be one of")],
    ids=lambda x: type(x).__name__ if isinstance(x, musco.RankSelector) else "",
)
def test_kit_catches_broken_rules(rule, message):
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match=message):
        for _ in range(5):  # Random may agree with itself by chance
            check_rank_rule(rule, None, [svd])


# -- end to end through the engine ----------------------------------------------------------


class _RulesPlugin:
    """Adds the new rules if musco_std.plugin does not register them (yet)."""

    def __init__(self, rules):
        self.rules = rules

    @musco.hookimpl
    def musco_add_rank_rules(self, register):
        for rule in self.rules:
            register(rule)


@pytest.fixture
def registry():
    reg = musco.Registry(autoload=False)
    reg.register_plugin(musco_std.plugin)
    have = set(reg.names("rank_rules"))
    missing = [r for r in (FlopReduction(), VBMF(), Energy()) if r.name not in have]
    if missing:
        reg.register_plugin(_RulesPlugin(missing))
    yield reg


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = planted_module(nn.Conv2d(32, 64, 1), rank=4, noise=0.01, seed=1)
        self.fc1 = planted_module(nn.Linear(64, 64), rank=6, noise=0.01, seed=2)
        self.fc2 = planted_module(nn.Linear(64, 48), rank=5, noise=0.01, seed=3)

    def forward(self, x):
        x = self.conv(x).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def planted_model():
    return Planted().eval()


X = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))


def test_vbmf_end_to_end(registry, planted_model):
    spec = Spec(rules=[Rule(match=["linear", "conv1x1"], decomposition="svd",
                            rank=RankRule("vbmf", weakening=1.0, round_to=8))])
    compressor = musco.Compressor(planted_model, spec, example_inputs=X, registry=registry)
    report = compressor.step()
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert ranks == {"conv": 8, "fc1": 8, "fc2": 8}  # 4, 6, 5 rounded up to 8
    assert all(layer.status == "compressed" and layer.rel_error < 0.05
               for layer in report.layers)


def test_vbmf_weakened_rank_that_would_not_shrink_is_skipped(registry, planted_model):
    # weakening 0.5: fc1 -> int(64 - 0.5 * 58) = 35 -> 40 with round_to=8 (rounding up);
    # 40 * (64 + 64) + 64 params >= 64 * 64 + 64: the engine skips it and says why.
    spec = Spec(rules=[Rule(match=["linear", "conv1x1"], decomposition="svd",
                            rank=RankRule("vbmf", weakening=0.5, round_to=8))])
    compressor = musco.Compressor(planted_model, spec, example_inputs=X, registry=registry)
    before = {k: v.clone() for k, v in compressor.model.state_dict().items()}
    report = compressor.step()
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["fc1"].status == "skipped" and by_name["fc1"].rank == 40
    assert "would not shrink it" in by_name["fc1"].reason
    assert torch.equal(compressor.model.fc1.weight, before["fc1.weight"])
    assert by_name["conv"].status == "skipped"  # int(32 - 0.5*28) = 18 -> 24 >= 32*64/96


def test_energy_and_flop_reduction_end_to_end(registry, planted_model):
    spec = Spec(rules=[
        Rule(match=["conv1x1"], decomposition="svd",
             rank=RankRule("flop_reduction", rate=4.0)),
        Rule(match=["linear"], decomposition="svd",
             rank=RankRule("energy", fraction=0.99, fractions={"fc2": None})),
    ])
    compressor = musco.Compressor(planted_model, spec, example_inputs=X, registry=registry)
    report = compressor.step()
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["conv"].status == "compressed"
    assert by_name["conv"].flops_after * 4.0 <= by_name["conv"].flops_before
    assert by_name["fc1"].rank == 6 and by_name["fc1"].rel_error <= math.sqrt(0.01)
    assert by_name["fc2"].status == "skipped"


def test_compare_rank_rules(registry, planted_model):
    table = compare_rank_rules(
        planted_model, X,
        [RankRule("vbmf", weakening=1.0), "energy", RankRule("energy", fraction=0.5)],
        registry=registry,
    )
    assert table.labels == ("vbmf", "energy", "energy#2")
    assert [table.rank(n, "vbmf") for n in ("conv", "fc1", "fc2")] == [4, 6, 5]
    text = str(table)
    assert text.splitlines()[0].split()[:2] == ["layer", "params"]
    assert text.splitlines()[-1].startswith("total")


def test_structure_params_accepts_lists_from_toml():
    params = structure_params({"weakening": 1, "weakenings": {"fc": 0}}, VBMFParams)
    assert params.weakening == 1 and params.weakenings == {"fc": 0}


# -- the documentation's code runs as written -----------------------------------------------


def test_rank_rules_doc_code_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "rank_rules_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert "stable_rank" in namespace["registry"].names("rank_rules")


def test_vbmf_compresses_factorized_layers_again_in_round_two():
    """Round 2 analyses the factorized layer's core, whose spectrum still shows the noise."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
    with torch.no_grad():
        planted = torch.randn(128, 8, generator=g) @ torch.randn(8, 64, generator=g)
        model[0].weight.copy_(planted + 0.05 * torch.randn(128, 64, generator=g))
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition="svd",
                                        rank=musco.RankRule("vbmf", weakening=0.5))],
                      rounds=2)
    compressor = musco.Compressor(model, spec, torch.randn(2, 64))
    first, second = compressor.step(), compressor.step()
    r1, r2 = first.layers[0], second.layers[0]
    assert r1.status == "compressed" and r2.status == "compressed", r2.reason
    assert 8 <= r2.rank < r1.rank


@pytest.mark.parametrize("make", [
    lambda: (SVD(), nn.Linear(40, 60), 12),
    lambda: (Tucker2(), nn.Conv2d(16, 24, 3), (6, 8)),
])
def test_rank_matrices_of_factorized_layers_keep_the_nonzero_spectrum(make):
    torch.manual_seed(0)
    decomposition, layer, rank = make()
    new, _ = decomposition.compress(layer, rank, decomposition.Params())
    dense = decomposition.weight(new).detach()
    unfoldings = [dense.reshape(dense.shape[0], -1)]
    if dense.dim() == 4:
        unfoldings = [dense.transpose(0, 1).reshape(dense.shape[1], -1)] + unfoldings
    for matrix, unfolding, r in zip(decomposition.rank_matrices(new), unfoldings,
                                    rank if isinstance(rank, tuple) else (rank,)):
        assert min(matrix.shape) == r
        expected = torch.linalg.svdvals(unfolding.double())[:r]
        assert torch.allclose(torch.linalg.svdvals(matrix.double()), expected, rtol=1e-4)


# -- low precision and the spectrum cache (issue 10 item 3, issue 11 item 7) -----------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule, params", [
    (VBMF(), VBMFParams(weakening=1.0)),
    (Energy(), EnergyParams(fraction=0.9)),
    (ParamReduction(), ParamReductionParams(rate=2.0)),
    (FlopReduction(), FlopReductionParams(rate=2.0)),
], ids=lambda v: getattr(v, "name", ""))
def test_rank_rules_accept_half_precision_layers(dtype, rule, params):
    """The spectrum of a half-precision layer is computed in float32/64: same rank as float32."""
    ref = linear_layer(48, 64, rank=5, noise=0.01)
    half = layer_for("fc", planted_module(nn.Linear(48, 64), 5, 0.01).to(dtype), (4, 48))
    expected = rule.select(ref, svd, params)
    assert rule.select(half, svd, params) == expected
    assert half.module.weight.dtype == dtype  # the layer itself is not converted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vbmf_on_a_factorized_half_precision_layer(dtype):
    """Round 2 of a half-precision model: the factorized layer's core is analysed in float32."""
    new, _ = svd.compress(planted_module(nn.Linear(40, 60), 6, 0.05), 20, svd.Params())
    layer = layer_for("fc", new.to(dtype), (4, 40))
    rank = VBMF().select(layer, svd, VBMFParams(weakening=1.0))
    assert 1 <= rank <= 20


def test_spectra_are_computed_once_per_unchanged_layer(monkeypatch):
    import musco_std.rank_rules as rr

    calls = []
    real = rr.squared_singular_values
    monkeypatch.setattr(rr, "squared_singular_values", lambda m: calls.append(1) or real(m))
    layer = linear_layer(32, 40, rank=4)
    first = VBMF().select(layer, svd, VBMFParams(weakening=1.0))
    assert Energy().select(layer, svd, EnergyParams(fraction=0.9)) >= 1
    assert VBMF().select(layer, svd, VBMFParams(weakening=1.0)) == first
    assert len(calls) == 1  # one spectrum served all three
    with torch.no_grad():  # an in-place change bumps the version counter: recomputed
        layer.module.weight.mul_(2.0)
    VBMF().select(layer, svd, VBMFParams(weakening=1.0))
    assert len(calls) == 2
    layer.module.weight = nn.Parameter(torch.randn(40, 32))  # a new tensor: recomputed
    VBMF().select(layer, svd, VBMFParams(weakening=1.0))
    assert len(calls) == 3
