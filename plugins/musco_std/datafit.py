"""Data-aware low-rank fitting: weights fitted to a layer's output on its inputs (float64 math).

Conventions (as :class:`musco_core.LayerData`): a weight ``W`` is ``(out, in)``,
input rows ``x`` are ``(n, in)``, the output is ``x W^T``. With ``X'`` the rows the
layer sees now and ``X`` the rows the original layer saw at the same positions,

- ``G = gram = X'^T X'``, ``C = cross = X'^T X``, ``T = target_gram = X^T X``;
- the squared output error of a replacement ``W'`` against the original output is

  .. math::  e^2(W') = \\|X W^T - X' W'^T\\|_F^2
             = \\operatorname{tr}(W T W^T) - 2 \\operatorname{tr}(W' C W^T)
               + \\operatorname{tr}(W' G W'^T).

Every fit here minimises the *damped* objective

.. math::  J_\\lambda(W') = e^2(W') + \\lambda \\|W' - W\\|_F^2,
           \\qquad \\lambda = \\delta \\operatorname{tr}(G) / d

(``d = in``, ``delta`` the relative ``damping``). The ridge term pulls ``W'`` towards
the original weight ``W`` in the directions the data does not see, so a
rank-deficient Gram (fewer rows than features, duplicated or constant features)
never blows up, and a zero Gram (no signal at all) gives back the plain
weight-space fit. Completing the square,

.. math::  J_\\lambda(W') = J_\\lambda(W^\\ast) + \\|(W' - W^\\ast) S\\|_F^2,
           \\qquad S S^T = G + \\lambda I,
           \\qquad W^\\ast = W (C^T + \\lambda I)(G + \\lambda I)^{-1},

so the best rank-``r`` ``W'`` is ``[W^* S]_r S^{-1}`` (truncated SVD of the
whitened target, whitening folded back): :func:`whitened_svd`. When nothing
upstream changed (``C = G``), ``W^* = W`` exactly and this is SVD-LLM's
truncation-aware whitening; otherwise ``W^*`` is the error-correcting target
(fit the *original* output from the inputs the layer sees now).

Everything is computed in float64 on the weight's device; factors are returned
in float64 (the caller casts).

References
----------
X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware singular value
decomposition for large language model compression", arXiv:2403.07378 (2024).
Z. Yuan et al., "ASVD: Activation-aware singular value decomposition for
compressing large language models", arXiv:2312.05821 (2023).
X. Zhang, J. Zou, K. He, J. Sun, "Accelerating very deep convolutional networks
for classification and detection", IEEE TPAMI 38(10) (2016), arXiv:1505.06798
(asymmetric reconstruction).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "damping_value", "gram_root", "output_error", "output_target", "unwhiten_first",
    "whiten_input_mode", "whitened_spectrum", "whitened_svd", "whitened_tucker2",
]

_F64 = torch.float64

#: Default relative damping ``delta``: ``lambda = delta * tr(G) / d``.
DEFAULT_DAMPING = 1e-6


def damping_value(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> float:
    """The absolute damping ``lambda = damping * tr(G) / d`` added to the Gram's diagonal.

    Relative to the mean eigenvalue ``tr(G)/d``, so it does not depend on the
    scale of the inputs or on how many rows were summed. A Gram with zero (or
    non-positive, i.e. no) trace falls back to ``lambda = damping`` (the mean
    eigenvalue taken as 1): with no signal in the data the fits reduce to the
    plain weight-space ones.

    Parameters
    ----------
    gram : (d, d) tensor
        ``G = X'^T X'``.
    damping : float
        The relative damping ``delta >= 0``.
    """
    if not damping >= 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    d = gram.shape[-1]
    scale = float(torch.diagonal(gram, dim1=-2, dim2=-1).sum()) / d if d else 0.0
    if not scale > torch.finfo(_F64).tiny ** 0.5:  # zero, negative or NaN: no signal
        scale = 1.0
    return damping * scale


def _check_gram(gram: torch.Tensor, d: int | None = None, name: str = "gram") -> None:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {tuple(gram.shape)}")
    if d is not None and gram.shape[0] != d:
        raise ValueError(f"{name} is {tuple(gram.shape)} but the weight has {d} input "
                         f"features; expected ({d}, {d})")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{name} has NaN or Inf entries (non-finite calibration activations?)")


def _eig(gram: torch.Tensor, damping: float, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(V, e, lambda)`` with ``G + lambda I = V diag(e) V^T``, ``e > 0`` (float64)."""
    _check_gram(gram)
    g = gram.detach().to(device=device, dtype=_F64)
    g = 0.5 * (g + g.T)
    lam = damping_value(g, damping)
    evals, vecs = torch.linalg.eigh(g)
    # A PSD Gram has eigenvalues >= 0; rounding can make the smallest slightly negative.
    evals = evals.clamp_min(0.0) + lam
    if not bool((evals > 0).all()):
        raise ValueError("gram is singular and damping is 0; use damping > 0")
    return vecs, evals, lam


def gram_root(gram: torch.Tensor, damping: float = DEFAULT_DAMPING,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of the damped Gram and its inverse.

    .. math::  G + \\lambda I = V \\operatorname{diag}(e) V^T, \\quad
               S = V \\operatorname{diag}(\\sqrt{e}) V^T, \\quad
               S^{-1} = V \\operatorname{diag}(1/\\sqrt{e}) V^T,

    so ``S S^T = S^2 = G + lambda I`` with ``lambda`` from :func:`damping_value`.
    The eigendecomposition (rather than a Cholesky factor) is robust for
    rank-deficient Grams; eigenvalues that rounding made negative are clamped to
    0 first. ``cond(S) <= sqrt(1 + d / damping)``.

    Parameters
    ----------
    gram : (d, d) tensor
        A symmetric positive semi-definite Gram matrix ``X'^T X'``.
    damping : float
        Relative damping ``delta`` (``lambda = delta tr(G)/d``). With ``0`` the Gram
        must be positive definite.

    Returns
    -------
    S, S_inv : (d, d) float64 tensors, on the Gram's device.
    """
    vecs, evals, _ = _eig(gram, damping, gram.device)
    root = evals.sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def _unshifted(gram: torch.Tensor, cross: torch.Tensor | None) -> bool:
    return cross is None or cross is gram or torch.equal(cross, gram)


def _whitener(gram: torch.Tensor, cross: torch.Tensor | None, damping: float, device,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S^{-1})`` with ``W^* S = W B``.

    ``B = S`` when ``C = G``, else ``(C^T + lambda I) S^{-1}`` (since
    ``(G + lambda I)^{-1} S = S^{-1}`` for the symmetric root).
    """
    vecs, evals, lam = _eig(gram, damping, device)
    root = evals.sqrt()
    s_inv = (vecs / root) @ vecs.T
    if _unshifted(gram, cross):
        return (vecs * root) @ vecs.T, s_inv
    _check_gram(cross, gram.shape[0], "cross")
    c = cross.detach().to(device=device, dtype=_F64)
    eye = torch.eye(c.shape[0], dtype=_F64, device=device)
    return (c.T + lam * eye) @ s_inv, s_inv


def _as_f64(weight: torch.Tensor, d: int | None = None) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"weight must be (out, in[, kh, kw]), got shape {tuple(weight.shape)}")
    if d is not None and weight.shape[1] != d:
        raise ValueError(f"weight has {weight.shape[1]} input features but the Gram is "
                         f"({d}, {d})")
    return weight.detach().to(_F64)


def output_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None = None,
                  damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The unconstrained minimiser ``W^*`` of the damped output error.

    .. math::  W^\\ast = \\arg\\min_{W'} \\|X W^T - X' W'^T\\|_F^2 + \\lambda\\|W' - W\\|_F^2
               = W (C^T + \\lambda I)(G + \\lambda I)^{-1}.

    "Error-correcting": it fits the *original* output ``X W^T`` from the inputs
    ``X'`` the layer sees now (asymmetric reconstruction, Zhang et al. 2016). As
    ``lambda -> 0`` this is the least-squares ``W C^T G^{-1}``. When ``cross`` is
    ``None`` or equal to ``gram`` (nothing upstream changed) it returns ``W``
    itself (in float64), exactly.

    Parameters
    ----------
    weight : (out, in) tensor
    gram, cross : (in, in) tensors
        ``G = X'^T X'`` and ``C = X'^T X``.
    damping : float
        Relative damping, see :func:`damping_value`.

    Returns
    -------
    (out, in) float64 tensor.
    """
    _check_gram(gram)
    w = _as_f64(weight, gram.shape[0])
    if _unshifted(gram, cross):
        return w.clone()
    b, s_inv = _whitener(gram, cross, damping, w.device)
    return w @ b @ s_inv


def _check_rank(rank: int, weight: torch.Tensor) -> None:
    full = min(weight.shape[0], weight.shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank must be an int in 1..{full} for a weight of shape "
                         f"{tuple(weight.shape)}, got {rank!r}")


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int, *,
                 cross: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
                 cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors minimising the layer's (damped) output error.

    Truncation-aware whitening (SVD-LLM): with ``S S^T = G + lambda I``
    (:func:`gram_root`) and ``U Sigma V^T`` the SVD of the whitened target
    ``W^* S`` (:func:`output_target`),

    .. math::  W' = U_r \\Sigma_r V_r^T S^{-1}
               = \\arg\\min_{\\operatorname{rank} W' \\le r}
                 \\|X W^T - X' W'^T\\|_F^2 + \\lambda \\|W' - W\\|_F^2 .

    Exact (Eckart-Young on ``(W' - W^*) S``), not a heuristic: at ``lambda -> 0``
    and a full-rank Gram it is the rank-``r`` least-squares optimum of the output
    error, and it is never worse than plain truncated SVD in ``J_lambda``. With
    ``cross=None`` (or ``cross == gram``) it fits ``X W^T`` from ``X``; with a
    ``cross`` it fits the original output from the shifted inputs.
    A zero Gram gives the plain truncated SVD of ``W``.

    The factors are ``second = U_r Sigma_r^{1/2}``, ``first = Sigma_r^{1/2} V_r^T
    S^{-1}`` (so ``W' = second @ first``), then each component rescaled so that the
    two factors have equal norms (:func:`balance_pair`).

    Parameters
    ----------
    weight : (out, in) tensor
    gram : (in, in) tensor
        ``G = X'^T X'``.
    rank : int
        ``1 <= rank <= min(out, in)``.
    cross : (in, in) tensor, optional
        ``C = X'^T X``; ``None`` means ``C = G``.
    damping : float
        Relative damping, see :func:`damping_value`.
    cache : dict, optional
        Fits of the same weight and statistics at several ranks share one SVD
        through it: pass the same empty dict to each call, and drop it after (it
        holds the factors). ``None`` keeps nothing.

    Returns
    -------
    first : (rank, in) float64 tensor
    second : (out, rank) float64 tensor
    """
    _check_gram(gram)
    w = _as_f64(weight, gram.shape[0])
    _check_rank(rank, w)
    u, s, vh, s_inv = _whitened_factors(weight, w, gram, cross, damping, cache)
    root = s[:rank].sqrt()
    return balance_pair((root[:, None] * vh[:rank]) @ s_inv, u[:, :rank] * root[None, :])


def balance_pair(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so ``|first[i, :]| == |second[:, i]|``; ``second @ first`` kept.

    Whitening folds ``S^{-1}`` into the input factor; the Gram sums many rows, so
    without this the input factor is orders of magnitude smaller than the output
    factor, and fine-tuning with a per-parameter step size (Adam) moves the small
    one far too much. Balanced factors train like plain SVD's.
    """
    a = torch.linalg.vector_norm(first, dim=1)
    b = torch.linalg.vector_norm(second, dim=0)
    ok = (a > 0) & (b > 0)
    c = torch.where(ok, (b / torch.where(ok, a, 1)).sqrt(), torch.ones_like(a))
    return first * c[:, None], second / c[None, :]


def _whitened_factors(weight, w, gram, cross, damping, cache=None):
    """``(U, s, Vh, S^-1)`` of the whitened target; kept in ``cache`` (a dict) for other ranks."""
    if cache is not None and "factors" in cache:
        return cache["factors"]
    b, s_inv = _whitener(gram, cross, damping, w.device)
    u, s, vh = torch.linalg.svd(w @ b, full_matrices=False)
    if cache is not None:
        cache["factors"] = (u, s, vh, s_inv)
    return u, s, vh, s_inv


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor, *,
                      cross: torch.Tensor | None = None,
                      damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Singular values of the whitened target ``W^* S`` (descending, float64).

    The spectrum that rank rules (energy, EVBMF) should read when data is
    present: for the rank-``r`` fit ``W'_r`` of :func:`whitened_svd`,

    .. math::  \\sum_{i > r} \\sigma_i^2 = J_\\lambda(W'_r) - J_\\lambda(W^\\ast),

    and with ``C = G`` (``W^* = W``, ``J_lambda(W^*) = 0``) the tail energy is the
    squared output error at rank ``r`` (plus ``lambda |W'_r - W|^2``, negligible
    for a small damping): ``sum_i sigma_i^2 = |X W^T|_F^2 + lambda |W|_F^2``.

    Parameters
    ----------
    weight : (out, in) tensor
    gram, cross : (in, in) tensors (``cross=None`` means ``C = G``)
    damping : float

    Returns
    -------
    (min(out, in),) float64 tensor.
    """
    _check_gram(gram)
    w = _as_f64(weight, gram.shape[0])
    b, _ = _whitener(gram, cross, damping, w.device)
    return torch.linalg.svdvals(w @ b)


def _offsets(w: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) -> (k, out, in): one matrix per kernel offset."""
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor,
                 cross: torch.Tensor | None = None,
                 target_gram: torch.Tensor | None = None) -> float:
    """Relative output error of ``approx`` against the original layer, from the statistics.

    .. math::  \\frac{\\|X W^T - X' W'^T\\|_F}{\\|X W^T\\|_F}, \\quad
               e^2 = \\operatorname{tr}(W T W^T) - 2\\operatorname{tr}(W' C W^T)
                     + \\operatorname{tr}(W' G W'^T).

    Evaluated as ``tr(W M W^T) + 2 tr(D (C - G) W^T) + tr(D G D^T)`` with
    ``D = W - W'`` and ``M = T - C - C^T + G``, so that the unshifted case
    (``C = T = G``) is ``tr(D G D^T)`` without cancellation; clamped at ``>= 0``.
    ``cross`` and ``target_gram`` default to ``gram``. Undamped.

    A conv weight ``(out, in, kh, kw)`` with a channel Gram is summed over kernel
    offsets: ``sum_hw e^2(W_hw, W'_hw) / sum_hw |X W_hw^T|^2`` (see
    :func:`whiten_input_mode` for when that equals the conv's output error).

    Returns
    -------
    float
        The relative error; ``0.0`` when both the error and the reference output
        are zero, ``inf`` when only the reference output is zero.
    """
    _check_gram(gram)
    d = gram.shape[0]
    w = _offsets(_as_f64(weight, d))
    if approx.shape != weight.shape:
        raise ValueError(f"approx has shape {tuple(approx.shape)}, expected "
                         f"{tuple(weight.shape)} like the weight")
    diff = w - _offsets(approx.detach().to(device=w.device, dtype=_F64))
    g = gram.detach().to(device=w.device, dtype=_F64)
    g = 0.5 * (g + g.T)
    err2 = float(((diff @ g) * diff).sum())
    unshifted = _unshifted(gram, cross)
    same_target = target_gram is None or target_gram is gram or torch.equal(target_gram, gram)
    if unshifted and same_target:
        ref2 = float(((w @ g) * w).sum())
    else:
        c = g if cross is None else cross.detach().to(device=w.device, dtype=_F64)
        _check_gram(c, d, "cross")
        t = g if target_gram is None else target_gram.detach().to(device=w.device, dtype=_F64)
        _check_gram(t, d, "target_gram")
        ref2 = float(((w @ t) * w).sum())
        m = t - c - c.T + g
        err2 += float(((w @ m) * w).sum()) + 2.0 * float(((diff @ (c - g)) * w).sum())
    err2 = max(err2, 0.0)
    if ref2 <= 0.0:
        return 0.0 if err2 == 0.0 else math.inf
    return math.sqrt(err2 / ref2)


# -- Tucker-2 (input-channel mode) ----------------------------------------------------------


def whiten_input_mode(weight: torch.Tensor, gram: torch.Tensor, *,
                      cross: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whiten the input-channel mode of a conv weight: ``W~[:, :, h, w] = W^*_hw S``.

    ``W^*_hw`` is :func:`output_target` of each kernel offset's ``(out, in)``
    matrix (``W_hw`` itself when ``cross`` is ``None`` or equal to ``gram``). Any
    Tucker-2 fit ``W~'`` of the returned tensor maps back to
    ``W'_hw = W~'_hw S^{-1}``: only the input factor changes
    (:func:`unwhiten_first`), the core and the output factor stay. Since
    ``W' -> W' S`` is a bijection that keeps the multilinear rank, the best
    Tucker-2 fit of ``W~`` in the Frobenius norm is the best fit of

    .. math::  \\sum_{h,w} \\|X W_{hw}^T - X' W'^T_{hw}\\|_F^2
               + \\lambda \\|W'_{hw} - W_{hw}\\|_F^2

    (``X``, ``X'`` channel-vector rows; HOOI reaches it approximately, as it does
    in the plain case).

    What that objective is: with a channel Gram only, it is the sum over kernel
    offsets of ``|(W - W')[:, :, h, w] X'^T|^2``. A kxk conv's output error also
    has cross terms between offsets, ``tr(D_hw E[x(p+o) x(p+o')^T] D_h'w'^T)``;
    the sum above equals the conv's output error exactly when input pixels at
    different kernel offsets are uncorrelated (and padding is ignored). For
    natural images and feature maps neighbouring pixels are correlated, so it is
    an approximation: it weights input *channels* by their real statistics,
    not spatial patterns. (A 1x1 conv has one offset: there it is exact.)

    Parameters
    ----------
    weight : (out, in, kh, kw) tensor
    gram, cross : (in, in) tensors
        Channel Gram ``X'^T X'`` and cross moment ``X'^T X``.
    damping : float

    Returns
    -------
    whitened : (out, in, kh, kw) float64 tensor
    S_inv : (in, in) float64 tensor, for :func:`unwhiten_first`.
    """
    _check_gram(gram)
    w = _as_f64(weight, gram.shape[0])
    b, s_inv = _whitener(gram, cross, damping, w.device)
    return torch.einsum("oi...,ij->oj...", w, b), s_inv


def unwhiten_first(first: torch.Tensor, s_inv: torch.Tensor) -> torch.Tensor:
    """Fold the whitening back into the input factor: ``first @ S^{-1}`` ((r_in, in), float64)."""
    return first.detach().to(_F64) @ s_inv.to(device=first.device, dtype=_F64)


def whitened_tucker2(weight: torch.Tensor, rank: tuple[int, int], gram: torch.Tensor, *,
                     fit: Callable[[torch.Tensor, tuple[int, int]],
                                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     cross: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data-aware Tucker-2 on the input-channel mode: whiten, fit, fold back.

    ``fit(weight, rank) -> (first (r_in, in), core (r_out, r_in, kh, kw), last (out, r_out))``
    is the plain Tucker-2 algorithm (e.g. the tucker2 plugin's HOOI with its
    ``n_iter_max`` and ``tol`` bound by :func:`functools.partial`; the core does
    not import plugins). It is run on :func:`whiten_input_mode`'s tensor, and
    the input factor is unwhitened (:func:`unwhiten_first`). What is minimised
    is stated in :func:`whiten_input_mode`: the per-offset output error on the
    channel Gram, exact for 1x1 and for inputs uncorrelated across offsets.

    Returns
    -------
    first : (r_in, in), core : (r_out, r_in, kh, kw), last : (out, r_out), float64.
    """
    whitened, s_inv = whiten_input_mode(weight, gram, cross=cross, damping=damping)
    first, core, last = fit(whitened, tuple(rank))
    first, core = unwhiten_first(first, s_inv), core.to(_F64)
    # unit rows of the input factor, as in plain Tucker-2; the scale goes into the core
    # (see balance_pair: fine-tuning moves a tiny factor far too much)
    norms = torch.linalg.vector_norm(first, dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return first / norms[:, None], core * norms[None, :, None, None], last.to(_F64)
