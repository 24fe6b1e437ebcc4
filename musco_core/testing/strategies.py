"""Hypothesis strategies and planted-structure weights for testing decompositions.

Layer configurations (:class:`ConvConfig`, :class:`LinearConfig`) build float64
modules and inputs from a seed; planted weights are exact Tucker-2 / CP /
low-rank tensors drawn from a seed (hypothesis draws the seed, so examples
shrink towards seed 0 rather than towards simpler numbers, which keeps them fast).
"""

from __future__ import annotations

import math

import attrs
import torch
from hypothesis import strategies as st
from torch import nn

__all__ = [
    "ConvConfig", "LinearConfig", "add_noise", "conv_configs", "cp_weight", "cp_weights",
    "linear_configs", "low_rank_matrices", "low_rank_matrix", "noisy", "seeds",
    "tucker2_weight", "tucker2_weights",
]

#: Hypothesis strategy of seeds for the planted-weight functions.
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@attrs.frozen
class ConvConfig:
    """An ``nn.Conv2d`` configuration plus an input size that gives a non-empty output."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    #: A pair of ints or ``"same"`` (only with stride 1, as in PyTorch).
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True
    input_size: tuple[int, int] = (8, 8)
    batch: int = 2

    def module(self, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Conv2d:
        """The conv layer, its parameters drawn from ``seed`` (standard normal, scaled)."""
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                      padding=self.padding, dilation=self.dilation, bias=self.bias, dtype=dtype)
        _fill(m, seed)
        return m

    def input(self, *, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A random input batch ``(batch, in, H, W)``."""
        shape = (self.batch, self.in_channels, *self.input_size)
        return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)


@attrs.frozen
class LinearConfig:
    """An ``nn.Linear`` configuration; inputs are ``(batch, tokens, in)``."""

    in_features: int
    out_features: int
    bias: bool = True
    batch: int = 2
    tokens: int = 3

    def module(self, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias, dtype=dtype)
        _fill(m, seed)
        return m

    def input(self, *, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        shape = (self.batch, self.tokens, self.in_features)
        return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def _fill(module: nn.Module, seed: int) -> None:
    g = _generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan = max(1, p[0].numel()) if p.ndim > 1 else max(1, p.numel())
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan))


@st.composite
def conv_configs(draw, *, kernel: str = "any", min_channels: int = 1, max_channels: int = 8,
                 max_kernel: int = 5, max_stride: int = 3, max_dilation: int = 3,
                 max_extra_size: int = 6, bias=None) -> ConvConfig:
    """Strategy of :class:`ConvConfig`.

    ``kernel``: ``"any"``, ``"1x1"`` or ``"kxk"`` (larger than 1x1 in at least one
    dimension; non-square kernels included). Stride, dilation and padding are
    drawn per dimension; ``padding="same"`` is drawn only with stride 1. The
    input size is the smallest that gives a non-empty output plus up to
    ``max_extra_size``. ``bias``: ``True``, ``False`` or ``None`` (drawn).
    """
    channels = st.integers(min_channels, max_channels)
    if kernel == "1x1":
        ks = (1, 1)
    else:
        ks = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
        if kernel == "kxk" and ks == (1, 1):
            ks = (ks[0], draw(st.integers(2, max(2, max_kernel))))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    if stride == (1, 1) and draw(st.booleans()):
        padding: tuple[int, int] | str = "same"
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = []
    for i in range(2):
        pad = 0 if padding == "same" else padding[i]
        smallest = max(1, dilation[i] * (ks[i] - 1) + 1 - 2 * pad)
        size.append(draw(st.integers(smallest, smallest + max_extra_size)))
    return ConvConfig(
        in_channels=draw(channels), out_channels=draw(channels), kernel_size=ks, stride=stride,
        padding=padding, dilation=dilation,
        bias=draw(st.booleans()) if bias is None else bias, input_size=tuple(size),
        batch=draw(st.integers(1, 2)),
    )


@st.composite
def linear_configs(draw, *, min_features: int = 1, max_features: int = 16,
                   bias=None) -> LinearConfig:
    """Strategy of :class:`LinearConfig`."""
    features = st.integers(min_features, max_features)
    return LinearConfig(draw(features), draw(features),
                        bias=draw(st.booleans()) if bias is None else bias,
                        batch=draw(st.integers(1, 2)), tokens=draw(st.integers(1, 3)))


# -- planted structure ----------------------------------------------------------------


def _orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q


def tucker2_weight(shape: tuple[int, ...], ranks: tuple[int, int], *, seed: int = 0) -> torch.Tensor:
    """An exact Tucker-2 conv weight ``G x_0 U_out x_1 U_in`` of shape (out, in, kh, kw).

    ``ranks`` is ``(r_in, r_out)`` as for the ``tucker2`` decomposition. The
    factors are orthonormal and the core standard normal, so the multilinear
    rank is exactly ``ranks`` (for ``r_out <= in*kh*kw`` and ``r_in <= out*kh*kw``).
    """
    g = _generator(seed)
    cout, cin, *kernel = shape
    r_in, r_out = ranks
    core = torch.randn(r_out, r_in, *kernel, generator=g, dtype=torch.float64)
    u_out, u_in = _orthonormal(cout, r_out, g), _orthonormal(cin, r_in, g)
    return torch.einsum("rs...,or,is->oi...", core, u_out, u_in)


def cp_weight(shape: tuple[int, ...], rank: int, *, seed: int = 0,
              collinearity: float = 0.0) -> torch.Tensor:
    """An exact CP tensor of ``rank`` over the modes of ``shape`` (any number of modes).

    Factor columns are unit-norm Gaussian vectors, component weights lie in
    ``[1, 2]``; well conditioned when ``rank`` is below the mode sizes. With
    ``collinearity = c`` in ``[0, 1)`` every column of a mode is
    ``sqrt(c) g + sqrt(1 - c) e_r`` (``g`` shared by the mode's columns) before
    normalisation, so columns have a mean cosine of about ``c``: the nearly
    collinear components that slow ALS down ("swamps").
    """
    if not 0 <= collinearity < 1:
        raise ValueError(f"collinearity must be in [0, 1), got {collinearity!r}")
    g = _generator(seed)
    factors = []
    for n in shape:
        if collinearity:
            common = torch.randn(n, 1, generator=g, dtype=torch.float64)
            f = (math.sqrt(collinearity) * common + math.sqrt(1 - collinearity)
                 * torch.randn(n, rank, generator=g, dtype=torch.float64))
        else:
            f = torch.randn(n, rank, generator=g, dtype=torch.float64)
        factors.append(f / torch.linalg.vector_norm(f, dim=0).clamp_min(1e-12))
    weights = 1 + torch.rand(rank, generator=g, dtype=torch.float64)
    factors[0] = factors[0] * weights
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, rank)
    return out.sum(1).reshape(shape)


def low_rank_matrix(shape: tuple[int, int], rank: int, *, seed: int = 0) -> torch.Tensor:
    """An exact rank-``rank`` matrix ``U diag(s) V^T`` with singular values in ``[1, 2]``."""
    g = _generator(seed)
    u, v = _orthonormal(shape[0], rank, g), _orthonormal(shape[1], rank, g)
    s = 1 + torch.rand(rank, generator=g, dtype=torch.float64)
    return (u * s) @ v.T


def add_noise(weight: torch.Tensor, level: float, *, seed: int = 0) -> torch.Tensor:
    """``weight + level * |weight| * E / |E|`` with Gaussian ``E``: relative noise ``level``."""
    e = torch.randn(weight.shape, generator=_generator(seed), dtype=torch.float64).to(weight)
    return weight + level * torch.linalg.vector_norm(weight) * e / torch.linalg.vector_norm(e)


def tucker2_weights(shape, ranks) -> st.SearchStrategy[torch.Tensor]:
    """Strategy of :func:`tucker2_weight` tensors (float64) of ``shape`` and ``ranks``."""
    return seeds.map(lambda s: tucker2_weight(tuple(shape), tuple(ranks), seed=s))


def cp_weights(shape, rank: int) -> st.SearchStrategy[torch.Tensor]:
    """Strategy of :func:`cp_weight` tensors (float64) of ``shape`` and ``rank``."""
    return seeds.map(lambda s: cp_weight(tuple(shape), rank, seed=s))


def low_rank_matrices(shape, rank: int) -> st.SearchStrategy[torch.Tensor]:
    """Strategy of :func:`low_rank_matrix` matrices (float64)."""
    return seeds.map(lambda s: low_rank_matrix(tuple(shape), rank, seed=s))


def noisy(weights: st.SearchStrategy[torch.Tensor], level: float) -> st.SearchStrategy[torch.Tensor]:
    """Strategy of the tensors of ``weights`` with relative Gaussian noise ``level`` added."""
    return st.tuples(weights, seeds).map(lambda ws: add_noise(ws[0], level, seed=ws[1]))
