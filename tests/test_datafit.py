"""Data-aware fitting (musco_std.datafit): whitened SVD against brute-force optima, float64."""

from __future__ import annotations

import functools
import math

import attrs
import pytest
import torch

from musco_core.calibration import LayerData
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from musco_std import datafit as df
from musco_core import relative_error
from musco_core.testing import anisotropic_inputs, check_data_aware, seeds
from musco_std.svd import SVD
from musco_std.tucker2 import Tucker2, Tucker2Params, tucker2_hooi, tucker2_reconstruct

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices: threads only cost time."""


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _shifted(x: torch.Tensor, seed: int, amount: float = 0.3) -> torch.Tensor:
    """``x`` as an upstream change leaves it: mixed by a near-identity matrix, plus noise."""
    n, d = x.shape
    return x @ (torch.eye(d, dtype=F64) + amount * _randn(d, d, seed=seed) / math.sqrt(d)) \
        + 0.05 * _randn(n, d, seed=seed + 1)


def _err(w, approx, x, x_cur) -> float:
    """Relative output error from the rows: |X W^T - X' W'^T| / |X W^T|."""
    ref = x @ w.T
    return float(torch.linalg.norm(ref - x_cur @ approx.T) / torch.linalg.norm(ref))


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Max-abs comparison (torch.testing.assert_close costs seconds on its first call)."""
    assert got.shape == want.shape
    diff = float((got - want).abs().max())
    assert diff <= atol, f"max |got - want| = {diff:.3g} > {atol:g}"


def _plain(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _brute_force(w, rank, x, x_cur) -> torch.Tensor:
    """The rank-r least-squares optimum without Grams, from the rows.

    With the thin SVD ``X' = U_k S_k V_k^T`` (``k`` its numerical rank; for a full column
    rank ``X'`` this is the QR route ``X' = QR``), the output ``X' W'^T = U_k S_k Z`` with
    ``Z = V_k^T W'^T`` of rank <= r, so the optimum is ``S_k Z = [U_k^T X W^T]_r``.
    """
    u, s, vh = torch.linalg.svd(x_cur, full_matrices=False)
    k = int((s > s[0] * 1e-12).sum())
    z = _plain(u[:, :k].T @ (x @ w.T), rank) / s[:k, None]
    return (vh[:k].T @ z).T


@st.composite
def problems(draw, *, allow_shift: bool = True):
    """(W, X, X', rank): W (out, in), X anisotropic rows (n >= in), X' = X or shifted."""
    seed = draw(seeds)
    d_in, d_out = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    n = d_in + draw(st.integers(0, 2 * d_in))
    rank = draw(st.integers(1, min(d_in, d_out)))
    condition = draw(st.sampled_from([1.0, 1e2, 1e4]))
    x = anisotropic_inputs(n, d_in, seed=seed, condition=condition)
    shifted = allow_shift and draw(st.booleans())
    x_cur = _shifted(x, seed + 1) if shifted else x
    return _randn(d_out, d_in, seed=seed + 2), x, x_cur, rank


def _stats(x, x_cur):
    return x_cur.T @ x_cur, x_cur.T @ x, x.T @ x


# -- whitened SVD -------------------------------------------------------------------------


@given(problems())
def test_whitened_svd_reaches_the_least_squares_optimum(problem):
    w, x, x_cur, rank = problem
    gram, cross, _ = _stats(x, x_cur)
    first, second = df.whitened_svd(w, gram, rank, cross=cross, damping=1e-13)
    assert first.shape == (rank, w.shape[1]) and second.shape == (w.shape[0], rank)
    assert first.dtype == second.dtype == F64
    e_white = _err(w, second @ first, x, x_cur)
    e_best = _err(w, _brute_force(w, rank, x, x_cur), x, x_cur)
    e_plain = _err(w, _plain(w, rank), x, x_cur)
    assert abs(e_white - e_best) <= 1e-6
    assert e_white <= e_plain + 1e-9


@given(problems(allow_shift=False))
def test_whitened_svd_at_full_rank_is_exact(problem):
    w, x, _, _ = problem
    gram = x.T @ x
    first, second = df.whitened_svd(w, gram, min(w.shape))
    assert _err(w, second @ first, x, x) <= 1e-9
    assert df.output_error(w, second @ first, gram) <= 1e-9


@given(problems())
def test_tail_of_whitened_spectrum_is_the_excess_objective(problem):
    """sum_{i>r} sigma_i^2 = J(W'_r) - J(W*), J(W') = |X W^T - X' W'^T|^2 + lambda |W' - W|^2."""
    w, x, x_cur, rank = problem
    gram, cross, _ = _stats(x, x_cur)
    lam = df.damping_value(gram, 1e-6)

    def objective(approx):
        return float(torch.linalg.norm(x @ w.T - x_cur @ approx.T) ** 2
                     + lam * torch.linalg.norm(approx - w) ** 2)

    sigma = df.whitened_spectrum(w, gram, cross=cross)
    first, second = df.whitened_svd(w, gram, rank, cross=cross)
    excess = objective(second @ first) - objective(df.output_target(w, gram, cross))
    scale = float(torch.linalg.norm(x @ w.T) ** 2)
    assert sigma.shape == (min(w.shape),)
    assert abs(float((sigma[rank:] ** 2).sum()) - excess) <= 1e-9 * scale


DEGENERATE = {
    "fewer_rows_than_features": lambda: anisotropic_inputs(3, 8, seed=0),
    "duplicated_features": lambda: anisotropic_inputs(20, 4, seed=1).repeat(1, 2),
    "constant_rows": lambda: torch.linspace(-1, 2, 8, dtype=F64).expand(15, 8).clone(),
    "one_dead_feature": lambda: torch.cat([anisotropic_inputs(20, 7, seed=2),
                                           torch.zeros(20, 1, dtype=F64)], dim=1),
    "zero_inputs": lambda: torch.zeros(10, 8, dtype=F64),
    "tiny_scale": lambda: 1e-150 * anisotropic_inputs(20, 8, seed=3),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_rank_deficient_and_constant_inputs_do_not_blow_up(case):
    """Finite factors; J(whitened) <= J(plain), i.e. the output error exceeds plain SVD's by
    at most the damping term: e_w^2 <= e_p^2 + lambda |W_r - W|^2."""
    x = DEGENERATE[case]()
    w = _randn(6, 8, seed=4)
    gram = x.T @ x
    lam = df.damping_value(gram)
    ref2 = float(torch.linalg.norm(x @ w.T) ** 2)
    for rank in range(1, 7):
        first, second = df.whitened_svd(w, gram, rank)
        approx = second @ first
        assert torch.isfinite(approx).all()
        plain = _plain(w, rank)
        e_w2 = float(torch.linalg.norm(x @ (w - approx).T) ** 2)
        e_p2 = float(torch.linalg.norm(x @ (w - plain).T) ** 2)
        bound = e_p2 + lam * float(torch.linalg.norm(plain - w) ** 2)
        assert e_w2 <= bound + 1e-10 * (ref2 + lam * float(torch.linalg.norm(w) ** 2))
        assert math.isfinite(df.output_error(w, approx, gram))
        assert torch.isfinite(df.whitened_spectrum(w, gram)).all()


def test_zero_gram_gives_plain_svd():
    w = _randn(5, 7, seed=0)
    zero = torch.zeros(7, 7, dtype=F64)
    for rank in (1, 3, 5):
        first, second = df.whitened_svd(w, zero, rank)
        _assert_close(second @ first, _plain(w, rank), 1e-12)
    assert df.output_error(w, torch.zeros_like(w), zero) == 0.0


def test_constant_inputs_are_fitted_exactly_at_rank_one():
    x = torch.linspace(-1, 2, 8, dtype=F64).expand(15, 8).clone()
    w = _randn(6, 8, seed=5)
    first, second = df.whitened_svd(w, x.T @ x, 1)
    assert _err(w, second @ first, x, x) <= 1e-6
    assert _err(w, _plain(w, 1), x, x) > 0.1


# -- error-correcting target ----------------------------------------------------------------


def test_output_target_is_the_original_weight_when_nothing_shifted():
    x = anisotropic_inputs(30, 6, seed=0)
    w = _randn(4, 6, seed=1).to(torch.float32)
    gram = x.T @ x
    for cross in (None, gram, gram.clone()):
        target = df.output_target(w, gram, cross)
        assert target.dtype == F64 and torch.equal(target, w.to(F64))


@given(problems())
def test_output_target_is_least_squares(problem):
    w, x, x_cur, _ = problem
    gram, cross, _ = _stats(x, x_cur)
    target = df.output_target(w, gram, cross, damping=1e-13)
    lstsq = torch.linalg.lstsq(x_cur, x @ w.T).solution.T
    scale = float(torch.linalg.norm(x @ w.T))
    assert float(torch.linalg.norm(x_cur @ (target - lstsq).T)) <= 1e-6 * scale


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank2", [None, 3])
def test_error_correcting_fit_reproduces_the_original_output_better(seed, rank2):
    """Two linear layers; the first is truncated. Fitting the second to the ORIGINAL output
    from the shifted hidden rows (cross) beats fitting it to the shifted output."""
    x = anisotropic_inputs(200, 10, seed=seed, condition=1e3)
    w1, w2 = _randn(12, 10, seed=seed + 10), _randn(8, 12, seed=seed + 20)
    h, h_cur = x @ w1.T, x @ _plain(w1, 6).T  # hidden rows: original, after compressing w1
    y = h @ w2.T
    gram, cross, target = _stats(h, h_cur)
    if rank2 is None:  # full rank: closed form, against the least-squares solution
        corrected = df.output_target(w2, gram, cross, damping=1e-12)
        shifted_fit = df.output_target(w2, gram, None)
        best = torch.linalg.lstsq(h_cur, y).solution.T
        e_best = float(torch.linalg.norm(y - h_cur @ best.T) / torch.linalg.norm(y))
    else:
        first, second = df.whitened_svd(w2, gram, rank2, cross=cross, damping=1e-12)
        corrected = second @ first
        first, second = df.whitened_svd(w2, gram, rank2, damping=1e-12)
        shifted_fit = second @ first
        e_best = _err(w2, _brute_force(w2, rank2, h, h_cur), h, h_cur)
    e_corr = float(torch.linalg.norm(y - h_cur @ corrected.T) / torch.linalg.norm(y))
    e_shift = float(torch.linalg.norm(y - h_cur @ shifted_fit.T) / torch.linalg.norm(y))
    assert e_corr <= 0.9 * e_shift
    assert abs(e_corr - e_best) <= 1e-6
    assert df.output_error(w2, corrected, gram, cross, target) == pytest.approx(e_corr, rel=1e-6)


# -- output error from the statistics ------------------------------------------------------


@given(problems())
def test_output_error_matches_the_rows(problem):
    w, x, x_cur, rank = problem
    gram, cross, target = _stats(x, x_cur)
    approx = _plain(w, rank) + 0.01 * _randn(*w.shape, seed=rank)
    direct = _err(w, approx, x, x_cur)
    got = df.output_error(w, approx, gram, cross, target)
    assert got == pytest.approx(direct, rel=1e-6, abs=1e-7)
    assert df.output_error(w, w, gram) == 0.0


def test_output_error_of_a_conv_weight_sums_kernel_offsets():
    x = anisotropic_inputs(40, 5, seed=0)
    x_cur = _shifted(x, 1)
    w, approx = _randn(4, 5, 3, 2, seed=2), _randn(4, 5, 3, 2, seed=3)
    num = den = 0.0
    for i in range(3):
        for j in range(2):
            num += float(torch.linalg.norm(x @ w[:, :, i, j].T - x_cur @ approx[:, :, i, j].T) ** 2)
            den += float(torch.linalg.norm(x @ w[:, :, i, j].T) ** 2)
    got = df.output_error(w, approx, *_stats(x, x_cur))
    assert got == pytest.approx(math.sqrt(num / den), rel=1e-9)


# -- gram_root -----------------------------------------------------------------------------


@given(seeds, st.integers(1, 12), st.integers(1, 30))
def test_gram_root(seed, d, n):
    x = anisotropic_inputs(n, d, seed=seed, condition=1e4)
    gram = x.T @ x
    s, s_inv = df.gram_root(gram)
    lam = df.damping_value(gram)
    eye = torch.eye(d, dtype=F64)
    scale = float(torch.linalg.norm(gram)) + lam
    _assert_close(s, s.T, 1e-12 * scale)
    assert float(torch.linalg.norm(s @ s.T - gram - lam * eye)) <= 1e-10 * scale
    assert float(torch.linalg.norm(s @ s_inv - eye)) <= 1e-7


def test_gram_root_of_zero_and_bad_grams():
    s, s_inv = df.gram_root(torch.zeros(3, 3, dtype=F64), damping=1e-4)
    _assert_close(s, 1e-2 * torch.eye(3, dtype=F64), 1e-15)
    _assert_close(s_inv, 1e2 * torch.eye(3, dtype=F64), 1e-11)
    singular = torch.ones(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="damping > 0"):
        df.gram_root(singular, damping=0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        df.gram_root(torch.full((2, 2), math.nan, dtype=F64))
    with pytest.raises(ValueError, match="damping"):
        df.gram_root(singular, damping=-1.0)
    with pytest.raises(ValueError, match="rank must be"):
        df.whitened_svd(torch.ones(2, 3), singular, 3)
    with pytest.raises(ValueError, match="input features"):
        df.whitened_svd(torch.ones(2, 4), singular, 1)


# -- Tucker-2, input-channel mode ----------------------------------------------------------


def _hooi(**kw):
    return functools.partial(tucker2_hooi, **kw)


def test_whitened_tucker2_at_full_rank_is_the_per_offset_target():
    x = anisotropic_inputs(60, 6, seed=0)
    x_cur = _shifted(x, 1)
    gram, cross, target = _stats(x, x_cur)
    w = _randn(5, 6, 3, 3, seed=2)
    factors = df.whitened_tucker2(w, (6, 5), gram, fit=_hooi(), cross=cross)
    approx = tucker2_reconstruct(*factors)
    expected = torch.stack([df.output_target(w[:, :, i, j], gram, cross)
                            for i in range(3) for j in range(3)], -1).reshape(w.shape)
    _assert_close(approx, expected, 1e-9)
    unshifted = tucker2_reconstruct(*df.whitened_tucker2(w, (6, 5), gram, fit=_hooi()))
    _assert_close(unshifted, w, 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_whitened_tucker2_beats_plain_on_anisotropic_channels(seed):
    x = anisotropic_inputs(200, 12, seed=seed, condition=1e3)
    gram = x.T @ x
    w = _randn(10, 12, 3, 3, seed=seed + 5)
    for rank in [(2, 2), (4, 5), (8, 6)]:
        white = tucker2_reconstruct(*df.whitened_tucker2(w, rank, gram, fit=_hooi()))
        plain = tucker2_reconstruct(*tucker2_hooi(w, rank))
        assert df.output_error(w, white, gram) <= df.output_error(w, plain, gram)


def test_per_offset_objective_is_the_conv_error_for_1x1_and_for_uncorrelated_pixels():
    c_in, c_out = 6, 5
    rows = anisotropic_inputs(8 * 24 * 24, c_in, seed=0, condition=1e3)
    images = rows.reshape(8, 24, 24, c_in).permute(0, 3, 1, 2)
    gram = rows.T @ rows
    for k, rtol in [(1, 1e-9), (3, 0.05)]:  # 3x3: i.i.d. pixels, so cross-offset terms ~ 0
        w, approx = _randn(c_out, c_in, k, k, seed=1), _randn(c_out, c_in, k, k, seed=2)
        y = F.conv2d(images, w)
        conv_err = float(torch.linalg.norm(y - F.conv2d(images, approx)) / torch.linalg.norm(y))
        assert df.output_error(w, approx, gram) == pytest.approx(conv_err, rel=rtol)


# -- the conformance check -----------------------------------------------------------------


@attrs.frozen
class WhitenParams:
    whiten: bool = True


class WhitenedSVD(SVD):
    """SVD that fits the layer's output when given data (what the svd plugin's whiten does)."""

    Params = WhitenParams
    gram_of = staticmethod(lambda data: data.gram)

    def needs(self, params):
        return frozenset({"input_gram", "cross_moment"}) if params.whiten else frozenset()

    def compress(self, module, rank, params, data=None):
        if data is None or not params.whiten:
            return super().compress(module, rank, params)
        weight = self.weight(module).detach()
        first, second = df.whitened_svd(weight, self.gram_of(data), rank,
                                        cross=data.get("cross_moment"))
        first, second = first.to(weight.dtype), second.to(weight.dtype)
        return self.build(module, (first, second)), relative_error(weight, second @ first)


class AntiWhitenedSVD(WhitenedSVD):
    """Deliberately wrong: weights directions by the INVERSE Gram (so it must fail)."""

    gram_of = staticmethod(lambda data: torch.linalg.pinv(data.gram))

    def compress(self, module, rank, params, data=None):
        if data is not None:
            data = LayerData({"input_gram": data["input_gram"]}, rows=data.rows)
        return super().compress(module, rank, params, data)


@attrs.frozen
class WhitenTucker2Params(Tucker2Params):
    whiten: bool = True


class WhitenedTucker2(Tucker2):
    Params = WhitenTucker2Params

    def needs(self, params):
        return frozenset({"input_gram", "cross_moment"}) if params.whiten else frozenset()

    def compress(self, module, rank, params, data=None):
        if data is None or not params.whiten:
            return super().compress(module, rank, params)
        weight = self.weight(module).detach()
        fit = _hooi(n_iter_max=params.n_iter_max, tol=params.tol)
        factors = df.whitened_tucker2(weight, rank, data.gram, fit=fit, cross=data.cross)
        factors = tuple(f.to(weight.dtype) for f in factors)
        return self.build(module, factors), relative_error(weight, tucker2_reconstruct(*factors))


@pytest.mark.parametrize("shifted", [True, False])
def test_check_data_aware_passes_whitened_svd(shifted):
    check_data_aware(WhitenedSVD(), WhitenParams(True), WhitenParams(False), shifted=shifted)


def test_check_data_aware_passes_whitened_tucker2():
    check_data_aware(WhitenedTucker2(), WhitenTucker2Params(whiten=True),
                     WhitenTucker2Params(whiten=False))


def test_check_data_aware_catches_a_bad_fit():
    with pytest.raises(AssertionError, match="worse than plain"):
        check_data_aware(AntiWhitenedSVD(), WhitenParams(True), WhitenParams(False),
                         shifted=False)


def test_check_data_aware_wants_needs():
    with pytest.raises(AssertionError, match="needs"):
        check_data_aware(WhitenedSVD(), WhitenParams(False), WhitenParams(False))


def test_anisotropic_inputs_have_the_planted_condition():
    x = anisotropic_inputs(20000, 5, seed=0, condition=100.0)
    evals = torch.linalg.eigvalsh(x.T @ x / x.shape[0])
    assert float(evals[-1] / evals[0]) == pytest.approx(100.0, rel=0.15)
    assert torch.equal(x, anisotropic_inputs(20000, 5, seed=0, condition=100.0))


def test_an_explicit_cache_shares_one_whitened_svd_across_ranks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g, dtype=torch.float64)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    gram = x.T @ x
    calls = []
    real_svd = torch.linalg.svd

    def counting(*args, **kwargs):
        calls.append(1)
        return real_svd(*args, **kwargs)

    fresh = {r: df.whitened_svd(w, gram, r) for r in (2, 5)}
    monkeypatch.setattr(torch.linalg, "svd", counting)
    cache: dict = {}
    shared = {r: df.whitened_svd(w, gram, r, cache=cache) for r in (2, 5)}
    assert len(calls) == 1
    for r in (2, 5):
        for a, b in zip(shared[r], fresh[r]):
            assert torch.equal(a, b)
    df.whitened_svd(w, gram, 2)
    df.whitened_svd(w, gram, 2)
    assert len(calls) == 3  # without a cache nothing is reused: no module-global state


def test_svd_compress_ranks_fits_every_rank_from_one_svd_and_matches_compress(monkeypatch):
    from musco_core import default_registry

    svd = default_registry().get("decompositions", "svd").strategy
    params = svd.Params(whiten=True)
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(10, 12).double()
    x = torch.randn(60, 10, generator=g, dtype=torch.float64)
    data = LayerData({"input_gram": x.T @ x, "cross_moment": x.T @ x}, rows=60)
    one_by_one = [svd.compress(layer, r, params, data=data) for r in (2, 4, 6)]
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd",
                        lambda *a, **k: (calls.append(1), real_svd(*a, **k))[1])
    together = list(svd.compress_ranks(layer, [2, 4, 6], params, data=data))
    assert len(calls) == 1
    for (m1, e1), (m2, e2) in zip(one_by_one, together):
        assert e1 == pytest.approx(e2, rel=1e-12)
        torch.testing.assert_close(m1(x), m2(x))


def test_whitened_factors_are_balanced_so_fine_tuning_treats_them_alike():
    # A Gram summed over many rows (here 10^5 at unit scale) makes S^-1 tiny: unbalanced,
    # the input factor would be ~(10^5)^(1/4) = 18x smaller than the output factor.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 12, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 12, generator=g, dtype=torch.float64)
    gram = 50.0 * (x.T @ x)
    first, second = df.whitened_svd(w, gram, 5)
    a = torch.linalg.vector_norm(first, dim=1)
    b = torch.linalg.vector_norm(second, dim=0)
    assert torch.allclose(a, b, rtol=1e-10)
    u, s, vh, s_inv = df._whitened_factors(w, w, gram, None, df.DEFAULT_DAMPING)
    assert torch.allclose(second @ first, u[:, :5] @ torch.diag(s[:5]) @ vh[:5] @ s_inv)
    # tucker2: unit rows of the input factor, the product unchanged
    from musco_std.tucker2 import tucker2_hooi

    weight = torch.randn(8, 12, 3, 3, generator=g, dtype=torch.float64)
    first, core, last = df.whitened_tucker2(weight, (4, 5), gram, fit=tucker2_hooi)
    assert torch.allclose(torch.linalg.vector_norm(first, dim=1),
                          torch.ones(4, dtype=torch.float64))
    whitened, s_inv = df.whiten_input_mode(weight, gram)
    f0, c0, l0 = tucker2_hooi(whitened, (4, 5))
    from musco_std.tucker2 import tucker2_reconstruct

    assert torch.allclose(tucker2_reconstruct(first, core, last),
                          tucker2_reconstruct(df.unwhiten_first(f0, s_inv), c0, l0))
