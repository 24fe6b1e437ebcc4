"""Empirical variational Bayesian matrix factorization (EVBMF): a matrix's rank from its spectrum.

The global analytic solution of fully observed VBMF (Nakajima et al. 2013) keeps
the singular values above a threshold that depends only on the matrix shape and
the noise variance; the empirical variant also estimates the noise variance by
minimizing the free energy over it. Everything here needs only the singular
values, so a matrix is reduced to the eigenvalues of its small Gram matrix (no
singular vectors, no full SVD).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import attrs
import numpy as np
import torch

# scipy.optimize (about a third of a second to import) loads in the functions that use it,
# not when the plugins load: see tests/test_startup.py.


#: Smallest noise variance EVBMF considers, relative to the mean square entry of the matrix.
NOISE_FLOOR = 1e-10


@attrs.frozen
class EVBMFResult:
    """What EVBMF found for one matrix.

    ``rank``: number of singular values above ``threshold``; ``sigma2``: the
    estimated noise variance per entry; ``threshold``: the EVB truncation
    threshold ``sqrt(M * sigma2 * x_bar)`` on singular values.
    """

    rank: int
    sigma2: float
    threshold: float


@functools.lru_cache(maxsize=4096)
def evb_x_bar(alpha: float) -> float:
    """The EVB threshold constant ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``.

    ``tau_bar`` is the unique zero of the decreasing function
    ``Xi(tau) = Phi(tau) + Phi(tau / alpha)`` with ``Phi(z) = log(1 + z) / z - 1/2``
    (Nakajima et al. 2015). For ``alpha = 1`` it is 2.5129; the
    approximation ``tau_bar ~ 2.5129 sqrt(alpha)`` used by popular EVBMF code is
    within 3% of the threshold for ``alpha >= 0.004``.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")

    from scipy.optimize import brentq

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    tau_bar = brentq(lambda t: phi(t) + phi(t / alpha), 1e-12, 1e3, xtol=1e-14, rtol=1e-12)
    return (1.0 + tau_bar) * (1.0 + alpha / tau_bar)


def squared_singular_values(matrix: torch.Tensor) -> np.ndarray:
    """The squared singular values of a matrix: float64, descending, ``min(m, n)`` of them.

    Computed as the eigenvalues of the ``L x L`` Gram matrix (``L = min(m, n)``) in
    float64 with torch (``matmul`` and ``eigvalsh``, on the matrix's device, with
    torch's thread settings). No singular vectors are formed. Any float dtype is
    accepted: float16 and bfloat16 weights are upcast (the spectrum is never
    computed in half precision).

    Why torch and not NumPy/SciPy: on CPU torch's LAPACK (MKL) ran ``eigvalsh`` of a
    768 x 768 Gram matrix 6-15x faster than NumPy's bundled OpenBLAS on the machine
    where issue 11 measured EVBMF on a sentence encoder (0.29 s against 1.8-4.5 s at
    1 thread; see docs/benchmarks/rank_rules.py, encoder case), and it follows
    ``torch.set_num_threads``. Against :func:`torch.linalg.svdvals` the Gram path is
    3-50x faster on the wide unfoldings of conv weights (512 x 4608 in ResNet-50); the
    price is an absolute error of about ``L * 1e-16 * s_max^2`` in each value, far below
    the rounding noise of float32 weights (about ``1e-14 * s_max^2``) and below every
    threshold the rank rules use (see :data:`NOISE_FLOOR`).
    """
    if matrix.dim() != 2 or 0 in matrix.shape:
        raise ValueError(f"expected a non-empty matrix, got shape {tuple(matrix.shape)}")
    y = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the matrix has non-finite entries (nan or inf)")
    if y.shape[0] > y.shape[1]:
        y = y.T
    eig = torch.linalg.eigvalsh(y @ y.T).cpu().numpy()
    return np.ascontiguousarray(np.maximum(eig[::-1], 0.0))


def _spectrum(x: Any, shape: tuple[int, int] | None) -> tuple[np.ndarray, int, int]:
    """Squared singular values (float64, descending) and the matrix shape of ``x``."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() == 2:
        if shape is not None and tuple(shape) != tuple(t.shape):
            raise ValueError(f"shape {tuple(shape)} given for a matrix of shape {tuple(t.shape)}")
        m, n = t.shape
        return squared_singular_values(t), m, n
    if t.dim() == 1:
        if shape is None or len(shape) != 2:
            raise ValueError(
                "singular values were given without the matrix shape: pass shape=(m, n)"
            )
        m, n = int(shape[0]), int(shape[1])
        if t.numel() != min(m, n) or min(m, n) < 1:
            raise ValueError(
                f"expected min(shape) = {min(m, n)} singular values for shape {(m, n)}, "
                f"got {t.numel()}"
            )
        s = np.sort(np.abs(t.detach().to(torch.float64).cpu().numpy()))[::-1]
        if not np.all(np.isfinite(s)):
            raise ValueError("the singular values are not finite")
        return s * s, m, n
    raise ValueError(f"expected a matrix or a vector of singular values, got {t.dim()}-D input")


def _free_energy(sigma2: float, s2: np.ndarray, total: float, L: int, M: int,
                 alpha: float, x_bar: float) -> float:
    """EVB free energy as a function of the noise variance (constants in sigma2 dropped).

    With ``x_h = s_h^2 / (M sigma2)`` the free energy is, up to constants,
    ``sum_h (x_h - log x_h) + sum_{x_h > x_bar} psi1(x_h)`` with
    ``psi1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` and
    ``tau = tau(x; alpha) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``.
    Since ``sum_h -log x_h = L log sigma2 + const`` this is computed as
    ``|Y|^2 / (M sigma2) + L log sigma2 + sum psi1``, which stays finite when
    some singular values are exactly zero.
    """
    x = s2 / (M * sigma2)
    big = x[x > x_bar]
    value = total / (M * sigma2) + L * math.log(sigma2)
    if big.size:
        b = big - (1.0 + alpha)
        tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
        value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return value


def evbmf(x: Any, shape: tuple[int, int] | None = None) -> EVBMFResult:
    """Empirical VBMF of a fully observed matrix: rank, noise variance and threshold.

    Parameters
    ----------
    x : torch.Tensor or array
        A matrix ``Y`` (any float dtype, any device: its squared singular values
        are computed there in float64 by :func:`squared_singular_values`), or the
        vector of all ``min(m, n)`` singular values of ``Y`` together with
        ``shape=(m, n)``.
    shape : tuple of two ints, optional
        The matrix shape; required when ``x`` is a vector of singular values.

    Returns
    -------
    EVBMFResult
        ``rank`` is the number of singular values ``gamma_h`` above
        ``gamma_EVB = sqrt(M sigma2 x_bar)``, where ``L = min(m, n)``,
        ``M = max(m, n)``, ``alpha = L / M``, ``x_bar`` is :func:`evb_x_bar`
        and ``sigma2`` minimizes the free energy (see ``_free_energy``) by a
        bounded scalar search over

        ``max(gamma_{H+1}^2 / (M x_bar), mean_{h > H} gamma_h^2 / M) <= sigma2 <= |Y|_F^2 / (L M)``

        with ``H = ceil(L / (1 + alpha)) - 1`` the largest rank EVB can return
        (Nakajima et al. 2015). A zero matrix has rank 0; pure noise
        gives rank 0 with high probability.

    References
    ----------
    S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of
    fully-observed variational Bayesian matrix factorization", JMLR 14 (2013) 1-37.

    S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for perfect
    dimensionality recovery by variational Bayesian PCA", JMLR 16 (2015) 3757-3811.
    """
    s2, m, n = _spectrum(x, shape)
    return evbmf_from_squared(s2, (m, n))


def evbmf_from_squared(s2: np.ndarray, shape: tuple[int, int]) -> EVBMFResult:
    """:func:`evbmf` of a matrix of ``shape`` given its squared singular values ``s2``.

    ``s2``: float64, descending, all ``min(shape)`` of them, as returned by
    :func:`squared_singular_values`. Rank rules that compute a spectrum once and use it
    more than once (the plan, then the step) call this directly.
    """
    m, n = int(shape[0]), int(shape[1])
    L, M = min(m, n), max(m, n)
    alpha = L / M
    x_bar = evb_x_bar(alpha)
    total = float(np.sum(s2))
    if total == 0.0:
        return EVBMFResult(rank=0, sigma2=0.0, threshold=0.0)

    upper = total / (L * M)
    h_max = min(math.ceil(L / (1.0 + alpha)) - 1, L - 1)  # at most L - 1 signal components
    tail = s2[h_max:]
    lower = max(tail[0] / (M * x_bar), float(np.mean(tail)) / M)
    # Exactly low-rank input has a zero tail: the free energy then decreases towards
    # sigma2 -> 0. The floor NOISE_FLOOR * upper stands in for 0 (a signal-to-noise
    # ratio of at most 100 dB), above the rounding noise of float32 weights.
    lower = min(max(lower, upper * NOISE_FLOOR), upper)

    # Search in units of the lower bound, as the authors' code does, so that the
    # solver's absolute tolerance is relative to the scale of the problem.
    unit = lower
    if upper > lower:
        from scipy.optimize import minimize_scalar

        res = minimize_scalar(
            lambda v: _free_energy(v * unit, s2, total, L, M, alpha, x_bar),
            bounds=(1.0, upper / unit), method="bounded", options={"xatol": 1e-8},
        )
        sigma2 = float(res.x) * unit
    else:
        sigma2 = upper
    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(np.count_nonzero(s2 > threshold * threshold))
    return EVBMFResult(rank=rank, sigma2=sigma2, threshold=threshold)


def evbmf_rank(x: Any, shape: tuple[int, int] | None = None) -> int:
    """The EVBMF rank of a matrix (or of its singular values with ``shape``); see :func:`evbmf`."""
    return evbmf(x, shape).rank


def weaken(full: int, rank: int, weakening: float) -> int:
    """MUSCO's weakened rank ``int(full - w (full - rank))``, at least 1.

    ``w = 1`` keeps the EVBMF rank, ``w = 0`` the full rank; values in between
    compress less aggressively than EVBMF (Gusak et al. 2019).
    """
    return max(1, int(full - weakening * (full - rank)))
