"""Calibration data: batches, and the per-layer statistics streamed from them (float64 Grams)."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

#: Statistic names a strategy may list in :meth:`~musco_core.Strategy.needs`.
KNOWN_STATISTICS = frozenset({"input_gram"})


@attrs.frozen(eq=False)
class LayerData:
    """What the calibration data tells about one layer's inputs, accumulated in float64.

    Rows are the layer's input vectors as :meth:`Decomposition.input_rows` cuts them
    (features of a Linear, channel vectors of a conv), ``d`` wide. With ``X'`` the rows
    the layer sees in the model as it is now (earlier layers already compressed) and
    ``X`` the rows the *original* layer saw on the same batches:

    - ``gram``  = ``X'^T X'``  (d x d)
    - ``cross`` = ``X'^T X``   (d x d); equal to ``gram`` while nothing upstream changed
    - ``target_gram`` = ``X^T X`` (d x d)
    - ``rows``: how many rows were summed.

    The layer's original output on the original inputs is ``X W^T``; a factorized
    ``W'`` fed with what it really sees gives ``X' W'^T``. Its squared output error
    is ``tr(W T W^T) - 2 tr(W' C W^T) + tr(W' G W'^T)`` (``G = gram``, ``C = cross``,
    ``T = target_gram``), minimal over all ``W'`` at ``W' = W C^T G^{-1}``.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    target_gram: torch.Tensor
    rows: int

    @property
    def shifted(self) -> bool:
        """Whether the inputs differ from the original ones (something upstream changed)."""
        return not torch.equal(self.gram, self.cross)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as rows ``(n, d)``: features (last dim) or channel vectors (dim 1).

    4-D inputs (N, C, H, W) of a module with a ``stride`` (a conv, or a factorized
    conv whose first part has one) are read at the positions a 1x1 conv with that
    stride reads; other inputs are split into their last dimension.
    """
    if x.dim() == 4:
        stride = _stride(module)
        if stride != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _stride(module: nn.Module) -> tuple[int, int]:
    first = module if isinstance(module, nn.Conv2d) else getattr(module, "first", None)
    if isinstance(first, nn.Conv2d) and tuple(first.kernel_size) == (1, 1):
        return tuple(first.stride)  # type: ignore[return-value]
    return (1, 1)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    from musco_core.stats import _first_tensor

    t = _first_tensor(list(batch.values()) if isinstance(batch, dict) else batch)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1
