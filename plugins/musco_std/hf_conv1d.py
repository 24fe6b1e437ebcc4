"""``transformers``' ``Conv1D`` (GPT-2 family) by truncated SVD, without importing transformers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musco_core import Decomposition, UnsupportedLayerError
from musco_std.svd import FactorPairSVD, SVDLinear, fill_factor_pair


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (or looks exactly like) ``transformers.pytorch_utils.Conv1D``.

    Matched by class name and structure, never by import: a class named ``Conv1D``
    (or a subclass of one) with an int ``nf``, a 2-D ``weight`` of shape
    ``(in, nf)`` — stored transposed, the forward is ``x @ weight + bias`` — and a
    ``bias`` of shape ``(nf,)`` or ``None``.
    """
    if not any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
        return False
    nf = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (isinstance(nf, int) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == nf
            and (bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (nf,))))


class SVDHFConv1D(FactorPairSVD, Decomposition):
    """Truncated SVD of a GPT-2 style ``Conv1D``: ``W^T (out x in) ~ U_r S_r V_r^T``.

    ``Conv1D`` computes ``x @ weight + bias`` with ``weight`` stored as
    ``(in, out)``, i.e. it is an ``nn.Linear`` whose weight is ``weight^T``. The
    factorized layer is therefore the same :class:`~musco_std.svd.SVDLinear`
    (``Linear(in -> r)`` then ``Linear(r -> out)`` with the bias) that ``svd``
    builds for ``nn.Linear`` and re-truncates in a later round. The rank is an
    int in ``1 .. min(in, out)``. ``transformers`` is not imported; see
    :func:`is_hf_conv1d` for how the layer is recognised.
    """

    name = "svd_hf_conv1d"
    summary = "truncated SVD of transformers' Conv1D (GPT-2; weight stored (in, out)) -> SVDLinear"

    def check(self, name: str, module: nn.Module) -> None:
        if is_hf_conv1d(module):
            return
        if any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
            weight = getattr(module, "weight", None)
            raise UnsupportedLayerError(
                f"layer {name!r}: decomposition {self.name!r} found a class named Conv1D that "
                f"does not look like transformers' (expected an int 'nf', a 2-D 'weight' of "
                f"shape (in, nf) and a 'bias' of shape (nf,) or None; got nf="
                f"{getattr(module, 'nf', None)!r}, weight shape "
                f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else None})")
        raise UnsupportedLayerError(
            f"layer {name!r}: decomposition {self.name!r} does not support "
            f"{type(module).__name__}; it accepts transformers' Conv1D (GPT-2 family); use "
            f"'svd' for nn.Linear")

    @staticmethod
    def _dims(module: nn.Module) -> tuple[int, int, bool]:
        n_in, n_out = module.weight.shape
        return n_in, n_out, module.bias is not None

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight in ``nn.Linear``'s layout ``(out, in)``: the stored weight transposed."""
        return module.weight.T

    def rank_matrices(self, module: nn.Module) -> list[torch.Tensor]:
        return [self.weight(module).detach()]

    def skeleton(self, module: nn.Module, rank: int, params: Any = None) -> nn.Module:
        n_in, n_out, _ = self._dims(module)
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        return self.build(module, (torch.zeros(rank, n_in, **kw), torch.zeros(n_out, rank, **kw)))

    def build(self, module: nn.Module, factors) -> nn.Module:
        first, second = factors
        n_in, n_out, bias = self._dims(module)
        new = SVDLinear(n_in, first.shape[0], n_out, bias=bias, device=module.weight.device,
                        dtype=module.weight.dtype)
        return fill_factor_pair(new, first, second, module.bias)
