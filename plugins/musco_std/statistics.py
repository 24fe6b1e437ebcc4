"""First-party calibration statistics: the input Gram, the cross moment and the target Gram.

Each sums, over every call of a layer on the calibration data, a d x d float64
product of the layer's input rows (see :meth:`musco_core.Decomposition.input_rows`):
``X'`` the rows the layer sees in the model as it is now, ``X`` the rows the
original layer saw on the same batches.
"""

from __future__ import annotations

from typing import Any

import torch

from musco_core import Statistic
from musco_core.strategies import LayerBatch


class _RowProduct(Statistic):
    """Sum of ``left^T right`` over the calibration rows (d x d, float64)."""

    def pair(self, batch: LayerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, state: Any, batch: LayerBatch) -> torch.Tensor:
        left, right = self.pair(batch)
        if state is None:
            state = torch.zeros(left.shape[1], right.shape[1], dtype=torch.float64,
                                device=left.device)
        return state.addmm_(left.T, right)


class InputGram(_RowProduct):
    name = "input_gram"
    summary = "G = X'^T X': Gram of the inputs the layer sees now (float64, d x d)"

    def pair(self, batch):
        return batch.rows, batch.rows


class CrossMoment(_RowProduct):
    name = "cross_moment"
    summary = "C = X'^T X: inputs now against the original layer's inputs (float64, d x d)"

    def pair(self, batch):
        return batch.rows, batch.original_rows


class TargetGram(_RowProduct):
    name = "target_gram"
    summary = "T = X^T X: Gram of the original layer's inputs (float64, d x d)"

    def pair(self, batch):
        return batch.original_rows, batch.original_rows


STATISTICS = (InputGram(), CrossMoment(), TargetGram())

#: What a whitened (data-aware) fit reads: ``G = X'^T X'`` and ``C = X'^T X``.
WHITENING_STATISTICS = frozenset({"input_gram", "cross_moment"})
