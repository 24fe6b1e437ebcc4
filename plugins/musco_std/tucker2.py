"""Tucker-2 decomposition of kxk conv weights, rebuilt as 1x1 -> kxk -> 1x1 convs."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn

from musco_core import Decomposition, LayerStats, relative_error
from musco_std.statistics import WHITENING_STATISTICS
from musco_std._conv import (
    cast_factors,
    check_finite,
    check_finite_factors,
    check_kxk_conv,
    checked_compress,
    factor_kw,
    in_out_positions,
    leading_left_vectors,
    non_negative,
    positive_int,
    working,
    working_dtype,
)


class Tucker2Convs(nn.Module):
    """Three convs of the class ``_conv``: ``last(core(first(x)))``.

    ``first``: kernel-1 conv ``in -> r_in``; ``core``: kernel-k conv ``r_in -> r_out``
    with the original stride, padding, dilation and padding mode; ``last``: kernel-1
    conv ``r_out -> out`` with the original bias. The body of :class:`Tucker2Conv2d`
    (``nn.Conv2d``) and :class:`musco_std.conv1d.Tucker2Conv1d` (``nn.Conv1d``).
    """

    _conv = nn.Conv2d  # no annotation: TorchScript would read it as an attribute

    def __init__(self, in_channels: int, ranks: tuple[int, int], out_channels: int,
                 kernel_size, *, stride=1, padding=0, dilation=1, padding_mode: str = "zeros",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        r_in, r_out = ranks
        kw = {"device": device, "dtype": dtype}
        self.first = self._conv(in_channels, r_in, 1, bias=False, **kw)
        self.core = self._conv(r_in, r_out, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, padding_mode=padding_mode, bias=False, **kw)
        self.last = self._conv(r_out, out_channels, 1, bias=bias, **kw)

    @property
    def rank(self) -> tuple[int, int]:
        """``(r_in, r_out)``."""
        return self.core.in_channels, self.core.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


class Tucker2Conv2d(Tucker2Convs):
    """kxk ``nn.Conv2d`` factorized as ``last(core(first(x)))``.

    ``first``: 1x1 conv ``in -> r_in``; ``core``: kxk conv ``r_in -> r_out`` with the
    original stride, padding and dilation; ``last``: 1x1 conv ``r_out -> out``
    with the original bias.
    """

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "tucker2"
    _conv = nn.Conv2d


def tucker2_hooi(weight: torch.Tensor, rank: tuple[int, int], *, n_iter_max: int = 10,
                 tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight on its two channel modes by HOOI from an HOSVD start.

    ``weight`` (out, in, kh, kw) is approximated as

    .. math::  W \\approx G \\times_0 U_{out} \\times_1 U_{in},
               \\quad G \\in \\mathbb{R}^{r_{out} \\times r_{in} \\times k_h \\times k_w}

    with orthonormal ``U_out`` (out x r_out) and ``U_in`` (in x r_in). ``U_out``
    starts as the leading left singular vectors of the mode-0 unfolding (HOSVD);
    then each sweep sets ``U_in`` to the leading left singular vectors of
    ``(W x_0 U_out^T)_(1)`` and ``U_out`` to those of ``(W x_1 U_in^T)_(0)``
    (higher-order orthogonal iteration). Singular vectors come from Gram
    matrices (see :func:`~musco_std._conv.leading_left_vectors`). Because the
    factors are orthonormal, ``|W - W'|^2 = |W|^2 - |G|^2``; iteration stops when
    the relative error improves by less than ``tol`` (checked from the third sweep on,
    as tensorly's ``partial_tucker`` does) or after ``n_iter_max`` sweeps.

    Computed in the weight's precision (float32 for half types) on its device.
    Returns ``(first, core, last)``: ``first = U_in^T`` (r_in, in), ``core = G``
    (r_out, r_in, kh, kw) and ``last = U_out`` (out, r_out), in the weight's dtype.

    References
    ----------
    L. De Lathauwer, B. De Moor, J. Vandewalle, "On the best rank-1 and rank-(R1, R2,
    ..., RN) approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 21 (2000).
    T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009).
    Y.-D. Kim et al., "Compression of deep convolutional neural networks for fast and
    low power mobile applications", ICLR 2016.
    """
    r_in, r_out = rank
    cout, cin, kh, kw = weight.shape
    w = weight.detach().to(working_dtype(weight)).reshape(cout, cin, kh * kw)
    k = kh * kw
    w_oki = w.permute(0, 2, 1).contiguous()  # (out, k, in)
    w_iko = w.permute(1, 2, 0).contiguous()  # (in, k, out)
    norm2 = float(torch.linalg.vector_norm(w.to(torch.float64)) ** 2)
    u_out = leading_left_vectors(w.reshape(cout, cin * k), r_out)  # HOSVD start
    error = math.inf
    for sweep in range(max(1, n_iter_max)):
        u_in = leading_left_vectors((w_iko @ u_out).reshape(cin, k * r_out), r_in)
        z = (w_oki @ u_in).reshape(cout, k * r_in)
        u_out = leading_left_vectors(z, r_out)
        core = u_out.T @ z  # (r_out, k * r_in)
        core_norm2 = float(torch.linalg.vector_norm(core.to(torch.float64)) ** 2)
        new_error = math.sqrt(max(norm2 - core_norm2, 0.0) / norm2) if norm2 > 0 else 0.0
        if sweep >= 2 and error - new_error < tol:
            break
        error = new_error
    core = core.reshape(r_out, k, r_in).permute(0, 2, 1).reshape(r_out, r_in, kh, kw)
    dtype = weight.dtype
    return u_in.T.to(dtype).contiguous(), core.to(dtype).contiguous(), u_out.to(dtype).contiguous()


def tucker2_reconstruct(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``W' = G x_0 last x_1 first^T``: shape (out, in, kh, kw)."""
    return torch.einsum("or,rshw,sc->ochw", last, core, first)


@attrs.frozen
class Tucker2Params:
    #: Maximum number of HOOI sweeps after the HOSVD start.
    n_iter_max: int = attrs.field(default=10, validator=positive_int)
    #: Stop when a sweep improves the relative error by less than this (tensorly's
    #: ``partial_tucker`` rule and default).
    tol: float = attrs.field(default=1e-4, validator=non_negative)
    #: Fit the layer's output on the calibration data in the input-channel mode
    #: (whiten that mode with the input channels' Gram, run HOOI, fold back); aimed
    #: at the original layer's output. Needs ``Compressor(..., calibration=...)``.
    whiten: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: Relative ridge ``damping * tr(G) / d`` on the channel Gram (whiten only).
    damping: float = attrs.field(default=1e-2, validator=non_negative)


class ChannelTucker2:
    """What ``tucker2`` and ``tucker2_1d`` share: Tucker-2 on the two channel modes.

    Mixed in before :class:`~musco_core.Decomposition`. Needs
    ``_dims(module) -> (in, out, kernel positions, has_bias)``,
    ``_positions(stats) -> (input positions, output positions)`` of one call, and
    ``_new(module, (r_in, r_out))``, the empty factorized module that replaces ``module``.
    """

    def full_rank(self, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, Tucker2Convs):
            return module.rank
        return module.in_channels, module.out_channels

    def param_count(self, module: nn.Module, rank: tuple[int, int]) -> int:
        n_in, n_out, k, bias = self._dims(module)
        r_in, r_out = rank
        return n_in * r_in + k * r_in * r_out + r_out * n_out + (n_out if bias else 0)

    def flop_count(self, module: nn.Module, rank: tuple[int, int], stats: LayerStats) -> int:
        n_in, n_out, k, _ = self._dims(module)
        r_in, r_out = rank
        p_in, p_out = self._positions(stats)
        per_call = 2 * (p_in * n_in * r_in + p_out * (k * r_in * r_out + r_out * n_out))
        return per_call * stats.calls

    def decompose(self, weight: torch.Tensor, rank: tuple[int, int], params: Any = None):
        params = params if params is not None else Tucker2Params()
        return tucker2_hooi(weight, tuple(rank), n_iter_max=params.n_iter_max, tol=params.tol)

    def reconstruct(self, factors) -> torch.Tensor:
        return tucker2_reconstruct(*factors)

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, core, last = factors
        bias = self._dims(module)[3]
        bias_src = module.last if isinstance(module, Tucker2Convs) else module
        new = self._new(module, (core.shape[1], core.shape[0]))
        with torch.no_grad():
            new.first.weight.copy_(first.reshape(new.first.weight.shape))
            new.core.weight.copy_(core.reshape(new.core.weight.shape))
            new.last.weight.copy_(last.reshape(new.last.weight.shape))
            if bias:
                new.last.bias.copy_(bias_src.bias)
        return new


class Tucker2(ChannelTucker2, Decomposition):
    """Tucker-2 on the channel modes: ``W ~ G x_0 U_out x_1 U_in`` (Kim et al. 2016).

    Handles kxk ``nn.Conv2d`` (any kernel shape other than 1x1, stride, padding
    including ``'same'``, dilation, with or without bias; ``groups=1`` and
    ``padding_mode='zeros'`` only) and its own :class:`Tucker2Conv2d`, which it
    decomposes again at smaller ranks in a later round. The rank is a tuple
    ``(r_in, r_out)`` with ``1 <= r_in <= in`` and ``1 <= r_out <= out`` (for a
    :class:`Tucker2Conv2d`, up to its current ranks).

    Parameters: ``k^2 r_in r_out + in r_in + r_out out (+ out bias)``.

    References
    ----------
    Y.-D. Kim et al., "Compression of deep convolutional neural networks for fast and
    low power mobile applications", ICLR 2016.
    J. Gusak et al., "Automated multi-stage compression of neural networks", ICCVW 2019
    (arXiv:1903.09973).
    """

    name = "tucker2"
    summary = "Tucker-2 (HOOI) of kxk conv weights -> 1x1, kxk, 1x1 convs"
    Params = Tucker2Params
    module_types = (nn.Conv2d, Tucker2Conv2d)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        check_kxk_conv(name, module, self.name)

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int, int, bool]:
        """(in, out, kh * kw, has_bias) of a supported module."""
        if isinstance(module, Tucker2Conv2d):
            kh, kw = module.core.kernel_size
            return (module.first.in_channels, module.last.out_channels, kh * kw,
                    module.last.bias is not None)
        kh, kw = module.kernel_size
        return module.in_channels, module.out_channels, kh * kw, module.bias is not None

    @staticmethod
    def _positions(stats: LayerStats) -> tuple[int, int]:
        return in_out_positions(stats)

    def rank_for_param_count(self, module: nn.Module, budget: float) -> tuple[int, int] | None:
        """The largest rank ``(floor(t f_in), floor(t f_out))`` within ``budget`` parameters.

        As in MUSCO, the ranks stay proportional to the full ranks
        ``(f_in, f_out)`` (the channel counts for a plain conv). With
        ``r = t f``, the parameter count is the quadratic
        ``k^2 f_in f_out t^2 + (in f_in + out f_out) t + bias``; its positive root
        ``t*`` is the largest real scale within budget. The integer rank is then
        the last point of the path ``t -> (max(1, floor(t f_in)), max(1, floor(t f_out)))``
        around ``t*`` whose count is within budget (checked exactly, so the result
        is never over budget). ``None`` if even ``(1, 1)`` is over budget.
        """
        n_in, n_out, k, bias = self._dims(module)
        f_in, f_out = self.full_rank(module)
        a = k * f_in * f_out
        b = n_in * f_in + n_out * f_out
        c = (n_out if bias else 0) - budget
        t_star = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) if b * b - 4 * a * c >= 0 else 0.0

        def point(t: float) -> tuple[int, int]:
            return (min(f_in, max(1, math.floor(t * f_in + 1e-9))),
                    min(f_out, max(1, math.floor(t * f_out + 1e-9))))

        # Breakpoints of the floor path near t*, plus t* itself.
        ts = {min(t_star, 1.0)}
        for f in (f_in, f_out):
            j0 = math.floor(t_star * f)
            ts.update(j / f for j in range(max(1, j0 - 2), min(f, j0 + 3) + 1))
        best = None
        for t in sorted(ts):
            p = point(t)
            if self.param_count(module, p) <= budget:
                best = p if best is None or sum(p) > sum(best) else best
        if best is None and self.param_count(module, (1, 1)) <= budget:
            best = (1, 1)
        return best

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The conv weight; for a :class:`Tucker2Conv2d` its reconstruction.

        The reconstruction is formed in float32 (float64 for float64 layers) and
        returned in the layer's dtype.
        """
        if isinstance(module, Tucker2Conv2d):
            r_in, r_out = module.rank
            dense = tucker2_reconstruct(working(module.first.weight).reshape(r_in, -1),
                                        working(module.core.weight),
                                        working(module.last.weight).reshape(-1, r_out))
            return dense.to(module.core.weight.dtype)
        return module.weight

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """Mode-1 (in x out*kh*kw) and mode-0 (out x in*kh*kw) unfoldings: for r_in, r_out.

        For a :class:`Tucker2Conv2d` the unfoldings of its core instead, made
        independent of the outer factors' scaling: with ``first^T = Q_f R_f`` and
        ``last = Q_l R_l``, ``W = G' x_0 Q_l x_1 Q_f`` where ``G' = G x_0 R_l x_1 R_f``;
        the unfoldings of ``G'`` have the same non-zero singular values as the
        weight's, without the exact zeros that would hide the noise from EVBMF
        (MUSCO applies VBMF to the core in later rounds).

        The matrices are in float32 for float16 / bfloat16 layers (float64 stays float64).
        """
        if isinstance(module, Tucker2Conv2d):
            r_in, r_out = module.rank
            first = working(module.first.weight).reshape(r_in, -1)
            last = working(module.last.weight).reshape(module.last.weight.shape[0], r_out)
            r_f = torch.linalg.qr(first.T, mode="r").R
            r_l = torch.linalg.qr(last, mode="r").R
            g = torch.einsum("xa,abhw,yb->xyhw", r_l, working(module.core.weight), r_f)
            return [g.transpose(0, 1).reshape(r_in, -1), g.reshape(r_out, -1)]
        w = working(self.weight(module))
        return [w.transpose(0, 1).reshape(w.shape[1], -1), w.reshape(w.shape[0], -1)]

    def needs(self, params: Any) -> frozenset[str]:
        return WHITENING_STATISTICS if getattr(params, "whiten", False) else frozenset()

    def _compress_on_data(self, module: nn.Module, rank: tuple[int, int], params: Any,
                          data: Any) -> tuple[nn.Module, float]:
        """Data-aware Tucker-2 (``whiten = true``): :func:`musco_std.datafit.whitened_tucker2`.

        Minimises, over the kernel offsets, the output error of each offset's slice on
        the input channels' statistics (exact for inputs uncorrelated across offsets),
        aimed at the original layer's output; in float64. The reported error is the
        relative weight error.
        """
        import functools

        from musco_std.datafit import whitened_tucker2

        dtype = self.weight(module).dtype
        weight = working(self.weight(module)).double()
        check_finite(weight)
        fit = functools.partial(tucker2_hooi, n_iter_max=params.n_iter_max, tol=params.tol)
        first, core, last = whitened_tucker2(
            weight, tuple(rank), data["input_gram"].to(weight.device), fit=fit,
            cross=data["cross_moment"].to(weight.device), damping=params.damping)
        factors = cast_factors((first, core, last), dtype)
        check_finite_factors(factors, dtype)
        error = relative_error(weight, tucker2_reconstruct(first, core, last))
        return self.build(module, factors), error

    def data_rank_matrices(self, module: nn.Module, data: Any, params: Any) -> list[torch.Tensor]:
        """Unfoldings of the weight whitened in its input-channel mode (see :meth:`compress`)."""
        from musco_std.datafit import whiten_input_mode

        weight = working(self.weight(module)).double()
        whitened, _ = whiten_input_mode(weight, data["input_gram"].to(weight.device),
                                        cross=data["cross_moment"].to(weight.device),
                                        damping=getattr(params, "damping", 1e-2))
        return [whitened.transpose(0, 1).reshape(whitened.shape[1], -1),
                whitened.reshape(whitened.shape[0], -1)]

    def compress(self, module: nn.Module, rank: tuple[int, int], params: Any,
                 data: Any = None) -> tuple[nn.Module, float]:
        """As the base class for a conv; for a :class:`Tucker2Conv2d`, decompose its core only.

        With ``whiten = true`` and the layer's statistics (``data``), the data-aware
        fit instead (see :meth:`_compress_on_data`), for both.

        With ``last = Q_L T_L`` and ``first^T = Q_F T_F`` (thin QR), the dense weight
        is ``(G x_0 T_L x_1 T_F) x_0 Q_L x_1 Q_F`` with orthonormal ``Q``s, so HOOI
        on the small ``(r_out, r_in, kh, kw)`` tensor ``G x_0 T_L x_1 T_F`` is HOOI on
        the dense weight (same error), and its new 1x1 factors fold into ``Q_L``
        and ``Q_F``. The layer stays three convs and the dense weight is never formed.

        All of it runs in float32 (float64 for float64 layers) on the layer's device;
        the new factors are cast to the layer's dtype. Raises ``ValueError`` when the
        weight or a factor holds NaN or Inf.
        """
        if data is not None and getattr(params, "whiten", False):
            return self._compress_on_data(module, rank, params, data)
        if not isinstance(module, Tucker2Conv2d):
            return checked_compress(self, module, rank, params)
        params = params if params is not None else Tucker2Params()
        r_in, r_out = module.rank
        dtype = module.core.weight.dtype
        first = working(module.first.weight).reshape(r_in, -1)
        last = working(module.last.weight).reshape(-1, r_out)
        core = working(module.core.weight)
        for what, t in (("weight of 'first'", first), ("weight of 'core'", core),
                        ("weight of 'last'", last)):
            check_finite(t, what)
        q_l, t_l = torch.linalg.qr(last)
        q_f, t_f = torch.linalg.qr(first.T)
        small = tucker2_reconstruct(t_f.T, core, t_l)
        f2, core2, l2 = tucker2_hooi(small, tuple(rank), n_iter_max=params.n_iter_max,
                                     tol=params.tol)
        factors = cast_factors((f2 @ q_f.T, core2, q_l @ l2), dtype)
        check_finite_factors(factors, dtype)
        if dtype == small.dtype:  # orthonormal Q's: the small tensor's error is the layer's
            error = relative_error(small, tucker2_reconstruct(f2, core2, l2))
        else:  # measure what the cast to a half type costs too, on the dense weights
            error = relative_error(tucker2_reconstruct(first, core, last),
                                   tucker2_reconstruct(*cast_factors(factors, small.dtype)))
        return self.build(module, factors), error

    def skeleton(self, module: nn.Module, rank: tuple[int, int], params: Any = None) -> nn.Module:
        """The module :meth:`compress` builds at ``rank``, from shapes alone (weights uninitialised).

        No HOOI runs, so it is cheap and works on any device, ``meta`` included.
        """
        return self._new(module, tuple(rank))

    def _new(self, module: nn.Module, rank: tuple[int, int]) -> Tucker2Conv2d:
        """An empty :class:`Tucker2Conv2d` of ``rank = (r_in, r_out)`` replacing ``module``."""
        n_in, n_out, _, bias = self._dims(module)
        conv = module.core if isinstance(module, Tucker2Conv2d) else module
        return Tucker2Conv2d(n_in, rank, n_out, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, bias=bias,
                             **factor_kw(module))
