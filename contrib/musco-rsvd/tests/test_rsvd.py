"""musco-rsvd: found through its entry point, accurate on planted data, usable from a spec."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import musco_core as musco
from musco_rsvd import RandomizedSVD, RSVDParams
from musco_std.svd import SVDLinear

rsvd = RandomizedSVD()


def test_registered_through_the_entry_point():
    table = musco.available()
    rows = {r["name"]: r for r in table["decompositions"]}
    assert rows["rsvd"]["distribution"] == "musco-rsvd"
    assert "min_params" in {r["name"] for r in table["matchers"]}


@settings(max_examples=25, deadline=None)
@given(m=st.integers(4, 40), n=st.integers(4, 40), seed=st.integers(0, 2**16), data=st.data())
def test_planted_low_rank_is_recovered(m, n, seed, data):
    rank = data.draw(st.integers(1, min(m, n) - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, rank, dtype=torch.float64, generator=g) @ torch.randn(
        rank, n, dtype=torch.float64, generator=g)
    approx = rsvd.reconstruct(rsvd.decompose(w, rank, RSVDParams()))
    assert torch.linalg.norm(w - approx) <= 1e-8 * torch.linalg.norm(w)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 20))
def test_error_is_near_the_optimum_and_never_below(seed, rank):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(60, 50, dtype=torch.float64, generator=g)
    approx = rsvd.reconstruct(rsvd.decompose(w, rank, RSVDParams(n_iter=4)))
    optimum = torch.linalg.norm(torch.linalg.svdvals(w)[rank:])
    error = torch.linalg.norm(w - approx)
    assert optimum - 1e-9 <= error <= 1.1 * optimum


def test_deterministic_for_a_seed():
    w = torch.randn(30, 20, dtype=torch.float64)
    a = rsvd.reconstruct(rsvd.decompose(w, 5, RSVDParams(seed=3)))
    b = rsvd.reconstruct(rsvd.decompose(w, 5, RSVDParams(seed=3)))
    assert torch.equal(a, b)


def test_from_a_spec_with_the_min_params_matcher():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = musco.Spec.from_toml("""
[[rules]]
match = [{ name = "min_params", min = 1000 }]
decomposition = { name = "rsvd", n_iter = 3 }
rank = { name = "param_reduction", rate = 4.0 }
""")
    compressor = musco.Compressor(model, spec, torch.randn(2, 64))
    assert compressor.plan.layers == ("0",)
    report = compressor.step()
    assert isinstance(compressor.model[0], SVDLinear)
    assert report.layers[0].params_after * 4 <= report.layers[0].params_before


def test_bad_params_are_spec_errors():
    spec = musco.Spec(rules=[musco.Rule(match="linear", decomposition=musco.Decompose("rsvd", n_iter=-1),
                                        rank=musco.RankRule("fixed", rank=2))])
    try:
        spec.validate()
    except musco.SpecError as exc:
        assert "'n_iter' must be an int >= 0, got -1 @ $.rules[0].decomposition" in str(exc)
    else:
        raise AssertionError("expected a SpecError")
