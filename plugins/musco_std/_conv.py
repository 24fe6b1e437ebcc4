"""Shared checks, geometry and precision rules of the first-party decompositions.

kxk ``nn.Conv2d`` checks and geometry serve tucker2 / cp3 / cp4; the precision
and finiteness helpers (:func:`working_dtype`, :func:`check_finite`,
:func:`checked_compress`) serve every decomposition, svd and rsvd included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musco_core import LayerStats, UnsupportedLayerError, relative_error


def check_kxk_conv(name: str, module: nn.Module, decomposition: str) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``module`` is a plain kxk ``nn.Conv2d``.

    Plain means: not transposed, ``groups=1``, ``padding_mode='zeros'`` and a
    kernel larger than 1x1 in at least one dimension.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} does not support transposed "
            f"convolutions ({type(module).__name__}); only nn.Conv2d is supported"
        )
    if not isinstance(module, nn.Conv2d):
        return
    if tuple(module.kernel_size) == (1, 1):
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} handles kxk convolutions only, got "
            f"kernel_size=(1, 1); use 'svd' for 1x1 convolutions"
        )
    if module.groups != 1:
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} does not support grouped "
            f"convolutions (groups={module.groups}); only groups=1 is supported"
        )
    if module.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} does not support "
            f"padding_mode={module.padding_mode!r}; only 'zeros' is supported"
        )


def spatial(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, H, W) of a conv input/output shape ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
    batch = 1
    for s in shape[:-3]:
        batch *= s
    return batch, shape[-2], shape[-1]


def in_out_positions(stats: LayerStats) -> tuple[int, int]:
    """(input positions N*H*W, output positions N*H'*W') of one call."""
    n, h, w = spatial(stats.input_shape)
    n2, h2, w2 = spatial(stats.output_shape)
    return n * h * w, n2 * h2 * w2


def same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | str:
    """Explicit padding equal to ``padding='same'`` (stride 1), or ``'same'`` if it is asymmetric.

    PyTorch pads ``total = d (k - 1)`` per dimension, ``total // 2`` before and the
    rest after; when ``total`` is odd no symmetric int padding reproduces it, and
    the split convolutions keep ``'same'`` (each is stride 1, so that stays valid).
    """
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in totals):
        return "same"
    return (totals[0] // 2, totals[1] // 2)


def factor_kw(module: nn.Module) -> dict:
    """``device`` and ``dtype`` keyword arguments of a module's first parameter."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def working_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float16, bfloat16, float32) is computed in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def working(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached and in its :func:`working_dtype`, on its device."""
    return tensor.detach().to(working_dtype(tensor))


def cast_factors(factors: Any, dtype: torch.dtype) -> Any:
    """``factors`` (a tensor or a tuple / list of them, nested) cast to ``dtype``."""
    if isinstance(factors, torch.Tensor):
        return factors.to(dtype)
    return type(factors)(cast_factors(f, dtype) for f in factors)


def _tensors(factors: Any):
    if isinstance(factors, torch.Tensor):
        yield factors
    else:
        for f in factors:
            yield from _tensors(f)


def check_finite(tensor: torch.Tensor, what: str = "weight") -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or +-Inf, counting them.

    The engine turns the error into a :class:`~musco_core.CompressionError`
    naming the layer, before anything in the model changes.
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int((~finite).sum()) - nan
    raise ValueError(
        f"the {what} has non-finite values ({nan} NaN, {inf} Inf of {tensor.numel()} entries, "
        f"dtype {str(tensor.dtype).removeprefix('torch.')}); a decomposition needs finite values"
    )


def check_finite_factors(factors: Any, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` if a factor holds NaN or +-Inf (e.g. it overflowed ``dtype``)."""
    for i, f in enumerate(_tensors(factors)):
        if not bool(torch.isfinite(f).all()):
            check_finite(f, f"factor {i} computed from a finite weight (in "
                            f"{str(dtype).removeprefix('torch.')})")


def checked_compress(decomposition, module: nn.Module, rank, params) -> tuple[nn.Module, float]:
    """The default compress chain with the precision and finiteness rules of the first-party plugins.

    ``weight`` -> finite? -> ``decompose`` (each decomposition computes in
    :func:`working_dtype` and returns factors in the weight's dtype) -> factors
    finite? -> ``build``. The relative error is measured in the working dtype
    between the weight and the reconstruction of the factors as stored (after
    the cast back to the layer's dtype), so it is the error the layer really has.
    """
    weight = decomposition.weight(module).detach()
    check_finite(weight)
    factors = decomposition.decompose(weight, rank, params)
    check_finite_factors(factors, weight.dtype)
    work = working_dtype(weight)
    approx = decomposition.reconstruct(cast_factors(factors, work))
    return decomposition.build(module, factors), relative_error(weight.to(work), approx)


def leading_left_vectors(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of the matrix ``x`` (m x n), as (m, rank).

    Computed from the Gram matrix ``x x^T`` (m x m) with a symmetric
    eigendecomposition (in ``x``'s precision) when ``m <= n``, which is several times
    faster than an SVD of the wide matrix. Squaring the singular values costs
    accuracy only in the trailing vectors, which a truncation drops; otherwise by an SVD (a full one when
    ``rank > n``, so that the result always has ``rank`` orthonormal columns).
    """
    m, n = x.shape
    if m <= n:
        _, vecs = torch.linalg.eigh(x @ x.T)
        return vecs[:, -rank:].flip(-1)
    u, _, _ = torch.linalg.svd(x, full_matrices=rank > n)
    return u[:, :rank]


def positive_int(instance, attribute, value) -> None:
    """attrs validator: an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name!r} must be an int >= 1, got {value!r}")


def non_negative(instance, attribute, value) -> None:
    """attrs validator: a number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name!r} must be a number >= 0, got {value!r}")
