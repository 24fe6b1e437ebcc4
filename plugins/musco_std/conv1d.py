"""``nn.Conv1d``: truncated SVD of kernel-1 convs and Tucker-2 of kernel-k convs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from musco_core import Decomposition, LayerStats, UnsupportedLayerError, relative_error
from musco_std._conv import factor_kw
from musco_std.grouped import group_problem
from musco_std.svd import FactorPairSVD, TwoConvs, core_of_product, fill_factor_pair
from musco_std.tucker2 import (
    ChannelTucker2,
    Tucker2Params,
    Tucker2Convs,
    tucker2_hooi,
    tucker2_reconstruct,
)


class SVDConv1d(TwoConvs):
    """Kernel-1 ``nn.Conv1d`` factorized as two kernel-1 convs: in -> rank -> out.

    ``first`` keeps the original stride, padding, dilation and padding mode (no
    bias); ``second`` carries the original bias.
    """

    #: Marks a factorized layer for the engine and the ``factorized`` matcher.
    musco_decomposition = "svd1d"
    _conv = nn.Conv1d


class Tucker2Conv1d(Tucker2Convs):
    """Kernel-k ``nn.Conv1d`` factorized as ``last(core(first(x)))``.

    ``first``: kernel-1 conv ``in -> r_in``; ``core``: kernel-k conv ``r_in -> r_out``
    with the original stride, padding, dilation and padding mode; ``last``:
    kernel-1 conv ``r_out -> out`` with the original bias. Any padding mode works:
    padding acts on each channel alike, so it commutes with ``first``'s channel mixing.
    """

    musco_decomposition = "tucker2_1d"
    _conv = nn.Conv1d


def conv1d_positions(shape: tuple[int, ...]) -> int:
    """Positions (batch x length) of a Conv1d input or output: ``(N, C, L)`` or unbatched ``(C, L)``."""
    if len(shape) == 2:
        return shape[1]
    return math.prod(shape) // shape[1] if len(shape) == 3 else 0


def _check_conv1d(name: str, module: nn.Module, decomposition: str, kernel_one: bool) -> None:
    if not isinstance(module, nn.Conv1d):
        return
    problem = group_problem(name, module, decomposition)
    if problem:
        raise UnsupportedLayerError(problem)
    k = module.kernel_size[0]
    if kernel_one and k != 1:
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} handles Conv1d with kernel_size=1 "
            f"only, got kernel_size={k}; use 'tucker2_1d' for kernels larger than 1")
    if not kernel_one and k == 1:
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {decomposition!r} handles Conv1d with kernel_size>1 "
            f"only, got kernel_size=1; use 'svd1d' for kernel-1 convs")


class SVD1d(FactorPairSVD, Decomposition):
    """Truncated SVD of a kernel-1 ``nn.Conv1d`` weight (out x in), rebuilt as :class:`SVDConv1d`.

    Handles kernel-1 ``nn.Conv1d`` (any stride, padding, dilation, padding mode,
    bias; ``groups=1``) and its own :class:`SVDConv1d`, which it re-truncates in a
    later round. The rank is an int in ``1 .. min(in, out)``; the math is
    :func:`musco_std.svd.svd_factors` (Eckart-Young).
    """

    name = "svd1d"
    summary = "truncated SVD of kernel-1 Conv1d weights -> two kernel-1 Conv1d"
    module_types = (nn.Conv1d, SVDConv1d)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        _check_conv1d(name, module, self.name, kernel_one=True)

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int, bool]:
        if isinstance(module, nn.Conv1d):
            return module.in_channels, module.out_channels, module.bias is not None
        return module.first.in_channels, module.second.out_channels, module.second.bias is not None

    @staticmethod
    def _positions(stats: LayerStats) -> int:
        return conv1d_positions(stats.output_shape)

    def weight(self, module: nn.Module) -> torch.Tensor:
        n_in, n_out, _ = self._dims(module)
        if isinstance(module, nn.Conv1d):
            return module.weight.reshape(n_out, n_in)
        return (module.second.weight.reshape(n_out, module.rank)
                @ module.first.weight.reshape(module.rank, n_in))

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """The weight matrix; for an :class:`SVDConv1d`, the r x r core of its two factors."""
        if isinstance(module, nn.Conv1d):
            return [self.weight(module).detach()]
        n_in, n_out, _ = self._dims(module)
        return [core_of_product(module.first.weight.detach().reshape(module.rank, n_in),
                                module.second.weight.detach().reshape(n_out, module.rank))]

    def skeleton(self, module: nn.Module, rank: int, params: Any = None) -> nn.Module:
        n_in, n_out, _ = self._dims(module)
        kw = factor_kw(module)
        return self.build(module, (torch.zeros(rank, n_in, **kw), torch.zeros(n_out, rank, **kw)))

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, second = factors
        n_in, n_out, bias = self._dims(module)
        conv = module if isinstance(module, nn.Conv1d) else module.first
        bias_src = module if isinstance(module, nn.Conv1d) else module.second
        new = SVDConv1d(n_in, first.shape[0], n_out, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, padding_mode=conv.padding_mode, bias=bias,
                        **factor_kw(module))
        return fill_factor_pair(new, first, second, bias_src.bias)


class Tucker21d(ChannelTucker2, Decomposition):
    """Tucker-2 of a kernel-k ``nn.Conv1d`` weight on its channel modes, rebuilt as :class:`Tucker2Conv1d`.

    ``W (out, in, k) ~ G x_0 U_out x_1 U_in`` with ``G`` of shape ``(r_out, r_in, k)``,
    computed by :func:`musco_std.tucker2.tucker2_hooi` (HOOI from an HOSVD start) on
    the weight seen as ``(out, in, k, 1)``. Handles kernel-k ``nn.Conv1d`` (k > 1;
    any stride, padding including ``'same'``, dilation, padding mode, bias;
    ``groups=1``) and its own :class:`Tucker2Conv1d`, whose core it decomposes again
    in a later round. The rank is ``(r_in, r_out)``; parameters
    ``k r_in r_out + in r_in + r_out out (+ out bias)``. Same ``Params`` as ``tucker2``.

    :meth:`weight` returns the 4-D ``(out, in, k, 1)`` view, so the pure math is
    exactly ``tucker2``'s.

    References
    ----------
    Y.-D. Kim et al., "Compression of deep convolutional neural networks for fast and
    low power mobile applications", ICLR 2016.
    """

    name = "tucker2_1d"
    summary = "Tucker-2 (HOOI) of kernel-k Conv1d weights -> kernel-1, kernel-k, kernel-1 Conv1d"
    Params = Tucker2Params
    module_types = (nn.Conv1d, Tucker2Conv1d)

    def check(self, name: str, module: nn.Module) -> None:
        super().check(name, module)
        _check_conv1d(name, module, self.name, kernel_one=False)

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int, int, bool]:
        """(in, out, k, has_bias)."""
        if isinstance(module, Tucker2Conv1d):
            return (module.first.in_channels, module.last.out_channels,
                    module.core.kernel_size[0], module.last.bias is not None)
        return module.in_channels, module.out_channels, module.kernel_size[0], module.bias is not None

    @staticmethod
    def _positions(stats: LayerStats) -> tuple[int, int]:
        return conv1d_positions(stats.input_shape), conv1d_positions(stats.output_shape)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight as ``(out, in, k, 1)``."""
        if isinstance(module, Tucker2Conv1d):
            r_in, r_out = module.rank
            return tucker2_reconstruct(module.first.weight.reshape(r_in, -1),
                                       module.core.weight.unsqueeze(-1),
                                       module.last.weight.reshape(-1, r_out))
        return module.weight.unsqueeze(-1)

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        """Mode-1 (in x out*k) and mode-0 (out x in*k) unfoldings; of the core for a factorized layer."""
        if isinstance(module, Tucker2Conv1d):
            r_in, r_out = module.rank
            first = module.first.weight.detach().reshape(r_in, -1)
            last = module.last.weight.detach().reshape(-1, r_out)
            r_f = torch.linalg.qr(first.T, mode="r").R
            r_l = torch.linalg.qr(last, mode="r").R
            g = torch.einsum("xa,abk,yb->xyk", r_l, module.core.weight.detach(), r_f)
            return [g.transpose(0, 1).reshape(r_in, -1), g.reshape(r_out, -1)]
        w = module.weight.detach()
        return [w.transpose(0, 1).reshape(w.shape[1], -1), w.reshape(w.shape[0], -1)]

    def compress(self, module: nn.Module, rank: tuple[int, int], params: Any,
                 data: Any = None) -> tuple[nn.Module, float]:
        """As the base class for a conv; for a :class:`Tucker2Conv1d`, HOOI on its core only.

        The same reduction as ``tucker2``: with thin QRs ``last = Q_L T_L`` and
        ``first^T = Q_F T_F``, HOOI of the small ``G x_0 T_L x_1 T_F`` is HOOI of the
        dense weight, and the new outer factors fold into ``Q_L`` and ``Q_F``.
        """
        if not isinstance(module, Tucker2Conv1d):
            return super().compress(module, rank, params)
        params = params if params is not None else Tucker2Params()
        r_in, r_out = module.rank
        q_l, t_l = torch.linalg.qr(module.last.weight.detach().reshape(-1, r_out))
        q_f, t_f = torch.linalg.qr(module.first.weight.detach().reshape(r_in, -1).T)
        small = tucker2_reconstruct(t_f.T, module.core.weight.detach().unsqueeze(-1), t_l)
        f2, core, l2 = tucker2_hooi(small, tuple(rank), n_iter_max=params.n_iter_max,
                                    tol=params.tol)
        error = relative_error(small, tucker2_reconstruct(f2, core, l2))
        return self.build(module, (f2 @ q_f.T, core, q_l @ l2)), error

    def skeleton(self, module: nn.Module, rank: tuple[int, int], params: Any = None) -> nn.Module:
        n_in, n_out, k, _ = self._dims(module)
        r_in, r_out = rank
        kw = factor_kw(module)
        return self.build(module, (torch.zeros(r_in, n_in, **kw),
                                   torch.zeros(r_out, r_in, k, 1, **kw),
                                   torch.zeros(n_out, r_out, **kw)))

    def _new(self, module: nn.Module, rank: tuple[int, int]) -> Tucker2Conv1d:
        """An empty :class:`Tucker2Conv1d` of ``rank = (r_in, r_out)`` replacing ``module``."""
        n_in, n_out, k, bias = self._dims(module)
        conv = module.core if isinstance(module, Tucker2Conv1d) else module
        return Tucker2Conv1d(n_in, rank, n_out, k, stride=conv.stride, padding=conv.padding,
                             dilation=conv.dilation, padding_mode=conv.padding_mode, bias=bias,
                             **factor_kw(module))
