"""Shared checks and geometry of kxk ``nn.Conv2d`` layers for the tucker2 / cp3 / cp4 plugins."""

from __future__ import annotations

import torch
from torch import nn

from musco_core import LayerStats, UnsupportedLayerError


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
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


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
