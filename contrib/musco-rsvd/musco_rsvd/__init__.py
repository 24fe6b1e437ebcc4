"""A third-party-style musco plugin: randomized SVD and a parameter-count matcher."""

from __future__ import annotations

import attrs
import torch
from torch import nn

import musco_core
from musco_std.svd import SVD


def _non_negative_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name!r} must be an int >= 0, got {value!r}")


@attrs.frozen
class RSVDParams:
    #: Extra random directions sampled beyond the rank (more: closer to the optimum).
    oversample: int = attrs.field(default=10, validator=_non_negative_int)
    #: Power iterations (more: better on slowly decaying spectra).
    n_iter: int = attrs.field(default=2, validator=_non_negative_int)
    #: Seed of the random test matrix, so results are reproducible.
    seed: int = attrs.field(default=0, validator=_non_negative_int)


def randomized_svd_factors(weight: torch.Tensor, rank: int, params: RSVDParams):
    """Rank-``rank`` factors ``(first, second)`` with ``weight ~ second @ first``.

    Uses ``torch.svd_lowrank`` with ``rank + oversample`` random directions and
    ``n_iter`` power iterations, then keeps the leading ``rank`` triplets. The
    singular values are split evenly between the factors, as ``svd`` does.
    Computed in float32 (float64 for float64 weights) on the weight's device; the
    factors come back in the weight's dtype.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
    SIAM Review 53 (2011).
    """
    q = min(rank + params.oversample, *weight.shape)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(params.seed)
        u, s, v = torch.svd_lowrank(weight.detach().to(work), q=q, niter=params.n_iter)
    root = s[:rank].sqrt()
    first, second = root[:, None] * v[:, :rank].T, u[:, :rank] * root[None, :]
    return first.to(weight.dtype), second.to(weight.dtype)


class RandomizedSVD(SVD):
    """Truncated SVD computed by random projection: fast for large layers at small ranks.

    Inherits from ``svd`` everything but the factorization: the module types, the
    counts, the finiteness checks of ``compress`` and the shape-only ``skeleton``.
    """

    name = "rsvd"
    summary = "randomized truncated SVD (torch.svd_lowrank) of Linear / 1x1 conv weights"
    Params = RSVDParams

    def needs(self, params) -> frozenset[str]:
        """rsvd fits the weight alone: it uses no calibration statistics."""
        return frozenset()

    def decompose(self, weight, rank, params=None):
        return randomized_svd_factors(weight, rank, params or RSVDParams())


@attrs.frozen
class MinParamsParams:
    #: Smallest parameter count of a matched layer.
    min: int = attrs.field(validator=_non_negative_int)


class MinParams(musco_core.Matcher):
    """Layers with at least ``min`` parameters of their own."""

    name = "min_params"
    summary = "layers with at least `min` parameters"
    Params = MinParamsParams

    def matches(self, name: str, module: nn.Module, params: MinParamsParams) -> bool:
        return sum(p.numel() for p in module.parameters(recurse=False)) >= params.min


@musco_core.hookimpl
def musco_add_decompositions(register):
    register(RandomizedSVD())


@musco_core.hookimpl
def musco_add_matchers(register):
    register(MinParams())
