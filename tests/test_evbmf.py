"""EVBMF (musco_std.vbmf): planted-rank recovery, pure noise, and a paper-transcription cross-check.

Everything is float64. Planted matrices are ``Y = U diag(d) V^T + sigma N`` with
orthonormal ``U``, ``V`` and a standard Gaussian ``N``.

Recovery condition tested: every planted singular value ``d_h >= 3 sigma (sqrt(m) + sqrt(n))``,
with ``r <= min(m, n) / 4`` and ``min(m, n) >= 16``. Why 3: the largest singular
value of the noise is about ``sigma (sqrt(m) + sqrt(n))`` (Marchenko-Pastur edge),
and the EVB threshold is ``sigma sqrt(M x_bar)`` with ``x_bar <= 4.911``, i.e. at most
``2.22 sigma sqrt(M) <= 2.22 sigma (sqrt(m) + sqrt(n))``; a signal at 3x the noise
edge clears it by more than 35% after the noise spreads it and after the error of
the estimated noise variance. Pure noise is tested on ``min(m, n) >= 32``, where
the top noise singular value stays below the threshold (the margin is 8-10%; at
``min(m, n) < 16`` finite-size fluctuations cross it in about 0.5% of draws).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from musco_std.vbmf import (
    NOISE_FLOOR,
    evb_x_bar,
    evbmf,
    evbmf_rank,
    squared_singular_values,
    weaken,
)

seeds = st.integers(0, 2**32 - 1)


def planted(m: int, n: int, d: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = len(d)
    u = np.linalg.qr(rng.standard_normal((m, m)))[0][:, :r]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0][:, :r]
    return (u * d) @ v.T + sigma * rng.standard_normal((m, n))


@st.composite
def well_separated(draw):
    m = draw(st.integers(16, 80))
    n = draw(st.integers(16, 80))
    r = draw(st.integers(0, min(m, n) // 4))
    sigma = 10 ** draw(st.floats(-3, 1))
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    d = np.array(draw(st.lists(st.floats(3.0, 30.0), min_size=r, max_size=r))) * edge
    return planted(m, n, np.sort(d)[::-1], sigma, draw(seeds)), r


@given(well_separated())
def test_recovers_the_planted_rank_above_the_noise(case):
    y, r = case
    assert evbmf_rank(torch.from_numpy(y)) == r


@given(st.integers(32, 96), st.integers(32, 96), st.floats(-3, 3), seeds)
def test_pure_noise_has_rank_zero(m, n, log_sigma, seed):
    y = 10**log_sigma * np.random.default_rng(seed).standard_normal((m, n))
    result = evbmf(torch.from_numpy(y))
    assert result.rank == 0
    # The noise variance is estimated well (it is the mean square entry here).
    assert result.sigma2 == pytest.approx(10 ** (2 * log_sigma), rel=0.25)


@given(st.integers(1, 40), st.integers(1, 40), st.floats(-2, 2), seeds)
def test_rank_never_exceeds_the_evb_bound(m, n, log_scale, seed):
    rng = np.random.default_rng(seed)
    y = 10**log_scale * rng.standard_normal((m, n)) * rng.uniform(0, 5, size=(m, 1))
    rank = evbmf_rank(torch.from_numpy(y))
    L, M = min(m, n), max(m, n)
    assert 0 <= rank <= min(m, n)
    assert rank <= max(math.ceil(L / (1 + L / M)) - 1, 0)


@given(st.integers(2, 30), st.integers(2, 30), st.floats(0.1, 10), seeds)
def test_invariant_to_transpose_and_scale(m, n, scale, seed):
    y = torch.from_numpy(planted(m, n, np.array([5.0, 2.0])[: min(m, n) - 1], 0.3, seed))
    base = evbmf(y)
    assert evbmf(y.T).rank == base.rank
    scaled = evbmf(scale * y)
    assert scaled.rank == base.rank
    assert scaled.sigma2 == pytest.approx(scale**2 * base.sigma2, rel=1e-5)


@given(st.integers(2, 30), st.integers(2, 30), seeds)
def test_singular_values_give_the_same_answer_as_the_matrix(m, n, seed):
    y = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, n)))
    s = torch.linalg.svdvals(y)
    a, b = evbmf(y), evbmf(s.flip(0), shape=(m, n))  # order does not matter
    assert a.rank == b.rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6)


@given(st.integers(1, 60), st.integers(1, 60), seeds)
def test_squared_singular_values_match_svdvals(m, n, seed):
    y = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, n)))
    expected = torch.linalg.svdvals(y).numpy() ** 2
    got = squared_singular_values(y)
    assert got.shape == (min(m, n),)
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * expected[0])


def test_exact_low_rank_and_zero_matrices():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(40, 5, dtype=torch.float64, generator=g) @ torch.randn(
        5, 60, dtype=torch.float64, generator=g)
    result = evbmf(y)
    assert result.rank == 5
    assert result.sigma2 >= NOISE_FLOOR * float((y**2).mean()) * 0.999
    assert evbmf(y.float()).rank == 5  # float32 rounding noise stays under the floor
    assert evbmf(torch.zeros(3, 7)) .rank == 0
    assert evbmf_rank(torch.ones(1, 1)) == 0  # H = ceil(1/2) - 1 = 0: nothing can be kept


def test_bad_input_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="shape=\\(m, n\\)"):
        evbmf(torch.ones(3))
    with pytest.raises(ValueError, match="expected min\\(shape\\) = 3"):
        evbmf(torch.ones(2), shape=(3, 4))
    with pytest.raises(ValueError, match="3-D"):
        evbmf(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="empty"):
        evbmf(torch.ones(0, 3))


def test_threshold_constant():
    # alpha = 1: tau_bar solves log(1 + t) / t = 1/2, t = 2.5129 (Nakajima et al. 2013).
    assert evb_x_bar(1.0) == pytest.approx((1 + 2.5129) * (1 + 1 / 2.5129), rel=1e-4)
    values = [evb_x_bar(a) for a in (0.01, 0.1, 0.5, 1.0)]
    assert values == sorted(values) and values[0] > 1


@given(st.integers(1, 500), st.data(), st.floats(0, 1))
def test_weaken(full, data, w):
    r = data.draw(st.integers(0, full))
    got = weaken(full, r, w)
    assert max(1, r) <= got <= full or (r == 0 and got == 1)
    assert weaken(full, r, 1.0) == max(1, r)
    assert weaken(full, r, 0.0) == full
    assert weaken(full, r, w) >= weaken(full, r, min(1.0, w + 0.1))


# -- cross-check against a direct transcription of the paper's formulas -------------------


def reference_evbmf(y: np.ndarray) -> tuple[int, float]:
    """EVBMF written straight from Nakajima et al. (2013, 2015): full SVD, x - log x form.

    ``tau_bar`` is found by bisection on ``Phi(t) + Phi(t / alpha)``; the free energy
    ``sum_h (x_h - log x_h) + sum_{x_h > x_bar} psi1(x_h)`` is minimized over sigma2
    in the bounds of Theorem 3 with scipy's bounded Brent search.
    """
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    _, s, _ = np.linalg.svd(y, full_matrices=True)
    alpha = L / M

    def phi(z):
        return np.log(1 + z) / z - 0.5

    lo, hi = 1e-9, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if phi(mid) + phi(mid / alpha) > 0:
            lo = mid
        else:
            hi = mid
    tau_bar = 0.5 * (lo + hi)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)

    def tau(x):
        return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))

    def free_energy(sigma2):
        x = s**2 / (M * sigma2)
        out = np.sum(x - np.log(x))
        for xh in x[x > x_bar]:
            t = tau(xh)
            out += np.log(t + 1) + alpha * np.log(t / alpha + 1) - t
        return out

    H = math.ceil(L / (1 + alpha)) - 1
    upper = np.sum(s**2) / (L * M)
    lower = max(s[H] ** 2 / (M * x_bar), np.mean(s[H:] ** 2) / M)
    res = minimize_scalar(lambda v: free_energy(v * lower), bounds=(1.0, upper / lower),
                          method="bounded", options={"xatol": 1e-8})
    sigma2 = res.x * lower
    return int(np.sum(s > np.sqrt(M * sigma2 * x_bar))), float(sigma2)


@given(st.integers(2, 40), st.integers(2, 40), st.data(), seeds)
def test_matches_the_reference_implementation(m, n, data, seed):
    r = data.draw(st.integers(0, min(m, n) - 1))
    sigma = 10 ** data.draw(st.floats(-2, 1))
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    # Signals from well below to well above the threshold, so both sides are exercised.
    d = edge * np.array(data.draw(st.lists(st.floats(0.2, 5.0), min_size=r, max_size=r)))
    y = planted(m, n, np.sort(d)[::-1], sigma, seed)
    want_rank, want_sigma2 = reference_evbmf(y)
    got = evbmf(torch.from_numpy(y))
    assert got.rank == want_rank
    assert got.sigma2 == pytest.approx(want_sigma2, rel=1e-5)
