"""A third-party-style musco plugin: activation-aware SVD and the statistic it needs.

- statistic ``input_abs_mean``: per input feature, the mean of ``|x|`` over the calibration
  rows the layer sees in the model as it is now;
- decomposition ``asvd``: truncated SVD of ``W S`` with ``S = diag(mean|x|^alpha)``, the
  scale folded back into the first factor.

References
----------
Z. Yuan, Y. Shang, Y. Song, Q. Wu, Y. Yan, G. Sun, "ASVD: Activation-aware Singular Value
Decomposition for Compressing Large Language Models", arXiv:2312.05821 (2023).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

import musco_core
from musco_core import LayerBatch, Statistic, relative_error
from musco_std.svd import SVD

__all__ = ["ASVD", "ASVDParams", "FLOOR", "InputAbsMean", "asvd_factors", "asvd_scale"]

#: Scales below ``FLOOR * max(scale)`` are raised to it, so ``S`` stays invertible
#: (a feature that is always 0 on the calibration data keeps its weights at full rank).
FLOOR = 1e-6


class InputAbsMean(Statistic):
    """Mean ``|x'|`` per input feature over the rows the layer sees now (float64, length ``d``).

    The rows are those of :meth:`musco_core.Decomposition.input_rows` (features of a
    Linear layer, channel vectors of a 1x1 conv), ``batch.rows``: the inputs in the
    model as it is now, after earlier steps. The state is ``(sum of |x'| per column,
    row count)``, so batches stream in any split.
    """

    name = "input_abs_mean"
    summary = "mean |x'| per input feature of the rows the layer sees now (float64, length d)"

    def update(self, state: Any, batch: LayerBatch) -> tuple[torch.Tensor, int]:
        rows = batch.rows.detach()
        sums = rows.abs().sum(dim=0, dtype=torch.float64)
        if state is None:
            return sums, int(rows.shape[0])
        total, count = state
        return total + sums, count + int(rows.shape[0])

    def result(self, state: Any, rows: int) -> torch.Tensor:
        total, count = state
        return (total / max(count, 1)).to(torch.float64).detach().clone()


def _alpha(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"'alpha' must be a number in [0, 1] (the exponent of the mean |x| "
                         f"scale; 0 is plain SVD, the paper uses 0.5), got {value!r}")


def _to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


@attrs.frozen
class ASVDParams:
    #: Exponent of the scale ``S = diag(mean|x|^alpha)``: 0 is plain SVD, 1 scales by the
    #: full mean magnitude; the paper found 0.5 best.
    alpha: float = attrs.field(default=0.5, converter=_to_float, validator=_alpha)


def asvd_scale(mean: torch.Tensor, alpha: float, floor: float = FLOOR) -> torch.Tensor:
    """The diagonal of ``S``: ``mean ** alpha`` (float64), floored at ``floor * max``.

    All ones when ``alpha`` is 0 or the mean is 0 everywhere (no information: plain SVD).
    Raises ``ValueError`` for a negative or non-finite mean.
    """
    mean = mean.detach().to(torch.float64)
    if mean.dim() != 1:
        raise ValueError(f"input_abs_mean must be a vector, got shape {tuple(mean.shape)}")
    if not bool(torch.isfinite(mean).all()) or bool((mean < 0).any()):
        raise ValueError("input_abs_mean holds negative, NaN or Inf values")
    scale = mean ** alpha
    top = scale.max() if scale.numel() else torch.zeros((), dtype=torch.float64)
    if alpha == 0 or not top > 0:
        return torch.ones_like(mean)
    return scale.clamp_min(top * floor)


def asvd_factors(weight: torch.Tensor, scale: torch.Tensor, rank: int,
                 svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors with ``weight ~ second @ first`` (float64).

    ``W S = U Sigma V^T`` (``S = diag(scale)``, ``weight`` is out x in);
    ``first = Sigma_r^1/2 V_r^T S^-1`` (rank x in), ``second = U_r Sigma_r^1/2``
    (out x rank). ``svd`` is ``torch.linalg.svd(W S)`` when already computed.
    """
    w = weight.detach().to(torch.float64)
    scale = scale.to(device=w.device, dtype=torch.float64)
    u, s, vh = svd if svd is not None else torch.linalg.svd(w * scale[None, :],
                                                             full_matrices=False)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank] / scale[None, :]
    second = u[:, :rank] * root[None, :]
    return first, second


class ASVD(SVD):
    """Activation-aware SVD of Linear / 1x1 conv weights, rebuilt as two thin layers.

    Inherits from ``svd`` the module types and checks, the counts, the shape-only
    ``skeleton`` and the modules it builds (:class:`musco_std.svd.SVDLinear` /
    :class:`~musco_std.svd.SVDConv1x1`). Without calibration data it is plain
    truncated SVD; with it, the SVD of ``W S`` is truncated, ``S = diag(mean|x'|^alpha)``
    from the ``input_abs_mean`` statistic, so the weights of input features with large
    activations are kept more accurately. The reported error is the relative weight
    error ``|W - W'| / |W|``.
    """

    name = "asvd"
    summary = ("activation-aware SVD (ASVD): SVD of W diag(mean|x|^alpha) on calibration "
               "data, Linear / 1x1 conv -> two thin layers")
    Params = ASVDParams

    def needs(self, params: Any) -> frozenset[str]:
        """``{"input_abs_mean"}``, or nothing when ``alpha`` is 0 (plain SVD)."""
        alpha = getattr(params, "alpha", ASVDParams().alpha)
        return frozenset({"input_abs_mean"}) if alpha > 0 else frozenset()

    def requires_calibration(self, params: Any) -> bool:
        return getattr(params, "alpha", ASVDParams().alpha) > 0

    def _prepare(self, module: nn.Module, params: Any, data: Any):
        """(weight, scale, SVD of W S) for ``module`` with its ``input_abs_mean``."""
        weight = self.weight(module).detach()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the weight holds NaN or Inf values; nothing to factorize")
        mean = data["input_abs_mean"]
        n_in = weight.shape[1]
        if tuple(mean.shape) != (n_in,):
            raise ValueError(f"input_abs_mean has shape {tuple(mean.shape)}, expected ({n_in},) "
                             "(one value per input feature)")
        scale = asvd_scale(mean.to(weight.device), params.alpha)
        w = weight.to(torch.float64)
        svd = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        return weight, scale, svd

    def _finish(self, module: nn.Module, prepared, rank: int) -> tuple[nn.Module, float]:
        weight, scale, svd = prepared
        first, second = asvd_factors(weight, scale, rank, svd=svd)
        factors = (first.to(weight.dtype), second.to(weight.dtype))
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise ValueError(f"ASVD factors at rank {rank} are not finite in {weight.dtype}; "
                             "use a float32 model or a smaller alpha")
        approx = factors[1].double() @ factors[0].double()
        return self.build(module, factors), relative_error(weight.double(), approx)

    def compress(self, module: nn.Module, rank: int, params: Any,
                 data: Any = None, cache: dict | None = None) -> tuple[nn.Module, float]:
        """The factorized module and its relative weight error; plain SVD without ``data``."""
        params = params if params is not None else ASVDParams()
        if data is None or params.alpha == 0:
            return super().compress(module, rank, params)
        return self._finish(module, self._prepare(module, params, data), rank)

    def compress_ranks(self, module: nn.Module, ranks: list[int], params: Any,
                       data: Any = None) -> Iterator[tuple[nn.Module, float]]:
        """:meth:`compress` at each rank, sharing one SVD of ``W S``."""
        params = params if params is not None else ASVDParams()
        if data is None or params.alpha == 0:
            for rank in ranks:
                yield super().compress(module, rank, params)
            return
        prepared = self._prepare(module, params, data)
        for rank in ranks:
            yield self._finish(module, prepared, rank)

    def data_rank_matrices(self, module: nn.Module, data: Any, params: Any) -> list[torch.Tensor]:
        """What spectrum rules rank: the whitened weight when the data has the Gram
        statistics (as ``svd``), else ``W S`` (``alpha`` from ``params``, default 0.5)."""
        if "input_gram" in data and "cross_moment" in data:
            return super().data_rank_matrices(module, data, params)
        if "input_abs_mean" in data:
            weight = self.weight(module).detach().to(torch.float64)
            alpha = getattr(params, "alpha", ASVDParams().alpha)
            scale = asvd_scale(data["input_abs_mean"].to(weight.device), alpha)
            return [weight * scale[None, :]]
        return self.rank_matrices(module)


@musco_core.hookimpl
def musco_add_statistics(register):
    register(InputAbsMean())


@musco_core.hookimpl
def musco_add_decompositions(register):
    register(ASVD())
