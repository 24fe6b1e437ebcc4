"""CP decompositions of kxk conv weights (cp3, cp4), rebuilt as 1x1 -> depthwise -> 1x1 convs."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn

from musco_core import Decomposition, LayerStats
from musco_std._conv import (
    check_kxk_conv,
    checked_compress,
    factor_kw,
    in_out_positions,
    non_negative,
    positive_int,
    same_padding,
    spatial,
    working,
    working_dtype,
)


class CP3Conv2d(nn.Module):
    """kxk ``nn.Conv2d`` factorized as ``last(depthwise(first(x)))`` (CP of rank ``R``).

    ``first``: 1x1 conv ``in -> R``; ``depthwise``: kh x kw conv with ``groups=R``
    and the original stride, padding and dilation; ``last``: 1x1 conv ``R -> out``
    with the original bias.
    """

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "cp3"

    def __init__(self, in_channels: int, rank: int, out_channels: int, kernel_size, *,
                 stride=1, padding=0, dilation=1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, **kw)
        self.depthwise = nn.Conv2d(rank, rank, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=rank, bias=False, **kw)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.depthwise(self.first(x)))


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class CP4Conv2d(nn.Module):
    """kxk ``nn.Conv2d`` factorized as ``last(horizontal(vertical(first(x))))`` (CP of rank ``R``).

    ``first``: 1x1 conv ``in -> R``; ``vertical``: kh x 1 depthwise conv carrying the
    height part of stride, padding and dilation; ``horizontal``: 1 x kw depthwise
    conv carrying the width part; ``last``: 1x1 conv ``R -> out`` with the original
    bias. ``padding='same'`` becomes explicit padding, or stays ``'same'`` on both
    depthwise convs where PyTorch would pad asymmetrically (stride is 1 then).
    """

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "cp4"
    #: Python-side helpers that ``torch.jit.script`` must not compile.
    __jit_unused_properties__ = ["geometry"]

    def __init__(self, in_channels: int, rank: int, out_channels: int, kernel_size, *,
                 stride=1, padding=0, dilation=1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        kh, kw_ = _pair(kernel_size)
        sh, sw = _pair(stride)
        dh, dw = _pair(dilation)
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = same_padding((kh, kw_), (dh, dw))  # explicit unless asymmetric
        if isinstance(padding, str):
            pad_v = pad_h = padding
        else:
            ph, pw = _pair(padding)
            pad_v, pad_h = (ph, 0), (0, pw)
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, **kw)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=pad_v,
                                  dilation=(dh, 1), groups=rank, bias=False, **kw)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw_), stride=(1, sw), padding=pad_h,
                                    dilation=(1, dw), groups=rank, bias=False, **kw)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @property
    def geometry(self) -> dict[str, Any]:
        """kernel_size, stride, padding and dilation of the equivalent dense conv."""
        v, h = self.vertical, self.horizontal
        padding = v.padding if isinstance(v.padding, str) else (v.padding[0], h.padding[1])
        return {"kernel_size": (v.kernel_size[0], h.kernel_size[1]),
                "stride": (v.stride[0], h.stride[1]), "padding": padding,
                "dilation": (v.dilation[0], h.dilation[1])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))


# -- the math ---------------------------------------------------------------------------


def khatri_rao(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product; the first matrix's index varies slowest."""
    out = matrices[0]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r a_r o b_r o c_r ...`` of factors ``(I_n, R)``: the full tensor."""
    shape = tuple(f.shape[0] for f in factors)
    return (factors[0] @ khatri_rao(list(factors[1:])).T).reshape(shape)


def _mttkrp(permuted: torch.Tensor, factors: list[torch.Tensor], mode: int,
            order: tuple[int, ...]) -> torch.Tensor:
    """MTTKRP of ``mode`` without forming the full Khatri-Rao product.

    ``permuted`` is the tensor with axes ``(mode, *rest, big)`` (``order``), where
    ``big`` is the largest other mode: it is contracted first by a matmul, the
    remaining modes by a small Khatri-Rao product. Peak memory is
    ``numel / I_big * R`` instead of ``numel / I_mode * R``.
    """
    rest, big = order[1:-1], order[-1]
    y = permuted @ factors[big]  # (I_mode, *rest, R)
    rank = y.shape[-1]
    if not rest:
        return y
    kr = khatri_rao([factors[m] for m in rest])
    return (y.reshape(y.shape[0], -1, rank) * kr).sum(1)


def _slice_init(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """CP start from SVDs of the matrix slices spanned by the two largest modes.

    Every slice ``T[..., l, ...]`` (an ``I_p x I_q`` matrix) is expanded by its
    SVD; the ``rank`` largest singular triplets over all slices become the
    components (``sqrt(s) u``, ``sqrt(s) v`` and a one-hot vector selecting the
    slice in the other modes). This is the best approximation of ``T`` by
    per-slice SVDs and is exact when every slice has rank ``<= rank / #slices``.
    """
    dims = tensor.shape
    p, q = sorted(range(len(dims)), key=lambda m: dims[m])[-2:]
    p, q = min(p, q), max(p, q)
    others = [m for m in range(len(dims)) if m not in (p, q)]
    n_slices = math.prod(dims[m] for m in others)
    slices = tensor.permute(*others, p, q).reshape(n_slices, dims[p], dims[q])
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    top = torch.topk(s.reshape(-1), rank).indices
    which, j = top // s.shape[1], top % s.shape[1]
    root = s.reshape(-1)[top].sqrt()
    factors: list[torch.Tensor] = [None] * len(dims)  # type: ignore[list-item]
    factors[p] = u[which, :, j].T * root
    factors[q] = vh[which, j, :].T * root
    index = which
    for m in reversed(others):
        one_hot = torch.zeros(dims[m], rank, dtype=tensor.dtype, device=tensor.device)
        one_hot[index % dims[m], torch.arange(rank, device=tensor.device)] = 1
        factors[m] = one_hot
        index = index // dims[m]
    return factors


def _svd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding; random columns beyond its size."""
    factors = []
    for mode, size in enumerate(tensor.shape):
        unfolded = tensor.movedim(mode, 0).reshape(size, -1)
        u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
        k = min(rank, u.shape[1])
        f = u[:, :k]
        if k < rank:
            extra = torch.randn(size, rank - k, generator=generator, dtype=torch.float64)
            f = torch.cat([f, extra.to(f)], dim=1)
        factors.append(f)
    return factors


def _random_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Seeded standard Gaussian factors with columns of about unit norm."""
    return [(torch.randn(size, rank, generator=generator, dtype=torch.float64)
             / math.sqrt(size)).to(tensor.device) for size in tensor.shape]


def _starts(tensor: torch.Tensor, rank: int, generator: torch.Generator):
    """The ALS starts, in order: the primary one, the other SVD-based one, then random ones."""
    n_slices = math.prod(sorted(tensor.shape)[:-2])
    if rank >= n_slices:
        yield _slice_init(tensor, rank)
        yield _svd_init(tensor, rank, generator)
    else:
        yield _svd_init(tensor, rank, generator)
        yield _slice_init(tensor, rank)
    while True:
        yield _random_init(tensor, rank, generator)


def cp_als(tensor: torch.Tensor, rank: int, *, n_iter_max: int = 500, tol: float = 1e-5,
           patience: int = 3, random_state: int = 0, line_search: bool = True,
           restarts: int = 1) -> list[torch.Tensor]:
    """CP decomposition of an N-way tensor by alternating least squares.

    .. math::  T \\approx \\sum_{r=1}^{R} a^{(0)}_r \\circ a^{(1)}_r \\circ \\dots

    Start: if ``rank`` is at least the number of slices spanned by the two
    largest modes, :func:`_slice_init` (per-slice SVDs, exact for slice-wise
    low-rank data); otherwise the leading singular vectors of each unfolding
    (:func:`_svd_init`), completed with seeded random columns (``random_state``)
    where ``rank`` exceeds a mode's size. Each ALS update solves
    ``A_n V = MTTKRP_n`` with ``V`` the Hadamard product of the other Gram
    matrices, by a Cholesky solve with a tiny ridge (``1e-12 trace(V) / R``) so
    rank-deficient starts stay solvable. With ``line_search``, from the third
    sweep on the factors are also extrapolated along the last sweep's step,
    ``F + sweep^(1/3) (F - F_prev)`` (Bro's line search, as in tensorly's
    ``linesearch=True``), and the extrapolated factors are kept when their exact
    error is lower; this costs about one more MTTKRP per sweep and shortens
    swamps. Finally each component's norm is shared equally among its factors.

    Stopping rule: the relative error ``e_k = |T - T'_k| / |T|`` is tracked from
    the Gram matrices (exactly, from the residual, once it falls below ``1e-4``,
    where the Gram formula loses digits). A run stops when ``e_k`` reaches
    the precision of the input (``10 eps`` of float32 for float32 / half inputs,
    of float64 for float64 ones), when the relative change
    ``|e_{k-1} - e_k| / e_{k-1}`` stays below ``tol`` for ``patience``
    consecutive sweeps, or when the sweeps run out.

    Swamps: a run that stops on the relative-change rule above the input's
    precision has either converged or stalled on a swamp, a long plateau of
    slow decrease (the iterates leave a saddle slowly) after which the error
    drops again; the error curve cannot tell the two apart. So such a run is
    followed by a restart, up to ``restarts`` times: from the other SVD-based
    start (:func:`_slice_init` after :func:`_svd_init` and vice versa), then
    from seeded random factors. The result with the lowest error is kept, so a
    restart never makes it worse, and ``n_iter_max`` bounds the sweeps of all
    starts together: a run that uses all its sweeps is never restarted, one
    that reaches the input's precision needs no restart. ``restarts=0`` is the
    single-start ALS of issue 10.

    All arithmetic is in float64 on the tensor's device, whatever its dtype:
    the error is a small difference of large numbers and float32 hides
    progress below about ``3e-4``. Returns the factors ``(I_n, R)`` in the
    tensor's dtype.

    References
    ----------
    T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009).
    R. Bro, "Multi-way analysis in the food industry", PhD thesis, Univ. of Amsterdam (1998).
    V. Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
    CP-decomposition", ICLR 2015.
    """
    dtype = tensor.dtype
    t = tensor.detach().to(torch.float64)
    floor = 10 * torch.finfo(working_dtype(tensor)).eps
    n_modes = t.ndim
    generator = torch.Generator().manual_seed(int(random_state))
    orders, permuted = [], []
    for mode in range(n_modes):
        others = [m for m in range(n_modes) if m != mode]
        big = max(others, key=lambda m: (t.shape[m], m))
        order = (mode, *[m for m in others if m != big], big)
        orders.append(order)
        permuted.append(t.permute(*order).contiguous())
    norm = float(torch.linalg.vector_norm(t))
    norm2 = norm * norm
    eye = torch.eye(rank, dtype=torch.float64, device=t.device)

    def exact_error(fs: list[torch.Tensor]) -> float:
        return float(torch.linalg.vector_norm(t - cp_reconstruct(fs))) / norm

    def run(factors: list[torch.Tensor],
            budget: int) -> tuple[list[torch.Tensor], float, int, bool]:
        """ALS from ``factors`` for at most ``budget`` sweeps: (factors, error, sweeps, stalled)."""
        factors = [f.to(t.device) for f in factors]
        grams = [f.T @ f for f in factors]
        error = math.inf
        stalled = 0
        sweep = 0
        for sweep in range(budget):
            before = list(factors)
            for mode in range(n_modes):
                v = torch.ones_like(grams[0])
                for m in range(n_modes):
                    if m != mode:
                        v = v * grams[m]
                m_mat = _mttkrp(permuted[mode], factors, mode, orders[mode])
                ridge = 1e-12 * float(torch.diagonal(v).sum()) / rank + 1e-300
                chol = torch.linalg.cholesky(v + ridge * eye)
                new = torch.cholesky_solve(m_mat.T, chol).T
                factors[mode] = new
                grams[mode] = new.T @ new
            if norm2 == 0:
                return factors, 0.0, sweep + 1, False
            inner = float((m_mat * new).sum())
            rec2 = float((v * grams[n_modes - 1]).sum())
            new_error = math.sqrt(max(norm2 - 2 * inner + rec2, 0.0) / norm2)
            if new_error < 1e-4:  # the Gram formula has lost most digits here
                new_error = exact_error(factors)
            if line_search and sweep >= 2:
                # Extrapolate along the last sweep's step; keep it if the error drops.
                step = sweep ** (1.0 / 3.0)
                trial = [f + step * (f - b) for f, b in zip(factors, before)]
                trial_error = exact_error(trial)
                if trial_error < new_error:
                    factors, new_error = trial, trial_error
                    grams = [f.T @ f for f in factors]
            if new_error <= floor:
                return factors, new_error, sweep + 1, False
            change = (abs(error - new_error) / error if math.isfinite(error) and error > 0
                      else math.inf)
            stalled = stalled + 1 if change < tol else 0
            error = new_error
            if stalled >= patience:
                return factors, error, sweep + 1, True
        return factors, error, sweep + 1, False

    budget = max(1, n_iter_max)
    best, best_error = None, math.inf
    for start, factors in enumerate(_starts(t, rank, generator)):
        factors, error, used, stalled = run(factors, budget)
        if best is None or error < best_error:
            best, best_error = factors, error
        budget -= used
        if not stalled or budget <= 0 or start >= restarts:
            break
    factors = best
    # Share each component's norm equally among the factors.
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    total = torch.stack(norms).prod(0)
    share = total ** (1.0 / n_modes)
    factors = [torch.where(n > 0, f / n.clamp_min(1e-300) * share, f)
               for f, n in zip(factors, norms)]
    return [f.to(dtype).contiguous() for f in factors]


# -- the strategies ---------------------------------------------------------------------


def _int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attribute.name!r} must be an int, got {value!r}")


def non_negative_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name!r} must be an int >= 0, got {value!r}")


@attrs.frozen
class CPParams:
    #: Maximum number of ALS sweeps, of all starts together (see ``restarts``).
    n_iter_max: int = attrs.field(default=500, validator=positive_int)
    #: Stop when the relative error changes by less than this fraction of itself
    #: (``|e_prev - e| / e_prev < tol``) for ``patience`` consecutive sweeps.
    tol: float = attrs.field(default=1e-5, validator=non_negative)
    #: Consecutive sweeps below ``tol`` before stopping.
    patience: int = attrs.field(default=3, validator=positive_int)
    #: Seed of the random start columns (only used when the rank exceeds a mode's size
    #: and is below the number of slices) and of random restarts (``restarts >= 2``); the
    #: result is deterministic for a seed.
    random_state: int = attrs.field(default=0, validator=_int)
    #: Extrapolate the factors after each sweep and keep them if the error drops.
    line_search: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    #: Restarts after a start stopped by ``tol`` above the input's precision (possibly in a
    #: swamp): from the other SVD-based start, then from random factors; the lowest error is
    #: kept and ``n_iter_max`` bounds the sweeps of all starts together. 0: a single start.
    restarts: int = attrs.field(default=1, validator=non_negative_int)


class _CPBase(Decomposition):
    """What cp3 and cp4 share: checks, counts and the module geometry."""

    Params = CPParams
    #: The factorized module class this decomposition builds.
    factorized: type[nn.Module] = nn.Module

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        check_kxk_conv(name, module, self.name)

    @staticmethod
    def _geometry(module: nn.Module) -> dict:
        if isinstance(module, CP4Conv2d):
            return module.geometry
        conv = module.depthwise if isinstance(module, CP3Conv2d) else module
        return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
                "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                "dilation": tuple(conv.dilation)}

    def _dims(self, module: nn.Module) -> tuple[int, int, int, int, bool]:
        """(in, out, kh, kw, has_bias) of a supported module."""
        kh, kw = self._geometry(module)["kernel_size"]
        if isinstance(module, (CP3Conv2d, CP4Conv2d)):
            return (module.first.in_channels, module.last.out_channels, kh, kw,
                    module.last.bias is not None)
        return module.in_channels, module.out_channels, kh, kw, module.bias is not None

    def _modes(self, module: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def _rank_cost(self, module: nn.Module) -> int:
        """Parameters per unit of rank."""
        return sum(self._modes(module))

    def full_rank(self, module: nn.Module) -> int:
        """Product of all tensor modes but the largest (``numel / max mode``).

        A CP of that rank reproduces any tensor exactly (one component per entry
        of the smaller modes), so it bounds every useful rank and is always at
        least the rank at which the factorized layer stops being smaller
        (``numel / sum of modes``). For a factorized module: its current rank.
        """
        if isinstance(module, self.factorized):
            return module.rank
        modes = self._modes(module)
        return math.prod(modes) // max(modes)

    def param_count(self, module: nn.Module, rank: int) -> int:
        n_in, n_out, _, _, bias = self._dims(module)
        return rank * self._rank_cost(module) + (n_out if bias else 0)

    def rank_for_param_count(self, module: nn.Module, budget: float) -> int | None:
        """``floor((budget - bias) / sum of modes)``, capped at :meth:`full_rank`."""
        n_in, n_out, _, _, bias = self._dims(module)
        rank = math.floor((budget - (n_out if bias else 0)) / self._rank_cost(module))
        rank = min(rank, self.full_rank(module))
        return rank if rank >= 1 else None

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """One matrix for the one rank component: the mode-0 unfolding (out x in*kh*kw).

        Spectrum-based rank rules (vbmf, energy) then see a matrix rank, a heuristic
        for a CP rank; prefer ``param_reduction`` / ``flop_reduction`` for CP.
        """
        w = working(self.weight(module))
        return [w.reshape(w.shape[0], -1)]

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The conv weight; for a factorized module its reconstruction.

        The reconstruction is formed in float32 (float64 for float64 layers) and
        returned in the layer's dtype.
        """
        if isinstance(module, self.factorized):
            dtype = module.first.weight.dtype
            factors = [working(f) for f in self._factors_of(module)]
            return self.reconstruct(factors).to(dtype)
        return module.weight

    def _factors_of(self, module: nn.Module):
        raise NotImplementedError

    def compress(self, module: nn.Module, rank: int, params: Any) -> tuple[nn.Module, float]:
        """As the base class, with a finiteness check of the weight and of the factors.

        Raises ``ValueError`` when the weight (or a factor, e.g. one that overflowed
        float16) holds NaN or Inf; the engine reports it naming the layer.
        """
        return checked_compress(self, module, rank, params)

    def skeleton(self, module: nn.Module, rank: int, params: Any = None) -> nn.Module:
        """The module :meth:`compress` builds at ``rank``, from shapes alone (weights uninitialised).

        No ALS runs, so it is cheap and works on any device, ``meta`` included.
        """
        return self._new(module, rank)

    def _new(self, module: nn.Module, rank: int) -> nn.Module:
        n_in, n_out, _, _, bias = self._dims(module)
        return self.factorized(n_in, rank, n_out, bias=bias, **self._geometry(module),
                               **factor_kw(module))

    def _copy_bias(self, module: nn.Module, new: nn.Module) -> None:
        src = module.last if isinstance(module, self.factorized) else module
        if src.bias is not None:
            new.last.bias.copy_(src.bias)


class CP3(_CPBase):
    """CP of the (out, in, kh*kw) weight: ``W[o, i, s] ~ sum_r A[o, r] B[i, r] C[s, r]``.

    Rebuilt as :class:`CP3Conv2d`: 1x1 (``B^T``), kh x kw depthwise (``C``, the
    original stride, padding, dilation), 1x1 (``A``, bias). Handles kxk
    ``nn.Conv2d`` (``groups=1``, ``padding_mode='zeros'``) and its own
    :class:`CP3Conv2d` (CP recomputed at the new rank from its dense weight).
    The rank ``R`` is an int in ``1 .. full_rank``; parameters
    ``R (in + kh kw + out) (+ out bias)``.

    References
    ----------
    V. Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
    CP-decomposition", ICLR 2015.
    T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009).
    """

    name = "cp3"
    summary = "CP (ALS) of the (out, in, kh*kw) weight -> 1x1, depthwise kxk, 1x1 convs"
    module_types = (nn.Conv2d, CP3Conv2d)
    factorized = CP3Conv2d

    def _modes(self, module):
        n_in, n_out, kh, kw, _ = self._dims(module)
        return (n_out, n_in, kh * kw)

    def flop_count(self, module: nn.Module, rank: int, stats: LayerStats) -> int:
        n_in, n_out, kh, kw, _ = self._dims(module)
        p_in, p_out = in_out_positions(stats)
        return 2 * rank * (p_in * n_in + p_out * (kh * kw + n_out)) * stats.calls

    def decompose(self, weight: torch.Tensor, rank: int, params: Any = None):
        params = params if params is not None else CPParams()
        cout, cin, kh, kw = weight.shape
        a, b, c = cp_als(weight.reshape(cout, cin, kh * kw), rank, n_iter_max=params.n_iter_max,
                         tol=params.tol, patience=params.patience,
                         random_state=params.random_state, line_search=params.line_search,
                         restarts=params.restarts)
        return b.T.contiguous(), c.T.reshape(rank, kh, kw).contiguous(), a

    def reconstruct(self, factors) -> torch.Tensor:
        first, depthwise, last = factors
        return torch.einsum("or,rhw,ri->oihw", last, depthwise, first)

    def _factors_of(self, module: CP3Conv2d):
        r = module.rank
        dw = module.depthwise
        return (module.first.weight.reshape(r, -1), dw.weight.reshape(r, *dw.kernel_size),
                module.last.weight.reshape(-1, r))

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, depthwise, last = factors
        new = self._new(module, first.shape[0])
        with torch.no_grad():
            new.first.weight.copy_(first.reshape(new.first.weight.shape))
            new.depthwise.weight.copy_(depthwise.reshape(new.depthwise.weight.shape))
            new.last.weight.copy_(last.reshape(new.last.weight.shape))
            self._copy_bias(module, new)
        return new


class CP4(_CPBase):
    """CP of the (out, in, kh, kw) weight: ``W ~ sum_r a_r o b_r o v_r o h_r``.

    Rebuilt as :class:`CP4Conv2d`: 1x1 (``B^T``), kh x 1 depthwise (``V``, height
    stride / padding / dilation), 1 x kw depthwise (``H``, width ones), 1x1
    (``A``, bias); the output equals the dense conv's exactly for any stride,
    padding (``'same'`` included) and dilation. Handles kxk ``nn.Conv2d``
    (``groups=1``, ``padding_mode='zeros'``) and its own :class:`CP4Conv2d`. The
    rank ``R`` is an int in ``1 .. full_rank``; parameters
    ``R (in + kh + kw + out) (+ out bias)``.

    References
    ----------
    V. Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
    CP-decomposition", ICLR 2015.
    T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009).
    """

    name = "cp4"
    summary = "CP (ALS) of the (out, in, kh, kw) weight -> 1x1, kx1, 1xk depthwise, 1x1 convs"
    module_types = (nn.Conv2d, CP4Conv2d)
    factorized = CP4Conv2d

    def _modes(self, module):
        n_in, n_out, kh, kw, _ = self._dims(module)
        return (n_out, n_in, kh, kw)

    def flop_count(self, module: nn.Module, rank: int, stats: LayerStats) -> int:
        n_in, n_out, kh, kw, _ = self._dims(module)
        n, h_in, w_in = spatial(stats.input_shape)
        _, h_out, w_out = spatial(stats.output_shape)
        per_call = (n * h_in * w_in * n_in + n * h_out * w_in * kh
                    + n * h_out * w_out * (kw + n_out))
        return 2 * rank * per_call * stats.calls

    def decompose(self, weight: torch.Tensor, rank: int, params: Any = None):
        params = params if params is not None else CPParams()
        a, b, v, h = cp_als(weight, rank, n_iter_max=params.n_iter_max, tol=params.tol,
                            patience=params.patience, random_state=params.random_state,
                            line_search=params.line_search, restarts=params.restarts)
        return b.T.contiguous(), v.T.contiguous(), h.T.contiguous(), a

    def reconstruct(self, factors) -> torch.Tensor:
        first, vertical, horizontal, last = factors
        return torch.einsum("or,rh,rw,ri->oihw", last, vertical, horizontal, first)

    def _factors_of(self, module: CP4Conv2d):
        r = module.rank
        return (module.first.weight.reshape(r, -1), module.vertical.weight.reshape(r, -1),
                module.horizontal.weight.reshape(r, -1), module.last.weight.reshape(-1, r))

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, vertical, horizontal, last = factors
        new = self._new(module, first.shape[0])
        with torch.no_grad():
            new.first.weight.copy_(first.reshape(new.first.weight.shape))
            new.vertical.weight.copy_(vertical.reshape(new.vertical.weight.shape))
            new.horizontal.weight.copy_(horizontal.reshape(new.horizontal.weight.shape))
            new.last.weight.copy_(last.reshape(new.last.weight.shape))
            self._copy_bias(module, new)
        return new
