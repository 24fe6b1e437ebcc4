"""Truncated SVD of Linear and 1x1-conv weights, rebuilt as two thin layers."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from musco_core import Decomposition, LayerStats, UnsupportedLayerError
from musco_std._conv import checked_compress, working
from musco_std.statistics import WHITENING_STATISTICS


class SVDLinear(nn.Module):
    """``nn.Linear`` factorized as ``second(first(x))``: in -> rank -> out, bias on ``second``."""

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "svd"

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class TwoConvs(nn.Module):
    """Two kernel-1 convs ``second(first(x))``: in -> rank -> out, of the class ``_conv``.

    ``first`` keeps the original stride, padding, dilation and padding mode (no
    bias); ``second`` carries the original bias. The body of :class:`SVDConv1x1`
    (``nn.Conv2d``) and :class:`musco_std.conv1d.SVDConv1d` (``nn.Conv1d``).
    """

    _conv = nn.Conv2d  # no annotation: TorchScript would read it as an attribute

    def __init__(self, in_channels: int, rank: int, out_channels: int, *, stride=1, padding=0,
                 dilation=1, padding_mode: str = "zeros", bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.first = self._conv(in_channels, rank, 1, stride=stride, padding=padding,
                                dilation=dilation, bias=False, padding_mode=padding_mode, **kw)
        self.second = self._conv(rank, out_channels, 1, bias=bias, **kw)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class SVDConv1x1(TwoConvs):
    """1x1 ``nn.Conv2d`` factorized as two 1x1 convs: in -> rank (stride, padding) -> out (bias)."""

    musco_decomposition = "svd"
    _conv = nn.Conv2d


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of a matrix (Eckart-Young): ``weight ~ second @ first``.

    ``weight`` has shape (out, in); returns ``first`` (rank, in) and ``second``
    (out, rank), the singular values split evenly between them
    (``second = U_r S_r^1/2``, ``first = S_r^1/2 V_r^T``).

    Computed in float32 (float64 for float64 weights) on the weight's device;
    the factors come back in the weight's dtype.
    """
    u, s, vh = torch.linalg.svd(working(weight), full_matrices=False)
    root = s[:rank].sqrt()
    first, second = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)


def core_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An r x r matrix with the non-zero singular values of ``b @ a`` (b: m x r, a: r x n).

    With ``a^T = Q_a R_a`` and ``b = Q_b R_b``: ``b a = Q_b (R_b R_a^T) Q_a^T``.
    """
    r_a = torch.linalg.qr(a.T, mode="r").R
    r_b = torch.linalg.qr(b, mode="r").R
    return r_b @ r_a.T


def fill_factor_pair(new: nn.Module, first: torch.Tensor, second: torch.Tensor,
                     bias: torch.Tensor | None) -> nn.Module:
    """Copy ``first`` (rank, in) and ``second`` (out, rank) into ``new.first`` / ``new.second``
    (reshaped to their weights' shapes), and ``bias`` into ``new.second.bias`` unless None."""
    with torch.no_grad():
        new.first.weight.copy_(first.reshape(new.first.weight.shape))
        new.second.weight.copy_(second.reshape(new.second.weight.shape))
        if bias is not None:
            new.second.bias.copy_(bias)
    return new


class FactorPairSVD:
    """What the truncated-SVD decompositions share: ``W (out x in) ~ second @ first``.

    Mixed in before :class:`~musco_core.Decomposition` by ``svd``, ``svd1d``,
    ``svd_hf_conv1d`` and ``svd_rnn``. Needs ``_dims(module) -> (in, out, has_bias)``,
    or else ``_sides(module) -> (in, out)`` and ``_fixed_params(module)`` (the
    parameters outside the two factors; the bias by default). ``flop_count`` counts
    ``2 positions r (in + out)`` per call, with ``_positions(stats)`` (default
    ``stats.positions``).
    """

    def _sides(self, module: nn.Module) -> tuple[int, int]:
        n_in, n_out, _ = self._dims(module)
        return n_in, n_out

    def _fixed_params(self, module: nn.Module) -> int:
        _, n_out, bias = self._dims(module)
        return n_out if bias else 0

    def _positions(self, stats: LayerStats) -> int:
        return stats.positions

    def full_rank(self, module: nn.Module) -> int:
        return min(self._sides(module))

    def param_count(self, module: nn.Module, rank: int) -> int:
        n_in, n_out = self._sides(module)
        return rank * (n_in + n_out) + self._fixed_params(module)

    def flop_count(self, module: nn.Module, rank: int, stats: LayerStats) -> int:
        n_in, n_out = self._sides(module)
        return 2 * self._positions(stats) * rank * (n_in + n_out) * stats.calls

    def rank_for_param_count(self, module: nn.Module, budget: float) -> int | None:
        n_in, n_out = self._sides(module)
        rank = int((budget - self._fixed_params(module)) // (n_in + n_out))
        rank = min(rank, min(n_in, n_out))
        return rank if rank >= 1 else None

    def decompose(self, weight: torch.Tensor, rank: int, params: Any = None):
        return svd_factors(weight, rank)

    def reconstruct(self, factors) -> torch.Tensor:
        first, second = factors
        return second @ first


def _flag(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name!r} must be true or false, got {value!r}")


def _damping(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name!r} must be a number >= 0, got {value!r}")


@attrs.frozen
class SVDParams:
    #: Fit the layer's *output* on the calibration data instead of its weight:
    #: truncation-aware whitening (SVD-LLM), aimed at the original layer's output
    #: from the inputs the layer sees now. Needs ``Compressor(..., calibration=...)``.
    whiten: bool = attrs.field(default=False, validator=_flag)
    #: Relative ridge ``damping * tr(G) / d`` added to the input Gram ``G`` (whiten only).
    #: It keeps the fit from overfitting a few calibration rows, most of all the error
    #: correction (``X'^T X`` against ``X'^T X'``): on MiniLM with 2k tokens, sequential
    #: steps kept 76% of the score at 1e-6 and 90% at 1e-2 (1.5x); see docs/data-aware.md.
    damping: float = attrs.field(default=1e-2, validator=_damping)


class SVD(FactorPairSVD, Decomposition):
    """Truncated SVD: ``W (out x in) ~ U_r S_r V_r^T``, the optimal rank-r approximation.

    Handles ``nn.Linear``, 1x1 ``nn.Conv2d`` (any stride, padding, padding mode,
    bias; not grouped) and its own :class:`SVDLinear` / :class:`SVDConv1x1`,
    which it re-truncates in a later round. The rank is an int in
    ``1 .. min(in, out)``.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower
    rank", Psychometrika 1 (1936).
    """

    name = "svd"
    summary = "truncated SVD of Linear / 1x1 conv weights -> two thin layers"
    Params = SVDParams
    module_types = (nn.Linear, nn.Conv2d, SVDLinear, SVDConv1x1)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        if isinstance(module, nn.Conv2d):
            if tuple(module.kernel_size) != (1, 1):
                raise UnsupportedLayerError(
                    f"layer {name!r}: decomposition 'svd' handles 1x1 convolutions only, got "
                    f"kernel_size={tuple(module.kernel_size)}; use tucker2, cp3 or cp4 for kxk"
                )
            if module.groups != 1:
                raise UnsupportedLayerError(
                    f"layer {name!r}: decomposition 'svd' does not support grouped convolutions "
                    f"(groups={module.groups}); only groups=1 is supported"
                )

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int, bool]:
        """(in, out, has_bias) of a supported module."""
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features, module.bias is not None
        if isinstance(module, nn.Conv2d):
            return module.in_channels, module.out_channels, module.bias is not None
        first, second = module.first, module.second
        return first.weight.shape[1], second.weight.shape[0], second.bias is not None

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The (out, in) weight matrix; for a factorized layer ``second @ first``.

        The product is formed in float32 (float64 for float64 layers) and returned
        in the layer's dtype.
        """
        n_in, n_out, _ = self._dims(module)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return module.weight.reshape(n_out, n_in)
        dtype = module.first.weight.dtype
        first = working(module.first.weight).reshape(module.rank, n_in)
        return (working(module.second.weight).reshape(n_out, module.rank) @ first).to(dtype)

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """The weight matrix; for a factorized layer, its r x r core.

        ``W = B A`` has rank ``r``, so its spectrum ends in exact zeros and a
        spectrum-based rule (EVBMF) would see no noise and keep ``r``. With
        ``A^T = Q_a R_a`` and ``B = Q_b R_b``, ``W = Q_b (R_b R_a^T) Q_a^T``: the core
        ``R_b R_a^T`` carries the same non-zero singular values in an r x r matrix, as
        MUSCO analyses the core of an already compressed layer in later rounds.

        The matrices are in float32 for float16 / bfloat16 layers (float64 stays float64).
        """
        if not isinstance(module, (SVDLinear, SVDConv1x1)):
            return [working(self.weight(module))]
        n_in, n_out, _ = self._dims(module)
        a = working(module.first.weight).reshape(module.rank, n_in)
        b = working(module.second.weight).reshape(n_out, module.rank)
        return [core_of_product(a, b)]

    def needs(self, params: Any) -> frozenset[str]:
        return WHITENING_STATISTICS if getattr(params, "whiten", False) else frozenset()

    def compress_ranks(self, module: nn.Module, ranks: list[int], params: Any,
                       data: Any = None):
        """:meth:`compress` at each rank; whitened fits share one SVD of the whitened target."""
        cache: dict = {}
        for rank in ranks:
            yield self.compress(module, rank, params, data=data, cache=cache)

    def compress(self, module: nn.Module, rank: int, params: Any,
                 data: Any = None, cache: dict | None = None) -> tuple[nn.Module, float]:
        """As the base class, with a finiteness check of the weight and of the factors.

        Raises ``ValueError`` when the weight (or a factor, e.g. one that overflowed
        float16) holds NaN or Inf; the engine reports it naming the layer.

        With ``whiten = true`` and the layer's :class:`~musco_core.LayerData`, the
        factors minimise the output error ``|X W^T - X' W'^T|`` on the calibration
        data instead (:func:`musco_std.datafit.whitened_svd`, in float64): ``X``
        are the original layer's inputs, ``X'`` what the layer sees now. The
        reported error stays the relative *weight* error.
        """
        if data is None or not getattr(params, "whiten", False):
            return checked_compress(self, module, rank, params)
        from musco_std.datafit import whitened_svd

        weight = self.weight(module).detach()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the weight holds NaN or Inf values; nothing to factorize")
        gram = data["input_gram"].to(weight.device)
        cross = data["cross_moment"].to(weight.device)
        first, second = whitened_svd(weight.double(), gram, rank, cross=cross,
                                     damping=params.damping, cache=cache)
        factors = (first.to(weight.dtype), second.to(weight.dtype))
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise ValueError(f"whitened factors at rank {rank} are not finite in "
                             f"{weight.dtype}; use a float32 model or more damping")
        approx = factors[1].double() @ factors[0].double()
        from musco_core import relative_error

        return self.build(module, factors), relative_error(weight.double(), approx)

    def data_rank_matrices(self, module: nn.Module, data: Any, params: Any) -> list[torch.Tensor]:
        """The whitened weight ``W* S`` (``S S^T = G``): its spectrum ranks by output error."""
        from musco_std.datafit import gram_root, output_target

        weight = self.weight(module).detach().double()
        damping = getattr(params, "damping", 1e-2)
        gram = data["input_gram"].to(weight.device)
        target = output_target(weight, gram, data["cross_moment"].to(weight.device),
                               damping=damping)
        root, _ = gram_root(gram, damping=damping)
        return [target @ root]

    def skeleton(self, module: nn.Module, rank: int, params: Any = None) -> nn.Module:
        """The module :meth:`compress` builds at ``rank``, from shapes alone (weights uninitialised).

        No math runs, so it is cheap and works on any device, ``meta`` included.
        """
        return self._new(module, rank)

    def _new(self, module: nn.Module, rank: int) -> nn.Module:
        """An empty :class:`SVDLinear` / :class:`SVDConv1x1` of ``rank`` replacing ``module``."""
        n_in, n_out, bias = self._dims(module)
        # For a factorized module the input side comes from `first`.
        inner = module.first if isinstance(module, (SVDLinear, SVDConv1x1)) else module
        kw = {"device": inner.weight.device, "dtype": inner.weight.dtype}
        if isinstance(inner, nn.Linear):
            return SVDLinear(n_in, rank, n_out, bias=bias, **kw)
        return SVDConv1x1(n_in, rank, n_out, stride=inner.stride, padding=inner.padding,
                          dilation=inner.dilation, padding_mode=inner.padding_mode,
                          bias=bias, **kw)

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, second = factors
        # For a factorized module the bias comes from `second`.
        last = module.second if isinstance(module, (SVDLinear, SVDConv1x1)) else module
        return fill_factor_pair(self._new(module, first.shape[0]), first, second, last.bias)
